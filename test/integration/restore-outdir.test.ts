// The output directory of a restore that fails: what the run made for -o (the directory and its missing parents)
// goes again where it is left empty, here and on another host (-U qemu+ssh://, this machine through a private
// sshd); a directory that was there before is kept. (A failure while the disks are written: remote.test.ts and
// restore-crafted.test.ts.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { withTempDir } from '../support/testbed.js';
import { errorLines, ourBin, runCli } from '../support/cli.js';
import { randomSet } from '../support/craftedSet.js';
import { freePort, withPrivateSshd } from '../support/sshd.js';

test('-o whose making fails part way (a name too long under a missing parent): the parent the run made goes again, here and on another host; one that was there is kept', async (t) => {
  const sshd = await withPrivateSshd(t);
  const work = await withTempDir(t, 'vnbd-outdir-');
  const { set } = await randomSet(work, { vda: 1 });
  const long = 'x'.repeat(300);
  for (const remote of [[], ['-U', sshd.libvirtUri, '-P', String(await freePort())]]) {
    const where = remote.length > 0 ? ' on root@127.0.0.1' : '';
    const made = path.join(work, 'made');
    const out = path.join(made, 'deeper', long);
    const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', ...remote]);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(errorLines(r).length, 1, r.stderr);
    assert.match(errorLines(r)[0] as string, new RegExp(`^virtnbdrestore: error: cannot create output directory ${out}${where}: .*(too long)`, 'i'));
    // It left made/deeper behind, empty.
    await assert.rejects(fs.access(made), `the directories the run made${where} are left`);

    const existing = path.join(work, 'existing');
    await fs.mkdir(existing);
    const again = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(existing, long), '-n', ...remote]);
    assert.equal(again.code, 1, again.stderr);
    assert.deepEqual(await fs.readdir(existing), []);
    await fs.rmdir(existing);
  }
});
