// Bad input, table-driven, on real sets (plain full -> inc -> inc, and lz4 full -> inc): each case damages a copy of
// the set, runs restore or verify, and expects a non-zero exit, one error line naming the file and what to do, no
// image or .partial left in the output directory, no socket left, and the set untouched by the run.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { TestDomain, run, tempDir } from '../support/testbed.js';
import { errorLines, ourBin, runCli, runOk, type CliResult } from '../support/cli.js';
import { flipByte } from '../support/craftedSet.js';

type SetKind = 'plain' | 'lz4';

interface BadInput {
  name: string;
  set: SetKind;
  /** Damages the copy of the set in `dir`. */
  damage?: (dir: string) => Promise<void>;
  /** virtnbdrestore arguments after -i SET; OUT stands for the output directory. */
  args?: string[];
  /** What stderr (restore) or the FAILED line (verify) must say. */
  expect: RegExp;
  verify?: boolean;
  /** Restore into <out>/a/b, none of which exists: all three must be gone again. */
  nested?: boolean;
}

/** Byte position of the first `data` frame header of `file`. */
async function firstDataHeader(file: string): Promise<number> {
  const at = (await fs.readFile(file)).indexOf('\r\ndata 0', 0, 'latin1');
  assert.ok(at > 0, `no data frame in ${file}`);
  return at + 2;
}

async function truncateBy(file: string, bytes: number): Promise<void> {
  await fs.truncate(file, (await fs.stat(file)).size - bytes);
}

async function writeAt(file: string, offset: number, text: string): Promise<void> {
  const handle = await fs.open(file, 'r+');
  await handle.write(Buffer.from(text, 'latin1'), 0, text.length, offset).finally(() => handle.close());
}

const INC1 = 'vda.inc.virtnbdbackup.1.data';
const INC2 = 'vda.inc.virtnbdbackup.2.data';
const DAMAGED = /the set's file is damaged: check the set with -a verify, or restore an earlier point with --until/;
const MIXED = /broken chain: vda\.inc\.virtnbdbackup\.1\.data is based on another checkpoint virtnbdbackup\.0 \(made \S+Z by run \w+\) than vda\.full\.data holds \(made \S+Z by run \w+\): the files come from two sets with the same names; keep each set's files in a directory of its own/;

/** Copies a data file and its side files from set `from` over those of set `to`. */
async function copySetFile(from: string, to: string, file: string): Promise<void> {
  for (const name of [file, `${file}.chksum`, `${file}.blake3.json`]) await fs.copyFile(path.join(from, name), path.join(to, name));
}

const cases: BadInput[] = [
  { name: 'a data file missing from the chain', set: 'plain', damage: (d) => fs.rm(path.join(d, INC1)),
    expect: /broken chain: vda\.inc\.virtnbdbackup\.2\.data is based on checkpoint virtnbdbackup\.1, .*a data file is missing from the set: put it back, or restore an earlier point with --until/ },
  // A copy makes no checkpoint: incs beside one (directories mixed) were made after another base.
  { name: 'incs beside a copy in place of their full', set: 'plain', damage: (d) => fs.rename(path.join(d, 'vda.full.data'), path.join(d, 'vda.copy.data')),
    expect: /broken chain: vda\.inc\.virtnbdbackup\.1\.data cannot follow vda\.copy\.data: a copy backup makes no checkpoint, so no inc or diff builds on it/ },
  { name: 'a data file missing from the chain (verify)', set: 'plain', verify: true, damage: (d) => fs.rm(path.join(d, INC1)),
    expect: /^FAILED chain: broken chain: vda\.inc\.virtnbdbackup\.2\.data is based on checkpoint virtnbdbackup\.1, .*a data file is missing from the set/ },
  // The lz4 set's chain was made after the plain one's, with the same checkpoint names: its inc over the plain set's
  // was a chain the names alone cannot tell from the real one, and restored into a disk that never was.
  { name: 'an inc of another set with the same name', set: 'plain', damage: (d) => copySetFile(path.join(path.dirname(d), 'lz4'), d, INC1),
    expect: MIXED },
  { name: 'an inc of another set with the same name (verify)', set: 'plain', verify: true, damage: (d) => copySetFile(path.join(path.dirname(d), 'lz4'), d, INC1),
    expect: new RegExp(`^FAILED chain: ${MIXED.source}`) },
  // A leftover that is no data file (its checksum's write failed) concerns the set too: it went unnoticed.
  { name: 'a checksum .partial left in the set', set: 'plain', damage: (d) => fs.rename(path.join(d, `${INC2}.chksum`), path.join(d, `${INC2}.chksum.partial`)),
    expect: /vda\.inc\.virtnbdbackup\.2\.data\.chksum\.partial is left from a failed backup run/ },
  { name: '-d and a --sequence of another disk', set: 'plain', args: ['-d', 'vdb', '--sequence', 'vda.full.data'],
    expect: /-d vdb and --sequence of disk vda contradict each other: give one of them$/ },
  { name: 'a .partial left in the set', set: 'plain', damage: (d) => fs.writeFile(path.join(d, 'vda.inc.virtnbdbackup.3.data.partial'), 'x'),
    expect: /vda\.inc\.virtnbdbackup\.3\.data\.partial is left from a failed backup run; the set is incomplete at that point: restore an earlier checkpoint with --until$/ },
  { name: 'a full\'s .partial left in the set, with --until', set: 'plain', args: ['--until', 'virtnbdbackup.1'], damage: (d) => fs.writeFile(path.join(d, 'vdb.full.data.partial'), 'x'),
    expect: /vdb\.full\.data\.partial is left from a failed backup run; the set is incomplete at that point: move the \.partial file out of the set$/ },
  // Its head no longer says "stream", but it is no raw image (-t raw) either: it ends with a stop frame.
  { name: 'a full whose first bytes are overwritten (restore)', set: 'plain', damage: (d) => writeAt(path.join(d, 'vda.full.data'), 0, 'garbage, not a meta frame header'),
    expect: /vda\.full\.data at byte 0: invalid frame header "garbage, not a meta frame header.*"; the set's file vda\.full\.data is damaged or not a stream/ },
  { name: 'an lz4 full whose first bytes are overwritten (verify)', set: 'lz4', verify: true, damage: (d) => writeAt(path.join(d, 'vda.full.data'), 0, 'garbage, not a meta frame header'),
    expect: /^FAILED vda\.full\.data: .*invalid frame header/ },
  // A FIFO would hold the first read until a writer came, for ever.
  { name: 'a data file that is a FIFO', set: 'plain', damage: async (d) => { await fs.rm(path.join(d, INC2)); await run('mkfifo', [path.join(d, INC2)]); },
    expect: new RegExp(`${INC2.replace(/\./g, '\\.')} is not a regular file; a backup set's data files are files: move it out of the set$`) },
  { name: 'a stream truncated inside its metadata', set: 'plain', damage: (d) => fs.truncate(path.join(d, INC2), 100),
    expect: /vda\.inc\.virtnbdbackup\.2\.data: metadata frame of \d+ bytes runs past the end of the file: damaged or truncated; the set's file vda\.inc\.virtnbdbackup\.2\.data is damaged or not a stream/ },
  { name: 'a stream truncated inside a payload', set: 'plain', damage: async (d) => fs.truncate(path.join(d, INC1), (await firstDataHeader(path.join(d, INC1))) + 4096),
    expect: new RegExp(`${INC1.replace(/\./g, '\\.')}: unexpected end of file at byte \\d+ \\(truncated\\); ${DAMAGED.source}`) },
  { name: 'a stream truncated before its stop frame', set: 'plain', damage: (d) => truncateBy(path.join(d, INC2), 40),
    expect: new RegExp(`${INC2.replace(/\./g, '\\.')} at byte \\d+: stream ends without a stop frame \\(truncated\\); ${DAMAGED.source}`) },
  { name: 'an lz4 stream truncated in its trailer', set: 'lz4', damage: (d) => truncateBy(path.join(d, INC1), 10),
    expect: /vda\.inc\.virtnbdbackup\.1\.data( trailer)?: compressed stream does not end with its comp trailer \(truncated or damaged\).*damaged or not a stream/ },
  { name: 'a flipped byte in a frame header', set: 'plain', damage: async (d) => flipByte(path.join(d, INC1), (await firstDataHeader(path.join(d, INC1))) + 10),
    expect: new RegExp(`${INC1.replace(/\./g, '\\.')} at byte \\d+: invalid frame header .*; ${DAMAGED.source}`) },
  { name: 'a frame header that still parses but points elsewhere', set: 'plain',
    // disk offset 0x2000000 -> 0x2100000: still in order and inside the disk, so only the checksum can tell
    damage: async (d) => writeAt(path.join(d, INC1), (await firstDataHeader(path.join(d, INC1))) + 'data 0000000002'.length, '1'),
    expect: new RegExp(`${INC1.replace(/\./g, '\\.')}: adler32 of the file is \\d+, ${INC1.replace(/\./g, '\\.')}\\.chksum says \\d+; ${DAMAGED.source}`) },
  { name: 'a flipped byte in an uncompressed payload (restore)', set: 'plain', damage: async (d) => flipByte(path.join(d, INC1), (await firstDataHeader(path.join(d, INC1))) + 40 + 1000),
    expect: new RegExp(`adler32 of the file is \\d+, ${INC1.replace(/\./g, '\\.')}\\.chksum says \\d+; ${DAMAGED.source}`) },
  { name: 'a flipped byte in an uncompressed payload (verify)', set: 'plain', verify: true, damage: async (d) => flipByte(path.join(d, INC1), (await firstDataHeader(path.join(d, INC1))) + 40 + 1000),
    expect: new RegExp(`^FAILED ${INC1.replace(/\./g, '\\.')}: extent at disk offset 33554432 \\(2097152 bytes\\): BLAKE3 differs from the recorded one; adler32`) },
  { name: 'a flipped byte in a compressed frame (restore)', set: 'lz4', damage: async (d) => flipByte(path.join(d, INC1), (await firstDataHeader(path.join(d, INC1))) + 40 + 30),
    expect: new RegExp(`${INC1.replace(/\./g, '\\.')}: lz4 frame 0 of the data frame at disk offset 33554432: .*; ${DAMAGED.source}`) },
  { name: 'a flipped byte in a compressed frame (verify)', set: 'lz4', verify: true, damage: async (d) => flipByte(path.join(d, INC1), (await firstDataHeader(path.join(d, INC1))) + 40 + 30),
    expect: new RegExp(`^FAILED ${INC1.replace(/\./g, '\\.')}: lz4 frame 0 of the data frame at disk offset 33554432`) },
  { name: 'a missing checksum (verify)', set: 'plain', verify: true, damage: (d) => fs.rm(path.join(d, `${INC2}.chksum`)),
    expect: new RegExp(`^FAILED ${INC2.replace(/\./g, '\\.')}: no checksum file ${INC2.replace(/\./g, '\\.')}\\.chksum$`) },
  { name: 'a .chksum that holds no checksum is refused before anything is written', set: 'plain', damage: (d) => fs.writeFile(path.join(d, `${INC2}.chksum`), 'not a number'),
    expect: new RegExp(`${INC2.replace(/\./g, '\\.')}\\.chksum holds no decimal checksum in .*; restore its \\.chksum from a copy, or remove it to restore without that check$`) },
  { name: 'a damaged digest file (verify)', set: 'plain', verify: true, damage: (d) => fs.writeFile(path.join(d, `${INC1}.blake3.json`), '{"algorithm":"blake3","pieces":[null]}'),
    expect: new RegExp(`^FAILED ${INC1.replace(/\./g, '\\.')}: ${INC1.replace(/\./g, '\\.')}\\.blake3\\.json is damaged \\(not a blake3 piece list\\), so the data file was not checked against it$`) },
  // Python reads a name as the set's file; a path elsewhere restored that other set's file with this set's name.
  { name: '--sequence naming a file of another directory', set: 'plain', args: ['--sequence', '/var/tmp/vnbdtest-elsewhere/vda.full.data'],
    expect: /\/var\/tmp\/vnbdtest-elsewhere\/vda\.full\.data in --sequence is not in the set .*: --sequence names files of the set given with -i \(a name alone will do\)$/ },
  { name: 'a flipped byte in the full\'s payload: no earlier point to offer', set: 'plain', nested: true, damage: async (d) => flipByte(path.join(d, 'vda.full.data'), (await firstDataHeader(path.join(d, 'vda.full.data'))) + 40 + 1000),
    expect: /vda\.full\.data: adler32 of the file is \d+, .*; the set's file is damaged: check the set with -a verify; it is the base of disk vda's chain, so no point in time of that disk restores from this set; nothing of it was kept$/ },
  { name: '--until naming a checkpoint the set does not have', set: 'plain', args: ['--until', 'virtnbdbackup.9'],
    expect: /checkpoint virtnbdbackup\.9 is not in the chain of disk vda in .* \(it has: virtnbdbackup\.0, virtnbdbackup\.1, virtnbdbackup\.2\); pick one of those with --until/ },
];

describe('bad input: one line, non-zero exit, nothing touched outside the output directory', () => {
  let dom: TestDomain;
  let work: string;
  const sets: Record<SetKind, string> = { plain: '', lz4: '' };

  before(async () => {
    dom = await TestDomain.create({ disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 6 }] }] });
    work = await tempDir('vnbd-corrupt-');
    for (const [kind, extra] of [['plain', []], ['lz4', ['-z']]] as const) {
      sets[kind] = path.join(work, kind);
      await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', sets[kind], '-n', ...extra]);
      await dom.write('vda', 0x22, '32M', '2M');
      await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', sets[kind], '-n', ...extra]);
      await dom.write('vda', 0x33, '40M', '1M');
      if (kind === 'plain') await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', sets[kind], '-n']);
    }
  });
  after(async () => {
    await dom?.destroy();
    if (work) await fs.rm(work, { recursive: true, force: true });
  });

  /** Names, sizes and modification times of everything in `dir`: what "untouched" means. */
  async function fingerprint(dir: string): Promise<string[]> {
    const names = (await fs.readdir(dir, { recursive: true })).sort();
    return Promise.all(names.map(async (n) => {
      const s = await fs.stat(path.join(dir, n));
      return `${n} ${s.size} ${s.mtimeMs}`;
    }));
  }

  async function assertNothingLeft(out: string, socket: string): Promise<void> {
    // Not even the output directory, which a run that failed after making it removes again.
    const left = await fs.readdir(out).catch(() => undefined);
    assert.equal(left, undefined, `output directory left behind, holding: ${left?.join(' ')}`);
    assert.equal(await fs.access(socket).then(() => true, () => false), false, 'socket left behind');
  }

  for (const [i, c] of cases.entries()) {
    test(`${c.verify ? 'verify' : 'restore'}: ${c.name}`, async () => {
      const set = path.join(work, `case${i}`);
      await run('cp', ['-a', sets[c.set], set]);
      await c.damage?.(set);
      const before = await fingerprint(set);
      const top = path.join(work, `out${i}`);
      const out = c.nested ? path.join(top, 'a', 'b') : top;
      const socket = path.join(work, `case${i}.sock`);
      const r: CliResult = c.verify
        ? await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify'])
        : await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-f', socket, ...(c.args ?? [])]);
      assert.equal(r.code, 1, `exit ${r.code}: ${r.stderr}${r.stdout}`);
      if (c.verify) {
        const failed = r.stdout.split('\n').filter((l) => l.startsWith('FAILED'));
        assert.equal(failed.length, 1, r.stdout);
        assert.match(failed[0] as string, c.expect);
      } else {
        assert.equal(errorLines(r).length, 1, r.stderr);
        assert.match(errorLines(r)[0] as string, c.expect);
        await assertNothingLeft(top, socket);
      }
      assert.deepEqual(await fingerprint(set), before, 'the run changed the set');
      await fs.rm(set, { recursive: true, force: true });
    });
  }

  test('a file missing after the restore point: restore and verify --until that point work; verify --until an unknown checkpoint is refused', async () => {
    const set = path.join(work, 'missing-later');
    await run('cp', ['-a', sets.plain, set]);
    await fs.rm(path.join(set, INC1));
    const out = path.join(work, 'out-missing-later');
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '--until', 'virtnbdbackup.0']);
    await runOk(ourBin('virtnbdrestore'), ['-i', sets.plain, '-o', path.join(work, 'out-point-0'), '-n', '--until', 'virtnbdbackup.0']);
    await run('qemu-img', ['compare', '-q', path.join(out, 'vda.qcow2'), path.join(work, 'out-point-0', 'vda.qcow2')]);
    const upTo = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify', '--until', 'virtnbdbackup.0']);
    assert.deepEqual(upTo.stdout.trim().split('\n'), ['OK vda.full.data']);
    const unknown = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify', '--until', 'virtnbdbackup.9']);
    assert.equal(unknown.code, 1, unknown.stderr);
    assert.equal(unknown.stdout, '');
    assert.match(errorLines(unknown).join('\n'), /^virtnbdrestore: error: checkpoint virtnbdbackup\.9 is not in the chain of disk vda in .*; pick one of those with --until$/);
    await fs.rm(set, { recursive: true, force: true });
  });

  test('an inc\'s or its checksum\'s .partial left in a set on read-only storage: --until an earlier point restores, with a warning', async () => {
    const set = path.join(work, 'partial-ro');
    await run('cp', ['-a', sets.plain, set]);
    await fs.writeFile(path.join(set, 'vda.inc.virtnbdbackup.3.data.partial'), 'x');
    await fs.rename(path.join(set, `${INC2}.chksum`), path.join(set, `${INC2}.chksum.partial`));
    const readOnly = path.join(work, 'partial-ro-mount');
    await fs.mkdir(readOnly);
    await run('mount', ['--bind', '-o', 'ro', set, readOnly]);
    try {
      // It said to move the .partial away, which a read-only mount does not allow: no point restored from it.
      const out = path.join(work, 'out-partial-ro');
      const r = await runOk(ourBin('virtnbdrestore'), ['-i', readOnly, '-o', out, '-n', '--until', 'virtnbdbackup.1']);
      assert.match(r.stderr, /warning: vda\.inc\.virtnbdbackup\.2\.data\.chksum\.partial, vda\.inc\.virtnbdbackup\.3\.data\.partial in \S+ are left from a failed backup run: not read/);
      await runOk(ourBin('virtnbdrestore'), ['-i', sets.plain, '-o', path.join(work, 'out-point-1'), '-n', '--until', 'virtnbdbackup.1']);
      await run('qemu-img', ['compare', '-q', path.join(out, 'vda.qcow2'), path.join(work, 'out-point-1', 'vda.qcow2')]);
    } finally {
      await run('umount', [readOnly]);
    }
    await fs.rm(set, { recursive: true, force: true });
  });

  test('restore: an output directory that already holds an image of that name is refused, the image untouched', async () => {
    const out = path.join(work, 'existing');
    await runOk(ourBin('virtnbdrestore'), ['-i', sets.plain, '-o', out, '-n', '--until', 'virtnbdbackup.0']);
    const before = await fingerprint(out);
    const r = await runCli(ourBin('virtnbdrestore'), ['-i', sets.plain, '-o', out, '-n']);
    assert.equal(r.code, 1);
    assert.equal(errorLines(r).length, 1, r.stderr);
    assert.match(r.stderr, /vda\.qcow2 already exists; restore into another directory or move it away \(nothing is overwritten\)/);
    assert.deepEqual(await fingerprint(out), before);
  });

  test('restore and verify: a directory that is not a backup set is refused', async () => {
    const notSet = path.join(work, 'not-a-set');
    await fs.mkdir(notSet, { recursive: true });
    await fs.writeFile(path.join(notSet, 'notes.txt'), 'hello');
    for (const args of [['-o', path.join(work, 'out-not-set'), '-n'], ['-o', 'verify']]) {
      const r = await runCli(ourBin('virtnbdrestore'), ['-i', notSet, ...args]);
      assert.equal(r.code, 1);
      assert.equal(errorLines(r).length, 1, r.stderr);
      assert.match(r.stderr, /not-a-set is not a backup set: it holds no \*\.data files/);
    }
    // A zip of -o - given as the set: a file, said so, with the way to a set.
    const zip = path.join(notSet, 'webvm.full.zip');
    await fs.writeFile(zip, 'PK');
    for (const args of [['-o', path.join(work, 'out-not-set'), '-n'], ['-o', 'verify']]) {
      const r = await runCli(ourBin('virtnbdrestore'), ['-i', zip, ...args]);
      assert.equal(r.code, 1);
      assert.deepEqual(errorLines(r), [`virtnbdrestore: error: ${zip} is a file, not a backup set directory (a zip written with -o -? unzip it into a directory and give that)`]);
    }
    assert.equal(await fs.access(path.join(work, 'out-not-set')).then(() => true, () => false), false);
  });

  test('restore: a damaged checkpoint list (.cpt) is a warning, the chain ordered by the files\' names, and the image is exact', async () => {
    const set = path.join(work, 'bad-cpt');
    await run('cp', ['-a', sets.plain, set]);
    const cpt = (await fs.readdir(set)).find((n) => n.endsWith('.cpt')) as string;
    await fs.writeFile(path.join(set, cpt), '["virtnbdbackup.0", ');
    const r = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'out-bad-cpt'), '-n']);
    assert.ok(r.stderr.includes(`warning: ${path.join(set, cpt)} is damaged (no JSON array of checkpoint names): the chain is ordered by the data files' names`), r.stderr);
    assert.match(r.stderr, /from vda\.full\.data, vda\.inc\.virtnbdbackup\.1\.data, vda\.inc\.virtnbdbackup\.2\.data/);
    await runOk(ourBin('virtnbdrestore'), ['-i', sets.plain, '-o', path.join(work, 'out-good-cpt'), '-n']);
    await run('qemu-img', ['compare', '-q', path.join(work, 'out-bad-cpt', 'vda.qcow2'), path.join(work, 'out-good-cpt', 'vda.qcow2')]);
  });
});
