// Where the domain runs: this machine, or the host a remote libvirt URI names (qemu+ssh://user@host/system), reached
// through the system's ssh client for what libvirt does not carry: qemu-img and qemu-nbd on the images, the boot
// files, and a restore's output files there.
// Guarantees: commands run without a local shell and are quoted for the remote one; a failure names the host;
// createNew never replaces an existing file.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import type { Readable, Writable } from 'node:stream';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { accepts, boundToUs, notInstalled, packageOf, processRuns, run, shellQuote, type RunResult } from '../util/process.js';
import { makeDirectory } from '../util/fileIo.js';
import { DEFAULT_NBD_PORT, DEFAULT_NBD_TIMEOUT, DEFAULT_TLS_CERT_DIR, nbdUri, type NbdAddress } from '../endpoint/nbd.js';
import { checkTcpPort } from '../util/tcpPort.js';

/** What every host offers; `remote` tells this machine (LOCAL_HOST) from another one (SshHost) and narrows the type. */
interface HostAccess {
  /** Whether the domain runs on another machine: its NBD exports are then served over TCP. */
  readonly remote: boolean;
  /** The host name NBD clients connect to (remote only). */
  readonly hostname: string;
  /** For messages: 'this host' or 'user@host'. */
  readonly label: string;
  /** Runs `command` there; rejects with its stderr's last line. */
  run(command: string, args: string[]): Promise<RunResult>;
  /**
   * Opens the file at `file` there for reading: rejects when it cannot be opened, before any byte is taken; the
   * chunks then throw if it cannot be read to its end.
   */
  openRead(file: string): Promise<AsyncIterable<Buffer>>;
  exists(file: string): Promise<boolean>;
  /** Creates `dir` and its parents as needed. */
  makeDir(dir: string): Promise<void>;
  /** Renames `from` to `to`, never over a file there nor into a directory of that name: that fails, `to` kept. */
  rename(from: string, to: string): Promise<void>;
  /** Removes `file` if it is there. */
  remove(file: string): Promise<void>;
  /** Creates `file` with `content` (bytes, or a local file's bytes); fails if it exists. */
  createNew(file: string, content: Buffer | { localFile: string }): Promise<void>;
  /** Creates `file` empty, at once; fails if anything is there (claims a name that another run may also want). */
  createEmpty(file: string): Promise<void>;
}

/** This machine, or another one reached through ssh. */
export type DomainHost = (HostAccess & { readonly remote: false }) | SshHost;

export const LOCAL_HOST: HostAccess & { readonly remote: false } = {
  remote: false,
  hostname: 'localhost',
  label: 'this host',
  run,
  async openRead(file) {
    const handle = await fs.open(file, 'r');
    return handle.createReadStream({ highWaterMark: 1024 * 1024 });
  },
  // Anything at that name, a symbolic link to nothing too (as on another host): a restore's image was written
  // whole, then its rename refused such a link.
  exists: (file) => fs.lstat(file).then(() => true, () => false),
  makeDir: (dir) => makeDirectory(dir),
  // Never over a file that appeared meanwhile: linked in (which fails on an existing name), then the old name dropped.
  async rename(from, to) {
    try {
      await fs.link(from, to);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new Error(`${to} already exists; it was left as it is`);
      // A file system without hard links: checked, then renamed.
      if (await fs.lstat(to).then(() => true, () => false)) throw new Error(`${to} already exists; it was left as it is`);
      await fs.rename(from, to);
      return;
    }
    await fs.unlink(from);
  },
  remove: (file) => fs.rm(file, { force: true }),
  createEmpty: (file) => fs.writeFile(file, '', { flag: 'wx' }),
  async createNew(file, content) {
    // Whole or not at all: written beside it, then linked in (which fails on an existing file, never replaces it).
    const partial = `${file}.partial`;
    try {
      if (Buffer.isBuffer(content)) await fs.writeFile(partial, content, { flag: 'wx' });
      else await fs.copyFile(content.localFile, partial, fs.constants.COPYFILE_EXCL);
      await fs.link(partial, file).catch(async (err: NodeJS.ErrnoException) => {
        if (err.code === 'EEXIST') throw err;
        await fs.copyFile(partial, file, fs.constants.COPYFILE_EXCL); // a file system without hard links
      });
    } finally {
      await fs.rm(partial, { force: true }).catch(() => undefined);
    }
  },
};

/** ssh's own failures as it words them, and what to do about each. */
const SSH_ADVICE: Array<[RegExp, string]> = [
  [/Host key verification failed/, 'connect once with ssh to accept the host\'s key (or add no_verify=1 to the URI)'],
  [/Permission denied \((publickey|password)/, 'this user\'s ssh key is not accepted there: give the user with --ssh-user, or the key with keyfile= in the URI'],
  [/Could not resolve hostname/, 'check the host name in the URI'],
  // Not "timed out during banner exchange": an sshd that stopped answering, which the caller's line names.
  [/Connection refused|Connection timed out(?! during banner)|No route to host/, 'check that sshd runs on that host and the port in the URI'],
];

/** The remote shell's word for a program it did not find (bash: 'qemu-img: command not found'; dash: 'qemu-img: not found'). */
const NOT_FOUND = /(?:^|: )([\w.+-]+): (?:command )?not found\b/;

/** `message` with what to do, when it is one of ssh's own failures, or a program the host lacks. */
function withSshAdvice(message: string): string {
  const missing = NOT_FOUND.exec(message)?.[1];
  if (missing) {
    const pkg = packageOf(missing);
    return `${message}; ${missing} is not installed on that host${pkg ? `: install the package ${pkg} there` : ''}`;
  }
  const advice = SSH_ADVICE.find(([pattern]) => pattern.test(message))?.[1];
  return advice ? `${message}; ${advice}` : message;
}

export interface SshTarget {
  host: string;
  user: string;
  port?: number;
  /** Private key file (the URI's `keyfile`). */
  keyfile?: string;
  /** Do not check the host key (the URI's `no_verify=1`). */
  noVerify?: boolean;
  /** Known-hosts file (the URI's `known_hosts`). */
  knownHosts?: string;
  /**
   * Seconds the host may leave ssh unanswered, in a connect or on a connection gone silent (a hung host or
   * network), before ssh gives up; 0 or beyond ssh's range waits as ssh does (with TCP, often for ever).
   */
  silentSeconds?: number;
}

/** ssh keeps timeouts in milliseconds in an int: longer ones are left to ssh's own defaults. */
const SSH_MAX_TIMEOUT = 2_000_000;

/** Keepalives that give up on a peer silent for about `seconds`: one every quarter of it (1 to 15 s), as many as fill it. */
export interface Keepalives {
  interval: number;
  count: number;
}

/** Keepalives for a silence of `seconds`; undefined (wait forever) for 0, NaN, or more than ssh's timeouts hold. */
export function keepalivesFor(seconds: number | undefined): Keepalives | undefined {
  if (seconds === undefined || !(seconds > 0) || seconds > SSH_MAX_TIMEOUT) return undefined;
  const interval = Math.min(15, Math.max(1, Math.floor(seconds / 4)));
  return { interval, count: Math.max(1, Math.ceil(seconds / interval)) };
}

/** ssh options that give up on a host silent for `seconds` (keepalivesFor), its connect included. */
export function silenceLimit(seconds: number | undefined): string[] {
  const keepalives = keepalivesFor(seconds);
  if (!keepalives || seconds === undefined) return [];
  return ['-o', `ConnectTimeout=${Math.ceil(seconds)}`, '-o', `ServerAliveInterval=${keepalives.interval}`, '-o', `ServerAliveCountMax=${keepalives.count}`];
}

/** The shared connections' directories: `virtnbd-ssh-<pid>-XXXXXX` in the temporary directory. */
const CONTROL_DIR_PREFIX = 'virtnbd-ssh-';
const CONTROL_DIR = /^virtnbd-ssh-(\d+)-\w{6}$/;

/**
 * Removes the shared-connection directories of this user's runs that died without removing theirs (SIGKILL): each
 * such run left one in /tmp for good. A directory whose pid lives is left alone (a run, or a pid taken again).
 */
export function sweepControlDirectories(tmp = os.tmpdir()): void {
  let names: string[];
  try {
    names = fsSync.readdirSync(tmp);
  } catch {
    return;
  }
  const uid = process.getuid?.();
  for (const name of names) {
    const pid = Number(CONTROL_DIR.exec(name)?.[1]);
    if (!pid || pid === process.pid || processRuns(pid)) continue;
    try {
      const dir = path.join(tmp, name);
      const st = fsSync.lstatSync(dir);
      if (st.isDirectory() && st.uid === uid) fsSync.rmSync(dir, { recursive: true, force: true });
    } catch {
      // gone meanwhile, or not ours to remove
    }
  }
}

export class SshHost implements HostAccess {
  readonly remote = true as const;

  /** The socket of this host's shared connection (`%C`: one per host, port and user), in a private directory made at the first command. */
  private controlPath: string | undefined;

  constructor(private readonly target: SshTarget) {}

  /**
   * Options that make every command of this run share one connection to the host (OpenSSH multiplexing): a run
   * issues tens of commands, and each handshake took about 0.8 s here. The connection's master is ended, and its
   * socket's private directory removed, when this process exits; should that not happen (SIGKILL), it ends itself
   * after a minute without sessions, and the next run removes the directory (its name holds the pid).
   */
  private sharedConnection(): string[] {
    if (!this.controlPath) {
      sweepControlDirectories();
      const dir = fsSync.mkdtempSync(path.join(os.tmpdir(), `${CONTROL_DIR_PREFIX}${process.pid}-`));
      const controlPath = path.join(dir, '%C');
      this.controlPath = controlPath;
      process.once('exit', () => {
        spawnSync('ssh', [...this.options(), '-o', `ControlPath=${controlPath}`, '-O', 'exit', this.target.host], { stdio: 'ignore', timeout: 5000 });
        fsSync.rmSync(dir, { recursive: true, force: true });
      });
    }
    return ['-o', 'ControlMaster=auto', '-o', `ControlPath=${this.controlPath}`, '-o', 'ControlPersist=60'];
  }

  get hostname(): string {
    return this.target.host;
  }

  get label(): string {
    return `${this.target.user}@${this.target.host}`;
  }

  /** ssh's arguments up to the remote command: never prompts (BatchMode), so a missing key fails at once. */
  sshArgs(): string[] {
    return [...this.options(), '-o', 'BatchMode=yes', ...this.sharedConnection(), this.target.host, '--'];
  }

  /** How to reach the host: user, port, key and host key checking. */
  private options(): string[] {
    const { user, port, keyfile, noVerify, knownHosts, silentSeconds } = this.target;
    const args = ['-l', user, ...silenceLimit(silentSeconds)];
    if (port) args.push('-p', String(port));
    if (keyfile) args.push('-i', keyfile);
    if (noVerify) args.push('-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR');
    else if (knownHosts) args.push('-o', `UserKnownHostsFile=${knownHosts}`);
    return args;
  }

  /**
   * Starts `script` in the remote shell with its stderr kept; `lastWords` is that stderr's last line (or `lines`
   * lines, joined), for errors.
   * `bound` ties ssh to this process (a parent-death signal), for sessions that outlive a call.
   */
  spawn(script: string, stdin: 'pipe' | 'ignore', stdout: 'pipe' | 'ignore', bound = false): { child: ChildProcess; lastWords: (lines?: number) => string | undefined } {
    const [command, args] = bound ? boundToUs('ssh', [...this.sshArgs(), script]) : ['ssh', [...this.sshArgs(), script]];
    // The run's to end, as a local server is (spawnServer): a terminal's Ctrl-C reaches the run, not its ssh.
    const child = spawn(command, args, { stdio: [stdin, stdout, 'pipe'], detached: true });
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (text: string) => { stderr += text; });
    return { child, lastWords: (lines = 1) => stderr.trim().split('\n').filter(Boolean).slice(-lines).join('; ') || undefined };
  }

  async run(command: string, args: string[]): Promise<RunResult> {
    try {
      return await run('ssh', [...this.sshArgs(), [command, ...args].map(shellQuote).join(' ')]);
    } catch (err) {
      throw new Error(`on ${this.label}: ${withSshAdvice((err as Error).message)}`, { cause: err });
    }
  }

  /**
   * Runs `command` on the host as run() does, but bound to this run (startWatched): ended there when `signal` aborts
   * (rejecting with its reason once the session is gone), or when this process or its ssh dies.
   */
  async runBound(command: string, args: string[], signal?: AbortSignal): Promise<void> {
    signal?.throwIfAborted();
    const session = startWatched(this, [command, ...args]);
    const stop = (): void => { void session.stop(); };
    signal?.addEventListener('abort', stop, { once: true });
    try {
      const { code, signal: endedBy, spawnFailure } = await session.ended;
      if (spawnFailure) throw (spawnFailure as NodeJS.ErrnoException).code === 'ENOENT' ? notInstalled('setpriv') : spawnFailure;
      signal?.throwIfAborted();
      if (code !== 0) throw new Error(`on ${this.label}: ${command} failed: ${withSshAdvice(session.lastWords(2) ?? (code === null ? `ssh ended by ${endedBy}` : `ssh exited with ${code}`))}`);
    } finally {
      signal?.removeEventListener('abort', stop);
      await session.stop();
    }
  }

  async exists(file: string): Promise<boolean> {
    const { stdout } = await this.run('sh', ['-c', 'if [ -e "$1" ] || [ -L "$1" ]; then echo yes; else echo no; fi', 'sh', file]);
    return stdout.trim() === 'yes';
  }

  async makeDir(dir: string): Promise<void> {
    await this.run('mkdir', ['-p', '--', dir]);
  }

  /** Never over a file that appeared meanwhile, nor into a directory of that name. */
  async rename(from: string, to: string): Promise<void> {
    await this.run('sh', ['-c', 'if [ -e "$2" ] || [ -L "$2" ]; then echo "$2 already exists" >&2; exit 1; fi; mv -T -- "$1" "$2"', 'sh', from, to]);
  }

  async remove(file: string): Promise<void> {
    await this.run('rm', ['-f', '--', file]);
  }

  async createEmpty(file: string): Promise<void> {
    await this.run('sh', ['-c', 'set -C; : > "$1"', 'sh', file]);
  }

  /**
   * `cat` into `<file>.partial` with the shell's noclobber set, then linked in: whole or not at all, and an existing
   * file makes it fail, as this host's createNew.
   */
  async createNew(file: string, content: Buffer | { localFile: string }): Promise<void> {
    const input = Buffer.isBuffer(content) ? content : await fs.readFile(content.localFile);
    const [final, partial] = [shellQuote(file), shellQuote(`${file}.partial`)];
    const { child, lastWords } = this.spawn(`set -C; cat > ${partial} && ln -- ${partial} ${final}; s=$?; rm -f -- ${partial}; exit $s`, 'pipe', 'ignore');
    const stdin = child.stdin as Writable;
    stdin.on('error', () => undefined); // the remote side refused early: its exit says why
    const code = await new Promise<number | null>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', resolve);
      stdin.end(input);
    });
    if (code !== 0) throw new Error(`on ${this.label}: cannot create ${file}: ${withSshAdvice(lastWords() ?? `ssh exited with ${code}`)}`);
  }

  /** `cat` through ssh; resolves at its first bytes or its successful end, so that a missing file rejects here. */
  async openRead(file: string): Promise<AsyncIterable<Buffer>> {
    const { child, lastWords } = this.spawn(`cat -- ${shellQuote(file)}`, 'ignore', 'pipe');
    const exited = new Promise<void>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (code) => {
        if (code === 0) resolve();
        else reject(new Error(`on ${this.label}: ${withSshAdvice(lastWords() ?? `ssh exited with ${code}`)}`));
      });
    });
    const chunks = (child.stdout as Readable)[Symbol.asyncIterator]();
    const firstChunk = chunks.next();
    // An empty output is either an empty file or a failure: then the exit status tells which.
    const first = await Promise.race([firstChunk, exited.then(() => firstChunk)])
      .then(async (next) => (next.done ? exited.then(() => next) : next))
      .catch((err: unknown) => {
        child.kill();
        throw err;
      });
    return (async function* rest(): AsyncGenerator<Buffer> {
      try {
        for (let next = first; !next.done; next = await chunks.next()) yield next.value as Buffer;
        await exited;
      } finally {
        if (child.exitCode === null) child.kill();
      }
    })();
  }
}

/** A server started on a remote host through ssh (serveRemotely). */
export interface RemoteServer {
  /** Ends it: the remote shell kills it once ssh's input closes; resolves when the ssh session is gone. */
  stop(): Promise<void>;
}

/** A command running on another host through ssh, in a session that ends it once the session's input ends. */
interface WatchedSession {
  /** Settles once the session is gone: ssh's exit, or why there was no session at all (ssh or setpriv missing). */
  ended: Promise<{ code: number | null; signal: NodeJS.Signals | null; spawnFailure?: Error }>;
  /**
   * Ends the command (the session's input closed) and waits for the session; an ssh still there after 5 s (the host
   * gone silent) is killed.
   */
  stop(): Promise<void>;
  /** The last line (or `lines` lines, joined) of the session's stderr. */
  lastWords(lines?: number): string | undefined;
}

/**
 * Starts `argv` on `ssh`'s host: the remote shell starts it in the background and kills it once the session's
 * input ends (closed by stop(), or by the death of this process or its ssh, which is bound to us), then waits for
 * it and runs `after` (more of the shell's lines, e.g. one saying how it exited); without `after`, the session exits
 * with the command's status.
 */
function startWatched(ssh: SshHost, argv: string[], after = ''): WatchedSession {
  // Background jobs of a non-interactive shell read /dev/null: the watcher gets the session's input through fd 3.
  const script = `exec 3<&0; ${argv.map(shellQuote).join(' ')} </dev/null & p=$!; (cat <&3 >/dev/null; kill $p) >/dev/null 2>&1 & exec 3<&-; wait $p${after}`;
  const { child, lastWords } = ssh.spawn(script, 'pipe', 'ignore', true);
  const stdin = child.stdin as Writable;
  stdin.on('error', () => undefined); // a session that already ended
  const ended: WatchedSession['ended'] = new Promise((resolve) => {
    child.once('close', (code, signal) => resolve({ code, signal }));
    // ssh or setpriv missing: no session at all, and no 'close' either.
    child.once('error', (err) => resolve({ code: null, signal: null, spawnFailure: err }));
  });
  const stop = async (): Promise<void> => {
    stdin.end();
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await ended;
    clearTimeout(timer);
  };
  return { ended, stop, lastWords };
}

/**
 * Runs `command` on `ssh` (SshHost) as a server and resolves once its TCP `port` on `host` accepts connections.
 * The remote shell kills the server when the session's input ends, which is also what happens when this process
 * or its ssh dies; a server that exits on its own ends the session, and rejects with its last words.
 */
export async function serveRemotely(ssh: SshHost, command: string, args: string[], host: string, port: number, timeoutMs = 15000): Promise<RemoteServer> {
  // Readiness is the port accepting: one that already does belongs to someone else.
  if (await accepts({ host, port })) throw new Error(`port ${port} on ${host} is taken (another backup or restore?): choose another with -P`);
  const session = startWatched(ssh, [command, ...args], `; echo "${command} exited with $?" >&2`);
  let gone = false;
  void session.ended.then(() => { gone = true; });
  const deadline = Date.now() + timeoutMs;
  while (!(await accepts({ host, port }))) {
    if (gone || Date.now() > deadline) {
      await session.stop();
      // The server's own reason comes before the shell's line with its exit status.
      const said = (await session.ended).spawnFailure?.message ?? session.lastWords(2);
      throw new Error(`on ${ssh.label}: ${command} ${gone ? 'ended' : `did not listen within ${timeoutMs / 1000} s`} before it served ${host}:${port}${said ? `: ${withSshAdvice(said)}` : ''}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return { stop: session.stop };
}

/** How a server on another host is reached (-I, -P, --tls, --tls-cert), as backup and restore take them. */
export interface RemoteServing {
  nbdHost?: string;
  nbdPort?: number;
  tls?: boolean;
  tlsCertificates?: string;
}

/** A TCP NBD server on `ssh`'s host: -I (default its name), -P (default 10809), and with --tls this side's certificates. */
export function tcpServerOn(ssh: SshHost, serving: RemoteServing): { host: string; port: number; tlsCertificates?: string } {
  const tlsCertificates = serving.tls ? path.resolve(serving.tlsCertificates ?? DEFAULT_TLS_CERT_DIR) : undefined;
  const port = checkTcpPort(serving.nbdPort ?? DEFAULT_NBD_PORT, '-P');
  return { host: serving.nbdHost ?? ssh.hostname, port, tlsCertificates };
}

/** The host's own certificates for a remote qemu-nbd with TLS: where libvirt keeps them by default. */
const REMOTE_SERVER_TLS_DIR = '/etc/pki/qemu';

/**
 * qemu-nbd on the remote host with `args`, serving `file` as `exportName` on `at` (TLS with the host's certificates
 * in /etc/pki/qemu when `at.tlsCertificates` names this side's). Resolves once it listens.
 */
export async function qemuNbdOverSsh(ssh: SshHost, args: string[], file: string, exportName: string, at: { host: string; port: number; tlsCertificates?: string }): Promise<{ address: NbdAddress; stop(): Promise<void> }> {
  const tls = at.tlsCertificates ? ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${REMOTE_SERVER_TLS_DIR}`, '--tls-creds', 'tls0'] : [];
  const server = await serveRemotely(ssh, 'qemu-nbd', [...args, ...tls, '--bind', at.host, '--port', String(at.port), file], at.host, at.port);
  return { address: { uri: nbdUri(at, exportName), exportName, tlsCertificates: at.tlsCertificates }, stop: () => server.stop() };
}

/**
 * The host of libvirt URI `uri`: this machine when it names none (qemu:///system), else that host through ssh as
 * `sshUser` (default: an ssh URI's user, else the user running this, as ssh and Python's --ssh-user default to;
 * another transport's user is a libvirt login, not an ssh one), with the URI's port, `keyfile`, `no_verify` and
 * `known_hosts` when it is an ssh URI, as libvirt's own ssh transport uses them; ssh gives up on it after
 * `silentSeconds` of silence (--nbd-timeout).
 */
export function domainHostOf(uri: string, sshUser?: string, silentSeconds = DEFAULT_NBD_TIMEOUT): DomainHost {
  let parsed: URL;
  try {
    parsed = new URL(uri);
  } catch {
    return LOCAL_HOST; // libvirt itself reports a URI it cannot use
  }
  if (!parsed.hostname) return LOCAL_HOST;
  const viaSsh = parsed.protocol.endsWith('+ssh:') || parsed.protocol.endsWith('+libssh:') || parsed.protocol.endsWith('+libssh2:');
  const params = parsed.searchParams;
  return new SshHost({
    host: parsed.hostname.replace(/^\[(.*)\]$/, '$1'),
    user: sshUser ?? ((viaSsh && decodeURIComponent(parsed.username)) || os.userInfo().username),
    port: viaSsh && parsed.port ? Number(parsed.port) : undefined,
    keyfile: viaSsh ? params.get('keyfile') ?? undefined : undefined,
    noVerify: viaSsh && params.get('no_verify') === '1',
    knownHosts: viaSsh ? params.get('known_hosts') ?? undefined : undefined,
    silentSeconds,
  });
}
