// The one endpoint abstraction behind backup, restore and map: a block device you can read, write, zero,
// flush and ask for extents. The copy loops know nothing of what kind of endpoint they talk to.

/** base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO) and the dirty flag of qemu:dirty-bitmap contexts. */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;
export const STATE_DIRTY = 1;
export const CONTEXT_ALLOCATION = 'base:allocation';

/**
 * Size of the read requests the copy loops send to a source (a QEMU NBD export). QEMU allocates a buffer per
 * request from glibc's heap, which it gives back to the kernel (brk) once about 2 MiB lie free at its top, and
 * then faults the pages in again. Up to four pieces are read at once (four connections), each with two
 * requests in flight (native/nbd_handle.cc, kReadsAhead): two 256 KiB requests a connection measured 0 to 300
 * faults a run, three 17 000 to 28 000 on some domains; four 512 KiB buffers, one a connection, pass that line.
 * Whether they ended at the heap's top varied with QEMU's history (a fresh domain's first run mostly not, most
 * later runs and some fresh domains yes); where they did, a run cost QEMU 110 000 to 168 000 faults and about
 * 2 CPU-s more, and a full stream of 2.5 GiB took 4.9 to 6.2 s in place of 3.3 to 4.0 s. Four of 256 KiB stay
 * below it (measured alternately, 2026-11-28). At 1 MiB or more glibc maps each buffer fresh; 128 KiB costs QEMU
 * more per byte.
 */
export const READ_REQUEST_SIZE = 256 * 1024;

/** What readSummed computes besides reading. */
export interface ReadSums {
  adler: boolean;
  digest?: 'blake3';
}

/** A run of bytes with the same status flags in one meta context. */
export interface StatusExtent {
  offset: number;
  length: number;
  flags: number;
}

export interface Endpoint {
  /** Size of the device in bytes. */
  readonly size: number;
  /** Largest single read or write the endpoint accepts. */
  readonly maxRequestSize: number;
  /** Requests the endpoint can usefully have in flight at once. */
  readonly parallelism: number;
  /** Fills `buffer` from `offset`. */
  read(buffer: Buffer, offset: number): Promise<void>;
  /**
   * Where the endpoint can: read() that also sums the bytes as they arrive, while they are in the cache: their
   * adler32 with `adler` (else 1, the adler32 of nothing) and, with `digest`, their BLAKE3 digest (hex).
   */
  readSummed?(buffer: Buffer, offset: number, sums: ReadSums): Promise<{ adler32: number; digest?: string }>;
  write(buffer: Buffer, offset: number): Promise<void>;
  /** Makes [offset, offset+length) read as zero; `allowTrim` lets the endpoint deallocate. */
  zero(offset: number, length: number, allowTrim: boolean): Promise<void>;
  flush(): Promise<void>;
  /** Status extents covering [offset, offset+length) in order, for a meta context the endpoint was opened with. */
  extents(context: string, offset: number, length: number): AsyncIterable<StatusExtent>;
  close(): Promise<void>;
}
