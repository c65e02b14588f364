// Records when a copy's stages run (source reads, lz4 compression, direct disk writes, the final sync) for the file named by
// VIRTNBD_STAGE_TRACE, written once when the process exits, and sums such a record up: the bench shows with it
// which stage bounds a copy. Guarantees: unset (the default), a traced call costs one comparison and nothing is kept.
// The global `performance` (not node:perf_hooks) so that an untraced run never loads the perf_hooks modules.
import fs from 'node:fs';

export const STAGES = ['read', 'compress', 'diskWrite', 'sync'] as const;
export type Stage = (typeof STAGES)[number];

/** Environment variable naming the file the trace goes to. */
export const STAGE_TRACE_ENV = 'VIRTNBD_STAGE_TRACE';

/** One event: the stage, +1 when a call starts and -1 when it settles, and the time in ms. */
export type StageEvent = [stage: Stage, change: 1 | -1, atMs: number];

const traceFile = process.env[STAGE_TRACE_ENV];
const events: StageEvent[] | undefined = traceFile ? [] : undefined;
if (traceFile && events) process.on('exit', () => fs.writeFileSync(traceFile, JSON.stringify(events)));

/** Runs `call`, recorded as one span of `stage` while tracing. */
export function traced<T>(stage: Stage, call: () => Promise<T>): Promise<T> {
  if (!events) return call();
  events.push([stage, 1, performance.now()]);
  return call().finally(() => events.push([stage, -1, performance.now()]));
}

export interface StageSummary {
  /** From the first event to the last. */
  spanMs: number;
  /** Share of the span with at least one call of the stage running (0..1). */
  busy: Record<Stage, number>;
  /** Calls of the stage running, averaged over the span. */
  meanRunning: Record<Stage, number>;
}

export function summarizeStages(events: readonly StageEvent[]): StageSummary {
  const ordered = [...events].sort((a, b) => a[2] - b[2]);
  const first = ordered[0]?.[2] ?? 0;
  const spanMs = (ordered.at(-1)?.[2] ?? 0) - first;
  const perStage = (value: (stage: Stage) => number): Record<Stage, number> =>
    Object.fromEntries(STAGES.map((s) => [s, value(s)])) as Record<Stage, number>;
  const running = perStage(() => 0);
  const busyMs = perStage(() => 0);
  const areaMs = perStage(() => 0);
  let last = first;
  for (const [stage, change, at] of ordered) {
    for (const s of STAGES) {
      if (running[s] > 0) busyMs[s] += at - last;
      areaMs[s] += running[s] * (at - last);
    }
    running[stage] += change;
    last = at;
  }
  const share = (ms: Record<Stage, number>): Record<Stage, number> => perStage((s) => (spanMs > 0 ? ms[s] / spanMs : 0));
  return { spanMs, busy: share(busyMs), meanRunning: share(areaMs) };
}
