// A least-recently-used cache of decompressed lz4 frames, bounded in bytes, so that small random reads inside
// one large frame decompress it once. A frame it drops goes to `dropped` (the owner's pool, to decompress into
// again) once no reader holds it, so memory stays at the budget instead of at what V8 has not yet collected.
// Guarantees: concurrent requests for one frame share one decompression; a failed load is not cached; a frame is
// handed to `dropped` once, and only after every reader of it has returned; memory stays under the budget (counted
// in the frames' whole buffers) plus the frames being read right now.

interface Entry {
  frame: Promise<Buffer>;
  /** The loaded frame, once there. */
  buffer?: Buffer;
  /** Bytes counted against the budget (0 while loading). */
  bytes: number;
  /** Readers between asking for the frame and returning from it. */
  readers: number;
  /** Out of the cache: handed to `dropped` when the last reader returns. */
  gone: boolean;
}

export class FrameCache {
  /** Map order is recency order: the first entry is the least recently used. */
  private readonly entries = new Map<string, Entry>();
  private bytes = 0;

  constructor(private readonly budgetBytes: number, private readonly dropped: (frame: Buffer) => void = () => undefined) {}

  /** `read(frame)` of the frame under `key`, loaded with `load` when it is not cached; held until `read` settles. */
  async read<T>(key: string, load: () => Promise<Buffer>, read: (frame: Buffer) => T | Promise<T>): Promise<T> {
    let entry = this.entries.get(key);
    if (entry) {
      this.entries.delete(key);
      this.entries.set(key, entry);
    } else {
      entry = this.load(key, load);
    }
    entry.readers += 1;
    try {
      return await read(await entry.frame);
    } finally {
      entry.readers -= 1;
      this.release(entry);
    }
  }

  private load(key: string, load: () => Promise<Buffer>): Entry {
    const entry: Entry = { frame: load(), bytes: 0, readers: 0, gone: false };
    this.entries.set(key, entry);
    entry.frame.then((frame) => {
      entry.buffer = frame;
      if (entry.gone) return;
      entry.bytes = frame.buffer.byteLength;
      this.bytes += entry.bytes;
      this.evict();
    }, () => {
      if (this.entries.get(key) === entry) this.entries.delete(key);
    });
    return entry;
  }

  private evict(): void {
    for (const [key, entry] of this.entries) {
      // Keep the newest entry even when it alone exceeds the budget; loads still in flight count 0 bytes.
      if (this.bytes <= this.budgetBytes || this.entries.size <= 1) return;
      this.drop(key, entry);
    }
  }

  private drop(key: string, entry: Entry): void {
    this.entries.delete(key);
    this.bytes -= entry.bytes;
    entry.bytes = 0;
    entry.gone = true;
    this.release(entry);
  }

  /** A dropped entry's frame goes to `dropped` once loaded and no longer read. */
  private release(entry: Entry): void {
    if (!entry.gone || entry.readers > 0 || !entry.buffer) return;
    const frame = entry.buffer;
    entry.buffer = undefined;
    this.dropped(frame);
  }

  clear(): void {
    for (const [key, entry] of [...this.entries]) this.drop(key, entry);
  }
}
