// The stream writer's memory bound: one stream reads ahead within its window, and streams written at once (the
// disks of a run) share one window's worth of bytes between them rather than holding a window each.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Endpoint, StatusExtent } from '../../src/endpoint/endpoint.js';
import type { Sink } from '../../src/set/target.js';
import { PAYLOAD_PIECE_SIZE } from '../../src/stream/format.js';
import { writeStream } from '../../src/stream/writer.js';

const MiB = 1024 * 1024;
const DISK = 64 * MiB;
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Source bytes read or being read and not yet written, over all streams; and the highest it reached. */
const held = { now: 0, peak: 0 };

/** A disk of ones whose reads take a while, so that the writer's window fills. */
class SlowDisk implements Endpoint {
  readonly size = DISK;
  readonly maxRequestSize = 32 * MiB;
  readonly parallelism = 4;
  async read(buffer: Buffer, _offset: number): Promise<void> {
    held.now += buffer.length;
    held.peak = Math.max(held.peak, held.now);
    await sleep(2);
    buffer.fill(1);
  }
  async write(): Promise<void> { throw new Error('read-only'); }
  async zero(): Promise<void> { throw new Error('read-only'); }
  async flush(): Promise<void> {}
  async *extents(): AsyncIterable<StatusExtent> { yield { offset: 0, length: DISK, flags: 0 }; }
  async close(): Promise<void> {}
}

/** A sink whose writes take a while; payload pieces leave `held` once written. */
function slowSink(): Sink {
  return {
    write: async (buffers) => {
      await sleep(5);
      for (const buffer of buffers) if (buffer.length >= MiB) held.now -= buffer.length;
    },
    commit: async () => undefined,
    abort: async () => undefined,
  };
}

async function writeOne(): Promise<void> {
  await writeStream({
    source: new SlowDisk(), plan: { extents: [{ offset: 0, length: DISK, kind: 'data' }], dataSize: DISK },
    sink: slowSink(), compress: false,
    meta: {
      date: '2026-01-01T00:00:00', diskName: 'vda', diskFormat: 'qcow2', checkpointName: 'virtnbdbackup.0',
      parentCheckpoint: '', incremental: false,
    },
  });
}

test('one stream reads ahead within its window', async () => {
  held.now = 0;
  held.peak = 0;
  await writeOne();
  assert.equal(held.now, 0);
  // Its window (12 MiB for a source without readSummed) and the piece being added: well past one piece, and bounded.
  assert.ok(held.peak > 2 * PAYLOAD_PIECE_SIZE, `peak ${held.peak / MiB} MiB`);
  assert.ok(held.peak <= 16 * MiB + 2 * PAYLOAD_PIECE_SIZE, `peak ${held.peak / MiB} MiB`);
});

test('four streams at once share one window', async () => {
  held.now = 0;
  held.peak = 0;
  await Promise.all([writeOne(), writeOne(), writeOne(), writeOne()]);
  assert.equal(held.now, 0);
  // A share of 4 MiB each, and each stream's piece being added: a window each would have held up to 80 MiB.
  assert.ok(held.peak <= 4 * 2 * PAYLOAD_PIECE_SIZE, `peak ${held.peak / MiB} MiB`);
});
