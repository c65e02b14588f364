// Verify on crafted sets (no libvirt): sound streams pass; a flipped payload byte names its extent, a damaged lz4
// frame, a bent header, truncation, a missing checksum and a .partial leftover each fail with their reason; -d,
// --until and --sequence choose the files.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { verifyDataFile, verifySet } from '../../src/verify/verify.js';
import { isStreamFile } from '../../src/set/backupSet.js';
import { MemoryDisk, craftStream, flipByte } from '../support/craftedSet.js';
import { ourBin, runCli } from '../support/cli.js';

const MiB = 1024 * 1024;

async function craftedDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-verify-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A 32 MiB disk: 12 MiB of data at 8 MiB (three 4 MiB pieces), a zero range, 1 MiB at 24 MiB. */
async function craft(dir: string, file: string, compress: number | false): Promise<string> {
  const disk = new MemoryDisk(32 * MiB).fill(0x11, 8 * MiB, 12 * MiB).fill(0x22, 24 * MiB, MiB);
  disk.bytes.writeUInt32LE(0xdeadbeef, 13 * MiB); // pieces differ, so a moved piece is noticed
  return craftStream({
    dir, file, disk, diskName: 'vda', compress,
    extents: [
      { offset: 8 * MiB, length: 12 * MiB, kind: 'data' }, { offset: 20 * MiB, length: 4 * MiB, kind: 'zero' },
      { offset: 24 * MiB, length: MiB, kind: 'data' },
    ],
  });
}

/** Byte position in `file` of the first occurrence of `text`. */
async function positionOf(file: string, text: string): Promise<number> {
  const at = (await fs.readFile(file)).indexOf(text, 0, 'latin1');
  assert.ok(at >= 0, `${text} not in ${file}`);
  return at;
}

test('sound plain and lz4 streams verify OK; the set is listed once (the chain scan takes verify\'s listing)', async (t) => {
  const dir = await craftedDir(t);
  await craft(dir, 'vda.full.data', false);
  await craft(dir, 'vdb.full.data', 2);
  const readdir = t.mock.method(fs, 'readdir');
  const lines: string[] = [];
  const verdicts = await verifySet({ input: dir, onVerdict: (v) => lines.push(`${v.ok ? 'OK' : 'FAILED'} ${v.file}`) });
  assert.deepEqual(lines, ['OK vda.full.data', 'OK vdb.full.data']);
  assert.ok(verdicts.every((v) => v.ok), JSON.stringify(verdicts));
  assert.equal(readdir.mock.calls.filter((call) => call.arguments[0] === dir).length, 1);
});

test('a flipped byte in an uncompressed payload names the extent that rotted', async (t) => {
  const dir = await craftedDir(t);
  const file = await craft(dir, 'vda.full.data', false);
  const payload = (await positionOf(file, 'data 0000000000800000')) + 40;
  await flipByte(file, payload + 5 * MiB); // in the second 4 MiB piece: disk offset 12 MiB
  const v = await verifyDataFile(file);
  assert.equal(v.ok, false);
  assert.match(v.reason ?? '', /^extent at disk offset 12582912 \(4194304 bytes\): BLAKE3 differs from the recorded one; adler32 of the file is \d+, vda\.full\.data\.chksum says \d+$/);
});

test('a set of an earlier backup with SHA-256 piece digests still verifies, and names the rotted extent', async (t) => {
  const dir = await craftedDir(t);
  const file = await craft(dir, 'vda.full.data', false);
  // Rewrite the BLAKE3 file as the SHA-256 file earlier backups wrote (hashes keyed "sha256").
  const recorded = JSON.parse(await fs.readFile(`${file}.blake3.json`, 'utf8')) as { pieces: Array<{ offset: number; length: number }> };
  const disk = new MemoryDisk(32 * MiB).fill(0x11, 8 * MiB, 12 * MiB).fill(0x22, 24 * MiB, MiB);
  disk.bytes.writeUInt32LE(0xdeadbeef, 13 * MiB);
  const pieces = recorded.pieces.map((p) => ({ offset: p.offset, length: p.length, sha256: createHash('sha256').update(disk.bytes.subarray(p.offset, p.offset + p.length)).digest('hex') }));
  await fs.rm(`${file}.blake3.json`);
  await fs.writeFile(`${file}.sha256.json`, JSON.stringify({ algorithm: 'sha256', pieces }));
  assert.deepEqual(await verifyDataFile(file), { file: 'vda.full.data', ok: true });
  await flipByte(file, (await positionOf(file, 'data 0000000000800000')) + 40 + 5 * MiB);
  assert.match((await verifyDataFile(file)).reason ?? '', /^extent at disk offset 12582912 \(4194304 bytes\): SHA-256 differs from the recorded one/);
});

test('a flipped byte in an lz4 frame fails on its frame checksum', async (t) => {
  const dir = await craftedDir(t);
  const file = await craft(dir, 'vda.full.data', 2);
  await flipByte(file, (await positionOf(file, 'data 0000000001800000')) + 40 + 30);
  const v = await verifyDataFile(file);
  assert.equal(v.ok, false);
  assert.match(v.reason ?? '', /lz4 frame 0 of the data frame at disk offset 25165824/);
});

test('a header that still parses but moved its extent is caught by the recorded pieces and the checksum', async (t) => {
  const dir = await craftedDir(t);
  const file = await craft(dir, 'vda.full.data', false);
  // '8' (0x38) -> '9' (0x39): the last data frame now claims disk offset 25 MiB instead of 24 MiB
  const at = (await positionOf(file, 'data 0000000001800000')) + 'data 00000000018'.length - 1;
  const handle = await fs.open(file, 'r+');
  await handle.write(Buffer.from('9'), 0, 1, at);
  await handle.close();
  const v = await verifyDataFile(file);
  assert.equal(v.ok, false);
  assert.match(v.reason ?? '', /^extent at disk offset 26214400 \(1048576 bytes\): recorded as extent at disk offset 25165824 \(1048576 bytes\); adler32 of the file is \d+, vda\.full\.data\.chksum says \d+$/);
});

test('truncation anywhere fails, naming what is missing', async (t) => {
  const dir = await craftedDir(t);
  const plain = await craft(dir, 'vda.full.data', false);
  const lz4 = await craft(dir, 'vdb.full.data', 2);
  for (const file of [plain, lz4]) {
    const size = (await fs.stat(file)).size;
    for (const keep of [20, 200, Math.floor(size / 2), size - 50, size - 1]) {
      const copy = path.join(dir, `cut-${keep}.${path.basename(file)}`);
      await fs.copyFile(file, copy);
      await fs.truncate(copy, keep);
      const v = await verifyDataFile(copy);
      assert.equal(v.ok, false, `${path.basename(file)} cut at ${keep} passed`);
      assert.match(v.reason ?? '', /truncated|unexpected end|lacks|not terminated|invalid|exceeds|not valid JSON/, `${path.basename(file)} cut at ${keep}: ${v.reason}`);
    }
  }
});

test('a missing checksum file fails; a .partial leftover fails; a raw image is checked by its checksum', async (t) => {
  const dir = await craftedDir(t);
  const file = await craft(dir, 'vda.full.data', false);
  await fs.rm(`${file}.chksum`);
  await fs.writeFile(path.join(dir, 'vdb.inc.virtnbdbackup.1.data.partial'), 'half');
  const raw = path.join(dir, 'vdc.copy.data');
  await fs.writeFile(raw, Buffer.alloc(MiB, 0x5a));
  await fs.writeFile(`${raw}.chksum`, '1'); // wrong on purpose
  const verdicts = await verifySet({ input: dir });
  assert.deepEqual(verdicts.map((v) => [v.file, v.ok]), [['vdb.inc.virtnbdbackup.1.data.partial', false], ['vda.full.data', false], ['vdc.copy.data', false]]);
  assert.match(verdicts[0]?.reason ?? '', /failed backup run/);
  assert.equal(verdicts[1]?.reason, 'no checksum file vda.full.data.chksum');
  assert.match(verdicts[2]?.reason ?? '', /^adler32 of the file is \d+, vdc\.copy\.data\.chksum says 1$/);
  await assert.rejects(verifySet({ input: path.join(dir, 'nothing') }), /cannot read backup set directory/);
  await assert.rejects(verifySet({ input: dir, disk: 'vdz' }), /not a backup set: it holds no \*\.data files of disk vdz/);
});

test('a stream whose first bytes are damaged is still a stream (its end, or a size no disk has), never a raw image', async (t) => {
  const dir = await craftedDir(t);
  const plain = await craft(dir, 'vda.full.data', false);
  const lz4 = await craft(dir, 'vdb.full.data', 2);
  const raw = path.join(dir, 'vdc.copy.data');
  await fs.writeFile(raw, Buffer.alloc(MiB, 0x5a));
  assert.deepEqual(await Promise.all([plain, lz4, raw].map(isStreamFile)), [true, true, false]);
  for (const file of [plain, lz4]) {
    await fs.writeFile(file, 'garbage where the meta frame was', { flag: 'r+' });
    // Cut to a whole number of sectors, ending as a stream does: only its end tells it from a raw image.
    const { size } = await fs.stat(file);
    const tail = (await fs.readFile(file)).subarray(size - 40);
    const sectors = size - (size % 512);
    await fs.truncate(file, sectors);
    const handle = await fs.open(file, 'r+');
    await handle.write(tail, 0, 40, sectors - 40).finally(() => handle.close());
    assert.equal(await isStreamFile(file), true, file);
    assert.match((await verifyDataFile(file)).reason ?? '', /invalid frame header "garbage where the meta frame wa/);
  }
  // A raw image whose size is no whole number of sectors cannot be one.
  await fs.appendFile(raw, 'x');
  assert.equal(await isStreamFile(raw), true);
});

test('an empty data file is the raw image of a disk of 0 bytes where its .chksum says 1 (adler32 of nothing), else a stream cut to nothing', async (t) => {
  const dir = await craftedDir(t);
  const empty = path.join(dir, 'vdd.copy.data');
  await fs.writeFile(empty, '');
  await fs.writeFile(`${empty}.chksum`, '1');
  // It was read as a truncated stream, and a set with a -r copy (or -t raw full) of an empty disk did not restore.
  assert.equal(await isStreamFile(empty), false);
  assert.equal((await verifyDataFile(empty)).ok, true);
  await fs.writeFile(`${empty}.chksum`, '3154117');
  assert.equal(await isStreamFile(empty), true);
  await fs.rm(`${empty}.chksum`);
  assert.equal(await isStreamFile(empty), true);
});

/** vda's full and incs 1 and 2, each holding the first MiB of a 32 MiB disk; returns that disk and its extents. */
async function craftFullAndTwoIncs(dir: string): Promise<{ disk: MemoryDisk; extents: Array<{ offset: number; length: number; kind: 'data' }> }> {
  const disk = new MemoryDisk(32 * MiB).fill(0x11, 0, MiB);
  const extents = [{ offset: 0, length: MiB, kind: 'data' as const }];
  await craftStream({ dir, file: 'vda.full.data', disk, diskName: 'vda', extents, checkpointName: 'virtnbdbackup.0' });
  for (const n of [1, 2]) {
    await craftStream({ dir, file: `vda.inc.virtnbdbackup.${n}.data`, disk, diskName: 'vda', extents, checkpointName: `virtnbdbackup.${n}`, parentCheckpoint: `virtnbdbackup.${n - 1}`, incremental: true });
  }
  return { disk, extents };
}

test('-d takes the files of that disk as restore names them, not every file whose name starts with it', async (t) => {
  const dir = await craftedDir(t);
  await craft(dir, 'vda.full.data', false);
  await craft(dir, 'vda.x.full.data', false);
  await fs.writeFile(path.join(dir, 'vda.x.inc.virtnbdbackup.1.data.partial'), 'half');
  const verdicts = await verifySet({ input: dir, disk: 'vda' });
  assert.deepEqual(verdicts.map((v) => [v.file, v.ok]), [['vda.full.data', true]]);
  const other = await verifySet({ input: dir, disk: 'vda.x' });
  assert.deepEqual(other.map((v) => [v.file, v.ok]), [['vda.x.inc.virtnbdbackup.1.data.partial', false], ['vda.x.full.data', true]]);
});

test('--until checks what a restore at that point reads, raw images (-t raw) included; -d looks at that disk alone', async (t) => {
  const dir = await craftedDir(t);
  const { disk, extents } = await craftFullAndTwoIncs(dir);
  // A raw image with no .chksum fails verify: --until left it out unchecked, and exited 0.
  await fs.writeFile(path.join(dir, 'vdb.full.data'), Buffer.alloc(MiB, 0x5a));
  const upTo1 = await verifySet({ input: dir, until: 'virtnbdbackup.1' });
  assert.deepEqual(upTo1.map((v) => [v.file, v.ok]), [['vda.full.data', true], ['vda.inc.virtnbdbackup.1.data', true], ['vdb.full.data', false]]);
  await assert.rejects(verifySet({ input: dir, until: 'virtnbdbackup.7' }), /checkpoint virtnbdbackup\.7 is not in the chain of disk vda/);
  // Another disk's chain without a base fails that disk's check, not one of vda.
  await craftStream({ dir, file: 'vdc.inc.virtnbdbackup.1.data', disk, diskName: 'vdc', extents, checkpointName: 'virtnbdbackup.1', parentCheckpoint: 'virtnbdbackup.0', incremental: true });
  assert.ok((await verifySet({ input: dir, disk: 'vda' })).every((v) => v.ok));
  const whole = await verifySet({ input: dir });
  assert.match(whole.find((v) => v.file === 'vdb.full.data')?.reason ?? '', /no checksum file/);
  await fs.rm(path.join(dir, 'vdb.full.data'));
  const chain = (await verifySet({ input: dir })).filter((v) => !v.ok);
  assert.deepEqual(chain.map((v) => v.file), ['chain']);
  assert.match(chain[0]?.reason ?? '', /no full or copy backup of disk vdc/);
});

test('--sequence (-s) checks those files alone, as Python\'s verify does, linked as restore -s needs them', async (t) => {
  const dir = await craftedDir(t);
  const { disk, extents } = await craftFullAndTwoIncs(dir);
  // Damage outside the sequence, in this disk's newest file and another disk's: no concern of it (all were checked).
  await flipByte(path.join(dir, 'vda.inc.virtnbdbackup.2.data'), 1000);
  await craft(dir, 'vdb.full.data', false);
  await fs.truncate(path.join(dir, 'vdb.full.data'), 100);
  const verdicts = async (sequence: string[]): Promise<string[]> => (await verifySet({ input: dir, sequence })).map((v) => `${v.ok ? 'OK' : 'FAILED'} ${v.file}`);
  assert.deepEqual(await verdicts(['vda.full.data', 'vda.inc.virtnbdbackup.1.data']), ['OK vda.full.data', 'OK vda.inc.virtnbdbackup.1.data']);
  // A gap fails as restore -s refuses it.
  const gap = await verifySet({ input: dir, sequence: ['vda.full.data', 'vda.inc.virtnbdbackup.2.data'] });
  assert.deepEqual(gap.map((v) => [v.file, v.ok]), [['vda.full.data', true], ['vda.inc.virtnbdbackup.2.data', false], ['chain', false]]);
  assert.match(gap[2]?.reason ?? '', /--sequence has a gap before vda\.inc\.virtnbdbackup\.2\.data: it needs vda\.inc\.virtnbdbackup\.1\.data first/);
  assert.deepEqual(await verdicts(['vda.full.data', 'vda.gone.data']), ['OK vda.full.data', 'FAILED chain']);
  await assert.rejects(verifySet({ input: dir, sequence: ['vda.full.data'], until: 'virtnbdbackup.0' }), /--sequence and --until both choose the files to check/);
  // The command passes -s on (it checked every file of the set, and failed for the damage outside the sequence).
  const cli = await runCli(ourBin('virtnbdrestore'), ['-i', dir, '-o', 'verify', '-s', 'vda.full.data,vda.inc.virtnbdbackup.1.data']);
  assert.deepEqual([cli.code, cli.stdout], [0, 'OK vda.full.data\nOK vda.inc.virtnbdbackup.1.data\n'], cli.stderr);
});

test('a stop signal during verify ends it with the signal, naming no file FAILED', async (t) => {
  const dir = await craftedDir(t);
  await craft(dir, 'vda.full.data', false);
  await craft(dir, 'vdb.full.data', 2);
  const controller = new AbortController();
  const reason = new Error('interrupted by SIGINT; cleaned up');
  const verdicts: string[] = [];
  // Stopped as the first file's first piece is read: neither that file nor the next is a verdict.
  const aborting = new Promise<void>((resolve) => setImmediate(() => { controller.abort(reason); resolve(); }));
  await assert.rejects(verifySet({ input: dir, signal: controller.signal, onVerdict: (v) => verdicts.push(`${v.ok ? 'OK' : 'FAILED'} ${v.file}`) }), reason);
  await aborting;
  assert.deepEqual(verdicts.filter((v) => v.startsWith('FAILED')), []);
  // Stopped before it began: nothing at all.
  await assert.rejects(verifySet({ input: dir, signal: AbortSignal.abort(reason) }), reason);
});
