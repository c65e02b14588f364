// virtnbdmap end to end with real clients: sets made by our virtnbdbackup from a running domain (plain full + 2
// incs, and lz4 full + inc), each point mapped and compared bit for bit (qemu-img compare) with our restore of the
// same point; nbdinfo --map; nbdcopy with 4 connections; a second TCG domain booted on a qcow2 overlay whose
// backing file is the export, read through the monitor; writes that leave the backup untouched; clean Ctrl-C;
// one-line errors for bad input; after a server killed with SIGKILL, its socket and overlay cleared by the next,
// and so are the default sockets of servers that are gone; an overlay directory that fills up (ENOSPC to the client, the server serving on);
// a second stop signal that cuts the clean-up short, leaving neither; a write the overlay takes only part of fails;
// Ctrl-C while a large stream is indexed; --tls: the TCP export read bit for bit over TLS with the CA's client
// certificates (libnbd, qemu-img, a qcow2 overlay backed by it), clients without TLS, without a certificate or with another CA's refused, the unix socket plain;
// certificate files missing or unusable refused with one line before anything is served; the warning for a TCP
// export on a non-loopback address without --tls; --tls-psk: libnbd and QEMU with the key read it, a wrong key, an
// unknown user and plain clients refused, a key file missing, malformed or empty refused with one line.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { CONTEXT_ALLOCATION } from '../../src/endpoint/endpoint.js';
import { NbdEndpoint } from '../../src/endpoint/nbd.js';
import { TestDomain, assertPattern, run, withDomain, withTempDir, withTmpfs, type DiskSpec } from '../support/testbed.js';
import { cleanup } from '../support/cleanup.js';
import { errorLines, ourBin, runCli, runOk, startCli, type CliResult } from '../support/cli.js';
import { startMap } from '../support/map.js';
import { withScratchCertificates } from '../support/tls.js';
import { MemoryDisk, craftStream } from '../support/craftedSet.js';
import { encodeHeader } from '../../src/stream/format.js';

const MiB = 1024 * 1024;
const DISK = {
  target: 'vda', sizeMiB: 128,
  fill: [
    { pattern: 'random', offsetMiB: 0, lengthMiB: 8 }, { pattern: 0x11, offsetMiB: 8, lengthMiB: 8 },
    { pattern: 'random', offsetMiB: 16, lengthMiB: 24 }, { pattern: 0x22, offsetMiB: 64, lengthMiB: 4 },
  ],
} as const satisfies DiskSpec;


async function assertSameAs(uri: string, image: string, what: string): Promise<void> {
  const result = await TestDomain.compare(uri, image, { formatA: 'raw' });
  assert.ok(result.identical, `${what}: export differs from our restore: ${result.output}`);
}

/** The one image our restore writes into `out`. */
async function restoreImage(set: string, out: string, until?: string): Promise<string> {
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', ...(until ? ['--until', until] : [])]);
  const image = (await fs.readdir(out)).find((f) => !f.endsWith('.xml'));
  assert.ok(image, `no image restored into ${out}`);
  return path.join(out, image);
}

/** `nbdinfo --map` as [offset, length, flags] rows. */
async function allocationMap(uri: string): Promise<number[][]> {
  const { stdout } = await run('nbdinfo', ['--map', uri]);
  return stdout.trim().split('\n').map((line) => line.trim().split(/\s+/).slice(0, 3).map(Number));
}

function flagsAt(map: number[][], offset: number, length: number): number[] {
  return map.filter(([start, size]) => (start as number) < offset + length && (start as number) + (size as number) > offset).map((row) => row[2] as number);
}

async function hashFiles(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const f of (await fs.readdir(dir)).sort()) {
    const stat = await fs.stat(path.join(dir, f));
    if (stat.isFile()) out.set(f, createHash('sha256').update(await fs.readFile(path.join(dir, f))).digest('hex'));
  }
  return out;
}

test('virtnbdmap serves every point of plain and lz4 sets bit-identically to our restore, to real NBD clients and a booted domain', async (t) => {
  const dom = await withDomain(t, { disks: [DISK] });
  const work = await withTempDir(t, 'vnbd-map-');
  const plain = path.join(work, 'plain');
  const packed = path.join(work, 'lz4');
  const backup = (set: string, level: string, ...extra: string[]): Promise<unknown> =>
    runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', set, '-n', ...extra]);

  await backup(plain, 'full');
  await dom.write('vda', 0x33, '2M', '3M');
  await dom.write('vda', 0x44, '100M', '1M');
  await backup(plain, 'inc');
  await dom.writeZeroes('vda', '64M', '1M');
  await dom.write('vda', 0x55, '120M', '2M');
  await backup(plain, 'inc');
  await backup(packed, 'full', '-z');
  await dom.write('vda', 0x66, '30M', '4M');
  await backup(packed, 'inc', '-z');
  const full = path.join(plain, 'vda.full.data');
  const inc1 = path.join(plain, 'vda.inc.virtnbdbackup.1.data');
  const inc2 = path.join(plain, 'vda.inc.virtnbdbackup.2.data');
  const setHashes = await hashFiles(plain);

  // Full alone, against our restore --until its checkpoint. Without the nbd module, -d /dev/nbd0 only warns.
  const noModule = await fs.access('/sys/module/nbd').then(() => false, () => true);
  const fullMap = await startMap(t, work, 'full', [full], ['-r', ...(noModule ? ['-d', '/dev/nbd0'] : [])]);
  await assertSameAs(fullMap.uris[0], await restoreImage(plain, path.join(work, 'r-full'), 'virtnbdbackup.0'), 'full');
  const info = JSON.parse((await run('nbdinfo', ['--json', fullMap.uris[1]])).stdout) as { exports: Array<{ is_read_only: boolean; 'export-size': number }> };
  assert.deepEqual([info.exports[0]?.is_read_only, info.exports[0]?.['export-size']], [true, 128 * MiB], 'read-only export over TCP');
  const refused = await runCli('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 4k', fullMap.uris[0]]);
  assert.match(refused.stdout + refused.stderr, /read-only|not permitted|Permission denied/i, '-r refuses writes');
  const fullRun = await fullMap.stop();
  if (noModule) assert.match(fullRun.stderr, /nbd kernel module not loaded; serving on nbd\+unix:\/\/\/sda\?socket=\S+ and nbd:\/\/127\.0\.0\.1:\d+\/sda only/);

  // Compressed full + inc: random access through the trailer; many parallel readers.
  const packedMap = await startMap(t, work, 'lz4', [path.join(packed, 'vda.full.data'), path.join(packed, 'vda.inc.virtnbdbackup.1.data')]);
  const packedImage = await restoreImage(packed, path.join(work, 'r-lz4'));
  await assertSameAs(packedMap.uris[0], packedImage, 'lz4 full + inc');
  const copied = path.join(work, 'lz4-copy.raw');
  await run('nbdcopy', ['--connections=4', '--requests=16', packedMap.uris[1], copied]);
  assert.ok((await TestDomain.compare(copied, packedImage, { formatA: 'raw' })).identical, 'nbdcopy of the lz4 export differs');
  await packedMap.stop();

  // The chain full + 2 incs: identical to the restore, holes and zeroed ranges shown as such.
  const chainMap = await startMap(t, work, 'chain', [full, inc1, inc2]);
  const overlays = async (): Promise<string[]> => (await fs.readdir(work)).filter((f) => f.startsWith('virtnbdmap.'));
  assert.equal((await overlays()).length, 1, 'one copy-on-write overlay directory');
  const chainImage = await restoreImage(plain, path.join(work, 'r-chain'));
  await assertSameAs(chainMap.uris[0], chainImage, 'full + 2 incs');
  const map = await allocationMap(chainMap.uris[0]);
  assert.deepEqual(flagsAt(map, 0, 40 * MiB), [0], 'the filled range is data');
  assert.deepEqual(flagsAt(map, 64 * MiB, MiB), [3], 'the range zeroed before inc 2 is hole,zero');
  assert.deepEqual(flagsAt(map, 70 * MiB, 30 * MiB), [3], 'a never-written range is hole,zero');
  const chainCopy = path.join(work, 'chain-copy.raw');
  await run('nbdcopy', ['--connections=4', chainMap.uris[0], chainCopy]);
  assert.ok((await TestDomain.compare(chainCopy, chainImage, { formatA: 'raw' })).identical, 'nbdcopy of the chain export differs');

  // Instant boot: a second TCG domain whose disk is a qcow2 overlay over the export, read through its monitor.
  const booted = await TestDomain.create({ disks: [{ target: 'vda', sizeMiB: 128 }], start: false });
  cleanup(t, () => booted.destroy());
  await fs.chmod(chainMap.socket, 0o666); // QEMU connects as its own user
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', chainMap.uris[0], booted.diskPath('vda'), String(128 * MiB)]);
  await booted.start();
  for (const [pattern, offset, length] of [[0x11, '10M', '1M'], [0x33, '2M', '3M'], [0x44, '100M', '1M'], [0x00, '64M', '1M'], [0x55, '120M', '2M']] as const) {
    await booted.qemuIo('vda', `read -P 0x${pattern.toString(16).padStart(2, '0')} ${offset} ${length}`, /^read \d+\/\d+ bytes/m);
  }
  await booted.destroy();

  // Writes through NBD go to the overlay: visible to the next client, never to the backup files.
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 1M 2M', '-c', 'write -z 120M 1M', chainMap.uris[1]]);
  await assertPattern(chainMap.uris[0], 'raw', 0x99, '1M', '2M');
  await assertPattern(chainMap.uris[0], 'raw', 0x00, '120M', '1M');
  await assertPattern(chainMap.uris[0], 'raw', 0x55, '121M', '1M');
  assert.deepEqual(await hashFiles(plain), setHashes, 'the backup set changed');

  // Ctrl-C with a client still connected: clean exit, socket and overlay gone.
  const client = await NbdEndpoint.open({ socket: chainMap.socket, exportName: 'sda' }, { metaContexts: [CONTEXT_ALLOCATION] });
  cleanup(t, () => client.close());
  const stopped = await chainMap.stop();
  assert.match(stopped.stderr, /disconnecting 1 client/);
  await assert.rejects(fs.access(chainMap.socket), 'socket left behind');
  assert.deepEqual(await overlays(), [], 'overlay left behind');

  // Bad input: one line, exit 1, nothing left behind.
  const bad = async (files: string[], message: RegExp): Promise<void> => {
    const socket = path.join(work, 'bad.sock');
    const logFile = path.join(work, 'bad.log');
    const result = await runCli(ourBin('virtnbdmap'), ['-f', files.join(','), '--socket', socket, '-p', '0', '-d', '', '-L', logFile]);
    assert.equal(result.code, 1, result.stderr);
    assert.deepEqual(errorLines(result).length, 1, result.stderr);
    assert.match(result.stderr, message);
    const logged = (await fs.readFile(logFile, 'utf8')).trim().split('\n');
    assert.match(logged[logged.length - 1], new RegExp(`^\\S+Z ERROR .*${message.source}`), 'the -L log ends with the error');
    await assert.rejects(fs.access(socket));
  };
  await bad([path.join(plain, `vmconfig.virtnbdbackup.0.xml`)], /vmconfig\.virtnbdbackup\.0\.xml is not a usable backup stream/);
  await bad([full, inc2, inc1], /-f is out of chain order/);
  await bad([inc1], /must start with the full or copy backup/);
  await bad([full, inc1, inc1], /vda\.inc\.virtnbdbackup\.1\.data is given twice: give each file once/);
  // A socket path with a space and non-ASCII letters: the printed URI is percent-encoded, so clients parse it.
  const named = await startMap(t, work, 'ü map', [full], ['-r']);
  assert.match(named.uris[0], /socket=\S+\/%C3%BC%20map\.sock$/);
  assert.equal((await run('nbdinfo', ['--size', named.uris[0]])).stdout.trim(), String(128 * MiB));
  await named.stop();
  // A relative --socket: the URI names it whole, so that it reaches the socket from any directory.
  const relative = spawn(ourBin('virtnbdmap'), ['-f', full, '--socket', 'rel.sock', '-p', '0', '-d', '', '-r'], { cwd: work, stdio: ['ignore', 'pipe', 'pipe'] });
  const closed = once(relative, 'close');
  let printed = '';
  for await (const chunk of relative.stdout) if ((printed += String(chunk)).includes('\n')) break;
  assert.equal(new URL(printed.split('\n')[0] as string).searchParams.get('socket'), path.join(work, 'rel.sock'));
  relative.kill('SIGINT');
  await closed;
  // A path longer than the kernel keeps (107 bytes) was bound cut short, elsewhere, and left behind: refused.
  const tooLong = await runCli(ourBin('virtnbdmap'), ['-f', full, '--socket', path.join(work, `${'x'.repeat(120)}.sock`), '-p', '0', '-d', '', '-r']);
  assert.equal(tooLong.code, 1, tooLong.stderr);
  assert.match(tooLong.stderr.trim(), /a unix socket's path may hold at most 107 bytes, this one \d+; choose a shorter one$/);
  // QEMU takes only a power of two as the preferred block size ("server preferred block size 1000 is not valid").
  const odd = await runCli(ourBin('virtnbdmap'), ['-f', full, '-b', '1000']);
  assert.equal(odd.code, 1, odd.stderr);
  assert.match(odd.stderr.trim(), /-b 1000: the block size must be a power of two between 512 and 1 GiB/);
});

test('a virtnbdmap killed (SIGKILL) leaves its socket and overlay: the next one on that socket replaces both; a socket a server answers on is refused', async (t) => {
  const dir = await withTempDir(t, 'vnbd-mapkill-');
  await craftStream({ dir, file: 'vda.full.data', disk: new MemoryDisk(16 * MiB).fill(0x11, 0, 4 * MiB), diskName: 'vda', extents: [{ offset: 0, length: 4 * MiB, kind: 'data' }] });
  const file = path.join(dir, 'vda.full.data');
  const overlays = async (): Promise<string[]> => (await fs.readdir(dir)).filter((f) => /^virtnbdmap\.\d+\./.test(f));

  const first = await startMap(t, dir, 'm', [file]);
  const second = await runCli(ourBin('virtnbdmap'), ['-f', file, '--socket', first.socket, '-p', '0', '-d', '', '--overlay-dir', dir]);
  assert.equal(second.code, 1, second.stderr);
  assert.match(errorLines(second).join('\n'), /m\.sock already exists and a server answers on it \(another virtnbdmap\?\); remove it or choose another --socket$/);
  assert.equal((await run('nbdinfo', ['--size', first.uris[0]])).stdout.trim(), String(16 * MiB), 'the first one still serves');
  // bind() says EACCES for a socket in a directory that does not exist: the line says what is wrong.
  const nowhere = await runCli(ourBin('virtnbdmap'), ['-f', file, '--socket', path.join(dir, 'gone', 'm.sock'), '-p', '0', '-d', '', '--overlay-dir', dir]);
  assert.equal(nowhere.code, 1, nowhere.stderr);
  assert.match(errorLines(nowhere).join('\n'), /: its directory \S+\/gone does not exist; create it or choose another --socket$/);

  await first.kill();
  const orphan = await overlays();
  assert.equal(orphan.length, 1, 'the killed server left its overlay');
  // A read-only map makes no overlay, and removes the orphan all the same (it was left before).
  const readOnly = await startMap(t, dir, 'ro', [file], ['-r']);
  assert.deepEqual(await overlays(), [], 'the orphan overlay was removed');
  assert.match(await fs.readFile(path.join(dir, 'ro.log'), 'utf8'), /removed \S+, the overlay of a virtnbdmap that is gone \(pid \d+\)/);
  await readOnly.stop();
  const next = await startMap(t, dir, 'm', [file]);
  assert.equal((await run('nbdinfo', ['--size', next.uris[0]])).stdout.trim(), String(16 * MiB));
  assert.equal((await overlays()).length, 1);
  const log = await fs.readFile(path.join(dir, 'm.log'), 'utf8');
  assert.match(log, /removed \S+m\.sock, a socket left by a server that is gone/);
  await next.stop();
  assert.deepEqual(await overlays(), []);
});

test('the default sockets (virtnbdmap.<pid>.sock) of servers that are gone are removed by the next one: a killed one\'s, one whose pid now names a later process; a live process\'s and one something listens on are kept', async (t) => {
  const dir = await withTempDir(t, 'vnbd-mapsockets-');
  await craftStream({ dir, file: 'vda.full.data', disk: new MemoryDisk(16 * MiB).fill(0x11, 0, 4 * MiB), diskName: 'vda', extents: [{ offset: 0, length: 4 * MiB, kind: 'data' }] });
  const file = path.join(dir, 'vda.full.data');
  const killed = await startMap(t, dir, 'killed', [file], [], { defaultSocket: true });
  const killedPid = /virtnbdmap\.(\d+)\.sock$/.exec(killed.socket)?.[1] as string;
  assert.equal(killed.socket, `/var/tmp/virtnbdmap.${killedPid}.sock`);
  await killed.kill();
  cleanup(t, () => fs.rm(killed.socket, { force: true }));
  await fs.access(killed.socket);

  // Sockets as a killed server leaves them (bound, nobody listening), beside the next one's --socket.
  await fs.writeFile(path.join(dir, 'bind.py'), 'import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\n');
  const leave = (pid: number | string): Promise<unknown> => run('/usr/bin/python3', [path.join(dir, 'bind.py'), path.join(dir, `virtnbdmap.${pid}.sock`)]);
  const reusedPid = 'later';
  await leave(reusedPid);
  // Its pid now names a process started after it (boot time counts whole seconds: more than one later).
  await new Promise((r) => setTimeout(r, 1500));
  const later = startCli('sleep', ['60']);
  cleanup(t, () => later.child.kill());
  await fs.rename(path.join(dir, `virtnbdmap.${reusedPid}.sock`), path.join(dir, `virtnbdmap.${later.child.pid}.sock`));
  await leave(process.pid); // this test's process, older than the socket
  const listening = path.join(dir, `virtnbdmap.${killedPid}.sock`);
  const server = net.createServer((c) => c.destroy());
  await new Promise<void>((resolve) => server.listen(listening, resolve));
  cleanup(t, () => new Promise((resolve) => server.close(resolve)));

  const next = await startMap(t, dir, 'next', [file]);
  await assert.rejects(fs.access(killed.socket), 'the killed server\'s socket is left');
  await assert.rejects(fs.access(path.join(dir, `virtnbdmap.${later.child.pid}.sock`)), 'the socket of a pid used again is left');
  await fs.access(path.join(dir, `virtnbdmap.${process.pid}.sock`));
  await fs.access(listening);
  const log = await fs.readFile(path.join(dir, 'next.log'), 'utf8');
  assert.match(log, new RegExp(`removed ${killed.socket}, the socket of a virtnbdmap that is gone \\(pid ${killedPid}\\)`));
  await next.stop();
});

test('an overlay directory that fills up: the write that does not fit fails with ENOSPC to the client, the server serves on, earlier writes and the backup read right', async (t) => {
  const dir = await withTempDir(t, 'vnbd-mapfull-');
  await craftStream({ dir, file: 'vda.full.data', disk: new MemoryDisk(32 * MiB).fill(0x11, 0, 16 * MiB), diskName: 'vda', extents: [{ offset: 0, length: 16 * MiB, kind: 'data' }] });
  const overlayDir = await withTmpfs(t, 'vnbd-mapovl-', 'size=4m');
  const map = await startMap(t, dir, 'full', [path.join(dir, 'vda.full.data')], ['--overlay-dir', overlayDir]);
  const qemuIo = (...commands: string[]): Promise<CliResult> => runCli('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), map.uris[0]]);
  assert.equal((await qemuIo('write -P 0x22 0 1M')).code, 0);
  const tooBig = await qemuIo('write -P 0x33 8M 8M');
  assert.notEqual(tooBig.code, 0);
  assert.match(tooBig.stdout + tooBig.stderr, /No space left on device/);
  const read = await qemuIo('read -P 0x22 0 1M', 'read -P 0x11 1M 7M', 'read -P 0 16M 16M');
  assert.equal(read.code, 0, read.stdout + read.stderr);
  assert.doesNotMatch(read.stdout, /Pattern verification failed/);
  const stopped = await map.stop();
  assert.match(stopped.stderr, /warning: NBD WRITE at 8388608\+8388608 failed: ENOSPC/);
  assert.deepEqual(await fs.readdir(overlayDir), []);
});

test('a second stop signal cutting the clean-up short still removes the socket and the overlay (exit 130)', async (t) => {
  const dir = await withTempDir(t, 'vnbd-mapsecond-');
  await craftStream({ dir, file: 'vda.full.data', disk: new MemoryDisk(16 * MiB).fill(0x11, 0, 4 * MiB), diskName: 'vda', extents: [{ offset: 0, length: 4 * MiB, kind: 'data' }] });
  const socket = path.join(dir, 'm.sock');
  const { child, done } = startCli(ourBin('virtnbdmap'), ['-f', path.join(dir, 'vda.full.data'), '--socket', socket, '-p', '0', '-d', '', '-L', path.join(dir, 'm.log'), '--overlay-dir', dir]);
  cleanup(t, () => child.kill('SIGKILL'));
  const overlays = async (): Promise<string[]> => (await fs.readdir(dir)).filter((f) => /^virtnbdmap\.\d+\./.test(f));
  for (let tries = 0; (await overlays()).length === 0 || !(await fs.access(socket).then(() => true, () => false)); tries++) {
    assert.ok(tries < 300 && child.exitCode === null, 'virtnbdmap did not start serving');
    await new Promise((r) => setTimeout(r, 50));
  }
  // Held stopped, two different signals are both pending: the second comes before the first's clean-up can end.
  child.kill('SIGSTOP');
  child.kill('SIGINT');
  child.kill('SIGTERM');
  child.kill('SIGCONT');
  const result = await done;
  assert.equal(result.code, 130, result.stderr);
  assert.match(result.stderr, /error: stopped by a second SIG(INT|TERM) before its clean-up ended/); // either comes first
  // exitNow skipped Node's 'exit' listeners, which remove them (the overlay was left).
  assert.deepEqual(await overlays(), [], 'overlay left behind');
  await assert.rejects(fs.access(socket), 'socket left behind');
});

test('a write the overlay takes only part of (its file system filling up within a 64 KiB block) fails to the client, never acknowledged half-kept', async (t) => {
  const dir = await withTempDir(t, 'vnbd-mapshort-');
  await craftStream({ dir, file: 'vda.full.data', disk: new MemoryDisk(16 * MiB).fill(0x11, 0, 16 * MiB), diskName: 'vda', extents: [{ offset: 0, length: 16 * MiB, kind: 'data' }] });
  // 1025 pages: the 65th block copied into the overlay fits its first page only (the write took 4 KiB of 64).
  const overlayDir = await withTmpfs(t, 'vnbd-mapshortovl-', 'size=4100k');
  const map = await startMap(t, dir, 'full', [path.join(dir, 'vda.full.data')], ['--overlay-dir', overlayDir]);
  const client = await NbdEndpoint.open({ socket: map.socket, exportName: 'sda' });
  cleanup(t, () => client.close());
  const written = Buffer.alloc(4096, 0x22);
  const acknowledged: number[] = [];
  for (let block = 0; block < 80; block++) {
    const at = block * 64 * 1024 + 32 * 1024; // past the block's first page
    await client.write(written, at).then(() => acknowledged.push(at), () => undefined);
  }
  assert.ok(acknowledged.length >= 60 && acknowledged.length < 80, `${acknowledged.length} of 80 writes acknowledged`);
  const read = Buffer.alloc(4096);
  for (const at of acknowledged) {
    await client.read(read, at);
    assert.ok(read.equals(written), `the write at ${at} was acknowledged, and not kept`);
  }
  await client.close();
  await map.stop();
});

test('Ctrl-C while the files are indexed stops at once (130), printing no URIs and leaving nothing', async (t) => {
  const dir = await withTempDir(t, 'vnbd-mapindex-');
  // 200,000 frames, one read each to index: seconds here (8 s for these), as a large set's many extents take.
  const frames = 200_000;
  const meta = Buffer.from(JSON.stringify({
    virtualSize: frames * 4096, dataSize: 0, date: '2026-11-29T08:00:00', diskName: 'vda', diskFormat: 'qcow2', checkpointName: 'virtnbdbackup.0',
    compressed: false, compressionMethod: 'lz4', parentCheckpoint: '', incremental: false, streamVersion: 2,
  }));
  const file = path.join(dir, 'vda.full.data');
  await fs.writeFile(file, Buffer.concat([
    encodeHeader('meta', 0, meta.length), meta, Buffer.from('\r\n'),
    ...Array.from({ length: frames }, (_, i) => encodeHeader('zero', i * 4096, 512)), encodeHeader('stop', 0, 0),
  ]));
  const socket = path.join(dir, 'm.sock');
  const { child, done } = startCli(ourBin('virtnbdmap'), ['-f', file, '--socket', socket, '-p', '0', '-d', '', '-L', path.join(dir, 'm.log'), '--overlay-dir', dir]);
  cleanup(t, () => child.kill('SIGKILL'));
  await new Promise((resolve) => setTimeout(resolve, 1000));
  assert.equal(child.exitCode, null, 'it ended before the signal');
  const signalled = Date.now();
  child.kill('SIGINT');
  const result = await done;
  // It went on indexing to the end, then served (URIs printed) and stopped with 0.
  assert.ok(Date.now() - signalled < 3000, `it took ${Date.now() - signalled} ms to stop`);
  assert.deepEqual([result.code, result.stdout], [130, ''], result.stderr);
  assert.match(result.stderr, /error: interrupted by SIGINT/);
  assert.deepEqual((await fs.readdir(dir)).filter((f) => f.startsWith('virtnbdmap.') || f.endsWith('.sock')), []);
});

test('virtnbdmap --tls: the TCP export serves only TLS clients with a certificate of its CA, bit for bit; plain clients, none or another CA\'s certificate refused; the unix socket plain', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 32, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 6 }, { pattern: 0x11, offsetMiB: 20, lengthMiB: 2 }] }] });
  const work = await withTempDir(t, 'vnbd-maptls-');
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  const image = await restoreImage(set, path.join(work, 'restored'));
  const certs = await withScratchCertificates(t);

  const map = await startMap(t, work, 'tls', [path.join(set, 'vda.full.data')], ['-r', '--tls', '--tls-cert', certs.server]);
  assert.match(map.uris[1], /^nbds:\/\/127\.0\.0\.1:\d+\/sda$/, 'the TCP URI says TLS');
  const withCerts = (dir: string): string => `${map.uris[1]}?tls-certificates=${dir}`;
  assert.equal((await run('nbdinfo', ['--size', withCerts(certs.client)])).stdout.trim(), String(32 * MiB));
  const copied = path.join(work, 'tls-copy.raw');
  await run('nbdcopy', ['--connections=4', withCerts(certs.client), copied]);
  assert.ok((await TestDomain.compare(copied, image, { formatA: 'raw' })).identical, 'the export read over TLS differs from our restore');
  // QEMU as the client (instant boot on another host): its own TLS credentials object, the same files.
  const port = Number(new URL(map.uris[1]).port);
  const qemuTls = ['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${certs.client}`];
  const overTls = `json:${JSON.stringify({ driver: 'raw', file: { driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: String(port) }, export: 'sda', 'tls-creds': 'tls0' } })}`;
  const compared = await runCli('qemu-img', ['compare', ...qemuTls, overTls, image]);
  assert.equal(compared.code, 0, `qemu-img compare over TLS: ${compared.stdout}${compared.stderr}`);
  // A qcow2 overlay whose backing file is the export over TLS, as the README shows for instant boot.
  const overlay = path.join(work, 'boot.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', ...qemuTls, '-F', 'raw', '-b', overTls, overlay, String(32 * MiB)]);
  const through = await runCli('qemu-io', [...qemuTls, '-c', 'read -P 0x11 20M 2M', '-c', 'write -P 0x77 0 1M', '-c', 'read -P 0x77 0 1M', '-c', 'read -P 0 24M 8M', overlay]);
  assert.equal(through.code, 0, through.stdout + through.stderr);
  assert.doesNotMatch(through.stdout, /Pattern verification failed/);

  // Without TLS: NBD_REP_ERR_TLS_REQD to libnbd, a hang-up to qemu-img (NBD_OPT_EXPORT_NAME has no error reply).
  const plain = await runCli('nbdinfo', ['--size', map.uris[1].replace(/^nbds:/, 'nbd:')]);
  assert.notEqual(plain.code, 0, 'a client without TLS read the export');
  assert.match(plain.stderr, /TLS/, plain.stderr);
  const qemuPlain = await runCli('qemu-img', ['info', map.uris[1].replace(/^nbds:/, 'nbd:')]);
  assert.notEqual(qemuPlain.code, 0, 'qemu-img without TLS read the export');
  // TLS without a client certificate, and with one of another CA: the handshake fails.
  const caOnly = path.join(work, 'ca-only');
  await fs.mkdir(caOnly);
  await fs.copyFile(path.join(certs.client, 'ca-cert.pem'), path.join(caOnly, 'ca-cert.pem'));
  // A certificate of our CA for another purpose (the server's own, serverAuth only): the server's check refuses it.
  const wrongPurpose = path.join(work, 'wrong-purpose');
  await fs.mkdir(wrongPurpose);
  await fs.copyFile(path.join(certs.server, 'ca-cert.pem'), path.join(wrongPurpose, 'ca-cert.pem'));
  await fs.copyFile(path.join(certs.server, 'server-cert.pem'), path.join(wrongPurpose, 'client-cert.pem'));
  await fs.copyFile(path.join(certs.server, 'server-key.pem'), path.join(wrongPurpose, 'client-key.pem'));
  for (const [dir, what] of [[caOnly, 'no client certificate'], [certs.stranger, "another CA's client certificate"], [wrongPurpose, 'a server certificate']] as const) {
    const refused = await runCli('nbdinfo', ['--size', withCerts(dir)]);
    assert.notEqual(refused.code, 0, `a client with ${what} read the export`);
  }
  // The unix socket, reachable through the file system only, stays plain.
  assert.equal((await run('nbdinfo', ['--size', map.uris[0]])).stdout.trim(), String(32 * MiB));

  const stopped = await map.stop();
  assert.match(stopped.stderr, /warning: NBD client refused: 127\.0\.0\.1:\d+ did not start TLS, which this export requires \(--tls\)/);
  // Without a certificate, and with another CA's (which a client does not offer to a server asking for our CA's).
  assert.equal(stopped.stderr.match(/warning: NBD client dropped: TLS handshake with 127\.0\.0\.1:\d+ failed: it showed no client certificate signed by the CA of --tls-cert/g)?.length, 2, stopped.stderr);
  assert.match(stopped.stderr, /warning: NBD client dropped: TLS handshake with 127\.0\.0\.1:\d+ failed: its certificate was refused: INVALID_PURPOSE/);
  assert.doesNotMatch(stopped.stderr, /unencrypted and without authentication/, 'no warning on 127.0.0.1');
});

test('virtnbdmap --tls refuses missing or unusable certificate files with one line naming them, before anything is served; a non-loopback TCP export without --tls is warned about', async (t) => {
  const dir = await withTempDir(t, 'vnbd-maptlsfiles-');
  await craftStream({ dir, file: 'vda.full.data', disk: new MemoryDisk(16 * MiB).fill(0x11, 0, 4 * MiB), diskName: 'vda', extents: [{ offset: 0, length: 4 * MiB, kind: 'data' }] });
  const file = path.join(dir, 'vda.full.data');
  const certs = await withScratchCertificates(t);
  const socket = path.join(dir, 'm.sock');
  const refused = async (certDir: string, message: RegExp): Promise<void> => {
    const result = await runCli(ourBin('virtnbdmap'), ['-f', file, '--socket', socket, '-p', '0', '-d', '', '--overlay-dir', dir, '-L', path.join(dir, 'm.log'), '--tls', '--tls-cert', certDir]);
    assert.equal(result.code, 1, result.stderr);
    assert.deepEqual(errorLines(result).length, 1, result.stderr);
    assert.match(result.stderr, message);
    assert.equal(result.stdout, '', 'URIs printed');
    await assert.rejects(fs.access(socket), 'socket created');
    assert.deepEqual((await fs.readdir(dir)).filter((f) => f.startsWith('virtnbdmap.')), [], 'overlay created');
  };
  for (const missing of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) {
    const partial = path.join(dir, `without-${missing}`);
    await fs.cp(certs.server, partial, { recursive: true });
    await fs.rm(path.join(partial, missing));
    await refused(partial, new RegExp(`error: --tls: ${partial}/${missing} is missing or unreadable; give the directory holding ca-cert\\.pem .*server-cert\\.pem and server-key\\.pem with --tls-cert$`, 'm'));
  }
  // The default directory is /etc/pki/qemu, as for backups: a machine without it names its file.
  const noDefault = await fs.access('/etc/pki/qemu/ca-cert.pem').then(() => false, () => true);
  if (noDefault) {
    const result = await runCli(ourBin('virtnbdmap'), ['-f', file, '--socket', socket, '-p', '0', '-d', '', '-r', '--tls']);
    assert.equal(result.code, 1, result.stderr);
    assert.match(result.stderr, /error: --tls: \/etc\/pki\/qemu\/ca-cert\.pem is missing or unreadable/);
  }
  const garbled = path.join(dir, 'garbled');
  await fs.cp(certs.server, garbled, { recursive: true });
  await fs.copyFile(path.join(certs.client, 'client-key.pem'), path.join(garbled, 'server-key.pem'));
  await refused(garbled, /error: --tls: the certificates in \S+\/garbled cannot be used \(.+\); ca-cert\.pem, server-cert\.pem, server-key\.pem must be PEM files, the key that of server-cert\.pem$/m);

  // On every address without --tls: a warning; with --tls, none.
  const open = await startMap(t, dir, 'open', [file], ['-r', '-l', '0.0.0.0']);
  assert.match((await open.stop()).stderr, /warning: the TCP export on 0\.0\.0\.0:\d+ is served to anyone who reaches it, unencrypted and without authentication: give --tls \(certificates in --tls-cert\) or --tls-psk, or listen on 127\.0\.0\.1/);
  const secured = await startMap(t, dir, 'secured', [file], ['-r', '-l', '0.0.0.0', '--tls', '--tls-cert', certs.server]);
  assert.match(secured.uris[1], /^nbds:\/\/0\.0\.0\.0:\d+\/sda$/);
  assert.doesNotMatch((await secured.stop()).stderr, /unencrypted/);
});

test('virtnbdmap --tls-psk: clients with a key of the file (libnbd, QEMU) read the export; a wrong key, an unknown user, no TLS refused; a key file missing, malformed or empty is one line', async (t) => {
  const dir = await withTempDir(t, 'vnbd-mappsk-');
  const disk = new MemoryDisk(16 * MiB).fill(0x11, 0, 4 * MiB).fill(0x5a, 9 * MiB, MiB);
  await craftStream({ dir, file: 'vda.full.data', disk, diskName: 'vda', extents: [{ offset: 0, length: 4 * MiB, kind: 'data' }, { offset: 9 * MiB, length: MiB, kind: 'data' }] });
  const file = path.join(dir, 'vda.full.data');
  const key = (): string => randomBytes(32).toString('hex');
  const keys = path.join(dir, 'keys.psk');
  await fs.writeFile(keys, `alice:${key()}\nbob:${key()}\n`);
  const aliceLine = (await fs.readFile(keys, 'utf8')).split('\n')[0] as string;
  const qemuDir = path.join(dir, 'qemu');
  await fs.mkdir(qemuDir);
  await fs.writeFile(path.join(qemuDir, 'keys.psk'), `${aliceLine}\n`); // qemu's tls-creds-psk reads DIR/keys.psk
  const wrong = path.join(dir, 'wrong.psk');
  await fs.writeFile(wrong, `alice:${key()}\n`);
  const stranger = path.join(dir, 'stranger.psk');
  await fs.writeFile(stranger, `carol:${key()}\n`);

  const map = await startMap(t, dir, 'psk', [file], ['-r', '--tls-psk', keys]);
  assert.match(map.uris[1], /^nbds:\/\/127\.0\.0\.1:\d+\/sda$/);
  // libnbd takes the user name from the URI.
  const asUser = (user: string, pskFile: string): string => `${map.uris[1].replace('nbds://', `nbds://${user}@`)}?tls-psk-file=${pskFile}`;
  const copied = path.join(dir, 'copy.raw');
  await run('nbdcopy', [asUser('alice', keys), copied]);
  assert.ok((await fs.readFile(copied)).equals(disk.bytes), 'the export read with a pre-shared key differs from the disk');
  assert.equal((await run('nbdinfo', ['--size', asUser('bob', keys)])).stdout.trim(), String(16 * MiB), 'the second key of the file');
  const port = Number(new URL(map.uris[1]).port);
  const overTls = `json:${JSON.stringify({ driver: 'raw', file: { driver: 'nbd', server: { type: 'inet', host: '127.0.0.1', port: String(port) }, export: 'sda', 'tls-creds': 'tls0' } })}`;
  const qemu = await runCli('qemu-io', ['-r', '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${qemuDir},username=alice`, '-c', 'read -P 0x11 0 4M', '-c', 'read -P 0x5a 9M 1M', '-c', 'read -P 0 10M 6M', overTls]);
  assert.equal(qemu.code, 0, qemu.stdout + qemu.stderr);
  assert.doesNotMatch(qemu.stdout, /Pattern verification failed/);

  for (const [user, pskFile, what] of [['alice', wrong, 'a wrong key'], ['carol', stranger, 'an unknown user']] as const) {
    assert.notEqual((await runCli('nbdinfo', ['--size', asUser(user, pskFile)])).code, 0, `a client with ${what} read the export`);
  }
  const plain = await runCli('nbdinfo', ['--size', map.uris[1].replace(/^nbds:/, 'nbd:')]);
  assert.notEqual(plain.code, 0, 'a client without TLS read the export');
  const stopped = await map.stop();
  assert.equal(stopped.stderr.match(/warning: NBD client dropped: TLS handshake with 127\.0\.0\.1:\d+ failed: its user name or key is not one of --tls-psk's$/gm)?.length, 2, stopped.stderr);
  assert.match(stopped.stderr, /warning: NBD client refused: 127\.0\.0\.1:\d+ did not start TLS, which this export requires \(--tls-psk\)/);

  const socket = path.join(dir, 'bad.sock');
  const refused = async (pskFile: string, message: RegExp): Promise<void> => {
    const result = await runCli(ourBin('virtnbdmap'), ['-f', file, '--socket', socket, '-p', '0', '-d', '', '-r', '-L', path.join(dir, 'bad.log'), '--tls-psk', pskFile]);
    assert.equal(result.code, 1, result.stderr);
    assert.deepEqual(errorLines(result).length, 1, result.stderr);
    assert.match(result.stderr, message);
    await assert.rejects(fs.access(socket), 'socket created');
  };
  await refused(path.join(dir, 'none.psk'), /error: --tls-psk: \S+\/none\.psk is missing or unreadable; give a file of username:hexkey lines \(psktool -u NAME -p FILE writes one\)$/m);
  const malformed = path.join(dir, 'malformed.psk');
  await fs.writeFile(malformed, `${aliceLine}\nbob ${key()}\n`);
  await refused(malformed, /error: --tls-psk: line 2 of \S+\/malformed\.psk is not username:hexkey \(as psktool writes them\)$/m);
  const empty = path.join(dir, 'empty.psk');
  await fs.writeFile(empty, '\n');
  await refused(empty, /error: --tls-psk: \S+\/empty\.psk holds no key/);
});
