// Reusable buffers for the copy loops and the map's server: large Buffer.allocUnsafe calls are fresh mmaps that the
// GC frees late, and small ones each carry their own ArrayBuffer, freed only by the GC; pools keep page faults and
// RSS flat.
// Guarantees: a buffer handed out is used by nobody else until it is released; memory kept is bounded.

/** Node serves smaller Buffer.allocUnsafe calls from a shared slab, which must never be pooled here. */
const SMALLEST_CLASS = 4096;
/** Bytes each small size class keeps for reuse. */
const SMALL_CLASS_KEEP_BYTES = 2 * 1024 * 1024;

export class BufferPool {
  private readonly free: Buffer[] = [];
  /** Free small buffers by size class (powers of two from SMALLEST_CLASS up to slabSize / 8). */
  private readonly smallFree = new Map<number, Buffer[]>();

  constructor(readonly slabSize: number, private keep: number) {}

  /** Keeps at most `keep` free slabs from now on, dropping any beyond that. */
  setKeep(keep: number): void {
    this.keep = keep;
    this.free.length = Math.min(this.free.length, keep);
  }

  /**
   * A buffer of exactly `length` bytes: a pooled slab's view when it fits, a view of a pooled buffer of its size
   * class when it is small (thousands of tiny extents in flight must not each pin a slab), else a fresh allocation.
   */
  acquire(length: number): Buffer {
    if (length > this.slabSize) return Buffer.allocUnsafe(length);
    if (length <= this.slabSize / 8) {
      const size = sizeClass(length);
      return (this.smallFree.get(size)?.pop() ?? Buffer.allocUnsafeSlow(size)).subarray(0, length);
    }
    const slab = this.free.pop() ?? Buffer.allocUnsafe(this.slabSize);
    return slab.subarray(0, length);
  }

  /** Gives a buffer from acquire() back once nothing reads or writes it any more. */
  release(buffer: Buffer): void {
    const size = buffer.buffer.byteLength;
    if (size === this.slabSize) {
      if (this.free.length < this.keep) this.free.push(Buffer.from(buffer.buffer, buffer.byteOffset, this.slabSize));
      return;
    }
    if (size > this.slabSize / 8 || size !== sizeClass(size)) return;
    let list = this.smallFree.get(size);
    if (!list) this.smallFree.set(size, list = []);
    if (list.length < Math.max(16, SMALL_CLASS_KEEP_BYTES / size)) list.push(Buffer.from(buffer.buffer, 0, size));
  }
}

/** The power of two at or above `length`, at least SMALLEST_CLASS. */
function sizeClass(length: number): number {
  return Math.max(SMALLEST_CLASS, 2 ** Math.ceil(Math.log2(Math.max(length, 1))));
}

/** Process-wide pools by slab size, with the slabs their leases ask to keep: the sum over running leases. */
const sharedPools = new Map<number, { pool: BufferPool; leased: number; largest: number; idle?: NodeJS.Timeout }>();

/**
 * How long a shared pool keeps its free slabs once no lease runs: long enough for the next disk of a run, whose
 * extents may take seconds to plan; then a program using the engine as a library lets the GC have them.
 */
const IDLE_KEEP_MS = 10_000;

/**
 * A pool of `slabSize` slabs shared by the process's users, which keeps `keep` more free slabs while the lease runs:
 * users one after another (the disks of a run) reuse the same slabs, where pools of their own were freed by the
 * GC only late (four disks in turn peaked 50 MB above one). Once no lease runs, it keeps the largest lease's number
 * for `idleKeepMs`, then none.
 */
export function leasePool(slabSize: number, keep: number, idleKeepMs = IDLE_KEEP_MS): { pool: BufferPool; end(): void } {
  let shared = sharedPools.get(slabSize);
  if (!shared) sharedPools.set(slabSize, (shared = { pool: new BufferPool(slabSize, 0), leased: 0, largest: 0 }));
  const entry = shared;
  clearTimeout(entry.idle);
  entry.leased += keep;
  entry.largest = Math.max(entry.largest, keep);
  entry.pool.setKeep(Math.max(entry.leased, entry.largest));
  let ended = false;
  return {
    pool: entry.pool,
    end: () => {
      if (ended) return;
      ended = true;
      entry.leased -= keep;
      entry.pool.setKeep(Math.max(entry.leased, entry.largest));
      if (entry.leased > 0) return;
      entry.idle = setTimeout(() => entry.pool.setKeep(0), idleKeepMs);
      entry.idle.unref();
    },
  };
}

/**
 * Buffers of many sizes, each used by one holder at a time (the map's lz4 frames, the packed bytes they come from
 * and its NBD read replies), in power-of-two classes from `smallest`: a buffer given back is lent out again for any
 * length of its class, and at most `keepBytes` of free ones are kept, the rest left to the GC.
 */
export class SizeClassPool {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;

  constructor(private readonly keepBytes: number, private readonly smallest = 64 * 1024) {}

  /** Bytes the buffer for `length` takes: its class. */
  capacityFor(length: number): number {
    return Math.max(this.smallest, sizeClass(length));
  }

  /** A buffer of exactly `length` bytes, a view of a free one of its class when there is one. */
  acquire(length: number): Buffer {
    const size = this.capacityFor(length);
    const reused = this.free.get(size)?.pop();
    if (reused) this.freeBytes -= size;
    return (reused ?? Buffer.allocUnsafeSlow(size)).subarray(0, length);
  }

  /** Gives a buffer from acquire() back once nothing reads or writes it any more. */
  release(buffer: Buffer): void {
    const size = buffer.buffer.byteLength;
    if (size !== this.capacityFor(size) || this.freeBytes + size > this.keepBytes) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, list = []);
    list.push(Buffer.from(buffer.buffer, 0, size));
    this.freeBytes += size;
  }

  /** Drops every free buffer. */
  clear(): void {
    this.free.clear();
    this.freeBytes = 0;
  }
}
