// Merges adjacent status extents with equal flags into one, so a block-status reply names each run once
// however it was assembled (segments of several streams, overlay blocks). Empty extents are dropped.
import type { StatusExtent } from '../endpoint/endpoint.js';

export async function* coalesce(extents: AsyncIterable<StatusExtent> | Iterable<StatusExtent>): AsyncGenerator<StatusExtent> {
  let run: StatusExtent | undefined;
  for await (const extent of extents) {
    if (extent.length <= 0) continue;
    if (run && run.flags === extent.flags && run.offset + run.length === extent.offset) {
      run.length += extent.length;
      continue;
    }
    if (run) yield run;
    run = { ...extent };
  }
  if (run) yield run;
}
