// Errors a user can act on: one line naming the thing and what to do, and the exit code to leave with.
// Guarantees: the CLI prints `message` alone for a UserError; anything else is a bug and gets its stack with -v.
import os from 'node:os';

export class UserError extends Error {
  readonly exitCode: number;
  constructor(message: string, exitCode = 1) {
    super(message);
    this.name = 'UserError';
    this.exitCode = exitCode;
  }
}

/** Whether `err`, or an error it wraps (`cause`), was raised by the native `library` ('libnbd', 'libvirt', 'lz4'). */
export function raisedBy(err: unknown, library: string): boolean {
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    if ((e as { library?: string }).library === library) return true;
  }
  return false;
}

/** Message of any thrown value, first line only, for one-line reports. */
export function oneLine(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  return text.split('\n').map((l) => l.trim()).filter(Boolean).join(' ');
}

const ERRNO_HINTS: Record<string, string> = {
  ENOSPC: 'no space left on device; free space or choose another output directory',
  EDQUOT: 'disk quota exceeded; free space or choose another output directory',
  EACCES: 'permission denied; check the directory permissions',
  EROFS: 'read-only file system; choose another output directory',
  EPERM: 'operation not permitted there (a system or special file system?); choose another place',
  ENOTDIR: 'a part of the path is a file, not a directory; check the path',
  ENAMETOOLONG: 'the name is too long; choose a shorter path',
  EIO: 'I/O error on the output device',
  EPIPE: 'the reader of the output went away (broken pipe); check the command the output is piped into',
};

/**
 * The errno name of `err` or an error it wraps: Node's own (`code: 'ENOSPC'`), or libnbd's errno number, which
 * also carries what an NBD server (qemu-nbd) answered to a request.
 */
export function errnoOf(err: unknown): string | undefined {
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && code.startsWith('E')) return code;
    if (typeof code === 'number' && (e as { library?: string }).library === 'libnbd') {
      return Object.entries(os.constants.errno).find(([, n]) => n === code)?.[0];
    }
  }
  return undefined;
}

/**
 * Out of space or quota, whichever call met it (a file write, or qemu-nbd's answer to an NBD write): what to do,
 * else undefined. Only writes fail so, so the output is at fault.
 */
export function outOfSpace(err: unknown): string | undefined {
  const code = errnoOf(err);
  return code === 'ENOSPC' || code === 'EDQUOT' ? inWords(ERRNO_HINTS, code, err) : undefined;
}

const READ_ERRNO_WORDS: Record<string, string> = {
  ENOENT: 'no such file or directory',
  EACCES: 'permission denied',
  ENOTDIR: 'a part of the path is not a directory',
  EISDIR: 'it is a directory',
  EIO: 'I/O error',
};

/** `words` for errno `code` followed by the code, "no such file or directory (ENOENT)"; else `err`'s own line. */
function inWords(words: Record<string, string>, code: string | undefined, err: unknown): string {
  return code && words[code] ? `${words[code]} (${code})` : oneLine(err);
}

/** A failed read or open in words, with its errno code: "no such file or directory (ENOENT)". */
export function describeReadFailure(err: unknown): string {
  return inWords(READ_ERRNO_WORDS, (err as NodeJS.ErrnoException | undefined)?.code, err);
}

/** A one-line description of a file-system failure, with what to do when its Node errno code says it. */
export function describeFailure(err: unknown): string {
  return inWords(ERRNO_HINTS, (err as NodeJS.ErrnoException | undefined)?.code, err);
}
