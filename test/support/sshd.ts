// A private OpenSSH server on 127.0.0.1 for the remote-domain tests: its own host key, client key and authorized
// keys in a scratch dir, a free port, and nothing of the machine's ssh set-up touched. This machine then plays the
// "remote" KVM host of a qemu+ssh:// URI. Its sessions do not read root's ~/.bashrc (on these machines pyenv's
// set-up, 0.6 s for each of a run's tens of commands): the server runs in a mount namespace of its own where that
// file reads empty, while mounts made here later (a test's tmpfs) still show through.
// Guarantees: the server is stopped and its dir removed when the test ends.
import type { TestContext } from 'node:test';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { run, tempDir, withTempDir } from './testbed.js';
import { cleanup } from './cleanup.js';
import { accepts } from '../../src/util/process.js';

export interface PrivateSshd {
  /** The listening server's pid. */
  pid: number;
  port: number;
  /** The client's private key. */
  keyfile: string;
  /** libvirt URI of this machine's libvirtd through the server, as root. */
  libvirtUri: string;
}

/** A TCP port nobody listens on right now. */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export async function withPrivateSshd(t: TestContext): Promise<PrivateSshd> {
  // Removed once the server has exited, not before: it writes its log there until then (an rm racing it failed on
  // the directory, not empty).
  const dir = await tempDir('sshd-');
  await fs.chmod(dir, 0o700);
  const keyfile = path.join(dir, 'id');
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'host_key')]);
  await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', keyfile]);
  await fs.copyFile(`${keyfile}.pub`, path.join(dir, 'authorized_keys'));
  const port = await freePort();
  const config = path.join(dir, 'sshd_config');
  await fs.writeFile(config, [
    `Port ${port}`, 'ListenAddress 127.0.0.1', `HostKey ${path.join(dir, 'host_key')}`,
    `AuthorizedKeysFile ${path.join(dir, 'authorized_keys')}`, 'PermitRootLogin prohibit-password',
    'PasswordAuthentication no', 'KbdInteractiveAuthentication no', 'UsePAM no', 'StrictModes no',
    `PidFile ${path.join(dir, 'sshd.pid')}`, '',
  ].join('\n'));
  await fs.mkdir('/run/sshd', { recursive: true, mode: 0o755 }); // sshd's privilege separation directory
  const serve = `[ -f "$HOME/.bashrc" ] && mount --bind /dev/null "$HOME/.bashrc"; exec /usr/sbin/sshd -D -f "$1" -E "$2"`;
  const sshd = spawn('unshare', ['--mount', '--propagation', 'slave', '--', 'sh', '-c', serve, 'sshd', config, path.join(dir, 'sshd.log')], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => sshd.once('exit', () => resolve()));
  // Should its clean-up not run (the test file cancelled at its timeout), the server neither holds the test process
  // open nor outlives it.
  const stopAtExit = (): void => { sshd.kill(); };
  process.once('exit', stopAtExit);
  sshd.unref();
  cleanup(t, async () => {
    process.off('exit', stopAtExit);
    sshd.ref(); // so that its exit, awaited here, keeps the event loop going
    sshd.kill();
    await exited;
    // The sshd of a connection may outlive the listener by a moment and write its last log line meanwhile.
    for (let attempt = 1; ; attempt++) {
      try {
        await fs.rm(dir, { recursive: true, force: true });
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOTEMPTY' || attempt >= 50) throw err;
        await sleep(100);
      }
    }
  });
  for (let i = 0; i < 100 && !(await accepts({ host: '127.0.0.1', port })); i++) {
    if (sshd.exitCode !== null) break;
    await sleep(50);
  }
  if (!(await accepts({ host: '127.0.0.1', port }))) {
    const log = await fs.readFile(path.join(dir, 'sshd.log'), 'utf8').catch(() => '');
    throw new Error(`the private sshd did not start on port ${port}: ${log.trim()}`);
  }
  return { pid: sshd.pid as number, port, keyfile, libvirtUri: `qemu+ssh://root@127.0.0.1:${port}/system?keyfile=${keyfile}&no_verify=1` };
}

/**
 * The server's own processes: the listener and the sshd of every connection and session, not the commands they
 * run. Stopped (SIGSTOP), they leave the host up, and every ssh connection to it silent, as a hung sshd or
 * network would.
 */
async function sshdProcesses(sshd: PrivateSshd): Promise<number[]> {
  const parents = new Map<number, number[]>();
  for (const entry of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await fs.readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '');
    // pid (comm) state ppid ...: comm may hold spaces and parentheses, so the fields count from the last ')'.
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    if (!parents.has(ppid)) parents.set(ppid, []);
    parents.get(ppid)?.push(Number(entry));
  }
  const found: number[] = [];
  const visit = async (pid: number): Promise<void> => {
    const comm = (await fs.readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim();
    if (comm !== 'sshd') return;
    found.push(pid);
    for (const child of parents.get(pid) ?? []) await visit(child);
  };
  await visit(sshd.pid);
  return found;
}

/** Sends `signal` to the server's own processes (sshdProcesses): SIGSTOP silences the host's ssh, SIGCONT ends that. */
export async function signalSshd(sshd: PrivateSshd, signal: NodeJS.Signals): Promise<void> {
  for (const pid of await sshdProcesses(sshd)) process.kill(pid, signal);
}

/**
 * A directory with an `ssh` that runs the system's with a config for `sshd` (its port, the client key, no host key
 * check), as a user's ~/.ssh/config would give: put first on PATH, commands reach the private sshd with a URI that
 * carries no ssh settings (qemu+tcp://127.0.0.1/...), while the machine's ssh set-up stays untouched.
 */
export async function sshConfiguredFor(t: TestContext, sshd: PrivateSshd): Promise<string> {
  const dir = await withTempDir(t, 'sshconf-');
  const config = path.join(dir, 'config');
  await fs.writeFile(config, ['Host 127.0.0.1', `  Port ${sshd.port}`, `  IdentityFile ${sshd.keyfile}`, '  StrictHostKeyChecking no',
    '  UserKnownHostsFile /dev/null', '  LogLevel ERROR', ''].join('\n'));
  await fs.writeFile(path.join(dir, 'ssh'), `#!/bin/sh\nexec /usr/bin/ssh -F ${config} "$@"\n`, { mode: 0o755 });
  return dir;
}
