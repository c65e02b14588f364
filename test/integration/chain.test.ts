// Chain integrity on real libvirt/QEMU: checkpoints lost with the domain definition come back from -C (a chain's
// first without the other prefix's parent it names), lost
// checkpoint metadata makes the next inc a full (clearing the bitmaps left behind), chains of different prefixes
// interleave without harm, a foreign checkpoint is left alone with a warning (-e: exit 2), and a chain whose
// checkpoint another set of the same prefix replaced falls back to a full instead of writing a wrong inc, and a full
// removes an old checkpoint whose bitmap the image lost by its metadata alone; an inc whose parent's bitmap the image
// lost becomes a full, the old chain archived (with -r, the full takes the raw disks the inc left out); disks grown,
// attached and detached within a chain, one attached with an earlier chain's bitmap; an external snapshot taken and committed back within a chain; a domain renamed within a chain; a disk left out of an inc;
// one disk's newest inc lost, which a restore of the latest point refuses naming it; guest writes while a full and
// an inc copy: each holds the disk of its start, the next inc the writes; an inc that saved no data is a point of
// its own for --until; a prefix shaped like a default chain's checkpoint (virtnbdbackup.0) never mixes with that
// chain; a full clears the bitmaps of its chain's names left without a checkpoint, so that Python's incs go on.
// Every point of every set is restored and compared bit for bit.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { TestDomain, run, withDomain, withTempDir } from '../support/testbed.js';
import { ourBin, pythonBin, runCli, runOk, startCli, whenExists } from '../support/cli.js';
import { assertRestoresTo as assertPoint, virsh } from '../support/points.js';
import { startMap } from '../support/map.js';

const checkpoints = (dom: TestDomain): string[] => virsh('checkpoint-list', dom.name, '--name').split('\n').map((l) => l.trim()).filter(Boolean).sort();
const DISK = { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] };

/** Runs our backup on `dom` into `set`; returns stderr (the log lines). */
async function backup(dom: TestDomain, set: string, level: string, ...extra: string[]): Promise<string> {
  return (await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', level, '-o', set, ...extra])).stderr;
}

/** virtnbdmap of `files` of `set` (read-only) serves a disk of `sizeMiB` equal to `reference`, copied out with nbdcopy. */
async function assertMapsTo(t: TestContext, work: string, set: string, name: string, files: string[], reference: string, sizeMiB: number): Promise<void> {
  const map = await startMap(t, work, name, files.map((f) => path.join(set, f)), ['-r']);
  const copy = path.join(work, `${name}.raw`);
  await run('nbdcopy', [map.uris[0], copy]);
  assert.equal((await fs.stat(copy)).size, sizeMiB * 1024 * 1024, name);
  const result = await TestDomain.compare(copy, reference);
  assert.ok(result.identical, `${name}: ${result.output}`);
  await map.stop();
}

function archivedChain(stderr: string): string {
  const dir = /previous chain was moved to (\S+) and restores from there/.exec(stderr)?.[1];
  assert.ok(dir, `no fallback warning in: ${stderr}`);
  return dir;
}

test('lost checkpoints: redefined from -C after the domain is defined anew; metadata lost with no definition makes the next inc a full', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'redefine-');
  const set = path.join(work, 'set');
  const cdir = path.join(work, 'cpt');
  const p0 = await dom.snapshot('vda');
  await backup(dom, set, 'full', '-C', cdir);
  await dom.write('vda', 0x33, '1M', '1M');
  const p1 = await dom.snapshot('vda');
  await backup(dom, set, 'inc', '-C', cdir);
  assert.deepEqual((await fs.readdir(cdir)).sort(), ['virtnbdbackup.0.xml', 'virtnbdbackup.1.xml']);

  // Undefined and defined again (a new UUID): libvirt forgot the checkpoints, the images kept their bitmaps.
  await dom.stop();
  virsh('undefine', '--checkpoints-metadata', dom.name);
  virsh('define', path.join(dom.dir, 'domain.xml'));
  assert.deepEqual(checkpoints(dom), []);
  // The fixture's monitor connection holds the old domain (old UUID): guest writes go through virsh from here on.
  process.env.VIRTNBD_TESTBED_MONITOR = 'virsh';
  t.after(() => { delete process.env.VIRTNBD_TESTBED_MONITOR; });
  await dom.start();
  await dom.write('vda', 0x44, '8M', '2M');
  const p2 = await dom.snapshot('vda');
  const redefined = await backup(dom, set, 'inc', '-C', cdir);
  assert.match(redefined, /redefined checkpoint virtnbdbackup\.1 from/);
  assert.ok((await fs.readdir(set)).includes('vda.inc.virtnbdbackup.2.data'));
  await assertPoint(work, set, p2);

  // Checkpoint metadata deleted and no saved definitions (in -C nor the set's own copies, from which they would
  // come back): the bitmaps stay in QEMU without their checkpoints.
  for (const name of ['virtnbdbackup.2', 'virtnbdbackup.1', 'virtnbdbackup.0']) virsh('checkpoint-delete', '--metadata', dom.name, name);
  await fs.rm(cdir, { recursive: true });
  await fs.rm(path.join(set, 'checkpoints'), { recursive: true });
  await dom.write('vda', 0x55, '16M', '1M');
  const p3 = await dom.snapshot('vda');
  // What a file system or an NFS client keeps in the directory is not the set's: it stays where it is.
  await fs.mkdir(path.join(set, 'lost+found'));
  await fs.writeFile(path.join(set, '.nfs000001'), '');
  const fallback = await backup(dom, set, 'inc', '-C', cdir);
  assert.match(fallback, /warning: checkpoint virtnbdbackup\.2 is missing in libvirt .*makes a full backup instead/);
  assert.match(fallback, /removed bitmap virtnbdbackup\.0 of disk vda: it was left without its checkpoint/);
  const archive = archivedChain(fallback);
  assert.ok((await fs.readdir(set)).includes('lost+found') && (await fs.readdir(set)).includes('.nfs000001'));
  assert.deepEqual((await fs.readdir(archive)).filter((n) => n === 'lost+found' || n.startsWith('.nfs')), []);
  await dom.write('vda', 0x66, '24M', '1M');
  const p4 = await dom.snapshot('vda');
  await backup(dom, set, 'inc', '-C', cdir);
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(set, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  await assertPoint(work, set, p3, 'virtnbdbackup.0');
  await assertPoint(work, set, p4);
  await assertPoint(work, archive, p0, 'virtnbdbackup.0');
  await assertPoint(work, archive, p1, 'virtnbdbackup.1');
  await assertPoint(work, archive, p2);
});

test('lost checkpoints of a chain begun under another prefix\'s: its first names the other chain\'s checkpoint as parent, and is redefined without it; the inc goes on', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'redefine-prefix-');
  const daily = path.join(work, 'daily');
  const weekly = path.join(work, 'weekly');
  await backup(dom, daily, 'full');
  await backup(dom, weekly, 'full', '--checkpoint-prefix', 'weekly');
  assert.match(virsh('checkpoint-dumpxml', dom.name, 'weekly.0'), /<parent>\s*<name>virtnbdbackup\.0<\/name>/);
  await dom.write('vda', 0x33, '1M', '1M');
  await backup(dom, weekly, 'inc');

  // Defined anew (a transient domain created again alike): libvirt forgot every checkpoint, the images kept their bitmaps.
  await dom.stop();
  virsh('undefine', '--checkpoints-metadata', dom.name);
  virsh('define', path.join(dom.dir, 'domain.xml'));
  process.env.VIRTNBD_TESTBED_MONITOR = 'virsh';
  t.after(() => { delete process.env.VIRTNBD_TESTBED_MONITOR; });
  await dom.start();
  await dom.write('vda', 0x44, '8M', '2M');
  const p2 = await dom.snapshot('vda');
  // libvirt refused weekly.0 ("parent virtnbdbackup.0 for moment weekly.0 not found"), and the inc became a full.
  const inc = await backup(dom, weekly, 'inc');
  assert.match(inc, /redefined checkpoint weekly\.0 from/);
  assert.match(inc, /redefined checkpoint weekly\.1 from/);
  assert.doesNotMatch(inc, /full backup instead/);
  assert.ok((await fs.readdir(weekly)).includes('vda.inc.weekly.2.data'));
  await assertPoint(work, weekly, p2);
});

test('chains of two prefixes interleave, a foreign checkpoint is left alone, a replaced checkpoint is never used', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'prefix-');
  const daily = path.join(work, 'daily');
  const weekly = path.join(work, 'weekly');
  const write = async (pattern: number, offsetMiB: number): Promise<string> => {
    await dom.write('vda', pattern, `${offsetMiB}M`, '1M');
    return dom.snapshot('vda');
  };
  const d0 = await dom.snapshot('vda');
  await backup(dom, daily, 'full');
  const w0 = await write(0x21, 1);
  await backup(dom, weekly, 'full', '--checkpoint-prefix', 'weekly');
  const d1 = await write(0x22, 2);
  await backup(dom, daily, 'inc');
  virsh('checkpoint-create-as', dom.name, 'someone-elses');
  const w1 = await write(0x23, 3);
  const strict = await runCli(ourBin('virtnbdbackup'), ['-n', '-e', '-d', dom.name, '-l', 'inc', '-o', weekly]);
  assert.equal(strict.code, 2, strict.stderr);
  assert.match(strict.stderr, /warning: domain .* has checkpoint 'someone-elses', not created by virtnbdbackup: left alone/);
  const d2 = await write(0x24, 4);
  await backup(dom, daily, 'inc');
  assert.deepEqual(checkpoints(dom), ['someone-elses', 'virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2', 'weekly.0', 'weekly.1']);
  const mismatch = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', weekly, '--checkpoint-prefix', 'daily']);
  assert.equal(mismatch.code, 1);
  assert.match(mismatch.stderr, /uses checkpoint prefix 'weekly'/);
  // A prefix that cannot name checkpoints is refused before the output directory is made.
  const badPrefix = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, 'bad-prefix'), '--checkpoint-prefix', 'a b']);
  assert.equal(badPrefix.code, 1);
  assert.match(badPrefix.stderr, /checkpoint prefix 'a b' is not usable/);
  assert.equal(await fs.access(path.join(work, 'bad-prefix')).then(() => true, () => false), false, 'a refused run made its set directory');

  await assertPoint(work, daily, d0, 'virtnbdbackup.0');
  await assertPoint(work, daily, d1, 'virtnbdbackup.1');
  await assertPoint(work, daily, d2);
  await assertPoint(work, weekly, w0, 'weekly.0');
  await assertPoint(work, weekly, w1);

  // A third set on the daily prefix takes its checkpoints over: each set then falls back to a full, never a wrong inc.
  const other = path.join(work, 'other');
  const o0 = await dom.snapshot('vda');
  await backup(dom, other, 'full');
  const d3 = await write(0x25, 5);
  const dailyArchive = archivedChain(await backup(dom, daily, 'inc'));
  const o1 = await write(0x26, 6);
  const replaced = await backup(dom, other, 'inc');
  assert.match(replaced, /checkpoint virtnbdbackup\.0 in libvirt is not this set's .*another chain with the same prefix replaced it/);
  const otherArchive = archivedChain(replaced);
  await assertPoint(work, daily, d3);
  await assertPoint(work, dailyArchive, d2);
  await assertPoint(work, other, o1);
  await assertPoint(work, otherArchive, o0);
  assert.ok(checkpoints(dom).includes('someone-elses'), 'the foreign checkpoint was removed');
});

test('a full backup removes an old checkpoint whose bitmap is gone by its metadata alone, and says so; the bitmaps of that name its other disks held go too, which failed a Python inc creating that name', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 16 }] });
  const work = await withTempDir(t, 'nobitmap-');
  const set1 = path.join(work, 'set1');
  await backup(dom, set1, 'full');
  await dom.write('vda', 0x65, '1M', '1M');
  await backup(dom, set1, 'inc');
  // vda's image loses the checkpoint's bitmap while libvirt keeps the checkpoint (an image replaced or repaired,
  // or the disk detached); vdb's keeps it.
  await dom.stop();
  await run('qemu-img', ['bitmap', '--remove', dom.diskPath('vda'), 'virtnbdbackup.1']);
  await dom.start();
  await dom.write('vda', 0x66, '2M', '1M');
  const p0 = await dom.snapshot('vda');
  const set2 = path.join(work, 'set2');
  const log = await backup(dom, set2, 'full');
  assert.match(log, /checkpoint virtnbdbackup\.1 had no usable bitmap: removed its metadata only/);
  assert.match(log, /removed bitmap virtnbdbackup\.1 of disk vdb: it was left without its checkpoint/);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0']);
  await assertPoint(work, set2, p0);
  // Python's inc creates virtnbdbackup.1, which vdb's bitmap left behind refused: "Bitmap already exists".
  await dom.write('vda', 0x67, '3M', '1M');
  const p1 = await dom.snapshot('vda');
  await runOk(pythonBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set2, '-n']);
  await assertPoint(work, set2, p1);
});

test('an inc whose parent checkpoint lost its bitmap in the image falls back to a full and keeps the old chain restorable', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'lostbitmap-');
  const set = path.join(work, 'set');
  const p0 = await dom.snapshot('vda');
  await backup(dom, set, 'full');
  await dom.stop();
  await run('qemu-img', ['bitmap', '--remove', dom.diskPath('vda'), 'virtnbdbackup.0']);
  await dom.start();
  await dom.write('vda', 0x77, '1M', '2M');
  const p1 = await dom.snapshot('vda');
  // libvirt still lists the checkpoint, so the plan is an inc; QEMU refuses the job for the missing bitmap.
  const log = await backup(dom, set, 'inc');
  assert.match(log, /the bitmap of checkpoint virtnbdbackup\.0 is missing or broken in the disk images/);
  const archive = archivedChain(log);
  const files = await fs.readdir(set);
  assert.ok(files.includes('vda.full.data') && !files.some((f) => f.startsWith('vda.inc')), `a full and no inc in ${files.join(' ')}`);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0']);
  await assertPoint(work, set, p1);
  await assertPoint(work, archive, p0);
  // The new chain goes on: the next inc holds only what changed since the fallback full.
  await dom.write('vda', 0x78, '8M', '1M');
  const p2 = await dom.snapshot('vda');
  await backup(dom, set, 'inc');
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  await assertPoint(work, set, p2);
});

test('-r: an inc that falls back to a full saves the raw disks too, as a full with -r does, and the new set restores them', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 32, format: 'raw', fill: [{ pattern: 0x77, offsetMiB: 2, lengthMiB: 3 }] }] });
  const work = await withTempDir(t, 'rawfallback-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full', '-r');
  await dom.stop();
  await run('qemu-img', ['bitmap', '--remove', dom.diskPath('vda'), 'virtnbdbackup.0']);
  await dom.start();
  await dom.write('vdb', 0x78, '8M', '1M');
  const vdb = await dom.snapshot('vdb', path.join(work, 'vdb.now.raw'));
  // The job's start finds the bitmap gone: the inc, which left vdb out, becomes a full, which takes it (it did not).
  const log = await backup(dom, set, 'inc', '-r');
  archivedChain(log);
  assert.match(log, /^disk vdb \(raw format, -r\) is saved in this full backup as a copy/m);
  assert.ok((await fs.readdir(set)).includes('vdb.copy.data'), (await fs.readdir(set)).join(' '));
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vdb', '-r']);
  const result = await TestDomain.compare(path.join(out, 'vdb.raw'), vdb, { formatA: 'raw' });
  assert.ok(result.identical, result.output);
});

test('disks change within a chain: one grown, one attached (saved whole by the next inc, then by incs), one detached; every point restores (and maps) with the disks and sizes it had, ours and Python', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'disks-change-');
  const set = path.join(work, 'set');
  const a0 = await dom.snapshot('vda');
  await backup(dom, set, 'full');
  // Grown while the domain runs, and written past its old end.
  await dom.resizeDisk('vda', 128);
  await dom.write('vda', 0x33, '100M', '1M');
  // Attached while shut off, holding data of its own.
  await dom.stop();
  await dom.attachDisk({ target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x55, offsetMiB: 1, lengthMiB: 2 }] });
  // Shut off, no checkpoint can start its chain: refused, nothing written.
  const offline = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.equal(offline.code, 1, offline.stderr);
  assert.match(offline.stderr, /disk vdb of '\S+' was added since checkpoint virtnbdbackup\.0: .*; run again with -S\/--start-domain or while the domain runs \(that inc saves it whole\)/);
  await dom.start();
  const [a1, b1] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  const added = await backup(dom, set, 'inc');
  assert.match(added, /disk vdb has no bitmap of checkpoint virtnbdbackup\.0 \(added to the domain since, or left out of every backup of the chain\): this inc saves it whole as vdb\.full\.data, and checkpoint virtnbdbackup\.1 starts its changes/);
  assert.doesNotMatch(added, /previous chain was moved|warning/);
  await dom.write('vdb', 0x66, '8M', '1M');
  await dom.write('vda', 0x44, '4M', '1M');
  const [a2, b2] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  await backup(dom, set, 'inc');
  // Python's restore reads the attached disk's chain too, while the newest saved XML has the disk (it finds disks
  // by that XML alone). It makes an image the size of the first file, so it would cut vda's growth: a limitation
  // of its own, with its own sets as well.
  const py = path.join(work, 'python');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', py, '-d', 'vdb']);
  const pyResult = await TestDomain.compare(path.join(py, 'vdb.qcow2'), b2);
  assert.ok(pyResult.identical, pyResult.output);
  await dom.stop();
  await dom.detachDisk('vdb');
  await dom.start();
  await dom.write('vda', 0x77, '6M', '1M');
  // libvirt sizes no changes on the detached disk: no lost bitmap, and -p estimates vda's alone.
  const estimated = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-p', '-o', set]);
  assert.equal(estimated.stdout, 'estimated size of the next inc/diff: 1048576 bytes\n');
  assert.doesNotMatch(estimated.stderr, /missing or broken/);
  const a3 = await dom.snapshot('vda');
  await backup(dom, set, 'inc');
  const files = (await fs.readdir(set)).filter((f) => f.endsWith('.data')).sort();
  assert.deepEqual(files, ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.2.data', 'vda.inc.virtnbdbackup.3.data', 'vdb.full.data', 'vdb.inc.virtnbdbackup.2.data']);

  const virtualSize = async (image: string): Promise<number> => (JSON.parse((await run('qemu-img', ['info', '--output=json', image])).stdout) as { 'virtual-size': number })['virtual-size'];
  /** Restores every disk of the set (up to `until`); asserts which images come out equal to what, and their sizes. */
  const restoreAll = async (until: string | undefined, expected: Record<string, [reference: string, sizeMiB: number]>): Promise<string> => {
    const out = await fs.mkdtemp(path.join(work, 'all-'));
    const { stderr } = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, ...(until ? ['--until', until] : [])]);
    assert.deepEqual((await fs.readdir(out)).filter((f) => f.endsWith('.qcow2')).sort(), Object.keys(expected).map((d) => `${d}.qcow2`).sort(), stderr);
    for (const [disk, [reference, sizeMiB]] of Object.entries(expected)) {
      const image = path.join(out, `${disk}.qcow2`);
      assert.equal(await virtualSize(image), sizeMiB * 1024 * 1024, `${disk} at ${until ?? 'the end'}`);
      const result = await TestDomain.compare(image, reference);
      assert.ok(result.identical, `${disk} at ${until ?? 'the end'}: ${result.output}`);
    }
    return stderr;
  };
  assert.match(await restoreAll('virtnbdbackup.0', { vda: [a0, 64] }), /disk vdb is left out of the restore at virtnbdbackup\.0: its backups start at checkpoint virtnbdbackup\.1 \(vdb\.full\.data\), after virtnbdbackup\.0: it was added to the domain later/);
  await restoreAll('virtnbdbackup.1', { vda: [a1, 128], vdb: [b1, 32] });
  await restoreAll('virtnbdbackup.2', { vda: [a2, 128], vdb: [b2, 32] });
  assert.match(await restoreAll('virtnbdbackup.3', { vda: [a3, 128] }), /disk vdb is left out of the restore at virtnbdbackup\.3: its backups end at checkpoint virtnbdbackup\.2 \(vdb\.inc\.virtnbdbackup\.2\.data\), before virtnbdbackup\.3: it was removed/);
  // Without --until, every disk the set holds, each at its newest.
  await restoreAll(undefined, { vda: [a3, 128], vdb: [b2, 32] });
  // Onto a pre-filled raw file of the grown size: where the disk grew and no frame of the inc reaches, the file
  // reads as zero, as the disk did (it kept the file's old bytes).
  const prefilled = path.join(work, 'prefilled.raw');
  await fs.writeFile(prefilled, Buffer.alloc(128 * 1024 * 1024, 0xab));
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', prefilled, '-n', '-d', 'vda', '--until', 'virtnbdbackup.1']);
  const onFile = await TestDomain.compare(prefilled, a1, { formatA: 'raw' });
  assert.ok(onFile.identical, onFile.output);
  await fs.rm(prefilled);
  // virtnbdmap serves the grown disk at its size then, and the attached one from its whole first backup.
  await assertMapsTo(t, work, set, 'grown', ['vda.full.data', 'vda.inc.virtnbdbackup.1.data'], a1, 128);
  await assertMapsTo(t, work, set, 'attached', ['vdb.full.data'], b1, 32);
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'refused'), '-d', 'vdb', '--until', 'virtnbdbackup.0']);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /checkpoint virtnbdbackup\.0 is not in the chain of disk vdb .* \(it has: virtnbdbackup\.1, virtnbdbackup\.2\)/);

  // Another disk attached under vdb's name: the set holds vdb's chain already, so this run is a full of a new chain.
  await dom.stop();
  await dom.attachDisk({ target: 'vdb', sizeMiB: 16, fill: [{ pattern: 0x88, offsetMiB: 0, lengthMiB: 1 }] });
  await dom.start();
  const c4 = await dom.snapshot('vdb');
  const again = await backup(dom, set, 'inc');
  assert.match(again, /disk vdb of '\S+' has no bitmap of checkpoint virtnbdbackup\.3 \(attached anew since\), and the chain already holds a disk vdb \(up to checkpoint virtnbdbackup\.2\): an incremental backup would be wrong, so this run makes a full backup instead/);
  await assertPoint(work, archivedChain(again), a3);
  await restoreAll(undefined, { vda: [a3, 128], vdb: [c4, 16] });
});

test('a disk attached holding a bitmap of an earlier chain, named as the checkpoint the next inc creates: the bitmap is cleared with one line for that disk alone, and every point restores', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'stale-bitmap-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  // An image that was attached to a domain of an earlier chain (or to this one before its last full) keeps its bitmaps.
  await dom.stop();
  const vdb = await dom.attachDisk({ target: 'vdb', sizeMiB: 16, fill: [{ pattern: 0x55, offsetMiB: 1, lengthMiB: 2 }] });
  await run('qemu-img', ['bitmap', '--add', vdb.image, 'virtnbdbackup.1']);
  await dom.start();
  await dom.write('vda', 0x33, '2M', '1M');
  const [a1, b1] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  const added = await backup(dom, set, 'inc');
  assert.match(added, /removed bitmap virtnbdbackup\.1 of disk vdb: it was left without its checkpoint/);
  // vda never held the bitmap: it said "checkpoint virtnbdbackup.1 had no usable bitmap: removed its metadata only".
  assert.doesNotMatch(added, /no usable bitmap|warning/);
  await assertPoint(work, set, a1);
  const out = path.join(work, 'vdb');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vdb']);
  const result = await TestDomain.compare(path.join(out, 'vdb.qcow2'), b1);
  assert.ok(result.identical, result.output);
});

test('an external snapshot taken within a chain and committed back: the incs go on across both, every point restores bit for bit, ours and Python', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'external-snapshot-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  await dom.write('vda', 0x22, '1M', '1M');
  // libvirt copies the checkpoints' bitmaps into the overlay, which the domain writes to from now on.
  const overlay = path.join(dom.dir, 'vda.overlay.qcow2');
  virsh('snapshot-create-as', dom.name, 'before-update', '--disk-only', '--atomic', '--no-metadata', '--diskspec', `vda,file=${overlay}`);
  await dom.write('vda', 0x33, '3M', '1M');
  // The fixture's snapshot() reads the disk's own image, which is the overlay's backing file now.
  await dom.flush('vda');
  const p1 = path.join(work, 'p1.raw');
  await run('qemu-img', ['convert', '-U', '-O', 'raw', overlay, p1]);
  await backup(dom, set, 'inc');
  virsh('blockcommit', dom.name, 'vda', '--active', '--pivot', '--wait');
  await dom.write('vda', 0x44, '5M', '1M');
  const p2 = await dom.snapshot('vda');
  await backup(dom, set, 'inc');
  // A restored image is named after the disk's image at that point: the overlay's name at checkpoint 1.
  for (const [until, reference, image] of [['virtnbdbackup.1', p1, 'vda.overlay.qcow2'], ['virtnbdbackup.2', p2, 'vda.qcow2']] as const) {
    const out = path.join(work, `ours-${until}`);
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '--until', until]);
    const result = await TestDomain.compare(path.join(out, image), reference);
    assert.ok(result.identical, `${until}: ${result.output}`);
  }
  const py = path.join(work, 'python');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', py]);
  const result = await TestDomain.compare(path.join(py, 'vda.qcow2'), p2);
  assert.ok(result.identical, result.output);
});

test('a domain renamed within a chain (virsh domrename keeps its UUID and checkpoints): the next inc takes the set\'s checkpoint list over; another domain\'s inc into the set is refused', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const other = await withDomain(t, { disks: [DISK], start: false });
  const work = await withTempDir(t, 'rename-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  await dom.write('vda', 0x5c, '3M', '1M');
  const p1 = await dom.snapshot('vda');
  await dom.stop();
  const renamed = `${dom.name}-renamed`;
  virsh('domrename', dom.name, renamed);
  try {
    virsh('start', renamed);
    const inc = (await runOk(ourBin('virtnbdbackup'), ['-n', '-d', renamed, '-l', 'inc', '-o', set])).stderr;
    assert.match(inc, new RegExp(`domain '${renamed}' was '${dom.name}' when the set's chain began \\(same UUID\\): its checkpoint list ${dom.name}\\.cpt is now ${renamed}\\.cpt`));
    assert.ok((await fs.readdir(set)).includes('vda.inc.virtnbdbackup.1.data'));
    await assertPoint(work, set, p1);
    const refused = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', other.name, '-l', 'inc', '-o', set]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(refused.stderr, new RegExp(`holds the chain of another domain, '${renamed}' \\(${renamed}\\.cpt, UUID [0-9a-f-]+\\), not of '${other.name}' \\(UUID [0-9a-f-]+\\); back up into another directory`));
  } finally {
    virsh('destroy', renamed);
    virsh('domrename', renamed, dom.name); // the fixture removes it by its name
  }
});

test('a disk left out of an inc (-x) and included again resumes from its last checkpoint, whose bitmap kept its changes; every point restores', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 2 }] }] });
  const work = await withTempDir(t, 'exclude-');
  const set = path.join(work, 'set');
  const [a0, b0] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  await backup(dom, set, 'full');
  await dom.write('vda', 0x31, '1M', '1M');
  await dom.write('vdb', 0x32, '4M', '1M');
  const a1 = await dom.snapshot('vda');
  await backup(dom, set, 'inc', '-x', 'vdb');
  await dom.write('vdb', 0x33, '6M', '1M');
  const [a2, b2] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  const resumed = await backup(dom, set, 'inc');
  assert.match(resumed, /disk vdb was left out of the backups after checkpoint virtnbdbackup\.0: this inc saves its changes since virtnbdbackup\.0/);
  assert.doesNotMatch(resumed, /previous chain was moved|warning/);
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.data')).sort(),
    ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.2.data', 'vdb.full.data', 'vdb.inc.virtnbdbackup.2.data']);
  const all = async (until: string | undefined): Promise<{ out: string; stderr: string }> => {
    const out = await fs.mkdtemp(path.join(work, 'all-'));
    return { out, stderr: (await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, ...(until ? ['--until', until] : [])])).stderr };
  };
  const same = async (image: string, reference: string): Promise<void> => {
    const result = await TestDomain.compare(image, reference);
    assert.ok(result.identical, `${image}: ${result.output}`);
  };
  const latest = await all(undefined);
  await same(path.join(latest.out, 'vda.qcow2'), a2);
  await same(path.join(latest.out, 'vdb.qcow2'), b2);
  // At checkpoint 1 the backup left vdb out: it is left out of that point's restore, and says so.
  const point1 = await all('virtnbdbackup.1');
  assert.match(point1.stderr, /disk vdb is left out of the restore at virtnbdbackup\.1: the backup at checkpoint virtnbdbackup\.1 did not save it \(left out with -x, or not attached to the domain then\); restore it alone with -d vdb/);
  await same(path.join(point1.out, 'vda.qcow2'), a1);
  assert.equal(await fs.access(path.join(point1.out, 'vdb.qcow2')).then(() => true, () => false), false);
  const point0 = await all('virtnbdbackup.0');
  await same(path.join(point0.out, 'vda.qcow2'), a0);
  await same(path.join(point0.out, 'vdb.qcow2'), b0);
  const py = path.join(work, 'python');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', py, '-d', 'vdb']);
  await same(path.join(py, 'vdb.qcow2'), b2);
});

test('one disk\'s newest inc lost (moved away with its chain): a restore of the latest point, and verify, refuse naming the file and the point before, which restores bit for bit', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 2 }] }] });
  const work = await withTempDir(t, 'lost-inc-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  await dom.write('vda', 0x31, '1M', '1M');
  await dom.write('vdb', 0x32, '4M', '1M');
  const [a1, b1] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  await backup(dom, set, 'inc');
  await dom.write('vda', 0x41, '2M', '1M');
  await dom.write('vdb', 0x42, '6M', '1M');
  await backup(dom, set, 'inc');
  // The set moved elsewhere without vdb's last inc (and its side files): vdb's older files still link up.
  const moved = path.join(work, 'moved');
  await fs.mkdir(moved);
  for (const name of await fs.readdir(set)) {
    if (!name.startsWith('vdb.inc.virtnbdbackup.2.data')) await fs.rename(path.join(set, name), path.join(moved, name));
  }
  const line = new RegExp(`^virtnbdrestore: error: ${moved} lacks vdb\\.inc\\.virtnbdbackup\\.2\\.data: checkpoint virtnbdbackup\\.2 backed up disk vdb, so vdb cannot be restored at the set's latest point \\(virtnbdbackup\\.2\\): its newest file there is vdb\\.inc\\.virtnbdbackup\\.1\\.data \\(virtnbdbackup\\.1\\); put it back, or restore the earlier point with --until virtnbdbackup\\.1$`, 'm');
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', moved, '-o', path.join(work, 'refused')]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(refused.stderr, line);
  assert.equal(await fs.access(path.join(work, 'refused')).then(() => true, () => false), false, 'a refused restore writes nothing');
  const verified = await runCli(ourBin('virtnbdrestore'), ['-i', moved, '-o', 'verify']);
  assert.equal(verified.code, 1, verified.stdout);
  assert.match(verified.stdout, /^FAILED chain: .* lacks vdb\.inc\.virtnbdbackup\.2\.data: /m);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', moved, '-o', out, '-n', '--until', 'virtnbdbackup.1']);
  for (const [disk, reference] of [['vda', a1], ['vdb', b1]] as const) {
    const result = await TestDomain.compare(path.join(out, `${disk}.qcow2`), reference);
    assert.ok(result.identical, `${disk} at virtnbdbackup.1: ${result.output}`);
  }
  // The other disk alone restores at the latest point.
  await runOk(ourBin('virtnbdrestore'), ['-i', moved, '-o', path.join(work, 'vda-only'), '-n', '-d', 'vda']);
});

test('guest writes during a backup: the set holds the disk as it was when the job started, and the next inc holds those writes', async (t) => {
  // 384 MiB of data, so that the copy is surely under way when the run is held (SIGSTOP) for the guest's writes.
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 512, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 384 }] }] });
  const work = await withTempDir(t, 'inflight-');
  const set = path.join(work, 'set');
  /** Runs `level` and, once its data flows, holds it while the guest writes `writes` (pattern, offset MiB). */
  const backupDuringWrites = async (level: string, partial: string, writes: Array<[number, number]>): Promise<void> => {
    const running = startCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', level, '-o', set]);
    await whenExists(path.join(set, partial));
    running.child.kill('SIGSTOP');
    try {
      for (const [pattern, offsetMiB] of writes) await dom.write('vda', pattern, `${offsetMiB}M`, '2M');
    } finally {
      running.child.kill('SIGCONT');
    }
    const r = await running.done;
    assert.equal(r.code, 0, r.stderr);
  };
  const p0 = await dom.snapshot('vda');
  // Before the copy's position (at its start), where it may be, and past it; one into the unallocated end too.
  await backupDuringWrites('full', 'vda.full.data.partial', [[0xa1, 0], [0xa2, 150], [0xa3, 350], [0xa4, 450]]);
  const p1 = await dom.snapshot('vda');
  await dom.write('vda', 0xb1, '50M', '200M');
  const p2 = await dom.snapshot('vda');
  await backupDuringWrites('inc', 'vda.inc.virtnbdbackup.1.data.partial', [[0xc1, 60], [0xc2, 200], [0xc3, 480]]);
  const p3 = await dom.snapshot('vda');
  await backup(dom, set, 'inc');
  await assertPoint(work, set, p0, 'virtnbdbackup.0');
  await assertPoint(work, set, p2, 'virtnbdbackup.1');
  await assertPoint(work, set, p3);
  // The point between (p1, the full's in-flight writes alone) is no backup's; p2 holds them, so check they are there.
  assert.equal((await TestDomain.compare(p1, p2)).identical, false);
});

test('an inc that saved no data is a point of its own: --until it restores that point and its domain XML, not the next inc\'s (virtnbdbackup\'s issue #270)', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'vnbd-empty-inc-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  // Between the full and inc 1 only the domain's definition changes.
  virsh('desc', dom.name, '--live', '--config', 'at point one');
  assert.match(await backup(dom, set, 'inc'), /disk vda: 0 bytes of data saved to vda\.inc\.virtnbdbackup\.1\.data/);
  const p1 = await dom.snapshot('vda');
  await dom.write('vda', 0x42, '1M', '1M');
  virsh('desc', dom.name, '--live', '--config', 'at point two');
  await backup(dom, set, 'inc');
  await assertPoint(work, set, p1, 'virtnbdbackup.1');
  const out = path.join(work, 'out');
  const { stderr } = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '--until', 'virtnbdbackup.1']);
  assert.match(stderr, /restored to .*\(vda\.full\.data, vda\.inc\.virtnbdbackup\.1\.data\)\n/);
  assert.deepEqual((await fs.readdir(out)).sort(), ['vda.qcow2', 'vmconfig.virtnbdbackup.1.xml']);
  assert.match(await fs.readFile(path.join(out, 'vmconfig.virtnbdbackup.1.xml'), 'utf8'), /<description>at point one<\/description>/);
});

test('two sets of one domain sharing -C: an inc into the older set, whose last checkpoint name the newer set reused, is a full, never an inc on the other set\'s checkpoint', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'shared-c-');
  const shared = path.join(work, 'checkpoints');
  const [older, newer] = [path.join(work, 'older'), path.join(work, 'newer')];
  await backup(dom, older, 'full', '-C', shared);
  await dom.write('vda', 0x22, '8M', '1M');
  // The newer set's full replaces the domain's checkpoints, and its virtnbdbackup.0 definition in -C.
  await backup(dom, newer, 'full', '-C', shared);
  await dom.write('vda', 0x33, '16M', '1M');
  const reference = await dom.snapshot('vda', path.join(work, 'now.raw'));
  const stderr = await backup(dom, older, 'inc', '-C', shared);
  assert.match(stderr, /checkpoint virtnbdbackup\.0 in libvirt is not this set's .*: an incremental backup would be wrong, so this run makes a full backup instead/);
  assert.ok((await fs.readdir(older)).includes('vda.full.data'), 'the older set got no new full');
  await assertPoint(work, older, reference);
});

test('a disk shrunk (shut off) and grown again within a chain: the range the full wrote past the smaller size reads as zero at the later points, on a new image and onto a pre-filled raw file', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'shrink-grow-');
  const set = path.join(work, 'set');
  await dom.write('vda', 0x22, '40M', '1M');
  const p0 = await dom.snapshot('vda');
  await backup(dom, set, 'full');
  // libvirt grows a disk only; an administrator shrinks the image of the shut-off domain (its bitmap goes along).
  // The backup of the shut-off domain is a diff (no checkpoint is made offline), which records the smaller size.
  await dom.stop();
  await run('qemu-img', ['resize', '-q', '--shrink', '-f', 'qcow2', dom.diskPath('vda'), '32M']);
  const p1 = await dom.snapshot('vda');
  await backup(dom, set, 'inc');
  const diff = (await fs.readdir(set)).find((f) => /^vda\.diff\..*\.data$/.test(f));
  assert.ok(diff, 'the shut-off inc wrote a diff');
  // Grown back: the new range reads as zero and its bitmap bits are clear, so no frame of the next inc covers it.
  await run('qemu-img', ['resize', '-q', '-f', 'qcow2', dom.diskPath('vda'), '64M']);
  await dom.start();
  await dom.write('vda', 0x44, '1M', '1M');
  const p2 = await dom.snapshot('vda');
  await backup(dom, set, 'inc');

  await assertPoint(work, set, p0, 'virtnbdbackup.0');
  const atDiff = path.join(work, 'at-diff');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', atDiff, '-n', '--sequence', `vda.full.data,${diff}`]);
  const diffResult = await TestDomain.compare(path.join(atDiff, 'vda.qcow2'), p1);
  assert.ok(diffResult.identical, `at the diff: ${diffResult.output}`);
  await assertPoint(work, set, p2);
  const prefilled = path.join(work, 'prefilled.raw');
  await fs.writeFile(prefilled, Buffer.alloc(64 * 1024 * 1024, 0xab));
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', prefilled, '-n', '-d', 'vda']);
  const onFile = await TestDomain.compare(prefilled, p2, { formatA: 'raw' });
  assert.ok(onFile.identical, onFile.output);
  // virtnbdmap serves either point alike.
  await assertMapsTo(t, work, set, 'at-diff', ['vda.full.data', diff], p1, 32);
  await assertMapsTo(t, work, set, 'grown-back', ['vda.full.data', diff, 'vda.inc.virtnbdbackup.1.data'], p2, 64);
});

test('a run that listed its checkpoint and died before its files were written (Python\'s tool lists it first): the next inc continues from the checkpoint before, which kept those changes; one whose other disk has no file makes a full', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 2 }] }] });
  const work = await withTempDir(t, 'unfinished-');
  const set = path.join(work, 'set');
  const p0 = await dom.snapshot('vda');
  await backup(dom, set, 'full');
  await dom.write('vda', 0x33, '8M', '2M');
  // The dead run: checkpoint virtnbdbackup.1 in libvirt and in the set's list, and no file of it.
  await backup(dom, set, 'inc');
  for (const name of await fs.readdir(set)) if (name.includes('.inc.virtnbdbackup.1.data')) await fs.rm(path.join(set, name));
  await dom.write('vda', 0x44, '20M', '1M');
  const p1 = await dom.snapshot('vda');
  const resumed = await backup(dom, set, 'inc');
  assert.match(resumed, /the set lists checkpoint virtnbdbackup\.1 but holds no data file of it \(a run that did not finish\): this run continues the chain from virtnbdbackup\.0, whose bitmap keeps the changes since; checkpoint virtnbdbackup\.1 removed from libvirt and from \S+\.cpt/);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  await assertPoint(work, set, p0, 'virtnbdbackup.0');
  await assertPoint(work, set, p1);
  const verified = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']);
  assert.equal(verified.code, 0, verified.stderr);

  // Died between the disks: vda's file of virtnbdbackup.2 is there, vdb's is not.
  await dom.write('vdb', 0x55, '4M', '1M');
  await backup(dom, set, 'inc');
  for (const name of await fs.readdir(set)) if (name.startsWith('vdb.inc.virtnbdbackup.2.data')) await fs.rm(path.join(set, name));
  const p2 = await dom.snapshot('vda');
  const full = await backup(dom, set, 'inc');
  assert.match(full, /checkpoint virtnbdbackup\.2 tracks disk vdb, but the set holds no file of it at that checkpoint \(a run that did not finish\): an incremental backup would be wrong, so this run makes a full backup instead/);
  assert.ok((await fs.readdir(set)).includes('vda.full.data'));
  await assertPoint(work, set, p2);
});

test('files a run left without listing their checkpoint (killed as it named them): the next inc names them and what to do; a full with no checkpoint list, or a lone .partial, is said to be a run\'s that did not finish', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'unlisted-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  await dom.write('vda', 0x33, '8M', '2M');
  await backup(dom, set, 'inc');
  // As if killed after vda's file took its name and before the list named checkpoint virtnbdbackup.1.
  const cpt = path.join(set, `${dom.name}.cpt`);
  await fs.writeFile(cpt, JSON.stringify(['virtnbdbackup.0']));
  const refused = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(refused.stderr, /holds what a failed run left \(checkpoint virtnbdbackup\.1 is not in \S+\.cpt\): vda\.inc\.virtnbdbackup\.1\.data, vda\.inc\.virtnbdbackup\.1\.data\.blake3\.json, vda\.inc\.virtnbdbackup\.1\.data\.chksum; the chain there is incomplete: move them out of the set to continue the chain from its last complete backup/);
  const aside = path.join(work, 'aside');
  await fs.mkdir(aside);
  for (const name of await fs.readdir(set)) if (name.startsWith('vda.inc.virtnbdbackup.1.data')) await fs.rename(path.join(set, name), path.join(aside, name));
  await dom.write('vda', 0x44, '20M', '1M');
  const p1 = await dom.snapshot('vda');
  assert.match(await backup(dom, set, 'inc'), /removed checkpoint virtnbdbackup\.1: a run that did not finish created it/);
  await assertPoint(work, set, p1);

  // A full killed before it listed its checkpoint: its file alone, no list; a full killed earlier: a .partial alone.
  const unfinished = path.join(work, 'unfinished');
  await fs.mkdir(unfinished);
  await fs.copyFile(path.join(set, 'vda.full.data'), path.join(unfinished, 'vda.full.data'));
  const full = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', unfinished]);
  assert.equal(full.code, 1, full.stderr);
  assert.match(full.stderr, /already holds a backup \(vda\.full\.data\); use an empty directory for a full backup \(with no checkpoint list, \S+\.cpt, the run that wrote it did not finish: move it out of the set\)/);
  await fs.rename(path.join(unfinished, 'vda.full.data'), path.join(unfinished, 'vda.full.data.partial'));
  const partial = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', unfinished]);
  assert.equal(partial.code, 1, partial.stderr);
  assert.match(partial.stderr, /holds vda\.full\.data\.partial, left from a failed backup run; move it out of the set, or use an empty directory for a full backup/);
});

test('a full that listed its checkpoint and died between its disks (Python\'s tool lists it first): the next inc makes a full, never an inc of a disk with no full', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 2 }] }] });
  const work = await withTempDir(t, 'unfinished-full-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  // As Python's full leaves it once its .partial is moved away: the list names virtnbdbackup.0, vdb has no full.
  for (const name of await fs.readdir(set)) if (name.startsWith('vdb.full.data')) await fs.rm(path.join(set, name));
  await dom.write('vdb', 0x55, '4M', '1M');
  const [a, b] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  const next = await backup(dom, set, 'inc');
  assert.match(next, /checkpoint virtnbdbackup\.0 tracks disk vdb, but the set holds no file of it at that checkpoint \(a run that did not finish\): an incremental backup would be wrong, so this run makes a full backup instead/);
  assert.ok((await fs.readdir(set)).includes('vdb.full.data'));
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  for (const [disk, reference] of [['vda', a], ['vdb', b]] as const) {
    const result = await TestDomain.compare(path.join(out, `${disk}.qcow2`), reference);
    assert.ok(result.identical, `${disk}: ${result.output}`);
  }
});

test('a prefix named like a checkpoint of the default chain (virtnbdbackup.0): its checkpoints (virtnbdbackup.0.N) and the default chain\'s never mix, each full removes its own alone and each inc continues its own; Python\'s full takes that chain for its own and removes it, and our next inc then makes a full', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'overlap-');
  const daily = path.join(work, 'daily');
  const shaped = path.join(work, 'shaped');
  const write = async (pattern: number, offsetMiB: number): Promise<string> => {
    await dom.write('vda', pattern, `${offsetMiB}M`, '1M');
    return dom.snapshot('vda');
  };
  const d0 = await dom.snapshot('vda');
  await backup(dom, daily, 'full');
  const d1 = await write(0x31, 1);
  await backup(dom, daily, 'inc');
  const s0 = await write(0x32, 2);
  const first = await backup(dom, shaped, 'full', '--checkpoint-prefix', 'virtnbdbackup.0');
  assert.doesNotMatch(first, /removed old checkpoint|warning/);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0', 'virtnbdbackup.0.0', 'virtnbdbackup.1']);
  const s1 = await write(0x33, 3);
  await backup(dom, shaped, 'inc');
  const d2 = await write(0x34, 4);
  await backup(dom, daily, 'inc');
  const s2 = await write(0x35, 5);
  await backup(dom, shaped, 'inc');
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0', 'virtnbdbackup.0.0', 'virtnbdbackup.0.1', 'virtnbdbackup.0.2', 'virtnbdbackup.1', 'virtnbdbackup.2']);
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(shaped, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0.0', 'virtnbdbackup.0.1', 'virtnbdbackup.0.2']);
  // A new full of either chain removes that chain's checkpoints alone; the other's next inc goes on from its own.
  const daily2 = path.join(work, 'daily2');
  const removedDaily = await backup(dom, daily2, 'full');
  assert.deepEqual([...removedDaily.matchAll(/removed old checkpoint (\S+):/g)].map((m) => m[1]), ['virtnbdbackup.2', 'virtnbdbackup.1', 'virtnbdbackup.0']);
  const s3 = await write(0x36, 6);
  assert.doesNotMatch(await backup(dom, shaped, 'inc'), /warning/);
  const shaped2 = path.join(work, 'shaped2');
  const removedShaped = await backup(dom, shaped2, 'full', '--checkpoint-prefix', 'virtnbdbackup.0');
  assert.deepEqual([...removedShaped.matchAll(/removed old checkpoint (\S+):/g)].map((m) => m[1]), ['virtnbdbackup.0.3', 'virtnbdbackup.0.2', 'virtnbdbackup.0.1', 'virtnbdbackup.0.0']);
  const d3 = await write(0x37, 7);
  assert.doesNotMatch(await backup(dom, daily2, 'inc'), /warning/);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0', 'virtnbdbackup.0.0', 'virtnbdbackup.1']);
  for (const [set, point, until] of [[daily, d0, 'virtnbdbackup.0'], [daily, d1, 'virtnbdbackup.1'], [daily, d2, undefined], [shaped, s0, 'virtnbdbackup.0.0'], [shaped, s1, 'virtnbdbackup.0.1'], [shaped, s2, 'virtnbdbackup.0.2'], [shaped, s3, undefined], [daily2, d3, undefined]] as const) {
    await assertPoint(work, set, point, until);
  }
  // Python's restore reads the shaped set too.
  const py = path.join(work, 'py');
  await runOk(pythonBin('virtnbdrestore'), ['-i', shaped, '-o', py, '-n']);
  const pyResult = await TestDomain.compare(path.join(py, 'vda.qcow2'), s3);
  assert.ok(pyResult.identical, pyResult.output);
  // Python's full removes every checkpoint whose name holds virtnbdbackup, the shaped chain's too: our next inc there
  // finds the bitmap gone and makes a full, the chain moved aside, never a wrong inc.
  await runOk(pythonBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', path.join(work, 'python'), '-n']);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0']);
  const s4 = await write(0x38, 8);
  const after = await backup(dom, shaped2, 'inc');
  const archive = archivedChain(after);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0', 'virtnbdbackup.0.0']);
  await assertPoint(work, shaped2, s4);
  await assertPoint(work, archive, s3);
});

test('a full clears the bitmaps of its chain\'s names that the images hold without a checkpoint (left by earlier versions, or by metadata deleted by hand), one line each; Python\'s incs then create those names, and other prefixes\' and foreign bitmaps stay', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 16, fill: [{ pattern: 0x44, offsetMiB: 1, lengthMiB: 1 }] }] });
  const work = await withTempDir(t, 'orphans-');
  const set = path.join(work, 'set');
  await dom.stop();
  const orphans: Array<[string, string]> = [['vda', 'virtnbdbackup.0'], ['vda', 'virtnbdbackup.2'], ['vdb', 'virtnbdbackup.1'], ['vdb', 'virtnbdbackup.2'], ['vda', 'weekly.1'], ['vdb', 'someone-elses']];
  for (const [target, name] of orphans) await run('qemu-img', ['bitmap', '--add', dom.diskPath(target), name]);
  await dom.start();
  const full = await backup(dom, set, 'full');
  assert.deepEqual([...full.matchAll(/^removed bitmap (\S+) of disk (\S+): it was left without its checkpoint$/gm)].map((m) => `${m[1]} ${m[2]}`),
    ['virtnbdbackup.0 vda', 'virtnbdbackup.1 vdb', 'virtnbdbackup.2 vda', 'virtnbdbackup.2 vdb']);
  assert.doesNotMatch(full, /warning|no usable bitmap/);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0']);
  // Python's incs create virtnbdbackup.1 and .2, which the bitmaps left there refused ("Bitmap already exists").
  const points: string[] = [];
  for (const [i, bin] of [pythonBin('virtnbdbackup'), pythonBin('virtnbdbackup'), ourBin('virtnbdbackup')].entries()) {
    await dom.write('vda', 0x60 + i, `${i + 1}M`, '1M');
    points.push(await dom.snapshot('vda'));
    await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  }
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2', 'virtnbdbackup.3']);
  for (const [i, point] of points.entries()) await assertPoint(work, set, point, `virtnbdbackup.${i + 1}`);
  // Another prefix's bitmap and a foreign one were left where they were.
  await dom.stop();
  const listed = async (target: string): Promise<string[]> => {
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', dom.diskPath(target)])).stdout) as { 'format-specific': { data: { bitmaps?: Array<{ name: string }> } } };
    return (info['format-specific'].data.bitmaps ?? []).map((b) => b.name).sort();
  };
  assert.deepEqual(await listed('vda'), ['virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2', 'virtnbdbackup.3', 'weekly.1']);
  assert.deepEqual(await listed('vdb'), ['someone-elses', 'virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2', 'virtnbdbackup.3']);
});
