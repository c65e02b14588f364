// Opening libvirt against fake daemons on a unix socket: one that accepts and never answers, one that hangs up.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { openLibvirt, withOurSsh } from '../../src/libvirt/connection.js';

/** A unix socket server that does `onClient` with each connection; closed, with its clients, after the test. */
async function fakeDaemon(t: TestContext, onClient: (socket: net.Socket) => void): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-fake-libvirtd-'));
  const socketPath = path.join(dir, 'libvirt-sock');
  const clients = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    clients.add(socket);
    socket.on('error', () => undefined);
    onClient(socket);
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  t.after(async () => {
    // Hanging up ends libvirt's open still waiting on its thread, so that nothing keeps this process alive.
    for (const client of clients) client.destroy();
    await new Promise((resolve) => server.close(resolve));
    await fs.rm(dir, { recursive: true, force: true });
  });
  return `qemu+unix:///system?socket=${socketPath}`;
}

test('an open that a daemon accepts and never answers gives up after the silence allowed, with one line saying what to do', async (t) => {
  const uri = await fakeDaemon(t, () => undefined);
  const started = Date.now();
  await assert.rejects(openLibvirt(uri, undefined, 1), (err: Error) => {
    assert.equal(err.message, `libvirtd at ${uri} answered nothing for 1 s (hung, or its host unreachable?): check it with 'virsh -c ${uri} version', or raise --nbd-timeout (0 waits forever)`);
    return true;
  });
  const seconds = (Date.now() - started) / 1000;
  assert.ok(seconds >= 0.9 && seconds < 10, `gave up after ${seconds} s`);
});

test('a program that gave up on a hung daemon exits on its own: the open left waiting keeps nothing alive', async (t) => {
  const uri = await fakeDaemon(t, () => undefined);
  const connection = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/libvirt/connection.js');
  const script = `import { openLibvirt } from ${JSON.stringify(connection)};
    await openLibvirt(${JSON.stringify(uri)}, undefined, 1).catch((err) => console.log(err.message));`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => { output += chunk.toString(); });
  const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  clearTimeout(timer);
  // The daemon still holds the connection open: only the abandoned open could have kept the child waiting.
  assert.equal(code, 0, 'the child was killed after 15 s: the abandoned open kept it alive');
  assert.match(output, /answered nothing for 1 s/);
});

test('a daemon that hangs up at once fails the open with libvirt\'s words and the advice, whatever the silence allowed', async (t) => {
  const uri = await fakeDaemon(t, (socket) => socket.destroy());
  for (const silence of [undefined, 0, 30]) {
    await assert.rejects(openLibvirt(uri, undefined, silence), (err: Error) => {
      assert.match(err.message, /^cannot connect to libvirt at qemu\+unix:\/\/\/system\?socket=\S+: .+; is libvirtd running\?$/);
      return true;
    });
  }
});

test('an ssh URI runs libexec/libvirt-ssh as libvirt\'s ssh, which ignores a terminal\'s Ctrl-C; other URIs, and one naming its own command, are left as given', async () => {
  const ours = withOurSsh('qemu+ssh://root@kvm1:2222/system?keyfile=/k&no_verify=1');
  const command = new URL(ours).searchParams.get('command') ?? '';
  assert.match(ours, /^qemu\+ssh:\/\/root@kvm1:2222\/system\?keyfile=\/k&no_verify=1&command=/);
  assert.equal(path.basename(command), 'libvirt-ssh');
  await fs.access(command, fs.constants.X_OK);
  assert.equal(new URL(withOurSsh('qemu+ssh://kvm1/system')).searchParams.get('command'), command);
  for (const uri of ['qemu:///system', 'qemu+tcp://kvm1/system', 'qemu+libssh://kvm1/system', 'qemu+ssh://kvm1/system?command=/usr/local/bin/myssh']) {
    assert.equal(withOurSsh(uri), uri);
  }
  // The ssh it starts (here a stand-in on PATH that prints its ignored signals) has SIGHUP, SIGINT, SIGQUIT and SIGTERM ignored.
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-libvirt-ssh-'));
  try {
    await fs.writeFile(path.join(dir, 'ssh'), '#!/bin/sh\nsed -n "s/^SigIgn:\\t//p" /proc/$$/status; echo "$@"\n', { mode: 0o755 });
    const child = spawn(command, ['-p', '22', 'kvm1', 'sh -c x'], { env: { ...process.env, PATH: `${dir}:${process.env.PATH ?? ''}` }, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    assert.equal(await new Promise((resolve) => child.once('close', resolve)), 0);
    const [mask, args] = out.trim().split('\n');
    const ignored = BigInt(`0x${mask}`);
    for (const signal of [1, 2, 3, 15]) assert.equal((ignored >> BigInt(signal - 1)) & 1n, 1n, `signal ${signal} is not ignored: ${mask}`);
    assert.equal(args, '-p 22 kvm1 sh -c x');
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
