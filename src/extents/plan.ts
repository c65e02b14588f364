// Decides which ranges of a disk go into a stream: `data` (read and stored) or `zero` (reads as zero, no payload).
// Full/copy: from base:allocation over the whole disk. Inc/diff: only the dirty ranges of the backup bitmap,
// each split by base:allocation, so a changed range that now reads as zero becomes a `zero` extent (exact
// restores after trim or write-zeroes). Output is ascending, non-overlapping, adjacent kinds merged.
import { CONTEXT_ALLOCATION, STATE_DIRTY, STATE_ZERO, type Endpoint, type StatusExtent } from '../endpoint/endpoint.js';

export type ExtentKind = 'data' | 'zero';

export interface PlannedExtent {
  offset: number;
  length: number;
  kind: ExtentKind;
}

export interface ExtentPlan {
  extents: PlannedExtent[];
  /** Sum of the data extents' lengths (the stream's `dataSize`). */
  dataSize: number;
}

/** Only the ZERO bit guarantees zero reads; a hole without it (e.g. over a backing file) is read as data. */
export function allocationKind(flags: number): ExtentKind {
  return flags & STATE_ZERO ? 'zero' : 'data';
}

/** Appends to `out`, merging with the last extent when it is adjacent and of the same kind. */
export function appendMerged(out: PlannedExtent[], extent: PlannedExtent): void {
  const last = out[out.length - 1];
  if (last && last.kind === extent.kind && last.offset + last.length === extent.offset) {
    last.length += extent.length;
  } else {
    out.push({ ...extent });
  }
}

function summarise(extents: PlannedExtent[]): ExtentPlan {
  let dataSize = 0;
  for (const e of extents) if (e.kind === 'data') dataSize += e.length;
  return { extents, dataSize };
}

/** Everything on the disk: allocation decides data or zero. */
export async function planFull(endpoint: Endpoint): Promise<ExtentPlan> {
  const out: PlannedExtent[] = [];
  for await (const e of endpoint.extents(CONTEXT_ALLOCATION, 0, endpoint.size)) {
    appendMerged(out, { offset: e.offset, length: e.length, kind: allocationKind(e.flags) });
  }
  return summarise(out);
}

/** Dirty ranges of `dirtyContext` only, each classified by allocation. */
export async function planDirty(endpoint: Endpoint, dirtyContext: string): Promise<ExtentPlan> {
  const dirty: StatusExtent[] = [];
  for await (const e of endpoint.extents(dirtyContext, 0, endpoint.size)) {
    if (!(e.flags & STATE_DIRTY)) continue;
    const last = dirty[dirty.length - 1];
    if (last && last.offset + last.length === e.offset) last.length += e.length;
    else dirty.push({ ...e });
  }
  const out: PlannedExtent[] = [];
  for (const range of dirty) {
    for await (const e of endpoint.extents(CONTEXT_ALLOCATION, range.offset, range.length)) {
      appendMerged(out, { offset: e.offset, length: e.length, kind: allocationKind(e.flags) });
    }
  }
  return summarise(out);
}

/** Splits [offset, offset+length) into pieces of at most `max` bytes. */
export function* chunks(offset: number, length: number, max: number): Generator<{ offset: number; length: number }> {
  for (let at = offset; at < offset + length; at += max) {
    yield { offset: at, length: Math.min(max, offset + length - at) };
  }
}
