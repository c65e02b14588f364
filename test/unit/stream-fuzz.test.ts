// Damaged streams, made by seeded random mutation of valid ones (plain and lz4): the reader (restore, dump,
// verify), the map's index and its chain endpoint must each either read the file or fail with a StreamFormatError
// or UserError, never another error, a hang or a buffer sized by a damaged length. verify must return a verdict.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { CONTEXT_ALLOCATION } from '../../src/endpoint/endpoint.js';
import { ChainEndpoint } from '../../src/map/chainEndpoint.js';
import { indexStream } from '../../src/map/streamIndex.js';
import { StreamFormatError } from '../../src/stream/format.js';
import { StreamReader } from '../../src/stream/reader.js';
import { UserError } from '../../src/util/errors.js';
import { verifyDataFile } from '../../src/verify/verify.js';
import { MemoryDisk, craftStream } from '../support/craftedSet.js';
import { damageOnce, seeded } from '../support/fuzz.js';

const MiB = 1024 * 1024;
const ROUNDS = 800;
/** A mutation taking longer than this is a hang. */
const HANG_MS = 20_000;

/** One mutation of `original`, aimed mostly at frame headers, the metadata and the trailer; and what it was. */
function mutate(original: Buffer, pick: (n: number) => number): [Buffer, string] {
  const hot = (): number => {
    const zone = pick(4);
    if (zone === 0) return pick(Math.min(600, original.length));
    if (zone === 1) return original.length - 1 - pick(Math.min(4000, original.length));
    return pick(original.length);
  };
  switch (pick(3)) {
    case 0: {
      // A character a header could hold: the damage that still looks like a header.
      const bytes = Buffer.from(original);
      const at = hot();
      const chars = '0123456789abcdefABCDEF: x-';
      bytes[at] = chars.charCodeAt(pick(chars.length));
      return [bytes, `character at ${at}`];
    }
    case 1: {
      // A number near the end (the trailer's lz4 frame sizes, the last headers) replaced by an odd one.
      const from = Math.max(0, original.length - 400);
      const numbers = [...original.subarray(from).toString('latin1').matchAll(/\d+/g)];
      const number = numbers[pick(numbers.length)];
      if (!number || number.index === undefined) return [original, 'unchanged'];
      const odd = ['-1', '0', '1.5', '1e300', String(2 ** 40), String(2 ** 31), '7', '99999999999999999999', 'null'][pick(9)] as string;
      const at = from + number.index;
      return [Buffer.concat([original.subarray(0, at), Buffer.from(odd), original.subarray(at + number[0].length)]), `${number[0]} at ${at} made ${odd}`];
    }
    default:
      return damageOnce(original, pick, hot());
  }
}

async function readAll(file: string): Promise<void> {
  const reader = await StreamReader.open(file, { checksum: true });
  try {
    for await (const record of reader.records()) {
      if (record.kind === 'data') {
        await record.data;
        record.release();
      }
    }
  } finally {
    await reader.close();
  }
}

async function mapAll(file: string): Promise<void> {
  const chain = await ChainEndpoint.open([file]);
  try {
    const whole = Buffer.alloc(chain.size);
    await chain.read(whole, 0);
    for await (const extent of chain.extents(CONTEXT_ALLOCATION, 0, chain.size)) assert.ok(extent.length > 0);
  } finally {
    await chain.close();
  }
}

test('damaged streams: every reader reads them or fails with a format error, never another error or a hang', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-fuzz-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const disk = new MemoryDisk(12 * MiB).fill(0x11, 2 * MiB, 4 * MiB).fill(0x22, 9 * MiB, 4096);
  for (let at = 0; at < 2 * MiB; at += 4096) disk.fill(at / 4096, at, 4096);
  const extents = [
    { offset: 0, length: 6 * MiB, kind: 'data' as const },
    { offset: 6 * MiB, length: 3 * MiB, kind: 'zero' as const },
    { offset: 9 * MiB, length: 4096, kind: 'data' as const },
  ];
  const originals = await Promise.all([false, 2].map(async (compress) => fs.readFile(await craftStream({
    dir, file: `vda.${compress ? 'lz4' : 'plain'}.full.data`, disk, extents, diskName: 'vda', compress: compress as number | false,
  }))));
  const seed = 20261128;
  const pick = seeded(seed);
  const unexpected: string[] = [];
  let failed = 0;
  for (let round = 0; round < ROUNDS; round++) {
    const original = originals[pick(originals.length)] as Buffer;
    const [damaged, what] = mutate(original, pick);
    const file = path.join(dir, 'vda.full.data');
    await fs.writeFile(file, damaged);
    const readers: Array<[string, () => Promise<unknown>]> = [
      ['reader', () => readAll(file)],
      ['index', () => indexStream(file, 0)],
      ['map', () => mapAll(file)],
      ['verify', () => verifyDataFile(file)],
    ];
    for (const [name, read] of readers) {
      let timer: NodeJS.Timeout | undefined;
      const hang = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no end within ${HANG_MS} ms`)), HANG_MS);
      });
      try {
        await Promise.race([read(), hang]);
      } catch (err) {
        failed++;
        if (name === 'verify' || !(err instanceof StreamFormatError || err instanceof UserError)) {
          unexpected.push(`seed ${seed} round ${round} (${what}), ${name}: ${(err as Error).name}: ${(err as Error).message}`);
        }
      } finally {
        clearTimeout(timer);
      }
    }
    await fs.rm(file);
  }
  assert.deepEqual(unexpected, []);
  assert.ok(failed > ROUNDS, `only ${failed} of ${ROUNDS * 3} reads failed: the mutations miss the structure`);
});
