// The job-control and tuning switches on real libvirt/QEMU: -s/-k (a job left running, refused by other runs,
// ended), -p/-T (size estimate of the next inc), -q/--no-sparse-detection/--pause (backups that still restore
// exactly), -w (disks at once), -L (syslog, a failed run's error line too, and -e's exit 2 when it cannot be
// reached), the run locks (same domain or same set refused, two domains in parallel fine), how runs leave libvirtd
// (job torn down, connection closed), the
// guest agent freeze (-F) where no agent answers, --user/--password for a libvirtd that asks for a login, also
// over qemu+tcp:// for a whole full and inc, and a user other than root in libvirt's groups.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { withDomain, withTempDir, TestDomain } from '../support/testbed.js';
import { ourBin, pythonBin, repoRoot, runCli, runOk, startCli } from '../support/cli.js';
import { assertRestoresTo, virsh } from '../support/points.js';
import { withGroupLibvirtd, withSaslLibvirtd } from '../support/libvirtd.js';
import { withSystemUser } from '../support/users.js';
import { freePort, sshConfiguredFor, withPrivateSshd } from '../support/sshd.js';

const bin = ourBin('virtnbdbackup');
const DISK = { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] };
const exists = (file: string): Promise<boolean> => fs.access(file).then(() => true, () => false);

test('-s leaves a job running that other runs refuse; -k ends it', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'startonly-');
  const socket = path.join(work, 'job.sock');
  const started = await runOk(bin, ['-n', '-d', dom.name, '-s', '-f', socket, '-o', path.join(work, 'set')]);
  assert.equal(started.stdout.trim(), socket);
  assert.equal(await exists(path.join(work, 'set')), false, '-s made the output directory, which it does not write');
  assert.match(virsh('domjobinfo', dom.name), /Operation:\s+Backup/);
  assert.equal(execFileSync('nbdinfo', ['--size', `nbd+unix:///vda?socket=${socket}`], { encoding: 'utf8' }).trim(), String(64 * 1024 * 1024));

  const refused = await runCli(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, 'other')]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /already has a backup job; .*-k/);

  await runOk(bin, ['-d', dom.name, '-k', '-f', socket]);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(await exists(socket), false, 'socket left behind');
  const again = await runCli(bin, ['-d', dom.name, '-k']);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /has no active job to end/);
  // A relative -f is this directory's, not libvirt's ("XML document failed to validate against schema").
  const relative = spawnSync(bin, ['-n', '-d', dom.name, '-s', '-f', 'rel.sock', '-o', 'set'], { cwd: work, encoding: 'utf8' });
  assert.equal(relative.status, 0, relative.stderr);
  assert.equal(relative.stdout.trim(), path.join(work, 'rel.sock'));
  await runOk(bin, ['-d', dom.name, '-k', '-f', path.join(work, 'rel.sock')]);
  assert.equal(await exists(path.join(work, 'rel.sock')), false, 'socket left behind');
  // So is a relative --scratchdir (libvirt refused it the same way; found by a black-box round).
  await fs.mkdir(path.join(work, 'scratch'), { mode: 0o777 });
  await fs.chmod(path.join(work, 'scratch'), 0o777);
  const relativeScratch = spawnSync(bin, ['-n', '-d', dom.name, '-s', '--scratchdir', 'scratch', '-o', 'set'], { cwd: work, encoding: 'utf8' });
  assert.equal(relativeScratch.status, 0, relativeScratch.stderr);
  assert.match(virsh('backup-dumpxml', dom.name), new RegExp(`<scratch file='${path.join(work, 'scratch')}/backup\\.`));
  await runOk(bin, ['-d', dom.name, '-k']);
  // QEMU creates the socket as its own user: a directory only root may write to gave libvirt's "Failed to bind socket".
  const locked = path.join(work, 'locked');
  await fs.mkdir(locked, { mode: 0o755 });
  const denied = await runCli(bin, ['-n', '-d', dom.name, '-s', '-f', path.join(locked, 'job.sock'), '-o', path.join(work, 'set')]);
  assert.equal(denied.code, 1, denied.stderr);
  // Refused before the job starts (a full would have removed the old chain's checkpoints first), naming QEMU's user.
  assert.match(denied.stderr.trim(), /^virtnbdbackup: error: QEMU runs as \S+ \([^)]+\), which may not create files in the directory of the NBD socket \(-f\) \S+\/locked \(owner root, group root, mode 0755\); give -f a path in a directory it may write to, such as \/var\/tmp \(the default\), or let that user write there$/);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
});

test('runs end the job and the libvirt connection as libvirtd expects: its scratch files left to it, no dropped connection', async (t) => {
  const daemonLog = '/var/log/libvirt/libvirtd.log';
  if (!(await exists(daemonLog))) {
    t.skip(`libvirtd does not log to ${daemonLog} here`);
    return;
  }
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'teardown-');
  const logStart = (await fs.stat(daemonLog)).size;
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'full', '--scratchdir', work, '-o', path.join(work, 'set')]);
  const socket = path.join(work, 'job.sock');
  await runOk(bin, ['-n', '-d', dom.name, '-s', '--scratchdir', work, '-f', socket, '-o', path.join(work, 'set')]);
  await runOk(bin, ['-d', dom.name, '-k', '-f', socket]);
  const handle = await fs.open(daemonLog);
  const { size } = await handle.stat();
  const added = Buffer.alloc(size - logStart);
  await handle.read(added, 0, added.length, logStart);
  await handle.close();
  const lines = added.toString('utf8').split('\n');
  assert.deepEqual(lines.filter((l) => l.includes('failed to remove scratch file') && l.includes(work)), [], 'scratch file removed before libvirt ended the job');
  assert.deepEqual(lines.filter((l) => l.includes('End of file while reading data')), [], 'a run exited with its libvirt connection open');
  assert.deepEqual((await fs.readdir(work)).sort(), ['set'], 'scratch files or socket left behind');
});

test('-p prints the estimated size of the next inc; -T skips the backup below it', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const set = path.join(await withTempDir(t, 'estimate-'), 'set');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', set]);
  await dom.write('vda', 0x33, '8M', '2M');
  const printed = await runOk(bin, ['-n', '-d', dom.name, '-p', '-o', set]);
  assert.equal(printed.stdout, 'estimated size of the next inc/diff: 2097152 bytes\n');

  const skipped = await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-T', '3000000', '-o', set]);
  assert.match(skipped.stderr, /2097152 bytes changed since virtnbdbackup\.0, below the threshold of 3000000 bytes/);
  assert.ok(!(await fs.readdir(set)).some((f) => f.startsWith('vda.inc.')), 'backed up below the threshold');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-T', '1000000', '-o', set]);
  assert.ok((await fs.readdir(set)).includes('vda.inc.virtnbdbackup.1.data'));

  // The checkpoint's bitmap gone from the image: libvirt gives that disk no size, which summed as nothing changed,
  // and -T skipped every backup from then on. -p is refused, naming it; -T backs up (a full, as an inc would).
  await dom.stop();
  execFileSync('qemu-img', ['bitmap', '--remove', dom.diskPath('vda'), 'virtnbdbackup.1']);
  await dom.start();
  await dom.write('vda', 0x44, '8M', '1M');
  const unsized = await runCli(bin, ['-n', '-d', dom.name, '-p', '-o', set]);
  assert.equal(unsized.code, 1, unsized.stderr);
  assert.match(unsized.stderr, /error: the bitmap of checkpoint virtnbdbackup\.1 on disk vda is missing or broken in the image \(libvirt sizes no changes since it\): the next inc makes a full backup instead\n$/);
  const backedUp = await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-T', '1000000000', '-o', set]);
  assert.match(backedUp.stderr, /-T: no size estimate \(the bitmap of checkpoint virtnbdbackup\.1 on disk vda is missing or broken/);
  assert.match(backedUp.stderr, /finished full backup/);
});

test('-q, --no-sparse-detection and --pause back up what restores exactly, with Python too', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'extents-');
  const set = path.join(work, 'set');
  const full = await runOk(bin, ['-n', '-d', dom.name, '-l', 'full', '-q', '--pause', '-o', set]);
  assert.match(full.stderr, /suspended domain .* while the backup job starts\n(.*\n)*resumed domain/);
  assert.match(virsh('domstate', dom.name), /running/);

  // Killed outright (kill -9) while the guest is suspended, as an inc and as -s (whose job was to outlive the run,
  // once begun): its guard resumes the guest, ends the job and removes the socket.
  for (const extra of [[], ['-s']]) {
    const killed = spawn(bin, ['-d', dom.name, '-l', 'inc', '--pause', ...extra, '-o', set], { stdio: ['ignore', 'ignore', 'pipe'] });
    let said = '';
    for await (const chunk of killed.stderr) if (/suspended domain/.test(said += String(chunk))) break;
    killed.kill('SIGKILL');
    await once(killed, 'close').catch(() => undefined);
    const socket = `/var/tmp/virtnbdbackup.${killed.pid}`;
    let state = '';
    for (let waited = 0; waited < 20_000; waited += 250) {
      state = virsh('domstate', dom.name).trim();
      if (state === 'running' && !/Backup/.test(virsh('domjobinfo', dom.name)) && !(await exists(socket))) break;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
    assert.equal(state, 'running', `the guard resumes the guest a killed run (${['inc', ...extra].join(' ')}) had suspended`);
    assert.doesNotMatch(virsh('domjobinfo', dom.name), /Backup/);
    assert.equal(await exists(socket), false, 'the killed run\'s socket is removed');
    // Its checkpoint is unlisted: the next inc removes it with a warning and goes on from the last listed one.
    await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  }

  await dom.write('vda', 0x77, '8M', '1M');
  await dom.writeZeroes('vda', '2M', '1M');
  const reference = await dom.snapshot('vda');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'diff', '-q', '-o', set]);
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '--no-sparse-detection', '-o', set]);
  const dumped = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump'])).stdout) as Array<{ file: string; dataSize: number }>;
  const dataSize = (pattern: RegExp): number | undefined => dumped.filter((m) => pattern.test(m.file)).at(-1)?.dataSize;
  assert.equal(dataSize(/^vda\.diff\./), 1024 * 1024, 'the zeroed range should be a zero frame');
  assert.equal(dataSize(/^vda\.inc\./), 2 * 1024 * 1024, '--no-sparse-detection should save the zeroed range as data');

  await assertRestoresTo(work, set, reference);
  // Python's restore skips zero frames, but the inc after the diff holds the zeroed range as data.
  const python = path.join(work, 'python');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', python, '-n']);
  const result = await TestDomain.compare(path.join(python, 'vda.qcow2'), reference);
  assert.ok(result.identical, `Python's restore: ${result.output}`);
});

test('a --scratchdir QEMU may not write is one line saying so, before the job makes a checkpoint; the next full works', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'scratchperm-');
  const closed = path.join(work, 'closed');
  await fs.mkdir(closed, { mode: 0o700 });
  const refused = await runCli(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, 'set'), '--scratchdir', closed]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(refused.stderr, new RegExp(`error: QEMU runs as \\S+ \\([^)]+\\), which may not create files in the scratch directory \\(--scratchdir\\) ${closed.replace(/[.]/g, '\\.')} \\(owner root, group root, mode 0700\\); give --scratchdir a directory it may write to, such as /var/tmp \\(the default\\), or let that user write there\n$`));
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, 'set2')]);
});

/** A unix datagram socket that collects what syslog clients send (Node has no unix datagrams: python3). */
async function syslogListener(socket: string): Promise<{ stop(): Promise<string> }> {
  const script = 'import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint("ready",flush=True)\n'
    + 'while True: print(s.recv(65536).decode(),flush=True)\n';
  const child = spawn('python3', ['-c', script, socket], { stdio: ['ignore', 'pipe', 'inherit'] });
  let output = '';
  child.stdout.on('data', (d: Buffer) => { output += d.toString(); });
  while (!output.includes('ready')) {
    if (child.exitCode !== null) throw new Error('syslog listener did not start');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return {
    stop: async () => {
      const closed = once(child, 'close');
      child.kill();
      await closed;
      return output;
    },
  };
}

test('-L sends the log to syslog; an unreachable syslog is a warning, and -e makes it exit 2', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'syslog-');
  const listener = await syslogListener(path.join(work, 'log.sock'));
  t.after(() => { delete process.env.VIRTNBD_SYSLOG_SOCKET; });
  process.env.VIRTNBD_SYSLOG_SOCKET = path.join(work, 'log.sock');
  await runOk(bin, ['-n', '-L', '-d', dom.name, '-o', path.join(work, 'set1')]);
  // The set's log begins with the version and the flags, as Python's does (it named neither).
  const setLog = (await fs.readdir(path.join(work, 'set1'))).find((f) => f.endsWith('.log')) ?? '';
  assert.match((await fs.readFile(path.join(work, 'set1', setLog), 'utf8')).split('\n')[0] ?? '',
    new RegExp(`^\\S+ DEBUG virtnbdbackup \\S+, arguments: -n -L -d ${dom.name} -o ${path.join(work, 'set1')}$`));
  // A failed run's error line goes there too (it went to the console and the set's log alone).
  const failed = await runCli(bin, ['-n', '-L', '-d', dom.name, '-i', 'vdz', '-o', path.join(work, 'set3')]);
  assert.equal(failed.code, 1, failed.stderr);
  const lines = await listener.stop();
  assert.match(lines, /^<14>.* virtnbdbackup\[\d+\]: copy backup of .* into /m);
  assert.match(lines, /^<14>.* virtnbdbackup\[\d+\]: finished copy backup/m);
  assert.match(lines, /^<11>.* virtnbdbackup\[\d+\]: domain '.*' has no disk to back up matching -i vdz/m);

  process.env.VIRTNBD_SYSLOG_SOCKET = path.join(work, 'nothing-listens-here');
  const strict = await runCli(bin, ['-n', '-L', '-e', '-d', dom.name, '-o', path.join(work, 'set2')]);
  assert.equal(strict.code, 2, strict.stderr);
  assert.match(strict.stderr, /warning: syslog: .*nothing-listens-here/);
  assert.match(strict.stderr, /^exit code 2: 1 warning with -e\/--strict\n$/m, 'the exit code was 2 without a word');
  assert.ok(await exists(path.join(work, 'set2', 'vda.copy.data')));
});

test('-w: five disks are copied at most four at a time by default, all five with -w 5', async (t) => {
  const disks = ['vda', 'vdb', 'vdc', 'vdd', 'vde'].map((target, i) => ({ target, sizeMiB: 16, fill: [{ pattern: 0x11 + i, offsetMiB: 0, lengthMiB: 4 }] }));
  const dom = await withDomain(t, { disks });
  const work = await withTempDir(t, 'workers-');
  for (const [flags, atOnce] of [[[], 4], [['-w', '5'], 5]] as const) {
    const set = path.join(work, `w${atOnce}`);
    const r = await runOk(ourBin('virtnbdbackup'), ['-n', '-v', '-d', dom.name, '-l', 'copy', ...flags, '-o', set]);
    assert.match(r.stderr, new RegExp(`copying 5 disk\\(s\\), ${atOnce} at a time`));
    assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.copy.data')).sort(), disks.map((d) => `${d.target}.copy.data`));
  }
});

test('locks: a second run on the same domain or into the same set refuses; two domains back up in parallel', async (t) => {
  const [first, second] = await Promise.all([
    withDomain(t, { disks: [{ target: 'vda', sizeMiB: 128, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 48 }] }] }),
    withDomain(t, { disks: [DISK] }),
  ]);
  const work = await withTempDir(t, 'locks-');
  const [setA, setB] = [path.join(work, 'a'), path.join(work, 'b')];
  const running = startCli(bin, ['-n', '-d', first.name, '-l', 'full', '-o', setA]);
  const outputLock = path.join(setA, '.virtnbdbackup.lock');
  while (!(await exists(outputLock))) {
    assert.equal(running.child.exitCode, null, 'the first run ended before taking its locks');
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  running.child.kill('SIGSTOP');
  try {
    const sameDomain = await runCli(bin, ['-n', '-d', first.name, '-l', 'full', '-o', path.join(work, 'c')]);
    assert.equal(sameDomain.code, 1);
    assert.match(sameDomain.stderr, new RegExp(`domain '${first.name}' is in use by another backup \\(pid ${running.child.pid}\\)`));
    const sameSet = await runCli(bin, ['-n', '-d', second.name, '-l', 'inc', '-o', setA]);
    assert.equal(sameSet.code, 1);
    assert.match(sameSet.stderr, /output directory .* is in use by another backup/);
  } finally {
    running.child.kill('SIGCONT');
  }
  const result = await running.done;
  assert.equal(result.code, 0, result.stderr);
  assert.equal(await exists(outputLock), false, 'lock left behind');

  await first.write('vda', 0x22, '1M', '1M');
  await Promise.all([
    runOk(bin, ['-n', '-d', first.name, '-l', 'inc', '-o', setA]),
    runOk(bin, ['-n', '-d', second.name, '-l', 'full', '-o', setB]),
  ]);
  assert.ok((await fs.readdir(setA)).includes('vda.inc.virtnbdbackup.1.data'));
  assert.ok((await fs.readdir(setB)).includes('vda.full.data'));
});

test('guest agent: a configured agent that does not answer is a warning (-e: exit 2) and the backup is kept; no agent channel (and a cdrom drive left out) is no warning, unless -F asks to freeze', async (t) => {
  const withAgent = await withDomain(t, { disks: [DISK], guestAgent: true });
  const work = await withTempDir(t, 'freeze-');
  // No guest OS runs the agent here: libvirt reports it not connected, as for a guest whose agent is not installed.
  const warned = await runCli(bin, ['-n', '-e', '-d', withAgent.name, '-l', 'full', '-F', '/,/var', '-o', path.join(work, 'agent')]);
  assert.equal(warned.code, 2, warned.stderr);
  assert.match(warned.stderr, new RegExp(`could not freeze the filesystems of domain '${withAgent.name}' through its guest agent \\(.*guest agent.*\\); the backup holds the disks as a power cut would leave them \\(crash-consistent\\)`));
  assert.doesNotMatch(warned.stderr, /thaw/);
  assert.ok(await exists(path.join(work, 'agent', 'vda.full.data')));
  assert.match(virsh('domstate', withAgent.name), /running/);

  // An empty cdrom drive, as most domains have, is left out with a line that is no warning (as virtnbdbackup's).
  const plain = await withDomain(t, { disks: [DISK], cdrom: true });
  const quiet = await runOk(bin, ['-n', '-e', '-d', plain.name, '-l', 'full', '-o', path.join(work, 'plain')]);
  assert.doesNotMatch(quiet.stderr, /warn|could not freeze|froze |not frozen/i);
  assert.match(quiet.stderr, /^skipping disk hdc: cdrom device$/m);
  const asked = await runCli(bin, ['-n', '-e', '-d', plain.name, '-l', 'copy', '-F', '/', '-o', path.join(work, 'asked')]);
  assert.equal(asked.code, 2, asked.stderr);
  assert.match(asked.stderr, new RegExp(`domain '${plain.name}' has no QEMU guest agent channel: filesystems not frozen`));
});

test('--user/--password log in to a libvirtd that asks for a login (SASL): backup, -s/-k and restore -D (or an auth.conf), a run\'s guard, full and inc over qemu+tcp://; a wrong, missing or half login is one line', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'login-');
  const reference = await dom.snapshot('vda', path.join(work, 'vda.raw'));
  const restored = `${dom.name}-restored`;
  // Not there when the test failed before its restore: a hook that threw would keep the later ones (the sshd's) from running.
  t.after(() => spawnSync('virsh', ['-c', 'qemu:///system', 'undefine', restored], { stdio: 'ignore' }));
  const sshPath = await sshConfiguredFor(t, await withPrivateSshd(t));
  await withSaslLibvirtd(t, async ({ uri, tcpUri, user, password }) => {
    const refusals: Array<[string[], RegExp]> = [
      [['--user', user, '--password', 'wrong'], new RegExp(`^virtnbdbackup: error: cannot connect to libvirt at .*: authentication failed.*; check the login --user ${user} and its --password$`)],
      [[], /^virtnbdbackup: error: cannot connect to libvirt at .*: authentication failed.*; libvirtd asks for a login: give --user and --password \(or a libvirt auth\.conf\)$/],
      [['--user', user], /^virtnbdbackup: error: --user without --password: a libvirt login takes both$/],
    ];
    for (const [login, message] of refusals) {
      const r = await runCli(bin, ['-n', '-U', uri, ...login, '-d', dom.name, '-l', 'full', '-o', path.join(work, 'refused')]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr.trim(), message);
    }
    const login = ['-U', uri, '--user', user, '--password', password];
    await runOk(bin, ['-n', ...login, '-d', dom.name, '-l', 'full', '-o', path.join(work, 'set')]);
    const socket = path.join(work, 'job.sock');
    await runOk(bin, ['-n', ...login, '-d', dom.name, '-s', '-f', socket, '-o', path.join(work, 'started')]);
    // Without the flags, libvirt's auth.conf gives the login.
    const authFile = path.join(work, 'auth.conf');
    await fs.writeFile(authFile, `[credentials-backup]\nauthname=${user}\npassword=${password}\n[auth-libvirt-default]\ncredentials=backup\n`);
    process.env.LIBVIRT_AUTH_FILE = authFile;
    try {
      await runOk(bin, ['-U', uri, '-d', dom.name, '-k', '-f', socket]);
    } finally {
      delete process.env.LIBVIRT_AUTH_FILE;
    }
    assert.equal(await exists(socket), false, 'socket left behind');
    // A run's guard logs in as the run did: a job begun, then its run gone (a program that told a guard with the login
    // the job's mark and exited), and the guard's virsh finds the job and ends it on this daemon, which refuses virsh
    // without a login.
    await runOk(bin, ['-n', ...login, '-d', dom.name, '-s', '-f', socket, '-o', path.join(work, 'guarded')]);
    const jobXml = execFileSync('virsh', ['-c', uri, 'backup-dumpxml', dom.name], { encoding: 'utf8', env: { ...process.env, LIBVIRT_AUTH_FILE: authFile } });
    const marker = /\/(backup\.[0-9a-f]+\.)[^'/]*'/.exec(jobXml)?.[1];
    assert.ok(marker, `no scratch file of ours in ${jobXml}`);
    const guardModule = path.join(repoRoot, 'dist', 'src', 'backup', 'jobGuard.js');
    const dies = `import { guardJob } from ${JSON.stringify(guardModule)};
      guardJob(${JSON.stringify(uri)}, ${JSON.stringify(dom.name)}, ${JSON.stringify(socket)}, ${JSON.stringify({ user, password })}).beginning(${JSON.stringify(marker)});
      process.exit(0);`;
    const run = spawn(process.execPath, ['--input-type=module', '-e', dies], { stdio: 'inherit' });
    assert.equal((await once(run, 'exit'))[0], 0);
    const jobType = (): string => execFileSync('virsh', ['-c', uri, 'domjobinfo', dom.name], { encoding: 'utf8', env: { ...process.env, LIBVIRT_AUTH_FILE: authFile } });
    for (let i = 0; i < 100 && !/Job type:\s+None/.test(jobType()); i++) await new Promise((resolve) => setTimeout(resolve, 100));
    assert.match(jobType(), /Job type:\s+None/, 'the guard did not end the job');
    assert.equal(await exists(socket), false, 'the guard left the socket');
    // Its auth.conf, written in memory (no TMPDIR here), lost its name as the guard started: nothing of it is left.
    const leftAuth = (await fs.readdir('/dev/shm')).filter((name) => name.startsWith('virtnbd-guard-'));
    assert.deepEqual(leftAuth, [], 'the guard left its auth.conf');
    // Over qemu+tcp:// the same login gets in (the domain has no job left to end).
    const overTcp = await runCli(bin, ['-U', tcpUri, '--user', user, '--password', password, '-d', dom.name, '-k']);
    assert.equal(overTcp.code, 1, overTcp.stderr);
    assert.match(overTcp.stderr.trim(), new RegExp(`^virtnbdbackup: error: domain '${dom.name}' has no active job to end$`));
    // A whole full and inc over qemu+tcp://, as from a backup server: NBD over TCP, qemu-img info through ssh (the
    // private sshd, reached as a ~/.ssh/config would give it).
    const tcpSet = path.join(work, 'tcp-set');
    const tcp = ['-n', '-U', tcpUri, '--user', user, '--password', password, '-P', String(await freePort()), '-d', dom.name, '-o', tcpSet];
    const pathBefore = process.env.PATH;
    process.env.PATH = `${sshPath}:${pathBefore ?? ''}`;
    try {
      const full = await runOk(bin, [...tcp, '-l', 'full', '-v']);
      assert.match(full.stderr, /<server transport='tcp' name='127\.0\.0\.1' port='\d+'\/>/);
      assert.doesNotMatch(full.stderr, /could not save image info/);
      await runOk(bin, [...tcp, '-l', 'inc']);
    } finally {
      process.env.PATH = pathBefore;
    }
    const info = JSON.parse(await fs.readFile(path.join(tcpSet, 'vda.virtnbdbackup.1.qcow.json'), 'utf8')) as { format: string };
    assert.equal(info.format, 'qcow2');
    await runOk(ourBin('virtnbdrestore'), ['-n', ...login, '-D', '-N', restored, '-i', path.join(work, 'set'), '-o', path.join(work, 'restored')]);
  });
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.match(virsh('dominfo', restored), /State:\s+shut off/);
  const compared = await TestDomain.compare(path.join(work, 'restored', 'vda.qcow2'), reference);
  assert.ok(compared.identical, compared.output);
  await assertRestoresTo(work, path.join(work, 'tcp-set'), reference);
});

test('not root: a member of groups libvirt and libvirt-qemu backs up (full, inc) and restores; without libvirt-qemu, one line and no job or checkpoint left', async (t) => {
  const work = await withTempDir(t, 'nonroot-');
  await fs.chmod(work, 0o755);
  const home = path.join(work, 'home');
  await fs.mkdir(home);
  const user = withSystemUser(t, home, ['libvirt', 'libvirt-qemu']);
  await fs.chown(home, Number(execFileSync('id', ['-u', user], { encoding: 'utf8' })), Number(execFileSync('id', ['-g', user], { encoding: 'utf8' })));
  // As the user with these supplementary groups, its environment reset as a login would (HOME, PATH, USER).
  const asUser = (command: string, args: string[], groups = ['libvirt', 'libvirt-qemu']) =>
    runCli('setpriv', ['--reuid', user, '--regid', user, '--groups', groups.join(','), '--reset-env', '--', command, ...args]);
  const readable = await asUser('test', ['-r', ourBin('virtnbdbackup'), '-a', '-r', path.join(repoRoot, 'build', 'Release')]);
  if (readable.code !== 0) {
    t.skip(`the clone at ${repoRoot} is not readable by other users`);
    return;
  }
  await withGroupLibvirtd(t, 'libvirt', async () => {
    const dom = await withDomain(t, { disks: [DISK] });
    const set = path.join(home, 'set');
    const refused = await asUser(bin, ['-d', dom.name, '-l', 'full', '-o', path.join(home, 'refused')], ['libvirt']);
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(refused.stderr.trim().split('\n').at(-1) ?? '', new RegExp(`^virtnbdbackup: error: cannot connect to NBD export .*: permission denied \\(EACCES\\) to ${user}: the socket is libvirt-qemu:libvirt-qemu's \\(mode 07\\d\\d\\); run as root, or add ${user} to group libvirt-qemu$`));
    assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
    assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '', 'the refused run left its checkpoint');

    await ourRunAs(asUser, ['-d', dom.name, '-l', 'full', '-o', set]);
    await dom.write('vda', 0x5a, '8M', '4M');
    await ourRunAs(asUser, ['-d', dom.name, '-l', 'inc', '-o', set]);
    const reference = await dom.snapshot('vda', path.join(work, 'vda.raw'));
    const restored = path.join(home, 'restored');
    const restore = await asUser(ourBin('virtnbdrestore'), ['-i', set, '-o', restored]);
    assert.equal(restore.code, 0, restore.stderr);
    const compared = await TestDomain.compare(path.join(restored, 'vda.qcow2'), reference);
    assert.ok(compared.identical, compared.output);
    const owner = (await fs.stat(path.join(set, 'vda.inc.virtnbdbackup.1.data'))).uid;
    assert.equal(owner, (await fs.stat(home)).uid, 'the set is not the user\'s own');
    assert.deepEqual((await fs.readdir('/run/lock')).filter((name) => name.includes(encodeURIComponent(dom.name))), [], 'a lock left behind');
  });
});

test('not root, and not let in by this host\'s libvirtd (Debian\'s polkit without the system\'s D-Bus, or its socket\'s permissions): one line saying so and what to do', async (t) => {
  const work = await withTempDir(t, 'notletin-');
  await fs.chmod(work, 0o755);
  const user = withSystemUser(t, work, []);
  const asUser = (command: string, args: string[]) => runCli('setpriv', ['--reuid', user, '--regid', user, '--clear-groups', '--reset-env', '--', command, ...args]);
  const readable = await asUser('test', ['-r', ourBin('virtnbdbackup'), '-a', '-r', path.join(repoRoot, 'build', 'Release')]);
  if (readable.code !== 0) {
    t.skip(`the clone at ${repoRoot} is not readable by other users`);
    return;
  }
  const refused = await asUser(bin, ['-d', 'vnbdtest-none', '-k']);
  if (refused.code === 1 && /not found at/.test(refused.stderr)) {
    t.skip('this libvirtd lets any user in');
    return;
  }
  assert.equal(refused.code, 1, refused.stderr);
  // It asked whether libvirtd was running.
  assert.match(refused.stderr.trim(), new RegExp(`^virtnbdbackup: error: cannot connect to libvirt at qemu:///system: .*; libvirtd does not let user ${user} in: run as root, or let the user in \\(libvirtd\\.conf: .*\\)$`));
});

/** Runs our virtnbdbackup through `asUser` and asserts it succeeded without a warning. */
async function ourRunAs(asUser: (command: string, args: string[]) => Promise<{ code: number | null; stderr: string }>, args: string[]): Promise<void> {
  const result = await asUser(bin, args);
  assert.equal(result.code, 0, result.stderr);
  assert.doesNotMatch(result.stderr, /warn/i);
}
