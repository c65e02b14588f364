// Backup-set names, checkpoint planning, the XML handed to libvirt, and the zip sink's CRC-32.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { dataFileName, lastArchivedChain, listSet, parseDataFileName, logFileName, qcowInfoName, readChains, writeDigestFile } from '../../src/set/backupSet.js';
import { MemoryDisk, craftStream } from '../support/craftedSet.js';
import { DirectoryTarget } from '../../src/set/target.js';
import { ZipTarget } from '../../src/set/zipTarget.js';
import { createRequire } from 'node:module';
import { PassThrough } from 'node:stream';
import { DigestList } from '../../src/stream/digestList.js';
import { randomBytes } from 'node:crypto';
import { backupJobXml, checkpointBitmapDisks, checkpointDiskSize, checkpointXml, planCheckpoint } from '../../src/libvirt/checkpoints.js';
import { parseDomainXml, resolveVolumes, selectDisks, sliceImageOpts, type DomainDisk } from '../../src/libvirt/domainXml.js';
import { qcow2CreateOptions } from '../../src/restore/qemu.js';

test('data file names follow virtnbdbackup', () => {
  assert.equal(dataFileName('vda', 'full', 'virtnbdbackup.0'), 'vda.full.data');
  assert.equal(dataFileName('vda', 'copy', 'copy'), 'vda.copy.data');
  assert.equal(dataFileName('sda', 'inc', 'virtnbdbackup.3'), 'sda.inc.virtnbdbackup.3.data');
  assert.equal(dataFileName('vdb', 'diff', '1700000000'), 'vdb.diff.1700000000.data');
  assert.deepEqual(parseDataFileName('sda.inc.virtnbdbackup.3.data'), { file: 'sda.inc.virtnbdbackup.3.data', disk: 'sda', level: 'inc', ident: 'virtnbdbackup.3' });
  assert.equal(parseDataFileName('vda.full.data.partial'), undefined);
  assert.equal(parseDataFileName('vda.full.x.data'), undefined);
  assert.equal(qcowInfoName('vda', 'virtnbdbackup.0'), 'vda.virtnbdbackup.0.qcow.json');
  assert.match(logFileName('inc', new Date(2026, 0, 2, 3, 4, 5)), /^backup\.inc\.01022026030405\.log$/);
  assert.equal(logFileName('diff', new Date(2026, 0, 2, 3, 4, 5), 2), 'backup.diff.01022026030405.2.log', 'a later run of that second');
  assert.equal(logFileName('auto', new Date(2026, 0, 2, 3, 4, 5)), 'backup.auto.01022026030405.log', '-l auto, as Python names it');
});

test('checkpoint chain: full starts at .0, inc continues, diff creates nothing, inc without chain refused', () => {
  assert.deepEqual(planCheckpoint('full', ['virtnbdbackup.0']), { name: 'virtnbdbackup.0', parent: '', create: true });
  assert.deepEqual(planCheckpoint('inc', ['virtnbdbackup.0', 'virtnbdbackup.1']), { name: 'virtnbdbackup.2', parent: 'virtnbdbackup.1', create: true });
  assert.deepEqual(planCheckpoint('diff', ['virtnbdbackup.0']), { name: 'virtnbdbackup.1', parent: 'virtnbdbackup.0', create: false });
  assert.equal(planCheckpoint('copy', []).create, false);
  assert.throws(() => planCheckpoint('inc', []), /full backup first/);
});

test('job and checkpoint XML list unselected disks as not participating', () => {
  const job = backupJobXml({ socket: '/var/tmp/s' }, 'virtnbdbackup.0', [{ target: 'vda', scratchFile: '/var/tmp/x' }], ['vda', 'vdb']);
  assert.match(job, /<incremental>virtnbdbackup\.0<\/incremental>/);
  assert.match(job, /<disk name='vdb' backup='no'\/>/);
  assert.match(job, /<server transport='unix' socket='\/var\/tmp\/s'\/>/);
  assert.match(backupJobXml({ host: 'kvm1.example', port: 10809 }, '', [{ target: 'vda', scratchFile: '/var/tmp/x' }], ['vda']), /<server transport='tcp' name='kvm1\.example' port='10809'\/>/);
  const cpt = checkpointXml({ name: 'virtnbdbackup.1', parent: 'virtnbdbackup.0', create: true }, ['vda'], ['vda', 'vdb']);
  assert.match(cpt, /<disk name='vda' checkpoint='bitmap'\/>/);
  assert.match(cpt, /<disk name='vdb' checkpoint='no'\/>/);
  assert.match(cpt, /<parent><name>virtnbdbackup\.0<\/name><\/parent>/);
});

test('a disk added since the parent checkpoint: found by the checkpoint\'s bitmaps, exported whole in the incremental job', () => {
  // As libvirt returns a checkpoint: its disks, then a copy of the domain whose <disk> elements must not count.
  const libvirtXml = `<domaincheckpoint><name>virtnbdbackup.0</name><creationTime>1700000000</creationTime><disks>
    <disk name='vda' checkpoint='bitmap' bitmap='virtnbdbackup.0'/><disk name='vdc' checkpoint='no'/></disks>
    <domain type='qemu'><devices><disk type='file' device='disk'><target dev='vdb' bus='virtio'/></disk></devices></domain></domaincheckpoint>`;
  assert.deepEqual(checkpointBitmapDisks(libvirtXml), ['vda']);
  assert.deepEqual(checkpointBitmapDisks('<domaincheckpoint><name>x.0</name></domaincheckpoint>'), []);
  const job = backupJobXml({ socket: '/var/tmp/s' }, 'virtnbdbackup.0', [{ target: 'vda', scratchFile: '/var/tmp/a' }, { target: 'vdb', scratchFile: '/var/tmp/b', full: true }], ['vda', 'vdb']);
  assert.match(job, /<disk name='vda' backup='yes' type='file'>/);
  assert.match(job, /<disk name='vdb' backup='yes' type='file' backupmode='full'>/);
  // A disk left out of the backups since an earlier checkpoint: its changes since that one.
  const resumed = backupJobXml({ socket: '/var/tmp/s' }, 'virtnbdbackup.2', [{ target: 'vdb', scratchFile: '/var/tmp/b', since: 'virtnbdbackup.0' }], ['vdb']);
  assert.match(resumed, /<disk name='vdb' backup='yes' type='file' backupmode='incremental' incremental='virtnbdbackup\.0'>/);
  // The size flag's XML names a disk's size only where QEMU has its bitmap.
  const sized = "<domaincheckpoint><name>virtnbdbackup.2</name><disks><disk name='vda' checkpoint='bitmap' bitmap='virtnbdbackup.2' size='1048576'/><disk name='vdb' checkpoint='bitmap' bitmap='virtnbdbackup.2'/></disks></domaincheckpoint>";
  assert.equal(checkpointDiskSize(sized, 'vda'), 1048576);
  assert.equal(checkpointDiskSize(sized, 'vdb'), undefined);
  // A full job exports every disk whole anyway: no per-disk mode.
  assert.doesNotMatch(backupJobXml({ socket: '/var/tmp/s' }, '', [{ target: 'vdb', scratchFile: '/var/tmp/b', full: true }], ['vdb']), /backupmode/);
});

const domainXml = `<domain type='qemu'><name>web</name><os><type>hvm</type><loader>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='/dev/vg/web'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/images/data.img'/><target dev='vdc' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/></disk>
  <channel type='unix'><source mode='bind' path='/run/libvirt/qemu/channel/1-web/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
  <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
</devices></domain>`;

test('domain XML: disks, boot files and the guest agent channel; selection skips raw and cdrom with reasons, honours -i/-x', () => {
  const info = parseDomainXml(domainXml);
  assert.equal(info.name, 'web');
  assert.deepEqual(info.disks.map((d) => [d.target, d.type, d.format, d.path]), [
    ['vda', 'file', 'qcow2', '/images/web.qcow2'], ['vdb', 'block', 'qcow2', '/dev/vg/web'],
    ['vdc', 'file', 'raw', '/images/data.img'], ['sda', 'file', 'raw', undefined],
  ]);
  assert.equal(info.bootFiles.loader, '/usr/share/OVMF/OVMF_CODE.fd');
  assert.equal(info.guestAgent, true);
  assert.equal(parseDomainXml(domainXml.replace(/<channel type='unix'>.*<\/channel>\n/, '')).guestAgent, false);
  const all = selectDisks(info.disks, {});
  assert.deepEqual(all.disks.map((d) => d.target), ['vda', 'vdb']);
  assert.deepEqual(all.skipped.map((s) => s.disk.target), ['vdc', 'sda']);
  assert.deepEqual(selectDisks(info.disks, { include: ['vdb'] }).disks.map((d) => d.target), ['vdb']);
  const excluded = selectDisks(info.disks, { exclude: ['vda'] });
  assert.deepEqual(excluded.disks.map((d) => d.target), ['vdb']);
  // What -x leaves out, cdrom drives, and raw disks -r cannot take into an inc are lines, not warnings (-e).
  assert.deepEqual(excluded.skipped.map((s) => [s.disk.target, s.reason, s.expected ?? false]), [
    ['vda', 'left out with -x', true], ['vdc', 'raw-format disk (no checkpoints possible); include it with -r/--raw', false], ['sda', 'cdrom device', true]]);
  const rawInInc = selectDisks(info.disks, { rawNotInThisLevel: true }).skipped.find((s) => s.disk.target === 'vdc');
  assert.deepEqual([rawInInc?.reason, rawInInc?.expected], ['raw-format disk (no checkpoints possible): -r takes it into full and copy backups only', true]);
});

test('domain XML: startupPolicy=\'optional\' is read; an optional disk marked missing is left out with a warning naming -x, not -S', () => {
  const xml = domainXml.replace("<source file='/images/web.qcow2'/>", "<source file='/images/web.qcow2' startupPolicy='optional'/>");
  const [vda, vdb] = parseDomainXml(xml).disks;
  assert.deepEqual([vda?.optional, vdb?.optional], [true, undefined]);
  const left = selectDisks([{ ...(vda as DomainDisk), missing: true }, vdb as DomainDisk], {});
  assert.deepEqual(left.disks.map((d) => d.target), ['vdb']);
  assert.match(left.skipped[0]?.reason ?? '', /^its image \/images\/web\.qcow2 is missing, .*leave the disk out with -x vda$/);
  assert.equal(left.skipped[0]?.expected, undefined);
  // -x comes first: a line, no warning.
  assert.equal(selectDisks([{ ...(vda as DomainDisk), missing: true }], { exclude: ['vda'] }).skipped[0]?.expected, true);
});

test('domain XML: network disks (rbd, nbd) are selected by format as other disks, and left out of a shut-off domain\'s backup', () => {
  const xml = domainXml.replace('</devices>', `
  <disk type='network' device='disk'><driver name='qemu' type='raw'/><auth username='admin'><secret type='ceph' uuid='2d26efa8-890b-3aa3-8d4c-2496d2d86b6a'/></auth>
    <source protocol='rbd' name='vms/web-disk1'><host name='10.0.0.1' port='6789'/></source><target dev='vdd' bus='virtio'/></disk>
  <disk type='network' device='disk'><driver name='qemu' type='qcow2'/><source protocol='nbd'><host transport='unix' socket='/run/n.sock'/></source><target dev='vde' bus='virtio'/></disk>
</devices>`);
  const { disks } = parseDomainXml(xml);
  assert.deepEqual(disks.filter((d) => d.type === 'network').map((d) => [d.target, d.path, d.network]), [
    ['vdd', undefined, { protocol: 'rbd', name: 'vms/web-disk1' }], ['vde', undefined, { protocol: 'nbd' }],
  ]);
  const running = selectDisks(disks, {});
  assert.ok(running.disks.some((d) => d.target === 'vde'));
  assert.match(running.skipped.find((s) => s.disk.target === 'vdd')?.reason ?? '', /^raw-format disk/);
  assert.ok(selectDisks(disks, { raw: true }).disks.some((d) => d.target === 'vdd'));
  const offline = selectDisks(disks, { raw: true, offline: true });
  assert.deepEqual(offline.disks.map((d) => d.target), ['vda', 'vdb', 'vdc']);
  assert.match(offline.skipped.find((s) => s.disk.target === 'vdd')?.reason ?? '', /^network disk \(rbd\) of a shut-off domain/);
});

test('domain XML: a read-only disk and a lun device are skipped with reasons; a volume disk is selected once its path is known', async () => {
  const xml = domainXml.replace('</devices>', `
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/images/shared.qcow2'/><target dev='vdd' bus='virtio'/><readonly/></disk>
  <disk type='block' device='lun'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/><target dev='sdb' bus='scsi'/></disk>
  <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='default' volume='web-data.qcow2'/><target dev='vde' bus='virtio'/></disk>
  <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='gone' volume='x.qcow2'/><target dev='vdf' bus='virtio'/></disk>
</devices>`);
  const { disks } = parseDomainXml(xml);
  await resolveVolumes(disks, async (pool, volume) => {
    if (pool === 'gone') throw new Error(`Storage pool not found: no storage pool with matching name '${pool}'`);
    return `/var/lib/libvirt/images/${volume}`;
  });
  const { disks: selected, skipped } = selectDisks(disks, {});
  assert.deepEqual(selected.map((d) => [d.target, d.path]), [['vda', '/images/web.qcow2'], ['vdb', '/dev/vg/web'], ['vde', '/var/lib/libvirt/images/web-data.qcow2']]);
  const reasons = Object.fromEntries(skipped.map((s) => [s.disk.target, s.reason]));
  assert.match(reasons.vdd ?? '', /^read-only disk \(<readonly\/>\)/);
  assert.match(reasons.sdb ?? '', /^lun device/);
  assert.match(reasons.vdf ?? '', /^libvirt gives no path of its volume x\.qcow2 in storage pool gone \(Storage pool not found/);
});

test('qcow2 create options come from qemu-img info JSON', () => {
  const info = JSON.stringify({ format: 'qcow2', 'cluster-size': 131072, 'format-specific': { type: 'qcow2', data: { compat: '1.1', 'lazy-refcounts': true, 'compression-type': 'zstd' } } });
  assert.deepEqual(qcow2CreateOptions(info), { options: ['compat=1.1', 'cluster_size=131072', 'lazy_refcounts=on', 'compression_type=zstd'], ignored: [] });
  assert.deepEqual(qcow2CreateOptions(undefined), { options: [], ignored: [] });
  assert.deepEqual(qcow2CreateOptions('not json'), { options: [], ignored: [] });
  // A crafted qcow.json cannot slip options of its own into qemu-img's -o (data_file= would truncate any file).
  const crafted = JSON.stringify({ 'cluster-size': 'x', 'format-specific': { data: { compat: '1.1,data_file=/etc/passwd', 'compression-type': 'zlib', 'refcount-bits': -1 } } });
  assert.deepEqual(qcow2CreateOptions(crafted), { options: ['compression_type=zlib'], ignored: ['compat "1.1,data_file=/etc/passwd"', 'cluster-size "x"', 'refcount-bits -1'] });
});

test('the digest file, written in chunks, is exactly the JSON of all pieces, for every count around a chunk', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-digests-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  for (const count of [0, 1, 255, 256, 257, 4095, 4096, 4097, 10000]) {
    const pieces = Array.from({ length: count }, (_, i) => ({ offset: i * 4096, length: 4096, digest: i.toString(16).padStart(64, '0') }));
    await writeDigestFile(new DirectoryTarget(dir), `vda.${count}.data`, pieces);
    assert.equal(await fs.readFile(path.join(dir, `vda.${count}.data.blake3.json`), 'utf8'), JSON.stringify({ algorithm: 'blake3', pieces }));
  }
});

test('DigestList keeps pieces in order across blocks, digests set as hex or in place, missing ones empty', () => {
  const list = new DigestList();
  const expected: Array<{ offset: number; length: number; digest: string }> = [];
  for (let i = 0; i < 9000; i++) {
    const slot = list.add(i * 2 ** 33, 4096 + i);
    const digest = i % 7 === 3 ? '' : randomBytes(32).toString('hex');
    if (digest && i % 2 === 0) list.set(slot, digest);
    else if (digest) {
      const { into, at } = list.place(slot);
      into.write(digest, at, 'hex');
    }
    expected.push({ offset: i * 2 ** 33, length: 4096 + i, digest });
  }
  assert.equal(list.length, 9000);
  assert.deepEqual([...list], expected);
});

test('a run\'s files keep their .partial names, synced, until it publishes them together, never over a name taken meanwhile; later ones take their names at once', async (t) => {
  const dir = await fs.mkdtemp(path.join('/var/tmp', 'vnbd-publish-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const target = new DirectoryTarget(dir, { publishTogether: true });
  for (const [name, bulk] of [['vda.inc.virtnbdbackup.1.data', true], ['vdb.inc.virtnbdbackup.1.data', false]] as const) {
    const sink = await target.create(name, { bulk });
    await sink.write([Buffer.from(name)]);
    await sink.commit();
  }
  await target.writeFile('vda.inc.virtnbdbackup.1.data.chksum', '1');
  assert.deepEqual((await fs.readdir(dir)).sort(), ['vda.inc.virtnbdbackup.1.data.chksum.partial', 'vda.inc.virtnbdbackup.1.data.partial', 'vdb.inc.virtnbdbackup.1.data.partial']);
  await target.publish();
  assert.deepEqual((await fs.readdir(dir)).sort(), ['vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.1.data.chksum', 'vdb.inc.virtnbdbackup.1.data']);
  assert.equal(await fs.readFile(path.join(dir, 'vdb.inc.virtnbdbackup.1.data'), 'utf8'), 'vdb.inc.virtnbdbackup.1.data');
  const later = await target.create('vdc.full.data');
  await later.commit();
  assert.ok((await fs.readdir(dir)).includes('vdc.full.data'));

  // A name another program took meanwhile is refused, not replaced; the run's file stays .partial.
  const racing = new DirectoryTarget(dir, { publishTogether: true });
  const sink = await racing.create('vde.full.data');
  await sink.write([Buffer.from('ours')]);
  await sink.commit();
  await fs.writeFile(path.join(dir, 'vde.full.data'), 'theirs');
  await assert.rejects(racing.publish(), /vde\.full\.data appeared while this run wrote it .*refusing to replace it/);
  assert.equal(await fs.readFile(path.join(dir, 'vde.full.data'), 'utf8'), 'theirs');
  assert.equal(await fs.readFile(path.join(dir, 'vde.full.data.partial'), 'utf8'), 'ours');
});

test('bulk files (O_DIRECT where taken): any write sizes give the exact bytes, past background flushes too, a .partial till commit, nothing overwritten', async (t) => {
  const dir = await fs.mkdtemp(path.join('/var/tmp', 'vnbd-direct-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const target = new DirectoryTarget(dir);
  // 150 MiB: the sink has started background flushes (every 64 MiB) while it still writes.
  for (const total of [0, 1, 4095, 4096, 4 * 1024 * 1024, 4 * 1024 * 1024 + 1, 13 * 1024 * 1024 + 40, 150 * 1024 * 1024 + 7]) {
    const data = randomBytes(total);
    const name = `vda.${total}.data`;
    const sink = await target.create(name, { bulk: true });
    for (let at = 0, step = 1; at < total; at += step, step = step * 3 + 17) {
      await sink.write([data.subarray(at, Math.min(total, at + step)), Buffer.alloc(0)]);
    }
    assert.ok((await fs.readdir(dir)).includes(`${name}.partial`));
    await sink.commit();
    assert.ok((await fs.readFile(path.join(dir, name))).equals(data), `${total} bytes`);
    await assert.rejects(target.create(name, { bulk: true }), /already exists/);
  }
  const aborted = await target.create('vdb.full.data', { bulk: true });
  await aborted.write([randomBytes(5 * 1024 * 1024)]);
  await aborted.abort();
  assert.ok((await fs.readdir(dir)).includes('vdb.full.data.partial'));
  assert.ok(!(await fs.readdir(dir)).includes('vdb.full.data'));
});

test('zip entries are summed by zlib.crc32: the crc-32 module that archiver\'s crc32-stream loads is the one the zip sink re-points', async () => {
  // If archiver's tree ever brings a crc-32 of its own, the re-pointing silently stops and zips get slower: this says so.
  const fromCrcStream = createRequire(createRequire(import.meta.url).resolve('crc32-stream'));
  const crc32 = fromCrcStream('crc-32') as { buf: (data: Uint8Array, seed?: number) => number };
  const original = crc32.buf;
  const target = await ZipTarget.open(new PassThrough());
  try {
    assert.notEqual(crc32.buf, original, 'crc-32 as crc32-stream loads it was not re-pointed');
    const data = randomBytes(100_000);
    const [a, b] = [data.subarray(0, 33_333), data.subarray(33_333)];
    assert.equal(crc32.buf(data) >>> 0, original(data) >>> 0);
    assert.equal(crc32.buf(b, crc32.buf(a)) >>> 0, original(data) >>> 0, 'a running sum, as crc32-stream keeps it');
  } finally {
    await target.abort();
  }
});

test('zip entries carry local time, as unzip and Python\'s zipfile read it (archiver\'s default is UTC)', async (t) => {
  const zone = process.env.TZ;
  process.env.TZ = 'Asia/Tokyo';
  t.after(() => { if (zone === undefined) delete process.env.TZ; else process.env.TZ = zone; });
  const out = new PassThrough();
  const chunks: Buffer[] = [];
  out.on('data', (chunk: Buffer) => chunks.push(chunk));
  const target = await ZipTarget.open(out);
  const before = new Date();
  await target.writeFile('a.txt', 'x');
  await target.close();
  const zip = Buffer.concat(chunks);
  // The first local file header: DOS time at byte 10, DOS date at byte 12.
  assert.equal(zip.readUInt32LE(0), 0x04034b50);
  const [time, date] = [zip.readUInt16LE(10), zip.readUInt16LE(12)];
  const stamped = new Date((date >> 9) + 1980, ((date >> 5) & 15) - 1, date & 31, time >> 11, (time >> 5) & 63, (time & 31) * 2);
  assert.ok(Math.abs(stamped.getTime() - before.getTime()) < 5000, `entry time ${stamped.toString()} is not the local time ${before.toString()}`);
});

test('a chain of twelve incrementals is ordered by number (.10 after .9), with its checkpoint list and without it', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-long-chain-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const disk = new MemoryDisk(1024 * 1024).fill(0x11, 0, 65536);
  const names = Array.from({ length: 13 }, (_, i) => `virtnbdbackup.${i}`);
  await craftStream({ dir, file: 'vda.full.data', disk, extents: [{ kind: 'data', offset: 0, length: 65536 }], diskName: 'vda' });
  for (let i = 1; i < names.length; i++) {
    await craftStream({
      dir, file: `vda.inc.${names[i]}.data`, disk, extents: [{ kind: 'data', offset: 0, length: 4096 }], diskName: 'vda',
      checkpointName: names[i], parentCheckpoint: names[i - 1], incremental: true,
    });
  }
  for (const list of [names, []]) {
    const chain = (await readChains(await listSet(dir), list)).get('vda') ?? [];
    assert.deepEqual(chain.map((l) => l.meta.checkpointName), names, list.length ? 'with the .cpt list' : 'without it');
  }
});

test('lastArchivedChain: the newest chain.<secs> moved aside, and the prefix flag its checkpoint list asks of the full that starts anew', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-aside-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  assert.equal(await lastArchivedChain(dir), undefined);
  await fs.mkdir(path.join(dir, 'chain.1795901892'));
  await fs.mkdir(path.join(dir, 'chain.1795909999'));
  assert.deepEqual(await lastArchivedChain(dir), { path: path.join(dir, 'chain.1795909999'), prefixFlag: '' });
  await fs.writeFile(path.join(dir, 'chain.1795909999', 'dom.cpt'), JSON.stringify(['virtnbdbackup.0']));
  assert.equal((await lastArchivedChain(dir))?.prefixFlag, '');
  await fs.writeFile(path.join(dir, 'chain.1795909999', 'dom.cpt'), JSON.stringify(['nightly.0', 'nightly.1']));
  assert.equal((await lastArchivedChain(dir))?.prefixFlag, ' --checkpoint-prefix nightly');
});

test('domain XML: a transient disk (<transient/>), on which libvirt refuses the whole backup job, is left out with a warning', () => {
  const xml = domainXml.replace("<target dev='vdb' bus='virtio'/>", "<target dev='vdb' bus='virtio'/><transient/>");
  const { disks } = parseDomainXml(xml);
  assert.deepEqual(disks.map((d) => d.transient), [undefined, true, undefined, undefined]);
  const selected = selectDisks(disks, {});
  assert.deepEqual(selected.disks.map((d) => d.target), ['vda']);
  const skipped = selected.skipped.find((s) => s.disk.target === 'vdb');
  assert.match(skipped?.reason ?? '', /^transient disk \(<transient\/>\): libvirt runs no backup job on it, .*leave it out with -x$/);
  assert.equal(skipped?.expected, undefined);
});

test('domain XML: a disk of another format than qcow2 or raw (vmdk) is left out of levels with checkpoints, with a warning naming -l copy; copy takes it', () => {
  const xml = domainXml.replace("<driver name='qemu' type='qcow2'/><source dev='/dev/vg/web'/>", "<driver name='qemu' type='vmdk'/><source dev='/dev/vg/web'/>");
  const { disks } = parseDomainXml(xml);
  const full = selectDisks(disks, { checkpoints: true });
  assert.deepEqual(full.disks.map((d) => d.target), ['vda']);
  const skipped = full.skipped.find((s) => s.disk.target === 'vdb');
  assert.match(skipped?.reason ?? '', /^vmdk-format disk: libvirt keeps checkpoints in qcow2 images only, .*back it up with -l copy, .*or leave it out with -x$/);
  assert.equal(skipped?.expected, undefined);
  assert.deepEqual(selectDisks(disks, {}).disks.map((d) => d.target), ['vda', 'vdb']);
  // Raw disks keep their own reason (-r).
  assert.match(full.skipped.find((s) => s.disk.target === 'vdc')?.reason ?? '', /^raw-format disk/);
});

test('domain XML: a disk\'s <mirror> names the block job holding it (copy, active-commit)', () => {
  const xml = domainXml.replace("<target dev='vda' bus='virtio'/>", "<mirror type='file' file='/images/web.copy' format='qcow2' job='copy' ready='yes'><format type='qcow2'/><source file='/images/web.copy'/></mirror><target dev='vda' bus='virtio'/>")
    .replace("<target dev='vdb' bus='virtio'/>", "<mirror type='block' job='active-commit'><source dev='/dev/vg/base'/></mirror><target dev='vdb' bus='virtio'/>");
  assert.deepEqual(parseDomainXml(xml).disks.map((d) => d.mirror), ['copy', 'active-commit', undefined, undefined]);
});

test('domain XML: a slice of a file or device (<slices>) is opened alone, under the disk\'s format (QEMU --image-opts)', () => {
  const xml = domainXml.replace("<source file='/images/data.img'/>", "<source file='/images/da,ta.img'><slices><slice type='storage' offset='1048576' size='4194304'/></slices></source>")
    .replace("<source dev='/dev/vg/web'/>", "<source dev='/dev/vg/web'><slices><slice type='storage' offset='0' size='8388608'/></slices></source>");
  const [vda, vdb, vdc] = parseDomainXml(xml).disks as DomainDisk[];
  assert.equal(sliceImageOpts(vda as DomainDisk), undefined);
  assert.equal(sliceImageOpts(vdc as DomainDisk), 'driver=raw,offset=1048576,size=4194304,file.driver=file,file.filename=/images/da,,ta.img');
  assert.equal(sliceImageOpts(vdb as DomainDisk), 'driver=qcow2,file.driver=raw,file.offset=0,file.size=8388608,file.file.driver=host_device,file.file.filename=/dev/vg/web');
});
