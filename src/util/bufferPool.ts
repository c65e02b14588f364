// Reusable fixed-size buffers for the copy loops: large Buffer.allocUnsafe calls are fresh mmaps that the GC
// frees late, which costs page faults and lets RSS grow; a small pool keeps both flat.
export class BufferPool {
  private readonly free: Buffer[] = [];

  constructor(readonly slabSize: number, private readonly keep: number) {}

  /**
   * A buffer of exactly `length` bytes: a pooled slab's view when it fits, else a fresh allocation. Small
   * requests get their own small buffer: thousands of tiny extents in flight must not each pin a slab.
   */
  acquire(length: number): Buffer {
    if (length > this.slabSize || length <= this.slabSize / 8) return Buffer.allocUnsafe(length);
    const slab = this.free.pop() ?? Buffer.allocUnsafe(this.slabSize);
    return slab.subarray(0, length);
  }

  /** Gives a buffer from acquire() back once nothing reads or writes it any more. */
  release(buffer: Buffer): void {
    if (buffer.buffer.byteLength !== this.slabSize || this.free.length >= this.keep) return;
    this.free.push(Buffer.from(buffer.buffer, buffer.byteOffset, this.slabSize));
  }
}
