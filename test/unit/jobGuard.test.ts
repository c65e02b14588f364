// The job guard's word on a run's death, with a fake virsh on PATH that records what it was asked: a run that dies
// after its job began has the job ended; one that dies before the job began, or ended its job itself, leaves the
// domain's jobs alone (another tool's job there must survive).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const jobGuard = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/backup/jobGuard.js');

/** Runs a program that guards a job on domain 'dom', does `steps`, then exits; returns what the fake virsh was asked. */
async function runGuarded(steps: string): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-guard-'));
  try {
    const record = path.join(dir, 'asked');
    const socket = path.join(dir, 'socket');
    await fs.writeFile(socket, '');
    await fs.writeFile(path.join(dir, 'virsh'), `#!/bin/sh\necho "$@" >> ${JSON.stringify(record)}\n`, { mode: 0o755 });
    const script = `import { guardJob } from ${JSON.stringify(jobGuard)};
      const guard = guardJob('qemu:///system', 'dom', ${JSON.stringify(socket)});
      ${steps}
      process.exit(0);`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      stdio: 'inherit', env: { ...process.env, PATH: `${dir}:${process.env.PATH}` },
    });
    assert.equal(await new Promise((resolve) => child.once('exit', resolve)), 0);
    // The guard acts once the pipe closes, in a session of its own: give it a moment.
    for (let waited = 0; waited < 1500; waited += 100) {
      const asked = await fs.readFile(record, 'utf8').catch(() => '');
      if (asked) return `${asked.trim()}${await fs.access(socket).then(() => '', () => ' (socket removed)')}`;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    return '';
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

test('a run that dies once its job has begun has the job ended, and its socket removed', async () => {
  assert.equal(await runGuarded('guard.arm();'), '-q -c qemu:///system domjobabort dom (socket removed)');
});

test('a run that dies before its job began leaves the domain\'s jobs alone', async () => {
  assert.equal(await runGuarded(''), '');
});

test('a run that ended its job itself leaves the domain\'s jobs alone, armed or not', async () => {
  assert.equal(await runGuarded('guard.arm(); await guard.release();'), '');
  assert.equal(await runGuarded('await guard.release();'), '');
});
