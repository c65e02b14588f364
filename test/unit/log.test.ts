// The log: one message is one line in the file and on the console, whatever names it holds; block() keeps lines.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Logger, printable } from '../../src/util/log.js';

test('control characters in a message are escaped, so a name holding a newline stays on its line', () => {
  assert.equal(printable('set /var/tmp/a\nb: done'), 'set /var/tmp/a\\nb: done');
  assert.equal(printable('bell\x07 esc\x1b[31m tab\tkept'), 'bell\\u0007 esc\\u001b[31m tab\tkept');
});

test('the log file gets one line per message, and a block a line per line of its text', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbd-log-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'run.log');
  const log = new Logger({ quiet: true, color: false });
  log.attachFile(file);
  log.info('disk vda saved to /backup/odd\nname/vda.full.data');
  log.block('debug', 'job XML:\n<domainbackup>\n</domainbackup>');
  await log.detachFile();
  const lines = (await fs.readFile(file, 'utf8')).trimEnd().split('\n');
  assert.equal(lines.length, 4, lines.join('\n'));
  assert.match(lines[0] as string, /INFO disk vda saved to \/backup\/odd\\nname\/vda\.full\.data$/);
  assert.match(lines[3] as string, /DEBUG <\/domainbackup>$/);
});
