// A least-recently-used cache of decompressed lz4 frames, bounded in bytes, so that small random reads inside
// one large frame decompress it once. Guarantees: concurrent requests for one frame share one decompression;
// a failed load is not cached; memory stays under the budget plus the frames being used right now.

export class FrameCache {
  /** Map order is recency order: the first entry is the least recently used. */
  private readonly entries = new Map<string, { frame: Promise<Buffer>; bytes: number }>();
  private bytes = 0;

  constructor(private readonly budgetBytes: number) {}

  /** The frame under `key`, loaded with `load` when it is not cached. */
  get(key: string, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.entries.get(key);
    if (hit) {
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit.frame;
    }
    const entry = { frame: load(), bytes: 0 };
    this.entries.set(key, entry);
    entry.frame.then((frame) => {
      if (this.entries.get(key) !== entry) return;
      entry.bytes = frame.length;
      this.bytes += frame.length;
      this.evict();
    }, () => {
      if (this.entries.get(key) === entry) this.entries.delete(key);
    });
    return entry.frame;
  }

  private evict(): void {
    for (const [key, entry] of this.entries) {
      // Keep the newest entry even when it alone exceeds the budget; loads still in flight count 0 bytes.
      if (this.bytes <= this.budgetBytes || this.entries.size <= 1) return;
      this.entries.delete(key);
      this.bytes -= entry.bytes;
    }
  }

  clear(): void {
    this.entries.clear();
    this.bytes = 0;
  }
}
