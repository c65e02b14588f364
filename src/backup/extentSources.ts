// Other answers to "which ranges hold what" for the same export, as endpoints that read like the one they wrap
// but report extents differently, so the planner (extents/plan.ts) stays the one place that decides:
//   qemuImgExtents: -q/--qemu, extents from `qemu-img map` against the NBD export instead of NBD block status
//   denseExtents:   --no-sparse-detection, for inc/diff: every changed range is data, even where it now reads as
//                   zero (trimmed or zeroed), as virtnbdbackup 2.x does with that switch
// Guarantees: reads, writes and sizes are the wrapped endpoint's; only extents() differs (-q's map also reads a
// few bytes through it, to see the export answer while qemu-img waits on it).
import { CONTEXT_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO, type Endpoint, type StatusExtent } from '../endpoint/endpoint.js';
import type { NbdAddress } from '../endpoint/nbd.js';
import { run } from '../util/process.js';

type ExtentsFn = (context: string, offset: number, length: number) => AsyncIterable<StatusExtent>;

/** An endpoint that is `base` in every respect but its extents. */
class ExtentsOverride implements Endpoint {
  constructor(private readonly base: Endpoint, private readonly source: ExtentsFn) {}
  get size(): number { return this.base.size; }
  get maxRequestSize(): number { return this.base.maxRequestSize; }
  get parallelism(): number { return this.base.parallelism; }
  read(buffer: Buffer, offset: number): Promise<void> { return this.base.read(buffer, offset); }
  get readSummed(): Endpoint['readSummed'] { return this.base.readSummed?.bind(this.base); }
  write(buffer: Buffer, offset: number): Promise<void> { return this.base.write(buffer, offset); }
  zero(offset: number, length: number, allowTrim: boolean): Promise<void> { return this.base.zero(offset, length, allowTrim); }
  flush(): Promise<void> { return this.base.flush(); }
  extents(context: string, offset: number, length: number): AsyncIterable<StatusExtent> { return this.source(context, offset, length); }
  close(): Promise<void> { return this.base.close(); }
}

/** One entry of `qemu-img map --output=json`. */
export interface QemuMapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** `qemu-img map --output=json` with `args` (the image and how to open it), its entries in order. */
export async function qemuImgMapEntries(args: string[], signal?: AbortSignal): Promise<QemuMapEntry[]> {
  const { stdout } = await run('qemu-img', ['map', '--output=json', ...args], { signal });
  return JSON.parse(stdout) as QemuMapEntry[];
}

/** Pause between two probes of the export while a `qemu-img map` of it runs. */
const PROBE_PAUSE_MS = 1000;

/**
 * `map` (a qemu-img map of the export `base` reads), with `base` probed all along: QEMU's NBD client waits for ever
 * on a server that hangs, while a small read of ours fails after --nbd-timeout (base's stall watch) and ends it.
 */
async function watchedByProbes<T>(base: Endpoint, map: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const control = new AbortController();
  const mapped = map(control.signal);
  if (base.size === 0) return mapped;
  let done = false;
  const settled = mapped.then(() => { done = true; }, () => { done = true; });
  const probe = Buffer.alloc(Math.min(4096, base.size));
  try {
    while (!done) {
      await base.read(probe, 0);
      await Promise.race([settled, new Promise((resolve) => setTimeout(resolve, PROBE_PAUSE_MS))]);
    }
  } catch (err) {
    control.abort(err);
  }
  return mapped;
}

/**
 * NBD status flags of a qemu-img map entry. For base:allocation, data=false is a hole. With x-dirty-bitmap, qemu
 * reports the bitmap in place of allocation: a dirty range shows as data=false.
 */
export function qemuMapFlags(entry: QemuMapEntry, context: string): number {
  if (context !== CONTEXT_ALLOCATION) return entry.data ? 0 : STATE_DIRTY;
  return (entry.data ? 0 : STATE_HOLE) | (entry.zero ? STATE_ZERO : 0);
}

/** The parts of `extents` (ascending, contiguous) that fall in [offset, offset+length). */
export function* clip(extents: StatusExtent[], offset: number, length: number): Generator<StatusExtent> {
  const end = offset + length;
  for (const e of extents) {
    const from = Math.max(e.offset, offset);
    const to = Math.min(e.offset + e.length, end);
    if (to > from) yield { offset: from, length: to - from, flags: e.flags };
  }
}

async function qemuImgMap(address: NbdAddress, context: string, signal: AbortSignal): Promise<StatusExtent[]> {
  const escape = (value: string): string => value.replace(/,/g, ',,');
  const tcp = address.uri ? new URL(address.uri) : undefined;
  const server = tcp
    ? `server.type=inet,server.host=${escape(tcp.hostname.replace(/^\[(.*)\]$/, '$1'))},server.port=${tcp.port || '10809'}`
    : `server.type=unix,server.path=${escape(address.socket ?? '')}`;
  let opts = `driver=nbd,${server},export=${escape(address.exportName)}`;
  if (context !== CONTEXT_ALLOCATION) opts += `,x-dirty-bitmap=${escape(context)}`;
  const tls = address.tlsCertificates ? ['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${escape(address.tlsCertificates)}`] : [];
  if (tls.length > 0) opts += ',tls-creds=tls0';
  return (await qemuImgMapEntries([...tls, '--image-opts', opts], signal)).map((e) => ({ offset: e.start, length: e.length, flags: qemuMapFlags(e, context) }));
}

/**
 * -q/--qemu: `base` with extents from one `qemu-img map` per meta context (run once, then clipped per request);
 * a map of an export that stops answering fails as base's own requests do.
 */
export function qemuImgExtents(base: Endpoint, address: NbdAddress): Endpoint {
  const maps = new Map<string, Promise<StatusExtent[]>>();
  return new ExtentsOverride(base, async function* (context, offset, length) {
    let map = maps.get(context);
    if (!map) {
      map = watchedByProbes(base, (signal) => qemuImgMap(address, context, signal));
      maps.set(context, map);
    }
    yield* clip(await map, offset, length);
  });
}

/** --no-sparse-detection: base:allocation reports everything as data, so a changed range is never a zero frame. */
export function denseExtents(base: Endpoint): Endpoint {
  return new ExtentsOverride(base, async function* (context, offset, length) {
    if (context !== CONTEXT_ALLOCATION) {
      yield* base.extents(context, offset, length);
      return;
    }
    if (length > 0) yield { offset, length, flags: 0 };
  });
}
