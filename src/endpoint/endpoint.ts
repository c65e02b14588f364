// The one endpoint abstraction behind backup, restore and map: a block device you can read, write, zero,
// flush and ask for extents. The copy loops know nothing of what kind of endpoint they talk to.

/** base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO) and the dirty flag of qemu:dirty-bitmap contexts. */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;
export const STATE_DIRTY = 1;
export const CONTEXT_ALLOCATION = 'base:allocation';

/**
 * Size of the read requests the copy loops send to a source (a QEMU NBD export). QEMU allocates a buffer per
 * request; at 1 MiB or more glibc maps each one fresh and QEMU faults in every page it serves (650 000 faults and
 * about 0.8 CPU-s for 2.5 GiB), while at 512 KiB it mostly reuses its heap. A full stream of 2.5 GiB went from
 * 2.8-3.2 s to 2.3-2.5 s, a raw image (-t raw, 4 MiB reads before) from 5.7-6.0 s to 4.4-4.9 s.
 */
export const READ_REQUEST_SIZE = 512 * 1024;

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
