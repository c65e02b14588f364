// File-system steps shared by the commands: positional reads into a caller's buffer (the stream reader's exact
// reads and the map's endpoints, which read into the NBD reply buffer, share this one loop), whole positional
// writes (the map's copy-on-write overlay: a short write is no success), the kernel asked to
// read ahead of a sequential reader, a new name linked to a whole file, and making an output directory with the
// error that says why it failed.
import fs from 'node:fs/promises';
import path from 'node:path';
import { native } from '../native/addon.js';

/**
 * How far ahead of a sequential reader the kernel is asked to fetch its file (POSIX_FADV_WILLNEED), a step at a
 * time: a backup set read cold from the disk (a restore's usual case) otherwise waits for each piece in turn, with
 * only the kernel's own readahead in flight. A cold restore of 2.5 GiB of random data (the page cache dropped before
 * each), alternately, 7 rounds: 4.7 to 6.3 s and 4.1 to 6.2 CPU-s of system time without; 3.0 to 3.5 s and 1.8 to
 * 2.0 with 16 or 32 MiB ahead, 3.4 to 3.8 s with 8 MiB, 3.3 to 3.7 s with 64 MiB; from the page cache, 1.6 to 2.1 s.
 */
const READ_AHEAD_BYTES = 32 * 1024 * 1024;
const READ_AHEAD_STEP = 8 * 1024 * 1024;

/** Keeps the kernel reading up to READ_AHEAD_BYTES past a sequential reader's position in one open file. */
export class ReadAhead {
  /** Where the kernel has been asked to read to. */
  private asked = 0;

  constructor(private readonly handle: fs.FileHandle) {}

  /** The reader is at `position` and will read on up to `end` (the file's end, or its extent's). A hint only. */
  at(position: number, end: number): void {
    const want = Math.min(end, position + READ_AHEAD_BYTES);
    if (want - this.asked < READ_AHEAD_STEP && want < end) return;
    const from = Math.max(this.asked, position);
    if (want > from) native().readAhead(this.handle.fd, from, want - from).catch(() => undefined);
    this.asked = Math.max(this.asked, want);
  }
}

/** Whether `file` is a directory, following symbolic links. */
async function isDirectory(file: string): Promise<boolean> {
  return fs.stat(file).then((st) => st.isDirectory(), () => false);
}

/** What link() fails with where the file system has no hard links (some network and FAT ones). */
const NO_HARD_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS']);

/**
 * Gives `file` the further name `name`, which must not exist (link() fails with EEXIST then): a hard link, so the
 * name appears with the file whole. Where the file system has no hard links, `instead` runs in its place. Resolves
 * to whether it linked.
 */
export async function linkNewName(file: string, name: string, instead: () => Promise<void>): Promise<boolean> {
  try {
    await fs.link(file, name);
    return true;
  } catch (err) {
    if (!NO_HARD_LINKS.has((err as NodeJS.ErrnoException).code ?? '')) throw err;
    await instead();
    return false;
  }
}

/** Whether `file` is there (a dangling symbolic link is not). */
export const exists = (file: string): Promise<boolean> => fs.access(file).then(() => true, () => false);

/**
 * mkdir -p, one directory at a time from the nearest one there, rejecting with the real cause. Not Node's recursive
 * mkdir: it turns over forever at 100 % CPU where a directory is there but takes no new entry with ENOENT (a
 * dangling symlink, such as a mount point's link with the disk gone, or a path in /proc), and it reports ENOENT
 * where the file system is read-only (EROFS) or closed to this user (EACCES).
 */
export async function makeDirectory(dir: string): Promise<void> {
  const missing: string[] = [];
  for (let at = path.resolve(dir); !(await isDirectory(at)); at = path.dirname(at)) {
    missing.unshift(at);
    if (path.dirname(at) === at) break;
  }
  for (const one of missing) {
    try {
      await fs.mkdir(one);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') {
        const found = await fs.stat(one).catch(() => undefined);
        if (found?.isDirectory()) continue; // made meanwhile by another run
        // The name is there (mkdir saw it); where stat finds nothing behind it, it is a link to nothing.
        const link = found ? undefined : await fs.readlink(one).catch(() => undefined);
        if (link !== undefined) throw new Error(`${one} is a symbolic link to ${link}, which is not there; mount or create its target, or choose another directory`);
        throw new Error(`${one} is there but is not a directory; choose another directory`);
      }
      if (code === 'ENOENT') throw new Error(`${path.dirname(one)} takes no new directories; choose another directory`);
      throw err;
    }
  }
}

/** Reads into all of `target` from `position`, stopping early only at end of file; returns the bytes read. */
export async function readInto(handle: fs.FileHandle, target: Buffer, position: number): Promise<number> {
  let done = 0;
  while (done < target.length) {
    const { bytesRead } = await handle.read(target, done, target.length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/**
 * Writes all of `buffer` at `position`. A write may take only part of it (a file system filling up, a file reaching
 * its size limit: ext4's is 16 TiB less 4 KiB); the rest is written on, and the failure that stopped it thrown.
 */
export async function writeAt(handle: fs.FileHandle, buffer: Buffer, position: number): Promise<void> {
  for (let done = 0; done < buffer.length;) {
    const { bytesWritten } = await handle.write(buffer, done, buffer.length - done, position + done);
    if (bytesWritten === 0) throw Object.assign(new Error(`wrote nothing at byte ${position + done}`), { code: 'EIO' });
    done += bytesWritten;
  }
}
