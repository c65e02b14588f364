// The commands' flag checks beyond yargs: a number flag given an empty value, which yargs reads as 0.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { blankNumberFlag } from '../../src/cli/common.js';

const numbers = new Set(['threshold', 'T', 'nbd-timeout', 'compress', 'z']);

test('blankNumberFlag: an empty or blank value of a number flag, named as written; anything else passes', () => {
  assert.equal(blankNumberFlag(['-d', 'vm', '-T', ''], numbers), '-T');
  assert.equal(blankNumberFlag(['--nbd-timeout='], numbers), '--nbd-timeout');
  assert.equal(blankNumberFlag(['--threshold', ' '], numbers), '--threshold');
  assert.equal(blankNumberFlag(['-z', '', '-T', ''], numbers), '-z', 'the first one');
  assert.equal(blankNumberFlag(['-T', '5', '--nbd-timeout=0', '-z'], numbers), undefined, 'values, and -z alone (level 2)');
  assert.equal(blankNumberFlag(['-o', '', '--output='], numbers), undefined, 'not a number flag');
  assert.equal(blankNumberFlag(['--', '-T', ''], numbers), undefined, 'after --, arguments are not flags');
});
