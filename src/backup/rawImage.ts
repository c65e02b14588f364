// Output type raw (-t raw): the disk as a full-size sparse image, data extents written at their offsets and
// zero extents left as holes. Reads and writes overlap within a bounded window. Guarantees: the adler32 it returns
// is that of every byte of the image as written (holes read as zeros), as a set's `.chksum` records for each data file.
import { READ_REQUEST_SIZE, type Endpoint } from '../endpoint/endpoint.js';
import { chunks, type ExtentPlan } from '../extents/plan.js';
import { native } from '../native/addon.js';
import type { PositionalSink } from '../set/target.js';
import { WorkWindow } from '../util/window.js';

const WINDOW_BYTES = 64 * 1024 * 1024;
/** zlib's adler32 modulus. */
const ADLER_BASE = 65521;

/** Writes the image and returns its adler32. */
export async function writeRawImage(
  source: Endpoint, plan: ExtentPlan, sink: PositionalSink, onProgress?: (bytes: number) => void, signal?: AbortSignal,
): Promise<number> {
  const window = new WorkWindow(WINDOW_BYTES);
  const step = Math.min(READ_REQUEST_SIZE, source.maxRequestSize);
  const checksum = new ImageChecksum();
  let sequence = 0;
  try {
    for (const extent of plan.extents) {
      if (extent.kind !== 'data') continue;
      for (const piece of chunks(extent.offset, extent.length, step)) {
        if (signal?.aborted) throw signal.reason ?? new Error('aborted');
        const buffer = Buffer.allocUnsafe(piece.length);
        const position = sequence++;
        const work = readSummed(source, buffer, piece.offset)
          .then((adler32) => {
            checksum.add(position, piece.offset, piece.length, adler32);
            return sink.writeAt(buffer, piece.offset);
          })
          .then(() => onProgress?.(piece.length));
        await window.add(work, piece.length);
      }
    }
    await window.drain();
  } finally {
    await window.settle();
  }
  return checksum.finish(source.size);
}

/** Reads `buffer` at `offset` and returns its adler32, both on worker threads. */
async function readSummed(source: Endpoint, buffer: Buffer, offset: number): Promise<number> {
  if (source.readSummed) return (await source.readSummed(buffer, offset, { adler: true })).adler32;
  await source.read(buffer, offset);
  return (await native().checksumPiece(buffer)).adler32;
}

/**
 * The adler32 of an image from the sums of its data pieces, which complete in any order: they are folded in disk
 * order, with the holes between them as zeros, and at most a window's worth wait for an earlier one.
 */
class ImageChecksum {
  private sum = 1;
  private end = 0;
  private next = 0;
  private readonly waiting = new Map<number, { offset: number; length: number; adler32: number }>();

  add(position: number, offset: number, length: number, adler32: number): void {
    this.waiting.set(position, { offset, length, adler32 });
    for (let piece = this.waiting.get(this.next); piece; piece = this.waiting.get(this.next)) {
      this.waiting.delete(this.next++);
      this.zerosUpTo(piece.offset);
      this.sum = native().adler32Combine(this.sum, piece.adler32, piece.length);
      this.end = piece.offset + piece.length;
    }
  }

  finish(size: number): number {
    if (this.waiting.size > 0) throw new Error(`raw image checksum: ${this.waiting.size} pieces after a missing one`);
    this.zerosUpTo(size);
    return this.sum;
  }

  private zerosUpTo(offset: number): void {
    const length = offset - this.end;
    if (length <= 0) return;
    // adler32 of `length` zero bytes from 1: A stays 1, B adds 1 per byte.
    const zeros = ((length % ADLER_BASE) * 0x10000 + 1) >>> 0;
    this.sum = native().adler32Combine(this.sum, zeros, length);
    this.end = offset;
  }
}
