// The commands' flag checks beyond yargs: a flag given an empty value, which yargs reads as 0 for a number, and
// which for a string (-o "$UNSET") would mean the working directory.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import yargs from 'yargs';
import { argumentsForLog, argparseNames, asArgparseSays, blankFlag, compressLevel, firstWrongFlag, workerCount, expandLongPrefixes, missingRequired, splitShortValues, withoutCamelTwins, type FlagNames } from '../../src/cli/common.js';

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

test('splitShortValues: short flags as argparse reads them (-lfull, -cD, -nz5), values and unknown letters left alone', () => {
  const flags = { valued: new Set(['l', 'o', 'd', 'z', 'N', 'u']), switches: new Set(['c', 'D', 'n', 'e']), optional: new Set(['z']) };
  const split = (...args: string[]): string[] => splitShortValues(args, flags);
  assert.deepEqual(split('-dvm1', '-lfull', '-o/backup/vm1'), ['-d=vm1', '-l=full', '-o=/backup/vm1']);
  assert.deepEqual(split('-cD', '-Nvm2'), ['-c', '-D', '-N=vm2']);
  assert.deepEqual(split('-nz5', '-nz', '-l=inc'), ['-n', '-z=5', '-n', '-z', '-l=inc'], '-z alone takes no next argument');
  assert.deepEqual(split('-uvirtnbdbackup.1', '-o-'), ['-u=virtnbdbackup.1', '-o=-']);
  // A value that starts with "-", or is empty, stays the flag's (yargs takes what follows "=" as it is).
  assert.deepEqual(split('-d-vm', '-d=-vm', '-d=', '-z='), ['-d=-vm', '-d=-vm', '-d', '', '-z', '']);
  assert.deepEqual(split('-N', '-cD', '-l', 'full'), ['-N', '-cD', '-l', 'full'], 'a flag\'s value stays whole, even one that looks like flags');
  assert.deepEqual(split('-xq', '--level=full', '-5'), ['-xq', '--level=full', '-5'], 'unknown letters, long flags and numbers as they are');
  assert.deepEqual(split('--', '-lfull'), ['--', '-lfull'], 'after --, nothing is a flag');
  assert.throws(() => split('-e5'), /^Error: -e5: -e takes no value$/, 'a switch with a value, which yargs read as -e false');
  assert.throws(() => split('-ne=1'), /-e takes no value/);
});

test('expandLongPrefixes: a long flag abbreviated as argparse takes it is written out; an ambiguous one throws; values and what follows -- stay', () => {
  const names = new Set(['level', 'output', 'printonly', 'type', 'threshold', 'tls', 'tls-cert', 'compress', 'noprogress']);
  const valued = new Set(['level', 'output', 'type', 'threshold', 'tls-cert']);
  assert.deepEqual(expandLongPrefixes(['--lev', 'inc', '--out=o', '--print', '--comp', '--thr', '5'], names, valued),
    ['--level', 'inc', '--output=o', '--printonly', '--compress', '--threshold', '5']);
  // A flag's value that looks like a flag is its value; an exact name wins over longer ones (--tls, --tls-cert).
  assert.deepEqual(expandLongPrefixes(['--output', '--lev', '--tls', '--', '--lev'], names, valued), ['--output', '--lev', '--tls', '--', '--lev']);
  assert.deepEqual(expandLongPrefixes(['--nosuch', '--noprog'], names, valued), ['--nosuch', '--noprogress']);
  assert.throws(() => expandLongPrefixes(['--t', '5'], names, valued), /^Error: ambiguous option: --t could match --type, --threshold, --tls, --tls-cert$/);
  assert.deepEqual(expandLongPrefixes(['--tls-', 'cert.pem'], names, valued), ['--tls-cert', 'cert.pem'], 'a prefix of one name alone is that name');
  // A switch given a value, as argparse refuses it (yargs took --printonly=1 as not given); a flag's value is its own.
  const switches = new Set(['printonly', 'tls', 'noprogress']);
  assert.throws(() => expandLongPrefixes(['--print=1'], names, valued, switches), /^Error: argument --printonly: ignored explicit argument '1'$/);
  assert.throws(() => expandLongPrefixes(['--tls='], names, valued, switches), /^Error: argument --tls: ignored explicit argument ''$/);
  assert.deepEqual(expandLongPrefixes(['--output', '--tls=1', '--noprog'], names, valued, switches), ['--output', '--tls=1', '--noprogress']);
  // A prefix that names one of Python's flags and flags of ours alone is Python's flag, as there; ours by any
  // prefix of their own, or in full.
  const ours = new Set([...names, 'nocolor', 'quiet', 'pause', 'password', 'qemu', 'checkpointdir', 'checkpoint-prefix']);
  const extensions = new Set(['nocolor', 'quiet', 'pause', 'checkpoint-prefix']);
  assert.deepEqual(expandLongPrefixes(['--no', '--q', '--pa', 'x', '--check', 'c'], ours, valued, switches, extensions), ['--noprogress', '--qemu', '--password', 'x', '--checkpointdir', 'c']);
  assert.deepEqual(expandLongPrefixes(['--noc', '--qu', '--pau', '--checkpoint-', 'p'], ours, valued, switches, extensions), ['--nocolor', '--quiet', '--pause', '--checkpoint-prefix', 'p']);
  assert.throws(() => expandLongPrefixes(['--p'], ours, valued, switches, extensions), /^Error: ambiguous option: --p could match --printonly, --pause, --password$/, 'two of Python\'s: ambiguous there too');
});

test('withoutCamelTwins: an unknown dashed flag is named once, as given (yargs adds its camelCase twin)', () => {
  assert.equal(withoutCamelTwins('Unknown arguments: no-raw, noRaw'), 'Unknown argument: no-raw');
  assert.equal(withoutCamelTwins('Unknown arguments: foo-bar, fooBar, baz'), 'Unknown arguments: foo-bar, baz');
  assert.equal(withoutCamelTwins('Unknown argument: bogus'), 'Unknown argument: bogus');
  assert.equal(withoutCamelTwins('Missing required argument: domain'), 'Missing required argument: domain');
});

test('argumentsForLog: the command line for the set\'s log, --password\'s value hidden, odd words quoted as a shell reads them', () => {
  assert.equal(argumentsForLog(['-d', 'web vm', '-l=full', '--user', 'backup', '--password', 's3cret', '-o', "/b/it's"]),
    "-d 'web vm' -l=full --user backup --password *** -o '/b/it'\\''s'");
  assert.equal(argumentsForLog(['--password=s3cret', '-o', '']), "--password=*** -o ''");
});

/** yargs' view of flags shaped as virtnbdbackup's: -d required, -o required unless -k, -l with choices. */
function backupLikeFlags(): FlagNames & { boolean: string[]; number: string[] } {
  const flags = yargs([])
    .option('domain', { alias: 'd', type: 'string', demandOption: true })
    .option('level', { alias: 'l', choices: ['copy', 'full'] })
    .option('output', { alias: 'o', type: 'string' })
    .option('killonly', { alias: 'k', type: 'boolean' })
    .option('no-sparse-detection', { type: 'boolean' })
    .option('tls', { type: 'boolean' })
    .option('worker', { alias: 'w', type: 'number' })
    .option('compress', { alias: 'z', type: 'number' })
    .version('version', 'version', '1').alias('version', 'V')
    .help('help').alias('help', 'h');
  return (flags as unknown as { getOptions(): ReturnType<typeof backupLikeFlags> }).getOptions();
}

test('missingRequired: every required flag missing, named as argparse names them in one line, in their order; one required unless another is given', () => {
  const kinds = backupLikeFlags();
  const unless = { output: 'killonly' };
  assert.equal(missingRequired(kinds, [], unless), 'the following arguments are required: -d/--domain, -o/--output');
  assert.equal(missingRequired(kinds, ['-l', 'full'], unless), 'the following arguments are required: -d/--domain, -o/--output');
  assert.equal(missingRequired(kinds, ['--domain=vm'], unless), 'the following arguments are required: -o/--output');
  assert.equal(missingRequired(kinds, ['-o', '/b'], unless), 'the following arguments are required: -d/--domain');
  assert.equal(missingRequired(kinds, ['-d=vm', '-k'], unless), undefined, '-k needs no -o');
  assert.equal(missingRequired(kinds, ['-d', 'vm', '--output=/b'], unless), undefined);
  assert.equal(missingRequired(kinds, ['--', '-d', 'vm'], unless), 'the following arguments are required: -d/--domain, -o/--output', 'after --, no flags');
  assert.equal(argparseNames(kinds, 'no-sparse-detection'), '--no-sparse-detection', 'no camelCase twin');
  assert.equal(argparseNames(kinds, 'l'), '-l/--level', 'by its letter too');
});

test('asArgparseSays: yargs\' failures in argparse\'s words: missing flags (before unknown ones), no value, a wrong choice, unknown arguments as written', () => {
  const kinds = backupLikeFlags();
  const unless = { output: 'killonly' };
  const says = (message: string, args: string[]): string => asArgparseSays(message, kinds, args, unless);
  assert.equal(says('Missing required argument: domain', ['-l', 'full']), 'the following arguments are required: -d/--domain, -o/--output');
  assert.equal(says('Unknown argument: bogus', ['-d', 'vm', '--bogus']), 'the following arguments are required: -o/--output', 'argparse names the missing flags first');
  assert.equal(says('Not enough arguments following: l', ['-d', 'vm', '-o', 'x', '-l']), 'argument -l/--level: expected one argument');
  assert.equal(says('Invalid values:\n  Argument: level, Given: "a\\"b", Choices: "copy", "full"', ['-d', 'vm', '-o', 'x', '-l', 'a"b']),
    'argument -l/--level: invalid choice: \'a"b\' (choose from \'copy\', \'full\')');
  assert.equal(says('Unknown arguments: bogus, X, extra', ['-d', 'vm', '-o', 'x', '--bogus=5', '-X', 'extra']), 'unrecognized arguments: --bogus=5 -X extra');
  assert.equal(says('Unknown argument: no-raw', ['-d', 'vm', '-o', 'x']), 'unrecognized arguments: --no-raw', 'not found as written: as a flag');
  assert.equal(says('-T takes a number', ['-d', 'vm']), '-T takes a number', 'any other message as it is');
});

test('compressLevel and workerCount: -z and -w as Python\'s virtnbdbackup takes them', () => {
  assert.equal(compressLevel(false, undefined), false, 'no -z');
  assert.equal(compressLevel(true, undefined), 2, '-z alone');
  assert.equal(compressLevel(true, Number.NaN), 2, '-z alone, as yargs may give it');
  assert.equal(compressLevel(true, 0), false, '-z 0: Python tests the level for truth, and compresses nothing');
  assert.equal(compressLevel(true, 9), 9);
  assert.equal(compressLevel(true, 16), 16);
  assert.equal(compressLevel(true, 99), 16, 'above 16: liblz4\'s highest, as python-lz4 hands it on');
  assert.equal(compressLevel(true, 99999999999), 16);
  assert.equal(compressLevel(true, -3), 1, 'below 0: the fast mode');
  assert.equal(workerCount(undefined), undefined);
  assert.equal(workerCount(0), 1, 'Python sets -w below 1 to 1');
  assert.equal(workerCount(-4), 1);
  assert.equal(workerCount(3), 3);
});

test('firstWrongFlag: the first flag with no value, a wrong choice or no whole number, as argparse reads left to right; none after -h or -V, which come first', () => {
  const kinds = backupLikeFlags();
  const optional = new Set(['compress', 'z']);
  const wrong = (...args: string[]): string | undefined => firstWrongFlag(args, kinds, optional);
  assert.equal(wrong('-o', '-h'), 'argument -o/--output: expected one argument', 'yargs showed the help: exit 0');
  assert.equal(wrong('-d', 'vm', '-o', '-V'), 'argument -o/--output: expected one argument');
  assert.equal(wrong('-d', 'vm', '-o'), 'argument -o/--output: expected one argument');
  assert.equal(wrong('-l=foo', '--help'), "argument -l/--level: invalid choice: 'foo' (choose from 'copy', 'full')");
  assert.equal(wrong('-w', 'abc', '-h'), "argument -w/--worker: invalid int value: 'abc'");
  assert.equal(wrong('-z', 'abc'), "argument -z/--compress: invalid int value: 'abc'", '-z takes a next word as its value, as argparse does');
  // Numbers yargs read as numbers, where argparse's int refuses them; an empty one yargs read as 0.
  for (const value of ['1e3', '0x10', '1.5', '10MB']) assert.equal(wrong('-d', 'vm', '--worker', value), `argument -w/--worker: invalid int value: '${value}'`);
  assert.equal(wrong('--worker=0x10'), "argument -w/--worker: invalid int value: '0x10'");
  assert.equal(wrong('-w', ''), '-w takes a number, not an empty one');
  assert.equal(wrong('--worker='), '--worker takes a number, not an empty one');
  assert.equal(wrong('-w', '1000', '-z', '-w', '-1', '-w', ' 7 ', '-z', '-n'), undefined, 'whole numbers, -z alone, -1 a value');
  assert.equal(wrong('-l', 'foo', '-w', 'abc'), "argument -l/--level: invalid choice: 'foo' (choose from 'copy', 'full')", 'the first one');
  // Help or version first: argparse answers them.
  assert.equal(wrong('-h', '-l', 'foo'), undefined);
  assert.equal(wrong('-V', '-o'), undefined);
  assert.equal(wrong('-o', '-', '-w', '-5', '-z', '-h'), undefined, '-, -5 are values; -z may stand alone');
  assert.equal(wrong('-z', '--', '-w', '1e3'), undefined, 'after --, nothing is a flag');
  assert.equal(wrong('--bogus', '-o', '/b', '-h'), undefined, 'an unknown flag is no stop: argparse names it after the rest');
});
