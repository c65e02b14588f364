// Bad input and failures on a real domain: one-line errors, non-zero exits, and nothing left behind — no
// running job, no checkpoint of the failed run, no socket — while the evidence (.partial) stays; libvirtd killed
// in mid-run is named as the cause, with the way back (a restore with -D defines on a connection of its own at the end);
// a full refused for a bad --scratchdir or -f keeps the old chain's checkpoints.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { TestDomain, withDomain, withTmpfs, tempDir } from '../support/testbed.js';
import { errorLines, ourBin, qemuNbdPid, runCli, runOk, startCli, startHeldOnOutput, type CliResult, type CliRun, whenExists } from '../support/cli.js';
import { withLibvirtdKilled } from '../support/libvirtd.js';
import { assertRestoresTo } from '../support/points.js';
import { openScratchSpace, watchScratch } from '../../src/backup/scratchWatch.js';
import { Logger } from '../../src/util/log.js';
import { LOCAL_HOST } from '../../src/libvirt/domainHost.js';

const virsh = (...args: string[]): string => execFileSync('virsh', ['-c', 'qemu:///system', ...args], { encoding: 'utf8' });

/** Asserts the domain has no backup job, no checkpoint and the socket is gone. */
/** Whether the domain's job ends within 10 s (another process ends it: a run's guard, libvirtd reading a queued end). */
async function jobEndsSoon(dom: TestDomain): Promise<boolean> {
  const ended = (): boolean => /Job type:\s+None/.test(virsh('domjobinfo', dom.name));
  for (let i = 0; i < 200 && !ended(); i++) await new Promise((resolve) => setTimeout(resolve, 50));
  return ended();
}

async function assertCleanDomain(dom: TestDomain, socket: string): Promise<void> {
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '');
  const socketLeft = await fs.access(socket).then(() => true, () => false);
  assert.equal(socketLeft, false, `socket ${socket} left behind`);
}

test('wrong flags: one line naming the problem, exit 2 as argparse does, for all three commands', async () => {
  const cases: Array<[ReturnType<typeof ourBin>, string[], RegExp]> = [
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'bogus', '-o', '/nonexistent'], /^virtnbdbackup: error: argument -l\/--level: invalid choice: 'bogus' \(choose from 'copy', 'full', 'inc', 'diff', 'auto'\); see virtnbdbackup --help$/],
    [ourBin('virtnbdbackup'), ['-l', 'full', '-o', '/nonexistent'], /^virtnbdbackup: error: the following arguments are required: -d\/--domain; see virtnbdbackup --help$/],
    // Every missing flag in one line, as argparse names them (only the first was named).
    [ourBin('virtnbdbackup'), ['-l', 'full'], /^virtnbdbackup: error: the following arguments are required: -d\/--domain, -o\/--output; see virtnbdbackup --help$/],
    [ourBin('virtnbdrestore'), [], /^virtnbdrestore: error: the following arguments are required: -i\/--input, -o\/--output; see virtnbdrestore --help$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '--bogus'], /^virtnbdrestore: error: unrecognized arguments: --bogus; see virtnbdrestore --help$/],
    [ourBin('virtnbdmap'), [], /^virtnbdmap: error: the following arguments are required: -f\/--file; see virtnbdmap --help$/],
    // A number flag given a word (yargs would read it as NaN, which went on as no threshold at all).
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'inc', '-o', '/nonexistent', '-T', '10MB'], /^virtnbdbackup: error: argument -T\/--threshold: invalid int value: '10MB'; see virtnbdbackup --help$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '-P', 'ten'], /^virtnbdrestore: error: argument -P\/--nbd-port: invalid int value: 'ten'; see virtnbdrestore --help$/],
    [ourBin('virtnbdmap'), ['-f', '/nonexistent', '-b', '64k'], /^virtnbdmap: error: argument -b\/--blocksize: invalid int value: '64k'; see virtnbdmap --help$/],
    // ... or an empty value (an unset shell variable), which yargs reads as 0: always back up, wait forever.
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'inc', '-o', '/nonexistent', '-T', ''], /^virtnbdbackup: error: -T takes a number, not an empty one; see virtnbdbackup --help$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '--nbd-timeout='], /^virtnbdrestore: error: --nbd-timeout takes a number, not an empty one; see virtnbdrestore --help$/],
    // An empty string: -o '' wrote the set into the working directory (Python's virtnbdbackup writes it into /).
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'full', '-o', ''], /^virtnbdbackup: error: -o takes a value, not an empty one; see virtnbdbackup --help$/],
    [ourBin('virtnbdrestore'), ['-i', '', '-o', '/nonexistent'], /^virtnbdrestore: error: -i takes a value, not an empty one; see virtnbdrestore --help$/],
    [ourBin('virtnbdmap'), ['-f', '/nonexistent', '--socket='], /^virtnbdmap: error: --socket takes a value, not an empty one; see virtnbdmap --help$/],
    [ourBin('virtnbdbackup'), ['-d', 'x', '-o', '/nonexistent', '--nbd-timeout', '-1'], /^virtnbdbackup: error: --nbd-timeout takes a number of seconds, 0 or more; see virtnbdbackup --help$/],
    // A list that names nothing (-i "$DISKS" with DISKS=","), which went on as not given: every disk, every file.
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'full', '-o', '/nonexistent', '-i', ','], /^virtnbdbackup: error: -i\/--include "," names nothing: give comma-separated names$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '--sequence', ' , '], /^virtnbdrestore: error: -s\/--sequence " , " names nothing: give comma-separated names$/],
    [ourBin('virtnbdmap'), ['-f', ','], /^virtnbdmap: error: -f\/--file "," names nothing: give comma-separated names$/],
    // A flag with no value at all (last, or followed by another flag) went on as not given: -o, the working directory.
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'full', '-o'], /^virtnbdbackup: error: argument -o\/--output: expected one argument; see virtnbdbackup --help$/],
    [ourBin('virtnbdbackup'), ['-d', 'x', '-o', '-l', 'full'], /^virtnbdbackup: error: argument -o\/--output: expected one argument; see virtnbdbackup --help$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o'], /^virtnbdrestore: error: argument -o\/--output: expected one argument; see virtnbdrestore --help$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '-D', '-N'], /^virtnbdrestore: error: argument -N\/--name: expected one argument; see virtnbdrestore --help$/],
    [ourBin('virtnbdmap'), ['-f', '/nonexistent', '-p'], /^virtnbdmap: error: argument -p\/--listen-port: expected one argument; see virtnbdmap --help$/],
    // ... also one with choices (-l last went on as a copy, -a last as a restore).
    [ourBin('virtnbdbackup'), ['-d', 'x', '-o', '/nonexistent', '-l'], /^virtnbdbackup: error: argument -l\/--level: expected one argument; see virtnbdbackup --help$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '-a'], /^virtnbdrestore: error: argument -a\/--action: expected one argument; see virtnbdrestore --help$/],
    // No --no-<flag> but --no-sparse-detection, which a prefix names too: yargs took --no-raw as -r off.
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'inc', '-o', '/nonexistent', '--no-raw'], /^virtnbdbackup: error: unrecognized arguments: --no-raw; see virtnbdbackup --help$/],
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'inc', '-o', '/nonexistent', '--t', '5'], /^virtnbdbackup: error: ambiguous option: --t could match --type, --threshold, --tls, --tls-cert; see virtnbdbackup --help$/],
    // A switch given a value, as argparse refuses it: yargs took --strict=false as off and --printonly=1 as not given.
    [ourBin('virtnbdbackup'), ['-d', 'x', '-l', 'inc', '-o', '/nonexistent', '--strict=false'], /^virtnbdbackup: error: argument --strict: ignored explicit argument 'false'; see virtnbdbackup --help$/],
    [ourBin('virtnbdbackup'), ['-d', 'x', '-k', '--print=1'], /^virtnbdbackup: error: argument --printonly: ignored explicit argument '1'; see virtnbdbackup --help$/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '--raw=yes'], /^virtnbdrestore: error: argument --raw: ignored explicit argument 'yes'; see virtnbdrestore --help$/],
    [ourBin('virtnbdmap'), ['-f', '/nonexistent', '--readonly='], /^virtnbdmap: error: argument --readonly: ignored explicit argument ''; see virtnbdmap --help$/],
  ];
  for (const [command, args, message] of cases) {
    const r = await runCli(command, args);
    assert.equal(r.code, 2, `${command} ${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr.trim(), message);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
  assert.equal(await fs.access('/nonexistent').then(() => true, () => false), false, 'a refused command created its output');
  // A flag given twice takes its last value, as argparse does (it became a list: "a copy,full backup").
  const abbreviated = await runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '--no-sparse', '-l', 'inc', '-o', '/nonexistent', '-p']);
  assert.match(abbreviated.stderr.trim(), /^virtnbdbackup: error: -p estimates the next inc of the set in \/nonexistent/);
  const twice = await runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '-d', 'vnbdtest-no-such-domain', '-l', 'copy', '-l', 'full', '-o', '/nonexistent', '-p']);
  assert.equal(twice.code, 1);
  assert.match(twice.stderr.trim(), /^virtnbdbackup: error: -p estimates the next inc of the set in \/nonexistent, which does not exist: give the set's directory$/);
  // -z 1.5 is no whole number: a wrong flag (exit 2), as argparse's int refuses it.
  const fraction = await runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '-l', 'full', '-o', '/nonexistent', '-z', '1.5']);
  assert.equal(fraction.code, 2, fraction.stderr);
  assert.equal(fraction.stderr.trim(), "virtnbdbackup: error: argument -z/--compress: invalid int value: '1.5'; see virtnbdbackup --help");
  // Levels and -w counts Python's virtnbdbackup takes are taken (-z 0: none, above 16: 16, below 0: 1; -w 0: 1): the
  // run goes on past them (output-forms.test.ts backs up with them).
  for (const flags of [['-z', '0'], ['-z', '-3'], ['-z', '17'], ['-z', '99999999999'], ['-w', '0'], ['-w', '-1']]) {
    const taken = await runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '-l', 'inc', '-o', '/nonexistent', '-p', ...flags]);
    assert.equal(taken.code, 1, taken.stderr);
    assert.match(taken.stderr.trim(), /^virtnbdbackup: error: -p estimates the next inc of the set in \/nonexistent, which does not exist/, flags.join(' '));
  }
  // Numbers out of range: one line each, before anything (-T -5 backed up anyway; -p 70000 was Node's wording).
  const negative = await runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '-l', 'inc', '-o', '/nonexistent', '-T', '-5']);
  assert.equal(negative.code, 1, negative.stderr);
  assert.equal(negative.stderr.trim(), 'virtnbdbackup: error: -T -5: give the number of changed bytes, 0 or more');
  const port = await runCli(ourBin('virtnbdmap'), ['-f', '/nonexistent', '-p', '70000']);
  assert.equal(port.code, 1, port.stderr);
  assert.equal(port.stderr.trim(), 'virtnbdmap: error: -p 70000: give a TCP port from 1 to 65535, or 0 for any free one');
  const remotePort = await runCli(ourBin('virtnbdrestore'), ['-U', 'qemu+ssh://root@vnbdtest-no-such-host/system', '-P', '70000', '-i', '/nonexistent', '-o', '/nonexistent']);
  assert.equal(remotePort.code, 1, remotePort.stderr);
  assert.equal(remotePort.stderr.trim(), 'virtnbdrestore: error: -P 70000: give a TCP port from 1 to 65535');
  const buffer = await runCli(ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', 'verify', '-B', '-5']);
  assert.equal(buffer.code, 2, buffer.stderr);
  assert.equal(buffer.stderr.trim(), 'virtnbdrestore: error: -B -5: give a buffer size in bytes, above 0; see virtnbdrestore --help');
  // -k ends a job: with -s (start one) or -p (estimate) it did only that, the other flag silently dropped.
  for (const other of ['-s', '-p']) {
    const both = await runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '-k', other, '-o', '/nonexistent']);
    assert.equal(both.code, 1, both.stderr);
    assert.equal(both.stderr.trim(), `virtnbdbackup: error: -k ends a running backup job, so it excludes ${other}: give one of them`);
  }
  // A zip into a closed standard output or /dev/null would be lost while the chain counted it saved (it exited 0).
  for (const redirect of ['>&-', '>/dev/null']) {
    const lost = spawnSync('bash', ['-c', `"$0" -d vnbdtest-no-such-domain -l full -o - ${redirect}`, ourBin('virtnbdbackup')], { encoding: 'utf8' });
    assert.equal(lost.status, 1, lost.stderr);
    assert.match(lost.stderr.trim(), /^virtnbdbackup: error: -o - writes a zip archive to standard output, which is closed or \/dev\/null: .*redirect it to a file or a pipe$/);
  }
  assert.equal(await fs.access('/nonexistent').then(() => true, () => false), false, 'a refused command created its output');
});

test('every abbreviation that names one flag of Python\'s command alone (Debian\'s virtnbdbackup 1.9.15) is taken: our own flags make none ambiguous', async () => {
  for (const command of ['virtnbdbackup', 'virtnbdrestore', 'virtnbdmap'] as const) {
    const help = spawnSync(`/usr/bin/${command}`, ['--help'], { encoding: 'utf8' }).stdout;
    const pythons = [...new Set(help.match(/--[a-z][a-z-]*[a-z]/g) ?? [])].map((flag) => flag.slice(2));
    assert.ok(pythons.length > 10 && pythons.includes('help'), help);
    for (const flag of pythons) {
      // Every prefix that names it alone there: -h first, so that a prefix taken shows the help (exit 0), where an
      // ambiguous one is a wrong flag (exit 2).
      for (let length = 1; length < flag.length; length++) {
        const prefix = flag.slice(0, length);
        if (pythons.filter((other) => other.startsWith(prefix)).length !== 1) continue;
        const r = spawnSync(ourBin(command), ['-h', `--${prefix}`], { encoding: 'utf8' });
        assert.equal(r.status, 0, `${command} --${prefix} (--${flag}): ${r.stderr}`);
        break;
      }
    }
  }
  // ... and means that flag: --no is -n (--noprogress), not ambiguous with --nocolor and --no-sparse-detection.
  const abbreviated = await runCli(ourBin('virtnbdbackup'), ['--dom', 'vnbdtest-no-such-domain', '--no', '--lev', 'inc', '--out', '/nonexistent', '--q', '--pr']);
  assert.equal(abbreviated.code, 1, abbreviated.stderr);
  assert.match(abbreviated.stderr.trim(), /^virtnbdbackup: error: -p estimates the next inc of the set in \/nonexistent, which does not exist/);
});

test('unknown domain: one-line error naming it, exit 1', async () => {
  const out = await tempDir('vnbd-err-');
  try {
    const r = await runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '-l', 'full', '-o', path.join(out, 'set'), '-n']);
    assert.equal(r.code, 1);
    const errors = errorLines(r);
    assert.equal(errors.length, 1, r.stderr);
    assert.match(errors[0] as string, /domain 'vnbdtest-no-such-domain' not found/);
    // The set's log says why, as Python's does.
    const logs = (await fs.readdir(path.join(out, 'set'))).filter((f) => f.endsWith('.log'));
    assert.equal(logs.length, 1);
    assert.match(await fs.readFile(path.join(out, 'set', logs[0] as string), 'utf8'), /ERROR domain 'vnbdtest-no-such-domain' not found/);
  } finally {
    await fs.rm(out, { recursive: true, force: true });
  }
});

test('inc or diff without a full backup, and full into a used set, are refused', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] }] });
  const out = await tempDir('vnbd-err-');
  t.after(() => fs.rm(out, { recursive: true, force: true }));
  for (const level of ['inc', 'diff']) {
    const r = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', out, '-n']);
    assert.equal(r.code, 1);
    assert.equal(errorLines(r).length, 1, r.stderr);
    assert.match(r.stderr, /no full backup in .*run with -l full/);
  }
  // Refused into a directory it made: the run leaves none behind.
  const fresh = path.join(out, 'fresh');
  assert.equal((await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', fresh, '-n'])).code, 1);
  await assert.rejects(fs.access(fresh), 'the refused run left the directory it made');
  // A run that fell back to a full and did not finish leaves the set empty but for the chain it moved aside: said.
  const aside = path.join(out, 'chain.1795901892');
  await fs.mkdir(aside);
  const interrupted = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', out, '-n']);
  assert.equal(interrupted.code, 1, interrupted.stderr);
  assert.match(interrupted.stderr.trim(), new RegExp(`run with -l full \\(or -l auto\\) first \\(the previous chain is in ${aside.replace(/\./g, '\\.')}, moved aside by a run that was to start a new one and did not finish\\)$`));
  // A chain of its own prefix: the full that starts anew must keep it (without, it began a chain of the default
  // name, and removed other sets' checkpoints of that name).
  await fs.writeFile(path.join(aside, `${dom.name}.cpt`), JSON.stringify(['bbm.0', 'bbm.1']));
  const prefixed = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', out, '-n']);
  assert.match(prefixed.stderr.trim(), /run with -l full --checkpoint-prefix bbm \(or -l auto\) first \(the previous chain is in /);
  await fs.rm(aside, { recursive: true });
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', out, '-n']);
  const before = await fs.readFile(path.join(out, 'vda.full.data'));
  const again = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', out, '-n']);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /already holds a backup \(vda\.full\.data\)/);
  assert.ok(before.equals(await fs.readFile(path.join(out, 'vda.full.data'))), 'existing backup was touched');
});

test('an output that cannot hold a set: a file, a read-only file system, under a dangling symlink; a missing --scratchdir; every disk left out: one line each, before any job', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] }] });
  const work = await tempDir('vnbd-badout-');
  const readOnly = path.join(work, 'ro');
  await fs.mkdir(readOnly);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'ro,size=1M', 'tmpfs', readOnly]);
  t.after(async () => {
    execFileSync('umount', [readOnly]);
    await fs.rm(work, { recursive: true, force: true });
  });
  await fs.writeFile(path.join(work, 'afile'), 'x');
  // A mount point's link with its disk gone: Node's recursive mkdir turns over for ever there.
  await fs.symlink(path.join(work, 'unmounted', 'nas'), path.join(work, 'dangling'));
  const dangling = /cannot create output directory \S+\/dangling\/\w+: \S+\/dangling is a symbolic link to \S+\/unmounted\/nas, which is not there; mount or create its target, or choose another directory$/;
  const cases: Array<[string, string[], RegExp]> = [
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '-o', path.join(work, 'dangling', 'set')], dangling],
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '-o', path.join(work, 'afile')], /-o \S+\/afile is not a directory: give a directory for the set, or - for a zip on standard output$/],
    // Node's own mkdir says ENOENT here; the line gives the real cause.
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '-o', path.join(readOnly, 'set')], /cannot create output directory \S+\/ro\/set: read-only file system; choose another output directory \(EROFS\)$/],
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '-x', 'vda', '-o', path.join(work, 'x')], new RegExp(`domain '${dom.name}' has no disk to back up but those left out with -x vda$`)],
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '-i', 'vdz', '-o', path.join(work, 'i')], new RegExp(`domain '${dom.name}' has no disk to back up matching -i vdz$`)],
    // libvirt's words name a scratch file it could not create, not the option.
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '--scratchdir', path.join(work, 'nodir'), '-o', path.join(work, 'noscratch')], /the scratch directory \S+\/nodir does not exist or is no directory: create it, or give --scratchdir an existing directory/],
    // Where the chain's state goes at the end of a run: refused before the job, not after all the data.
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '-C', readOnly, '-o', path.join(work, 'roC')], /the checkpoint directory \(-C\) \S+\/ro cannot be written: give one you can write to$/],
    ['virtnbdbackup', ['-d', dom.name, '-l', 'full', '-C', path.join(readOnly, 'cpts'), '-o', path.join(work, 'roC2')], /cannot create the checkpoint directory \(-C\) \S+\/ro\/cpts: read-only file system; .*\(EROFS\)$/],
  ];
  for (const [command, args, message] of cases) {
    const r = await runCli(ourBin(command as 'virtnbdbackup'), ['-n', ...args]);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(errorLines(r).length, 1, r.stderr);
    assert.match(r.stderr.trim(), message);
  }
  // A zip's chain state goes into the working directory.
  const zipFromRo = spawnSync(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', '-'], { cwd: readOnly, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  assert.equal(zipFromRo.status, 1, zipFromRo.stderr);
  assert.match(zipFromRo.stderr, /^virtnbdbackup: error: the working directory \S+\/ro keeps the chain's state of a zip on standard output \(-o -\), but cannot be written: run from a directory you can write to$/m);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '');
  const set = path.join(work, 'set');
  // Values written onto short flags, as argparse takes them (-lfull read as -l -f -u -l -l); a disk name no disk has
  // beside one that is, which went unnoticed: a warning naming it.
  const attached = await runOk(ourBin('virtnbdbackup'), ['-n', `-d${dom.name}`, '-lfull', '-ivda,vdz', `-o${set}`]);
  assert.match(attached.stderr, new RegExp(`warning: -i vdz: domain '${dom.name}' has no disk vdz \\(its disks: vda\\)`));
  assert.ok(await fs.access(path.join(set, 'vda.full.data')).then(() => true, () => false), 'the full backup of vda');
  assert.match((await runOk(ourBin('virtnbdrestore'), [`-i${set}`, '-overify', '-dvda'])).stdout, /^OK vda\.full\.data$/m);
  const restore = await runCli(ourBin('virtnbdrestore'), ['-n', '-i', set, '-o', path.join(readOnly, 'out')]);
  assert.equal(restore.code, 1, restore.stderr);
  assert.match(restore.stderr.trim(), /^virtnbdrestore: error: cannot create output directory \S+\/ro\/out: read-only file system; choose another output directory \(EROFS\)$/);
  const underLink = await runCli(ourBin('virtnbdrestore'), ['-n', '-i', set, '-o', path.join(work, 'dangling', 'out')]);
  assert.equal(underLink.code, 1, underLink.stderr);
  assert.match(underLink.stderr.trim(), new RegExp(`^virtnbdrestore: error: ${dangling.source.slice(0, -1)}$`));
});

test('a full refused for its --scratchdir or -f (no such directory, a file in the path) keeps the old chain\'s checkpoints: the earlier set\'s next inc goes on', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] }] });
  const work = await tempDir('vnbd-keepchain-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', set]);
  await fs.writeFile(path.join(work, 'afile'), 'x');
  const cases: Array<[string[], RegExp]> = [
    [['--scratchdir', path.join(work, 'nodir')], /the scratch directory \S+\/nodir does not exist or is no directory/],
    [['--scratchdir', path.join(work, 'afile')], /the scratch directory \S+\/afile does not exist or is no directory/],
    // The job's start failed on it ("Failed to bind socket"), after the full had removed the old checkpoints.
    [['-f', path.join(work, 'nodir', 'sock')], /the directory of the NBD socket \S+\/nodir\/sock \(-f\), \S+\/nodir, does not exist: create it, or give a socket path in an existing directory$/],
    [['-f', path.join(work, 'afile', 'sock')], /cannot use \S+\/afile\/sock for the NBD socket: a part of the path is a file/],
  ];
  for (const [index, [flags, message]] of cases.entries()) {
    const r = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, `new${index}`), ...flags]);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(errorLines(r).length, 1, r.stderr);
    assert.match(r.stderr.trim(), message);
    assert.doesNotMatch(r.stderr, /removed old checkpoint/);
    assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), 'virtnbdbackup.0', flags.join(' '));
  }
  await dom.write('vda', 0x22, '2M', '1M');
  const inc = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.doesNotMatch(inc.stderr, /warning/);
  assert.ok((await fs.readdir(set)).includes('vda.inc.virtnbdbackup.1.data'));
});

test('disk full in mid-backup: clear error, job ended, checkpoint removed, .partial kept, inc refuses', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 128, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 24 }] }] });
  const mount = await withTmpfs(t, 'vnbd-full-', 'size=4M');
  const socket = `/var/tmp/vnbdtest-${process.pid}-enospc.sock`;
  const r = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', mount, '-n', '-f', socket]);
  assert.equal(r.code, 1);
  assert.equal(errorLines(r).length, 1, r.stderr);
  assert.match(r.stderr, /vda\.full\.data\.partial: no space left on device/);
  await assertCleanDomain(dom, socket);
  const files = await fs.readdir(mount);
  assert.ok(files.includes('vda.full.data.partial'), `evidence missing: ${files.join(' ')}`);
  assert.ok(!files.includes('vda.full.data') && !files.some((f) => f.endsWith('.cpt')), files.join(' '));
  const inc = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', mount, '-n']);
  assert.equal(inc.code, 1);
  assert.match(inc.stderr, /no full backup/);
});

test('a qcow2 v2 disk (compat 0.10), which cannot hold checkpoint bitmaps: one line naming the disk and the ways out, where QEMU named a block node; nothing left; a copy works', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 32 }, { target: 'vdb', sizeMiB: 16, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 1 }] }], start: false });
  execFileSync('qemu-img', ['amend', '-f', 'qcow2', '-o', 'compat=0.10', dom.diskPath('vdb')]);
  await dom.start();
  const work = await tempDir('v2-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const socket = `/var/tmp/vnbdtest-${process.pid}-v2.sock`;
  const r = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', path.join(work, 'set'), '-n', '-f', socket]);
  assert.equal(r.code, 1);
  assert.equal(errorLines(r).length, 1, r.stderr);
  const image = dom.diskPath('vdb').replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  assert.match(r.stderr, new RegExp(`Cannot store dirty bitmaps in qcow2 v2 files; disk vdb \\(${image}\\) is a qcow2 v2 image \\(compat 0\\.10\\), which cannot hold checkpoint bitmaps: upgrade it with 'qemu-img amend -o compat=1\\.1 IMAGE' while the domain is shut off, leave it out with -x vdb, or back up with -l copy$`, 'm'));
  await assertCleanDomain(dom, socket);
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-o', path.join(work, 'copy'), '-n']);
});

test('an inc that fails on its second disk sets the first disk\'s finished file aside as .partial; once both are moved away, the next inc continues the chain', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] },
    { target: 'vdb', sizeMiB: 64, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 1 }] },
  ] });
  const mount = await withTmpfs(t, 'vnbd-secondfull-', 'size=16M');
  const set = path.join(mount, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  await dom.write('vda', 0x33, '8M', '4M');
  await dom.write('vdb', 0x44, '8M', '24M');
  // One disk at a time: vda's inc is written whole, then vdb's fills the file system.
  const failed = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-w', '1', '-o', set, '-n']);
  assert.equal(failed.code, 1, failed.stderr);
  assert.match(failed.stderr, /vdb\.inc\.virtnbdbackup\.1\.data\.partial: no space left on device/);
  // Finished, it kept its .partial name: a run's files take their names together, once all are done.
  assert.match(failed.stderr, /vda\.inc\.virtnbdbackup\.1\.data stays vda\.inc\.virtnbdbackup\.1\.data\.partial: the run failed, so it belongs to no chain/);
  const files = await fs.readdir(set);
  assert.ok(files.includes('vda.inc.virtnbdbackup.1.data.partial') && !files.includes('vda.inc.virtnbdbackup.1.data'), files.join(' '));
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), 'virtnbdbackup.0');
  const refused = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /holds what a failed run left: vda\.inc\.virtnbdbackup\.1\.data\.blake3\.json\.partial, vda\.inc\.virtnbdbackup\.1\.data\.chksum\.partial, vda\.inc\.virtnbdbackup\.1\.data\.partial, vdb\.inc\.virtnbdbackup\.1\.data\.partial; the chain there is incomplete/);
  // As the line says: the .partial files moved away (here: removed), and room made, the chain goes on from the full.
  for (const f of files.filter((name) => name.endsWith('.partial'))) await fs.rm(path.join(set, f));
  execFileSync('mount', ['-o', 'remount,size=96M', mount]);
  const references = await Promise.all(['vda', 'vdb'].map((d) => dom.snapshot(d, path.join(mount, `${d}.raw`))));
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  const out = path.join(mount, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  for (const [i, d] of ['vda', 'vdb'].entries()) {
    const compared = await TestDomain.compare(path.join(out, `${d}.qcow2`), references[i] as string);
    assert.ok(compared.identical, `${d}: ${compared.output}`);
  }
});

/**
 * A full backup of a fresh domain (`dataMiB` of data on a disk 256 MiB larger) into a temp dir, returned once its
 * data is flowing (the .partial exists), for a test to interrupt in mid-copy.
 */
async function backupInFlight(t: TestContext, name: string, dataMiB = 768, extra: string[] = []): Promise<{ dom: TestDomain; out: string; socket: string; run: CliRun }> {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: dataMiB + 256, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: dataMiB }] }] });
  const out = await tempDir(`vnbd-${name}-`);
  t.after(() => fs.rm(out, { recursive: true, force: true }));
  const socket = `/var/tmp/vnbdtest-${process.pid}-${name}.sock`;
  const run = startCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', out, '-n', '-f', socket, ...extra]);
  await whenExists(path.join(out, 'vda.full.data.partial'));
  return { dom, out, socket, run };
}

test('SIGTERM in mid-backup: job ended, checkpoint removed, socket gone, exit non-zero', async (t) => {
  const { dom, out, socket, run } = await backupInFlight(t, 'term');
  run.child.kill('SIGTERM');
  const r = await run.done;
  assert.notEqual(r.code, 0, `backup finished before the signal: ${r.stderr}`);
  assert.match(r.stderr, /^virtnbdbackup: error: interrupted by SIGTERM; cleaned up$/m);
  await assertCleanDomain(dom, socket);
  assert.ok((await fs.readdir(out)).includes('vda.full.data.partial'));
});

test('SIGTERM while the reader of a zip on standard output stalls: the run ends at once, its job ended and checkpoint removed', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 512, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 256 }] }] });
  const work = await tempDir('vnbd-stalled-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const socket = `/var/tmp/vnbdtest-${process.pid}-stalled.sock`;
  const run = startHeldOnOutput(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', '-', '-n', '-f', socket], work);
  for (let i = 0; i < 2000 && !/writing vda\.full\.data/.test(run.stderr()); i++) await new Promise((resolve) => setTimeout(resolve, 5));
  await new Promise((resolve) => setTimeout(resolve, 500)); // the pipe fills, the copy waits on it
  run.child.kill('SIGTERM');
  // Never read: the run must not wait for its reader (it did, job and all, until the reader read on).
  const r = await Promise.race([run.done, new Promise<undefined>((resolve) => setTimeout(resolve, 20_000))]);
  run.release();
  assert.ok(r, 'the run did not end while its reader stalled');
  assert.notEqual(r.code, 0, r.stderr);
  assert.match(r.stderr, /^virtnbdbackup: error: interrupted by SIGTERM; cleaned up$/m);
  await assertCleanDomain(dom, socket);
});

test('a restore, verify, dump or map of a set a backup is writing into says so, and does not say to move its .partial away', async (t) => {
  const { out, run } = await backupInFlight(t, 'writing', 256);
  // Held still while the others look, so that it is surely in mid-write.
  run.child.kill('SIGSTOP');
  try {
    const restore = await runCli(ourBin('virtnbdrestore'), ['-i', out, '-o', path.join(out, '..', `${path.basename(out)}-restored`), '-n']);
    assert.equal(restore.code, 1, restore.stderr);
    assert.match(restore.stderr, new RegExp(`^virtnbdrestore: error: a backup \\(pid ${run.child.pid}\\) is writing into ${out} right now \\(${out}/vda\\.full\\.data\\.partial\\); restore once it has ended$`, 'm'));
    const verify = await runCli(ourBin('virtnbdrestore'), ['-i', out, '-o', 'verify', '-n']);
    assert.equal(verify.code, 1, verify.stderr);
    assert.match(verify.stdout + verify.stderr, new RegExp(`vda\\.full\\.data\\.partial: .*being written by a running backup \\(pid ${run.child.pid}\\): verify once it has ended`));
    // Dump said "not a backup set", map "unexpected end of file at byte 0".
    const dump = await runCli(ourBin('virtnbdrestore'), ['-i', out, '-o', 'dump']);
    assert.equal(dump.code, 1, dump.stderr);
    assert.match(dump.stderr.trim(), new RegExp(`holds no finished data file yet, only vda\\.full\\.data\\.partial \\(being written by a running backup \\(pid ${run.child.pid}\\): dump once it has ended\\)$`));
    const map = await runCli(ourBin('virtnbdmap'), ['-f', path.join(out, 'vda.full.data.partial'), '-d', '', '-p', '0']);
    assert.equal(map.code, 1, map.stderr);
    assert.match(map.stderr.trim(), /vda\.full\.data\.partial is an unfinished data file \(being written by a backup, or left from a failed one\): map the finished files of the set$/);
  } finally {
    run.child.kill('SIGCONT');
  }
  const r = await run.done;
  assert.equal(r.code, 0, r.stderr);
});

test('the set directory removed in mid-backup (a clean-up script): one line asking whether it was, job ended, checkpoint removed', async (t) => {
  const { dom, out, socket, run } = await backupInFlight(t, 'removed', 1024);
  await fs.rm(out, { recursive: true, force: true });
  const r = await run.done;
  assert.equal(r.code, 1, r.stderr);
  assert.equal(errorLines(r).length, 1, r.stderr);
  assert.match(r.stderr, /^virtnbdbackup: error: backup of disk vda failed writing \S+\/vda\.full\.data\.partial: it or its directory is gone \(ENOENT\): was the set directory removed during the backup\?$/m);
  await assertCleanDomain(dom, socket);
});

test('SIGHUP (a terminal hanging up) in mid-backup stops it as SIGTERM does; under nohup a backup and a restore go on to the end, the reader of their stderr gone too', async (t) => {
  const { dom, out, socket, run } = await backupInFlight(t, 'hup', 1024);
  run.child.kill('SIGHUP');
  const r = await run.done;
  assert.equal(r.code, 130, r.stderr);
  assert.match(r.stderr, /^virtnbdbackup: error: interrupted by SIGHUP; cleaned up$/m);
  await assertCleanDomain(dom, socket);

  // Under nohup, the hangup sent to the job's whole process group as a shell sends it (helpers such as qemu-nbd
  // included), and stderr's reader gone with the terminal: both commands finish, with exit 0.
  const hangUp = async (job: CliRun, partial: string, grown: number): Promise<void> => {
    for (let i = 0; i < 4000 && (await fs.stat(partial).then((st) => st.size, () => 0)) <= grown; i++) await new Promise((resolve) => setTimeout(resolve, 5));
    assert.ok(await fs.access(partial).then(() => true, () => false), `${partial} was done or never begun before the hangup`);
    process.kill(-(job.child.pid ?? 0), 'SIGHUP');
    job.child.stderr?.destroy();
  };
  const set = path.join(out, 'nohup');
  const backup = startCli('nohup', [ourBin('virtnbdbackup'), '-d', dom.name, '-l', 'full', '-o', set, '-n', '-v'], { detached: true });
  await hangUp(backup, path.join(set, 'vda.full.data.partial'), 0);
  assert.equal((await backup.done).code, 0);
  const log = (await fs.readdir(set)).find((f) => f.endsWith('.log')) ?? '';
  assert.match(await fs.readFile(path.join(set, log), 'utf8'), /finished full backup, checkpoint virtnbdbackup\.0/);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);

  const restored = path.join(out, 'restored');
  const restore = startCli('nohup', [ourBin('virtnbdrestore'), '-i', set, '-o', restored, '-n'], { detached: true });
  const image = path.join(restored, path.basename(dom.diskPath('vda')));
  await hangUp(restore, `${image}.partial`, 16 * 1024 * 1024);
  assert.equal((await restore.done).code, 0);
  assert.equal((await TestDomain.compare(dom.diskPath('vda'), image)).identical, true);
});

test('an inc killed in mid-copy (SIGKILL): its guard ends the job; with its .partial moved aside, the next inc continues the chain; the checkpoint it left is removed, the changes since kept', async (t) => {
  const { dom, work, set } = await fullSet(t, 'killed', 1024, 64);
  await dom.write('vda', 0x22, '64M', '768M');
  const before = await dom.snapshot('vda');
  const inc = startCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  const partial = path.join(set, 'vda.inc.virtnbdbackup.1.data.partial');
  for (let i = 0; i < 4000 && !(await fs.access(partial).then(() => true, () => false)); i++) await new Promise((resolve) => setTimeout(resolve, 5));
  inc.child.kill('SIGKILL');
  assert.equal((await inc.done).signal, 'SIGKILL');
  assert.match(virsh('checkpoint-list', dom.name, '--name'), /virtnbdbackup\.1/, 'the killed run created no checkpoint');
  // The run's guard ends its job: no -k needed, the socket gone too.
  assert.ok(await jobEndsSoon(dom), 'the killed run\'s job still runs');
  assert.deepEqual((await fs.readdir('/var/tmp')).filter((f) => f === `virtnbdbackup.${inc.child.pid}`), []);
  // Written while the left checkpoint tracks the changes: they must reach the next inc.
  await dom.write('vda', 0x33, '900M', '4M');
  const after = await dom.snapshot('vda');

  const refused = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  assert.equal(refused.code, 1);
  assert.match(errorLines(refused).join('\n'), /holds what a failed run left: .*; the chain there is incomplete: move (it|them) out of the set to continue the chain from its last complete backup/);
  await fs.rename(partial, path.join(work, 'evidence.partial'));
  const next = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  assert.match(next.stderr, /removed checkpoint virtnbdbackup\.1: a run that did not finish created it \(its parent virtnbdbackup\.0\)/);
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(set, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  await assertRestoresTo(work, set, after);
  assert.notEqual((await TestDomain.compare(before, after)).identical, true);
  // A run that ended its job itself leaves no guard behind.
  assert.equal(spawnSync('pgrep', ['-f', `domjobabort '${dom.name}'`]).status, 1, 'a guard outlived its run');
});

test('a scratch directory filling up with guest writes in mid-backup: the run stops before the guest\'s writes would fail, with one line saying so', async (t) => {
  const scratch = await withTmpfs(t, 'vnbd-scratch-', 'size=256M,mode=1777');
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 768, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 640 }] }] });
  const out = await tempDir('vnbd-scratchout-');
  t.after(() => fs.rm(out, { recursive: true, force: true }));
  const socket = `/var/tmp/vnbdtest-${process.pid}-scratch.sock`;
  // A zip on standard output, unread for now: its copy waits (so that it cannot end first) while the job and the
  // scratch watch go on. The run must end the job at once, not once its reader reads on.
  const run = startHeldOnOutput(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', '-', '-n', '-f', socket, '--scratchdir', scratch], out);
  let ended = false;
  void run.done.then(() => { ended = true; });
  for (let i = 0; i < 2000 && !ended && !/writing vda\.full\.data/.test(run.stderr()); i++) await new Promise((resolve) => setTimeout(resolve, 5));
  // The guest rewrites its disk while the job runs; a write QEMU failed (scratch full) throws here.
  try {
    for (let offsetMiB = 0; !ended && offsetMiB < 640; offsetMiB += 8) await dom.write('vda', 0x22, `${offsetMiB}M`, '8M');
  } finally {
    run.release();
  }
  const r = await run.done;
  assert.equal(r.code, 1, r.stderr);
  assert.deepEqual(errorLines(r).length, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`^virtnbdbackup: error: the scratch directory ${scratch} is nearly full \\(\\d+ MiB of \\d+ MiB left\\): .+ give --scratchdir a directory with more free space`, 'm'));
  await assertCleanDomain(dom, socket);
  await dom.write('vda', 0x33, '640M', '64M');

  // A backup set on the scratch directory's file system: its growth is named as a cause too.
  const quiet = new Logger({ quiet: true });
  const space = await openScratchSpace(LOCAL_HOST, scratch, dom.name, quiet);
  assert.ok(space);
  const stopped = new Promise<Error>((resolve) => {
    const watch = watchScratch(space, scratch, dom.name, scratch, quiet, resolve);
    t.after(() => watch.stop());
  });
  await new Promise((resolve) => setTimeout(resolve, 50));
  await fs.writeFile(path.join(scratch, 'vda.full.data'), Buffer.alloc(230 * 1024 * 1024));
  // The watch's timer does not hold the event loop (a run's copy does): this one holds it until the watch looks.
  const holding = setTimeout(() => undefined, 10_000);
  const message = (await stopped.finally(() => clearTimeout(holding))).message;
  assert.match(message, /: it keeps the old data of guest writes during the backup, and the backup set \S+ grows on the same file system, .+; give --scratchdir a directory on another file system, or free space$/);

  // With less than 64 MiB free from the start, guest writes would fill it between two looks: no job is started.
  const refused = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', path.join(out, 'again'), '-n', '-f', socket, '--scratchdir', scratch]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(refused.stderr, new RegExp(`^virtnbdbackup: error: the scratch directory ${scratch} has only \\d+ MiB free, less than the 64 MiB a backup job of '${dom.name}' starts with: .+; give --scratchdir a directory with more free space, or free space there$`, 'm'));
  await assertCleanDomain(dom, socket);
  assert.deepEqual((await fs.readdir(path.join(out, 'again')).catch(() => [])).filter((f) => f.includes('.data')), []);
});

test('the domain\'s QEMU hung (SIGSTOP) in mid-backup: after --nbd-timeout one line naming the export and the timeout; once QEMU answers again, job ended, checkpoint removed, socket gone', async (t) => {
  const { dom, socket, run } = await backupInFlight(t, 'hung', 256, ['--nbd-timeout', '2']);
  let said = '';
  run.child.stderr?.on('data', (d: Buffer) => { said += d.toString(); });
  const qemu = Number((await fs.readFile(`/run/libvirt/qemu/${dom.name}.pid`, 'utf8')).trim());
  process.kill(qemu, 'SIGSTOP');
  t.after(() => { try { process.kill(qemu, 'SIGCONT'); } catch { /* gone with its domain */ } });
  // Ending the job needs QEMU's monitor: the run waits for it after the stall, as it would for a host that recovers.
  // The stall is seen within 2.5 s (2 s, checked every 0.5 s), well before QEMU goes on, and said at once.
  await new Promise((resolve) => setTimeout(resolve, 4500));
  assert.match(said, /answered nothing for 2 s .*; ending the backup job, which waits until libvirt and the domain's QEMU answer/, 'the stall is told while the run waits for QEMU');
  process.kill(qemu, 'SIGCONT');
  const r = await run.done;
  assert.equal(r.code, 1, r.stderr);
  const last = r.stderr.trim().split('\n').at(-1) ?? '';
  assert.equal(last, `virtnbdbackup: error: NBD export ${socket} (export vda) answered nothing for 2 s (a hung host, network or storage?); its connections were cut: check the host, or raise --nbd-timeout (0 waits forever)`);
  await assertCleanDomain(dom, socket);
});

test('the domain\'s QEMU hung in mid-backup, then Ctrl-C twice: the second ends the run at once (130) while QEMU still hangs; the guard ends the job once QEMU answers', async (t) => {
  const { dom, socket, run } = await backupInFlight(t, 'hung2', 256, ['--nbd-timeout', '2']);
  const qemu = Number((await fs.readFile(`/run/libvirt/qemu/${dom.name}.pid`, 'utf8')).trim());
  process.kill(qemu, 'SIGSTOP');
  t.after(() => { try { process.kill(qemu, 'SIGCONT'); } catch { /* gone with its domain */ } });
  run.child.kill('SIGINT');
  // The first waits to end the job, which waits for QEMU's monitor; the second does not wait for anything.
  await new Promise((resolve) => setTimeout(resolve, 3000));
  run.child.kill('SIGINT');
  const r = await Promise.race([run.done, new Promise<undefined>((resolve) => setTimeout(resolve, 15_000))]);
  process.kill(qemu, 'SIGCONT');
  assert.ok(r, 'the run went on waiting for the hung QEMU after a second SIGINT');
  assert.equal(r.code, 130, r.stderr);
  assert.match(r.stderr, /error: stopped by a second SIGINT before its clean-up ended/);
  for (let waited = 0; waited < 20_000 && /Backup/.test(virsh('domjobinfo', dom.name)); waited += 250) await new Promise((resolve) => setTimeout(resolve, 250));
  assert.doesNotMatch(virsh('domjobinfo', dom.name), /Backup/);
});

test('the domain stopped in mid-backup: one line saying so, checkpoint removed, socket gone, .partial kept', async (t) => {
  // More data than the other tests: the copy must still run when the domain is gone, a second or so after the start.
  const { dom, out, socket, run } = await backupInFlight(t, 'stopped', 1536);
  virsh('destroy', dom.name);
  const r = await run.done;
  assert.equal(r.code, 1, r.stderr);
  const last = r.stderr.trim().split('\n').at(-1) ?? '';
  assert.match(last, new RegExp(`^virtnbdbackup: error: domain '${dom.name}' stopped during the backup \\(backup of disk vda failed reading its NBD export: nbd_\\w+: .+\\); move this run's \\.partial files out of ${out.replace(/[.]/g, '\\.')} and back it up again once it runs \\(an inc goes on from the set's last complete backup; shut off, a full is a copy and an inc a diff\\)$`));
  // No job can outlive the domain's QEMU; the checkpoint and the socket are what could be left.
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '');
  assert.equal(await fs.access(socket).then(() => true, () => false), false, `socket ${socket} left behind`);
  assert.deepEqual((await fs.readdir(out)).filter((f) => f.includes('.data')), ['vda.full.data.partial']);
});

test('the job ended by another program in mid-backup (-k): one line saying so, where libnbd\'s words said a read failed; checkpoint removed, socket gone, .partial kept', async (t) => {
  const { dom, out, socket, run } = await backupInFlight(t, 'killonly', 1536);
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-k']);
  const r = await run.done;
  assert.equal(r.code, 1, r.stderr);
  assert.equal(errorLines(r).length, 1, r.stderr);
  assert.match(r.stderr.trim().split('\n').at(-1) ?? '', new RegExp(`^virtnbdbackup: error: the backup job of '${dom.name}' was ended by another program in mid-backup \\(virtnbdbackup -k, or virsh domjobabort\\); this run's checkpoint is removed: back it up again once its \\.partial files are out of ${out.replace(/[.]/g, '\\.')}$`));
  assert.doesNotMatch(r.stderr, /warning/);
  await assertCleanDomain(dom, socket);
  assert.deepEqual((await fs.readdir(out)).filter((f) => f.includes('.data')), ['vda.full.data.partial']);
});

test('libvirtd killed in mid-backup: one line naming it and what to do, and so does -k while it is down; after its restart -k ends the job and a new full works', async (t) => {
  const { dom, out, socket, run } = await backupInFlight(t, 'daemon');
  // -k while libvirtd is still down: one line saying so, nothing else tried.
  const [r, early] = await withLibvirtdKilled(async () => [await run.done, await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-k'])]);
  assert.equal(early?.code, 1, early?.stderr);
  assert.deepEqual(errorLines(early as CliResult), [early?.stderr.trim()]);
  assert.match(early?.stderr ?? '', /^virtnbdbackup: error: cannot connect to libvirt at qemu:\/\/\/system: .+; is libvirtd running\?\n$/);
  assert.ok(r);
  assert.equal(r.code, 1, r.stderr);
  const last = r.stderr.trim().split('\n').at(-1) ?? '';
  assert.match(last, new RegExp(`^virtnbdbackup: error: lost the connection to libvirtd at qemu:///system \\(.+\\): once libvirtd runs and answers \\('virsh -c qemu:///system version'\\), end the backup job it may have left with 'virtnbdbackup -d ${dom.name} -k' and run a full backup into a new directory$`));
  // QEMU outlives libvirtd: the job it runs is found again after the restart, and -k ends it.
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-k']);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(await fs.access(socket).then(() => true, () => false), false, `socket ${socket} left behind`);
  const before = new Map(await Promise.all((await fs.readdir(out)).map(async (f) => [f, (await fs.stat(path.join(out, f))).mtimeMs] as const)));
  const fresh = path.join(out, 'fresh');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', fresh, '-n']);
  // The new chain replaced the failed run's checkpoint; the failed run's files are as it left them.
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), 'virtnbdbackup.0');
  for (const [f, mtime] of before) if (f !== 'fresh') assert.equal((await fs.stat(path.join(out, f))).mtimeMs, mtime, `${f} was touched`);
});

test('libvirtd hung (SIGSTOP) in mid-backup: the run fails after --nbd-timeout with one line, where it waited for ever, and so does -k; once libvirtd answers again, the job is ended', async (t) => {
  const { dom, socket, run } = await backupInFlight(t, 'hung', 768, ['--nbd-timeout', '3']);
  const daemon = Number(execFileSync('pgrep', ['-x', 'libvirtd']).toString().trim().split('\n')[0]);
  process.kill(daemon, 'SIGSTOP');
  const started = Date.now();
  const withinAMinute = <T>(work: Promise<T>): Promise<T | undefined> => Promise.race([work, new Promise<undefined>((resolve) => setTimeout(resolve, 60_000))]);
  let r: CliResult | undefined;
  let runMs = 0;
  let k: CliResult | undefined;
  let kSeconds = 0;
  try {
    r = await withinAMinute(run.done);
    runMs = Date.now() - started;
    // libvirt's own open waits for ever on a daemon that accepted the connection and never answers.
    const kStarted = Date.now();
    k = await withinAMinute(runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-k', '--nbd-timeout', '2']));
    kSeconds = (Date.now() - kStarted) / 1000;
  } finally {
    process.kill(daemon, 'SIGCONT');
  }
  // libvirt's keepalives (a quarter of --nbd-timeout apart) close the silent connection; every call on it then fails.
  assert.ok(r, 'the run waited on the hung libvirtd for a minute');
  assert.ok(runMs < 30_000, `the run took ${runMs} ms to give up`);
  assert.equal(r.code, 1, r.stderr);
  assert.deepEqual(r.stderr.split('\n').filter((l) => l.startsWith('virtnbdbackup: error:')), [r.stderr.trim().split('\n').at(-1)]);
  assert.match(r.stderr, /^warning: ending the backup job of .*: internal error: connection closed due to keepalive timeout$/m);
  assert.match(r.stderr.trim().split('\n').at(-1) ?? '', new RegExp(`^virtnbdbackup: error: lost the connection to libvirtd at qemu:///system \\(.+\\): once libvirtd runs and answers \\('virsh -c qemu:///system version'\\), end the backup job it may have left with 'virtnbdbackup -d ${dom.name} -k'`));
  assert.ok(k, '-k waited on the hung libvirtd for a minute');
  assert.ok(kSeconds < 20, `-k took ${kSeconds} s to give up`);
  assert.equal(k.code, 1, k.stderr);
  assert.equal(k.stderr, `virtnbdbackup: error: libvirtd at qemu:///system answered nothing for 2 s (hung, or its host unreachable?): check it with 'virsh -c qemu:///system version', or raise --nbd-timeout (0 waits forever)\n`);
  // Answering again, libvirtd reads the job's end the run sent before it gave up, or else -k ends it, as the line says.
  if (!(await jobEndsSoon(dom))) await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-k']);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/, 'the job outlived the run and -k');
  assert.equal(await fs.access(socket).then(() => true, () => false), false, `socket ${socket} left behind`);
});

/** A domain with one disk of `sizeMiB` holding `dataMiB` of data, and its full backup in `<work>/set`. */
async function fullSet(t: TestContext, name: string, sizeMiB: number, dataMiB: number): Promise<{ dom: TestDomain; work: string; set: string }> {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: dataMiB }] }] });
  const work = await tempDir(`vnbd-${name}-`);
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  return { dom, work, set };
}

/** The pid of the restore's qemu-nbd on `socket`, once data is going into `partial` (past 16 MiB): before, it is a failed start. */
async function qemuNbdWriting(partial: string, socket: string): Promise<number> {
  for (let i = 0; i < 4000; i++) {
    const size = await fs.stat(partial).then((st) => st.size, () => 0);
    const pid = size > 16 * 1024 * 1024 ? await qemuNbdPid((arg) => arg === socket) : undefined;
    if (pid) return Number(pid);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  throw new Error(`no qemu-nbd was seen writing ${partial}`);
}

test('qemu-nbd killed in mid-restore: one line naming it, the partial image removed; SIGTERM in mid-restore: exit 130, nothing left', async (t) => {
  const { dom, work, set } = await fullSet(t, 'qnbd', 1024, 768);
  const out = path.join(work, 'out');
  const socket = `/var/tmp/vnbdtest-${process.pid}-qnbd.sock`;
  const run = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-f', socket]);
  const partial = path.join(out, `${path.basename(dom.diskPath('vda'))}.partial`);
  process.kill(await qemuNbdWriting(partial, socket), 'SIGKILL');
  const r = await run.done;
  assert.equal(r.code, 1, r.stderr);
  const last = r.stderr.trim().split('\n').at(-1) ?? '';
  assert.match(last, /^virtnbdrestore: error: restore of disk vda failed: qemu-nbd, which writes the image, exited with SIGKILL \((cannot connect to NBD export .+: )?nbd_\w+: .+\); nothing of it was kept$/);
  // The output directory the run made is removed with the image.
  assert.equal(await fs.access(out).then(() => true, () => false), false, 'output directory left behind');
  assert.equal(await fs.access(socket).then(() => true, () => false), false, `socket ${socket} left behind`);

  // SIGTERM in mid-restore: exit 130 with one line, and the partial image, qemu-nbd and its socket are gone.
  const termOut = path.join(work, 'term');
  const termSocket = `/var/tmp/vnbdtest-${process.pid}-term.sock`;
  const term = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', termOut, '-n', '-f', termSocket]);
  const termPartial = path.join(termOut, path.basename(partial));
  for (let i = 0; i < 4000 && (await fs.stat(termPartial).then((st) => st.size, () => 0)) <= 16 * 1024 * 1024; i++) await new Promise((resolve) => setTimeout(resolve, 5));
  term.child.kill('SIGTERM');
  const rt = await term.done;
  assert.equal(rt.code, 130, rt.stderr);
  assert.match(rt.stderr.trim().split('\n').at(-1) ?? '', /^virtnbdrestore: error: interrupted by SIGTERM; cleaned up$/);
  assert.equal(await fs.access(termOut).then(() => true, () => false), false, 'output directory left behind');
  assert.equal(await qemuNbdPid((arg) => arg === termSocket), undefined, 'qemu-nbd left running');
  assert.equal(await fs.access(termSocket).then(() => true, () => false), false, `socket ${termSocket} left behind`);

  // qemu-nbd hung (SIGSTOP) in mid-restore: after --nbd-timeout one line naming it, and nothing of the image kept.
  const hungOut = path.join(work, 'hung');
  const hungSocket = `/var/tmp/vnbdtest-${process.pid}-hung.sock`;
  const hung = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', hungOut, '-n', '-f', hungSocket, '--nbd-timeout', '1']);
  const hungPartial = path.join(hungOut, path.basename(partial));
  const hungPid = await qemuNbdWriting(hungPartial, hungSocket);
  process.kill(hungPid, 'SIGSTOP');
  t.after(() => { try { process.kill(hungPid, 'SIGCONT'); } catch { /* gone */ } });
  const rh = await hung.done;
  assert.equal(rh.code, 1, rh.stderr);
  assert.match(rh.stderr.trim().split('\n').at(-1) ?? '', new RegExp(`^virtnbdrestore: error: restore of disk vda failed: NBD export ${hungSocket} \\(export vda\\) answered nothing for 1 s .+; nothing of it was kept$`));
  assert.equal(await fs.access(hungOut).then(() => true, () => false), false, 'output directory left behind');
  assert.equal(await qemuNbdPid((arg) => arg === hungSocket), undefined, 'qemu-nbd left running');
});

/** Starts our restore of `set` with -D as `name` into `out`; resolves once the image holds more than 16 MiB. */
async function restoreInFlight(t: TestContext, dom: TestDomain, set: string, out: string, name: string): Promise<CliRun> {
  t.after(() => { try { virsh('undefine', name); } catch { /* not defined */ } });
  const run = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-D', '-N', name]);
  let ended = false;
  void run.done.finally(() => { ended = true; });
  const partial = path.join(out, `${path.basename(dom.diskPath('vda'))}.partial`);
  for (let i = 0; i < 4000; i++) {
    if ((await fs.stat(partial).then((st) => st.size, () => 0)) > 16 * 1024 * 1024) break;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  assert.equal(ended, false, 'the restore ended before libvirtd could be stopped under it');
  return run;
}

test('libvirtd gone during a restore with -D: restarted, the define still works; still down, one line says the images are in place and how to define; without -D no libvirtd is needed', async (t) => {
  const { dom, work, set } = await fullSet(t, 'define', 1024, 768);
  const suffix = path.basename(work).replace(/[^a-z0-9]/gi, '');

  // Restarted while the images are written: the define connects at the end and succeeds.
  const back = `vnbdtest-back-${suffix}`;
  const first = await restoreInFlight(t, dom, set, path.join(work, 'back'), back);
  await withLibvirtdKilled(async () => undefined);
  const r1 = await first.done;
  assert.equal(r1.code, 0, r1.stderr);
  assert.match(virsh('domstate', back), /shut off/);

  // Down until the restore ends: one line, exit 1, the images and the XML kept; its advice then works.
  const down = `vnbdtest-down-${suffix}`;
  const out = path.join(work, 'down');
  const second = await restoreInFlight(t, dom, set, out, down);
  const r2 = await withLibvirtdKilled(() => second.done);
  assert.equal(r2.code, 1, r2.stderr);
  assert.equal(errorLines(r2).length, 1, r2.stderr);
  const last = r2.stderr.trim().split('\n').at(-1) ?? '';
  const xml = /run 'virsh define (\S+)'$/.exec(last)?.[1];
  assert.match(last, new RegExp(`^virtnbdrestore: error: cannot connect to libvirt at qemu:///system to define domain '${down}' \\(.+\\); the restored images and ${out}/\\S+\\.xml are in place: once libvirtd runs, run 'virsh define ${out}/\\S+\\.xml'$`));
  await fs.access(path.join(out, path.basename(dom.diskPath('vda'))));
  virsh('define', xml ?? '');
  assert.match(virsh('domstate', down), /shut off/);

  // Without -D a restore needs no libvirtd at all, as on a backup server without KVM: images, -c's XML, verify.
  const plain = path.join(work, 'plain');
  const [restored, verified] = await withLibvirtdKilled(async () => [
    await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', plain, '-n', '-c']),
    await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']),
  ]);
  assert.equal(restored?.code, 0, restored?.stderr);
  assert.equal(verified?.code, 0, verified?.stderr);
  assert.ok((await fs.readdir(plain)).some((f) => f.endsWith('.xml')), 'no adjusted domain XML');
  assert.ok((await TestDomain.compare(path.join(plain, path.basename(dom.diskPath('vda'))), dom.diskPath('vda'))).identical);
});

test('disk full in mid-restore: one line naming the image and what to do, nothing of it kept', async (t) => {
  const { set } = await fullSet(t, 'restore-enospc', 64, 24);
  const mount = await withTmpfs(t, 'vnbd-restore-full-', 'size=8M');
  const out = path.join(mount, 'out');
  const r = await runCli(ourBin('virtnbdrestore'), ['-n', '-i', set, '-o', out]);
  assert.equal(r.code, 1, r.stderr);
  assert.equal(errorLines(r).length, 1, r.stderr);
  assert.match(r.stderr.trim().split('\n').at(-1) ?? '', new RegExp(`^virtnbdrestore: error: restore of disk vda failed writing ${out}/vda\\.qcow2: no space left on device; free space or choose another output directory \\(ENOSPC\\); nothing of it was kept$`));
  assert.equal(await fs.access(out).then(() => true, () => false), false, 'output directory left behind');
});

test('restore refuses bad input with one line: not a set, unknown --until, existing image, a running domain\'s disk', async (t) => {
  const { dom, work, set } = await fullSet(t, 'rerr', 64, 4);

  const notSet = await runCli(ourBin('virtnbdrestore'), ['-i', work, '-o', path.join(work, 'r1'), '-n']);
  assert.equal(notSet.code, 1);
  assert.match(notSet.stderr, /is not a backup set/);

  const logFile = path.join(work, 'restore.log');
  const until = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'r2'), '-n', '--until', 'virtnbdbackup.7', '-L', logFile]);
  assert.equal(until.code, 1);
  assert.match(until.stderr, /checkpoint virtnbdbackup\.7 is not in the chain of disk vda .*it has: virtnbdbackup\.0/);
  const logged = (await fs.readFile(logFile, 'utf8')).trim().split('\n');
  assert.match(logged[logged.length - 1], /^\S+Z ERROR checkpoint virtnbdbackup\.7 is not in the chain of disk vda/, 'the -L log ends with the error');

  const out = path.join(work, 'r3');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  const image = path.join(out, path.basename(dom.diskPath('vda')));
  const before = await fs.stat(image);
  const again = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /already exists; restore into another directory/);
  assert.equal((await fs.stat(image)).mtimeMs, before.mtimeMs);

  // A running domain's raw disk, smaller than the backup's disk: neither grown nor written.
  const victim = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16, format: 'raw', fill: [{ pattern: 0x77, offsetMiB: 0, lengthMiB: 4 }] }] });
  const inUse = victim.diskPath('vda');
  const content = await fs.readFile(inUse);
  const busy = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', inUse, '-n']);
  assert.equal(busy.code, 1);
  // Its QEMU is named, with the domain.
  assert.match(busy.stderr, new RegExp(`^virtnbdrestore: error: ${inUse} is in use: qemu-system-x86_64 \\(pid \\d+, domain '${victim.name}'\\) holds it open for writing, so it was left untouched; shut down the domain '${victim.name}', or restore to another file or into a directory$`, 'm'));
  assert.ok((await fs.readFile(inUse)).equals(content), 'the running domain\'s disk changed');
  for (const r of [notSet, until, again, busy]) assert.equal(errorLines(r).length, 1, r.stderr);
});
