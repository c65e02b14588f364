// The log: one message is one line in the file and on the console, whatever names it holds; block() keeps lines;
// at a terminal, lines logged while progress bars are drawn go above them, whole.
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Logger, consoleDiverted, printable, writeConsole } from '../../src/util/log.js';
import { makeProgress } from '../../src/cli/common.js';

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

/** A terminal's stderr that records what is written to it. */
function fakeTerminal(): { stream: NodeJS.WriteStream; written: () => string } {
  let text = '';
  const stream = new Writable({ write(chunk: Buffer, _encoding, done) { text += chunk.toString(); done(); } });
  Object.assign(stream, { isTTY: true, columns: 100, rows: 40 });
  return { stream: stream as unknown as NodeJS.WriteStream, written: () => text };
}

/** The screen `text` leaves on a terminal: the cursor moves, line clears and carriage returns the bars use. */
function screen(text: string): string[] {
  const rows: string[][] = [[]];
  let row = 0;
  let col = 0;
  const line = (): string[] => (rows[row] ??= []);
  for (let at = 0; at < text.length;) {
    const esc = /^\x1b\[(\??)(\d*)([A-Za-z])/.exec(text.slice(at));
    if (esc) {
      const [, privateMode, count, command] = esc;
      const n = count ? Number(count) : 1;
      if (!privateMode && command === 'A') row = Math.max(0, row - n);
      if (!privateMode && command === 'B') row += n;
      if (!privateMode && command === 'G') col = n - 1;
      if (!privateMode && command === 'K') line().splice(count === '2' ? 0 : col, Infinity);
      if (!privateMode && command === 'J') rows.splice(row + 1, Infinity);
      at += esc[0].length;
      continue;
    }
    const ch = text[at++] as string;
    if (ch === '\r') col = 0;
    else if (ch === '\n') { row++; col = 0; }
    else {
      const cells = line();
      while (cells.length < col) cells.push(' ');
      cells[col++] = ch;
    }
  }
  return rows.map((cells) => cells.join('').trimEnd()).filter((r, i, all) => r !== '' || all.slice(i).some(Boolean));
}

test('at a terminal, lines logged (and the command\'s own) while bars are drawn go above them whole, and the bars\' last redraw covers none', async () => {
  const { stream, written } = fakeTerminal();
  const log = new Logger({ color: false });
  const progress = await makeProgress({}, 'saving', stream);
  const MiB = 1024 * 1024;
  const vda = progress.factory!('vda', 32 * MiB);
  log.info('disk vdb: 16777216 bytes of data in 3 extents, writing vdb.full.data');
  const vdb = progress.factory!('vdb', 16 * MiB);
  progress.factory!('vdc', 0);
  vda(16 * MiB);
  await sleep(250);
  // The command's own line, as runCommand's at a first Ctrl-C.
  writeConsole('demo: cleaning up; Ctrl-C again stops at once\n');
  vda(16 * MiB);
  vdb(16 * MiB);
  log.info('disk vda: saved');
  log.info('disk vdb: saved');
  log.info('finished full backup, checkpoint virtnbdbackup.0');
  progress.stop();
  progress.stop();
  assert.deepEqual(screen(written()), [
    'disk vdb: 16777216 bytes of data in 3 extents, writing vdb.full.data',
    'demo: cleaning up; Ctrl-C again stops at once',
    'disk vda: saved',
    'disk vdb: saved',
    'finished full backup, checkpoint virtnbdbackup.0',
    `saving vda [${'\u2588'.repeat(40)}] 100% | 32/32 MiB`,
    `saving vdb [${'\u2588'.repeat(40)}] 100% | 16/16 MiB`,
    // Nothing to copy (an inc of a disk that did not change) is done, not 0% of 1 MiB.
    `saving vdc [${'\u2588'.repeat(40)}] 100% | 0/0 MiB`,
  ]);
  // After the bars, lines go to stderr again.
  assert.equal(consoleDiverted(), false);
});

test('bars that were never drawn (a run that failed first) leave nothing on the terminal', async () => {
  const { stream, written } = fakeTerminal();
  const progress = await makeProgress({}, 'saving', stream);
  progress.stop();
  assert.equal(written(), '');
});
