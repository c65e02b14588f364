// Runs helper programs (qemu-img, qemu-nbd) without a shell; failures become errors carrying their stderr.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { UserError, describeFailure } from './errors.js';

export interface RunResult { stdout: string; stderr: string }

/**
 * Started under nohup, as the launcher (bin/) says: Node resets every signal's handling as it starts, so the
 * launcher's shell reads it. Such a run outlives its terminal, and so do the helpers it starts: every helper runs
 * in a session of its own, where neither the hangup nor the Ctrl-C sent to the run's process group reaches it; the
 * run stops its helpers itself, and those bound to it (boundToUs) die with it.
 */
export const OUTLIVES_TERMINAL = process.env.VIRTNBD_SIGHUP_IGNORED === '1';

/** How long a readiness probe waits for a connect: a listening server on any reachable host answers far sooner. */
const ACCEPT_PROBE_MS = 2000;

/** Whether a server accepts connections at `where`: a TCP host and port, or a unix socket's path. */
export function accepts(where: net.NetConnectOpts, timeoutMs = ACCEPT_PROBE_MS): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(where);
    // A host whose firewall drops the probe would hold it for minutes: no answer in time counts as no.
    const timer = setTimeout(() => { socket.destroy(); resolve(false); }, timeoutMs);
    socket.once('connect', () => { clearTimeout(timer); socket.destroy(); resolve(true); });
    socket.once('error', () => { clearTimeout(timer); resolve(false); });
  });
}

/** One word for a POSIX shell: single-quoted, with embedded quotes closed and escaped. */
export function shellQuote(word: string): string {
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

/** The Debian package of each program we run, for the line that says it is missing. */
const PACKAGE_OF: Record<string, string> = {
  'qemu-img': 'qemu-utils', 'qemu-nbd': 'qemu-utils', 'qemu-io': 'qemu-utils', nbdkit: 'nbdkit', ssh: 'openssh-client', setpriv: 'util-linux', logger: 'bsdutils',
};

/** The Debian package that holds `program`, where it is one of ours. */
export function packageOf(program: string): string | undefined {
  return PACKAGE_OF[program];
}

/** The one line for a program that is not on PATH. */
export function notInstalled(command: string): UserError {
  const name = command.split('/').pop() as string;
  const pkg = PACKAGE_OF[name];
  return new UserError(`${name} is not installed (${command.includes('/') ? `no ${command}` : 'not found on PATH'})${pkg ? `: install the package ${pkg} (apt install ${pkg})` : ''}`);
}

/**
 * `command` and `args` as setpriv runs them with a parent-death signal: the kernel sends it SIGTERM when this process
 * ends, so it never outlives us, even after kill -9. setpriv missing fails the spawn (ENOENT); a `command` it cannot
 * run makes it exit 127.
 */
export function boundToUs(command: string, args: string[]): [string, string[]] {
  return ['setpriv', ['--pdeathsig', 'SIGTERM', '--', command, ...args]];
}

export interface RunOptions {
  /** Aborted: the command is killed (SIGTERM), and run rejects with the signal's reason once it is gone. */
  signal?: AbortSignal;
  /** Ends with this process (boundToUs): for long work on files that only this run would clean up. */
  bound?: boolean;
}

/** Runs `command` to its end; rejects with its last line of stderr when it fails. */
export function run(command: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    // With `signal`, Node kills the child on abort and reports it as an 'error' (an AbortError) at once, before
    // the child is gone: the rejection waits for its 'close'.
    const { signal: abort } = options;
    const [program, programArgs] = options.bound ? boundToUs(command, args) : [command, args];
    // A session of its own, as servers have (spawnServer): a terminal's Ctrl-C reaches the run, which stops what it
    // started (`signal`), and not a qemu-img that would fail first and be reported as the run's failure.
    const child = spawn(program, programArgs, { stdio: ['ignore', 'pipe', 'pipe'], detached: true, signal: abort });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => { stdout += text; });
    child.stderr.setEncoding('utf8').on('data', (text: string) => { stderr += text; });
    child.once('error', (err: NodeJS.ErrnoException) => {
      if (abort?.aborted) {
        if (child.pid === undefined || hasExited(child)) reject(abort.reason);
        return;
      }
      if (err.code === 'ENOENT') reject(notInstalled(options.bound ? 'setpriv' : command));
      else reject(new Error(`${command} failed: ${err.message}`));
    });
    child.once('close', (code, signal) => {
      if (abort?.aborted) {
        reject(abort.reason);
        return;
      }
      if (code === 0) {
        resolve({ stdout, stderr });
        return;
      }
      if (options.bound && code === 127) {
        reject(notInstalled(command));
        return;
      }
      const detail = stderr.trim().split('\n').pop() || (signal ? `killed by ${signal}` : `exited with code ${code}`);
      reject(new Error(`${command} failed: ${detail}`));
    });
  });
}

/**
 * glibc settings for the NBD servers we start (qemu-nbd):
 * - each request's buffer is a fresh malloc, and by default glibc hands the freed megabytes back to the kernel at
 *   once, so the next request faults them in and zeroes them again. Keeping them (mmap threshold 32 MiB, trim
 *   threshold 512 MiB) took a 2.5 GiB restore from about 3.7 s to 3.0 s here, qemu-nbd's system time from 2.1 to
 *   0.8 s;
 * - `hugetlb=1` has glibc ask for transparent huge pages for its heap. qemu-nbd writes the image with direct I/O
 *   from those buffers, and a 4 MiB write from 4 KiB pages reached this virtio disk as 5 to 8 requests, from huge
 *   pages as about one: a 2.5 GiB restore took 2.1 to 2.4 s against 2.8 to 3.1 s.
 * A GLIBC_TUNABLES of the caller's still wins (the later entry).
 */
const SERVER_TUNABLES = 'glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=536870912:glibc.malloc.hugetlb=1';

function serverEnvironment(): NodeJS.ProcessEnv {
  const own = process.env.GLIBC_TUNABLES;
  return { ...process.env, GLIBC_TUNABLES: own ? `${SERVER_TUNABLES}:${own}` : SERVER_TUNABLES };
}

/** Process `pid`'s start time in clock ticks since boot (/proc/<pid>/stat field 22), which tells a reused pid apart. */
export function processStart(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/**
 * Whether process `pid` exists (one of another user's, which we may not signal, too) and has not ended: a zombie,
 * ended but not yet reaped by its parent (one that does not wait, an init slow to reap orphans), holds nothing.
 */
export function processRuns(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^[ZX]/.test(stat.slice(stat.lastIndexOf(')') + 2));
  } catch {
    return true;
  }
}

/** Listening sockets in /proc/net/unix carry __SO_ACCEPTCON in their flags column. */
const ACCEPTS_CONNECTIONS = 0x10000;

/**
 * Whether a unix socket bound at `socketPath` listens. A server binds its socket before it listens, and a connect in
 * between is refused (seen under load: qemu-nbd's socket there, "Connection refused"). A probe connection would
 * count as qemu-nbd's one client, so the kernel's table tells instead; where it cannot be read, the path alone does.
 */
export async function listensAt(socketPath: string): Promise<boolean> {
  let table: string;
  try {
    table = await fs.readFile('/proc/net/unix', 'utf8');
  } catch {
    return true;
  }
  return table.split('\n').some((line) => line.endsWith(` ${socketPath}`) && (Number.parseInt(line.trim().split(/\s+/)[3] ?? '', 16) & ACCEPTS_CONNECTIONS) !== 0);
}

/**
 * Refuses a socket path (-f) that holds something a new server must not replace: a file or directory (a path given
 * by mistake: removing it would lose it) or a socket a server still listens on, and one in a directory that does
 * not exist. Nothing there, or a socket left by a server that is gone, is fine. Checked before a full backup
 * removes the old chain's checkpoints: the job's start failed on a missing directory only after that.
 */
export async function checkSocketPath(socketPath: string): Promise<void> {
  const there = await fs.lstat(socketPath).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw new UserError(`cannot use ${socketPath} for the NBD socket: ${describeFailure(err)}`);
  });
  if (!there) {
    const dir = path.dirname(socketPath);
    if (!(await fs.stat(dir).then((s) => s.isDirectory(), () => false))) {
      throw new UserError(`the directory of the NBD socket ${socketPath} (-f), ${dir}, does not exist: create it, or give a socket path in an existing directory`);
    }
    return;
  }
  if (!there.isSocket()) {
    throw new UserError(`${socketPath} already exists and is not a socket, so it cannot be the NBD socket (-f); give a path where nothing is (${socketPath} was left as it is)`);
  }
  if (await listensAt(socketPath)) throw new UserError(`a server listens on the socket ${socketPath}; give another socket path (-f)`);
}

/** checkSocketPath, then removes a socket left there. */
export async function clearSocketPath(socketPath: string): Promise<void> {
  await checkSocketPath(socketPath);
  await fs.rm(socketPath, { force: true });
}

/**
 * Starts a long-running server and resolves once it listens at `socketPath`; rejects if the process dies first. A
 * socket left at `socketPath` is removed first (clearSocketPath): its presence is what tells that the server is ready.
 */
export async function spawnServer(command: string, args: string[], socketPath: string, timeoutMs = 15000): Promise<ChildProcess> {
  await clearSocketPath(socketPath);
  const [program, programArgs] = boundToUs(command, args);
  // A session of its own: a terminal's Ctrl-C, sent to the run's process group, would stop the server before the
  // run heard of it, and the run would report a failed write for what is an interruption. The run stops it on its
  // way out, and it goes with the run should the run be killed (boundToUs).
  const child = spawn(program, programArgs, {
    stdio: ['ignore', 'ignore', 'pipe'], env: serverEnvironment(), detached: true,
  });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
  let exited: string | undefined;
  child.on('exit', () => { exited = howItEnded(child); });
  let setprivMissing = false;
  child.on('error', (err: NodeJS.ErrnoException) => {
    exited = err.message;
    setprivMissing = err.code === 'ENOENT';
  });
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (exited) {
      // It may have bound the socket before it died; nobody else will remove it.
      await fs.rm(socketPath, { force: true });
      const said = stderr.trim().split('\n').pop();
      if (setprivMissing) throw notInstalled('setpriv');
      // setpriv runs the server, and exits 127 when there is none to run.
      if (child.exitCode === 127) throw notInstalled(command);
      throw new Error(`${command} ${exited} before it served ${socketPath}${said ? `: ${said}` : ''}`);
    }
    if (await fs.access(socketPath).then(() => listensAt(socketPath), () => false)) return child;
    if (Date.now() > deadline) {
      await stopServer(child, socketPath);
      throw new Error(`${command} did not create ${socketPath} within ${timeoutMs / 1000} s`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function howItEnded(child: ChildProcess): string {
  return `exited with ${child.signalCode ?? child.exitCode}`;
}

/**
 * How a server started by spawnServer ended when it exited on its own (killed, crashed), else undefined. A client's
 * failed request can arrive before the exit does: waits up to `graceMs` for it.
 */
export async function serverExit(child: ChildProcess, graceMs = 500): Promise<string | undefined> {
  if (!hasExited(child)) await Promise.race([once(child, 'exit'), new Promise((resolve) => setTimeout(resolve, graceMs).unref())]);
  return hasExited(child) ? howItEnded(child) : undefined;
}

/** How often stopServer repeats its SIGTERM until the server is gone. */
const SIGTERM_REPEAT_MS = 200;

/**
 * Terminates a server started by spawnServer, waits for it to be gone, and removes its socket when given. qemu-nbd
 * drops a SIGTERM that comes before its main loop runs (it listens, then opens the image, then sets its state to
 * running over the terminate its handler set), so the SIGTERM is repeated until it exits; SIGKILL after 5 s.
 */
export async function stopServer(child: ChildProcess, socketPath?: string): Promise<void> {
  if (!hasExited(child)) {
    const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill('SIGTERM');
    const again = setInterval(() => child.kill('SIGTERM'), SIGTERM_REPEAT_MS);
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await gone;
    clearInterval(again);
    clearTimeout(timer);
  }
  if (socketPath) await fs.rm(socketPath, { force: true });
}
