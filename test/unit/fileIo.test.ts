// makeDirectory, the commands' mkdir -p: nested directories made, existing ones and one made meanwhile accepted,
// and one line with the real cause where a directory cannot be made, without turning over forever as Node's own
// recursive mkdir does under a dangling symlink or in /proc.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { makeDirectory } from '../../src/util/fileIo.js';

test('makeDirectory makes nested directories, takes existing ones, and says why it cannot make one (dangling symlink, /proc, a file)', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-mkdir-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const nested = path.join(dir, 'a', 'b', 'c');
  await makeDirectory(nested);
  assert.ok((await fs.stat(nested)).isDirectory());
  await makeDirectory(nested);
  // Several runs making the same set at once all succeed.
  const together = path.join(dir, 'x', 'y');
  await Promise.all([makeDirectory(together), makeDirectory(together), makeDirectory(path.join(together, 'z'))]);
  assert.ok((await fs.stat(path.join(together, 'z'))).isDirectory());
  // A directory through a symlink is a directory.
  await fs.symlink(nested, path.join(dir, 'link'));
  await makeDirectory(path.join(dir, 'link', 'd'));
  assert.ok((await fs.stat(path.join(nested, 'd'))).isDirectory());

  // A mount point's link whose disk is gone: Node's recursive mkdir would spin here for ever.
  await fs.symlink(path.join(dir, 'gone', 'nas'), path.join(dir, 'dangling'));
  await assert.rejects(makeDirectory(path.join(dir, 'dangling', 'set')),
    { message: `${path.join(dir, 'dangling')} is a symbolic link to ${path.join(dir, 'gone', 'nas')}, which is not there; mount or create its target, or choose another directory` });
  await assert.rejects(makeDirectory('/proc/vnbdtest-no/set'), { message: '/proc takes no new directories; choose another directory' });
  await fs.writeFile(path.join(dir, 'afile'), '');
  await assert.rejects(makeDirectory(path.join(dir, 'afile', 'set')),
    { message: `${path.join(dir, 'afile')} is there but is not a directory; choose another directory` });
  await fs.symlink(path.join(dir, 'afile'), path.join(dir, 'tofile'));
  await assert.rejects(makeDirectory(path.join(dir, 'tofile', 'set')),
    { message: `${path.join(dir, 'tofile')} is there but is not a directory; choose another directory` });
});
