// Decides which ranges of a disk go into a stream: `data` (read and stored) or `zero` (reads as zero, no payload).
// Full/copy: from base:allocation over the whole disk. Inc/diff: only the dirty ranges of the backup bitmap,
// each split by base:allocation, so a changed range that now reads as zero becomes a `zero` extent (exact
// restores after trim or write-zeroes). Output is ascending, non-overlapping, adjacent kinds merged.
import { CONTEXT_ALLOCATION, STATE_DIRTY, STATE_ZERO, type Endpoint } from '../endpoint/endpoint.js';

export type ExtentKind = 'data' | 'zero';

export interface PlannedExtent {
  offset: number;
  length: number;
  kind: ExtentKind;
}

/** The planned extents in order: an array, or the compact ExtentList the planners build. */
export interface ExtentSequence extends Iterable<PlannedExtent> {
  readonly length: number;
}

export interface ExtentPlan {
  extents: ExtentSequence;
  /** Sum of the data extents' lengths (the stream's `dataSize`). */
  dataSize: number;
}

/** Only the ZERO bit guarantees zero reads; a hole without it (e.g. over a backing file) is read as data. */
export function allocationKind(flags: number): ExtentKind {
  return flags & STATE_ZERO ? 'zero' : 'data';
}

const KINDS: readonly ExtentKind[] = ['data', 'zero'];

/**
 * Planned extents in typed arrays, 17 bytes each instead of an object: a disk of 100 000 small extents keeps its
 * plan in a few MB for the whole run. Appending merges with the last extent when adjacent and of the same kind.
 */
export class ExtentList implements ExtentSequence {
  private offsets = new Float64Array(256);
  private lengths = new Float64Array(256);
  private kinds = new Uint8Array(256);
  length = 0;
  /** Sum of the data extents' lengths. */
  dataSize = 0;

  append(offset: number, length: number, kind: ExtentKind): void {
    if (kind === 'data') this.dataSize += length;
    const last = this.length - 1;
    if (last >= 0 && KINDS[this.kinds[last] as number] === kind && (this.offsets[last] as number) + (this.lengths[last] as number) === offset) {
      this.lengths[last] = (this.lengths[last] as number) + length;
      return;
    }
    if (this.length === this.offsets.length) this.grow();
    this.offsets[this.length] = offset;
    this.lengths[this.length] = length;
    this.kinds[this.length] = KINDS.indexOf(kind);
    this.length++;
  }

  *[Symbol.iterator](): Iterator<PlannedExtent> {
    for (let i = 0; i < this.length; i++) {
      yield { offset: this.offsets[i] as number, length: this.lengths[i] as number, kind: KINDS[this.kinds[i] as number] as ExtentKind };
    }
  }

  private grow(): void {
    const size = this.offsets.length * 2;
    const offsets = new Float64Array(size);
    const lengths = new Float64Array(size);
    const kinds = new Uint8Array(size);
    offsets.set(this.offsets);
    lengths.set(this.lengths);
    kinds.set(this.kinds);
    this.offsets = offsets;
    this.lengths = lengths;
    this.kinds = kinds;
  }
}

/** Everything on the disk: allocation decides data or zero. */
export async function planFull(endpoint: Endpoint): Promise<ExtentPlan> {
  const out = new ExtentList();
  for await (const e of endpoint.extents(CONTEXT_ALLOCATION, 0, endpoint.size)) out.append(e.offset, e.length, allocationKind(e.flags));
  return { extents: out, dataSize: out.dataSize };
}

/** Dirty ranges of `dirtyContext` only, each classified by allocation. */
export async function planDirty(endpoint: Endpoint, dirtyContext: string): Promise<ExtentPlan> {
  const dirty = new ExtentList();
  for await (const e of endpoint.extents(dirtyContext, 0, endpoint.size)) {
    if (e.flags & STATE_DIRTY) dirty.append(e.offset, e.length, 'data');
  }
  const out = new ExtentList();
  for (const range of dirty) {
    for await (const e of endpoint.extents(CONTEXT_ALLOCATION, range.offset, range.length)) out.append(e.offset, e.length, allocationKind(e.flags));
  }
  return { extents: out, dataSize: out.dataSize };
}

/** Splits [offset, offset+length) into pieces of at most `max` bytes. */
export function* chunks(offset: number, length: number, max: number): Generator<{ offset: number; length: number }> {
  for (let at = offset; at < offset + length; at += max) {
    yield { offset: at, length: Math.min(max, offset + length - at) };
  }
}
