// The disk map of a backup at one point in time: sorted, non-overlapping segments, each saying where its bytes
// come from (a payload range of one stream file, or zeros); what no segment covers is a hole that reads as zero.
// Later streams are laid over earlier ones, so every byte reads from the newest stream that carries it.
// Guarantees: overlay() keeps the order and never lets two segments overlap; a cut segment still points at
// exactly its own bytes.

export interface Segment {
  /** Disk offset of the first byte. */
  start: number;
  length: number;
  /** `zero`: a zero frame; reads as zero and carries no file position. */
  kind: 'data' | 'zero';
  /** Index of the stream file in the chain. */
  file: number;
  /** Uncompressed: file offset of this segment's first byte. Compressed: file offset of its lz4 frame. */
  at: number;
  /** Size of the lz4 frame in the file; 0 for uncompressed payload. */
  packed: number;
  /** Compressed only: bytes of the decompressed frame that precede this segment's first byte. */
  skip: number;
}

export const segmentEnd = (s: Segment): number => s.start + s.length;

/** The part [from, to) of `s`, pointing at the same bytes. */
export function cut(s: Segment, from: number, to: number): Segment {
  const delta = from - s.start;
  return s.packed > 0
    ? { ...s, start: from, length: to - from, skip: s.skip + delta }
    : { ...s, start: from, length: to - from, at: s.kind === 'data' ? s.at + delta : s.at };
}

/** `top` laid over `base` (both sorted and non-overlapping): top wins wherever both have bytes. */
export function overlay(base: readonly Segment[], top: readonly Segment[]): Segment[] {
  const out: Segment[] = [];
  let i = 0;
  // The base segment being consumed, possibly already cut at its front by an earlier top segment.
  let current: Segment | undefined = base[0];
  const advance = (): void => { current = base[++i]; };
  for (const t of top) {
    const tEnd = segmentEnd(t);
    while (current && current.start < t.start) {
      if (segmentEnd(current) <= t.start) {
        out.push(current);
        advance();
      } else {
        out.push(cut(current, current.start, t.start));
        current = cut(current, t.start, segmentEnd(current));
      }
    }
    out.push(t);
    while (current && segmentEnd(current) <= tEnd) advance();
    if (current && current.start < tEnd) current = cut(current, tEnd, segmentEnd(current));
  }
  while (current) {
    out.push(current);
    advance();
  }
  return out;
}

/** `segments` up to `size` (a disk shrunk): what lies past it is dropped, a segment across it cut there. */
export function truncate(segments: readonly Segment[], size: number): Segment[] {
  const out: Segment[] = [];
  for (const s of segments) {
    if (s.start >= size) break;
    out.push(segmentEnd(s) > size ? cut(s, s.start, size) : s);
  }
  return out;
}

/** Index of the first segment that ends after `offset` (segments.length if none). */
export function firstEndingAfter(segments: readonly Segment[], offset: number): number {
  let low = 0;
  let high = segments.length;
  while (low < high) {
    const mid = (low + high) >>> 1;
    if (segmentEnd(segments[mid] as Segment) <= offset) low = mid + 1;
    else high = mid;
  }
  return low;
}
