// Where a backup set is written. A Sink is one file of the set being written in order; the directory target
// writes `<name>.partial`, fsyncs and renames it on commit (or, for a run's data files, all together once the run
// publishes them), so a finished name always means a complete file.
// Bulk files (data files) go through O_DIRECT where the file system takes it: on disk when commit returns, without
// the page cache's copy and its slow write-back. Guarantees: never overwrites an existing file of the set
// (exclusive create); abort keeps the .partial as evidence.
import { constants as fsConstants } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { native } from '../native/addon.js';
import { UserError, describeFailure } from '../util/errors.js';
import { linkNewName, makeDirectory } from '../util/fileIo.js';
import { traced } from '../util/stageTrace.js';

export interface Sink {
  /** Appends the buffers, in order; resolves once the caller may reuse them (the sink keeps no reference). */
  write(buffers: Buffer[]): Promise<void>;
  /** Makes the file final under its name. */
  commit(): Promise<void>;
  /** Stops writing; what was written stays as `.partial`. */
  abort(): Promise<void>;
}

/** A file written at positions rather than in order: raw images (-t raw). */
export interface PositionalSink {
  writeAt(buffer: Buffer, offset: number): Promise<void>;
  commit(): Promise<void>;
  abort(): Promise<void>;
}

/**
 * Runs `fill` on a newly created file of the set, then commits it; on any failure aborts it (its `.partial` stays as
 * evidence) and rethrows. Resolves to what `fill` returned.
 */
export async function fillAndCommit<F extends Pick<Sink, 'commit' | 'abort'>, T>(file: F, fill: (file: F) => Promise<T>): Promise<T> {
  try {
    const result = await fill(file);
    await file.commit();
    return result;
  } catch (err) {
    await file.abort();
    throw err;
  }
}

export interface CreateOptions {
  /** A large file written once (a data file): the target may bypass the page cache. */
  bulk?: boolean;
}

export interface OutputTarget {
  /** Opens a new file of the set for writing. */
  create(name: string, options?: CreateOptions): Promise<Sink>;
  /** Opens a new sparse file of `size` bytes for positional writes; only where the target can seek. */
  createPositional?(name: string, size: number): Promise<PositionalSink>;
  /** Finishes the target (the zip's central directory); nothing for a directory. */
  close(): Promise<void>;
  /** Puts the data files a run finished under their names where the target held them back (DirectoryTarget). */
  publish?(): Promise<void>;
  /**
   * Fails every write that waits on the output, and every later one, with `reason`: a stopped run must not wait
   * for a reader that no longer reads (a zip on a stalled pipe). A directory's disk writes end by themselves.
   */
  interrupt?(reason: unknown): void;
  /** Writes a small file of the set completely (json, xml, checksum). */
  writeFile(name: string, content: string | Buffer): Promise<void>;
  /** Absolute path of a file in the set, for callers that must read it back. */
  pathOf(name: string): string;
  /** Its sinks keep copies of what they are given until the output takes them (a zip's entries). */
  readonly copiesWrites?: boolean;
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await fs.open(dir, 'r');
  try { await handle.sync(); } finally { await handle.close(); }
}

/** Written bytes after which a sink starts flushing them to disk in the background. */
const WRITE_BEHIND_BYTES = 64 * 1024 * 1024;

/**
 * fdatasyncs of a file started in the background, one at a time, each once WRITE_BEHIND_BYTES more are written: the
 * disk (or, under a virtual disk, the host's cache) drains while the backup still reads, and the final sync at commit
 * finds little left. Direct writes bypass only this machine's cache: a final sync after them still took 0.3 to 1.5 s
 * of a 3.5 s copy here; with these, 0.03 s, and -z of compressible data took 5.4 to 5.8 s in place of 5.7 to 6.2 s.
 */
class WriteBehind {
  private unflushed = 0;
  private flushing: Promise<void> | undefined;
  private failure: Error | undefined;

  constructor(private readonly handle: fs.FileHandle) {}

  written(bytes: number): void {
    this.unflushed += bytes;
    if (this.unflushed < WRITE_BEHIND_BYTES || this.flushing) return;
    this.unflushed = 0;
    this.flushing = this.handle.datasync().catch((err: Error) => { this.failure ??= err; })
      .finally(() => { this.flushing = undefined; });
  }

  /** Waits for the running flush; throws the first flush's failure. */
  async settle(): Promise<void> {
    await this.flushing;
    if (this.failure) throw this.failure;
  }
}

/**
 * `partial` under the name `final`, which must not exist: a hard link, then the `.partial` name removed. Where the
 * file system has no hard links (some network and FAT ones), a rename after checking the name is free.
 */
async function placeWithoutReplacing(partial: string, final: string): Promise<void> {
  const linked = await linkNewName(partial, final, async () => {
    await refuseExisting(final);
    await fs.rename(partial, final);
  }).catch((err: unknown) => {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw Object.assign(new Error(`${final} appeared while this run wrote it (another program writing into the set?); refusing to replace it`), { code, path: partial });
    throw err;
  });
  if (linked) await fs.unlink(partial);
}

/** Puts a synced, closed `.partial` under its final name: at once, or when the run publishes its files. */
type Placer = () => Promise<void>;

/** Renames `partial` to `final` and syncs the directory: the file is there whole after a power cut, or not at all. */
async function renameIntoPlace(partial: string, final: string): Promise<void> {
  await fs.rename(partial, final);
  await syncDirectory(path.dirname(final));
}

class FileSink implements Sink, PositionalSink {
  private readonly writeBehind: WriteBehind;

  constructor(private readonly handle: fs.FileHandle, private readonly place: Placer) {
    this.writeBehind = new WriteBehind(handle);
  }

  async writeAt(buffer: Buffer, offset: number): Promise<void> {
    for (let done = 0; done < buffer.length;) {
      const { bytesWritten } = await this.handle.write(buffer, done, buffer.length - done, offset + done);
      done += bytesWritten;
    }
    this.writeBehind.written(buffer.length);
  }

  async write(buffers: Buffer[]): Promise<void> {
    let rest = buffers;
    while (rest.length > 0) {
      const { bytesWritten } = await this.handle.writev(rest);
      rest = skipBytes(rest, bytesWritten);
      this.writeBehind.written(bytesWritten);
    }
  }

  async commit(): Promise<void> {
    await this.writeBehind.settle();
    await traced('sync', () => this.handle.sync());
    await this.handle.close();
    await this.place();
  }

  async abort(): Promise<void> {
    await this.writeBehind.settle().catch(() => undefined);
    await this.handle.close().catch(() => undefined);
  }

  async truncate(size: number): Promise<void> {
    await this.handle.truncate(size);
  }
}

/** O_DIRECT needs buffers, offsets and lengths on this boundary (the logical block size of common disks, or more). */
const DIRECT_ALIGN = 4096;
/** Staging chunk of a direct sink, and writes in flight: measured here, 4 MiB × 2 writes as fast as any larger mix. */
const DIRECT_CHUNK = 4 * 1024 * 1024;
const DIRECT_IN_FLIGHT = 2;
/**
 * Writes in flight across the direct sinks open at once, each keeping at least one: two each for up to four
 * disks at once. With one each, four disks of 384 MiB copied in 3.7 to 4.0 s against 2.3 to 2.6 s, at 120 to
 * 126 MB against 135 to 136 MB (-z of system files: 6.2 to 6.5 s against 5.9 to 6.2 s, 159 to 167 against 169 to
 * 173 MB); a sink with one write in flight waits for it before it takes the next chunk.
 */
const SHARED_DIRECT_IN_FLIGHT = 8;
/** Direct sinks open in this process now. */
let directSinksOpen = 0;
/** Runs of fewer bytes are copied into a staging chunk on the event loop: a worker round trip costs more. */
const SYNC_COPY_BYTES = 64 * 1024;

async function writeFully(handle: fs.FileHandle, buffer: Buffer, length: number, position: number): Promise<void> {
  for (let done = 0; done < length;) {
    const { bytesWritten } = await handle.write(buffer, done, length - done, position + done);
    if (bytesWritten === 0) throw new Error('the file system accepted no more bytes');
    done += bytesWritten;
  }
}

/**
 * A sequential sink over an O_DIRECT descriptor: bytes are gathered into aligned chunks, each written while the
 * next fills. The last chunk is padded to the boundary and the file cut back to its length at commit.
 */
class DirectFileSink implements Sink {
  private readonly inFlight: Array<Promise<Buffer>> = [];
  private stage: Buffer | undefined;
  /** Copies into `stage` still running; its write waits for them. */
  private stageCopies: Array<Promise<void>> = [];
  private filled = 0;
  /** File offset of the chunk being filled. */
  private position = 0;

  private readonly writeBehind: WriteBehind;
  private closed = false;

  private constructor(private readonly handle: fs.FileHandle, private readonly place: Placer) {
    this.writeBehind = new WriteBehind(handle);
    directSinksOpen += 1;
  }

  /**
   * A direct sink on the freshly created `partial`, or undefined where the file system refuses O_DIRECT (open or
   * a first aligned write fails with EINVAL): the caller then writes through the page cache.
   */
  static async open(partial: string, place: Placer): Promise<DirectFileSink | undefined> {
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(partial, fsConstants.O_WRONLY | fsConstants.O_DIRECT);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EINVAL') return undefined;
      throw err;
    }
    try {
      await handle.write(native().alignedBuffer(DIRECT_ALIGN, DIRECT_ALIGN), 0, DIRECT_ALIGN, 0);
      await handle.truncate(0);
      return new DirectFileSink(handle, place);
    } catch (err) {
      await handle.close().catch(() => undefined);
      if ((err as NodeJS.ErrnoException).code === 'EINVAL') return undefined;
      throw err;
    }
  }

  /**
   * Places the bytes in staging chunks, copied there on worker threads (the event loop only for small runs),
   * and resolves once they are copied: the caller may reuse the buffers then.
   */
  async write(buffers: Buffer[]): Promise<void> {
    const copies: Promise<void>[] = [];
    let runs: Buffer[] = [];
    let runsAt = 0;
    let runsBytes = 0;
    const copyRuns = (): void => {
      if (runsBytes >= SYNC_COPY_BYTES) {
        const copy = native().copyInto(this.stage!, runsAt, runs);
        this.stageCopies.push(copy);
        copies.push(copy);
      } else {
        for (const run of runs) runsAt += run.copy(this.stage!, runsAt);
      }
      runs = [];
      runsBytes = 0;
    };
    for (const buffer of buffers) {
      for (let at = 0; at < buffer.length;) {
        this.stage ??= await this.freeChunk();
        const length = Math.min(buffer.length - at, DIRECT_CHUNK - this.filled);
        if (runs.length === 0) runsAt = this.filled;
        runs.push(length === buffer.length ? buffer : buffer.subarray(at, at + length));
        runsBytes += length;
        this.filled += length;
        at += length;
        if (this.filled === DIRECT_CHUNK) {
          copyRuns();
          this.submit(DIRECT_CHUNK);
        }
      }
    }
    if (runs.length > 0) copyRuns();
    await Promise.all(copies);
  }

  async commit(): Promise<void> {
    const length = this.position + this.filled;
    if (this.filled > 0) {
      const padded = Math.ceil(this.filled / DIRECT_ALIGN) * DIRECT_ALIGN;
      this.stage!.fill(0, this.filled, padded);
      this.submit(padded);
    }
    await Promise.all(this.inFlight);
    await this.writeBehind.settle();
    await this.handle.truncate(length);
    await traced('sync', () => this.handle.sync());
    await this.handle.close();
    this.markClosed();
    await this.place();
  }

  async abort(): Promise<void> {
    await Promise.allSettled([...this.inFlight, ...this.stageCopies]);
    await this.writeBehind.settle().catch(() => undefined);
    await this.handle.close().catch(() => undefined);
    this.markClosed();
  }

  private markClosed(): void {
    if (!this.closed) directSinksOpen -= 1;
    this.closed = true;
  }

  /** A chunk to fill: the oldest write's once this sink's share of writes runs, else a new one (share + 1 in all). */
  private async freeChunk(): Promise<Buffer> {
    const share = Math.min(DIRECT_IN_FLIGHT, Math.max(1, Math.floor(SHARED_DIRECT_IN_FLIGHT / directSinksOpen)));
    if (this.inFlight.length >= share) return this.inFlight.shift()!;
    // On huge pages (see alignedBuffer): a 4 MiB direct write from 4 KiB pages reached this virtio disk as 5 to 8
    // requests, from huge pages as one, and the copy took 15 % less time.
    return native().alignedBuffer(DIRECT_CHUNK, DIRECT_ALIGN, true);
  }

  private submit(length: number): void {
    const chunk = this.stage!;
    const position = this.position;
    const copies = this.stageCopies;
    this.stageCopies = [];
    const written = Promise.all(copies).then(() => traced('diskWrite', () => writeFully(this.handle, chunk, length, position))).then(() => { this.writeBehind.written(length); return chunk; });
    written.catch(() => undefined); // awaited in order by freeChunk or commit
    this.inFlight.push(written);
    this.stage = undefined;
    this.filled = 0;
    this.position += length;
  }
}

/** Drops the first `count` bytes of a buffer list (after a short writev). */
function skipBytes(buffers: Buffer[], count: number): Buffer[] {
  let left = count;
  const out: Buffer[] = [];
  for (const b of buffers) {
    if (left >= b.length) { left -= b.length; continue; }
    out.push(left > 0 ? b.subarray(left) : b);
    left = 0;
  }
  return out;
}

export interface DirectoryTargetOptions {
  /**
   * Every file (data files and their checksums and digests alike) keeps its `.partial` name, synced, until
   * publish(): a run killed between two disks (kill -9, a power cut) then leaves no finished file of a checkpoint
   * the set does not list. Files written after publish() take their names at once.
   */
  publishTogether?: boolean;
}

export class DirectoryTarget implements OutputTarget {
  /** Files finished and waiting for publish(), in the order they finished. */
  private unpublished: Array<[partial: string, final: string]> | undefined;

  constructor(readonly dir: string, options: DirectoryTargetOptions = {}) {
    if (options.publishTogether) this.unpublished = [];
  }

  /**
   * Puts the finished files under their names, in the order they finished; later ones go there at once. A name
   * taken meanwhile (another tool writing into the set) is refused, not replaced: `rename` would replace it.
   */
  async publish(): Promise<void> {
    const files = this.unpublished ?? [];
    this.unpublished = undefined;
    for (const [partial, final] of files) await placeWithoutReplacing(partial, final);
    if (files.length > 0) await syncDirectory(this.dir);
  }

  private placer(partial: string, final: string): Placer {
    return async () => {
      if (this.unpublished) this.unpublished.push([partial, final]);
      else await renameIntoPlace(partial, final);
    };
  }

  pathOf(name: string): string {
    return path.join(this.dir, name);
  }

  async create(name: string, options: CreateOptions = {}): Promise<Sink> {
    const final = this.pathOf(name);
    const partial = `${final}.partial`;
    await refuseExisting(final);
    const handle = await fs.open(partial, 'wx');
    if (options.bulk) {
      const direct = await DirectFileSink.open(partial, this.placer(partial, final)).catch(async (err: unknown) => {
        await handle.close();
        throw err;
      });
      if (direct) {
        await handle.close();
        return direct;
      }
    }
    return new FileSink(handle, this.placer(partial, final));
  }

  async createPositional(name: string, size: number): Promise<PositionalSink> {
    const sink = (await this.create(name)) as FileSink;
    await sink.truncate(size);
    return sink;
  }

  async close(): Promise<void> {
    // every file is complete on commit
  }

  async writeFile(name: string, content: string | Buffer): Promise<void> {
    const final = this.pathOf(name);
    await makeDirectory(path.dirname(final));
    const partial = `${final}.partial`;
    try {
      // Synced before and after its rename: after a power cut the file is there whole (an empty .cpt after one on
      // XFS would end the chain), or not at all.
      const handle = await fs.open(partial, 'w');
      try {
        await handle.writeFile(content);
        await handle.sync();
      } finally {
        await handle.close();
      }
      await this.placer(partial, final)();
    } catch (err) {
      // The .partial stays, as a data file's does: the run failed after its data, so the next inc must not go on
      // as if the set were whole.
      throw new UserError(`cannot write ${final}: ${describeFailure(err)}`);
    }
  }
}

async function refuseExisting(file: string): Promise<void> {
  try {
    await fs.access(file);
  } catch {
    return;
  }
  throw new Error(`${file} already exists; refusing to overwrite a backup file`);
}
