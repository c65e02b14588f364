// The tests' clean-up (support/cleanup.ts), run in a test file of its own: last registered first, each one whatever
// the others do, so a failing test stops what it started and its file ends (t.after's order hung it).
import { spawn } from 'node:child_process';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const helper = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'support', 'cleanup.js');

/** Runs `body` as a test of a file of its own (node --test); its exit code and the marks its hooks left, in order. */
async function runTestFile(dir: string, body: string): Promise<{ code: number | null; marks: string[]; output: string }> {
  const file = path.join(dir, `case-${Math.random().toString(36).slice(2)}.test.mjs`);
  const marks = `${file}.marks`;
  await fs.writeFile(file, [
    "import { test } from 'node:test';",
    "import fs from 'node:fs';",
    `import { cleanup } from ${JSON.stringify(helper)};`,
    `const mark = (what) => fs.appendFileSync(${JSON.stringify(marks)}, what + '\\n');`,
    `test('case', async (t) => {\n${body}\n});`,
  ].join('\n'));
  // Without the runner's mark of a test file, which makes a nested node --test run nothing.
  const { NODE_TEST_CONTEXT: _, ...env } = process.env;
  const child = spawn(process.execPath, ['--test', '--test-reporter=tap', '--test-timeout=20000', file], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let output = '';
  child.stdout.on('data', (d: Buffer) => { output += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { output += d.toString(); });
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  const text = await fs.readFile(marks, 'utf8').catch(() => '');
  return { code, marks: text.split('\n').filter(Boolean), output };
}

test('clean-ups run last registered first, each one although another throws; the test\'s own t.after hooks still run, and the failure is reported', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-cleanup-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  // As a map.test.ts test that fails: a tmpfs, a map serving with its overlay on it (a timer holds the process open
  // as the map's child process did), a client. The unmount fails while the map runs; with t.after it came first,
  // failed, and the map's stop was skipped: the file hung until its timeout.
  const started = Date.now();
  const failing = await runTestFile(dir, `
  let serving = true;
  const map = setInterval(() => {}, 1000);
  cleanup(t, () => { mark('unmount'); if (serving) throw new Error('umount: target is busy'); });
  cleanup(t, () => { mark('stop map'); serving = false; clearInterval(map); });
  cleanup(t, () => { mark('close client'); throw new Error('client close failed'); });
  t.after(() => mark('own hook'));
  throw new Error('on purpose');`);
  assert.ok(Date.now() - started < 15_000, 'the test file hung');
  assert.equal(failing.code, 1, failing.output);
  assert.deepEqual(failing.marks, ['close client', 'stop map', 'unmount', 'own hook']);
  // The test's own failure is the one reported (Node reports a test's first error).
  assert.match(failing.output, /on purpose/);
  assert.doesNotMatch(failing.output, /target is busy|timed out/);
  // A test that passes, whose clean-up fails, fails.
  const passing = await runTestFile(dir, `
  cleanup(t, () => { mark('rm'); throw new Error('rm failed'); });
  cleanup(t, () => mark('stop'));`);
  assert.equal(passing.code, 1, passing.output);
  assert.deepEqual(passing.marks, ['stop', 'rm']);
  assert.match(passing.output, /rm failed/);
});
