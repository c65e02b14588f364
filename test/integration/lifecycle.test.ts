// Chains across a domain's life, as an administrator's daily full + incs meet it: diffs taken between incs restore
// at every point with our virtnbdrestore and Python's (-u / --until by checkpoint name, -s by files); Python's
// offline inc written over the inc of the set's last checkpoint is named by restore and verify, and our next inc
// makes a full; disks' images swapped between targets (also with the domain defined anew) make a full, never an
// inc onto the other disk's chain, and --until a point of the chain moved aside names where it went; a target
// renamed and back; a disk made transient is left out; a block job running on a disk is refused before a full
// removes the chain's checkpoints.
// Every point is compared bit for bit with a snapshot taken when it was backed up.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { TestDomain, run, withDomain, withTempDir } from '../support/testbed.js';
import { ourBin, pythonBin, runCli, runOk } from '../support/cli.js';
import { virsh } from '../support/points.js';

const DISK = { target: 'vda', sizeMiB: 32, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] };

/** Runs our backup on `dom` into `set`; a diff starts in a second of its own (its file is named by that second). */
async function backup(dom: TestDomain, set: string, level: string): Promise<void> {
  if (level === 'diff') await new Promise((resolve) => setTimeout(resolve, 1000 - (Date.now() % 1000) + 10));
  await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', level, '-o', set]);
}

/** Restores disk vda of `set` with `tool` and `args` into a fresh dir; asserts it equals `reference`. */
async function assertRestores(tool: string, work: string, set: string, reference: string, args: string[]): Promise<void> {
  const out = await fs.mkdtemp(path.join(work, 'restore-'));
  await runOk(tool, ['-i', set, '-o', out, '-d', 'vda', ...args]);
  // Images of -s are named after the disk alone (vda), as Python names them; else after the source image.
  const image = (await fs.readdir(out)).filter((f) => !f.endsWith('.xml'));
  assert.equal(image.length, 1, `${args.join(' ')}: ${image.join(', ')}`);
  const result = await TestDomain.compare(path.join(out, image[0] as string), reference, { formatA: 'qcow2' });
  assert.ok(result.identical, `${path.basename(tool)} ${args.join(' ')}: ${result.output}`);
}

test('online diffs between incs name the checkpoint they follow: --until each checkpoint and -s of each diff restore bit for bit, ours and Python (whose restore stopped at a diff naming the next checkpoint, before its inc)', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'online-diffs-');
  const set = path.join(work, 'set');
  const points: Record<string, string> = {};
  await backup(dom, set, 'full');
  points.c0 = await dom.snapshot('vda');
  // Each step: a guest write at `offset`, then a backup of `level`, the disk's point kept under `point`.
  const steps: Array<[number, string, string, string]> = [[0x22, '2M', 'diff', 'd0'], [0x23, '3M', 'inc', 'c1'], [0x24, '5M', 'diff', 'd1'], [0x25, '6M', 'inc', 'c2']];
  for (const [pattern, offset, level, point] of steps) {
    await dom.write('vda', pattern, offset, '1M');
    await backup(dom, set, level);
    points[point] = await dom.snapshot('vda');
  }

  const dumped = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump'])).stdout) as Array<{ file: string; checkpointName: string; parentCheckpoint: string }>;
  const diffs = dumped.filter((m) => m.file.startsWith('vda.diff.'));
  assert.equal(diffs.length, 2);
  const [d0, d1] = diffs.map((m) => m.file);
  for (const tool of [ourBin('virtnbdrestore'), pythonBin('virtnbdrestore')]) {
    await assertRestores(tool, work, set, points.c0 as string, ['--until', 'virtnbdbackup.0']);
    await assertRestores(tool, work, set, points.c1 as string, ['--until', 'virtnbdbackup.1']);
    await assertRestores(tool, work, set, points.c2 as string, ['--until', 'virtnbdbackup.2']);
    await assertRestores(tool, work, set, points.c2 as string, []);
    await assertRestores(tool, work, set, points.d0 as string, ['-s', `vda.full.data,${d0}`]);
    await assertRestores(tool, work, set, points.d1 as string, ['-s', `vda.full.data,vda.inc.virtnbdbackup.1.data,${d1}`]);
  }
  // Python's restore stops (-u) at the first file naming the checkpoint: each diff names the one it follows.
  for (const diff of diffs) assert.equal(diff.checkpointName, diff.parentCheckpoint, `${diff.file} names another checkpoint than the one it follows`);
});

test('Python\'s offline inc, which replaces the inc that made the set\'s last checkpoint: restore and verify say so and name the point that restores; our next inc makes a full instead of continuing a chain no restore crosses (right after a full it replaces nothing, and the chain goes on)', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'python-offline-');
  const set = path.join(work, 'set');
  // Python's offline run leaves its qemu-nbd's pid file beside the socket (<socket>.vda.pid): in the test's dir.
  const socket = path.join(work, 'python.sock');
  await backup(dom, set, 'full');
  await dom.stop();
  // Right after the full, Python's offline inc (vda.inc.virtnbdbackup.0.data) replaces nothing: the chain goes on.
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x21 1M 1M', dom.diskPath('vda')]);
  const offline = await dom.snapshot('vda');
  await runOk(pythonBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '--noprogress', '-f', socket]);
  await assertRestores(ourBin('virtnbdrestore'), work, set, offline, ['-s', 'vda.full.data,vda.inc.virtnbdbackup.0.data']);
  await dom.start();
  await dom.write('vda', 0x22, '2M', '1M');
  const goesOn = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.doesNotMatch(goesOn.stderr, /warning/);
  const c1 = await dom.snapshot('vda');
  await dom.write('vda', 0x23, '4M', '1M');
  await backup(dom, set, 'inc');
  await dom.stop();
  // Python 1.9.15 writes the changes since virtnbdbackup.2 (none) as vda.inc.virtnbdbackup.2.data, over ours.
  await runOk(pythonBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '--noprogress', '-f', socket]);
  const lost = /broken chain: vda\.inc\.virtnbdbackup\.2\.data holds only the changes since checkpoint virtnbdbackup\.2, which it names as its own and as its parent: an offline backup of Python's virtnbdbackup, which writes them under the name of the inc that made virtnbdbackup\.2, replacing that inc; the changes from virtnbdbackup\.1 to virtnbdbackup\.2 are lost from the set, and nothing can put them back: vda\.inc\.virtnbdbackup\.1\.data \(virtnbdbackup\.1\) is the latest point before it that restores \(--until virtnbdbackup\.1\)/;
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'refused')]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(refused.stderr, lost);
  const verified = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']);
  assert.equal(verified.code, 1, verified.stdout);
  assert.match(verified.stdout, lost);
  await assertRestores(ourBin('virtnbdrestore'), work, set, c1, ['--until', 'virtnbdbackup.1']);

  await dom.start();
  await dom.write('vda', 0x24, '3M', '1M');
  const now = await dom.snapshot('vda');
  const { stderr } = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.match(stderr, /warning: vda\.inc\.virtnbdbackup\.2\.data holds only the changes since checkpoint virtnbdbackup\.2: an offline backup of Python's virtnbdbackup, .* replaced that inc, so the set lacks disk vda's changes up to virtnbdbackup\.2 and no point from there on restores: an incremental backup would be wrong, so this run makes a full backup instead; the set's previous chain was moved to (\S+) and restores from there/);
  const archived = /previous chain was moved to (\S+) and restores from there/.exec(stderr)?.[1] as string;
  await assertRestores(ourBin('virtnbdrestore'), work, set, now, []);
  await assertRestores(ourBin('virtnbdrestore'), work, archived, c1, ['--until', 'virtnbdbackup.1']);
});

/** A domain of two disks (vda, vdb) with a full and an inc in `set` (in a temporary directory named `prefix`). */
async function twoDiskChain(t: TestContext, prefix: string): Promise<{ dom: TestDomain; work: string; set: string; imageA: string; imageB: string }> {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x55, offsetMiB: 8, lengthMiB: 4 }] }] });
  const work = await withTempDir(t, prefix);
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  await dom.write('vda', 0x22, '1M', '1M');
  await dom.write('vdb', 0x66, '2M', '1M');
  await backup(dom, set, 'inc');
  return { dom, work, set, imageA: dom.diskPath('vda'), imageB: dom.diskPath('vdb') };
}

test('two disks\' images swapped between targets within a chain (the XML edited): the inc makes a full instead of saving each image\'s changes onto the other disk\'s chain; shut off it is refused; every point restores bit for bit', async (t) => {
  const { dom, work, set, imageA, imageB } = await twoDiskChain(t, 'swapped-');
  const [a1, b1] = [await dom.snapshot('vda'), await dom.snapshot('vdb')];
  await dom.stop();
  const xml = virsh('dumpxml', '--inactive', dom.name).replace(imageA, '\0').replace(imageB, imageA).replace('\0', imageB);
  await fs.writeFile(path.join(work, 'swapped.xml'), xml);
  virsh('define', path.join(work, 'swapped.xml'));
  const moved = `disk vda of '${dom.name}' now has the image ${imageB}, which disk vdb had at checkpoint virtnbdbackup.1 (the disks' images were swapped or moved between targets since): its bitmap holds disk vdb's changes, and an inc would put them onto disk vda's chain`;
  const before = (await fs.readdir(set)).sort();
  const offline = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.equal(offline.code, 1, offline.stderr);
  assert.ok(offline.stderr.includes(`${moved}: an incremental backup would be wrong, and a shut-off domain cannot start a new chain; run again with -S`), offline.stderr);
  assert.deepEqual((await fs.readdir(set)).filter((f) => !f.startsWith('backup.')).sort(), before.filter((f) => !f.startsWith('backup.')));
  await dom.start();
  const { stderr } = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.ok(stderr.includes(`warning: ${moved}: an incremental backup would be wrong, so this run makes a full backup instead`), stderr);
  const archived = /previous chain was moved to (\S+) and restores from there/.exec(stderr)?.[1] as string;
  // The testbed's snapshots follow the image: vda now reads image B.
  const [vdaNow, vdbNow] = [await dom.snapshot('vdb'), await dom.snapshot('vda')];
  await assertRestores(ourBin('virtnbdrestore'), work, archived, a1, []);
  // Weeks later, --until a point of the old chain: the line names the chain moved aside that holds it.
  const older = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'older'), '--until', 'virtnbdbackup.1']);
  assert.equal(older.code, 1, older.stderr);
  assert.ok(older.stderr.includes(`checkpoint virtnbdbackup.1 is not in the chain of disk vda in ${set} (it has: virtnbdbackup.0): ${archived}, an earlier chain of the set, moved aside when a backup had to start a new chain, holds a checkpoint virtnbdbackup.1; restore it with -i ${archived} --until virtnbdbackup.1, or pick one of the set's own with --until\n`), older.stderr);
  await assertRestores(ourBin('virtnbdrestore'), work, set, vdaNow, []);
  const out = await fs.mkdtemp(path.join(work, 'vdb-'));
  await runOk(ourBin('virtnbdrestore'), ['-i', archived, '-o', out, '-d', 'vdb']);
  assert.ok((await TestDomain.compare(path.join(out, 'vdb.qcow2'), b1)).identical);
  const out2 = await fs.mkdtemp(path.join(work, 'vdb-'));
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out2, '-d', 'vdb']);
  const now = (await fs.readdir(out2)).find((f) => f.endsWith('.qcow2')) as string;
  assert.ok((await TestDomain.compare(path.join(out2, now), vdbNow)).identical);
});

test('a disk\'s target renamed within a chain (vdb to vdc, and back): vdc is saved whole, vdb resumes from the checkpoint it left, whose bitmap kept every change; each point restores bit for bit, and --until a point without vdb says why', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 16, fill: [{ pattern: 0x55, offsetMiB: 0, lengthMiB: 2 }] }] });
  const work = await withTempDir(t, 'renamed-');
  const set = path.join(work, 'set');
  const image = dom.diskPath('vdb');
  /** Gives the shut-off domain's image of `from` the target `to` (virsh detach-disk / attach-disk --config). */
  const rename = (from: string, to: string): void => {
    virsh('detach-disk', dom.name, from, '--config');
    virsh('attach-disk', dom.name, image, to, '--driver', 'qemu', '--subdriver', 'qcow2', '--targetbus', 'virtio', '--config');
  };
  /** A raw copy of the image now (written only while the domain was off, so the file holds it all). */
  let copies = 0;
  const snapshot = async (): Promise<string> => {
    const out = path.join(work, `image${++copies}.raw`);
    await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, out]);
    return out;
  };
  await backup(dom, set, 'full');
  await dom.write('vdb', 0x56, '4M', '1M');
  await backup(dom, set, 'inc');
  const b1 = await dom.snapshot('vdb');
  await dom.stop();
  rename('vdb', 'vdc');
  // Written while it is vdc: through qemu-io on the image while the domain is off (its bitmaps see it too).
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x57 5M 1M', image]);
  await dom.start();
  const renamed = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.match(renamed.stderr, /disk vdc has no bitmap of checkpoint virtnbdbackup\.1 .*: this inc saves it whole as vdc\.full\.data/);
  const c2 = await snapshot();
  await dom.stop();
  rename('vdc', 'vdb');
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x58 6M 1M', image]);
  await dom.start();
  const back = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.match(back.stderr, /disk vdb was left out of the backups after checkpoint virtnbdbackup\.1: this inc saves its changes since virtnbdbackup\.1/);
  const b3 = await snapshot();
  const restores = async (disk: string, reference: string, args: string[]): Promise<string> => {
    const out = await fs.mkdtemp(path.join(work, `${disk}-`));
    const { stderr } = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-d', disk, ...args]);
    const [restored] = (await fs.readdir(out)).filter((f) => f.endsWith('.qcow2'));
    const result = await TestDomain.compare(path.join(out, restored as string), reference);
    assert.ok(result.identical, `${disk} ${args.join(' ')}: ${result.output}`);
    return stderr;
  };
  await restores('vdb', b1, ['--until', 'virtnbdbackup.1']);
  await restores('vdc', c2, ['--until', 'virtnbdbackup.2']);
  await restores('vdb', b3, ['--until', 'virtnbdbackup.3']);
  await restores('vdb', b3, []);
  const out = await fs.mkdtemp(path.join(work, 'all-'));
  const { stderr } = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '--until', 'virtnbdbackup.2']);
  assert.match(stderr, /disk vdb is left out of the restore at virtnbdbackup\.2: the backup at checkpoint virtnbdbackup\.2 did not save it \(left out with -x, or not attached to the domain then\)/);
});

test('a disk made transient within a chain (<transient/>, its writes dropped at shutdown): left out with a warning, where libvirt\'s job refused it and every run failed (a full after removing the chain\'s checkpoints); the other disks go on', async (t) => {
  const dom = await withDomain(t, { disks: [DISK, { target: 'vdb', sizeMiB: 16 }] });
  const work = await withTempDir(t, 'transient-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  await dom.stop();
  const xml = virsh('dumpxml', '--inactive', dom.name).replace(/(<target dev='vdb' bus='virtio'\/>)/, '$1<transient/>');
  assert.match(xml, /<transient\/>/);
  await fs.writeFile(path.join(work, 'transient.xml'), xml);
  virsh('define', path.join(work, 'transient.xml'));
  await dom.start();
  await dom.write('vda', 0x22, '1M', '1M');
  const skipped = /warning: skipping disk vdb: transient disk \(<transient\/>\): libvirt runs no backup job on it, and its image never changes \(QEMU writes to an overlay that is dropped at shutdown\); copy its image once, or leave it out with -x/;
  const inc = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.match(inc.stderr, skipped);
  const a1 = await dom.snapshot('vda');
  await assertRestores(ourBin('virtnbdrestore'), work, set, a1, []);
  const full = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, 'full')]);
  assert.match(full.stderr, skipped);
  assert.deepEqual((await fs.readdir(path.join(work, 'full'))).filter((f) => f.endsWith('.data')), ['vda.full.data']);
});

test('images swapped between targets and the domain defined anew (a new UUID: its checkpoints are redefined without the domain XML): the set\'s saved domain XML tells, and the inc makes a full', async (t) => {
  const { dom, work, set, imageA, imageB } = await twoDiskChain(t, 'swapped-anew-');
  await dom.stop();
  const xml = virsh('dumpxml', '--inactive', dom.name).replace(/<uuid>[^<]*<\/uuid>/, '').replace(imageA, '\0').replace(imageB, imageA).replace('\0', imageB);
  virsh('undefine', '--checkpoints-metadata', dom.name);
  await fs.writeFile(path.join(work, 'anew.xml'), xml);
  virsh('define', path.join(work, 'anew.xml'));
  await dom.start();
  const { stderr } = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.ok(stderr.includes(`warning: disk vda of '${dom.name}' now has the image ${imageB}, which disk vdb had at checkpoint virtnbdbackup.1 (the disks' images were swapped or moved between targets since)`), stderr);
  assert.match(stderr, /so this run makes a full backup instead/);
  // Off, the images hold what the full read (nothing wrote since); vda reads image B now.
  await dom.stop();
  await assertRestores(ourBin('virtnbdrestore'), work, set, await dom.snapshot('vdb'), []);
});

test('a block job running on a disk (virsh blockcopy, not yet pivoted): an inc and a full are refused naming it and how to end it, the full before it removed the chain\'s checkpoints (libvirt refused the job after); once it ends, the inc goes on', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'blockjob-');
  const set = path.join(work, 'set');
  await backup(dom, set, 'full');
  virsh('blockcopy', dom.name, 'vda', path.join(dom.dir, 'copy.qcow2'), '--transient-job', '--format', 'qcow2', '--wait');
  const running = `disk vda of '${dom.name}' has a block job running, a copy to another image (virsh blockcopy): libvirt starts no backup job while it runs; end it (virsh blockjob ${dom.name} vda --pivot, or --abort) and run again`;
  for (const [level, dir] of [['inc', set], ['full', path.join(work, 'other')]] as const) {
    const refused = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', level, '-o', dir]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.ok(refused.stderr.includes(running), refused.stderr);
    assert.doesNotMatch(refused.stderr, /removed old checkpoint/);
  }
  virsh('blockjob', dom.name, 'vda', '--abort');
  await dom.write('vda', 0x22, '1M', '1M');
  const { stderr } = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.match(stderr, /inc backup of .*, checkpoint virtnbdbackup\.1, changes since virtnbdbackup\.0/);
  assert.doesNotMatch(stderr, /warning/);
  await assertRestores(ourBin('virtnbdrestore'), work, set, await dom.snapshot('vda'), []);
});
