// --sequence: the files of one disk, from its base, in chain order, with no incremental left out. A restore point
// lacking a file its checkpoints say was saved is refused, naming the file and the earlier point every disk holds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { chainFromSequence, lostFiles, partialName, planRestore } from '../../src/restore/plan.js';
import { CHECKPOINT_DIR, checkLinks, dataFileName, type ChainLink } from '../../src/set/backupSet.js';
import { checkpointXml, type Level } from '../../src/libvirt/checkpoints.js';
import { verifySet } from '../../src/verify/verify.js';
import { Logger } from '../../src/util/log.js';
import { MemoryDisk, craftCheckpointDefinition, craftStream, craftVmConfig } from '../support/craftedSet.js';

const MiB = 1024 * 1024;

function link(disk: string, level: Level, ident: string, checkpointName: string, parentCheckpoint: string): ChainLink {
  const file = level === 'full' ? `${disk}.full.data` : `${disk}.${level}.${ident}.data`;
  return {
    file, disk, level, ident, path: `/set/${file}`,
    meta: { virtualSize: 1, dataSize: 0, date: '', diskName: disk, diskFormat: 'qcow2', checkpointName, compressed: false, compressionMethod: 'lz4', parentCheckpoint, incremental: level !== 'full', streamVersion: 2 },
  };
}

const chainOf = (disk: string): ChainLink[] => [
  link(disk, 'full', '', 'virtnbdbackup.0', ''),
  link(disk, 'inc', 'virtnbdbackup.1', 'virtnbdbackup.1', 'virtnbdbackup.0'),
  link(disk, 'diff', '1700000000', 'virtnbdbackup.2', 'virtnbdbackup.1'),
  link(disk, 'inc', 'virtnbdbackup.2', 'virtnbdbackup.2', 'virtnbdbackup.1'),
  link(disk, 'inc', 'virtnbdbackup.3', 'virtnbdbackup.3', 'virtnbdbackup.2'),
];
const chains = new Map([['vda', chainOf('vda')], ['vdb', chainOf('vdb')]]);
const files = (links: ChainLink[]): string[] => links.map((l) => l.file);

test('a sequence in chain order gives those links; a diff may be skipped or used', () => {
  assert.deepEqual(files(chainFromSequence(['vda.full.data', 'vda.inc.virtnbdbackup.1.data'], chains, '/set')), ['vda.full.data', 'vda.inc.virtnbdbackup.1.data']);
  assert.deepEqual(files(chainFromSequence(['/set/vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.diff.1700000000.data'], chains, '/set')).length, 3);
  assert.equal(chainFromSequence(['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.2.data', 'vda.inc.virtnbdbackup.3.data'], chains, '/set').length, 4);
});

const refused: Array<[string, string[], RegExp]> = [
  ['out of chain order', ['vda.full.data', 'vda.inc.virtnbdbackup.2.data', 'vda.inc.virtnbdbackup.1.data'], /out of chain order: vda\.inc\.virtnbdbackup\.1\.data comes before vda\.inc\.virtnbdbackup\.2\.data/],
  ['with a gap', ['vda.full.data', 'vda.inc.virtnbdbackup.2.data'], /gap before vda\.inc\.virtnbdbackup\.2\.data: it needs vda\.inc\.virtnbdbackup\.1\.data first/],
  ['mixing disks', ['vda.full.data', 'vdb.inc.virtnbdbackup.1.data'], /mixes the disks vda and vdb/],
  ['not starting at the base', ['vda.inc.virtnbdbackup.1.data'], /must start with the base of disk vda \(vda\.full\.data\)/],
  ['naming a file the set lacks', ['vda.full.data', 'vda.inc.virtnbdbackup.9.data'], /vda\.inc\.virtnbdbackup\.9\.data in --sequence is not in the set \/set/],
  ['naming no data file', ['vda.qcow2'], /not a data file name/],
];
for (const [what, sequence, message] of refused) {
  test(`a sequence ${what} is refused`, () => {
    assert.throws(() => chainFromSequence(sequence, chains, '/set'), message);
  });
}

test('checkLinks: identities recorded in the streams must match where both sides have one; a diff is checked against the inc before it', () => {
  const withIds = (l: ChainLink, own?: string, parent?: string): ChainLink => ({ ...l, meta: { ...l.meta, checkpointIdentity: own, parentCheckpointIdentity: parent } });
  const [full, inc1, diff, inc2] = chainOf('vda') as [ChainLink, ChainLink, ChainLink, ChainLink];
  const A0 = '1764000000 Backup checkpoint (run aaaaaa)';
  const A1 = '1764000100 Backup checkpoint (run bbbbbb)';
  const B0 = '1764009999 Backup checkpoint (run cccccc)';
  checkLinks([withIds(full, A0), withIds(inc1, A1, A0), withIds(diff, undefined, A1), withIds(inc2, undefined, A1)]);
  // Python's files (no keys), or ours before the keys: names alone, as before.
  checkLinks([full, withIds(inc1, A1, B0), inc2]);
  assert.throws(() => checkLinks([withIds(full, A0), withIds(inc1, A1, B0)]),
    /broken chain: vda\.inc\.virtnbdbackup\.1\.data is based on another checkpoint virtnbdbackup\.0 \(made 2025-11-24T18:46:39Z by run cccccc\) than vda\.full\.data holds \(made 2025-11-24T16:00:00Z by run aaaaaa\): the files come from two sets with the same names/);
  assert.throws(() => checkLinks([withIds(full, A0), withIds(inc1, A1, A0), withIds(diff, undefined, B0)]), /vda\.diff\.1700000000\.data is based on another checkpoint virtnbdbackup\.1/);
});

test('checkLinks: identities that differ though they read the same in words are damage, not another set', () => {
  const [full, inc1] = chainOf('vda') as [ChainLink, ChainLink];
  const own = '1764000000 Backup checkpoint (run aaaaaa)';
  const damaged = '1764000000 Backup checkpoinT (run aaaaaa)';
  const withIds = (l: ChainLink, mine?: string, parent?: string): ChainLink => ({ ...l, meta: { ...l.meta, checkpointIdentity: mine, parentCheckpointIdentity: parent } });
  assert.throws(() => checkLinks([withIds(full, own), withIds(inc1, undefined, damaged)]),
    /broken chain: vda\.inc\.virtnbdbackup\.1\.data names checkpoint virtnbdbackup\.0 by an identity that differs from the one vda\.full\.data holds, though both read "made 2025-11-24T16:00:00Z by run aaaaaa": the metadata of one of them is damaged; check the set with -a verify/);
});

test('checkLinks: nothing builds on a copy, which makes no checkpoint; two diffs after one checkpoint go in the order they were made', () => {
  const [full, inc1, diff] = chainOf('vda') as [ChainLink, ChainLink, ChainLink];
  const copy: ChainLink = { ...full, file: 'vda.copy.data', level: 'copy', path: '/set/vda.copy.data' };
  checkLinks([copy]);
  assert.throws(() => checkLinks([copy, inc1]), /broken chain: vda\.inc\.virtnbdbackup\.1\.data cannot follow vda\.copy\.data: a copy backup makes no checkpoint, so no inc or diff builds on it/);
  const later = { ...diff, file: 'vda.diff.1700000100.data', ident: '1700000100' };
  checkLinks([full, inc1, diff, later]);
  assert.throws(() => checkLinks([full, inc1, later, diff]), /vda\.diff\.1700000000\.data \(\) comes after vda\.diff\.1700000100\.data \(\), a later diff after the same checkpoint virtnbdbackup\.1: .*give the newest diff alone, or the diffs in the order they were made$/);
  // Files not named as a set names them: by their dates, where both have one of the same form.
  const dated = (l: ChainLink, date: string): ChainLink => ({ ...l, ident: '', meta: { ...l.meta, date } });
  assert.throws(() => checkLinks([full, inc1, dated(later, '2026-11-29T03:00:10Z'), dated(diff, '2026-11-29T03:00:00Z')]), /comes after/);
  checkLinks([full, inc1, dated(later, '2026-11-29T03:00:10Z'), dated(diff, '2026-11-29 03:00:00')]);
});

test('partialName: <image>.partial, or where that would pass 255 bytes, the name cut short with a hash, whole letters only', () => {
  assert.equal(partialName('/out/vda.qcow2'), '/out/vda.qcow2.partial');
  assert.equal(partialName('/out/vda.qcow2', '.uncompressed.partial'), '/out/vda.qcow2.uncompressed.partial');
  for (const base of [`${'a'.repeat(250)}.qcow2`, `${'ü'.repeat(124)}.qcow2`]) {
    for (const suffix of ['.partial', '.uncompressed.partial']) {
      const name = path.basename(partialName(`/out/${base}`, suffix));
      assert.ok(Buffer.byteLength(name) <= 255, name);
      assert.match(name, new RegExp(`^${base.slice(0, 8)}.*\\.[0-9a-f]{8}${suffix.replace(/\./g, '\\.')}$`));
      assert.doesNotMatch(name, /\uFFFD/);
    }
  }
  assert.notEqual(partialName(`/out/${'a'.repeat(250)}.qcow2`), partialName(`/out/${'a'.repeat(250)}.qcow3`), 'names that differ past the cut differ');
});

/** Checkpoint definitions as the set saves them: the disks each gave a bitmap. */
const savedBitmaps = (byCheckpoint: Record<string, string[]>) => async (name: string): Promise<string[] | undefined> => byCheckpoint[name];
const CHECKPOINTS = ['virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2'];
const BOTH = { 'virtnbdbackup.0': ['vda', 'vdb'], 'virtnbdbackup.1': ['vda', 'vdb'], 'virtnbdbackup.2': ['vda', 'vdb'] };
const upTo = (disk: string, n: number): ChainLink[] => chainOf(disk).filter((l) => l.level !== 'diff').slice(0, n + 1);

test('lostFiles: the files of the checkpoints after a chain\'s newest whose definitions gave the disk a bitmap', async () => {
  const lost = await lostFiles(upTo('vdb', 1), 2, CHECKPOINTS, savedBitmaps(BOTH));
  assert.deepEqual(lost && { files: lost.files, first: lost.first, newest: lost.newest.file }, { files: ['vdb.inc.virtnbdbackup.2.data'], first: 2, newest: 'vdb.inc.virtnbdbackup.1.data' });
  assert.deepEqual((await lostFiles(upTo('vdb', 0), 2, CHECKPOINTS, savedBitmaps(BOTH)))?.files, ['vdb.inc.virtnbdbackup.1.data', 'vdb.inc.virtnbdbackup.2.data']);
  // At an earlier point (--until), what comes after it does not count; a file lost at that point does.
  assert.equal(await lostFiles(upTo('vdb', 1), 1, CHECKPOINTS, savedBitmaps(BOTH)), undefined);
  const skipped = [upTo('vdb', 2)[0], upTo('vdb', 2)[2]] as ChainLink[];
  assert.deepEqual((await lostFiles(skipped, 1, CHECKPOINTS, savedBitmaps(BOTH)))?.files, ['vdb.inc.virtnbdbackup.1.data']);
  assert.equal(await lostFiles(upTo('vdb', 2), 2, CHECKPOINTS, savedBitmaps(BOTH)), undefined);
});

test('lostFiles: nothing is lost where the checkpoints did not save the disk, or cannot tell', async () => {
  // Left out at the last checkpoint (-x, checkpoint='no'), or a raw disk: no bitmap there.
  assert.equal(await lostFiles(upTo('vdb', 1), 2, CHECKPOINTS, savedBitmaps({ ...BOTH, 'virtnbdbackup.2': ['vda'] })), undefined);
  // No saved definitions (-C elsewhere, sets of old builds), or not this one.
  assert.equal(await lostFiles(upTo('vdb', 0), 2, CHECKPOINTS, savedBitmaps({})), undefined);
  // Added to the domain at checkpoint 2: at checkpoint 1 its chain has not begun.
  const added = [link('vdb', 'full', '', 'virtnbdbackup.2', '')];
  assert.equal(await lostFiles(added, 2, CHECKPOINTS, savedBitmaps(BOTH)), undefined);
  assert.equal(await lostFiles(added, 1, CHECKPOINTS, savedBitmaps(BOTH)), undefined);
  // A copy has no checkpoints; a chain of checkpoints the list does not name cannot be placed in it.
  assert.equal(await lostFiles([link('vdb', 'copy', '', 'virtnbdbackup.0', '')], 2, CHECKPOINTS, savedBitmaps(BOTH)), undefined);
  assert.equal(await lostFiles(upTo('vdb', 0), 2, ['weekly.0', 'weekly.1', 'weekly.2'], savedBitmaps({ 'weekly.2': ['vdb'] })), undefined);
});

/** When the crafted two-disk set's first checkpoint was created (seconds since the epoch); each next one a second later. */
const CHAIN_START = 1_800_000_000;

/**
 * A crafted set of disks vda and vdb, full and two incs each, with its checkpoint list and definitions (each
 * checkpoint gives a bitmap to the disks of `saved`, every disk by default), as our backup and Python's write them.
 */
async function craftTwoDiskSet(t: { after: (fn: () => Promise<void>) => void }, saved: Record<string, string[]> = {}): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-lost-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const disk = new MemoryDisk(MiB).fill(0x11, 0, 65536);
  const extents = [{ offset: 0, length: 65536, kind: 'data' as const }];
  for (const [n, name] of CHECKPOINTS.entries()) {
    const plan = { name, parent: CHECKPOINTS[n - 1] ?? '', create: true };
    const targets = saved[name] ?? ['vda', 'vdb'];
    const creationTime = CHAIN_START + n;
    await craftCheckpointDefinition(dir, name, checkpointXml(plan, targets, ['vda', 'vdb']), { creationTime });
    await craftVmConfig(dir, name, 'dom', ['vda', 'vdb'].map((target) => ({ target, file: `/vm/${target}.qcow2`, format: 'qcow2' })));
    for (const target of targets) {
      await craftStream({
        dir, file: dataFileName(target, n === 0 ? 'full' : 'inc', name), disk, diskName: target, extents, checkpointName: name, parentCheckpoint: plan.parent,
        incremental: n > 0, checkpointIdentity: `${creationTime} Backup checkpoint (run crafted)`,
      });
    }
  }
  await fs.writeFile(path.join(dir, 'dom.cpt'), JSON.stringify(CHECKPOINTS));
  return dir;
}

/** Removes a data file and its side files from the set, as a user moving it away would. */
async function lose(dir: string, file: string): Promise<void> {
  for (const name of await fs.readdir(dir)) if (name.startsWith(file)) await fs.rm(path.join(dir, name));
}

const plannedFiles = async (options: { input: string; until?: string; disk?: string; log?: Logger }): Promise<Record<string, string[]>> => {
  const plan = await planRestore({ ...options, output: path.join(options.input, 'out') });
  return Object.fromEntries(plan.disks.map((d) => [d.disk, d.source.kind === 'stream' ? files(d.source.chain) : []]));
};

test('a disk whose newest file is lost refuses the latest point, naming the file and the earlier point; that point restores, and so does the other disk alone', async (t) => {
  const dir = await craftTwoDiskSet(t);
  await lose(dir, 'vdb.inc.virtnbdbackup.2.data');
  const line = /lacks vdb\.inc\.virtnbdbackup\.2\.data: checkpoint virtnbdbackup\.2 backed up disk vdb, so vdb cannot be restored at the set's latest point \(virtnbdbackup\.2\): its newest file there is vdb\.inc\.virtnbdbackup\.1\.data \(virtnbdbackup\.1\); put it back, or restore the earlier point with --until virtnbdbackup\.1$/;
  await assert.rejects(plannedFiles({ input: dir }), line);
  await assert.rejects(plannedFiles({ input: dir, disk: 'vdb' }), line);
  // Verify fails the chain with the same line (every file that is there passes).
  const verdicts = await verifySet({ input: dir });
  assert.deepEqual(verdicts.filter((v) => !v.ok).map((v) => v.file), ['chain']);
  assert.match(verdicts.find((v) => v.file === 'chain')?.reason ?? '', line);
  // --until the lost point is refused alike (it used to leave vdb out as "removed from the domain").
  await assert.rejects(plannedFiles({ input: dir, until: 'virtnbdbackup.2' }), /lacks vdb\.inc\.virtnbdbackup\.2\.data: .* vdb cannot be restored at virtnbdbackup\.2: its newest file there is vdb\.inc\.virtnbdbackup\.1\.data .* --until virtnbdbackup\.1$/);
  assert.deepEqual(await plannedFiles({ input: dir, until: 'virtnbdbackup.1' }), {
    vda: ['vda.full.data', 'vda.inc.virtnbdbackup.1.data'], vdb: ['vdb.full.data', 'vdb.inc.virtnbdbackup.1.data'],
  });
  assert.deepEqual(Object.keys(await plannedFiles({ input: dir, disk: 'vda' })), ['vda']);
  // Two incs lost: both named, and the point before the first.
  await lose(dir, 'vdb.inc.virtnbdbackup.1.data');
  await assert.rejects(plannedFiles({ input: dir }), /lacks vdb\.inc\.virtnbdbackup\.1\.data, vdb\.inc\.virtnbdbackup\.2\.data: checkpoint virtnbdbackup\.1 backed up disk vdb, .* its newest file there is vdb\.full\.data \(virtnbdbackup\.0\); put them back, or restore the earlier point with --until virtnbdbackup\.0$/);
  await assert.rejects(plannedFiles({ input: dir, until: 'virtnbdbackup.1' }), /lacks vdb\.inc\.virtnbdbackup\.1\.data: .* --until virtnbdbackup\.0$/);
  // A disk with no file at all that the last checkpoint backed up.
  await lose(dir, 'vdb.full.data');
  await assert.rejects(plannedFiles({ input: dir }), /holds no data file of disk vdb, which checkpoint virtnbdbackup\.2 backed up: a restore at the set's latest point \(virtnbdbackup\.2\) would leave it out; put its files back, or restore the other disks one by one with -d$/);
  // Sets without checkpoint definitions (-C elsewhere, older sets) restore what they hold, as before.
  await fs.rm(path.join(dir, CHECKPOINT_DIR), { recursive: true });
  assert.deepEqual(Object.keys(await plannedFiles({ input: dir })), ['vda']);
});

test('a disk a checkpoint did not save (-x, checkpoint=\'no\') is no loss; a checkpoint listed with no file of any disk is a warning, the point before restored', async (t) => {
  const dir = await craftTwoDiskSet(t, { 'virtnbdbackup.2': ['vda'] });
  assert.deepEqual(await plannedFiles({ input: dir }), {
    vda: ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.2.data'], vdb: ['vdb.full.data', 'vdb.inc.virtnbdbackup.1.data'],
  });
  // A run that listed virtnbdbackup.3 and died before it wrote (Python's tool lists first), its .partials moved away.
  await fs.writeFile(path.join(dir, 'dom.cpt'), JSON.stringify([...CHECKPOINTS, 'virtnbdbackup.3']));
  await craftCheckpointDefinition(dir, 'virtnbdbackup.3', checkpointXml({ name: 'virtnbdbackup.3', parent: 'virtnbdbackup.2', create: true }, ['vda', 'vdb'], ['vda', 'vdb']), { creationTime: CHAIN_START + 3 });
  const warned: string[] = [];
  const log = new Logger({ quiet: true, color: false });
  log.warn = (msg: string): void => void warned.push(msg);
  assert.equal((await plannedFiles({ input: dir, log })).vda?.length, 3);
  assert.match(warned.join('\n'), /lists checkpoint virtnbdbackup\.3 but holds no data file of it \(a backup that did not finish, or its files were removed\): its latest point is the one before, virtnbdbackup\.2/);
  // Verify says so too, and passes the set.
  warned.length = 0;
  assert.ok((await verifySet({ input: dir, log })).every((v) => v.ok));
  assert.match(warned.join('\n'), /lists checkpoint virtnbdbackup\.3 but holds no data file of it/);
});

test("only the set's own checkpoint definitions count: another domain's (Python's zip mode shares them) or an earlier chain's are no loss", async (t) => {
  const dir = await craftTwoDiskSet(t, { 'virtnbdbackup.2': ['vda'] });
  const definition = checkpointXml({ name: 'virtnbdbackup.2', parent: 'virtnbdbackup.1', create: true }, ['vda', 'vdb'], ['vda', 'vdb']);
  // Another domain's virtnbdbackup.2, which saved a vdb of its own.
  await craftCheckpointDefinition(dir, 'virtnbdbackup.2', definition, { creationTime: CHAIN_START + 2, uuid: '00000000-1111-2222-3333-444444444444' });
  assert.equal((await plannedFiles({ input: dir })).vdb?.length, 2);
  // This domain's, but from before the chain began (a directory used before).
  await craftCheckpointDefinition(dir, 'virtnbdbackup.2', definition, { creationTime: CHAIN_START - 86_400 });
  assert.equal((await plannedFiles({ input: dir })).vdb?.length, 2);
  // This chain's: vdb was saved there, and its file is missing.
  await craftCheckpointDefinition(dir, 'virtnbdbackup.2', definition, { creationTime: CHAIN_START + 2 });
  await assert.rejects(plannedFiles({ input: dir }), /lacks vdb\.inc\.virtnbdbackup\.2\.data/);
});

test('--until a point whose checkpoint did not save a disk leaves it out without asking for its lost files; the line offers -d a point of that disk', async (t) => {
  const dir = await craftTwoDiskSet(t, { 'virtnbdbackup.2': ['vda'] });
  await lose(dir, 'vdb.inc.virtnbdbackup.1.data');
  // At virtnbdbackup.2 vdb was not saved (detached, -x): the restore leaves it out, so its lost inc is no matter.
  assert.deepEqual(Object.keys(await plannedFiles({ input: dir, until: 'virtnbdbackup.2' })), ['vda']);
  await assert.rejects(plannedFiles({ input: dir, until: 'virtnbdbackup.1' }), /lacks vdb\.inc\.virtnbdbackup\.1\.data: .* --until virtnbdbackup\.0$/);
  // Latest: vdb would come back at its newest, virtnbdbackup.0, where it was at virtnbdbackup.1.
  await assert.rejects(plannedFiles({ input: dir }), /lacks vdb\.inc\.virtnbdbackup\.1\.data: /);

  const skipped = await craftTwoDiskSet(t, { 'virtnbdbackup.1': ['vda'] });
  await lose(skipped, 'vdb.inc.virtnbdbackup.2.data');
  // All disks: the point before the loss, which vdb leaves out; vdb alone: its own newest point.
  await assert.rejects(plannedFiles({ input: skipped }), /lacks vdb\.inc\.virtnbdbackup\.2\.data: .* --until virtnbdbackup\.1 \(disk vdb alone: -d vdb --until virtnbdbackup\.0\)$/);
  await assert.rejects(plannedFiles({ input: skipped, disk: 'vdb' }), /lacks vdb\.inc\.virtnbdbackup\.2\.data: .* --until virtnbdbackup\.0$/);
  assert.deepEqual(Object.keys(await plannedFiles({ input: skipped, disk: 'vdb', until: 'virtnbdbackup.0' })), ['vdb']);
});

test("a file written before its chain's base is another chain's, whatever its names say: refused where it would be read", async (t) => {
  const dir = await craftTwoDiskSet(t);
  // A chain begun anew over the old one's files (Python's zips unzipped into one directory): new fulls and incs 1,
  // the old incs 2 left, the list of the new chain.
  await new Promise((resolve) => setTimeout(resolve, 5));
  const disk = new MemoryDisk(MiB).fill(0x33, 0, 65536);
  const extents = [{ offset: 0, length: 65536, kind: 'data' as const }];
  for (const target of ['vda', 'vdb']) {
    for (const [n, name] of CHECKPOINTS.slice(0, 2).entries()) {
      const file = dataFileName(target, n === 0 ? 'full' : 'inc', name);
      await lose(dir, file);
      await craftStream({ dir, file, disk, diskName: target, extents, checkpointName: name, parentCheckpoint: CHECKPOINTS[n - 1] ?? '', incremental: n > 0 });
    }
  }
  await fs.writeFile(path.join(dir, 'dom.cpt'), JSON.stringify(CHECKPOINTS.slice(0, 2)));
  const line = /broken chain: vda\.inc\.virtnbdbackup\.2\.data was written at \S+, before the chain's base vda\.full\.data \(\S+\): it comes from an earlier chain with the same names .*; move it out of the set, or restore with --until virtnbdbackup\.1$/;
  await assert.rejects(plannedFiles({ input: dir }), line);
  await assert.rejects(plannedFiles({ input: dir, until: 'virtnbdbackup.2' }), line);
  assert.deepEqual(await plannedFiles({ input: dir, until: 'virtnbdbackup.1' }), {
    vda: ['vda.full.data', 'vda.inc.virtnbdbackup.1.data'], vdb: ['vdb.full.data', 'vdb.inc.virtnbdbackup.1.data'],
  });
  assert.match((await verifySet({ input: dir })).find((v) => v.file === 'chain')?.reason ?? '', line);
});

test("a file is dated against its base only where the set's list does not name its checkpoint, and only in one form: Python's local time without a zone, ours UTC", () => {
  const dated = (l: ChainLink, date: string): ChainLink => ({ ...l, meta: { ...l.meta, date } });
  const [full, inc] = chainOf('vda') as [ChainLink, ChainLink];
  const baseOnly = ['virtnbdbackup.0'];
  const remedy = undefined;
  assert.throws(() => checkLinks([dated(full, '2026-11-29T10:00:00.000001'), dated(inc, '2026-11-29T09:59:59.000001')], remedy, baseOnly), /was written at 2026-11-29T09:59:59\.000001, before the chain's base/);
  assert.throws(() => checkLinks([dated(full, '2026-11-29T10:00:00.000Z'), dated(inc, '2026-11-29T09:00:00.000Z')], remedy, baseOnly), /before the chain's base/);
  checkLinks([dated(full, '2026-11-29T10:00:00.000Z'), dated(inc, '2026-11-29T09:00:00.000001')], remedy, baseOnly);
  checkLinks([dated(full, '2026-11-29T10:00:00.000001'), dated(inc, '2026-11-29T10:00:00.000001')], remedy, baseOnly);
  // Listed: this chain's, though the local clock went back (a DST change); no list (map's -f): no dates compared.
  checkLinks([dated(full, '2026-11-29T02:30:00.000001'), dated(inc, '2026-11-29T02:10:00.000001')], remedy, ['virtnbdbackup.0', 'virtnbdbackup.1']);
  checkLinks([dated(full, '2026-11-29T02:30:00.000001'), dated(inc, '2026-11-29T02:10:00.000001')]);
  // A file of ours proves its link by its parent's identity: no dates compared (a clock stepped back).
  const proven = { ...dated(inc, '2026-11-29T09:00:00.000Z'), meta: { ...inc.meta, date: '2026-11-29T09:00:00.000Z', parentCheckpointIdentity: '1800000000 x' } };
  checkLinks([{ ...dated(full, '2026-11-29T10:00:00.000Z'), meta: { ...full.meta, date: '2026-11-29T10:00:00.000Z', checkpointIdentity: '1800000000 x' } }, proven], remedy, baseOnly);
  // A diff names the next checkpoint, which a new chain may have listed: dated all the same. Several are named at once.
  const diff = (chainOf('vda')[2] as ChainLink);
  assert.throws(() => checkLinks([dated(full, '2026-11-29T10:00:00.000001'), dated(diff, '2026-11-29T09:00:00.000001'), dated(chainOf('vda')[3] as ChainLink, '2026-11-29T09:30:00.000001')], remedy, ['virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2']),
    /vda\.diff\.1700000000\.data was written at 2026-11-29T09:00:00\.000001, before the chain's base/);
  assert.throws(() => checkLinks([dated(full, '2026-11-29T10:00:00.000001'), dated(inc, '2026-11-29T09:00:00.000001'), dated(chainOf('vda')[3] as ChainLink, '2026-11-29T09:30:00.000001')], remedy, baseOnly),
    /broken chain: vda\.inc\.virtnbdbackup\.1\.data, vda\.inc\.virtnbdbackup\.2\.data were written before the chain's base vda\.full\.data .* move them out of the set, or restore with --until virtnbdbackup\.0$/);
});

test("a disk's file at a checkpoint whose own definition did not save that disk is another chain's; a point whose definition is not the set's own still asks for lost files", async (t) => {
  // The new chain left vdb out (-x) at every checkpoint; the old chain's vdb files lie beside it.
  const dir = await craftTwoDiskSet(t, { 'virtnbdbackup.0': ['vda'], 'virtnbdbackup.1': ['vda'], 'virtnbdbackup.2': ['vda'] });
  const disk = new MemoryDisk(MiB).fill(0x44, 0, 65536);
  const extents = [{ offset: 0, length: 65536, kind: 'data' as const }];
  await craftStream({ dir, file: 'vdb.full.data', disk, diskName: 'vdb', extents, checkpointName: 'virtnbdbackup.0' });
  await assert.rejects(plannedFiles({ input: dir }), /broken chain: the backup at checkpoint virtnbdbackup\.0 did not save disk vdb \(checkpoints\/virtnbdbackup\.0\.xml\), yet \S+ holds vdb\.full\.data: it comes from another chain with the same names; move the disk's files out of the set, or restore the other disks one by one with -d$/);
  assert.deepEqual(Object.keys(await plannedFiles({ input: dir, disk: 'vda' })), ['vda']);

  // --until a point whose definition is another domain's: vdb's lost files are still asked for.
  const foreign = await craftTwoDiskSet(t);
  await craftCheckpointDefinition(foreign, 'virtnbdbackup.2', checkpointXml({ name: 'virtnbdbackup.2', parent: 'virtnbdbackup.1', create: true }, ['vda'], ['vda']), { creationTime: CHAIN_START + 2, uuid: '00000000-1111-2222-3333-444444444444' });
  await lose(foreign, 'vdb.inc.virtnbdbackup.1.data');
  await lose(foreign, 'vdb.inc.virtnbdbackup.2.data');
  await assert.rejects(plannedFiles({ input: foreign, until: 'virtnbdbackup.2' }), /lacks vdb\.inc\.virtnbdbackup\.1\.data: /);
});

test("verify names a lost file also where the set's files fail for want of a .chksum (Python 1.9.15 writes none)", async (t) => {
  const dir = await craftTwoDiskSet(t);
  for (const name of await fs.readdir(dir)) if (name.endsWith('.chksum')) await fs.rm(path.join(dir, name));
  await lose(dir, 'vdb.inc.virtnbdbackup.2.data');
  const verdicts = await verifySet({ input: dir });
  assert.ok(verdicts.some((v) => !v.ok && v.file === 'vdb.inc.virtnbdbackup.1.data'), 'the files fail for their missing .chksum');
  assert.match(verdicts.find((v) => v.file === 'chain')?.reason ?? '', /lacks vdb\.inc\.virtnbdbackup\.2\.data: /);
});

test('a checkpoint list left behind (zips unzipped with -n keep the first one) is followed by the checkpoints the files name: their points restore, a disk a point left out (-x) included', async (t) => {
  const dir = await craftTwoDiskSet(t, { 'virtnbdbackup.2': ['vda'] });
  await fs.writeFile(path.join(dir, 'dom.cpt'), JSON.stringify(CHECKPOINTS.slice(0, 1)));
  assert.deepEqual(Object.keys(await plannedFiles({ input: dir, until: 'virtnbdbackup.2' })), ['vda']);
  assert.deepEqual(await plannedFiles({ input: dir, until: 'virtnbdbackup.1' }), {
    vda: ['vda.full.data', 'vda.inc.virtnbdbackup.1.data'], vdb: ['vdb.full.data', 'vdb.inc.virtnbdbackup.1.data'],
  });
  assert.equal((await plannedFiles({ input: dir })).vda?.length, 3);
  assert.ok((await verifySet({ input: dir, until: 'virtnbdbackup.2' })).every((v) => v.ok));
  // Past the list, only the files name a point: with its only file lost, it is unknown.
  await lose(dir, 'vda.inc.virtnbdbackup.2.data');
  await fs.writeFile(path.join(dir, 'dom.cpt'), JSON.stringify(CHECKPOINTS.slice(0, 1)));
  await assert.rejects(plannedFiles({ input: dir, until: 'virtnbdbackup.2' }), /checkpoint virtnbdbackup\.2 is not in/);
});

test('a checkpoint list in another order than the files\' chain (their metadata\'s parents) is said to be that, with the order to write into it; it was "a data file is missing"', async (t) => {
  const dir = await craftTwoDiskSet(t);
  const cpt = path.join(dir, 'dom.cpt');
  const said = `${cpt} lists the checkpoints in another order than the data files' chain (each file's metadata names the checkpoint it is based on): vda.inc.virtnbdbackup.2.data is based on virtnbdbackup.1, which vda.inc.virtnbdbackup.1.data makes, but the list has virtnbdbackup.1 after virtnbdbackup.2; the list is damaged: put it back from a copy, or write the chain's order into it, oldest first: ["virtnbdbackup.0","virtnbdbackup.1","virtnbdbackup.2"]`;
  const reversed = new RegExp(`${said.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`);
  await fs.writeFile(cpt, JSON.stringify([...CHECKPOINTS].reverse()));
  await assert.rejects(plannedFiles({ input: dir }), reversed);
  await assert.rejects(plannedFiles({ input: dir, until: 'virtnbdbackup.2' }), reversed);
  await assert.rejects(planRestore({ input: dir, output: path.join(dir, 'out'), sequence: ['vda.full.data', 'vda.inc.virtnbdbackup.1.data'] }), reversed);
  const verdicts = await verifySet({ input: dir });
  assert.deepEqual(verdicts.filter((v) => !v.ok).map((v) => v.file), ['chain']);
  assert.match(verdicts.find((v) => v.file === 'chain')?.reason ?? '', reversed);
  // The first checkpoint after the base out of place.
  await fs.writeFile(cpt, JSON.stringify(['virtnbdbackup.0', 'virtnbdbackup.2', 'virtnbdbackup.1']));
  await assert.rejects(plannedFiles({ input: dir }), reversed);
  // In order, it restores as before.
  await fs.writeFile(cpt, JSON.stringify(CHECKPOINTS));
  assert.equal((await plannedFiles({ input: dir })).vda?.length, 3);
});

test('without saved checkpoint definitions, a disk short of the restore point is restored at its newest file, with a warning that cannot tell left out from lost', async (t) => {
  const dir = await craftTwoDiskSet(t);
  await fs.rm(path.join(dir, CHECKPOINT_DIR), { recursive: true });
  const warned: string[] = [];
  const log = new Logger({ quiet: true, color: false });
  log.warn = (msg: string): void => void warned.push(msg);
  assert.equal((await plannedFiles({ input: dir, log })).vdb?.length, 3);
  assert.deepEqual(warned, []);
  await lose(dir, 'vdb.inc.virtnbdbackup.2.data');
  assert.deepEqual(await plannedFiles({ input: dir, log }), {
    vda: ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.2.data'], vdb: ['vdb.full.data', 'vdb.inc.virtnbdbackup.1.data'],
  });
  assert.deepEqual(warned, ["disk vdb's newest file is vdb.inc.virtnbdbackup.1.data (checkpoint virtnbdbackup.1), before the set's latest point (virtnbdbackup.2), and a restore of that point brings the disk back from there: no saved definition of virtnbdbackup.2 (checkpoints/<name>.xml, of this domain and chain) tells whether those backups left it out or its files were lost"]);
  warned.length = 0;
  assert.deepEqual(Object.keys(await plannedFiles({ input: dir, until: 'virtnbdbackup.1', log })), ['vda', 'vdb']);
  assert.deepEqual(warned, []);
});

test('a diff whose side files are there without it (a lost diff leaves no other trace) is a warning for a restore of the latest point and a failure for verify', async (t) => {
  const dir = await craftTwoDiskSet(t);
  await fs.writeFile(path.join(dir, 'vda.diff.1800000010.data.chksum'), '12345');
  await fs.writeFile(path.join(dir, 'vda.diff.1800000010.data.blake3.json'), '{}');
  const warned: string[] = [];
  const log = new Logger({ quiet: true, color: false });
  log.warn = (msg: string): void => void warned.push(msg);
  assert.equal((await plannedFiles({ input: dir, log })).vda?.length, 3);
  assert.deepEqual(warned, [`${dir} lacks vda.diff.1800000010.data, whose vda.diff.1800000010.data.blake3.json and vda.diff.1800000010.data.chksum are there: that diff, the newest backup of its disk, was lost or removed, and the restore ends before it; put it back, or move them out of the set if the diff was removed on purpose`]);
  warned.length = 0;
  await plannedFiles({ input: dir, disk: 'vdb', log });
  assert.deepEqual(warned, []);
  const verdicts = await verifySet({ input: dir });
  assert.deepEqual(verdicts.filter((v) => !v.ok), [{ file: 'vda.diff.1800000010.data', ok: false, reason: 'missing, while its vda.diff.1800000010.data.blake3.json and vda.diff.1800000010.data.chksum are in the set: the newest diff of its disk, lost, or removed without its side files' }]);
  assert.ok((await verifySet({ input: dir, disk: 'vdb' })).every((v) => v.ok));
  // --until a checkpoint reads no diff after it; nor does a lost inc count here, which the chain tells.
  assert.ok((await verifySet({ input: dir, until: 'virtnbdbackup.2' })).every((v) => v.ok));
  await plannedFiles({ input: dir, until: 'virtnbdbackup.2', log });
  assert.deepEqual(warned, []);
  // A diff older than a file still there was passed by it (pruning old diffs is no loss); so is one without seconds.
  await fs.rm(path.join(dir, 'vda.diff.1800000010.data.chksum'));
  await fs.rm(path.join(dir, 'vda.diff.1800000010.data.blake3.json'));
  await fs.writeFile(path.join(dir, 'vda.diff.1700000000.data.chksum'), '12345');
  await fs.writeFile(path.join(dir, 'vda.diff.mine.data.chksum'), '12345');
  await plannedFiles({ input: dir, log });
  assert.deepEqual(warned, []);
  assert.ok((await verifySet({ input: dir })).every((v) => v.ok));
});

test('diffs after one checkpoint whose names hold no seconds are ordered by their dates, so the latest point restores', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-diffs-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const disk = new MemoryDisk(MiB).fill(0x11, 0, 65536);
  const extents = [{ offset: 0, length: 65536, kind: 'data' as const }];
  await craftStream({ dir, file: 'vda.full.data', disk, diskName: 'vda', extents });
  // b made first, a later: by name a would come first, and the older b after it would undo its changes. Both after
  // the full, which is dated now (fixed dates failed once the clock passed them, as a chain's base newer than its diffs).
  const later = (hours: number): string => new Date(Date.now() + hours * 3600_000).toISOString();
  for (const [file, date] of [['vda.diff.b.data', later(1)], ['vda.diff.a.data', later(2)]] as const) {
    await craftStream({ dir, file, disk, diskName: 'vda', extents, checkpointName: 'virtnbdbackup.1', parentCheckpoint: 'virtnbdbackup.0', incremental: true, date });
  }
  await fs.writeFile(path.join(dir, 'dom.cpt'), JSON.stringify(['virtnbdbackup.0']));
  assert.deepEqual((await plannedFiles({ input: dir })).vda, ['vda.full.data', 'vda.diff.b.data', 'vda.diff.a.data']);
});
