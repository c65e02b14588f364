// Where a backup set is written. A Sink is one file of the set being written in order; the directory target
// writes `<name>.partial`, fsyncs and renames it on commit, so a finished name always means a complete file.
// Guarantees: never overwrites an existing file of the set (exclusive create); abort keeps the .partial as evidence.
import fs from 'node:fs/promises';
import path from 'node:path';

export interface Sink {
  /** Appends the buffers, in order. */
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

export interface OutputTarget {
  /** Opens a new file of the set for writing. */
  create(name: string): Promise<Sink>;
  /** Opens a new sparse file of `size` bytes for positional writes; only where the target can seek. */
  createPositional?(name: string, size: number): Promise<PositionalSink>;
  /** Finishes the target (the zip's central directory); nothing for a directory. */
  close(): Promise<void>;
  /** Writes a small file of the set completely (json, xml, checksum). */
  writeFile(name: string, content: string | Buffer): Promise<void>;
  /** Absolute path of a file in the set, for callers that must read it back. */
  pathOf(name: string): string;
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await fs.open(dir, 'r');
  try { await handle.sync(); } finally { await handle.close(); }
}

/** Written bytes after which a sink starts flushing them to disk in the background. */
const WRITE_BEHIND_BYTES = 64 * 1024 * 1024;

class FileSink implements Sink, PositionalSink {
  private unflushed = 0;
  /** A background fdatasync started by write-behind; its failure surfaces at commit. */
  private flushing: Promise<void> | undefined;
  private flushFailure: Error | undefined;

  constructor(private readonly handle: fs.FileHandle, private readonly partial: string, private readonly final: string) {}

  /**
   * Starts an fdatasync once enough is written and none runs, so the disk writes while the backup still reads
   * and commit's final sync finds little left to do (a sync of the whole file at the end cost seconds).
   */
  private writeBehind(bytes: number): void {
    this.unflushed += bytes;
    if (this.unflushed < WRITE_BEHIND_BYTES || this.flushing) return;
    this.unflushed = 0;
    this.flushing = this.handle.datasync().catch((err: Error) => { this.flushFailure ??= err; })
      .finally(() => { this.flushing = undefined; });
  }

  async writeAt(buffer: Buffer, offset: number): Promise<void> {
    for (let done = 0; done < buffer.length;) {
      const { bytesWritten } = await this.handle.write(buffer, done, buffer.length - done, offset + done);
      done += bytesWritten;
    }
    this.writeBehind(buffer.length);
  }

  async write(buffers: Buffer[]): Promise<void> {
    let rest = buffers;
    while (rest.length > 0) {
      const { bytesWritten } = await this.handle.writev(rest);
      rest = skipBytes(rest, bytesWritten);
      this.writeBehind(bytesWritten);
    }
  }

  async commit(): Promise<void> {
    await this.flushing;
    if (this.flushFailure) throw this.flushFailure;
    await this.handle.sync();
    await this.handle.close();
    await fs.rename(this.partial, this.final);
    await syncDirectory(path.dirname(this.final));
  }

  async abort(): Promise<void> {
    await this.flushing;
    await this.handle.close().catch(() => undefined);
  }

  async truncate(size: number): Promise<void> {
    await this.handle.truncate(size);
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

export class DirectoryTarget implements OutputTarget {
  constructor(readonly dir: string) {}

  pathOf(name: string): string {
    return path.join(this.dir, name);
  }

  async create(name: string): Promise<Sink> {
    const final = this.pathOf(name);
    const partial = `${final}.partial`;
    await refuseExisting(final);
    const handle = await fs.open(partial, 'wx');
    return new FileSink(handle, partial, final);
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
    await fs.mkdir(path.dirname(final), { recursive: true });
    const partial = `${final}.partial`;
    await fs.writeFile(partial, content);
    await fs.rename(partial, final);
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
