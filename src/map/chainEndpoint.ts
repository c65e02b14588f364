// A read-only Endpoint over a sequence of stream files (full or copy, then incs/diffs in checkpoint order): the
// disk as it was at the last file's point in time, read straight out of the backup files.
//   open: check the sequence links up -> index each file (frame headers only) -> lay each index over the last,
//   cut to its size
//   read: newest covering segment -> file bytes, a cached decompressed lz4 frame, or zeros
//   extents (base:allocation): data segments -> 0, zero frames and uncovered holes -> HOLE|ZERO
// Guarantees: the files are opened read-only and never written; memory is the index (one small record per
// frame, per lz4 frame when compressed) plus a bounded frame cache, whatever the disk's size: frames and the packed
// bytes they come from go into pooled buffers, used again once the cache drops them.
import fs from 'node:fs/promises';
import path from 'node:path';
import { native } from '../native/addon.js';
import { CONTEXT_ALLOCATION, STATE_HOLE, STATE_ZERO, type Endpoint, type StatusExtent } from '../endpoint/endpoint.js';
import { DEFAULT_MAX_REQUEST_SIZE, StreamFormatError, undecompressable } from '../stream/format.js';
import { checkLinks, isStreamFile, parseDataFileName, type ChainLink } from '../set/backupSet.js';
import { UserError, describeReadFailure, oneLine } from '../util/errors.js';
import { coalesce } from './coalesce.js';
import { readInto } from '../util/fileIo.js';
import { shellQuote } from '../util/process.js';
import { SizeClassPool } from '../util/bufferPool.js';
import { FrameCache } from './frameCache.js';
import { firstEndingAfter, overlay, segmentEnd, truncate, type Segment } from './segments.js';
import { indexStream, type StreamIndex } from './streamIndex.js';
import { lz4ContentSize } from '../stream/reader.js';
import { QCOW2_MAGIC } from '../restore/qemu.js';

export interface ChainOpenOptions {
  /** Bytes of decompressed lz4 frames kept for reuse (default 128 MiB: four readers, each in its own 32 MiB frame). */
  cacheBytes?: number;
  /** Stops the indexing (Ctrl-C), which throws its reason. */
  signal?: AbortSignal;
}

const DEFAULT_CACHE_BYTES = 128 * 1024 * 1024;
/**
 * Free buffers kept for the next frames and packed reads: one of the largest frames (two measured the same).
 * Without the pools, four readers at once held 260 to 315 MB, much of it frames the cache had dropped and V8 had
 * not yet collected.
 */
const SPARE_BYTES = DEFAULT_MAX_REQUEST_SIZE;
const UNALLOCATED = STATE_HOLE | STATE_ZERO;

export class ChainEndpoint implements Endpoint {
  readonly maxRequestSize = DEFAULT_MAX_REQUEST_SIZE;
  readonly parallelism = 8;

  private constructor(
    /** The files in chain order, with their metadata. */
    readonly links: readonly ChainLink[],
    private readonly handles: readonly fs.FileHandle[],
    private readonly segments: readonly Segment[],
    private readonly cache: FrameCache,
    private readonly buffers: SizeClassPool,
  ) {}

  /** Size of the disk at the last file's point in time (a disk grown within the chain has the newest size). */
  get size(): number {
    return (this.links[this.links.length - 1] as ChainLink).meta.virtualSize;
  }

  /** Checks and indexes `files` (base first); errors are one-line UserErrors naming the file. */
  static async open(files: readonly string[], options: ChainOpenOptions = {}): Promise<ChainEndpoint> {
    if (files.length === 0) throw new UserError('no backup files given: -f full.data[,inc1.data,...]');
    const real = await Promise.all(files.map((f) => fs.realpath(f).catch(() => path.resolve(f))));
    const twice = files.find((_, i) => real.indexOf(real[i] as string) !== i);
    if (twice) throw new UserError(`${twice} is given twice: give each file once, the full backup first, then each incremental in checkpoint order`);
    const indexes: StreamIndex[] = [];
    for (const [i, file] of files.entries()) {
      const stat = await fs.stat(file).catch((err: NodeJS.ErrnoException) => {
        throw new UserError(`cannot read ${file}: ${describeReadFailure(err)}`);
      });
      if (!stat.isFile()) throw new UserError(`${file} is not a backup data file (not a regular file)`);
      if (file.endsWith('.partial')) {
        throw new UserError(`${file} is an unfinished data file (being written by a backup, or left from a failed one): map the finished files of the set`);
      }
      try {
        indexes.push(await indexStream(path.resolve(file), i, options.signal));
      } catch (err) {
        if (options.signal?.aborted) throw options.signal.reason;
        // A qcow2 file (the disk itself, a restored one) served as raw would show qcow2's bytes.
        if (err instanceof StreamFormatError && (await isQcow2(file))) {
          throw new UserError(`${file} is a qcow2 disk image, not a backup stream: serve it read-only with qemu-nbd -r -f qcow2 ${shellQuote(file)}`);
        }
        if (err instanceof StreamFormatError && !(await isStreamFile(file))) {
          throw new UserError(`${file} is a raw disk image (a -t raw backup, or a raw-format disk's copy), not a stream: serve it as it is, read-only: qemu-nbd -r -f raw ${shellQuote(file)} (or losetup -r)`);
        }
        if (err instanceof StreamFormatError) throw new UserError(`${file} is not a usable backup stream: ${oneLine(err)}`);
        throw err;
      }
    }
    const links = indexes.map(toLink);
    checkSequence(links);
    // Each file is laid over the disk as it was at the file before, cut to this file's size: a range a disk shrunk
    // away reads as zero once it grows back.
    let segments: Segment[] = [];
    for (const [i, index] of indexes.entries()) segments = overlay(truncate(segments, (links[i] as ChainLink).meta.virtualSize), index.segments);
    const handles: fs.FileHandle[] = [];
    try {
      for (const link of links) handles.push(await fs.open(link.path, 'r'));
    } catch (err) {
      await Promise.all(handles.map((h) => h.close()));
      throw new UserError(`cannot open ${links[handles.length]?.path}: ${oneLine(err)}`);
    }
    const buffers = new SizeClassPool(SPARE_BYTES);
    const cache = new FrameCache(options.cacheBytes ?? DEFAULT_CACHE_BYTES, (frame) => buffers.release(frame));
    return new ChainEndpoint(links, handles, segments, cache, buffers);
  }

  async read(buffer: Buffer, offset: number): Promise<void> {
    const end = offset + buffer.length;
    if (end > this.size) throw new RangeError(`read of ${buffer.length} bytes at ${offset} beyond the disk's size ${this.size}`);
    const pieces: Promise<void>[] = [];
    for (const { from, to, segment } of this.cover(offset, end)) {
      const target = buffer.subarray(from - offset, to - offset);
      if (segment?.kind === 'data') pieces.push(this.readSegment(segment, from - segment.start, target));
      else target.fill(0);
    }
    await Promise.all(pieces);
  }

  /** Fills `target` with the segment's bytes from `within` bytes into it. */
  private async readSegment(segment: Segment, within: number, target: Buffer): Promise<void> {
    if (segment.packed === 0) {
      await this.readFully(segment, target, segment.at + within);
      return;
    }
    const from = segment.skip + within;
    await this.cache.read(`${segment.file}:${segment.at}`, () => this.decompress(segment), (frame) => {
      if (from + target.length > frame.length) {
        throw new StreamFormatError(`${this.links[segment.file]?.path} at byte ${segment.at}: lz4 frame holds ${frame.length} bytes, index expects ${from + target.length}`);
      }
      frame.copy(target, 0, from, from + target.length);
    });
  }

  /** The segment's lz4 frame decompressed, into a pooled buffer when its header gives the content size. */
  private async decompress(segment: Segment): Promise<Buffer> {
    const packed = this.buffers.acquire(segment.packed);
    try {
      await this.readFully(segment, packed, segment.at);
      return await this.decompressFrame(packed).catch((err: Error) => {
        throw new StreamFormatError(`${this.links[segment.file]?.path} at byte ${segment.at}: lz4 frame: ${undecompressable(err)}`);
      });
    } finally {
      this.buffers.release(packed);
    }
  }

  private async decompressFrame(packed: Buffer): Promise<Buffer> {
    const size = lz4ContentSize(packed);
    if (size === undefined || size > DEFAULT_MAX_REQUEST_SIZE) return native().lz4DecompressFrame(packed);
    const output = this.buffers.acquire(size);
    try {
      const produced = await native().lz4DecompressInto(packed, output);
      if (produced !== size) throw new Error(`decompressed to ${produced} bytes, header says ${size}`);
      return output;
    } catch (err) {
      this.buffers.release(output);
      throw err;
    }
  }

  /** Fills `target` from `position` of the segment's file, which must still hold those bytes. */
  private async readFully(segment: Segment, target: Buffer, position: number): Promise<void> {
    const got = await readInto(this.handles[segment.file] as fs.FileHandle, target, position);
    if (got < target.length) {
      throw new StreamFormatError(`${this.links[segment.file]?.path}: unexpected end of file at byte ${position + got} (truncated since it was indexed?)`);
    }
  }

  write(_buffer: Buffer, _offset: number): Promise<void> {
    return Promise.reject(readOnly());
  }

  zero(_offset: number, _length: number): Promise<void> {
    return Promise.reject(readOnly());
  }

  async flush(): Promise<void> {
    // Nothing is ever written.
  }

  extents(context: string, offset: number, length: number): AsyncIterable<StatusExtent> {
    if (context !== CONTEXT_ALLOCATION) throw new Error(`meta context ${context} is not available on a mapped backup`);
    return coalesce(this.allocation(offset, Math.min(offset + length, this.size)));
  }

  /** Uncoalesced status of [offset, end): data segments 0, zero frames and holes HOLE|ZERO. */
  private *allocation(offset: number, end: number): Generator<StatusExtent> {
    for (const { from, to, segment } of this.cover(offset, end)) {
      yield { offset: from, length: to - from, flags: segment?.kind === 'data' ? 0 : UNALLOCATED };
    }
  }

  /** [offset, end) in order as pieces of one segment each, or of none (a hole). */
  private *cover(offset: number, end: number): Generator<{ from: number; to: number; segment?: Segment }> {
    let at = offset;
    for (let i = firstEndingAfter(this.segments, offset); i < this.segments.length && at < end; i++) {
      const segment = this.segments[i] as Segment;
      if (segment.start >= end) break;
      if (segment.start > at) yield { from: at, to: segment.start };
      const from = Math.max(at, segment.start);
      at = Math.min(end, segmentEnd(segment));
      yield { from, to: at, segment };
    }
    if (at < end) yield { from: at, to: end };
  }

  async close(): Promise<void> {
    this.cache.clear();
    this.buffers.clear();
    await Promise.all(this.handles.map((h) => h.close().catch(() => undefined)));
  }
}

/** The ChainLink of an indexed file: level from its name when it is a set's name, else from its metadata. */
function toLink(index: StreamIndex): ChainLink {
  const named = parseDataFileName(path.basename(index.path));
  const level = named?.level ?? (index.meta.incremental ? 'inc' : 'full');
  return {
    file: path.basename(index.path),
    disk: named?.disk ?? index.meta.diskName,
    level,
    ident: named?.ident ?? (level === 'inc' ? index.meta.checkpointName : ''),
    path: index.path,
    meta: index.meta,
  };
}

/** The base first, then incs/diffs of the same disk whose parents are the checkpoints before them. */
function checkSequence(links: readonly ChainLink[]): void {
  const base = links[0] as ChainLink;
  if (base.meta.incremental) {
    throw new UserError(`${base.path} is an incremental or differential backup: the sequence must start with the full or copy backup (-f full.data,inc1.data,...)`);
  }
  for (const link of links.slice(1)) {
    if (!link.meta.incremental) throw new UserError(`${link.path} is a full or copy backup: only the first file of the sequence may be one`);
    // The size may differ: a disk grown (virsh blockresize) within the chain.
    if (link.meta.diskName !== base.meta.diskName) {
      throw new UserError(`${link.path} is a backup of disk ${link.meta.diskName}, not of ${base.meta.diskName} like ${base.path}`);
    }
  }
  refuseMisordered(links);
  checkLinks([...links], 'add it to -f (the full backup first, then each incremental in checkpoint order), or map only the files before it');
}

/**
 * Files that are all there, in another order than the chain's: said so, where the chain check would ask for a file
 * that is missing. A file's parent checkpoint is made by a full or inc; a diff's metadata names the next one (an
 * offline one, the one it is based on), and Python's offline inc names the one it is based on, as the file before
 * it does. Files named otherwise (renamed) are told by their metadata alone, where an inc and a diff after one
 * checkpoint read alike: only a file given later that names the checkpoint as its own tells of the order.
 */
function refuseMisordered(links: readonly ChainLink[]): void {
  const named = links.every((l) => parseDataFileName(l.file));
  const makers = links.map((l, i) => ({ l, i })).filter(({ l }) => l.level !== 'diff');
  for (const [i, link] of links.entries()) {
    if (i === 0) continue;
    const before = makers.filter(({ i: at }) => at < i).at(-1);
    if (before?.l.meta.checkpointName === link.meta.parentCheckpoint) continue;
    if (!named) {
      const later = makers.find(({ l, i: at }) => at > i && l.meta.checkpointName === link.meta.parentCheckpoint);
      if (!later || makers.some(({ l, i: at }) => at < i && l.meta.checkpointName === link.meta.parentCheckpoint)) continue;
      throw new UserError(`-f is out of chain order: ${link.path} is based on checkpoint ${link.meta.parentCheckpoint}, which ${later.l.path}, given after it, names as its own (by their metadata); give the full backup first, then each incremental in checkpoint order, a diff after the file of its checkpoint`);
    }
    const parent = makers.find(({ l }) => l.meta.checkpointName === link.meta.parentCheckpoint);
    if (!parent) continue;
    throw new UserError(`-f is out of chain order: ${link.path} is based on checkpoint ${link.meta.parentCheckpoint}, which ${parent.l.path} makes, so it goes right after that file, not after ${(before as { l: ChainLink }).l.path}; give the full backup first, then each incremental in checkpoint order, a diff after the file of its checkpoint`);
  }
}

/** Whether `file` starts with qcow2's magic. */
async function isQcow2(file: string): Promise<boolean> {
  const handle = await fs.open(file, 'r');
  try {
    const head = Buffer.alloc(QCOW2_MAGIC.length);
    return (await readInto(handle, head, 0)) === head.length && head.equals(QCOW2_MAGIC);
  } finally {
    await handle.close();
  }
}

function readOnly(): Error {
  return Object.assign(new Error('the backup files are read-only'), { code: 'EPERM' });
}
