// spawnServer: it resolves once the server listens, not when its socket is bound; a server that dies before it
// serves, or never serves, is reported in one line naming how it ended, and leaves neither a process nor a socket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { accepts, run, spawnServer, stopServer } from '../../src/util/process.js';
import { UserError } from '../../src/util/errors.js';

async function scratchSocket(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-spawn-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  return path.join(dir, 'server.sock');
}

const exists = (file: string): Promise<boolean> => fs.access(file).then(() => true, () => false);

test('a server that exits before it serves: rejected with its exit and last stderr line', async (t) => {
  const socket = await scratchSocket(t);
  await assert.rejects(spawnServer('sh', ['-c', 'echo "first line" >&2; echo "cannot bind the socket" >&2; exit 3'], socket),
    new RegExp(`^Error: sh exited with 3 before it served ${socket}: cannot bind the socket$`));
  assert.equal(await exists(socket), false);
});

test('a server that says nothing before it dies: no empty ": " in the message', async (t) => {
  const socket = await scratchSocket(t);
  await assert.rejects(spawnServer('sh', ['-c', 'kill -9 $$'], socket), new RegExp(`^Error: sh exited with SIGKILL before it served ${socket}$`));
});

test('a server that never creates its socket is stopped at the timeout', async (t) => {
  const socket = await scratchSocket(t);
  // A sleep no other process runs: its argv tells whether the server outlived the timeout.
  const argv = `sleep\u0000${30 + (process.pid % 1000) / 1000}\u0000`;
  await assert.rejects(spawnServer('sleep', [argv.split('\u0000')[1] as string], socket, 300), /did not create .* within 0\.3 s/);
  for (const pid of (await fs.readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
    const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    assert.notEqual(cmdline, argv, `the server (pid ${pid}) outlived its timeout`);
  }
  assert.equal(await exists(socket), false);
});

test('a server whose socket is bound before it listens is ready once it listens', async (t) => {
  const socket = await scratchSocket(t);
  // Bound at once, listening 0.5 s later: a connect in between is refused.
  const script = 'import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ntime.sleep(0.5)\ns.listen()\ntime.sleep(30)';
  const started = Date.now();
  const child = await spawnServer('/usr/bin/python3', ['-c', script, socket], socket);
  t.after(() => stopServer(child, socket));
  assert.ok(Date.now() - started >= 450, `ready after ${Date.now() - started} ms, before it listened`);
  assert.equal(await accepts({ path: socket }), true);
});

test('a program that is not installed: one line naming it and its Debian package, from run and from spawnServer', async (t) => {
  const path0 = process.env.PATH;
  process.env.PATH = '/nonexistent/bin';
  try {
    await assert.rejects(run('qemu-img', ['info']), (err: Error) => {
      assert.ok(err instanceof UserError);
      assert.equal(err.message, 'qemu-img is not installed (not found on PATH): install the package qemu-utils (apt install qemu-utils)');
      return true;
    });
  } finally {
    process.env.PATH = path0;
  }
  const socket = path.join(await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-missing-')), 'sock');
  t.after(() => fs.rm(path.dirname(socket), { recursive: true, force: true }));
  await assert.rejects(spawnServer('/nonexistent/bin/qemu-nbd', ['-k', socket], socket), /^UserError: qemu-nbd is not installed \(no \/nonexistent\/bin\/qemu-nbd\): install the package qemu-utils/);
});
