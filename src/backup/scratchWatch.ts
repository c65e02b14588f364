// Watches the file system of a running backup job's scratch files (--scratchdir). Guest writes during the job keep
// the old data there, and when it is full QEMU fails the guest's writes (QEMU 7's copy-before-write breaks the guest,
// not the backup: seen here as "write failed: No space left on device" inside the domain). Guarantees: once the
// free space falls below the margin, the run is stopped (so the job ends and the guest writes as before) with one
// line saying why and what to do; the looks are a statfs every 100 ms, off the copy's path, and end with stop().
import fs from 'node:fs/promises';
import { UserError, describeFailure } from '../util/errors.js';
import type { Logger } from '../util/log.js';

const MiB = 1024 * 1024;
const LOOK_EVERY_MS = 100;
/** The free space kept: a quarter of what was free at the start, at most this. */
const MAX_MARGIN = 256 * MiB;

export interface ScratchWatch {
  stop(): void;
}

function mib(bytes: number): string {
  return `${Math.round(bytes / MiB)} MiB`;
}

/** Whether `a` and `b` are on one file system (either missing: no). */
async function sameFileSystem(a: string, b: string): Promise<boolean> {
  const [sa, sb] = await Promise.all([fs.stat(a), fs.stat(b)]).catch(() => [undefined, undefined]);
  return sa !== undefined && sa.dev === sb?.dev;
}

/**
 * Starts watching `dir`; `onNearlyFull` gets the error to stop the run with, once. `output`: the set's directory,
 * whose growth is named as a cause when it shares the file system.
 */
export async function watchScratch(dir: string, domain: string, output: string | undefined, log: Logger, onNearlyFull: (err: UserError) => void): Promise<ScratchWatch> {
  const freeBytes = async (): Promise<number> => {
    const st = await fs.statfs(dir);
    return st.bavail * st.bsize;
  };
  let atStart: number;
  try {
    atStart = await freeBytes();
  } catch (err) {
    log.warn(`cannot watch the free space of the scratch directory ${dir}: ${describeFailure(err)}`);
    return { stop: () => undefined };
  }
  const margin = Math.min(MAX_MARGIN, Math.floor(atStart / 4));
  const shared = output !== undefined && (await sameFileSystem(dir, output));
  const why = shared
    ? `it keeps the old data of guest writes during the backup, and the backup set ${output} grows on the same file system`
    : 'guest writes during the backup keep the old data there';
  const remedy = shared ? 'give --scratchdir a directory on another file system, or free space' : 'give --scratchdir a directory with more free space (up to the data the backup copies)';
  log.debug(`scratch directory ${dir}: ${mib(atStart)} free; the run stops should less than ${mib(margin)} be left`);
  let looking = false;
  const timer = setInterval(() => {
    if (looking) return;
    looking = true;
    freeBytes().then((free) => {
      if (free >= margin) return;
      clearInterval(timer);
      onNearlyFull(new UserError(`the scratch directory ${dir} is nearly full (${mib(free)} of ${mib(atStart)} left): ${why}, and QEMU would fail the guest's writes once it is full, so the backup of '${domain}' was stopped; ${remedy}`));
    }, () => undefined).finally(() => { looking = false; });
  }, LOOK_EVERY_MS);
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
