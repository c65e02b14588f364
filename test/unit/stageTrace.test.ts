// The stage trace the bench reads: what a summary makes of events, and the file a traced process leaves at exit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { repoRoot, runCli } from '../support/cli.js';
import { STAGE_TRACE_ENV, summarizeStages, type StageEvent } from '../../src/util/stageTrace.js';

test('a summary gives each stage its share of the span and how many of its calls ran on average', () => {
  // 0-100 ms: one disk write throughout, a second from 50 to 100; a read from 0 to 25; no compression.
  const events: StageEvent[] = [
    ['diskWrite', 1, 1000], ['read', 1, 1000], ['read', -1, 1025], ['diskWrite', 1, 1050], ['diskWrite', -1, 1100], ['diskWrite', -1, 1100],
  ];
  const summary = summarizeStages(events);
  assert.equal(summary.spanMs, 100);
  assert.equal(summary.busy.diskWrite, 1);
  assert.equal(summary.meanRunning.diskWrite, 1.5);
  assert.equal(summary.busy.read, 0.25);
  assert.equal(summary.busy.compress, 0);
  assert.equal(summary.busy.sync, 0);
  assert.equal(summarizeStages([]).spanMs, 0);
});

test('a traced process writes its events to the named file when it exits, and none without the variable', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-stages-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'trace.json');
  const module = path.join(repoRoot, 'dist', 'src', 'util', 'stageTrace.js');
  const script = `const { traced } = await import(${JSON.stringify(module)});
    await Promise.all([traced('read', async () => 1), traced('compress', () => new Promise((r) => setTimeout(r, 5)))]);`;

  await runCli('/usr/bin/env', [`${STAGE_TRACE_ENV}=${file}`, process.execPath, '--input-type=module', '-e', script]);
  const events = JSON.parse(await fs.readFile(file, 'utf8')) as StageEvent[];
  assert.deepEqual(events.map(([stage, change]) => `${stage}${change}`).sort(), ['compress-1', 'compress1', 'read-1', 'read1']);
  assert.ok(summarizeStages(events).busy.compress > 0);

  await fs.rm(file);
  assert.equal(process.env[STAGE_TRACE_ENV], undefined);
  await runCli(process.execPath, ['--input-type=module', '-e', script]);
  await assert.rejects(fs.access(file));
});
