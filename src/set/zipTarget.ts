// Writes a backup set as one stored (uncompressed) ZIP archive with ZIP64 entries to a stream, usually stdout,
// so `-o - | ssh host 'cat > set.zip'` works and `unzip` gives a normal set. Entries are streamed one after the
// other with backpressure, never buffered whole. Guarantees: a failure aborts the archive, so a consumer never
// sees a complete-looking zip of a failed run.
import { PassThrough } from 'node:stream';
import { once } from 'node:events';
import type { ZipArchive } from 'archiver';
import type { OutputTarget, Sink } from './target.js';

export class ZipTarget implements OutputTarget {
  private readonly archive: ZipArchive;
  private failure: Error | undefined;
  private readonly finished: Promise<void>;

  /** archiver is loaded only when a zip is written: it costs start-up time every other run would pay. */
  static async open(out: NodeJS.WritableStream): Promise<ZipTarget> {
    const { ZipArchive: Archive } = await import('archiver');
    return new ZipTarget(out, new Archive({ store: true, forceZip64: true }));
  }

  private constructor(out: NodeJS.WritableStream, archive: ZipArchive) {
    this.archive = archive;
    this.archive.on('error', (err: Error) => { this.failure ??= err; });
    this.finished = new Promise((resolve, reject) => {
      out.on('error', (err: Error) => { this.failure ??= err; reject(err); });
      this.archive.on('end', () => resolve());
      this.archive.on('error', reject);
    });
    this.finished.catch(() => undefined);
    this.archive.pipe(out);
  }

  pathOf(name: string): string {
    return `zip:${name}`;
  }

  /** Resolves once the archive has consumed the entry `name`. */
  private entryDone(name: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const onEntry = (entry: { name: string }): void => {
        if (entry.name !== name) return;
        this.archive.off('entry', onEntry);
        resolve();
      };
      this.archive.on('entry', onEntry);
      this.archive.once('error', reject);
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
          // The stream keeps what it is given until the archive and stdout are done with it, long after this
          // resolves, while the writer reuses its buffers as soon as it does: the stream gets a copy.
          if (!pass.write(Buffer.from(b))) await once(pass, 'drain');
        }
      },
      commit: async () => {
        pass.end();
        await done;
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
    await done;
  }

  /** Ends the archive unfinished (a failed run): the consumer gets an invalid zip and our non-zero exit. */
  async abort(): Promise<void> {
    this.failure ??= new Error('backup failed');
    this.archive.abort();
  }

  async close(): Promise<void> {
    if (this.failure) throw this.failure;
    await this.archive.finalize();
    await this.finished;
  }
}
