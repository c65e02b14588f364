// Runs the project's commands (bin/*) and the Python peers as a user would, capturing exit code and output.
import { spawn } from 'node:child_process';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Repository root (this file runs from dist/test/support). */
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const ourBin = (name: 'virtnbdbackup' | 'virtnbdrestore' | 'virtnbdmap'): string => path.join(repoRoot, 'bin', name);
/** Debian's Python tools, the interoperability peers. */
export const pythonBin = (name: 'virtnbdbackup' | 'virtnbdrestore'): string => `/usr/bin/${name}`;

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface CliRun {
  child: ReturnType<typeof spawn>;
  done: Promise<CliResult>;
}

/** Python's tools leave qemu-img logs in TMPDIR: each of their runs gets its own, removed when it ends. */
const PYTHON_TMP_ROOT = '/var/tmp';

/** A warning Node printed (a listener leak, a deprecation): our commands print none, whatever the outcome. */
const NODE_WARNING = /^\(node:\d+\) (\[\w+\] )?\w*Warning:.*$/m;

/** Throws when `stderr` of one of our commands holds a warning of Node's. */
export function assertNoNodeWarning(command: string, stderr: string): void {
  const warning = NODE_WARNING.exec(stderr);
  if (warning) throw new Error(`${path.basename(command)} printed a warning of Node's: ${warning[0]}`);
}

/** Starts a command; `detached` gives it a process group of its own, as a shell gives a job (for a hangup sent to it). */
export function startCli(command: string, args: string[], { detached = false } = {}): CliRun {
  const python = command === pythonBin('virtnbdbackup') || command === pythonBin('virtnbdrestore');
  const tmp = python ? fsSync.mkdtempSync(path.join(PYTHON_TMP_ROOT, 'vnbdtest-pytmp-')) : undefined;
  const env = tmp ? { ...process.env, TMPDIR: tmp } : process.env;
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env, detached });
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (tmp) fsSync.rmSync(tmp, { recursive: true, force: true });
      if (!python) {
        try {
          assertNoNodeWarning(command, stderr);
        } catch (err) {
          reject(err);
          return;
        }
      }
      resolve({ code, signal, stdout, stderr });
    });
  });
  return { child, done };
}

/**
 * Starts a backup to standard output (`-o -` among `args`; its state and log in `cwd`) whose output nobody reads yet: once the pipe is full,
 * its copy waits while the rest of the run (the job, its timers) goes on. `release()` then drains the output
 * into /dev/null. Its stdout is not kept; `stderr()` is what it has printed so far.
 */
export function startHeldOnOutput(command: string, args: string[], cwd: string): CliRun & { release: () => void; stderr: () => string } {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd });
  child.stdout.pause();
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout: '', stderr }));
  });
  return { child, done, stderr: () => stderr, release: () => { child.stdout.pipe(fsSync.createWriteStream('/dev/null')); } };
}

/** Resolves once `file` exists (a run's data flowing into its .partial, say), or after about 10 s. */
export async function whenExists(file: string): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (await fs.access(file).then(() => true, () => false)) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** The pid of a qemu-img working on a file in `dir` (a restore's convert), or undefined. */
export function qemuImgIn(dir: string): Promise<string | undefined> {
  return helperPid('qemu-img', (arg) => arg.startsWith(`${dir}/`));
}

/**
 * Starts our virtnbdrestore with `args` (a --compress restore of disk vda into `out`) and resolves once its qemu-img
 * convert -c runs (the data is written and compressing has begun).
 */
export async function restoreCompressing(args: string[], out: string): Promise<CliRun> {
  const running = startCli(ourBin('virtnbdrestore'), args);
  await whenExists(path.join(out, 'vda.qcow2.partial'));
  // The restore makes that file (empty, to claim its name) just before it starts qemu-img.
  if (!(await within(5_000, async () => (await qemuImgIn(out)) !== undefined))) throw new Error(`no qemu-img convert -c runs on ${out}/vda.qcow2.partial`);
  return running;
}

/** Polls until `check` holds, for up to `ms`; returns whether it did. */
export async function within(ms: number, check: () => Promise<boolean>): Promise<boolean> {
  for (const deadline = Date.now() + ms; Date.now() < deadline; await new Promise((r) => setTimeout(r, 20))) if (await check()) return true;
  return check();
}

export function runCli(command: string, args: string[]): Promise<CliResult> {
  return startCli(command, args).done;
}

/**
 * Python's virtnbdrestore 1.9.15 serves every disk of a set on one socket name: it SIGTERMs the first disk's
 * qemu-nbd without waiting, starts the next one on that name, and the first, exiting late, unlinks the new socket
 * (connect: ENOENT). A race in the peer, not in the set; seen once in many CI runs.
 */
const PYTHON_SOCKET_RACE = /Starting local NBD server[\s\S]*Starting local NBD server[\s\S]*nbd_connect_uri: connect: No such file or directory/;

/** Runs and insists on exit code 0, showing the output when it is not. Python's restore is run again once after its socket race. */
export async function runOk(command: string, args: string[]): Promise<CliResult> {
  const out = command === pythonBin('virtnbdrestore') ? outputOf(args) : undefined;
  // What the output directory held before (null: there was none), so that a second run finds it as the first did.
  const before = out ? await fs.readdir(out).catch((err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? null : undefined)) : undefined;
  let result = await runCli(command, args);
  if (out && before !== undefined && result.code !== 0 && PYTHON_SOCKET_RACE.test(result.stderr)) {
    process.stderr.write(`# Python's virtnbdrestore lost its own socket (its race between disks); running it again\n`);
    await qemuNbdGone(args, true);
    if (before === null) await fs.rm(out, { recursive: true, force: true });
    else for (const made of (await fs.readdir(out)).filter((name) => !before.includes(name))) await fs.rm(path.join(out, made), { recursive: true, force: true });
    result = await runCli(command, args);
  }
  if (command === pythonBin('virtnbdrestore')) await qemuNbdGone(args, result.code !== 0);
  if (result.code !== 0) {
    throw new Error(`${path.basename(command)} ${args.join(' ')} exited ${result.code ?? result.signal}\n${result.stderr}${result.stdout}`);
  }
  return result;
}

/** The value of -o/--output among `args` (one of Python's virtnbdrestore), if any. */
function outputOf(args: string[]): string | undefined {
  const at = args.findIndex((arg) => arg === '-o' || arg === '--output');
  return at < 0 ? undefined : args[at + 1];
}

/**
 * Python's virtnbdrestore exits while the qemu-nbd it started still flushes and closes the image; reading the
 * image before then sees stale data. Waits (up to 30 s) until no qemu-nbd serves a file under its -o directory.
 * After a failed run (`failed`), one may never have had a client (its socket lost to the race above), and would
 * serve for ever: after 2 s it is stopped.
 */
async function qemuNbdGone(args: string[], failed = false): Promise<void> {
  const out = outputOf(args);
  if (!out || out === 'dump' || out === 'verify') return;
  const dir = path.resolve(out) + path.sep;
  for (let waited = 0; waited < 30_000; waited += 100) {
    const pid = await qemuNbdPid((arg) => arg.startsWith(dir));
    if (pid === undefined) return;
    if (failed && waited >= 2_000) {
      try {
        process.kill(Number(pid), 'SIGTERM');
      } catch {
        // gone meanwhile
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`qemu-nbd started by Python's virtnbdrestore still serves ${dir} after 30 s`);
}

/** Whether a live qemu-nbd process has an argument for which `matches` holds (a socket, an image path). */
export async function qemuNbdRuns(matches: (arg: string) => boolean): Promise<boolean> {
  return (await qemuNbdPid(matches)) !== undefined;
}

/** The pid of a live qemu-nbd with an argument that `matches`, or undefined. */
export function qemuNbdPid(matches: (arg: string) => boolean): Promise<string | undefined> {
  return helperPid('qemu-nbd', matches);
}

/** The pid of a live `program` (qemu-img, qemu-nbd) with an argument that `matches`, or undefined. */
export async function helperPid(program: string, matches: (arg: string) => boolean): Promise<string | undefined> {
  for (const pid of (await fs.readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
    const argv = (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (path.basename(argv[0] ?? '') === program && argv.slice(1).some(matches)) return pid;
  }
  return undefined;
}

/** Kilobytes of anonymous memory on transparent huge pages in process `pid`. */
export async function anonHugeKiB(pid: number | string = 'self'): Promise<number> {
  const rollup = await fs.readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
  return Number(/^AnonHugePages:\s+(\d+) kB/m.exec(rollup)?.[1] ?? 0);
}

/** Whether the kernel hands out transparent huge pages to memory that asks for them (madvise or always). */
export async function hugePagesOffered(): Promise<boolean> {
  const mode = await fs.readFile('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8').catch(() => '[never]');
  return !mode.includes('[never]');
}

/** The lines of stderr that report an error (what a user sees as the reason). */
export function errorLines(result: CliResult): string[] {
  return result.stderr.split('\n').filter((l) => /error/i.test(l));
}
