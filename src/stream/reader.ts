// Reads a stream file frame by frame for restore, dump, verify and map. Compressed payloads are decompressed
// ahead on worker threads; payload buffers are pooled, and a record's release() lends its buffer out again once the
// sums and the decompression are done with it too. Guarantees: every header, terminator, payload length, the stop
// frame, the trailer and dataSize are checked; the first inconsistency throws a StreamFormatError naming the file
// and byte offset, so a truncated or corrupt stream never restores silently. With `checksum`, records() also
// computes the adler32 of every byte of the file (the `.chksum` value) in the same single pass.
import fs from 'node:fs/promises';
import { native } from '../native/addon.js';
import { leasePool, type BufferPool } from '../util/bufferPool.js';
import { ReadAhead, readInto } from '../util/fileIo.js';
import { describeReadFailure } from '../util/errors.js';
import {
  PAYLOAD_PIECE_SIZE, FRAME_HEADER_LENGTH, TERMINATOR, FrameSequence, StreamFormatError, type FaultReporter, frameSizes, parseHeader, parseMetadata, parseTrailer,
  trailerOffset, undecompressable, type FrameHeader, type StreamMetadata, type TrailerEntry,
} from './format.js';

/** What a stream holds, in order: data at an offset, or a range that reads as zero. */
export type StreamRecord =
  | {
    kind: 'data'; offset: number; length: number; data: Promise<Buffer>;
    /** The consumer is done with `data`: its buffer may be reused. Optional; later calls do nothing. */
    release(): void;
  }
  | { kind: 'zero'; offset: number; length: number };

/**
 * A pooled buffer that goes back to its pool once every holder has let go: the consumer of a record, the worker
 * summing it, the decompression reading it. Reused buffers spare a page fault per page and V8's collections.
 */
class Lease {
  private holders = 1;
  constructor(private readonly pool: BufferPool, readonly buffer: Buffer) {}

  hold(): void {
    this.holders++;
  }

  drop(): void {
    if (--this.holders === 0) this.pool.release(this.buffer);
  }

  /** The first holder's drop as a record's release(): a second call does nothing. */
  releaser(): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.drop();
    };
  }
}

/** Payload buffers kept for reuse: what a restore's window holds in flight, and some. */
const POOLED_BUFFERS = 24;

/** A meta frame's JSON is a few hundred bytes; a length above this is damage. */
const MAX_METADATA_LENGTH = 64 * 1024;

/** Reads at least this long are summed on a worker thread, smaller ones inline. */
const THREADED_SUM = 256 * 1024;
/** Most threaded sums outstanding before a read waits for the oldest. */
const SUMS_AHEAD = 16;

/** The adler32 of one read, in file order; `sum` is set once its worker is done. */
interface PendingSum {
  length: number;
  sum?: number;
  done: Promise<unknown>;
}

export interface StreamReaderOptions {
  /** Compute the adler32 of the whole file while records() reads it (see `checksum`). */
  checksum?: boolean;
}

export class StreamReader {
  private position = 0;
  /** Running adler32 of the bytes read so far in file order, when checksumming. */
  private running: number | undefined;
  /** Sums of reads still on worker threads, oldest first; folded into `running` in order. */
  private pending: PendingSum[] = [];
  private complete = false;
  /** Slabs fit a payload piece, and the lz4 frame of one; shared with the process's other readers (leasePool). */
  private readonly lease = leasePool(native().lz4FrameBound(PAYLOAD_PIECE_SIZE), POOLED_BUFFERS);
  private readonly pool = this.lease.pool;
  /** Cold sets: the kernel reads ahead of the payloads (fileIo.ts). */
  private readonly ahead: ReadAhead;

  private constructor(
    readonly path: string,
    private readonly handle: fs.FileHandle,
    readonly fileSize: number,
    readonly meta: StreamMetadata,
    /** Offset of the first frame after the meta frame. */
    readonly bodyStart: number,
    readonly trailer: TrailerEntry[] | null,
    /** Where the stop frame must end (start of trailer JSON, or end of file). */
    readonly bodyEnd: number,
    /** adler32 of the bytes before the body (meta frame), or undefined when not checksumming. */
    private readonly headChecksum: number | undefined,
  ) {
    this.ahead = new ReadAhead(handle);
  }

  /** Opens `file` and reads its meta frame (and trailer, if compressed). */
  static async open(file: string, options: StreamReaderOptions = {}): Promise<StreamReader> {
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(file, 'r');
    } catch (err) {
      // The cause keeps the errno: a file that cannot be opened (permissions) is not a damaged one.
      throw new StreamFormatError(`${file}: cannot open (${describeReadFailure(err)})`, { cause: err });
    }
    try {
      const { size } = await handle.stat();
      const headerBytes = await readExactly(handle, 0, FRAME_HEADER_LENGTH, file);
      const header = parseHeader(headerBytes, `${file} at byte 0`);
      if (header.kind !== 'meta') throw new StreamFormatError(`${file}: not a backup stream (first frame is ${header.kind}, not meta)`);
      // Read before anything checks it: a damaged length must not become a read (and a buffer) of gigabytes.
      if (header.length > Math.min(MAX_METADATA_LENGTH, size - FRAME_HEADER_LENGTH - TERMINATOR.length)) {
        throw new StreamFormatError(`${file}: metadata frame of ${header.length} bytes ${header.length > MAX_METADATA_LENGTH ? `(at most ${MAX_METADATA_LENGTH} are written)` : 'runs past the end of the file'}: damaged or truncated`);
      }
      const json = await readExactly(handle, FRAME_HEADER_LENGTH, header.length, file);
      const meta = parseMetadata(json, file);
      const afterMeta = FRAME_HEADER_LENGTH + header.length;
      const term = await readExactly(handle, afterMeta, TERMINATOR.length, file);
      if (!term.equals(TERMINATOR)) throw new StreamFormatError(`${file}: metadata not terminated by CRLF`);
      let trailer: TrailerEntry[] | null = null;
      let bodyEnd = size;
      if (meta.compressed !== false) {
        const last = await readExactly(handle, size - FRAME_HEADER_LENGTH, FRAME_HEADER_LENGTH, file);
        const comp = (() => {
          try {
            return parseHeader(last, `${file} trailer`);
          } catch {
            return undefined;
          }
        })();
        if (comp?.kind !== 'comp') throw new StreamFormatError(`${file}: compressed stream does not end with its comp trailer (truncated or damaged)`);
        const at = trailerOffset(size, comp.length);
        if (at < afterMeta) throw new StreamFormatError(`${file}: trailer length ${comp.length} exceeds the file`);
        trailer = parseTrailer(await readExactly(handle, at, comp.length, file), file);
        bodyEnd = at;
      }
      const headChecksum = options.checksum ? [headerBytes, json, term].reduce((sum, b) => native().adler32(b, sum), 1) : undefined;
      return new StreamReader(file, handle, size, meta, afterMeta + TERMINATOR.length, trailer, bodyEnd, headChecksum);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Just the metadata of `file`. */
  static async metadata(file: string): Promise<StreamMetadata> {
    const reader = await StreamReader.open(file);
    await reader.close();
    return reader.meta;
  }

  private fail(message: string): never {
    throw new StreamFormatError(`${this.path} at byte ${this.position}: ${message}`);
  }

  private async read(length: number): Promise<Buffer> {
    const data = await readExactly(this.handle, this.position, length, this.path);
    this.position += length;
    if (this.running !== undefined) await this.sum(data);
    return data;
  }

  /** A payload read into a pooled buffer, held for the caller (and by its sum's worker until that is done). */
  private async readLease(length: number): Promise<Lease> {
    this.ahead.at(this.position, this.bodyEnd);
    const lease = new Lease(this.pool, await fillExactly(this.handle, this.position, this.pool.acquire(length), this.path));
    this.position += length;
    if (this.running !== undefined) await this.sum(lease);
    return lease;
  }

  /**
   * Adds the bytes read to the running adler32: large reads on a worker thread (restore reads at disk speed), which
   * holds a leased buffer till it is done.
   */
  private async sum(read: Buffer | Lease): Promise<void> {
    const addon = native();
    const lease = read instanceof Lease ? read : undefined;
    const data = lease ? lease.buffer : read as Buffer;
    if (data.length < THREADED_SUM && this.pending.length === 0) {
      this.running = addon.adler32(data, this.running as number);
      return;
    }
    const entry: PendingSum = { length: data.length, done: Promise.resolve() };
    if (data.length < THREADED_SUM) entry.sum = addon.adler32(data, 1);
    else {
      lease?.hold();
      entry.done = addon.checksumPiece(data).then((s) => { entry.sum = s.adler32; }).finally(() => lease?.drop());
    }
    this.pending.push(entry);
    this.foldSettled();
    if (this.pending.length > SUMS_AHEAD) {
      await this.pending[0]!.done;
      this.foldSettled();
    }
  }

  private foldSettled(): void {
    const addon = native();
    while (this.pending.length > 0 && this.pending[0]!.sum !== undefined) {
      const head = this.pending.shift()!;
      this.running = addon.adler32Combine(this.running as number, head.sum as number, head.length);
    }
  }

  private async settleSums(): Promise<void> {
    await Promise.all(this.pending.map((p) => p.done));
    this.foldSettled();
  }

  /** adler32 of every byte of the file, once records() has run to its end with `checksum` set; else undefined. */
  get checksum(): number | undefined {
    return this.complete ? this.running : undefined;
  }

  private async header(): Promise<FrameHeader> {
    if (this.position + FRAME_HEADER_LENGTH > this.bodyEnd) this.fail('stream ends without a stop frame (truncated)');
    const where = `${this.path} at byte ${this.position}`;
    const header = parseHeader(await this.read(FRAME_HEADER_LENGTH), where);
    return header;
  }

  private async terminator(): Promise<void> {
    const term = await this.read(TERMINATOR.length);
    if (!term.equals(TERMINATOR)) this.fail('payload not followed by CRLF (corrupt or wrong length)');
  }

  /**
   * Every data and zero record in order. Data records carry a promise of the bytes (decompression runs
   * ahead), so a consumer can keep several in flight. Ends after validating stop, trailer and dataSize.
   */
  async *records(): AsyncGenerator<StreamRecord> {
    this.position = this.bodyStart;
    this.running = this.headChecksum;
    this.pending = [];
    this.complete = false;
    const addon = native();
    const frames = new FrameSequence(this.meta, this.trailer);
    const fail: FaultReporter = (message) => this.fail(message);
    for (;;) {
      const frame = await this.header();
      if (frame.kind === 'stop') break;
      const entry = frames.next(frame, fail);
      if (frame.kind === 'zero') {
        yield { kind: 'zero', offset: frame.start, length: frame.length };
        continue;
      }
      if (entry !== undefined) {
        let offset = frame.start;
        for (const [i, size] of frameSizes(entry).entries()) {
          frames.lz4FrameFits(this.position, size, this.bodyEnd, fail);
          const input = await this.readLease(size);
          const where = `${this.path}: lz4 frame ${i} of the data frame at disk offset ${frame.start}`;
          const declared = lz4ContentSize(input.buffer);
          // Into a pooled buffer when the header's size fits one; a larger (or untrusted huge) size, or none, takes
          // the path that grows its output as the frame proves its size.
          const pooled = declared !== undefined && declared <= this.pool.slabSize;
          const output = pooled ? new Lease(this.pool, this.pool.acquire(declared)) : undefined;
          const decompressed = output
            ? addon.lz4DecompressInto(input.buffer, output.buffer).then((n) => output.buffer.subarray(0, n))
            : addon.lz4DecompressFrame(input.buffer);
          const data = decompressed.catch((err: Error) => {
            throw new StreamFormatError(`${where}: ${undecompressable(err)}`);
          });
          data.then(() => input.drop(), () => input.drop());
          const length = declared ?? (await data).length;
          frames.lz4FrameEnds(frame, offset + length, fail);
          yield { kind: 'data', offset, length, data: data.then((d) => checkLength(d, length, where)), release: output?.releaser() ?? (() => undefined) };
          offset += length;
        }
        frames.lz4FramesDone(frame, offset, fail);
      } else {
        for (let done = 0; done < frame.length;) {
          const step = Math.min(PAYLOAD_PIECE_SIZE, frame.length - done);
          const lease = await this.readLease(step);
          yield { kind: 'data', offset: frame.start + done, length: step, data: Promise.resolve(lease.buffer), release: lease.releaser() };
          done += step;
        }
      }
      await this.terminator();
    }
    frames.end(this.position, this.bodyEnd, fail);
    if (this.running !== undefined && this.fileSize > this.bodyEnd) await this.read(this.fileSize - this.bodyEnd);
    await this.settleSums();
    this.complete = true;
  }

  async close(): Promise<void> {
    this.lease.end();
    await this.handle.close().catch(() => undefined);
  }
}

/** Bytes of an lz4 frame header that hold its content size (magic, FLG, BD, 8-byte size, header checksum). */
export const LZ4_HEADER_BYTES = 15;

/** The content size an lz4 frame header declares (both writers store it), or undefined. */
export function lz4ContentSize(frame: Buffer): number | undefined {
  if (frame.length < LZ4_HEADER_BYTES || frame.readUInt32LE(0) !== 0x184d2204) return undefined;
  const flags = frame[4] as number;
  if (!(flags & 0x08)) return undefined;
  return Number(frame.readBigUInt64LE(6));
}

function checkLength(data: Buffer, expected: number, where: string): Buffer {
  if (data.length !== expected) throw new StreamFormatError(`${where}: decompressed to ${data.length} bytes, header says ${expected}`);
  return data;
}

export async function readExactly(handle: fs.FileHandle, position: number, length: number, file: string): Promise<Buffer> {
  return fillExactly(handle, position, Buffer.allocUnsafe(length), file);
}

/** Fills all of `buffer` from `position`; a file that ends first is a truncated stream. */
async function fillExactly(handle: fs.FileHandle, position: number, buffer: Buffer, file: string): Promise<Buffer> {
  const got = await readInto(handle, buffer, position);
  if (got < buffer.length) throw new StreamFormatError(`${file}: unexpected end of file at byte ${position + got} (truncated)`);
  return buffer;
}
