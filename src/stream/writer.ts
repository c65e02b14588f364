// Writes one disk's stream: meta frame, a data or zero frame per planned extent, stop, and the lz4 trailer.
// Reads (and compression) run ahead in a bounded window, many requests in flight, while output order stays
// exact; headers go out in the same writev as the payload after them. Memory is bounded by the window, not by
// the disk. Guarantees: the adler32 returned covers every byte handed to the sink, in order.
import { native } from '../native/addon.js';
import { READ_REQUEST_SIZE, type Endpoint } from '../endpoint/endpoint.js';
import { chunks, type ExtentPlan } from '../extents/plan.js';
import type { Sink } from '../set/target.js';
import { leasePool } from '../util/bufferPool.js';
import { traced } from '../util/stageTrace.js';
import { DigestList } from './digestList.js';
import {
  DEFAULT_MAX_REQUEST_SIZE, PAYLOAD_PIECE_SIZE, TERMINATOR, encodeEnd, encodeHeader, encodeMetadata,
  type StreamMetadata, type TrailerEntry,
} from './format.js';

export interface StreamWriteOptions {
  source: Endpoint;
  plan: ExtentPlan;
  sink: Sink;
  /** Metadata without the sizes, which come from the plan and the source. */
  meta: Omit<StreamMetadata, 'virtualSize' | 'dataSize' | 'compressed' | 'compressionMethod' | 'streamVersion'>;
  /** lz4 level, or false for an uncompressed stream. */
  compress: number | false;
  /** Progress callback with the number of source bytes just stored. */
  onProgress?: (bytes: number) => void;
  /** Compute a PIECE_DIGEST of every data piece (disk bytes, before compression), on worker threads. */
  digests?: boolean;
  /**
   * Streams the caller writes at the same time, this one included (default 1): they share one window from the
   * start, before the others have begun.
   */
  streamsAtOnce?: number;
  /**
   * The sink keeps copies of what it is given until its output takes them (a zip): a compressed stream then keeps
   * the narrower window, since the wider one copied a zip of system files no sooner (5.7 to 5.9 s against 5.7 to
   * 6.1 s) at 199 to 203 MB against 176 to 181 MB.
   */
  sinkCopies?: boolean;
  signal?: AbortSignal;
}

/** Strong hashes of payload pieces: BLAKE3 for new backups (several times faster than SHA-256 here); SHA-256 in earlier ones. */
export type DigestAlgorithm = 'blake3' | 'sha256';
export const PIECE_DIGEST = 'blake3' satisfies DigestAlgorithm;

/** PIECE_DIGEST (hex) of the disk bytes [offset, offset+length) as stored in one payload piece. */
export interface PieceDigest {
  offset: number;
  length: number;
  digest: string;
}

export interface StreamWriteResult {
  /** adler32 of the whole file as written. */
  checksum: number;
  bytesWritten: number;
  dataSize: number;
  /** With `digests`: one per payload piece, in stream order. */
  digests?: DigestList;
}

/**
 * Bytes of source data in flight at most (reads issued but not yet written). Measured with direct-I/O data files:
 * 1 MiB reads in a 12 MiB window beat 4 MiB reads in 16 or 32 MiB (2.5 s against 3.3 s for 2.5 GiB): more
 * requests in flight, fewer bytes waiting; READ_REQUEST_SIZE has since gone down to 256 KiB. Pieces read whole on
 * one connection each (readSummed) get one piece more: 16 MiB ran 2.35 to 2.45 s where 12 MiB ran 2.2 to 2.9 s.
 */
const WINDOW_BYTES = 12 * 1024 * 1024;
const SUMMED_WINDOW_BYTES = 16 * 1024 * 1024;
/**
 * A compressed stream written alone: lz4 keeps both cores busy only with pieces queued for it. On 2.5 GiB of
 * system files, ours' copy alone (alternately, 7 rounds): 24 MiB 4.19 to 4.45 s and 1.90 to 1.91 cores busy,
 * 32 MiB 4.21 to 4.38 s, 16 MiB 4.35 to 4.66 s and 1.82 to 1.85 cores; the CLI's -z (5 rounds): 4.53 to 4.99 s
 * and 1.87 to 1.88 cores against 4.47 to 5.32 s and 1.75 to 1.82, at 163 to 167 MB against 150 to 156 MB. Random
 * data, which lz4 leaves as it is, ran as fast either way; uncompressed, 24 MiB was slower (1.76 to 1.85 s
 * against 1.67 to 1.72 s).
 */
const COMPRESSED_WINDOW_BYTES = 24 * 1024 * 1024;
/**
 * Source bytes in flight across the streams written at once: each gets an equal share of it (within its own
 * window, at least one piece), so that disks copied together cost little more memory than one. Four disks with a
 * window each peaked at 276 MB with -z and 198 MB without. A stream written alone has its whole window.
 */
const SHARED_WINDOW_BYTES = SUMMED_WINDOW_BYTES;
/** Streams being written in this process now. */
let streamsWriting = 0;
/** What a piece costs in the window beyond its bytes (promises, buffers, requests): bounds tiny extents in flight. */
const PIECE_OVERHEAD = 64 * 1024;
/** Pieces up to this size are summed on the event loop: a threadpool round trip costs more than their sums. */
const SYNC_SUM_BYTES = 64 * 1024;
/** Write accumulated small buffers (zero frames) once they reach this. */
const BATCH_BYTES = 1024 * 1024;

/** A buffer to write, with its adler32 when a worker thread has already computed it. */
interface Out {
  data: Buffer;
  adler32?: number;
}

interface Pending {
  output: Promise<Out[]>;
  /** Source bytes this entry holds in memory (0 for headers). */
  bytes: number;
  /** Its share of the window: bytes plus PIECE_OVERHEAD for a piece. */
  cost: number;
  /** Called once the output has been written. */
  written?: () => void;
}

/**
 * The payload pieces of one data extent. Uncompressed: PAYLOAD_PIECE_SIZE pieces. Compressed: Python's restore
 * reads an extent below 32 MiB as exactly one lz4 frame, so such an extent is one piece; larger extents are cut
 * into PAYLOAD_PIECE_SIZE frames and listed in the trailer as {total: [sizes]}.
 */
function pieces(offset: number, length: number, compressed: boolean): Array<{ offset: number; length: number }> {
  if (compressed && length < DEFAULT_MAX_REQUEST_SIZE) return [{ offset, length }];
  return [...chunks(offset, length, PAYLOAD_PIECE_SIZE)];
}

async function readPiece(source: Endpoint, offset: number, length: number, buffer: Buffer): Promise<Buffer> {
  const step = Math.min(READ_REQUEST_SIZE, source.maxRequestSize);
  const reads: Promise<void>[] = [];
  for (const c of chunks(0, length, step)) reads.push(source.read(buffer.subarray(c.offset, c.offset + c.length), offset + c.offset));
  await traced('read', () => Promise.all(reads));
  return buffer;
}

/**
 * The adler32 of a piece and, with a slot, its digest stored there in `digests`: pieces up to SYNC_SUM_BYTES on the
 * event loop, where a threadpool round trip costs more than their sums, larger ones on a worker thread.
 */
async function sumPiece(data: Buffer, digests?: DigestList, slot?: number): Promise<number> {
  const addon = native();
  const recorded = digests !== undefined && slot !== undefined;
  if (data.length <= SYNC_SUM_BYTES) {
    if (!recorded) return addon.checksumPieceSync(data);
    const { into, at } = digests.place(slot);
    return addon.checksumPieceSync(data, PIECE_DIGEST, into, at);
  }
  const sums = await addon.checksumPiece(data, recorded ? PIECE_DIGEST : undefined);
  if (recorded && sums.digest) digests.set(slot, sums.digest);
  return sums.adler32;
}

export async function writeStream(options: StreamWriteOptions): Promise<StreamWriteResult> {
  const { source, plan, sink, compress } = options;
  const addon = native();
  const compressed = compress !== false;
  // Python's keys in the order its streamer writes them, ours after them (JSON leaves out those undefined). Every
  // key is named, so a key added to StreamMetadata fails to compile here rather than go missing from the file.
  const { meta: given } = options;
  const meta: StreamMetadata & Record<keyof StreamMetadata, unknown> = {
    virtualSize: source.size,
    dataSize: plan.dataSize,
    date: given.date,
    diskName: given.diskName,
    diskFormat: given.diskFormat,
    checkpointName: given.checkpointName,
    compressed: compress,
    compressionMethod: 'lz4',
    parentCheckpoint: given.parentCheckpoint,
    incremental: given.incremental,
    streamVersion: 2,
    checkpointIdentity: given.checkpointIdentity,
    parentCheckpointIdentity: given.parentCheckpointIdentity,
  };

  let checksum = 1;
  let bytesWritten = 0;
  let batch: Buffer[] = [];
  let batchBytes = 0;
  const queue: Pending[] = [];
  let bytesInFlight = 0;
  const trailer: Promise<TrailerEntry>[] = [];
  const digests = options.digests ? new DigestList() : undefined;
  // Pieces are read and summed in one worker task where the source can (readSummed): the sums run while the bytes
  // are in the cache, with one task per piece in place of one per request and one for the sums.
  const readSummed = source.readSummed?.bind(source);
  const ownWindow = compressed && !options.sinkCopies ? COMPRESSED_WINDOW_BYTES : readSummed ? SUMMED_WINDOW_BYTES : WINDOW_BYTES;
  const shareOf = (streams: number): number => (streams <= 1 ? ownWindow
    : Math.min(ownWindow, Math.max(PAYLOAD_PIECE_SIZE, SHARED_WINDOW_BYTES / streams)));
  const slabs = Math.ceil(shareOf(options.streamsAtOnce ?? 1) / PAYLOAD_PIECE_SIZE) + 2;
  const pieceLease = leasePool(PAYLOAD_PIECE_SIZE, slabs);
  const pool = pieceLease.pool;
  // Frames go into reused buffers too: a fresh one per piece cost page faults and major GCs (-z 3.5 s to 2.9 s).
  const frameLease = compressed ? leasePool(addon.lz4FrameBound(PAYLOAD_PIECE_SIZE), slabs) : undefined;
  const frames = frameLease?.pool;

  const flushBatch = async (): Promise<void> => {
    if (batch.length === 0) return;
    const out = batch;
    batch = [];
    batchBytes = 0;
    await sink.write(out);
  };

  const emit = async (outs: Out[], force: boolean): Promise<void> => {
    for (const { data, adler32 } of outs) {
      // Payload pieces come with their sums; only headers and terminators are summed here.
      checksum = adler32 === undefined ? addon.adler32(data, checksum) : addon.adler32Combine(checksum, adler32, data.length);
      bytesWritten += data.length;
      batch.push(data);
      batchBytes += data.length;
    }
    if (force || batchBytes >= BATCH_BYTES) await flushBatch();
  };

  const drainOne = async (): Promise<void> => {
    const entry = queue.shift();
    if (!entry) return;
    const buffers = await entry.output;
    bytesInFlight -= entry.cost;
    await emit(buffers, entry.bytes > 0);
    entry.written?.();
    if (entry.bytes > 0) options.onProgress?.(entry.bytes);
  };

  const enqueue = async (output: Promise<Out[]> | Buffer[], bytes: number, written?: () => void): Promise<void> => {
    const promise = Array.isArray(output) ? Promise.resolve(output.map((data) => ({ data }))) : output;
    promise.catch(() => undefined); // awaited in order later; avoid an early unhandled rejection
    const cost = bytes > 0 ? bytes + PIECE_OVERHEAD : 0;
    queue.push({ output: promise, bytes, cost, written });
    bytesInFlight += cost;
    const share = shareOf(Math.max(streamsWriting, options.streamsAtOnce ?? 1));
    while (bytesInFlight > share || (queue.length > 0 && bytes === 0 && queue.length > 4096)) {
      if (options.signal?.aborted) throw options.signal.reason ?? new Error('aborted');
      await drainOne();
    }
  };

  streamsWriting += 1;
  try {
    await enqueue([encodeMetadata(meta)], 0);
    for (const extent of plan.extents) {
      if (options.signal?.aborted) throw options.signal.reason ?? new Error('aborted');
      if (extent.kind === 'zero') {
        await enqueue([encodeHeader('zero', extent.offset, extent.length)], 0);
        continue;
      }
      await enqueue([encodeHeader('data', extent.offset, extent.length)], 0);
      const parts = pieces(extent.offset, extent.length, compressed);
      const sizes: Promise<number>[] = [];
      for (const part of parts) {
        const buffer = pool.acquire(part.length);
        // Sums and compression run off the copy loop; the buffer returns to the pool once nothing uses it. The
        // digest's slot is taken now, so the digests keep stream order.
        const slot = digests?.add(part.offset, part.length);
        // The digest comes with the read; so does the adler32 of an uncompressed payload (a frame's is the frame's).
        const summed = readSummed && part.length > SYNC_SUM_BYTES
          ? traced('read', () => readSummed(buffer, part.offset, { adler: !compressed, digest: digests ? PIECE_DIGEST : undefined })).then(({ adler32, digest }) => {
            if (digest) digests!.set(slot!, digest);
            return adler32;
          })
          : undefined;
        if (compressed) {
          const raw = summed ? summed.then(() => buffer) : readPiece(source, part.offset, part.length, buffer);
          const output = frames!.acquire(addon.lz4FrameBound(part.length));
          const piece = raw.then((r) => traced('compress', () => addon.lz4CompressPiece(r, compress, output, digests && !summed ? PIECE_DIGEST : undefined)));
          sizes.push(piece.then((p) => p.length, () => 0));
          // A block that does not compress stays in the read buffer, which is then freed once written.
          let keepsSource = false;
          const ready = piece.then(({ segments, digest }) => {
            if (digest) digests!.set(slot!, digest);
            keepsSource = segments.some((s) => s.inSource);
            if (!keepsSource) pool.release(buffer);
            return segments.map((s) => ({ data: (s.inSource ? buffer : output).subarray(s.start, s.end), adler32: s.adler32 }));
          });
          await enqueue(ready, part.length, () => {
            frames!.release(output);
            if (keepsSource) pool.release(buffer);
          });
        } else {
          const ready = summed
            ? summed.then((adler32) => [{ data: buffer, adler32 }])
            : readPiece(source, part.offset, part.length, buffer).then(async (data) => [{ data, adler32: await sumPiece(data, digests, slot) }]);
          await enqueue(ready, part.length, () => pool.release(buffer));
        }
      }
      await enqueue([TERMINATOR], 0);
      if (compressed) {
        const single = extent.length < DEFAULT_MAX_REQUEST_SIZE;
        trailer.push(Promise.all(sizes).then((frameSizes) => {
          const total = frameSizes.reduce((a, b) => a + b, 0);
          return single ? total : { [String(total)]: frameSizes };
        }));
      }
    }
    while (queue.length > 0) await drainOne();
    await emit([{ data: encodeEnd(compressed ? await Promise.all(trailer) : null) }], true);
  } catch (err) {
    // Let in-flight reads settle before the caller closes the endpoint under them.
    await Promise.allSettled(queue.map((q) => q.output));
    throw err;
  } finally {
    streamsWriting -= 1;
    pieceLease.end();
    frameLease?.end();
  }
  return { checksum, bytesWritten, dataSize: plan.dataSize, digests };
}
