// Which host a libvirt URI names and how ssh reaches it; the port its NBD server takes; remote domains' locks apart from this host's; this host's file moves.
import { test } from 'node:test';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { LOCAL_HOST, SshHost, domainHostOf, keepalivesFor, silenceLimit, sweepControlDirectories, tcpServerOn } from '../../src/libvirt/domainHost.js';
import { shellQuote } from '../../src/util/process.js';
import { checkTcpPort } from '../../src/util/tcpPort.js';
import { domainLockFile } from '../../src/backup/lock.js';
import { OfflineExports } from '../../src/backup/offline.js';
import type { DomainDisk } from '../../src/libvirt/domainXml.js';

/** ssh's arguments without those of the shared connection and the silence limit, which are checked on their own. */
function withoutSharing(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '-o' && /^(Control(Master|Path|Persist)|ConnectTimeout|ServerAlive(Interval|CountMax))=/.test(args[i + 1] ?? '')) i++;
    else out.push(args[i] as string);
  }
  return out;
}

test('local URIs name this host; remote ones the host, with ssh options only from ssh URIs', () => {
  for (const uri of ['qemu:///system', 'qemu+unix:///system', 'qemu:///session', 'not a uri']) assert.equal(domainHostOf(uri), LOCAL_HOST, uri);

  const ssh = domainHostOf('qemu+ssh://backup@kvm1.example:2222/system?keyfile=/root/.ssh/k&no_verify=1');
  assert.ok(ssh instanceof SshHost);
  assert.equal(ssh.remote, true);
  assert.equal(ssh.hostname, 'kvm1.example');
  assert.equal(ssh.label, 'backup@kvm1.example');
  assert.deepEqual(withoutSharing(ssh.sshArgs()), ['-l', 'backup', '-p', '2222', '-i', '/root/.ssh/k',
    '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR', '-o', 'BatchMode=yes', 'kvm1.example', '--']);

  const known = domainHostOf('qemu+ssh://kvm1/system?known_hosts=/etc/backup/known_hosts', 'operator') as SshHost;
  assert.deepEqual(withoutSharing(known.sshArgs()), ['-l', 'operator', '-o', 'UserKnownHostsFile=/etc/backup/known_hosts', '-o', 'BatchMode=yes', 'kvm1', '--']);

  // Another transport's port, parameters and user (a libvirt login) are libvirt's, not ssh's: ssh gets its defaults
  // and the user running this, as Python's --ssh-user (root was taken, whoever ran it).
  const tcp = domainHostOf('qemu+tcp://sasluser@[fd00::5]:16509/system?keyfile=/x') as SshHost;
  assert.equal(tcp.hostname, 'fd00::5');
  assert.deepEqual(withoutSharing(tcp.sshArgs()), ['-l', os.userInfo().username, '-o', 'BatchMode=yes', 'fd00::5', '--']);
});

test('ssh gives up on a host silent for --nbd-timeout: connect timeout, keepalives every quarter of it (1 to 15 s)', () => {
  const limit = (seconds: number): string[] => silenceLimit(seconds).filter((arg) => arg !== '-o');
  assert.deepEqual(limit(300), ['ConnectTimeout=300', 'ServerAliveInterval=15', 'ServerAliveCountMax=20']);
  assert.deepEqual(limit(2), ['ConnectTimeout=2', 'ServerAliveInterval=1', 'ServerAliveCountMax=2']);
  assert.deepEqual(limit(0.5), ['ConnectTimeout=1', 'ServerAliveInterval=1', 'ServerAliveCountMax=1']);
  assert.deepEqual(limit(40), ['ConnectTimeout=40', 'ServerAliveInterval=10', 'ServerAliveCountMax=4']);
  // 0 waits for ever; so do timeouts beyond what ssh holds (it counts milliseconds in an int).
  for (const forever of [0, 1e10, Infinity, NaN]) assert.deepEqual(silenceLimit(forever), [], String(forever));
  // The same keepalives go to a backup's libvirt connection.
  assert.deepEqual(keepalivesFor(3), { interval: 1, count: 3 });
  assert.deepEqual(keepalivesFor(300), { interval: 15, count: 20 });
  assert.equal(keepalivesFor(undefined), undefined);
  assert.equal(keepalivesFor(0), undefined);
  const args = (seconds?: number): string[] => (domainHostOf('qemu+ssh://kvm1/system', undefined, seconds) as SshHost).sshArgs();
  assert.ok(args().includes('ServerAliveCountMax=20'), 'the default is --nbd-timeout\'s, 300 s');
  assert.ok(args(2).includes('ConnectTimeout=2'));
  assert.ok(!args(0).some((arg) => /^(ConnectTimeout|ServerAlive)/.test(arg)));
});

test('ports: -P of backup and restore takes 1 to 65535, virtnbdmap\'s -p 0 too (any free port, which it prints); one check, one line', () => {
  const ssh = domainHostOf('qemu+ssh://root@kvm1.example/system') as SshHost;
  assert.equal(tcpServerOn(ssh, {}).port, 10809);
  for (const port of [1, 65535]) assert.equal(tcpServerOn(ssh, { nbdPort: port }).port, port);
  for (const port of [0, -1, 65536, 1.5, NaN]) {
    assert.throws(() => tcpServerOn(ssh, { nbdPort: port }), { name: 'UserError', message: `-P ${port}: give a TCP port from 1 to 65535` });
  }
  for (const port of [0, 1, 10809, 65535]) assert.equal(checkTcpPort(port, '-p', { anyFree: true }), port);
  for (const port of [-1, 65536, 0.5]) {
    assert.throws(() => checkTcpPort(port, '-p', { anyFree: true }), { message: `-p ${port}: give a TCP port from 1 to 65535, or 0 for any free one` });
  }
});

test("a shut-off domain's disks on another host need a port each from -P on, all within 65535", async () => {
  const ssh = domainHostOf('qemu+ssh://root@kvm1/system') as SshHost;
  const disks = ['vda', 'vdb'].map((target) => ({ target, format: 'qcow2' }) as DomainDisk);
  await assert.rejects(OfflineExports.start(disks, { ssh, host: 'kvm1', firstPort: 65535 }, ''), {
    name: 'UserError',
    message: "-P 65535: the shut-off domain's 2 disks are served on ports 65535 to 65536, past 65535; give -P 65534 or lower",
  });
});

test('remote commands are quoted word by word for the remote shell', () => {
  assert.equal(shellQuote('plain'), "'plain'");
  assert.equal(shellQuote("it's $HOME; rm -rf /"), `'it'\\''s $HOME; rm -rf /'`);
});

test('a domain of another host has a lock of its own: names repeat across hosts; a long name is cut, with a digest', () => {
  assert.notEqual(domainLockFile('webvm', 'kvm1'), domainLockFile('webvm'));
  assert.notEqual(domainLockFile('webvm', 'kvm1'), domainLockFile('webvm', 'kvm2'));
  assert.match(domainLockFile('web/vm', 'kvm1'), /virtnbdbackup\.kvm1\.web%2Fvm\.lock$/);
  // A long name (escaped: 6 bytes a Cyrillic letter) is cut to leave its drafts room in 255 bytes, with a digest.
  const long = 'сервер'.repeat(10);
  for (const file of [domainLockFile(long), domainLockFile(`${long}x`), domainLockFile(long, 'kvm1')]) {
    assert.ok(path.basename(file).length <= 200, file);
    assert.match(path.basename(file), /^virtnbdbackup\.\S+-[0-9a-f]{16}\.lock$/);
  }
  assert.notEqual(domainLockFile(long), domainLockFile(`${long}x`));
  assert.notEqual(domainLockFile(long), domainLockFile(long, 'kvm1'));
});

test('the commands of a run share one ssh connection per host, through a socket in a private directory', () => {
  const host = domainHostOf('qemu+ssh://root@kvm1/system') as SshHost;
  const args = host.sshArgs();
  const path = args.find((a) => a.startsWith('ControlPath='))?.slice('ControlPath='.length) ?? '';
  assert.match(path, new RegExp(`/virtnbd-ssh-${process.pid}-\\w+/%C$`));
  assert.ok(args.includes('ControlMaster=auto') && args.includes('ControlPersist=60'), args.join(' '));
  assert.deepEqual(host.sshArgs(), args, 'the same socket for every command of the host');
  assert.notEqual((domainHostOf('qemu+ssh://root@kvm2/system') as SshHost).sshArgs().find((a) => a.startsWith('ControlPath=')), `ControlPath=${path}`);
});

test('the shared connection directories of runs that died (SIGKILL) are removed by the next run; a live pid\'s are kept', async (t) => {
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-controldirs-'));
  t.after(() => fs.rm(tmp, { recursive: true, force: true }));
  const dead = spawnSync('true').pid as number;
  const names = [`virtnbd-ssh-${dead}-AbC123`, `virtnbd-ssh-${process.pid}-xyz789`, 'virtnbd-ssh-1-qwe456', 'virtnbd-ssh-Zx9Yw8', 'other-dir'];
  for (const name of names) await fs.mkdir(path.join(tmp, name));
  await fs.writeFile(path.join(tmp, names[0] as string, 'left'), '');
  sweepControlDirectories(tmp);
  assert.deepEqual((await fs.readdir(tmp)).sort(), names.slice(1).sort());
});

test('this host renames never over a file that appeared, nor into a directory; createNew never replaces one', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-rename-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const [from, to, folder] = ['from', 'to', 'folder'].map((n) => path.join(dir, n)) as [string, string, string];
  await fs.writeFile(from, 'new image');
  await fs.writeFile(to, 'a file of the user\'s');
  await fs.mkdir(folder);
  await assert.rejects(LOCAL_HOST.rename(from, to), /to already exists; it was left as it is/);
  await assert.rejects(LOCAL_HOST.rename(from, folder), /folder already exists/);
  assert.equal(await fs.readFile(to, 'utf8'), 'a file of the user\'s');
  assert.deepEqual(await fs.readdir(folder), []);
  await fs.rm(to);
  await LOCAL_HOST.rename(from, to);
  assert.equal(await fs.readFile(to, 'utf8'), 'new image');
  assert.deepEqual((await fs.readdir(dir)).sort(), ['folder', 'to']);
  await assert.rejects(LOCAL_HOST.createNew(to, Buffer.from('other')), /EEXIST/);
  assert.equal(await fs.readFile(to, 'utf8'), 'new image');
  assert.deepEqual((await fs.readdir(dir)).sort(), ['folder', 'to'], 'createNew left its partial');
});
