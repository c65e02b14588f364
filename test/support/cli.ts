// Runs the project's commands (bin/*) and the Python peers as a user would, capturing exit code and output.
import { spawn } from 'node:child_process';
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

export function startCli(command: string, args: string[]): CliRun {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
  const done = new Promise<CliResult>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return { child, done };
}

export function runCli(command: string, args: string[]): Promise<CliResult> {
  return startCli(command, args).done;
}

/** Runs and insists on exit code 0, showing the output when it is not. */
export async function runOk(command: string, args: string[]): Promise<CliResult> {
  const result = await runCli(command, args);
  if (result.code !== 0) {
    throw new Error(`${path.basename(command)} ${args.join(' ')} exited ${result.code ?? result.signal}\n${result.stderr}${result.stdout}`);
  }
  return result;
}

/** The lines of stderr that report an error (what a user sees as the reason). */
export function errorLines(result: CliResult): string[] {
  return result.stderr.split('\n').filter((l) => /error/i.test(l));
}
