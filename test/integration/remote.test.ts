// A domain of another host, reached with a remote libvirt URI (qemu+ssh://), as virtnbdbackup's users back up:
// here this machine plays that host through a private sshd on 127.0.0.1. The job serves over TCP (-P); image info
// and boot files come through ssh; -s/-k work remotely; a shut-off remote domain is served by qemu-nbd on that
// host; --tls serves NBD over TLS with the host's certificates; a restore goes onto that host through its qemu-nbd
// (a raw image checked against its .chksum as it is sent);
// the scratch directory there is watched for space; a host whose ssh goes silent fails a run after --nbd-timeout,
// and leaves the watch with one warning;
// Ctrl-C to the run's group leaves no job there (libvirt's ssh ignores it); restore flags for another host without
// its URI are refused with one line; backup's (-I, -P, --ssh-user) on a domain of this host are a warning, as Python
// ignores them there.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { TestDomain, run, withDomain, withTempDir, withTmpfs, unmountDevice } from '../support/testbed.js';
import { errorLines, ourBin, qemuImgIn, qemuNbdRuns, restoreCompressing, runCli, runOk, startCli, startHeldOnOutput, within, type CliResult, type CliRun } from '../support/cli.js';
import { assertRestoresTo, defineWithBootFiles, virsh } from '../support/points.js';
import { freePort, signalSshd, withPrivateSshd } from '../support/sshd.js';
import { flipByte, randomSet } from '../support/craftedSet.js';
import { HOST_TLS_DIR, withHostTlsCertificates } from '../support/tls.js';
import { domainHostOf } from '../../src/libvirt/domainHost.js';
import { openScratchSpace, watchScratch } from '../../src/backup/scratchWatch.js';
import { Logger } from '../../src/util/log.js';

const bin = ourBin('virtnbdbackup');
const DISK = { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] };

test('remote domain (qemu+ssh URI): full and inc over TCP NBD restore exactly; -s serves at nbd://host:port and -k ends it; shut off, qemu-nbd serves on that host, or -S starts it', async (t) => {
  const sshd = await withPrivateSshd(t);
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'remote-');
  const set = path.join(work, 'set');
  const port = await freePort();
  const remote = ['-U', sshd.libvirtUri, '-P', String(port)];

  const full = await runOk(bin, ['-n', '-v', '-d', dom.name, '-l', 'full', '-o', set, ...remote]);
  assert.match(full.stderr, new RegExp(`<server transport='tcp' name='127\\.0\\.0\\.1' port='${port}'/>`));
  await dom.write('vda', 0x22, '8M', '2M');
  const p1 = await dom.snapshot('vda');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-o', set, ...remote]);
  // qemu-img info ran on the "remote" host through ssh: the image's bitmaps are in the set's qcow.json.
  const info = JSON.parse(await fs.readFile(path.join(set, 'vda.virtnbdbackup.1.qcow.json'), 'utf8')) as { format: string };
  assert.equal(info.format, 'qcow2');
  assert.deepEqual(virsh('checkpoint-list', dom.name, '--name').split('\n').map((l) => l.trim()).filter(Boolean).sort(), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  await assertRestoresTo(work, set, p1);
  // A --scratchdir that host does not have is refused before anything, as on this host: a full went on, removed the
  // chain's checkpoints, then QEMU failed its job on the directory, and the set above could not go on.
  const noScratch = await runCli(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', path.join(work, 'noscratch'), ...remote, '--scratchdir', path.join(work, 'nowhere')]);
  assert.equal(noScratch.code, 1, noScratch.stderr);
  assert.deepEqual(errorLines(noScratch), [`virtnbdbackup: error: the scratch directory ${path.join(work, 'nowhere')} on root@127.0.0.1 does not exist or is no directory: create it, or give --scratchdir an existing directory (QEMU keeps the old data of guest writes there during the backup)`]);
  assert.deepEqual(virsh('checkpoint-list', dom.name, '--name').split('\n').map((l) => l.trim()).filter(Boolean).sort(), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  // So is an inc that would fall back to a full (its parent's saved definition gone): it moved the chain aside first.
  const cpt = path.join(set, 'checkpoints', 'virtnbdbackup.1.xml');
  const saved = await fs.readFile(cpt);
  await fs.rm(cpt);
  const noScratchInc = await runCli(bin, ['-n', '-d', dom.name, '-l', 'inc', '-o', set, ...remote, '--scratchdir', path.join(work, 'nowhere')]);
  assert.equal(noScratchInc.code, 1, noScratchInc.stderr);
  assert.match(errorLines(noScratchInc).join('\n'), /the scratch directory \S+\/nowhere on root@127\.0\.0\.1 does not exist or is no directory/);
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.startsWith('chain.')), [], 'the chain was moved aside');
  await fs.writeFile(cpt, saved);

  // A port already taken on that host (another backup's): one line naming it and -P; nothing is left running.
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(port, '127.0.0.1', resolve));
  const busy = await runCli(bin, ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'busy'), ...remote]).finally(() => taken.close());
  assert.equal(busy.code, 1, busy.stderr);
  assert.match(errorLines(busy).join('\n'), new RegExp(`port ${port} on 127\\.0\\.0\\.1 is taken \\(another backup\\?\\): choose another with -P$`));
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  // An -I that host does not have (the URI's name as seen through NAT, say): QEMU's words, then what to do.
  const unbound = await runCli(bin, ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'unbound'), ...remote, '-I', '192.0.2.1']);
  assert.equal(unbound.code, 1, unbound.stderr);
  assert.match(errorLines(unbound).join('\n'), /Cannot assign requested address; 192\.0\.2\.1 is no address of the domain's host: give one of its own with -I$/);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);

  const started = await runOk(bin, ['-n', '-d', dom.name, '-s', '-o', path.join(work, 'started'), ...remote]);
  assert.equal(started.stdout.trim(), `nbd://127.0.0.1:${port}`);
  assert.equal(execFileSync('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/vda`], { encoding: 'utf8' }).trim(), String(64 * 1024 * 1024));
  await runOk(bin, ['-d', dom.name, '-k', '-U', sshd.libvirtUri]);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);

  // Shut off: qemu-nbd serves the images on that host, started through ssh on the -P port, and is gone afterwards.
  await dom.write('vda', 0x44, '20M', '1M');
  const p2 = await dom.snapshot('vda');
  await dom.stop();
  const off = await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-o', set, ...remote]);
  assert.match(off.stderr, /diff backup/, 'an offline inc saves the changes since the last checkpoint');
  assert.equal(await qemuNbdRuns((arg) => arg === String(port)), false, 'the remote qemu-nbd outlived the run');
  await assertRestoresTo(work, set, p2);
  // -S starts it paused for a job instead.
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-S', '-o', set, ...remote]);
  assert.match(virsh('domstate', dom.name), /shut off/);
  await assertRestoresTo(work, set, p2);
});

test('--tls: the remote job serves NBD over TLS and ours connects with --tls-cert (qemu-img map too), a restore onto that host too; plain NBD is refused by it; missing client files, and a CA that did not sign the host\'s certificate, are one line', async (t) => {
  const client = await withHostTlsCertificates(t);
  if (!client) {
    t.skip(`${HOST_TLS_DIR} exists: this machine's own TLS set-up is left alone`);
    return;
  }
  const sshd = await withPrivateSshd(t);
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'tlsbackup-');
  const set = path.join(work, 'set');
  const port = await freePort();
  const remote = ['-U', sshd.libvirtUri, '-P', String(port), '--tls', '--tls-cert', client];

  const full = await runOk(bin, ['-n', '-v', '-d', dom.name, '-l', 'full', '-q', '-o', set, ...remote]);
  assert.match(full.stderr, new RegExp(`<server transport='tcp' tls='yes' name='127\\.0\\.0\\.1' port='${port}'/>`));
  await dom.write('vda', 0x33, '16M', '1M');
  const p1 = await dom.snapshot('vda');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-o', set, ...remote]);
  await assertRestoresTo(work, set, p1);
  // And back onto that host: its qemu-nbd serves the new image over TLS.
  const there = path.join(work, 'there');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', there, '-n', ...remote]);
  const same = await TestDomain.compare(path.join(there, 'vda.qcow2'), p1);
  assert.ok(same.identical, same.output);

  const started = await runOk(bin, ['-n', '-d', dom.name, '-s', '-o', path.join(work, 'started'), ...remote]);
  assert.equal(started.stdout.trim(), `nbds://127.0.0.1:${port}`);
  assert.throws(() => execFileSync('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/vda`], { stdio: 'pipe' }), /TLS/);
  await runOk(bin, ['-d', dom.name, '-k', '-U', sshd.libvirtUri]);

  const missing = await runCli(bin, ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'missing'), ...remote.slice(0, -1), path.join(work, 'nowhere')]);
  assert.equal(missing.code, 1, missing.stderr);
  assert.match(errorLines(missing).join('\n'), /--tls: .*nowhere\/ca-cert\.pem is missing or unreadable; give the directory holding ca-cert\.pem .* with --tls-cert$/);
  // A CA that did not sign the host's certificate: gnutls's words named no file; the line now says what to check.
  const otherCa = path.join(work, 'other-ca');
  await fs.mkdir(otherCa);
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', path.join(otherCa, 'ca-key.pem'),
    '-out', path.join(otherCa, 'ca-cert.pem'), '-days', '2', '-subj', '/CN=another CA']);
  for (const file of ['client-cert.pem', 'client-key.pem']) await fs.copyFile(path.join(client, file), path.join(otherCa, file));
  const unsigned = await runCli(bin, ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'other'), ...remote.slice(0, -1), otherCa]);
  assert.equal(unsigned.code, 1, unsigned.stderr);
  assert.match(errorLines(unsigned).join('\n'), new RegExp(`certificate verification.*; the TLS handshake failed: check that ${otherCa}/ca-cert\\.pem is the CA that signed the host's server certificate \\(which must name 127\\.0\\.0\\.1\\), and that the host takes ${otherCa}/client-cert\\.pem; give the right directory with --tls-cert$`));
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  // A domain of this host needs no TLS: a warning (-e: exit 2), and the backup is made.
  const local = await runCli(bin, ['-n', '-e', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'local'), '--tls']);
  assert.equal(local.code, 2, local.stderr);
  assert.match(local.stderr, /--tls: domain .* runs on this host, .* no TLS needed, none used/);
});

test('Ctrl-C (SIGINT to the run\'s process group, as a terminal sends it) in mid-backup of a remote domain: exit 130, its job there ended and its checkpoint removed', async (t) => {
  const sshd = await withPrivateSshd(t);
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'remotectrlc-');
  // A zip on standard output, unread: the copy waits, the job up, while the signal comes.
  const child = spawn(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', '-', '-U', sshd.libvirtUri, '-P', String(await freePort())], { cwd: work, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  child.stdout.pause();
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const done = new Promise<number | null>((resolve) => child.once('close', resolve));
  assert.ok(await within(20_000, async () => /writing vda\.full\.data/.test(stderr)), stderr);
  process.kill(-(child.pid as number), 'SIGINT');
  child.stdout.resume();
  const code = await done;
  // libvirt's own ssh, in the run's group, died of it: the run failed as if libvirtd were gone (exit 1), its job left.
  assert.equal(code, 130, stderr);
  assert.match(stderr, /^virtnbdbackup: error: interrupted by SIGINT; cleaned up$/m);
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '');
});

/** qemu-img info of an image: its format and the bytes it takes on disk. */
async function imageInfo(file: string): Promise<{ format: string; 'actual-size': number }> {
  return JSON.parse((await run('qemu-img', ['info', '--output=json', file])).stdout) as { format: string; 'actual-size': number };
}

test('restore onto another host (remote -U): images written there through its qemu-nbd, -D defines them there; nothing overwritten; raw-image sets, and onto a file or device there', async (t) => {
  const sshd = await withPrivateSshd(t);
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'remoterestore-');
  const set = path.join(work, 'set');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', set]);
  await dom.write('vda', 0x55, '4M', '3M');
  const p1 = await dom.snapshot('vda');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'inc', '-o', set]);

  const name = `vnbdtest-remote-${path.basename(work).replace(/[^a-z0-9]/gi, '')}`;
  t.after(() => { try { virsh('undefine', name); } catch { /* not defined */ } });
  const out = path.join(work, 'there');
  const port = await freePort();
  const remote = ['-U', sshd.libvirtUri, '-P', String(port)];
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-D', '-N', name, ...remote]);
  const image = path.join(out, 'vda.qcow2');
  const same = await TestDomain.compare(image, p1);
  assert.ok(same.identical, same.output);
  assert.match(virsh('domblklist', name), new RegExp(`vda\\s+${image}`));
  assert.equal(await qemuNbdRuns((arg) => arg === String(port)), false, 'the remote qemu-nbd outlived the restore');

  const again = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', ...remote]);
  assert.equal(again.code, 1, again.stderr);
  assert.match(errorLines(again).join('\n'), new RegExp(`${image} on root@127\\.0\\.0\\.1 already exists; restore into another directory`));
  // Its qemu-nbd's port already taken there: one line naming it and -P, and nothing of the disk kept; the
  // directories the run made there (-o and its missing parent) are removed again (they were left, empty), and a
  // directory that was there before is kept.
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(port, '127.0.0.1', resolve));
  const busyOut = path.join(work, 'busy', 'deeper');
  const existingOut = path.join(work, 'existing');
  await fs.mkdir(existingOut);
  let busy: CliResult;
  let busyExisting: CliResult;
  try {
    busy = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', busyOut, '-n', ...remote]);
    busyExisting = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', existingOut, '-n', ...remote]);
  } finally {
    taken.close();
  }
  for (const r of [busy, busyExisting]) {
    assert.equal(r.code, 1, r.stderr);
    assert.match(errorLines(r).join('\n'), new RegExp(`port ${port} on 127\\.0\\.0\\.1 is taken \\(another backup or restore\\?\\): choose another with -P; nothing of it was kept$`));
  }
  await assert.rejects(fs.access(path.join(work, 'busy')), 'the directories the failed run made there are left');
  assert.deepEqual(await fs.readdir(existingOut), []);
  // Its qemu-nbd told to bind an address that host does not have (-I): qemu-nbd's own reason is in the line.
  const unbound = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'unbound'), '-n', ...remote, '-I', '192.0.2.1']);
  assert.equal(unbound.code, 1, unbound.stderr);
  assert.match(errorLines(unbound).join('\n'), /qemu-nbd ended before it served 192\.0\.2\.1:\d+: .*(Cannot assign requested address|Failed to).*; qemu-nbd exited with 1/);
  const relative = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'there', '-n', ...remote]);
  assert.match(errorLines(relative).join('\n'), /-o there is on root@127\.0\.0\.1: give it as an absolute path/);

  const rawSet = path.join(work, 'raw');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'copy', '-t', 'raw', '-o', rawSet]);
  // A set of raw images (-t raw): their data goes through the qemu-nbd there too, into a qcow2 like the disk's.
  const rawOut = path.join(work, 'rawthere');
  await runOk(ourBin('virtnbdrestore'), ['-i', rawSet, '-o', rawOut, '-n', ...remote]);
  const fromRaw = await TestDomain.compare(path.join(rawOut, 'vda.qcow2'), p1);
  assert.ok(fromRaw.identical, fromRaw.output);
  const info = await imageInfo(path.join(rawOut, 'vda.qcow2'));
  assert.equal(info.format, 'qcow2');
  assert.ok(info['actual-size'] < 32 * 1024 * 1024, `holes were written: ${info['actual-size']} bytes allocated`);
  assert.deepEqual((await fs.readdir(rawOut)).filter((f) => f.endsWith('.partial')), []);

  // --compress there: the image is converted with compressed clusters on that host, and holds the same.
  const packedOut = path.join(work, 'packed');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', packedOut, '-n', '--compress', ...remote]);
  const packed = await TestDomain.compare(path.join(packedOut, 'vda.qcow2'), p1);
  assert.ok(packed.identical, packed.output);
  assert.ok((await imageInfo(path.join(packedOut, 'vda.qcow2')))['actual-size'] < (await imageInfo(image))['actual-size'], 'compressed clusters take less room than the plain image');
  assert.deepEqual((await fs.readdir(packedOut)).filter((f) => f.includes('partial')), []);

  // Onto an existing raw file and a block device there, both filled with 0xee first: every byte the disk reads
  // as zero is written as zero. A qcow2 file there is refused.
  const file = path.join(work, 'target.raw');
  await fs.writeFile(file, Buffer.alloc(32 * 1024 * 1024, 0xee)); // smaller than the disk: it grows
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', file, '-d', 'vda', '-n', ...remote]);
  const ontoFile = await TestDomain.compare(file, p1, { formatA: 'raw' });
  assert.ok(ontoFile.identical, ontoFile.output);
  const backing = path.join(work, 'loop.img');
  await fs.writeFile(backing, Buffer.alloc(64 * 1024 * 1024, 0xee));
  const device = (await run('losetup', ['-f', '--show', backing])).stdout.trim();
  try {
    // Mounted there, it is refused before anything is written (it was written over, exit 0).
    const mountPoint = path.join(work, 'mnt');
    await fs.mkdir(mountPoint);
    await run('mkfs.ext4', ['-q', device]);
    await run('mount', [device, mountPoint]);
    const mounted = await runCli(ourBin('virtnbdrestore'), ['-i', rawSet, '-o', device, '-n', ...remote]).finally(() => unmountDevice(mountPoint, device));
    assert.equal(mounted.code, 1, mounted.stderr);
    assert.deepEqual(errorLines(mounted), [`virtnbdrestore: error: ${device} on root@127.0.0.1 is in use by the system (a mounted file system, or part of LVM, RAID or swap), so it was left untouched; unmount or release it, or give another device`]);
    await run('fsck.ext4', ['-n', device]);
    await runOk(ourBin('virtnbdrestore'), ['-i', rawSet, '-o', device, '-n', ...remote]);
    const ontoDevice = await TestDomain.compare(device, p1, { formatA: 'raw' });
    assert.ok(ontoDevice.identical, ontoDevice.output);
  } finally {
    await run('losetup', ['-d', device]);
  }
  // A raw image that differs from its .chksum fails there too, as it is sent: one line naming it, nothing kept.
  await flipByte(path.join(rawSet, 'vda.copy.data'), 1024 * 1024);
  const rottedOut = path.join(work, 'rotted');
  const rotted = await runCli(ourBin('virtnbdrestore'), ['-i', rawSet, '-o', rottedOut, '-n', ...remote]);
  assert.equal(rotted.code, 1, rotted.stderr);
  assert.match(errorLines(rotted).join('\n'), /^virtnbdrestore: error: restore of disk vda failed: \S+\/vda\.copy\.data: adler32 of the file is \d+, vda\.copy\.data\.chksum says \d+; the set's file is damaged: .*; nothing of it was kept$/);
  await assert.rejects(fs.access(rottedOut), 'the output directory the failed run made there is left');
  const qcow = path.join(work, 'target.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '64M']);
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', qcow, '-d', 'vda', '-n', ...remote]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(errorLines(refused).join('\n'), new RegExp(`-o ${qcow} on root@127\\.0\\.0\\.1 is a qcow2 image; restore writes raw data onto existing files`));
  const archive = path.join(work, 'backup.tar.gz');
  await run('tar', ['-czf', archive, '-C', set, '.']);
  const onArchive = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', archive, '-d', 'vda', '-n', ...remote]);
  assert.equal(onArchive.code, 1, onArchive.stderr);
  assert.match(errorLines(onArchive).join('\n'), new RegExp(`-o ${archive} on root@127\\.0\\.0\\.1 is a gzip file, not a raw disk: a restore would overwrite it`));
});

test('--compress onto another host interrupted (SIGINT) while qemu-img compresses there: exit 130 at once, that qemu-img ended, nothing left; killed (SIGKILL), that qemu-img ends too', async (t) => {
  const sshd = await withPrivateSshd(t);
  const work = await withTempDir(t, 'remotecompress-');
  const { set } = await randomSet(work, { vda: 128 }); // about 2.5 s of compressing here
  const out = path.join(work, 'out');
  const port = await freePort();
  // The private sshd's host is this one: its qemu-img shows in /proc.
  const qemuImgOnOut = (): Promise<string | undefined> => qemuImgIn(out);
  const args = ['-i', set, '-o', out, '-n', '--compress', '-U', sshd.libvirtUri, '-P', String(port)];
  const compressing = (): Promise<CliRun> => restoreCompressing(args, out);
  const running = await compressing();
  const signalled = Date.now();
  running.child.kill('SIGINT');
  const stopped = await running.done;
  assert.equal(stopped.code, 130, stopped.stderr);
  assert.ok(Date.now() - signalled < 3000, `took ${Date.now() - signalled} ms to stop`);
  assert.deepEqual(errorLines(stopped), ['virtnbdrestore: error: interrupted by SIGINT; cleaned up']);
  assert.ok(await within(2000, async () => (await qemuImgOnOut()) === undefined), 'qemu-img there outlived the interrupted restore');
  assert.deepEqual((await fs.readdir(out).catch(() => [])).filter((f) => f.includes('partial')), []);
  // Killed (SIGKILL): its ssh ends with it, and so does the session's qemu-img.
  const killed = await compressing();
  killed.child.kill('SIGKILL');
  await killed.done;
  assert.ok(await within(3000, async () => (await qemuImgOnOut()) === undefined), 'qemu-img there outlived the killed restore');
});

test('the scratch directory on the remote host filling up with guest writes stops the run before the guest\'s writes would fail', async (t) => {
  const scratch = await withTmpfs(t, 'vnbd-rscratch-', 'size=256M,mode=1777');
  const sshd = await withPrivateSshd(t);
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 768, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 640 }] }] });
  const work = await withTempDir(t, 'rscratch-');
  const set = path.join(work, 'set');
  const port = await freePort();
  // A zip on standard output, unread for now: its copy waits (so that it cannot end first) while the job and the
  // scratch watch go on. The run must end the job at once, not once its reader reads on.
  const backup = startHeldOnOutput(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', '-', '-U', sshd.libvirtUri, '-P', String(port), '--scratchdir', scratch], work);
  let ended = false;
  void backup.done.then(() => { ended = true; });
  for (let i = 0; i < 4000 && !ended && !/writing vda\.full\.data/.test(backup.stderr()); i++) await new Promise((resolve) => setTimeout(resolve, 5));
  // A write QEMU failed (scratch full) throws here. The writes are paced (8 MiB, then 50 ms): unpaced, a loaded CI
  // machine once wrote the last 64 MiB before the run, looking through ssh, had ended the job.
  try {
    for (let offsetMiB = 0; !ended && offsetMiB < 640; offsetMiB += 8) {
      await dom.write('vda', 0x22, `${offsetMiB}M`, '8M');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  } finally {
    backup.release();
  }
  const r = await backup.done;
  assert.equal(r.code, 1, r.stderr);
  assert.deepEqual(errorLines(r).length, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`^virtnbdbackup: error: the scratch directory ${scratch} on root@127\\.0\\.0\\.1 is nearly full \\(\\d+ MiB of \\d+ MiB left\\): guest writes during the backup keep the old data there, .+; give --scratchdir a directory with more free space`, 'm'));
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '');

  // Less than 64 MiB free from the start: the first look, through ssh before the job starts, refuses it.
  await fs.writeFile(path.join(scratch, 'filler'), Buffer.alloc(220 * 1024 * 1024));
  const early = await runCli(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', `${set}-again`, '-U', sshd.libvirtUri, '-P', String(await freePort()), '--scratchdir', scratch]);
  assert.equal(early.code, 1, early.stderr);
  assert.match(early.stderr, new RegExp(`^virtnbdbackup: error: the scratch directory ${scratch} on root@127\\.0\\.0\\.1 has only \\d+ MiB free, less than the 64 MiB a backup job of '${dom.name}' starts with: .+; give --scratchdir a directory with more free space, or free space there$`, 'm'));
  assert.match(virsh('domjobinfo', dom.name), /Job type:\s+None/);
  assert.equal(virsh('checkpoint-list', dom.name, '--name').trim(), '');
});

test('remote boot files (loader, nvram, kernel, initrd) come through ssh into the set', async (t) => {
  const sshd = await withPrivateSshd(t);
  const dom = await withDomain(t, { disks: [DISK], start: false });
  const work = await withTempDir(t, 'remoteboot-');
  const files = await defineWithBootFiles(dom, work);

  const set = path.join(work, 'set');
  const r = await runOk(bin, ['-n', '-d', dom.name, '-l', 'copy', '-o', set, '-U', sshd.libvirtUri, '-P', String(await freePort())]);
  for (const file of Object.values(files)) {
    const name = path.basename(file);
    assert.match(r.stderr, new RegExp(`saved \\w+ ${file} of root@127\\.0\\.0\\.1 as ${name.replace('.', '\\.')}`));
    assert.ok((await fs.readFile(path.join(set, name))).equals(await fs.readFile(file)), `${name} differs`);
  }
});

test('files of the remote host come through ssh: read whole, and a missing one fails before any byte', async (t) => {
  const sshd = await withPrivateSshd(t);
  const work = await withTempDir(t, 'remotefile-');
  const file = path.join(work, "it's here.bin");
  const content = Buffer.alloc(3 * 1024 * 1024 + 17, 0x5a);
  await fs.writeFile(file, content);
  const host = domainHostOf(sshd.libvirtUri);
  assert.equal(host.remote, true);
  assert.equal(host.label, 'root@127.0.0.1');
  const chunks: Buffer[] = [];
  for await (const chunk of await host.openRead(file)) chunks.push(chunk);
  assert.ok(Buffer.concat(chunks).equals(content));
  await assert.rejects(host.openRead(path.join(work, 'missing')), /on root@127\.0\.0\.1: .*No such file/);
  assert.match((await host.run('echo', ["a 'quoted' word"])).stdout, /^a 'quoted' word\n$/);
});

test('a remote host whose ssh goes silent (its sshd stopped): a restore onto it fails after --nbd-timeout with one line, at the connect and on a connection already up', async (t) => {
  const sshd = await withPrivateSshd(t);
  const dom = await withDomain(t, { disks: [DISK] });
  await dom.write('vda', 0x66, '8M', '48M');
  const work = await withTempDir(t, 'silentssh-');
  const set = path.join(work, 'set');
  await runOk(bin, ['-n', '-d', dom.name, '-l', 'full', '-o', set]);
  const port = await freePort();
  const remote = ['-n', '-U', sshd.libvirtUri, '-P', String(port), '--nbd-timeout', '2'];
  t.after(() => signalSshd(sshd, 'SIGCONT'));
  const lastLine = (r: CliResult): string => r.stderr.trim().split('\n').at(-1) ?? '';

  // The connect: the host takes the TCP connection and never says hello.
  await signalSshd(sshd, 'SIGSTOP');
  let started = Date.now();
  const atConnect = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'first'), ...remote]);
  const connectTook = Date.now() - started;
  await signalSshd(sshd, 'SIGCONT');
  assert.equal(atConnect.code, 1, atConnect.stderr);
  assert.match(lastLine(atConnect), /^virtnbdrestore: error: .*on root@127\.0\.0\.1: .*timed out/i);
  assert.ok(connectTook < 20_000, `ssh waited ${connectTook} ms for the silent host`);

  // A connection already up: stopped once the host's qemu-nbd serves the restore, whose next ssh command waits.
  started = Date.now();
  const run = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'second'), ...remote]);
  let ended = false;
  void run.done.finally(() => { ended = true; });
  while (!ended && !(await qemuNbdRuns((arg) => arg === String(port)))) await new Promise((resolve) => setTimeout(resolve, 5));
  assert.equal(ended, false, 'the restore ended before its host was stopped');
  await signalSshd(sshd, 'SIGSTOP');
  const midway = await run.done;
  await signalSshd(sshd, 'SIGCONT');
  assert.equal(midway.code, 1, midway.stderr);
  // Its partial image could not be removed from the silent host: the line says so, and where.
  const partial = path.join(work, 'second', 'vda.qcow2.partial');
  assert.equal(lastLine(midway), `virtnbdrestore: error: restore of disk vda failed: on root@127.0.0.1: ssh failed: Connection timed out during banner exchange; ${partial} on root@127.0.0.1 could not be removed: remove it`);
  assert.ok(Date.now() - started < 30_000, `the restore waited ${Date.now() - started} ms on the silent host`);
  assert.deepEqual(await fs.readdir(path.join(work, 'second')), ['vda.qcow2.partial']);
  // Going on, the server sees the session gone, and its shell ends qemu-nbd.
  for (let i = 0; i < 200 && (await qemuNbdRuns((arg) => arg === String(port))); i++) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(await qemuNbdRuns((arg) => arg === String(port)), false, 'the remote qemu-nbd outlived its session');
});

test('the scratch watch through an ssh that goes silent (the sshd stopped): one warning that the run goes on unwatched, after --nbd-timeout', async (t) => {
  const sshd = await withPrivateSshd(t);
  const dir = await withTempDir(t, 'silentwatch-');
  const warnings: string[] = [];
  const log = new (class extends Logger { override warn(msg: string): void { warnings.push(msg); } })({ quiet: true });
  const host = domainHostOf(sshd.libvirtUri, undefined, 2);
  const space = await openScratchSpace(host, dir, 'vnbdtest-x', log);
  assert.ok(space, `no scratch space: ${warnings.join('; ')}`);
  const watch = watchScratch(space, dir, 'vnbdtest-x', undefined, log, (err) => assert.fail(err.message));
  t.after(() => watch.stop());
  t.after(() => signalSshd(sshd, 'SIGCONT'));
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.deepEqual(warnings, []);
  await signalSshd(sshd, 'SIGSTOP');
  const started = Date.now();
  while (warnings.length === 0 && Date.now() - started < 20_000) await new Promise((resolve) => setTimeout(resolve, 50));
  await signalSshd(sshd, 'SIGCONT');
  assert.equal(warnings.length, 1, warnings.join('\n'));
  assert.match(warnings[0] ?? '', new RegExp(`^the free space of the scratch directory ${dir} on root@127\\.0\\.0\\.1 can no longer be read \\(.+\\): the backup of 'vnbdtest-x' goes on unwatched`));
  assert.ok(Date.now() - started < 15_000, `the watch waited ${Date.now() - started} ms`);
});

test('refused with one line: restore flags for another host without its URI; a host nobody answers on', async () => {
  const closed = await freePort();
  const cases: Array<[string, string[], RegExp]> = [
    [bin, ['-U', `qemu+tcp://127.0.0.1:${closed}/system`, '-d', 'x', '-k'], new RegExp(`cannot connect to libvirt at qemu\\+tcp://127\\.0\\.0\\.1:${closed}/system: .*; is 127\\.0\\.0\\.1 reachable, and libvirtd running there\\?`)],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '--tls'], /--tls applies to a restore onto another host: give that host's libvirt URI with -U/],
    [ourBin('virtnbdrestore'), ['-i', '/nonexistent', '-o', '/nonexistent', '-P', '10810'], /--nbd-port applies to a restore onto another host/],
  ];
  for (const [command, args, message] of cases) {
    const r = await runCli(command, args);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(errorLines(r).length, 1, r.stderr);
    assert.match(r.stderr, message);
  }
  assert.equal(await fs.access('/nonexistent').then(() => true, () => false), false);
});

test('ssh failures say what to do: a port nobody answers on, a key the host does not take, a program the host lacks; libvirt\'s own ssh\'s too', async (t) => {
  const closed = await freePort();
  const refused = domainHostOf(`qemu+ssh://root@127.0.0.1:${closed}/system`, undefined, 10);
  await assert.rejects(refused.run('true', []), /Connection refused; check that sshd runs on that host and the port in the URI$/);
  const sshd = await withPrivateSshd(t);
  const keyless = path.join(await withTempDir(t, 'nokey-'), 'id');
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', keyless]);
  const wrongKey = domainHostOf(`qemu+ssh://root@127.0.0.1:${sshd.port}/system?keyfile=${keyless}&no_verify=1`, undefined, 10);
  await assert.rejects(wrongKey.run('true', []), /Permission denied \(publickey.*; this user's ssh key is not accepted there: give the user with --ssh-user, or the key with keyfile= in the URI$/);
  // A program the host lacks (qemu-img, qemu-nbd) is named with its package, as the remote shell words it (bash, dash).
  const host = domainHostOf(sshd.libvirtUri, undefined, 10);
  await assert.rejects(host.run('sh', ['-c', 'PATH=/nonexistent; qemu-img info /x']), /qemu-img: not found; qemu-img is not installed on that host: install the package qemu-utils there$/);
  await assert.rejects(host.run('virtnbd-no-such-tool', []), /virtnbd-no-such-tool: command not found; virtnbd-no-such-tool is not installed on that host$/);
  // libvirt's own ssh (the connect, before any of ours) gets advice for its failures too, where it was told to check
  // that the host is reachable and libvirtd runs there.
  const connects: Array<[string, RegExp]> = [
    [`qemu+ssh://root@127.0.0.1:${closed}/system`, /Connection refused.*; check that sshd runs on that host and the port in the URI$/],
    [`qemu+ssh://nobody@127.0.0.1:${sshd.port}/system?keyfile=${sshd.keyfile}&no_verify=1`, /Permission denied \(publickey.*; the host refused the ssh login: give its user in the URI \(qemu\+ssh:\/\/user@host\/system\) and its key with keyfile=$/],
    [`qemu+ssh://root@127.0.0.1:${sshd.port}/system?keyfile=${keyless}.missing&no_verify=1`, /not accessible.*; the key file keyfile= names in the URI cannot be read$/],
  ];
  for (const [uri, advice] of connects) {
    const r = await runCli(bin, ['-U', uri, '-d', 'x', '-k']);
    assert.equal(r.code, 1, r.stderr);
    assert.deepEqual(errorLines(r).length, 1, r.stderr);
    assert.match(errorLines(r)[0] ?? '', advice);
  }
});

test('-I, -P and --ssh-user on a domain of this host: one warning that they apply to another host\'s domains (-e: exit 2), and the backup goes through the unix socket', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'localnbd-');
  const all = await runCli(bin, ['-n', '-e', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'all'), '-I', '127.0.0.1', '-P', '10811', '--ssh-user', 'nobody']);
  assert.equal(all.code, 2, all.stderr);
  assert.deepEqual(all.stderr.match(/^warning: .*$/gm), [`warning: -I, -P, --ssh-user: domain '${dom.name}' runs on this host, whose backup job serves through a unix socket (-f): they apply to domains of another host (-U qemu+ssh://user@host/system) only, and are ignored`]);
  assert.ok((await fs.readdir(path.join(work, 'all'))).includes('vda.copy.data'));
  const port = await runCli(bin, ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'port'), '-P', '10811']);
  assert.equal(port.code, 0, port.stderr);
  assert.match(port.stderr, /^warning: -P: .* it applies to domains of another host .* and is ignored$/m);
  const none = await runCli(bin, ['-n', '-e', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'none')]);
  assert.equal(none.code, 0, none.stderr);
});
