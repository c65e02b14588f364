// File-system steps shared by the commands: positional reads into a caller's buffer (the stream reader's exact
// reads and the map's endpoints, which read into the NBD reply buffer, share this one loop), and making an output
// directory with the error that says why it failed.
import fs from 'node:fs/promises';
import path from 'node:path';

/** Whether `file` is a directory, following symbolic links. */
async function isDirectory(file: string): Promise<boolean> {
  return fs.stat(file).then((st) => st.isDirectory(), () => false);
}

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
