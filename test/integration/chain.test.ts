// Chain integrity on real libvirt/QEMU: checkpoints lost with the domain definition come back from -C, lost
// checkpoint metadata makes the next inc a full (clearing the bitmaps left behind), chains of different prefixes
// interleave without harm, a foreign checkpoint is left alone with a warning (-e: exit 2), and a chain whose
// checkpoint another set of the same prefix replaced falls back to a full instead of writing a wrong inc, and a full
// removes an old checkpoint whose bitmap the image lost by its metadata alone; an inc whose parent's bitmap the image
// lost becomes a full, the old chain archived.
// Every point of every set is restored and compared bit for bit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { run, withDomain, withTempDir, type TestDomain } from '../support/testbed.js';
import { ourBin, runCli, runOk } from '../support/cli.js';
import { assertRestoresTo as assertPoint, virsh } from '../support/points.js';

const checkpoints = (dom: TestDomain): string[] => virsh('checkpoint-list', dom.name, '--name').split('\n').map((l) => l.trim()).filter(Boolean).sort();
const DISK = { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] };

/** Runs our backup on `dom` into `set`; returns stderr (the log lines). */
async function backup(dom: TestDomain, set: string, level: string, ...extra: string[]): Promise<string> {
  return (await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', level, '-o', set, ...extra])).stderr;
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

  // Checkpoint metadata deleted and no saved definitions: the bitmaps stay in QEMU without their checkpoints.
  for (const name of ['virtnbdbackup.2', 'virtnbdbackup.1', 'virtnbdbackup.0']) virsh('checkpoint-delete', '--metadata', dom.name, name);
  await fs.rm(cdir, { recursive: true });
  await dom.write('vda', 0x55, '16M', '1M');
  const p3 = await dom.snapshot('vda');
  const fallback = await backup(dom, set, 'inc', '-C', cdir);
  assert.match(fallback, /warning: checkpoint virtnbdbackup\.2 is missing in libvirt .*makes a full backup instead/);
  assert.match(fallback, /removed bitmap virtnbdbackup\.0 of disk vda: it was left without its checkpoint/);
  const archive = archivedChain(fallback);
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

test('a full backup removes an old checkpoint whose bitmap is gone by its metadata alone, and says so', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'nobitmap-');
  await backup(dom, path.join(work, 'set1'), 'full');
  // The image loses the checkpoint's bitmap while libvirt keeps the checkpoint (an image replaced or repaired).
  await dom.stop();
  await run('qemu-img', ['bitmap', '--remove', dom.diskPath('vda'), 'virtnbdbackup.0']);
  await dom.start();
  await dom.write('vda', 0x66, '2M', '1M');
  const p0 = await dom.snapshot('vda');
  const log = await backup(dom, path.join(work, 'set2'), 'full');
  assert.match(log, /checkpoint virtnbdbackup\.0 had no usable bitmap: removed its metadata only/);
  assert.deepEqual(checkpoints(dom), ['virtnbdbackup.0']);
  await assertPoint(work, path.join(work, 'set2'), p0);
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
