// Run locks: one backup at a time per domain and per output directory. A lock is a file created whole (written
// beside its name, then linked to it) holding the owner's pid and process start time; a lock whose owner is gone
// (crash, kill -9) is stale and taken over, and so is an empty one (left by an earlier version killed between
// creating and writing it) once it is 10 s old; runningWriter tells readers of a set whether a backup is writing
// into it. Guarantees: a second run refuses with the owner's pid and the lock's path; locks are removed on release
// and, as a last resort, when the process exits.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { UserError, describeFailure } from '../util/errors.js';
import { processStart } from '../util/process.js';
import { linkNewName } from '../util/fileIo.js';

/** Name of the lock file inside an output directory (moved aside never, listed as a set file never). */
export const OUTPUT_LOCK_NAME = '.virtnbdbackup.lock';

interface Owner {
  pid: number;
  /** Process start time in clock ticks since boot (/proc/<pid>/stat field 22); tells pid reuse apart. */
  start: string;
}

function parseOwner(text: string): Owner | undefined {
  try {
    const owner = JSON.parse(text) as Partial<Owner>;
    return typeof owner.pid === 'number' && typeof owner.start === 'string' ? { pid: owner.pid, start: owner.start } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A lock that names no owner is being written by its owner (on a file system without hard links, which creates it
 * empty first), unless it is older than this: then its owner was killed in between (kill -9; an earlier version
 * always created it empty), and it would otherwise hold for ever.
 */
const UNWRITTEN_LOCK_MS = 10_000;

/**
 * Whether the owner of the lock `file`, which reads `text`, still runs. A lock that names no owner counts as alive
 * (never stolen) for UNWRITTEN_LOCK_MS from its creation, stale after.
 */
function ownerAlive(file: string, text: string): boolean {
  const owner = parseOwner(text);
  if (!owner) {
    const age = Date.now() - (fs.statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? Date.now());
    return age < UNWRITTEN_LOCK_MS;
  }
  return processStart(owner.pid) === owner.start;
}

/**
 * The backup writing into the set `dir` right now, by its lock: its pid (0 when the lock does not say), or
 * undefined when none is. Tells a `.partial` being written from one left by a run that died.
 */
export async function runningWriter(dir: string): Promise<number | undefined> {
  const file = path.join(dir, OUTPUT_LOCK_NAME);
  const text = await fsp.readFile(file, 'utf8').catch(() => undefined);
  if (text === undefined || !ownerAlive(file, text)) return (await partialWriter(dir))?.pid;
  return parseOwner(text)?.pid ?? 0;
}

/**
 * A process of this host other than this one that holds a `.partial` of the set `dir` open for writing: a backup
 * that takes no lock of ours (Python's virtnbdbackup), writing into the set right now. Its `.partial` was called a
 * failed run's, to be moved out of the set, which would have failed that backup (found by a black-box round).
 */
export async function partialWriter(dir: string): Promise<{ pid: number; program: string; file: string } | undefined> {
  const real = await fsp.realpath(dir).catch(() => path.resolve(dir));
  const pids = (await fsp.readdir('/proc').catch(() => [] as string[])).filter((n) => /^\d+$/.test(n) && Number(n) !== process.pid);
  for (const pid of pids) {
    for (const fd of await fsp.readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
      const target = await fsp.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      if (!target.endsWith('.partial') || path.dirname(target) !== real) continue;
      const flags = /^flags:\s*([0-7]+)/m.exec(await fsp.readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8').catch(() => ''))?.[1];
      // O_WRONLY or O_RDWR: a reader (a verify) is no writer.
      if (flags === undefined || (parseInt(flags, 8) & 3) === 0) continue;
      const program = (await fsp.readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim() || 'unknown program';
      return { pid: Number(pid), program, file: path.basename(target) };
    }
  }
  return undefined;
}

/**
 * Why the set `dir` holds a `.partial`, in words: a run that died, or one writing now (`writing`; then `action` it
 * once it has ended).
 */
export async function partialCause(dir: string, action: string): Promise<{ text: string; writing: boolean }> {
  const writer = await runningWriter(dir);
  if (writer === undefined) return { text: 'left from a failed backup run', writing: false };
  return { text: `being written by a running backup${writer ? ` (pid ${writer})` : ''}: ${action} once it has ended`, writing: true };
}

const held = new Set<string>();
/** Locks this process took over from a run that died (kill -9, a crash): its job may still be ending (its guard). */
const takenOver = new Set<string>();
let exitHookInstalled = false;

/** Whether this process took the lock `file` over from a run that died, not from no one. */
export function tookOverFromDeadRun(file: string): boolean {
  return takenOver.has(file);
}

function removeHeldLocks(): void {
  for (const file of held) fs.rmSync(file, { force: true });
}

export class RunLock {
  private constructor(readonly file: string, private readonly content: string) {}

  /** Takes the lock `file` for `what` ("domain webvm"), or throws a UserError naming the running owner. */
  static async acquire(file: string, what: string): Promise<RunLock> {
    const content = JSON.stringify({ pid: process.pid, start: processStart(process.pid) ?? '' });
    await removeStaleDrafts(file);
    let stale = false;
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        await createWhole(file, content);
        if (!exitHookInstalled) {
          exitHookInstalled = true;
          process.once('exit', removeHeldLocks);
        }
        held.add(file);
        if (stale) takenOver.add(file);
        return new RunLock(file, content);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw new UserError(`cannot create lock file ${file}: ${describeFailure(err)}`);
        }
      }
      const existing = await fsp.readFile(file, 'utf8').catch(() => undefined);
      if (existing === undefined) continue; // released meanwhile
      if (ownerAlive(file, existing)) {
        const pid = parseOwner(existing)?.pid;
        throw new UserError(`${what} is in use by another backup${pid ? ` (pid ${pid})` : ''}: lock ${file}; wait for it to finish, or remove the lock if that process is gone`);
      }
      await takeOverStale(file, existing);
      stale = true;
    }
    throw new UserError(`cannot take lock ${file}: it keeps changing; another backup of the same ${what} is starting`);
  }

  /** Removes the lock if it is still ours. */
  async release(): Promise<void> {
    held.delete(this.file);
    takenOver.delete(this.file);
    const current = await fsp.readFile(this.file, 'utf8').catch(() => undefined);
    if (current === this.content) await fsp.rm(this.file, { force: true });
  }
}

/**
 * Removes what runs killed while taking lock `file` left beside it (`<file>.<pid>.new`, written whole before it is
 * linked as the lock): they would pile up in /run/lock, one per kill.
 */
async function removeStaleDrafts(file: string): Promise<void> {
  const dir = path.dirname(file);
  const prefix = `${path.basename(file)}.`;
  const names = await fsp.readdir(dir).catch(() => [] as string[]);
  for (const name of names.filter((n) => n.startsWith(prefix) && /^\d+\.new$/.test(n.slice(prefix.length)))) {
    const draft = path.join(dir, name);
    const text = await fsp.readFile(draft, 'utf8').catch(() => undefined);
    if (text !== undefined && !ownerAlive(draft, text)) await fsp.rm(draft, { force: true });
  }
}

/**
 * Creates `file` holding `content`, failing with EEXIST where it exists: written beside it, then hard-linked to its
 * name, so that no one ever reads it empty (an empty lock is taken over once old). Where the file system has no hard
 * links, an exclusive create and a write.
 */
async function createWhole(file: string, content: string): Promise<void> {
  const beside = `${file}.${process.pid}.new`;
  await fsp.writeFile(beside, content, { mode: 0o644 });
  try {
    await linkNewName(beside, file, () => fsp.writeFile(file, content, { flag: 'wx', mode: 0o644 }));
  } finally {
    await fsp.rm(beside, { force: true });
  }
}

/**
 * Moves a stale lock out of the way atomically (rename), so that two runs taking over at once cannot delete
 * each other's fresh lock; a fresh lock renamed by mistake is put back.
 */
async function takeOverStale(file: string, staleContent: string): Promise<void> {
  const aside = `${file}.stale.${process.pid}`;
  try {
    await fsp.rename(file, aside);
  } catch {
    return; // someone else moved it
  }
  const moved = await fsp.readFile(aside, 'utf8').catch(() => staleContent);
  if (moved !== staleContent) await fsp.link(aside, file).catch(() => undefined);
  await fsp.rm(aside, { force: true });
}

/** Where per-domain locks live: /run/lock when it is writable (root), else /var/tmp. */
function domainLockDir(): string {
  try {
    fs.accessSync('/run/lock', fs.constants.W_OK);
    return '/run/lock';
  } catch {
    return '/var/tmp';
  }
}

/**
 * Longest lock file name kept whole: its drafts add `.<pid>.new` or `.stale.<pid>` within a name's 255 bytes. A
 * domain name of 60 Cyrillic letters (escaped, 6 bytes each) made a run fail with "the name is too long".
 */
const MAX_LOCK_NAME = 200;

/** The lock of `domain` of this host, or of another host's (`host`, from a remote URI: names repeat across hosts). */
export function domainLockFile(domain: string, host?: string): string {
  const where = host ? `${encodeURIComponent(host)}.` : '';
  const name = `virtnbdbackup.${where}${encodeURIComponent(domain)}.lock`;
  if (name.length <= MAX_LOCK_NAME) return path.join(domainLockDir(), name);
  // Cut, with a digest of the whole name so that names alike up to the cut keep locks of their own.
  const digest = createHash('sha256').update(`${where}${domain}`).digest('hex').slice(0, 16);
  return path.join(domainLockDir(), `${name.slice(0, MAX_LOCK_NAME - 22)}-${digest}.lock`);
}

/** Locks the domain (of `host` when remote) and, when given, the output directory; returns the release of both. */
export async function lockRun(domain: string, outputDir: string | undefined, host?: string): Promise<() => Promise<void>> {
  const domainLock = await RunLock.acquire(domainLockFile(domain, host), host ? `domain '${domain}' of ${host}` : `domain '${domain}'`);
  let outputLock: RunLock | undefined;
  try {
    if (outputDir) {
      const take = (): Promise<RunLock> => RunLock.acquire(path.join(outputDir, OUTPUT_LOCK_NAME), `output directory ${outputDir}`);
      // A run that made the same new directory a moment ago and was refused the domain removes it as it leaves
      // (it wrote nothing there): made again, as this run made it before.
      outputLock = await take().catch(async (err: unknown) => {
        if (await fsp.stat(outputDir).then(() => true, () => false)) throw err;
        await fsp.mkdir(outputDir, { recursive: true });
        return take();
      });
    }
  } catch (err) {
    await domainLock.release();
    throw err;
  }
  return async () => {
    await outputLock?.release();
    await domainLock.release();
  };
}
