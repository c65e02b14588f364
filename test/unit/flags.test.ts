// The commands' flag checks beyond yargs: a flag given an empty value, which yargs reads as 0 for a number, and
// which for a string (-o "$UNSET") would mean the working directory.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { blankFlag } from '../../src/cli/common.js';

const numbers = new Set(['threshold', 'T', 'nbd-timeout', 'compress', 'z']);
const strings = new Set(['output', 'o', 'uri', 'U']);

test('blankFlag: an empty or blank value of a number or string flag, named as written; anything else passes', () => {
  assert.deepEqual(blankFlag(['-d', 'vm', '-T', ''], numbers, strings), { flag: '-T', number: true });
  assert.deepEqual(blankFlag(['--nbd-timeout='], numbers, strings), { flag: '--nbd-timeout', number: true });
  assert.deepEqual(blankFlag(['--threshold', ' '], numbers, strings), { flag: '--threshold', number: true });
  assert.deepEqual(blankFlag(['-o', '', '-T', ''], numbers, strings), { flag: '-o', number: false }, 'the first one');
  assert.deepEqual(blankFlag(['--uri='], numbers, strings), { flag: '--uri', number: false });
  assert.equal(blankFlag(['-T', '5', '--nbd-timeout=0', '-o', '/b', '-z'], numbers, strings), undefined, 'values, and -z alone (level 2)');
  assert.equal(blankFlag(['-d', '', '--device='], numbers, strings), undefined, 'a flag of neither list (virtnbdmap -d \'\')');
  assert.equal(blankFlag(['--', '-T', ''], numbers, strings), undefined, 'after --, arguments are not flags');
});
