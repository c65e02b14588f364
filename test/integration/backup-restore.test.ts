// End to end on a real domain: a two-disk chain full -> inc -> inc (with write-zeroes and discard) -> diff,
// every point restored and compared bit for bit with a copy of the disk taken at that point, by our restore
// and (where the format allows) by Debian's Python virtnbdrestore; and Python's backups restored by ours; a
// block-backed disk (loop device); a linked clone (a qcow2 overlay on a backing image); a volume of a storage pool;
// network disks (NBD); a read-only disk beside a writable one; a chain whose backups switch between Python and ours;
// a --scratchdir or -f QEMU's user may not write, and a --scratchdir with too little free space, refused before a
// full removes the old chain's checkpoints or an inc that falls back to a full moves the chain aside.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { withDomain, withTempDir, withTmpfs, tempDir, TestDomain, type DiskSpec } from '../support/testbed.js';
import { ourBin, pythonBin, runCli, runOk } from '../support/cli.js';

const DISKS = [
  { target: 'vda', sizeMiB: 256, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 24 }, { pattern: 0x11, offsetMiB: 24, lengthMiB: 8 }, { pattern: 0x22, offsetMiB: 100, lengthMiB: 8 }] },
  { target: 'vdb', sizeMiB: 128, fill: [{ pattern: 0x44, offsetMiB: 1, lengthMiB: 4 }] },
] satisfies DiskSpec[];

/** Snapshots every disk of `dom` as `<dir>/<point>.<disk>.raw`. */
async function snapshotAll(dom: TestDomain, dir: string, point: string): Promise<void> {
  for (const d of DISKS) await dom.snapshot(d.target, path.join(dir, `${point}.${d.target}.raw`));
}

/** Asserts that every disk restored into `restored` equals the snapshot of `point`. */
async function assertRestored(dom: TestDomain, restored: string, refs: string, point: string): Promise<void> {
  for (const d of DISKS) {
    const image = path.join(restored, path.basename(dom.diskPath(d.target)));
    const result = await TestDomain.compare(image, path.join(refs, `${point}.${d.target}.raw`));
    assert.ok(result.identical, `${d.target} restored at ${point} differs: ${result.output}`);
  }
}

test('two-disk chain: every point in time restores bit-identically, ours and Python', async (t) => {
  const dom = await withDomain(t, { disks: DISKS });
  const work = await tempDir('vnbd-chain-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  const backup = (level: string): Promise<unknown> => runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', set, '-n']);

  await snapshotAll(dom, work, 'p0');
  await backup('full');

  await dom.write('vda', 0x33, '2M', '3M');
  await dom.write('vdb', 0x55, '60M', '1M');
  await snapshotAll(dom, work, 'p1');
  await backup('inc');

  await dom.writeZeroes('vda', 0, '1M');
  await dom.discard('vda', '100M', '4M');
  await dom.write('vdb', 0x66, '1M', '64K');
  await snapshotAll(dom, work, 'p2');
  await backup('inc');

  await dom.write('vda', 0x77, '50M', '2M');
  await snapshotAll(dom, work, 'p3');
  await backup('diff');

  const files = (await fs.readdir(set)).sort();
  for (const f of ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.2.data', 'vdb.full.data.chksum',
    `${dom.name}.cpt`, 'checkpoints', 'vmconfig.virtnbdbackup.0.xml', 'vda.virtnbdbackup.2.qcow.json']) {
    assert.ok(files.includes(f), `${f} missing from the set: ${files.join(' ')}`);
  }
  assert.ok(files.some((f) => /^vda\.diff\.\d+\.data$/.test(f)), 'diff data file missing');
  const fullLog = files.find((f) => /^backup\.full\.\d{14}\.log$/.test(f));
  assert.ok(fullLog, 'log file missing');
  assert.match(await fs.readFile(path.join(set, fullLog), 'utf8'), /saved to vda\.full\.data\n(.*\n)*.*finished full backup, checkpoint virtnbdbackup\.0\n$/, 'the log ends with the outcome');
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(set, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2']);

  const points: Array<[string, string | undefined]> = [['p0', 'virtnbdbackup.0'], ['p1', 'virtnbdbackup.1'], ['p2', 'virtnbdbackup.2'], ['p3', undefined]];
  for (const [point, until] of points) {
    const out = path.join(work, `ours-${point}`);
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', ...(until ? ['--until', until] : [])]);
    await assertRestored(dom, out, work, point);
  }

  // The diff's data lost, its side files left: the chain is whole, so only they tell; restore warns, verify fails.
  const diff = files.find((f) => /^vda\.diff\.\d+\.data$/.test(f)) as string;
  await fs.rename(path.join(set, diff), path.join(work, diff));
  const short = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'lost-diff'), '-n', '-d', 'vda']);
  assert.match(short.stderr, new RegExp(`lacks ${diff.replace(/\./g, '\\.')}, whose ${diff.replace(/\./g, '\\.')}\\.blake3\\.json and ${diff.replace(/\./g, '\\.')}\\.chksum are there: that diff, the newest backup of its disk, was lost or removed, and the restore ends before it`));
  const atInc = await TestDomain.compare(path.join(work, 'lost-diff', path.basename(dom.diskPath('vda'))), path.join(work, 'p2.vda.raw'));
  assert.ok(atInc.identical, `without its diff, vda restores at the inc before it: ${atInc.output}`);
  const verified = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']);
  assert.equal(verified.code, 1, verified.stdout);
  assert.match(verified.stdout, new RegExp(`^FAILED ${diff.replace(/\./g, '\\.')}: missing, while its \\S+ and \\S+ are in the set: the newest diff of its disk`, 'm'));
  await fs.rename(path.join(work, diff), path.join(set, diff));

  // Python's restore of our set up to a point without zeroed ranges (it skips zero frames by design).
  const pyOut = path.join(work, 'python-p1');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', pyOut, '-n', '--until', 'virtnbdbackup.1']);
  await assertRestored(dom, pyOut, work, 'p1');

  // The other way: Python's full + inc (plain and lz4) restored by ours.
  for (const compress of [[], ['-z']]) {
    const pySet = path.join(work, `python-set${compress.join('')}`);
    await runOk(pythonBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', pySet, '-n', ...compress]);
    await dom.write('vda', 0x88, '10M', '1M');
    await dom.write('vdb', 0x99, '3M', '2M');
    const point = `py${compress.join('')}`;
    await snapshotAll(dom, work, point);
    await runOk(pythonBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', pySet, '-n', ...compress]);
    const out = path.join(work, `ours-from-python${compress.join('')}`);
    await runOk(ourBin('virtnbdrestore'), ['-i', pySet, '-o', out, '-n']);
    await assertRestored(dom, out, work, point);
  }
});

test('compressed set (-z) restores bit-identically with ours and with Python; -o dump prints the JSON array Python prints, -d picks a disk', async (t) => {
  const dom = await withDomain(t, { disks: DISKS });
  const work = await tempDir('vnbd-lz4-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  await snapshotAll(dom, work, 'p0');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-z', '-o', set, '-n']);
  await dom.write('vda', 0x5a, '40M', '40M');
  await snapshotAll(dom, work, 'p1');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-z', '3', '-o', set, '-n']);
  for (const [tool, name] of [[ourBin('virtnbdrestore'), 'ours'], [pythonBin('virtnbdrestore'), 'python']] as const) {
    const out = path.join(work, name);
    await runOk(tool, ['-i', set, '-o', out, '-n']);
    await assertRestored(dom, out, work, 'p1');
  }
  const dumped = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump'])).stdout) as Array<Record<string, unknown>>;
  assert.deepEqual(dumped.map((m) => [m.file, m.compressed]), [
    ['vda.full.data', 2], ['vda.inc.virtnbdbackup.1.data', 3], ['vdb.full.data', 2], ['vdb.inc.virtnbdbackup.1.data', 3],
  ]);
  // One JSON array as Python's dump prints it, with the same entries (ours names each one's file too); -d picks a disk.
  const byPoint = (m: Record<string, unknown>): string => `${m.diskName} ${m.checkpointName}`;
  const python = JSON.parse((await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', 'dump'])).stdout) as Array<Record<string, unknown>>;
  assert.deepEqual(dumped.map(({ file: _, ...meta }) => meta), python.sort((a, b) => byPoint(a).localeCompare(byPoint(b))));
  const vdb = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump', '-d', 'vdb'])).stdout) as Array<Record<string, unknown>>;
  assert.deepEqual(vdb.map((m) => m.file), ['vdb.full.data', 'vdb.inc.virtnbdbackup.1.data']);
});

test('a file system without O_DIRECT (ramfs): backup, verify and restore fall back to the page cache, bit-identical', async (t) => {
  const dom = await withDomain(t, { disks: DISKS });
  const work = await tempDir('vnbd-ramfs-');
  // ramfs refuses O_DIRECT at open (EINVAL), where tmpfs and ext4 take it.
  execFileSync('mount', ['-t', 'ramfs', 'ramfs', work]);
  t.after(async () => {
    execFileSync('umount', [work]);
    await fs.rm(work, { recursive: true, force: true });
  });
  const set = path.join(work, 'set');
  await snapshotAll(dom, work, 'p0');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  await dom.write('vda', 0x5b, '3M', '5M');
  await snapshotAll(dom, work, 'p1');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.partial')), []);
  const verified = (await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify'])).stdout.trim().split('\n');
  assert.ok(verified.length === 4 && verified.every((l) => l.startsWith('OK ')), verified.join('\n'));
  const out = path.join(work, 'restored');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  await assertRestored(dom, out, work, 'p1');
});

test('a block-backed qcow2 disk (through a loop device, as on LVM): full and inc restore bit for bit', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, block: true, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 8 }] }] });
  const device = dom.disk('vda').device as string;
  assert.match(execFileSync('virsh', ['-c', 'qemu:///system', 'domblklist', dom.name], { encoding: 'utf8' }), new RegExp(`vda\\s+${device}`));
  const work = await tempDir('vnbd-block-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  await dom.write('vda', 0x5a, '20M', '3M');
  const p1 = await dom.snapshot('vda', path.join(work, 'p1.raw'));
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  // Debian's Python virtnbdrestore (1.9.15) cannot: it skips the disk as a "direct attached block device".
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  // The restored image is a qcow2 file named after the device (its basename), as virtnbdbackup names images.
  const result = await TestDomain.compare(path.join(out, path.basename(device)), p1);
  assert.ok(result.identical, result.output);
});

test('a linked clone (a qcow2 overlay on a backing image): full and inc restore to a standalone image, bit for bit, with ours and Python', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, backing: true, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 8 }] }] });
  const work = await tempDir('vnbd-clone-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  await dom.write('vda', 0x5a, '16M', '2M');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  await dom.write('vda', 0x6b, '4M', '1M');
  const p1 = await dom.snapshot('vda', path.join(work, 'p1.raw'));
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  for (const [tool, out] of [[ourBin('virtnbdrestore'), path.join(work, 'ours')], [pythonBin('virtnbdrestore'), path.join(work, 'python')]] as const) {
    await runOk(tool, ['-i', set, '-o', out, ...(tool === pythonBin('virtnbdrestore') ? [] : ['-n'])]);
    const image = path.join(out, 'vda.qcow2');
    const result = await TestDomain.compare(image, p1);
    assert.ok(result.identical, `${tool}: ${result.output}`);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', image], { encoding: 'utf8' })) as Record<string, unknown>;
    assert.equal(info['backing-filename'], undefined, `${tool}: the restored image still names a backing file`);
  }
});

test('a volume disk (type=\'volume\' in a storage pool): full and inc restore bit for bit, with ours and Python; -c makes it a file disk', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, volume: true, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 8 }] }] });
  const work = await tempDir('vnbd-volume-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  const full = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  assert.doesNotMatch(full.stderr, /skipping|warning/);
  await dom.write('vda', 0x6b, '4M', '1M');
  const reference = await dom.snapshot('vda');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  // The image's layout was read from the volume's path: qcow.json is that of the qcow2 image.
  assert.match(await fs.readFile(path.join(set, 'vda.virtnbdbackup.0.qcow.json'), 'utf8'), /"format":\s*"qcow2"/);
  const ours = path.join(work, 'ours');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', ours, '-c', '-n']);
  // Named after the volume, and the adjusted XML points at it as a file disk.
  const result = await TestDomain.compare(path.join(ours, 'vda.qcow2'), reference);
  assert.ok(result.identical, result.output);
  const xml = await fs.readFile(path.join(ours, 'vmconfig.virtnbdbackup.1.xml'), 'utf8');
  assert.match(xml, new RegExp(`<disk type="file" device="disk">[\\s\\S]*<source file="${path.join(ours, 'vda.qcow2')}"`));
  assert.doesNotMatch(xml, /pool=/);
  // -C names a file as given, from the working directory, as Python reads it (it was looked for in the set).
  await fs.copyFile(path.join(set, 'vmconfig.virtnbdbackup.1.xml'), path.join(work, 'my.xml'));
  const fromCwd = spawnSync(ourBin('virtnbdrestore'), ['-i', 'set', '-o', 'own-xml', '-c', '-C', 'my.xml', '-n'], { cwd: work, encoding: 'utf8' });
  assert.equal(fromCwd.status, 0, fromCwd.stderr);
  assert.match(await fs.readFile(path.join(work, 'own-xml', 'my.xml'), 'utf8'), new RegExp(`<source file="${path.join(work, 'own-xml', 'vda.qcow2')}"`));
  const py = path.join(work, 'python');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', py]);
  const pyResult = await TestDomain.compare(path.join(py, 'vda.qcow2'), reference);
  assert.ok(pyResult.identical, pyResult.output);
  // Shut off, -S finds the volume disk before it starts the domain (it refused: "no disk to back up").
  await dom.stop();
  const started = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-S', '-o', set, '-n']);
  assert.match(started.stderr, /started shut-off domain .* paused/);
  assert.doesNotMatch(started.stderr, /skipping|warning/);
});

test('network disks (NBD, as Ceph RBD or iSCSI images are reached): a qcow2 one backs up full and inc, a raw one with -r as a copy; both restore bit for bit, -c makes them file disks libvirt defines; a shut-off domain\'s are left out with a line', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] },
    { target: 'vdb', sizeMiB: 64, network: true, fill: [{ pattern: 'random', offsetMiB: 2, lengthMiB: 6 }] },
    { target: 'vdc', sizeMiB: 32, network: true, format: 'raw', fill: [{ pattern: 0x5c, offsetMiB: 1, lengthMiB: 3 }] },
  ] });
  const work = await tempDir('vnbd-network-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  const full = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-r', '-o', set, '-n']);
  assert.doesNotMatch(full.stderr, /skipping|warning/);
  const rawRef = await dom.snapshot('vdc');
  await dom.write('vdb', 0x6b, '20M', '2M');
  await dom.write('vdc', 0x6c, '8M', '1M'); // after its copy: no restore holds it
  const inc = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  assert.match(inc.stderr, /disk vdb: 2097152 bytes of data/);
  const refs = { vda: await dom.snapshot('vda'), vdb: await dom.snapshot('vdb') };
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.data')).sort(),
    ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vdb.full.data', 'vdb.inc.virtnbdbackup.1.data', 'vdc.copy.data']);
  // No image file here to take qemu-img info of: no qcow.json, and no warning for its absence.
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.qcow.json')).sort(), ['vda.virtnbdbackup.0.qcow.json', 'vda.virtnbdbackup.1.qcow.json']);
  const out = path.join(work, 'out');
  const restored = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-r', '-c', '-n']);
  assert.doesNotMatch(restored.stderr, /warning/);
  // Named after the disk and the format, as a network image has no file name.
  for (const [image, ref] of [['vda.qcow2', refs.vda], ['vdb.qcow2', refs.vdb], ['vdc.raw', rawRef]] as const) {
    const result = await TestDomain.compare(path.join(out, image), ref);
    assert.ok(result.identical, `${image}: ${result.output}`);
  }
  const xml = await fs.readFile(path.join(out, 'vmconfig.virtnbdbackup.1.xml'), 'utf8');
  assert.doesNotMatch(xml, /type="network"|protocol=|<host /);
  assert.match(xml, new RegExp(`<source file="${path.join(out, 'vdc.raw')}"`));
  const copy = `${dom.name}-copy`;
  t.after(() => execFileSync('virsh', ['-q', 'undefine', copy], { stdio: 'ignore' }));
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'defined'), '-r', '-c', '-D', '-N', copy, '-n']);
  // A shut-off domain's network disks are read by no backup job: each left out with one line.
  await dom.stop();
  const offline = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-r', '-o', path.join(work, 'offline'), '-n']);
  for (const target of ['vdb', 'vdc']) {
    assert.match(offline.stderr, new RegExp(`warning: skipping disk ${target}: network disk \\(nbd\\) of a shut-off domain: only a running domain's backup job reads it; back it up with -S`));
  }
});

test('a read-only disk (<readonly/>), which libvirt\'s jobs refuse, is left out with a warning: the other disks back up and restore', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 8 }] },
    { target: 'vdb', sizeMiB: 16, readOnly: true, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 2 }] },
  ] });
  const work = await tempDir('vnbd-readonly-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  for (const level of ['full', 'inc']) {
    const r = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', set, '-n']);
    assert.match(r.stderr, /warning: skipping disk vdb: read-only disk \(<readonly\/>\): libvirt backs up only writable disks/);
    if (level === 'full') await dom.write('vda', 0x33, '2M', '1M');
  }
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.data')).sort(), ['vda.full.data', 'vda.inc.virtnbdbackup.1.data']);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  const result = await TestDomain.compare(path.join(out, 'vda.qcow2'), await dom.snapshot('vda'));
  assert.ok(result.identical, result.output);
});

test('a chain that switches tools: Python full, ours inc, Python inc, ours inc; every point restores with ours and Python', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] }] });
  const work = await tempDir('vnbd-switch-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  const tools = [pythonBin('virtnbdbackup'), ourBin('virtnbdbackup'), pythonBin('virtnbdbackup'), ourBin('virtnbdbackup')];
  const points: string[] = [];
  for (const [i, tool] of tools.entries()) {
    if (i > 0) await dom.write('vda', 0x20 + i, `${i}M`, '1M');
    points.push(await dom.snapshot('vda'));
    await runOk(tool, ['-d', dom.name, '-l', i === 0 ? 'full' : 'inc', '-o', set, '-n']);
  }
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(set, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2', 'virtnbdbackup.3']);
  for (const [i, reference] of points.entries()) {
    for (const [tool, name] of [[ourBin('virtnbdrestore'), 'ours'], [pythonBin('virtnbdrestore'), 'python']] as const) {
      const out = path.join(work, `${name}-${i}`);
      await runOk(tool, ['-i', set, '-o', out, '-n', '--until', `virtnbdbackup.${i}`]);
      const result = await TestDomain.compare(path.join(out, 'vda.qcow2'), reference);
      assert.ok(result.identical, `${name} at virtnbdbackup.${i}: ${result.output}`);
    }
  }
});

test('a full (and an inc that falls back to one) whose --scratchdir or -f directory QEMU\'s user may not write is refused before the old chain\'s checkpoints go, naming the directory and the user; a directory its group, or an ACL, lets it write works', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] }] });
  const work = await tempDir('vnbd-qemuaccess-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  // Who this test bed's QEMU runs as (libvirt-qemu on Debian): the refusal must name that user.
  const pid = (await fs.readFile(`/run/libvirt/qemu/${dom.name}.pid`, 'utf8')).trim();
  const uid = Number(/^Uid:\s+(\d+)/m.exec(await fs.readFile(`/proc/${pid}/status`, 'utf8'))?.[1]);
  if (uid === 0) {
    t.skip('QEMU runs as root here: it may write anywhere, so there is nothing to refuse');
    return;
  }
  const qemuUser = execFileSync('id', ['-nu', String(uid)], { encoding: 'utf8' }).trim();
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', set]);
  // Root's directories under the test's (0777, made 0755: only each case's own bits decide).
  await fs.chmod(work, 0o755);
  const closed = path.join(work, 'closed');
  await fs.mkdir(closed, { mode: 0o700 });
  const shut = path.join(work, 'shut');
  await fs.mkdir(path.join(shut, 'open'), { recursive: true });
  await fs.chmod(path.join(shut, 'open'), 0o777);
  await fs.chmod(shut, 0o700);
  const rootOnly = path.join(work, 'rootonly');
  await fs.mkdir(rootOnly, { mode: 0o755 });
  const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const cases: Array<[string[], RegExp]> = [
    [['--scratchdir', closed], new RegExp(`^virtnbdbackup: error: QEMU runs as ${qemuUser} \\(groups [^)]+\\), which may not create files in the scratch directory \\(--scratchdir\\) ${esc(closed)} \\(owner root, group root, mode 0700\\); give --scratchdir a directory it may write to, such as /var/tmp \\(the default\\), or let that user write there$`)],
    [['--scratchdir', path.join(shut, 'open')], new RegExp(`^virtnbdbackup: error: QEMU runs as ${qemuUser} .*scratch directory \\(--scratchdir\\) ${esc(path.join(shut, 'open'))}: it may not enter ${esc(shut)} \\(owner root, group root, mode 0700\\); .*, or let that user enter ${esc(shut)}$`)],
    [['-f', path.join(rootOnly, 'job.sock')], new RegExp(`^virtnbdbackup: error: QEMU runs as ${qemuUser} .*the directory of the NBD socket \\(-f\\) ${esc(rootOnly)} \\(owner root, group root, mode 0755\\); give -f a path in a directory it may write to, such as /var/tmp \\(the default\\), or let that user write there$`)],
  ];
  for (const [flags, message] of cases) {
    const r = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, `new${cases.findIndex((c) => c[0] === flags)}`), ...flags]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr.trim(), message);
    assert.doesNotMatch(r.stderr, /removed old checkpoint/);
    assert.equal(execFileSync('virsh', ['-c', 'qemu:///system', 'checkpoint-list', dom.name, '--name'], { encoding: 'utf8' }).trim(), 'virtnbdbackup.0', flags.join(' '));
  }
  // An inc that would fall back to a full (its parent's saved definition gone, so the checkpoint is not the set's)
  // is refused as well, before it moves the chain aside.
  const cpt = path.join(set, 'checkpoints', 'virtnbdbackup.0.xml');
  const saved = await fs.readFile(cpt);
  await fs.rm(cpt);
  const inc = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set, '--scratchdir', closed]);
  assert.equal(inc.code, 1, inc.stderr);
  assert.match(inc.stderr.trim(), /which may not create files in the scratch directory/);
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.startsWith('chain.')), [], 'the chain was moved aside');
  await fs.writeFile(cpt, saved);
  // The owner's group may write: QEMU's user is in it, so the run goes on.
  const grouped = path.join(work, 'grouped');
  await fs.mkdir(grouped);
  await fs.chown(grouped, 0, Number(execFileSync('id', ['-g', String(uid)], { encoding: 'utf8' }).trim()));
  await fs.chmod(grouped, 0o770);
  // Root's 0700 with an ACL entry for QEMU's user (written as the xattr setfacl writes; the acl tools are not
  // installed here): the mode bits refuse, the kernel allows, so the run goes on.
  const acl = path.join(work, 'acl');
  await fs.mkdir(acl, { mode: 0o700 });
  const entries = [[0x01, 7, -1], [0x02, 7, uid], [0x04, 0, -1], [0x10, 7, -1], [0x20, 0, -1]].map(([tag, perm, id]) => `struct.pack('<HHI',${tag},${perm},${id === -1 ? '0xffffffff' : id})`);
  execFileSync('/usr/bin/python3', ['-c', `import os,struct\nos.setxattr(${JSON.stringify(acl)},'system.posix_acl_access',struct.pack('<I',2)+${entries.join('+')})`]);
  await dom.write('vda', 0x22, '2M', '1M');
  const ok = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set, '--scratchdir', acl, '-f', path.join(grouped, 'job.sock')]);
  assert.doesNotMatch(ok.stderr, /warning/);
  assert.ok((await fs.readdir(set)).includes('vda.inc.virtnbdbackup.1.data'));
});

test('a --scratchdir with too little free space is refused before anything changes: a full keeps the old chain\'s checkpoints, an inc that would fall back to a full leaves the chain where it is', async (t) => {
  const scratch = await withTmpfs(t, 'vnbd-tinyscratch-', 'size=1M,mode=1777');
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] }] });
  const work = await withTempDir(t, 'tinyscratch-');
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', set]);
  const tooLittle = new RegExp(`^virtnbdbackup: error: the scratch directory ${scratch} has only \\d+ MiB free, less than the 64 MiB a backup job of '${dom.name}' starts with: .+; give --scratchdir a directory with more free space, or free space there$`);
  const checkpointNames = (): string => execFileSync('virsh', ['-c', 'qemu:///system', 'checkpoint-list', dom.name, '--name'], { encoding: 'utf8' }).trim();
  const full = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, 'new'), '--scratchdir', scratch]);
  assert.equal(full.code, 1, full.stderr);
  assert.match(full.stderr.trim(), tooLittle);
  assert.equal(checkpointNames(), 'virtnbdbackup.0');
  // An inc whose parent's saved definition is gone would fall back to a full, moving the chain aside first: it was
  // refused only after that, and the set's next inc found no full.
  const cpt = path.join(set, 'checkpoints', 'virtnbdbackup.0.xml');
  const saved = await fs.readFile(cpt);
  await fs.rm(cpt);
  const before = (await fs.readdir(set)).sort();
  const inc = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set, '--scratchdir', scratch]);
  assert.equal(inc.code, 1, inc.stderr);
  assert.match(inc.stderr.trim(), tooLittle);
  assert.doesNotMatch(inc.stderr, /moved to/);
  assert.deepEqual((await fs.readdir(set)).filter((f) => !f.startsWith('backup.')).sort(), before.filter((f) => !f.startsWith('backup.')), 'the set changed');
  assert.equal(checkpointNames(), 'virtnbdbackup.0');
  // The chain goes on once its definition is back.
  await fs.writeFile(cpt, saved);
  await dom.write('vda', 0x22, '2M', '1M');
  const reference = await dom.snapshot('vda');
  await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  const result = await TestDomain.compare(path.join(out, path.basename(dom.diskPath('vda'))), reference);
  assert.ok(result.identical, result.output);
});
