// Writes a backup set as one stored (uncompressed) ZIP archive with ZIP64 entries to a stream, usually stdout,
// so `-o - | ssh host 'cat > set.zip'` works and `unzip` gives a normal set. Entries are streamed one after the
// other with backpressure, never buffered whole. Guarantees: a failure aborts the archive, so a consumer never
// sees a complete-looking zip of a failed run; the archive holds the bytes as they were when written, whatever the
// writer does with its buffers afterwards.
import { createRequire } from 'node:module';
import { PassThrough, Writable } from 'node:stream';
import { once } from 'node:events';
import zlib from 'node:zlib';
import type { ZipArchive } from 'archiver';
import type { OutputTarget, Sink } from './target.js';
import { UserError, describeFailure } from '../util/errors.js';
import { importLazily } from '../util/lazyImport.js';

/** Copies below this come from Node's shared slab and are left to the GC. */
const SMALL_COPY_BYTES = 64 * 1024;
/** A recycled copy buffer holds a 4 MiB piece or frame and its frame header. */
const COPY_SLAB_BYTES = 4 * 1024 * 1024 + 64 * 1024;
const COPY_SLABS_KEPT = 8;

/**
 * The copies an entry stream gets of the writer's buffers. A stream keeps what it is given until the archive has
 * written it out, long after the writer reuses its own buffers; the copies go back into use once the output has
 * written them (archiver passes a stored entry's chunks on as they are). A fresh allocation for each copy costs
 * page faults and garbage: a 2.5 GiB zip took about 2 CPU-s more and 147-212 MB, against 117-142 MB.
 */
class CopySlabs {
  private readonly free: Buffer[] = [];
  /** Slabs handed out, by their memory, with the bytes not yet written out. */
  private readonly pending = new Map<ArrayBufferLike, { slab: Buffer; left: number }>();

  copy(source: Buffer): Buffer {
    if (source.length < SMALL_COPY_BYTES) return Buffer.from(source);
    let slab = this.free.pop();
    if (!slab || slab.length < source.length) slab = Buffer.allocUnsafeSlow(Math.max(COPY_SLAB_BYTES, source.length));
    const view = slab.subarray(0, source.copy(slab));
    this.pending.set(slab.buffer, { slab, left: view.length });
    return view;
  }

  /** The output has written `chunk`: a slab all of whose bytes are out is free again. */
  written(chunk: Buffer): void {
    const entry = this.pending.get(chunk.buffer);
    if (!entry) return;
    entry.left -= chunk.length;
    if (entry.left > 0) return;
    this.pending.delete(chunk.buffer);
    if (this.free.length < COPY_SLABS_KEPT) this.free.push(entry.slab);
  }
}

/**
 * archiver sums each entry with the crc-32 package, in JavaScript: about 0.7 GB/s here, 3.6 CPU-s of a 2.5 GiB
 * zip. Node's zlib.crc32 gives the same sums at about 3.4 GB/s, so crc-32's buf() is pointed at it (archiver's
 * modules look it up on every call). Where Node lacks zlib.crc32 or crc-32 is not found, nothing changes.
 */
function sumWithNodeCrc32(): void {
  if (typeof zlib.crc32 !== 'function') return;
  try {
    const crc32 = createRequire(import.meta.url)('crc-32') as { buf: (data: Uint8Array, seed?: number) => number };
    // crc-32 returns the sum as a signed 32-bit integer; its callers take `>>> 0` of it.
    crc32.buf = (data, seed = 0) => zlib.crc32(data, seed >>> 0) | 0;
  } catch {
    // archiver without crc-32: its own sums stay.
  }
}

export class ZipTarget implements OutputTarget {
  /** Entries get copies of the writer's buffers (CopySlabs). */
  readonly copiesWrites = true;
  private readonly archive: ZipArchive;
  private readonly copies = new CopySlabs();
  private failure: Error | undefined;
  private readonly finished: Promise<void>;
  /**
   * Rejects with the first failure of the archive or the output, and never resolves. Every wait races it: a broken
   * output stops the archive's flow, after which the drain or entry being waited for never comes.
   */
  private readonly broken: Promise<never>;
  private readonly fail: (err: Error) => void;

  /** archiver is loaded only when a zip is written: it costs start-up time every other run would pay. */
  static async open(out: NodeJS.WritableStream): Promise<ZipTarget> {
    sumWithNodeCrc32();
    const { ZipArchive: Archive } = await importLazily('archiver', () => import('archiver'));
    // Entry times in local time, as zip readers (unzip, Python's zipfile) take them: archiver writes UTC by default,
    // which unzips hours off and misorders the files for Python's restore, which goes by modification time.
    return new ZipTarget(out, new Archive({ store: true, forceZip64: true, forceLocalTime: true }));
  }

  private constructor(out: NodeJS.WritableStream, archive: ZipArchive) {
    this.archive = archive;
    let breakWith: (err: Error) => void = () => undefined;
    this.broken = new Promise<never>((_, reject) => { breakWith = reject; });
    this.broken.catch(() => undefined);
    const fail = (err: Error): void => {
      this.failure ??= err;
      breakWith(this.failure);
    };
    this.fail = fail;
    this.archive.on('error', fail);
    // Between the archive and `out`: tells the copies when `out` has written a chunk.
    const forward = new Writable({
      write: (chunk: Buffer, _encoding, done) => {
        out.write(chunk, (err?: Error | null) => {
          if (!err) this.copies.written(chunk);
          done(err ?? null);
        });
      },
      // As pipe() does: standard output stays open, any other stream is ended.
      final: (done) => {
        if (out === process.stdout || out === process.stderr) done();
        else out.end(() => done());
      },
    });
    out.on('error', fail);
    forward.on('error', fail);
    this.finished = new Promise((resolve) => forward.on('finish', () => resolve()));
    this.archive.pipe(forward);
  }

  pathOf(name: string): string {
    return `zip:${name}`;
  }

  /**
   * Resolves once the archive has consumed the entry `name`. Both listeners go when it settles: a set has an entry
   * per side file, and listeners left behind pile up on the archive (Node warns of a leak from 11 on).
   */
  private entryDone(name: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const settle = (err?: Error): void => {
        this.archive.off('entry', onEntry);
        this.archive.off('error', settle);
        if (err) reject(err);
        else resolve();
      };
      const onEntry = (entry: { name: string }): void => {
        if (entry.name === name) settle();
      };
      this.archive.on('entry', onEntry);
      this.archive.on('error', settle);
    });
  }

  async create(name: string): Promise<Sink> {
    const pass = new PassThrough({ highWaterMark: 8 * 1024 * 1024 });
    const done = this.entryDone(name);
    done.catch(() => undefined);
    this.archive.append(pass, { name, store: true, date: new Date() });
    return {
      write: async (buffers: Buffer[]) => {
        for (const b of buffers) {
          if (this.failure) throw this.failure;
          // The writer reuses its buffers once this resolves: the stream gets a copy (see CopySlabs).
          if (!pass.write(this.copies.copy(b))) await Promise.race([once(pass, 'drain'), this.broken]);
        }
      },
      commit: async () => {
        pass.end();
        await Promise.race([done, this.broken]);
      },
      abort: async () => {
        this.failure ??= new Error(`zip entry ${name} aborted`);
        pass.destroy();
        this.archive.abort();
      },
    };
  }

  async writeFile(name: string, content: string | Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    const done = this.entryDone(name);
    this.archive.append(Buffer.isBuffer(content) ? content : Buffer.from(content), { name, store: true, date: new Date() });
    await Promise.race([done, this.broken]).catch(outputFailure(`cannot write ${name} into the zip on standard output`));
  }

  interrupt(reason: unknown): void {
    this.fail(reason instanceof Error ? reason : new Error(String(reason)));
  }

  /** Ends the archive unfinished (a failed run): the consumer gets an invalid zip and our non-zero exit. */
  async abort(): Promise<void> {
    this.failure ??= new Error('backup failed');
    this.archive.abort();
  }

  async close(): Promise<void> {
    if (this.failure) throw this.failure;
    const failed = outputFailure('cannot finish the zip on standard output');
    await Promise.race([this.archive.finalize(), this.broken]).catch(failed);
    await Promise.race([this.finished, this.broken]).catch(failed);
  }
}

/** A failure of the output as one line saying what could not be written; a stop's own reason stays as it is. */
function outputFailure(what: string): (err: unknown) => never {
  return (err) => {
    if (err instanceof UserError) throw err;
    throw new UserError(`${what}: ${describeFailure(err)}`);
  };
}
