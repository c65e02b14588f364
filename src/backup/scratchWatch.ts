// Watches the file system of a running backup job's scratch files (--scratchdir), on the domain's host: this one
// (statfs) or another one (`stat -f` through one ssh session). Guest writes during the job keep the old data there,
// and when it is full QEMU fails the guest's writes (QEMU 7's copy-before-write breaks the guest, not the backup:
// seen here as "write failed: No space left on device" inside the domain). Guarantees: once the free space falls
// below the margin, the run is stopped (so the job ends and the guest writes as before) with one line saying why
// and what to do; looks that fail (another host's ssh gone) are one warning, and the run goes on unwatched; the
// looks come every 100 ms, off the copy's path, and end with stop(). The first look comes
// before the run's plan (openScratchSpace), which may move a chain aside, and before the job starts: neither happens
// with less than MIN_SCRATCH_FREE free there, or with a directory that is not there (on this host or another).
import fs from 'node:fs/promises';
import readline from 'node:readline';
import { UserError, describeFailure, oneLine } from '../util/errors.js';
import type { Logger } from '../util/log.js';
import type { DomainHost, SshHost } from '../libvirt/domainHost.js';
import { shellQuote } from '../util/process.js';

const MiB = 1024 * 1024;
const LOOK_EVERY_MS = 100;
/** The free space kept: a quarter of what was free at the start, at most this. */
const MAX_MARGIN = 256 * MiB;
/**
 * Less free space than this at the start, and a job is not started (another host's: stopped at the first look).
 * Guest writes would fill it between two looks: with 1 MiB free, a guest write failed before the first look.
 */
export const MIN_SCRATCH_FREE = 64 * MiB;
/** How long another host may take to give the first figure. */
const REMOTE_START_MS = 15_000;

export interface ScratchWatch {
  stop(): void;
}

/** The free bytes of the scratch file system as last seen; close() ends what looks. */
interface FreeSpace {
  read(): Promise<number>;
  close(): void;
}

function localFreeSpace(dir: string): FreeSpace {
  return {
    read: async () => {
      const st = await fs.statfs(dir);
      return st.bavail * st.bsize;
    },
    close: () => undefined,
  };
}

/** The remote look's line for a scratch directory that does not exist there, or is no directory. */
const NO_DIRECTORY = 'no-directory';

class NoScratchDirectory extends Error {}

/** One ssh session prints the free bytes every 100 ms; read() gives the latest. Resolves at the first figure. */
async function remoteFreeSpace(ssh: SshHost, dir: string): Promise<FreeSpace> {
  // No cd: a loop whose working directory is the scratch directory would keep its file system busy (umount).
  // A directory that is not there is said so (a line of its own), as on this host: QEMU's job would fail on it.
  const script = `[ -d ${shellQuote(dir)} ] || { echo ${NO_DIRECTORY}; exit 1; }; while stat -f -c '%a %S' -- ${shellQuote(dir)}; do sleep ${LOOK_EVERY_MS / 1000}; done`;
  const { child, lastWords } = ssh.spawn(script, 'ignore', 'pipe', true);
  let latest: number | undefined;
  /** Why the session ended (a host gone silent: ssh's keepalives), once it has. */
  let ended: string | undefined;
  const sessionEnded = new Promise<string>((resolve) => child.once('close', () => resolve(ended = lastWords() ?? `ssh to ${ssh.label} ended`)));
  const first = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer from ${ssh.label} within ${REMOTE_START_MS / 1000} s`)), REMOTE_START_MS);
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      if (line.trim() === NO_DIRECTORY) reject(new NoScratchDirectory());
      const [blocks, size] = line.trim().split(/\s+/).map(Number);
      if (blocks === undefined || size === undefined || Number.isNaN(blocks * size)) return;
      latest = blocks * size;
      clearTimeout(timer);
      resolve();
    });
    void sessionEnded.then((why) => {
      clearTimeout(timer);
      reject(new Error(why));
    });
    child.once('error', (err) => reject(err));
  });
  try {
    await first;
  } catch (err) {
    child.kill();
    throw err;
  }
  return {
    read: async () => {
      if (ended !== undefined) throw new Error(ended);
      return latest as number;
    },
    close: () => child.kill(),
  };
}

/** Whether `a` and `b` are on one file system (either missing: no). */
async function sameFileSystem(a: string, b: string): Promise<boolean> {
  const [sa, sb] = await Promise.all([fs.stat(a), fs.stat(b)]).catch(() => [undefined, undefined]);
  return sa !== undefined && sa.dev === sb?.dev;
}

/** The scratch directory for messages: its path, with the host when that is another one. */
export function scratchLocation(host: DomainHost, dir: string): string {
  return host.remote ? `${dir} on ${host.label}` : dir;
}

function mib(bytes: number): string {
  return `${Math.round(bytes / MiB)} MiB`;
}

/** The warning of a run whose scratch directory nobody can watch. */
function warnUnwatched(log: Logger, where: string, reason: string): void {
  log.warn(`cannot watch the free space of the scratch directory ${where}: ${reason}`);
}

function tooLittleSpace(where: string, free: number, domain: string): UserError {
  return new UserError(`the scratch directory ${where} has only ${mib(free)} free, less than the ${mib(MIN_SCRATCH_FREE)} a backup job of '${domain}' starts with: guest writes during the backup keep the old data there, and QEMU fails the guest's writes once it is full; give --scratchdir a directory with more free space, or free space there`);
}

/** The free space of a job's scratch file system, first looked at before the job starts. */
export interface ScratchSpace {
  /** For messages: the directory, with its host when that is another one. */
  where: string;
  /** Free bytes before the job started. */
  atStart: number;
  read(): Promise<number>;
  /** Ends the looks (another host's ssh session). */
  close(): void;
}

/** The line for a scratch directory `where` that is not there, or is no directory. */
export function noScratchDirectory(where: string): UserError {
  return new UserError(`the scratch directory ${where} does not exist or is no directory: create it, or give --scratchdir an existing directory (QEMU keeps the old data of guest writes there during the backup)`);
}

/**
 * Looks at the scratch directory `dir` on `host` before a job starts, and refuses the job when it is not there
 * (libvirt's own words name a scratch file, not the option, and come after a full removed the old chain's
 * checkpoints) or has less than MIN_SCRATCH_FREE free. Another
 * host's looks come through one ssh session, kept for the watch. Undefined where nobody can look (the job's start
 * then names a problem with the directory); another host's with a warning, as its run then goes unwatched.
 */
export async function openScratchSpace(host: DomainHost, dir: string, domain: string, log: Logger): Promise<ScratchSpace | undefined> {
  const where = scratchLocation(host, dir);
  let space: FreeSpace;
  if (host.remote) {
    try {
      space = await remoteFreeSpace(host, dir);
    } catch (err) {
      // Refused as on this host: the run went on, removed a full's old checkpoints, then QEMU failed the job on it.
      if (err instanceof NoScratchDirectory) throw noScratchDirectory(where);
      warnUnwatched(log, where, oneLine(err));
      return undefined;
    }
  } else {
    const isDir = await fs.stat(dir).then((st) => st.isDirectory(), () => false);
    if (!isDir) throw noScratchDirectory(where);
    space = localFreeSpace(dir);
  }
  const atStart = await space.read().catch((err: unknown) => {
    warnUnwatched(log, where, describeFailure(err));
    return undefined;
  });
  if (atStart === undefined) {
    space.close();
    return undefined;
  }
  if (atStart < MIN_SCRATCH_FREE) {
    space.close();
    throw tooLittleSpace(where, atStart, domain);
  }
  return { where, atStart, read: () => space.read(), close: () => space.close() };
}

/**
 * Watches `space` every 100 ms while the job runs; `onNearlyFull` gets the error to stop the run with, once.
 * `output`: the set's directory when the scratch directory is on this host too, whose growth is named as a cause
 * when it shares the file system. stop() ends the looks and closes `space`.
 */
export function watchScratch(space: ScratchSpace, dir: string, domain: string, output: string | undefined, log: Logger, onNearlyFull: (err: UserError) => void): ScratchWatch {
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const stop = (): void => {
    stopped = true;
    clearInterval(timer);
    space.close();
  };
  const { atStart, where } = space;
  const margin = Math.min(MAX_MARGIN, Math.floor(atStart / 4));
  const begin = async (): Promise<void> => {
    const shared = output !== undefined && (await sameFileSystem(dir, output));
    const why = shared
      ? `it keeps the old data of guest writes during the backup, and the backup set ${output} grows on the same file system`
      : 'guest writes during the backup keep the old data there';
    const remedy = shared ? 'give --scratchdir a directory on another file system, or free space' : 'give --scratchdir a directory with more free space (up to the data the backup copies)';
    log.debug(`scratch directory ${where}: ${mib(atStart)} free; the run stops should less than ${mib(margin)} be left`);
    if (stopped) return;
    let looking = false;
    timer = setInterval(() => {
      if (looking) return;
      looking = true;
      space.read().then((free) => {
        if (free >= margin || stopped) return;
        stop();
        onNearlyFull(new UserError(`the scratch directory ${where} is nearly full (${mib(free)} of ${mib(atStart)} left): ${why}, and QEMU would fail the guest's writes once it is full, so the backup of '${domain}' was stopped; ${remedy}`));
      }, (err: unknown) => {
        // The looks failed (another host's ssh gone, the directory removed): the backup goes on, said once.
        if (stopped) return;
        stop();
        log.warn(`the free space of the scratch directory ${where} can no longer be read (${oneLine(err)}): the backup of '${domain}' goes on unwatched, and guest writes that fill it would fail in the guest; watch it yourself`);
      }).finally(() => { looking = false; });
    }, LOOK_EVERY_MS);
    timer.unref();
  };
  begin().catch((err: unknown) => {
    if (!stopped) warnUnwatched(log, where, describeFailure(err));
    stop();
  });
  return { stop };
}
