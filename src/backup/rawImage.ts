// Output type raw (-t raw): the disk as a full-size sparse image, data extents written at their offsets and
// zero extents left as holes. Reads and writes overlap within a bounded window.
import { READ_REQUEST_SIZE, type Endpoint } from '../endpoint/endpoint.js';
import { chunks, type ExtentPlan } from '../extents/plan.js';
import type { PositionalSink } from '../set/target.js';
import { WorkWindow } from '../util/window.js';

const WINDOW_BYTES = 64 * 1024 * 1024;

export async function writeRawImage(
  source: Endpoint, plan: ExtentPlan, sink: PositionalSink, onProgress?: (bytes: number) => void, signal?: AbortSignal,
): Promise<void> {
  const window = new WorkWindow(WINDOW_BYTES);
  const step = Math.min(READ_REQUEST_SIZE, source.maxRequestSize);
  try {
    for (const extent of plan.extents) {
      if (extent.kind !== 'data') continue;
      for (const piece of chunks(extent.offset, extent.length, step)) {
        if (signal?.aborted) throw signal.reason ?? new Error('aborted');
        const buffer = Buffer.allocUnsafe(piece.length);
        const work = source.read(buffer, piece.offset)
          .then(() => sink.writeAt(buffer, piece.offset))
          .then(() => onProgress?.(piece.length));
        await window.add(work, piece.length);
      }
    }
    await window.drain();
  } finally {
    await window.settle();
  }
}
