// Chain bookkeeping without libvirt: checkpoint prefixes and names, the checkpoint XML we create, parse and
// redefine, libvirt's errors, qemu-img map as an extent source (same plans as NBD block status), sparse
// detection off, run locks (refusal, stale takeover), archived chains (all or nothing) and boot file names.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import {
  bitmapOwnerXml, checkPrefix, checkpointBitmapNames, checkpointIdentity, checkpointSize, checkpointXml, inChain, planCheckpoint, prefixOf, withoutDomain, withoutParent,
} from '../../src/libvirt/checkpoints.js';
import { existingBitmapName, isLostBitmapError, unusableParent } from '../../src/libvirt/chain.js';
import type { LibvirtDomain } from '../../src/native/addon.js';
import { clip, denseExtents, qemuMapFlags, type QemuMapEntry } from '../../src/backup/extentSources.js';
import { planDirty, planFull, type ExtentPlan } from '../../src/extents/plan.js';
import { CONTEXT_ALLOCATION, type Endpoint, type StatusExtent } from '../../src/endpoint/endpoint.js';
import { RunLock, lockRun } from '../../src/backup/lock.js';
import { archiveChain, isArchivedChain, listSet } from '../../src/set/backupSet.js';
import { bootFileName } from '../../src/backup/bootFiles.js';

const execFileAsync = promisify(execFile);

test('prefixes name chains: prefix.N; a bad prefix is refused', () => {
  assert.equal(planCheckpoint('full', [], 'weekly').name, 'weekly.0');
  assert.deepEqual(planCheckpoint('inc', ['weekly.0', 'weekly.1'], 'weekly'), { name: 'weekly.2', parent: 'weekly.1', create: true });
  assert.equal(prefixOf('virtnbdbackup.12'), 'virtnbdbackup');
  assert.equal(prefixOf('my.chain.3'), 'my.chain');
  assert.equal(prefixOf('someone-elses'), undefined);
  assert.ok(inChain('weekly.3', 'weekly') && !inChain('weekly.3', 'week') && !inChain('weekly-old.3', 'weekly'));
  // A prefix shaped like another chain's checkpoint: the two chains share no name.
  assert.ok(inChain('virtnbdbackup.0.1', 'virtnbdbackup.0') && !inChain('virtnbdbackup.0.1', 'virtnbdbackup'));
  assert.ok(inChain('virtnbdbackup.0', 'virtnbdbackup') && !inChain('virtnbdbackup.0', 'virtnbdbackup.0'));
  for (const bad of ['', '.hidden', 'a/b', 'a b', 'x'.repeat(65)]) assert.throws(() => checkPrefix(bad), /not usable/, bad);
  assert.equal(checkPrefix('daily_2-a.b'), 'daily_2-a.b');
});

const LIBVIRT_CHECKPOINT = `<domaincheckpoint>
  <name>virtnbdbackup.1</name>
  <description>Backup checkpoint (run 0a1b2c)</description>
  <parent><name>virtnbdbackup.0</name></parent>
  <creationTime>1795324215</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='virtnbdbackup.1' size='2097152'/>
    <disk name='vdb' checkpoint='bitmap' bitmap='virtnbdbackup.1' size='65536'/>
    <disk name='sda' checkpoint='no'/>
  </disks>
  <domain type='qemu'>
    <name>web</name>
    <uuid>a8734c27-595a-45ac-a74c-21305acfcc8d</uuid>
    <description>the web server</description>
    <devices><disk type='file' device='disk'><target dev='vda'/></disk></devices>
  </domain>
</domaincheckpoint>
`;

test('checkpoint XML: run id in the description, identity, size, redefinable without the domain or its parent', () => {
  const xml = checkpointXml({ name: 'weekly.1', parent: 'weekly.0', create: true }, ['vda'], ['vda', 'vdb'], 'beef01');
  assert.match(xml, /<description>Backup checkpoint \(run beef01\)<\/description>/);
  assert.match(xml, /<disk name='vdb' checkpoint='no'\/>/);
  assert.equal(checkpointSize(LIBVIRT_CHECKPOINT), 2097152 + 65536);
  assert.equal(checkpointIdentity(LIBVIRT_CHECKPOINT), '1795324215 Backup checkpoint (run 0a1b2c)');
  assert.notEqual(checkpointIdentity(LIBVIRT_CHECKPOINT.replace('0a1b2c', 'ffffff')), checkpointIdentity(LIBVIRT_CHECKPOINT));
  const stripped = withoutDomain(LIBVIRT_CHECKPOINT);
  assert.doesNotMatch(stripped, /<domain[ >]|uuid|web server/);
  assert.match(stripped, /<disks>[\s\S]*<\/disks>\s*<\/domaincheckpoint>/);
  const orphan = withoutParent(LIBVIRT_CHECKPOINT);
  assert.doesNotMatch(orphan, /<parent>|virtnbdbackup\.0/);
  assert.equal(checkpointIdentity(orphan), checkpointIdentity(LIBVIRT_CHECKPOINT));
  const owner = bitmapOwnerXml('virtnbdbackup.0', 'vdb', ['vda', 'vdb']);
  assert.match(owner, /<disk name='vdb' checkpoint='bitmap' bitmap='virtnbdbackup\.0'\/>/);
  assert.match(owner, /<disk name='vda' checkpoint='no'\/>/);
  // The bitmaps a checkpoint owns: named by its disks, else after it.
  assert.deepEqual(checkpointBitmapNames(LIBVIRT_CHECKPOINT), ['virtnbdbackup.1', 'virtnbdbackup.1']);
  assert.deepEqual(checkpointBitmapNames(owner.replace("<name>virtnbdbackup.0</name>", '<name>probe</name>')), ['virtnbdbackup.0']);
  assert.deepEqual(checkpointBitmapNames(xml), ['weekly.1']);
});

test("libvirt's refusals: a lost bitmap, and a bitmap left without its checkpoint", () => {
  assert.ok(isLostBitmapError(Object.assign(new Error('checkpoint inconsistent: x'), { code: 109 })));
  assert.ok(isLostBitmapError(new Error("missing or broken bitmap 'virtnbdbackup.1' for disk 'vda'")));
  assert.ok(!isLostBitmapError(new Error('Domain not found')));
  const exists = new Error("internal error: unable to execute QEMU command 'transaction': Bitmap already exists: weekly.0");
  assert.equal(existingBitmapName(exists), 'weekly.0');
  assert.equal(existingBitmapName(new Error('other')), undefined);
});

/** An endpoint whose extents come from fixed tables, per context. */
function tables(size: number, contexts: Record<string, StatusExtent[]>): Endpoint {
  return {
    size, maxRequestSize: 1 << 25, parallelism: 1,
    read: async () => undefined, write: async () => undefined, zero: async () => undefined, flush: async () => undefined,
    close: async () => undefined,
    async *extents(context: string, offset: number, length: number): AsyncIterable<StatusExtent> {
      yield* clip(contexts[context] ?? [], offset, length);
    },
  };
}

test('qemu-img map entries give the same plans as NBD block status', async () => {
  const MiB = 1 << 20;
  const allocation: QemuMapEntry[] = [
    { start: 0, length: 4 * MiB, data: true, zero: false },
    { start: 4 * MiB, length: 4 * MiB, data: false, zero: true },
    { start: 8 * MiB, length: 8 * MiB, data: true, zero: false },
  ];
  // x-dirty-bitmap: dirty ranges show as data=false.
  const dirty: QemuMapEntry[] = [
    { start: 0, length: 2 * MiB, data: true, zero: false },
    { start: 2 * MiB, length: 4 * MiB, data: false, zero: false },
    { start: 6 * MiB, length: 10 * MiB, data: true, zero: false },
  ];
  const context = 'qemu:dirty-bitmap:backup-vda';
  const fromQemu = tables(16 * MiB, {
    [CONTEXT_ALLOCATION]: allocation.map((e) => ({ offset: e.start, length: e.length, flags: qemuMapFlags(e, CONTEXT_ALLOCATION) })),
    [context]: dirty.map((e) => ({ offset: e.start, length: e.length, flags: qemuMapFlags(e, context) })),
  });
  const fromNbd = tables(16 * MiB, {
    [CONTEXT_ALLOCATION]: [{ offset: 0, length: 4 * MiB, flags: 0 }, { offset: 4 * MiB, length: 4 * MiB, flags: 3 }, { offset: 8 * MiB, length: 8 * MiB, flags: 0 }],
    [context]: [{ offset: 0, length: 2 * MiB, flags: 0 }, { offset: 2 * MiB, length: 4 * MiB, flags: 1 }, { offset: 6 * MiB, length: 10 * MiB, flags: 0 }],
  });
  const flat = async (plan: Promise<ExtentPlan>): Promise<unknown> => plan.then((p) => ({ extents: [...p.extents], dataSize: p.dataSize }));
  assert.deepEqual(await flat(planFull(fromQemu)), await flat(planFull(fromNbd)));
  assert.deepEqual(await flat(planDirty(fromQemu, context)), await flat(planDirty(fromNbd, context)));
  assert.deepEqual([...(await planDirty(fromQemu, context)).extents], [
    { offset: 2 * MiB, length: 2 * MiB, kind: 'data' },
    { offset: 4 * MiB, length: 2 * MiB, kind: 'zero' },
  ]);
  // --no-sparse-detection: the zeroed part of the changed range is data too.
  assert.deepEqual([...(await planDirty(denseExtents(fromNbd), context)).extents], [{ offset: 2 * MiB, length: 4 * MiB, kind: 'data' }]);
});

test('run locks: a live owner is refused by name, a dead owner is taken over (an empty lock after some seconds), release removes only our own', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-lock-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'x.lock');
  const lock = await RunLock.acquire(file, 'domain x');
  await assert.rejects(RunLock.acquire(file, 'domain x'), new RegExp(`domain x is in use by another backup \\(pid ${process.pid}\\): lock ${file}`));
  await lock.release();
  assert.equal(await fs.access(file).then(() => true, () => false), false);

  await fs.writeFile(file, JSON.stringify({ pid: 2 ** 22 + 12345, start: '1' })); // no such process
  const taken = await RunLock.acquire(file, 'domain x');
  assert.equal(JSON.parse(await fs.readFile(file, 'utf8')).pid, process.pid);
  await fs.writeFile(file, JSON.stringify({ pid: process.pid, start: 'someone else' }));
  await taken.release();
  assert.ok(await fs.access(file).then(() => true, () => false), 'released a lock that was not ours');

  // Empty: its owner is writing it, or was killed between creating and writing it (kill -9), after some seconds.
  await fs.writeFile(file, '');
  await assert.rejects(RunLock.acquire(file, 'domain x'), /domain x is in use by another backup: lock/);
  const old = new Date(Date.now() - 60_000);
  await fs.utimes(file, old, old);
  const afterKill = await RunLock.acquire(file, 'domain x');
  assert.equal(JSON.parse(await fs.readFile(file, 'utf8')).pid, process.pid);
  await afterKill.release();

  // A run killed while it took the lock left its draft beside it: the next one removes it, not a live run's.
  const dead = `${file}.${2 ** 22 + 12345}.new`;
  const live = `${file}.${process.pid + 1}.new`;
  await fs.writeFile(dead, JSON.stringify({ pid: 2 ** 22 + 12345, start: '1' }));
  await fs.writeFile(live, '');
  const again = await RunLock.acquire(file, 'domain x');
  assert.deepEqual((await fs.readdir(dir)).sort(), ['x.lock', path.basename(live)]);
  await again.release();
});

test('lockRun: an output directory removed before its lock is taken (another run that made it, refused the domain) is made again', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-lockrun-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const output = path.join(dir, 'set');
  const unlock = await lockRun(`vnbdtest-lockrun-${process.pid}`, output);
  assert.ok((await fs.readdir(output)).includes('.virtnbdbackup.lock'));
  await unlock();
  assert.deepEqual(await fs.readdir(output), []);
});

test('an unusable chain is moved into chain.<secs>/, which lists as a set of its own', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-archive-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  for (const f of ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'web.cpt', 'backup.inc.now.log']) await fs.writeFile(path.join(dir, f), '');
  const archive = await archiveChain(dir, ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'web.cpt'], new Date(1_700_000_000_500));
  assert.equal(path.basename(archive), 'chain.1700000000');
  assert.ok(isArchivedChain('chain.1700000000') && !isArchivedChain('chain.x'));
  assert.deepEqual((await fs.readdir(dir)).sort(), ['backup.inc.now.log', 'chain.1700000000']);
  assert.deepEqual((await listSet(archive)).dataFiles.map((d) => d.file), ['vda.full.data', 'vda.inc.virtnbdbackup.1.data']);
  assert.deepEqual((await listSet(dir)).dataFiles, []);
  await assert.rejects(archiveChain(dir, [], new Date(1_700_000_000_000)), /cannot move the set's chain aside/);
});

test('a chain that cannot be moved aside whole stays where it was', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-archive-'));
  t.after(async () => {
    await execFileAsync('umount', [path.join(dir, 'pinned')]).catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true });
  });
  const files = ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'web.cpt'];
  for (const f of files) await fs.writeFile(path.join(dir, f), f);
  // A mount point cannot be renamed (EBUSY): the third of four moves fails.
  await fs.mkdir(path.join(dir, 'pinned'));
  await execFileAsync('mount', ['-t', 'tmpfs', '-o', 'size=1M', 'tmpfs', path.join(dir, 'pinned')]);
  await assert.rejects(archiveChain(dir, ['vda.full.data', 'web.cpt', 'pinned', 'vda.inc.virtnbdbackup.1.data'], new Date(1_700_000_000_000)),
    /^UserError: cannot move .*\/pinned into .*\/chain\.1700000000: .*; the set was left as it was$/);
  assert.deepEqual((await fs.readdir(dir)).sort(), [...files, 'pinned'].sort());
  for (const f of files) assert.equal(await fs.readFile(path.join(dir, f), 'utf8'), f);
});

test('boot files are named <basename>.<ident>, plain <basename> for a copy', () => {
  assert.equal(bootFileName('/var/lib/libvirt/qemu/nvram/web_VARS.fd', 'virtnbdbackup.2'), 'web_VARS.fd.virtnbdbackup.2');
  assert.equal(bootFileName('/boot/vmlinuz', 'copy'), 'vmlinuz');
});

test("the set's saved checkpoint decides whether libvirt's checkpoint of that name is the set's; a missing or damaged one says so", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-parent-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const ours = checkpointXml({ name: 'virtnbdbackup.0', parent: '', create: true } as Parameters<typeof checkpointXml>[0], ['vda'], ['vda'], 'run-1').replace('</domaincheckpoint>', '<creationTime>1700000000</creationTime></domaincheckpoint>');
  const libvirt = (xml: string): LibvirtDomain => ({ listCheckpointNames: async () => ['virtnbdbackup.0'], checkpointGetXMLDesc: async () => xml }) as Partial<LibvirtDomain> as LibvirtDomain;
  const saved = path.join(dir, 'virtnbdbackup.0.xml');
  await fs.writeFile(saved, ours);
  assert.equal(await unusableParent(libvirt(ours), 'virtnbdbackup.0', dir), undefined);
  assert.match(await unusableParent(libvirt(ours.replace('1700000000', '1700000999')), 'virtnbdbackup.0', dir) ?? '', /is not this set's .*another chain with the same prefix replaced it$/);
  await fs.rm(saved);
  assert.match(await unusableParent(libvirt(ours), 'virtnbdbackup.0', dir) ?? '', /^the set holds no definition of checkpoint virtnbdbackup\.0 \(.*virtnbdbackup\.0\.xml is missing\), so it cannot tell/);
  await fs.writeFile(saved, '<domaincheckpoint><name>');
  assert.match(await unusableParent(libvirt(ours), 'virtnbdbackup.0', dir) ?? '', /^the set's definition of checkpoint virtnbdbackup\.0 \(.*virtnbdbackup\.0\.xml\) is damaged: it holds no creation time/);
});
