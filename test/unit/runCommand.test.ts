// runCommand, which every command runs in: its exit code and one error line, also when the run stalls (the event
// loop empties while the run still waits, where Node would exit 0 as if it had succeeded) or a second stop signal
// cuts its clean-up short (Node's 'exit' listeners still run; at a terminal, the cursor progress bars hid is shown).
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { repoRoot } from '../support/cli.js';

const common = path.join(repoRoot, 'dist', 'src', 'cli', 'common.js');

/** Runs `body` (JavaScript: an async function of the abort signal) under runCommand in a child process. */
function runBody(body: string, leftover?: string): { status: number | null; stderr: string } {
  const script = `import { runCommand } from ${JSON.stringify(common)}; import { UserError } from ${JSON.stringify(path.join(repoRoot, 'dist', 'src', 'util', 'errors.js'))};
void UserError; void runCommand('demo', false, ${body}, { leftover: ${JSON.stringify(leftover)} });`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  return { status: r.status, stderr: r.stderr };
}

test('the body\'s exit code; a UserError is one line with its own code', () => {
  assert.deepEqual(runBody('async () => 2'), { status: 2, stderr: '' });
  const failed = runBody("async () => { throw new UserError('disk vda is gone; do this', 1); }");
  assert.deepEqual(failed, { status: 1, stderr: 'demo: error: disk vda is gone; do this\n' });
});

test('a run that stalls (waits for an event that can no longer come) fails with one line, not a silent exit 0', () => {
  const stalled = runBody('() => new Promise(() => {})', "end its job with 'demo -k'");
  assert.equal(stalled.status, 1);
  assert.match(stalled.stderr, /^demo: error: internal: the run stopped waiting for an event that never came, its work incomplete \(a bug: please report it with the output of -v\); end its job with 'demo -k'\n$/);
});

test('a second stop signal during the clean-up stops at once, with one line saying what may be left', () => {
  // The timer stands for the work in flight that keeps a real run's event loop busy.
  const body = `async (signal) => {
    setTimeout(() => undefined, 20000);
    process.kill(process.pid, 'SIGTERM');
    await new Promise((resolve) => signal.addEventListener('abort', resolve));
    process.kill(process.pid, 'SIGTERM');
    await new Promise((resolve) => setTimeout(resolve, 20000));
    return 0;
  }`;
  const cut = runBody(body, "end its job with 'demo -k'");
  assert.deepEqual(cut, { status: 130, stderr: "demo: error: stopped by a second SIGTERM before its clean-up ended; end its job with 'demo -k'\n" });
  // One signal: the clean-up runs to its end.
  const once = runBody("async (signal) => { const work = setTimeout(() => undefined, 20000); process.kill(process.pid, 'SIGINT'); await new Promise((resolve) => signal.addEventListener('abort', resolve)); clearTimeout(work); throw signal.reason; }");
  assert.deepEqual(once, { status: 130, stderr: 'demo: error: interrupted by SIGINT; cleaned up\n' });
  // With the addon loaded the second one ends through its exitNow, which skips Node's 'exit' listeners: they remove
  // what a run must not leave (virtnbdmap's socket and overlay, lock files), so they run first.
  const addon = JSON.stringify(path.join(repoRoot, 'dist', 'src', 'native', 'addon.js'));
  const native = runBody(`async (signal) => {
    (await import(${addon})).native();
    process.on('exit', (code) => process.stderr.write('exit listener: ' + code + '\\n'));
    ${body.slice(body.indexOf('{') + 1)}`);
  assert.deepEqual(native, { status: 130, stderr: 'demo: error: stopped by a second SIGTERM before its clean-up ended\nexit listener: 130\n' });
});

test('at a terminal, a second stop signal while progress bars are drawn shows the cursor they hid, and its line begins below them', () => {
  const script = `import { makeProgress, runCommand } from ${JSON.stringify(common)};
void runCommand('demo', false, async (signal) => {
  const progress = await makeProgress({}, 'saving');
  progress.factory('vda', 64 * 1024 * 1024)(16 * 1024 * 1024);
  setTimeout(() => undefined, 20000);
  process.kill(process.pid, 'SIGINT');
  await new Promise((resolve) => signal.addEventListener('abort', resolve));
  process.kill(process.pid, 'SIGINT');
  await new Promise((resolve) => setTimeout(resolve, 20000));
  return 0;
});`;
  // script(1) gives the command a terminal and records what it writes there.
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vnbd-tty-'));
  const file = path.join(dir, 'run.mjs');
  writeFileSync(file, script);
  const r = spawnSync('script', ['-qfec', `${process.execPath} ${file}`, '/dev/null'], { encoding: 'utf8' });
  rmSync(dir, { recursive: true, force: true });
  assert.equal(r.status, 130, r.stdout);
  assert.match(r.stdout, /\x1b\[\?25l/, 'the bars hid the cursor');
  assert.match(r.stdout, /\x1b\[\?25h\r?\ndemo: error: stopped by a second SIGINT before its clean-up ended\r?\n/);
});
