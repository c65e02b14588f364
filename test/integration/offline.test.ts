// Backups of shut-off domains on real libvirt/QEMU: qemu-nbd exports of the images (full becomes copy, inc saves
// the changes since the last checkpoint as a diff), -S/--start-domain (started paused, stopped again), a bitmap
// removed from the image while the domain was off (refused offline, a full fallback with -S), a domain with its
// memory saved (managedsave), which -S does not start, and the domain's boot files and autostart flag; optional disks
// (startupPolicy='optional') whose image is missing are left out with a warning, as libvirt starts the domain without
// them; an image another process holds open is refused naming it. Every point is restored and compared bit for bit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { TestDomain, run, withDomain, withTempDir, type DiskSpec } from '../support/testbed.js';
import { errorLines, ourBin, pythonBin, qemuNbdPid, qemuNbdRuns, runCli, runOk, startCli } from '../support/cli.js';
import { assertRestoresTo as assertRestores, defineWithBootFiles, virsh } from '../support/points.js';
import { logFileName } from '../../src/set/backupSet.js';

const backup = (...args: string[]): ReturnType<typeof runOk> => runOk(ourBin('virtnbdbackup'), ['-n', ...args]);
const DISK = { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }, { pattern: 'random', offsetMiB: 8, lengthMiB: 24 }] } satisfies DiskSpec;

/** Guest-like write into the image of a shut-off domain (persistent bitmaps record it). */
async function writeOffline(dom: TestDomain, pattern: string, offset: string, length: string): Promise<void> {
  await run('qemu-io', ['-f', 'qcow2', '-c', `write -P ${pattern} ${offset} ${length}`, dom.diskPath('vda')]);
}

test('shut-off domain: full becomes copy, inc saves the changes as a diff, every point restores exactly', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'offline-');
  const set = path.join(work, 'set');
  const socket = path.join(work, 'nbd.sock');
  await backup('-d', dom.name, '-l', 'full', '-o', set);
  await dom.write('vda', 0x33, '1M', '1M');
  const p1 = await dom.snapshot('vda');
  await backup('-d', dom.name, '-l', 'inc', '-o', set);

  await dom.stop();
  await writeOffline(dom, '0x55', '10M', '2M');
  const p2 = await dom.snapshot('vda');
  const inc = await backup('-d', dom.name, '-l', 'inc', '-o', set, '-f', socket);
  assert.match(inc.stderr, /shut off: .*saves the changes since virtnbdbackup\.1 as a differential backup/);
  assert.ok((await fs.readdir(set)).some((f) => /^vda\.diff\.\d+\.data$/.test(f)), 'offline inc did not write a diff');
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(set, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  assert.equal(await fs.access(`${socket}.vda`).then(() => true, () => false), false, 'qemu-nbd socket left behind');
  await assertRestores(work, set, p2);

  const copySet = path.join(work, 'copy');
  const copy = await backup('-d', dom.name, '-l', 'full', '-o', copySet);
  assert.match(copy.stderr, /warning: .*shut off.*this full backup is a copy/);
  assert.ok((await fs.readdir(copySet)).includes('vda.copy.data'));
  await assertRestores(work, copySet, p2);
  // A copy has no checkpoints: --until of one that the set does not know is refused, not ignored.
  const bogus = await runCli(ourBin('virtnbdrestore'), ['-i', copySet, '-o', path.join(work, 'bogus'), '-n', '--until', 'virtnbdbackup.7']);
  assert.equal(bogus.code, 1, bogus.stderr);
  assert.match(bogus.stderr.trim(), /checkpoint virtnbdbackup\.7 is not in \S+ \(it holds copies, which have no checkpoints: restore without --until\)$/);

  // A diff is named by the second it starts in: one whose name is taken is refused before it reads anything (it
  // met the file after all its reads). Names taken for the next seconds stand for a diff just made, with its log
  // (of the same second's name): the refused run writes a log of its own, never into that one.
  const now = Math.floor(Date.now() / 1000);
  const earlier = 'the earlier diff\'s log\n';
  const names = Array.from({ length: 30 }, (_, i) => [path.join(set, `vda.diff.${now + i}.data`), path.join(set, logFileName('diff', new Date((now + i) * 1000)))]).flat();
  // Never over the real diff and its log, which the offline inc may have made in this very second.
  const taken: string[] = [];
  for (const file of names) {
    if (await fs.writeFile(file, file.endsWith('.log') ? earlier : 'x', { flag: 'wx' }).then(() => true, () => false)) taken.push(file);
  }
  const twice = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'diff', '-o', set]);
  assert.equal(twice.code, 1, twice.stderr);
  assert.match(twice.stderr.trim(), /^virtnbdbackup: error: vda\.diff\.\d+\.data is already in \S+: a diff is named by the second it starts in, and another one began in this second; run again a second later$/);
  assert.doesNotMatch(twice.stderr, /writing vda\.diff/);
  for (const file of taken.filter((f) => f.endsWith('.log'))) assert.equal(await fs.readFile(file, 'utf8'), earlier, `the refused run wrote into ${file}`);
  const ownLogs = (await fs.readdir(set)).filter((f) => /^backup\.diff\.\d{14}\.2\.log$/.test(f));
  assert.equal(ownLogs.length, 1, `no log of its own: ${ownLogs.join(', ')}`);
  assert.match(await fs.readFile(path.join(set, ownLogs[0] as string), 'utf8'), /ERROR vda\.diff\.\d+\.data is already in \S+: a diff is named by the second it starts in/);
  for (const file of [...taken, path.join(set, ownLogs[0] as string)]) await fs.rm(file);

  await dom.start();
  await dom.write('vda', 0x66, '20M', '1M');
  const p3 = await dom.snapshot('vda');
  await backup('-d', dom.name, '-l', 'inc', '-o', set);
  assert.ok((await fs.readdir(set)).includes('vda.inc.virtnbdbackup.2.data'));
  await assertRestores(work, set, p3);
  await assertRestores(work, set, p1, 'virtnbdbackup.1');
  // The offline diff names its parent as its checkpoint, as Python's offline backups do: Python's restore stops (-u)
  // at the first file naming the checkpoint, and the next one's name ended it at the diff, before that inc.
  const dumped = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump'])).stdout) as Array<{ file: string; checkpointName: string }>;
  assert.deepEqual(dumped.filter((m) => m.file.startsWith('vda.diff.')).map((m) => m.checkpointName), ['virtnbdbackup.1']);
  const python = path.join(work, 'python-p3');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', python, '-n', '-u', 'virtnbdbackup.2']);
  const same = await TestDomain.compare(path.join(python, 'vda.qcow2'), p3);
  assert.ok(same.identical, `Python's restore to virtnbdbackup.2: ${same.output}`);
});

test('-S starts a shut-off domain paused and stops it again; a bitmap removed while off makes the next inc a full', async (t) => {
  const dom = await withDomain(t, { disks: [DISK], start: false });
  const work = await withTempDir(t, 'startdom-');
  const set = path.join(work, 'set');
  const p0 = await dom.snapshot('vda');
  const full = await backup('-d', dom.name, '-l', 'full', '-S', '-o', set);
  assert.match(full.stderr, /started shut-off domain .* paused/);
  assert.match(virsh('domstate', dom.name), /shut off/);
  assert.match(virsh('checkpoint-list', dom.name, '--name'), /virtnbdbackup\.0/);

  await writeOffline(dom, '0x44', '2M', '1M');
  const p1 = await dom.snapshot('vda');
  await backup('-d', dom.name, '-l', 'inc', '-S', '-o', set);
  assert.match(virsh('domstate', dom.name), /shut off/);

  // -s with -S: the job is to outlive the run, and -S stops the domain as the run ends: refused, the domain not started.
  const leftRunning = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-s', '-S', '-o', set]);
  assert.equal(leftRunning.code, 1, leftRunning.stderr);
  assert.match(errorLines(leftRunning).join('\n'), /is shut off: -s leaves a backup job running, which needs a running domain; start it first \(virsh start: -S would stop the domain again as the run ends, and the job with it\)$/);
  assert.doesNotMatch(leftRunning.stderr, /started shut-off domain/);
  assert.match(virsh('domstate', dom.name), /shut off/);
  // -S with no disk to back up (-i of a disk it lacks): refused with the same lines, before the domain is started.
  const noDisk = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-S', '-i', 'vdz', '-o', set]);
  assert.equal(noDisk.code, 1, noDisk.stderr);
  assert.match(noDisk.stderr, /-i vdz: domain '\S+' has no disk vdz \(its disks: vda\)\n(.*\n)*.*error: domain '\S+' has no disk to back up matching -i vdz\n$/);
  assert.doesNotMatch(noDisk.stderr, /started shut-off domain/);
  assert.match(virsh('domstate', dom.name), /shut off/);

  await run('qemu-img', ['bitmap', '--remove', dom.diskPath('vda'), 'virtnbdbackup.1']);
  await writeOffline(dom, '0x77', '30M', '1M');
  const p2 = await dom.snapshot('vda');
  const refused = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.equal(refused.code, 1);
  assert.equal(errorLines(refused).length, 1, refused.stderr);
  assert.match(refused.stderr, /bitmap virtnbdbackup\.1 is missing from .*run again with -S/);

  const fallback = await backup('-d', dom.name, '-l', 'inc', '-S', '-o', set);
  const archived = /previous chain was moved to (\S+) and restores from there/.exec(fallback.stderr)?.[1];
  assert.ok(archived, `no fallback warning: ${fallback.stderr}`);
  assert.match(virsh('domstate', dom.name), /shut off/);
  assert.ok((await fs.readdir(set)).includes('vda.full.data'));
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(set, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0']);
  await assertRestores(work, set, p2);
  await assertRestores(work, archived, p1);
  await assertRestores(work, archived, p0, 'virtnbdbackup.0');
});

test('a shut-off domain\'s optional disks whose image is missing (one since before the full, one since after): each is left out with a warning that says so, -x silences it; the inc saves the other disk\'s changes as a diff', async (t) => {
  const small = (target: string): DiskSpec => ({ target, sizeMiB: 16, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 1 }], optional: true });
  const dom = await withDomain(t, { disks: [DISK, small('vdb'), small('vdc')], start: false });
  const work = await withTempDir(t, 'optional-');
  const set = path.join(work, 'set');
  // vdb's image is gone before the domain starts: libvirt starts it without vdb, so the full has no vdb.
  await fs.rename(dom.diskPath('vdb'), path.join(work, 'vdb.away'));
  await dom.start();
  await backup('-d', dom.name, '-l', 'full', '-o', set);
  await dom.stop();
  await fs.rename(dom.diskPath('vdc'), path.join(work, 'vdc.away'));
  await writeOffline(dom, '0x44', '2M', '1M');
  const p1 = await dom.snapshot('vda');
  // vdb was said to be added since the checkpoint, to be saved whole by an inc with -S, which drops it too; vdc failed in qemu-img.
  const inc = await runCli(ourBin('virtnbdbackup'), ['-n', '-e', '-d', dom.name, '-l', 'inc', '-o', set]);
  assert.equal(inc.code, 2, inc.stderr);
  for (const target of ['vdb', 'vdc']) {
    assert.match(inc.stderr, new RegExp(`^warning: skipping disk ${target}: its image ${dom.diskPath(target)} is missing, and startupPolicy='optional' starts the domain without it \\(with -S too\\), so no backup holds it; put the image back to back it up, or leave the disk out with -x ${target}$`, 'm'));
  }
  assert.doesNotMatch(inc.stderr, /-S\/--start-domain/);
  assert.deepEqual((await fs.readdir(set)).filter((f) => /^vd.\.diff\./.test(f) && f.endsWith('.data')).map((f) => f.slice(0, 3)), ['vda']);
  await assertRestores(work, set, p1);
  // Left out with -x, they are lines of the log, no warning.
  await new Promise((resolve) => setTimeout(resolve, 1000)); // a diff is named by its second
  const excluded = await runCli(ourBin('virtnbdbackup'), ['-n', '-e', '-d', dom.name, '-l', 'inc', '-x', 'vdb,vdc', '-o', set]);
  assert.equal(excluded.code, 0, excluded.stderr);
});

test('a shut-off domain whose image another process holds open (a qemu-nbd): an inc, copy or -S run is refused naming the image (the inc read it as a broken bitmap); once it is closed the inc goes on', async (t) => {
  const dom = await withDomain(t, { disks: [DISK], start: false });
  const work = await withTempDir(t, 'held-');
  const set = path.join(work, 'set');
  await backup('-d', dom.name, '-l', 'full', '-S', '-o', set);
  await writeOffline(dom, '0x44', '2M', '1M');
  const p1 = await dom.snapshot('vda');
  // A writable qemu-nbd marks the image's bitmaps in use, as a crash leaves them: that read as broken and asked
  // for -S, whose start fails on the same lock.
  const holderSocket = path.join(work, 'holder.sock');
  const holder = spawn('qemu-nbd', ['--format', 'qcow2', '--socket', holderSocket, dom.diskPath('vda')], { stdio: 'ignore' });
  const holderDone = once(holder, 'exit');
  try {
    for (let i = 0; i < 200 && !(await fs.access(holderSocket).then(() => true, () => false)); i++) await new Promise((r) => setTimeout(r, 25));
    const refused = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.deepEqual(errorLines(refused), [`virtnbdbackup: error: image ${dom.diskPath('vda')} of disk vda is in use by another process, which holds QEMU's lock on it: stop that process (a qemu-nbd, qemu-io, guestmount ...) and run again`]);
    assert.equal((await fs.readdir(set)).filter((f) => f.includes('.diff.')).length, 0);
    // A copy met it in qemu-nbd, whose words said nothing of what to do.
    const copy = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'copy')]);
    assert.deepEqual([copy.code, errorLines(copy)], [1, errorLines(refused)]);
    // -S: libvirt's start fails on the lock, in a monitor line that holds QEMU's whole -blockdev argument.
    const started = await runCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'inc', '-S', '-o', set]);
    assert.deepEqual([started.code, errorLines(started)], [1, [`virtnbdbackup: error: cannot start domain '${dom.name}' paused for the backup (-S): its image ${dom.diskPath('vda')} is in use by another process, which holds QEMU's lock on it: stop that process (a qemu-nbd, qemu-io, guestmount ...) and run again`]]);
    assert.match(virsh('domstate', dom.name), /shut off/);
  } finally {
    holder.kill('SIGTERM');
    await holderDone;
  }
  await backup('-d', dom.name, '-l', 'inc', '-o', set);
  await assertRestores(work, set, p1);
});

test('a domain shut off with its memory saved (managedsave): -S backs it up from its images without starting it, and it resumes afterwards', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'saved-');
  const set = path.join(work, 'set');
  await backup('-d', dom.name, '-l', 'full', '-o', set);
  await dom.write('vda', 0x66, '2M', '1M');
  const p1 = await dom.snapshot('vda');
  // As libvirt-guests does at host shutdown with ON_SHUTDOWN=suspend.
  virsh('managedsave', dom.name);
  const saved = (): void => {
    assert.match(virsh('domstate', dom.name, '--reason'), /shut off \(saved\)/);
    assert.match(virsh('dominfo', dom.name), /Managed save:\s+yes/);
  };
  saved();
  // Started, the saved guest would resume, and the stop after the backup would lose its memory.
  const inc = await backup('-d', dom.name, '-l', 'inc', '-S', '-o', set);
  assert.match(inc.stderr, /warning: domain '\S+' is shut off with its memory saved \(virsh managedsave, or libvirt-guests at host shutdown\): -S would resume the saved guest .+, so it is backed up shut off, from its images, which stay as they are/);
  assert.match(inc.stderr, /saves the changes since virtnbdbackup\.0 as a differential backup/);
  saved();
  await assertRestores(work, set, p1);
  const copy = await backup('-d', dom.name, '-l', 'full', '-S', '-o', path.join(work, 'copy'));
  assert.match(copy.stderr, /this full backup is a copy \(no chain\); back it up while the domain runs \(virsh start resumes its saved state; -S does not start a saved domain\) to start a chain/);
  assert.ok((await fs.readdir(path.join(work, 'copy'))).includes('vda.copy.data'));
  saved();
  virsh('start', dom.name);
  assert.match(virsh('domstate', dom.name, '--reason'), /running \(restored\)/);
});

test('boot files (loader, nvram, kernel, initrd) and the autostart flag are saved with the backup', async (t) => {
  const dom = await withDomain(t, { disks: [DISK], start: false });
  const work = await withTempDir(t, 'boot-');
  const files = await defineWithBootFiles(dom, work);
  virsh('autostart', dom.name);

  const set = path.join(work, 'set');
  await backup('-d', dom.name, '-l', 'copy', '-o', set);
  const saved = await fs.readdir(set);
  for (const file of Object.values(files)) {
    const name = path.basename(file);
    assert.ok(saved.includes(name), `${name} not saved: ${saved.join(' ')}`);
    assert.ok((await fs.readFile(path.join(set, name))).equals(await fs.readFile(file)), `${name} differs`);
  }
  assert.equal(await fs.readFile(path.join(set, 'autostart.copy'), 'utf8'), 'True');
});

test('kill -9 of a shut-off backup leaves no qemu-nbd holding the image: the domain starts; qemu-nbd keeps its buffers', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 512, fill: [{ pattern: 0x21, offsetMiB: 0, lengthMiB: 384 }] }], start: false });
  const work = await withTempDir(t, 'offkill-');
  const socket = path.join(work, 'nbd.sock');
  const running = startCli(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'set'), '-f', socket]);
  for (let i = 0; i < 300 && !(await servesSocket(`${socket}.vda`)); i++) await new Promise((r) => setTimeout(r, 20));
  assert.ok(await servesSocket(`${socket}.vda`), 'qemu-nbd never started');
  // Our servers run with glibc told to keep freed request buffers (no page faults per request). glibc rewrites the
  // variable in place as it takes it, so only its start is certain to show.
  const pid = await qemuNbdPid((arg) => arg === `${socket}.vda`);
  const environment = (await fs.readFile(`/proc/${pid}/environ`, 'utf8')).split('\0');
  assert.ok(environment.some((v) => v.startsWith('GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432')), 'qemu-nbd without our GLIBC_TUNABLES');
  running.child.kill('SIGKILL');
  await running.done;
  for (let i = 0; i < 100 && (await servesSocket(`${socket}.vda`)); i++) await new Promise((r) => setTimeout(r, 50));
  assert.equal(await servesSocket(`${socket}.vda`), false, 'qemu-nbd outlived the killed backup');
  await dom.start();
});

/** Whether a live qemu-nbd process serves `socket`. */
const servesSocket = (socket: string): Promise<boolean> => qemuNbdRuns((arg) => arg === socket);
