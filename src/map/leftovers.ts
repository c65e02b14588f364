// What virtnbdmap runs that are gone left behind (default sockets, copy-on-write overlays), found by the pid their
// names hold. Guarantees: only entries of our own user that `isOurs` accepts; an entry whose name also holds its
// process's start (in clock ticks since boot) is reported exactly when no process of that pid and start runs, with
// no clock involved; one without is never reported while its pid runs, unless `mtimeTellsReuse` (sockets, which a
// caller also checks for a listener).
import fs from 'node:fs/promises';
import type { Stats } from 'node:fs';
import path from 'node:path';
import { processRuns, processStart } from '../util/process.js';

/** Clock ticks per second of /proc/<pid>/stat's start time (USER_HZ, 100 on every Linux architecture). */
const TICKS_PER_SECOND = 100;

/**
 * When process `pid` started, in ms since the epoch, or undefined when it is gone. Boot time counts whole seconds,
 * so this is up to a second early, never late.
 */
async function processStartedAt(pid: number): Promise<number | undefined> {
  const ticks = Number(processStart(pid));
  const boot = Number(/^btime (\d+)$/m.exec(await fs.readFile('/proc/stat', 'utf8').catch(() => ''))?.[1]);
  return Number.isFinite(ticks) && boot ? boot * 1000 + (ticks * 1000) / TICKS_PER_SECOND : undefined;
}

/**
 * The entries of `dir` whose name `pidInName` matches (group 1: the pid of the run that made it; an optional group 2:
 * that process's start, processStart's ticks), whose run is gone: no process has the pid, or the one that has it is
 * another (its start differs from the name's; without one in the name and with `mtimeTellsReuse`, it started after
 * the entry last changed: a wall-clock comparison, which a clock step can fool). Only our own user's entries that
 * `isOurs` accepts: in a shared /var/tmp, another user could plant one.
 */
export async function leftoversOfGoneRuns(dir: string, pidInName: RegExp, isOurs: (stat: Stats) => boolean, { mtimeTellsReuse = false } = {}): Promise<Array<{ file: string; pid: number }>> {
  const found: Array<{ file: string; pid: number }> = [];
  for (const name of await fs.readdir(dir).catch(() => [] as string[])) {
    const match = pidInName.exec(name);
    const pid = Number(match?.[1]);
    if (!pid || pid === process.pid) continue;
    const file = path.join(dir, name);
    const stat = await fs.lstat(file).catch(() => undefined);
    if (!stat || stat.uid !== process.getuid?.() || !isOurs(stat)) continue;
    const startInName = match?.[2];
    const gone = !processRuns(pid)
      || (startInName !== undefined ? processStart(pid) !== startInName : mtimeTellsReuse && ((await processStartedAt(pid)) ?? 0) > stat.mtimeMs);
    if (gone) found.push({ file, pid });
  }
  return found;
}
