// virtnbdrestore on a real domain's set (full -> inc -> inc with write-zeroes and discard): a restored, adjusted and
// defined domain that starts on images equal to the source; thin output; restores onto a pre-filled raw file and
// a loop block device; --sequence against --until; verify of the whole set.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { TestDomain, run, tempDir, withTempDir, LIBVIRT_URI } from '../support/testbed.js';
import { anonHugeKiB, errorLines, hugePagesOffered, ourBin, qemuNbdPid, runCli, runOk } from '../support/cli.js';
import { ImageServer } from '../../src/restore/qemu.js';

const MiB = 1024 * 1024;
/** The NIC of the restore tests' domain: the restored domain keeps it, and -D warns while both are defined. */
const MAC = '52:54:00:7e:57:01';
const virsh = (...args: string[]): ReturnType<typeof run> => run('virsh', ['-c', LIBVIRT_URI, ...args], { allowFailure: true });

describe('restore of a real domain set', () => {
  let dom: TestDomain;
  let work: string;
  let set: string;
  /** Raw snapshot of `<disk>` at point p0 (full), p1 (inc 1), p2 (inc 2). */
  const ref = (point: string, disk = 'vda'): string => path.join(work, `${point}.${disk}.raw`);

  before(async () => {
    dom = await TestDomain.create({ disks: [
      { target: 'vda', sizeMiB: 128, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 8 }, { pattern: 0x22, offsetMiB: 64, lengthMiB: 8 }] },
      { target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x44, offsetMiB: 1, lengthMiB: 2 }] },
    ], mac: MAC });
    work = await tempDir('vnbd-restore-');
    set = path.join(work, 'set');
    const backup = (level: string): Promise<unknown> => runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', set, '-n']);
    const snapshot = async (point: string): Promise<void> => {
      for (const disk of ['vda', 'vdb']) await dom.snapshot(disk, ref(point, disk));
    };
    await snapshot('p0');
    await backup('full');
    await dom.write('vda', 0x33, '16M', '4M');
    await dom.write('vdb', 0x55, '8M', '1M');
    await snapshot('p1');
    await virsh('autostart', dom.name); // saved as autostart.virtnbdbackup.1 with this point only
    await backup('inc');
    await virsh('autostart', '--disable', dom.name);
    await dom.writeZeroes('vda', '64M', '2M');
    await dom.discard('vda', '68M', '2M');
    await dom.write('vda', 0x66, '100M', '1M');
    await dom.write('vda', 0x00, '110M', '1M'); // zeroes as data: stored as payload, must not be allocated again
    await snapshot('p2');
    await backup('inc');
  });
  after(async () => {
    await dom?.destroy();
    if (work) await fs.rm(work, { recursive: true, force: true });
  });

  async function assertSame(image: string, reference: string, format: 'qcow2' | 'raw' = 'qcow2'): Promise<void> {
    const r = await TestDomain.compare(image, reference, { formatA: format, formatB: 'raw' });
    assert.ok(r.identical, `${image} differs from ${reference}: ${r.output}`);
  }

  test('-c -D -N: the restored domain is defined, starts, and runs on images equal to the source at that point', async (t) => {
    const name = `vnbdtest-restored-${randomBytes(4).toString('hex')}`;
    t.after(async () => {
      await virsh('destroy', name);
      await virsh('undefine', '--checkpoints-metadata', name);
    });
    const out = path.join(work, 'defined');
    const r = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-c', '-D', '-N', name, '--until', 'virtnbdbackup.1']);
    assert.match(r.stderr, new RegExp(`defined as '${name}'`));
    assert.match(r.stderr, new RegExp(`warning: domain '${name}' has the MAC address ${MAC} of '${dom.name}', which is defined at ${LIBVIRT_URI} too: do not run both on one network`));
    const images = { vda: path.join(out, path.basename(dom.diskPath('vda'))), vdb: path.join(out, path.basename(dom.diskPath('vdb'))) };
    const xml = (await virsh('dumpxml', '--inactive', name)).stdout;
    assert.doesNotMatch(xml, new RegExp((await virsh('domuuid', dom.name)).stdout.trim()), 'the restored domain kept the source uuid');

    await run('virsh', ['-c', LIBVIRT_URI, 'start', name]);
    const blocks = (await virsh('domblklist', name)).stdout;
    for (const [disk, image] of Object.entries(images)) assert.match(blocks, new RegExp(`${disk}\\s+${image}`), blocks);
    const state = (await virsh('domstate', name)).stdout.trim();
    assert.equal(state, 'running');
    assert.match((await virsh('dominfo', name)).stdout, /Autostart:\s+enable/, 'the backed-up domain started with the host at that point');
    for (const disk of ['vda', 'vdb'] as const) await assertSame(images[disk], ref('p1', disk));
    const info = (await run('virsh', ['-c', LIBVIRT_URI, 'qemu-monitor-command', '--hmp', name, 'info block'])).stdout;
    for (const image of Object.values(images)) assert.ok(info.includes(image), `the running domain does not use ${image}:\n${info}`);

    const again = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'defined-again'), '-n', '-D', '-N', name]);
    assert.equal(again.code, 1);
    assert.match(errorLines(again).join('\n'), new RegExp(`domain '${name}' already exists at ${LIBVIRT_URI}; name the restored domain with -N`));
    assert.equal(await fs.access(path.join(work, 'defined-again')).then(() => true, () => false), false);
    // A name libvirt would refuse only when defining, after every image was written, is refused first.
    const slash = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'bad-name'), '-n', '-D', '-N', 'bad/name']);
    assert.equal(slash.code, 1);
    assert.match(errorLines(slash).join('\n'), /-N bad\/name: a domain name cannot contain '\/'; choose another name/);
    assert.equal(await fs.access(path.join(work, 'bad-name')).then(() => true, () => false), false);
  });

  test('restored images are thin: only written data is allocated, zeroed and trimmed ranges are not', async () => {
    const out = path.join(work, 'thin');
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vda']);
    const image = path.join(out, path.basename(dom.diskPath('vda')));
    await assertSame(image, ref('p2'));
    const map = JSON.parse((await run('qemu-img', ['map', '--output=json', image])).stdout) as Array<{ start: number; length: number; data: boolean }>;
    const data = map.filter((e) => e.data);
    const allocated = data.reduce((sum, e) => sum + e.length, 0);
    // 8M + 4M (0x33) + 8M - 2M zeroed - 2M trimmed + 1M (0x66); the 1M of zero data is not allocated
    assert.equal(allocated, 17 * MiB, JSON.stringify(data));
    for (const e of data) assert.ok(e.start + e.length <= 64 * MiB || e.start >= 70 * MiB || e.start + e.length <= 68 * MiB && e.start >= 66 * MiB, `zeroed range allocated: ${JSON.stringify(e)}`);
  });

  test('onto a pre-filled raw file or block device: every byte the disk must read as zero is written as zero; a qcow2 image, a zip or a file of the set is refused', async () => {
    const target = path.join(work, 'prefilled.raw');
    await fs.writeFile(target, Buffer.alloc(128 * MiB, 0xee));
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', target, '-n', '-d', 'vda', '--until', 'virtnbdbackup.1']);
    await assertSame(target, ref('p1'), 'raw');
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', target, '-n', '-d', 'vda']);
    await assertSame(target, ref('p2'), 'raw');

    const small = path.join(work, 'small.raw');
    await fs.writeFile(small, Buffer.alloc(4 * MiB, 0xee));
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', small, '-n', '-d', 'vdb']);
    await assertSame(small, ref('p2', 'vdb'), 'raw');

    // A block device (loop) filled with 0xee: the same, and one too small for the disk is refused.
    const backing = path.join(work, 'loop.img');
    await fs.writeFile(backing, Buffer.alloc(32 * MiB, 0xee));
    const device = (await run('losetup', ['-f', '--show', backing])).stdout.trim();
    try {
      await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', device, '-n', '-d', 'vdb']);
      await assertSame(device, ref('p2', 'vdb'), 'raw');
      const tooSmall = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', device, '-n', '-d', 'vda']);
      assert.match(errorLines(tooSmall).join('\n'), new RegExp(`block device ${device} holds 33554432 bytes, disk vda needs 134217728`));
    } finally {
      await run('losetup', ['-d', device]);
    }

    const both = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', target, '-n']);
    assert.equal(both.code, 1);
    assert.match(errorLines(both).join('\n'), /is a file: a restore onto it takes one disk, the set has vda, vdb; choose one with -d/);
    const qcow = path.join(work, 'target.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '128M']);
    const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', qcow, '-n', '-d', 'vda']);
    assert.match(errorLines(refused).join('\n'), /is a qcow2 image; restore writes raw data onto existing files/);
    // A mistyped -o naming a backup: a zip of the set, or one of the set's own files. Refused, and left as it was.
    const zip = path.join(work, 'backup.zip');
    await run('/usr/bin/python3', ['-m', 'zipfile', '-c', zip, path.join(set, 'vda.full.data')]);
    const inSet = path.join(set, 'vda.full.data.chksum');
    // The set through a symbolic link, and a raw image of another set (-t raw: no header to tell it by).
    const linked = path.join(work, 'set-link');
    await fs.symlink(set, linked);
    const otherRaw = path.join(work, 'other-set', 'vda.copy.data');
    await fs.mkdir(path.dirname(otherRaw));
    await fs.writeFile(otherRaw, Buffer.alloc(MiB, 0x42));
    const files = [zip, inSet, otherRaw];
    const before = await Promise.all(files.map((f) => fs.readFile(f)));
    for (const [file, message] of [
      [zip, /is a zip archive \(a backup made with -o -\?\), not a raw disk: a restore would overwrite it/],
      [inSet, /is a file of the backup set \S+: a restore would overwrite it/],
      [path.join(linked, 'vda.full.data.chksum'), /is a file of the backup set \S+: a restore would overwrite it/],
      [otherRaw, /is a backup data file: a restore would overwrite it/],
    ] as const) {
      const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', file, '-n', '-d', 'vda']);
      assert.equal(r.code, 1, r.stderr);
      assert.match(errorLines(r).join('\n'), message);
    }
    assert.deepEqual(await Promise.all(files.map((f) => fs.readFile(f))), before);
  });

  test('--sequence applies exactly the listed files and refuses lists out of order, with gaps or of two disks', async () => {
    const out = path.join(work, 'sequence');
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-s', 'vda.full.data,vda.inc.virtnbdbackup.1.data']);
    await assertSame(path.join(out, path.basename(dom.diskPath('vda'))), ref('p1'));
    assert.deepEqual((await fs.readdir(out)).sort(), [path.basename(dom.diskPath('vda')), 'vmconfig.virtnbdbackup.1.xml']);
    const bad: Array<[string, RegExp]> = [
      ['vda.full.data,vda.inc.virtnbdbackup.2.data,vda.inc.virtnbdbackup.1.data', /out of chain order/],
      ['vda.full.data,vda.inc.virtnbdbackup.2.data', /gap before vda\.inc\.virtnbdbackup\.2\.data: it needs vda\.inc\.virtnbdbackup\.1\.data first/],
      ['vda.full.data,vdb.inc.virtnbdbackup.1.data', /mixes the disks vda and vdb/],
    ];
    for (const [sequence, message] of bad) {
      const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'bad-sequence'), '-n', '-s', sequence]);
      assert.equal(r.code, 1, sequence);
      assert.equal(errorLines(r).length, 1, r.stderr);
      assert.match(r.stderr, message);
    }
    assert.equal(await fs.access(path.join(work, 'bad-sequence')).then(() => true, () => false), false);
  });

  test('-a verify and -o verify: one OK line per data file, exit 0; a reader that stops early is no error, a full output is', async () => {
    for (const args of [['-a', 'verify', '-o', work], ['-o', 'verify']]) {
      const r = await runOk(ourBin('virtnbdrestore'), ['-i', set, ...args]);
      assert.deepEqual(r.stdout.trim().split('\n'), [
        'OK vda.full.data', 'OK vda.inc.virtnbdbackup.1.data', 'OK vda.inc.virtnbdbackup.2.data',
        'OK vdb.full.data', 'OK vdb.inc.virtnbdbackup.1.data', 'OK vdb.inc.virtnbdbackup.2.data',
      ]);
    }
    const one = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify', '-d', 'vdb']);
    assert.equal(one.stdout.trim().split('\n').length, 3);
    // A reader that stops early (| head): no stack trace, and the verdict stands.
    for (const action of ['verify', 'dump']) {
      const piped = await run('bash', ['-o', 'pipefail', '-c', `"$0" -i "$1" -o ${action} | head -c 1 > /dev/null`, ourBin('virtnbdrestore'), set]);
      assert.equal(piped.stderr, '', action);
      // Standard output on a full file system: the verdict could not be told, so the run fails (it exited 0).
      const full = await run('bash', ['-c', `"$0" -i "$1" -o ${action} > /dev/full`, ourBin('virtnbdrestore'), set], { allowFailure: true });
      assert.equal(full.code, 1, action);
      assert.match(full.stderr, /^virtnbdrestore: error: cannot write to standard output: no space left on device; .+ \(ENOSPC\)\n$/, action);
    }
  });
});

test('the qemu-nbd a restore writes through keeps its request buffers on huge pages (whole-chunk direct writes)', async (t) => {
  if (!(await hugePagesOffered())) return t.skip('transparent huge pages are off on this kernel');
  const dir = await withTempDir(t, 'thp-');
  const image = path.join(dir, 'disk.raw');
  const source = path.join(dir, 'source.raw');
  const socket = path.join(dir, 'disk.sock');
  await fs.writeFile(image, '');
  await fs.truncate(image, 64 * MiB);
  await fs.writeFile(source, randomBytes(32 * MiB));
  const server = await ImageServer.start({ file: image, format: 'raw', at: { socket }, exportName: 'disk', connections: 1, thin: false });
  try {
    await run('nbdcopy', ['--request-size=4194304', '--flush', source, `nbd+unix:///disk?socket=${socket}`]);
    const pid = await qemuNbdPid((arg) => arg === socket);
    assert.ok(pid, 'no qemu-nbd serves the image');
    assert.ok((await anonHugeKiB(pid)) >= 2048, 'qemu-nbd\'s request buffers are not on huge pages');
  } finally {
    await server.stop();
  }
  assert.ok((await fs.readFile(image)).subarray(0, 32 * MiB).equals(await fs.readFile(source)), 'the image differs from what was written');
});

test('an encrypted disk (LUKS, libvirt secret): refused shut off (no key for our qemu-nbd), the set holds it decrypted, and -c -D defines a domain without the encryption that starts on it', async (t) => {
  const dom = await TestDomain.create({ disks: [{ target: 'vda', sizeMiB: 32 }], start: false });
  t.after(() => dom.destroy());
  const work = await withTempDir(t, 'luks-');
  const image = dom.diskPath('vda');
  await fs.writeFile(path.join(work, 'secret.xml'), `<secret ephemeral='no' private='yes'><usage type='volume'><volume>${image}</volume></usage></secret>`);
  const uuid = /[0-9a-f-]{36}/.exec((await run('virsh', ['-c', LIBVIRT_URI, 'secret-define', path.join(work, 'secret.xml')])).stdout)?.[0] as string;
  t.after(async () => { await virsh('secret-undefine', uuid); });
  await fs.writeFile(path.join(work, 'key'), 'correct horse');
  await run('virsh', ['-c', LIBVIRT_URI, 'secret-set-value', uuid, '--file', path.join(work, 'key'), '--plain']);
  // The image encrypted with that key, holding data; the domain given the key through the secret.
  await fs.rm(image);
  const key = `secret,id=key,file=${path.join(work, 'key')}`;
  // QEMU times its key derivation in thread CPU time, and a loaded virtual machine gives it none at times: "Unable to
  // get accurate CPU usage" (seen in CI, twice in a row once). That is the host's, not the test's; tries again.
  const create = (): ReturnType<typeof run> => run('qemu-img', ['create', '-q', '-f', 'qcow2', '--object', key, '-o', 'encrypt.format=luks,encrypt.key-secret=key', image, '32M']);
  for (let attempt = 1; ; attempt++) {
    try {
      await create();
      break;
    } catch (err) {
      if (attempt === 6 || !/Unable to get accurate CPU usage/.test((err as Error).message)) throw err;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
  await run('qemu-io', ['--object', key, '--image-opts', `driver=qcow2,file.filename=${image},encrypt.key-secret=key`, '-c', 'write -P 0x5a 1M 2M']);
  await fs.chmod(image, 0o666);
  const xml = (await run('virsh', ['-c', LIBVIRT_URI, 'dumpxml', dom.name])).stdout
    .replace(/<source file='([^']*)'\/>/, `<source file='$1'><encryption format='luks'><secret type='passphrase' uuid='${uuid}'/></encryption></source>`);
  await fs.writeFile(path.join(work, 'domain.xml'), xml);
  await run('virsh', ['-c', LIBVIRT_URI, 'define', path.join(work, 'domain.xml')]);
  // Shut off, its image is read by a qemu-nbd of ours, which has no key: one line saying so (qemu-nbd's words
  // named only a parameter, 'encrypt.key-secret'), nothing written.
  const offline = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-o', path.join(work, 'offline'), '-n']);
  assert.deepEqual([offline.code, errorLines(offline)], [1, [`virtnbdbackup: error: disk vda of '${dom.name}' is encrypted in its image, with a key libvirt keeps for QEMU: a shut-off domain's images are read without it; back it up with -S/--start-domain or while the domain runs, or leave the disk out with -x vda`]]);
  await dom.start();

  const set = path.join(work, 'set');
  const backup = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  assert.match(backup.stderr, /disk vda is encrypted in its image: the backup holds its data as the guest reads it, not encrypted; keep the set as safe as the key/);
  const name = `${dom.name}-restored`;
  t.after(async () => {
    await virsh('destroy', name);
    await virsh('undefine', name);
  });
  const out = path.join(work, 'out');
  const restore = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-c', '-D', '-N', name]);
  assert.match(restore.stderr, /disk vda -> \S+ \(qcow2\), its encryption removed/);
  const restored = path.join(out, 'vda.qcow2');
  await run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0x5a 1M 2M', restored]);
  assert.doesNotMatch((await run('virsh', ['-c', LIBVIRT_URI, 'dumpxml', '--inactive', name])).stdout, /encryption/);
  await fs.chmod(out, 0o755);
  await run('virsh', ['-c', LIBVIRT_URI, 'start', name]);
  assert.equal((await virsh('domstate', name)).stdout.trim(), 'running');
});
