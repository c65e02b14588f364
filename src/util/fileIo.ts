// File-system steps shared by the commands: positional reads into a caller's buffer (the stream reader's exact
// reads and the map's endpoints, which read into the NBD reply buffer, share this one loop), and making an output
// directory with the error that says why it failed.
import fs from 'node:fs/promises';
import path from 'node:path';

/**
 * mkdir -p that rejects with the real cause: Node's recursive mkdir reports ENOENT where the file system is
 * read-only, so the first missing directory is made once more on its own, which fails with EROFS (or EACCES).
 */
export async function makeDirectory(dir: string): Promise<void> {
  try {
    await fs.mkdir(dir, { recursive: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    let missing = path.resolve(dir);
    while (!(await fs.stat(path.dirname(missing)).then(() => true, () => false))) missing = path.dirname(missing);
    await fs.mkdir(missing);
    throw err;
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
