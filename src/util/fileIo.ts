// Positional reads into a caller's buffer: the stream reader's exact reads and the map's endpoints (which read
// into the NBD reply buffer) share this one loop.
import type fs from 'node:fs/promises';

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
