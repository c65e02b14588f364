// virtnbdmap as the tests run it: started on backup files with its socket in a test's directory, serving until
// the test ends (SIGINT, else SIGKILL), with the URIs it prints.
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { ourBin, startCli, type CliResult } from './cli.js';
import { cleanup } from './cleanup.js';

export interface RunningMap {
  /** nbd+unix:// URI, then nbd:// URI. */
  uris: [string, string];
  socket: string;
  /** SIGINT, then the exit; throws unless it exits 0 with its last line saying it stopped. */
  stop: () => Promise<CliResult>;
  /** SIGKILL, as a crash would end it: nothing of it cleans up. */
  kill: () => Promise<void>;
}

/**
 * Starts bin/virtnbdmap on `files` with its socket in `dir` (or, with `defaultSocket`, where virtnbdmap puts it);
 * stopped (SIGINT, else SIGKILL) when the test ends, before what it stands on (a tmpfs of its overlay) goes.
 */
export async function startMap(t: TestContext, dir: string, name: string, files: string[], extra: string[] = [], { defaultSocket = false } = {}): Promise<RunningMap> {
  const { child, done } = startCli(ourBin('virtnbdmap'), [
    '-f', files.join(','), ...(defaultSocket ? [] : ['--socket', path.join(dir, `${name}.sock`)]), '-p', '0', '-L', path.join(dir, `${name}.log`), '--nocolor',
    ...(extra.includes('-d') ? [] : ['-d', '']), ...(extra.includes('--overlay-dir') ? [] : ['--overlay-dir', dir]), ...extra,
  ]);
  cleanup(t, async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGINT');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await done;
    clearTimeout(timer);
  });
  // The URIs are the first two lines on stdout once it serves.
  let printed = '';
  child.stdout?.on('data', (d: Buffer) => { printed += d.toString(); });
  const deadline = Date.now() + 15_000;
  while (printed.split('\n').length < 3) {
    if (child.exitCode !== null) throw new Error(`virtnbdmap ${name} exited ${child.exitCode}: ${(await done).stderr}`);
    if (Date.now() > deadline) throw new Error(`virtnbdmap ${name} printed no URIs within 15 s`);
    await new Promise((r) => setTimeout(r, 25));
  }
  const uris = printed.trim().split('\n') as [string, string];
  const socket = new URL(uris[0]).searchParams.get('socket') ?? '';
  await fs.access(socket);
  return {
    uris,
    socket,
    stop: async () => {
      child.kill('SIGINT');
      const result = await done;
      assert.equal(result.code, 0, `virtnbdmap ${name} did not exit cleanly: ${result.stderr}`);
      // The signal is its ordinary end: the last line says it stopped, nothing after it.
      assert.match(result.stderr, /stopped; removed .+\n$/, `virtnbdmap ${name} ended otherwise: ${result.stderr}`);
      return result;
    },
    kill: async () => {
      child.kill('SIGKILL');
      await done;
    },
  };
}
