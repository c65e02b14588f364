// Integration test of the native addon against real peers: qemu-nbd (libnbd), python3 zlib/lz4 (checksums and
// frames), and libvirtd at qemu:///system (a throwaway domain that is always destroyed and undefined).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { inspect } from 'node:util';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmod, open, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  native,
  VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE,
  VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY,
  VIR_DOMAIN_JOB_OPERATION_BACKUP,
  VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
  VIR_ERR_NO_DOMAIN,
  type LibvirtDomain,
  type NativeError,
  type NbdHandle,
} from '../../src/native/addon.js';
import { DomainPower } from '../../src/backup/domainPower.js';
import { NbdEndpoint } from '../../src/endpoint/nbd.js';
import { qemuImgExtents } from '../../src/backup/extentSources.js';
import { UserError } from '../../src/util/errors.js';
import { listensAt, stopServer } from '../../src/util/process.js';
import { ReadAhead } from '../../src/util/fileIo.js';
import { Logger } from '../../src/util/log.js';
import { anonHugeKiB, hugePagesOffered } from '../support/cli.js';
import { tempDir as scratchDir } from '../support/testbed.js';

const MiB = 1024 * 1024;
const addon = native();

/** Runs a command to completion; rejects with its stderr when it exits non-zero. */
function run(cmd: string, args: string[], input?: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(Buffer.concat(out));
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${Buffer.concat(err).toString()}`));
    });
    // A command that does not read its input may exit before it is written (EPIPE): its exit code decides.
    child.stdin.on('error', () => undefined);
    child.stdin.end(input ?? Buffer.alloc(0));
  });
}

/** The python3 that has the lz4 module (Debian's python3-lz4 lives in /usr/bin/python3, not in a pyenv). */
const python = ['/usr/bin/python3', 'python3'].find(
  (p) => spawnSync(p, ['-c', 'import lz4.frame'], { stdio: 'ignore' }).status === 0,
);

function py(script: string, input: Buffer): Promise<string> {
  assert.ok(python, 'no python3 with the lz4 module (apt-get install python3-lz4)');
  return run(python, ['-c', script], input).then((b) => b.toString().trim());
}

/** A scratch dir QEMU run by libvirt may use too, named for this process so that a later sweep removes it should this run die. */
function tempDir(): Promise<string> {
  return scratchDir('native-');
}

/** qemu-io writes: the first MiB is 0x11 data, [2M, 3M) an explicit zero cluster, the rest unallocated. */
async function makeImage(dir: string, size: string): Promise<string> {
  const image = path.join(dir, 'disk.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', image, size]);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -z 2M 1M', image]);
  return image;
}

/**
 * Waits until a server listens on `socket`, as spawnServer does: its file appears at bind(), before listen(), and a
 * connect in between is refused. Such a refusal failed a test at once, and its stop() then sent qemu-nbd a SIGTERM
 * that it dropped (see stop): the test hung.
 */
async function waitForSocket(socket: string, child?: ChildProcess): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (child && child.exitCode !== null) throw new Error(`server exited ${child.exitCode} before ${socket} appeared`);
    const st = await stat(socket).catch(() => undefined);
    if (st?.isSocket() && (await listensAt(socket))) return;
    await sleep(50);
  }
  throw new Error(`${socket} did not appear`);
}

async function serve(image: string, socket: string, extra: string[] = []): Promise<ChildProcess> {
  const child = spawn('qemu-nbd', ['-k', socket, '-f', 'qcow2', '-x', 'vda', '--cache=none', ...extra, image], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  await waitForSocket(socket, child);
  return child;
}

/**
 * stopServer: SIGTERM until the server is gone, SIGKILL after 5 s. qemu-nbd drops a SIGTERM that comes before its
 * main loop runs (it opens the image after it listens, then sets its state to running over the terminate its
 * handler set), so waiting for the exit after one SIGTERM may wait for ever.
 */
function stop(child: ChildProcess): Promise<void> {
  return stopServer(child);
}

/** Flags of the extent covering `at` in a flat [len, flags, ...] list starting at `start`. */
function flagsAt(extents: number[], start: number, at: number): number | undefined {
  let pos = start;
  for (let i = 0; i < extents.length; i += 2) {
    if (at < pos + extents[i]) return extents[i + 1];
    pos += extents[i];
  }
  return undefined;
}

function isNativeError(library: string, code?: number) {
  return (err: unknown): boolean => {
    const e = err as NativeError;
    assert.ok(e instanceof Error, 'an Error');
    assert.equal(e.library, library);
    if (code !== undefined) assert.equal(e.code, code);
    else assert.equal(typeof e.code, 'number');
    return true;
  };
}

async function withServer(size: string, extra: string[], body: (image: string, socket: string, server: ChildProcess) => Promise<void>) {
  const dir = await tempDir();
  let server: ChildProcess | undefined;
  try {
    const image = await makeImage(dir, size);
    const socket = path.join(dir, 'nbd.sock');
    server = await serve(image, socket, extra);
    await body(image, socket, server);
  } finally {
    if (server) await stop(server);
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * A TCP port on 127.0.0.1 whose connects get no answer: its listener never accepts, and its queue (backlog 0) is
 * already full, so the kernel drops new SYNs, as a host that is down or filtered would.
 */
async function withSilentHost(body: (port: number) => Promise<void>): Promise<void> {
  const script = [
    'import socket, sys',
    'listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(0)',
    'filler = socket.create_connection(listener.getsockname())',
    'print(listener.getsockname()[1], flush=True)',
    'sys.stdin.read()',
  ].join('\n');
  const host = spawn('/usr/bin/python3', ['-c', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  try {
    const port = await new Promise<number>((resolve, reject) => {
      host.stdout?.once('data', (line: Buffer) => resolve(Number(line.toString().trim())));
      host.once('exit', (code) => reject(new Error(`the silent host exited (${code})`)));
    });
    await body(port);
  } finally {
    host.kill();
  }
}

test('versions() names every library', () => {
  const v = addon.versions();
  assert.match(v.libnbd, /^\d+\.\d+\.\d+/);
  assert.match(v.libvirt, /^\d+\.\d+\.\d+$/);
  assert.match(v.lz4, /^\d+\.\d+\.\d+$/);
  assert.match(v.zlib, /^\d+\.\d+/);
});

test('a qemu-nbd stopped as soon as it listens, while it still opens its image, ends at once and cleanly (one SIGTERM then is dropped)', async () => {
  const dir = await tempDir();
  try {
    const image = await makeImage(dir, '64M');
    for (let i = 0; i < 3; i++) {
      const socket = path.join(dir, `early${i}.sock`);
      const server = spawn('qemu-nbd', ['-k', socket, '-f', 'qcow2', '-x', 'vda', '--cache=none', '-e', '4', '-t', image], { stdio: ['ignore', 'ignore', 'inherit'] });
      // Polled every millisecond, not as waitForSocket does: it listens a few ms before its main loop runs.
      for (let n = 0; n < 5000 && server.exitCode === null && !(await listensAt(socket)); n++) await sleep(1);
      const started = Date.now();
      await stop(server);
      assert.equal(server.exitCode, 0, `qemu-nbd ended by ${server.signalCode ?? `exit ${server.exitCode}`}, not by a SIGTERM`);
      assert.ok(Date.now() - started < 3000, `qemu-nbd took ${Date.now() - started} ms to stop`);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('NbdHandle against qemu-nbd', async () => {
  await withServer('64M', [], async (_image, socket) => {
    const h = new addon.NbdHandle();
    await h.connectUnix(socket, 'vda', ['base:allocation']);
    assert.equal(h.getSize(), 64 * MiB);
    assert.equal(h.canMetaContext('base:allocation'), true);
    assert.equal(h.canMetaContext('qemu:dirty-bitmap:none'), false);
    assert.equal(h.isReadOnly(), false);
    assert.equal(h.canZero(), true);
    assert.equal(h.canFlush(), true);
    assert.ok(h.getMaxBlockSize() > 0, 'qemu-nbd states a maximum request size');
    assert.equal(h.canMultiConn(), false, 'qemu-nbd with the default -e 1 does not advertise multi-conn');

    const extents = await h.blockStatus(0, h.getSize(), 'base:allocation');
    assert.ok(extents.length >= 2 && extents.length % 2 === 0);
    assert.ok(extents.every((n) => Number.isInteger(n) && n >= 0));
    assert.equal(flagsAt(extents, 0, 0), 0, 'first MiB is data');
    assert.equal(flagsAt(extents, 0, 1 * MiB), 3, 'unallocated is hole|zero');
    assert.equal((flagsAt(extents, 0, 2 * MiB) ?? 0) & 2, 2, 'written zeroes read as zero');
    const tail = await h.blockStatus(3 * MiB, MiB, 'base:allocation');
    assert.ok(tail[0] > 0 && tail[0] <= MiB, 'answers for at most the requested length');

    const data = Buffer.alloc(MiB);
    await h.pread(data, 0);
    assert.ok(data.every((b) => b === 0x11));

    // Larger than the server's 32 MiB limit: the addon splits it.
    const big = Buffer.alloc(40 * MiB, 0xff);
    await h.pread(big, 0);
    assert.ok(big.subarray(0, MiB).every((b) => b === 0x11));
    assert.ok(big.subarray(MiB).every((b) => b === 0));

    const written = randomBytes(64 * 1024);
    await h.pwrite(written, 5 * MiB + 512);
    const back = Buffer.alloc(written.length);
    await h.pread(back, 5 * MiB + 512);
    assert.deepEqual(back, written);

    await h.zero(5 * MiB, MiB, false);
    await h.pread(back, 5 * MiB + 512);
    assert.ok(back.every((b) => b === 0));
    if (h.canTrim()) await h.trim(6 * MiB, MiB);
    await h.flush();

    await assert.rejects(h.blockStatus(h.getSize(), 4096, 'base:allocation'), isNativeError('libnbd'));
    await assert.rejects(h.pread(Buffer.alloc(4096), h.getSize()), isNativeError('libnbd'));
    await assert.rejects(h.pread('x' as unknown as Buffer, 0), TypeError);

    await h.close();
    await h.close();
    await assert.rejects(h.pread(Buffer.alloc(512), 0), /closed/);
  });
});

test('NbdHandle.preadSummed reads like pread and sums like checksumPiece', async () => {
  await withServer('64M', [], async (_image, socket) => {
    const h = new addon.NbdHandle();
    await h.connectUnix(socket, 'vda', []);
    try {
      await h.pwrite(randomBytes(3 * MiB + 777), 4 * MiB + 123);
      // Slices that do not divide the buffer, a buffer above the server's 32 MiB limit, and an odd tail.
      for (const [offset, length, request] of [[0, 8 * MiB, 512 * 1024], [MiB - 5, 3 * MiB + 9, 1000 * 1000], [0, 40 * MiB, 64 * MiB]] as const) {
        const expected = Buffer.alloc(length);
        await h.pread(expected, offset);
        const buffer = Buffer.alloc(length, 0xee);
        const sums = await h.preadSummed(buffer, offset, request, true, 'blake3');
        assert.ok(buffer.equals(expected), `preadSummed(${offset}, ${length}) reads what pread reads`);
        assert.deepEqual(sums, await addon.checksumPiece(expected, 'blake3'), `sums of ${length} bytes in ${request}-byte requests`);
        assert.deepEqual(await h.preadSummed(buffer, offset, request, true), { adler32: sums.adler32 }, 'no digest unless asked');
        assert.deepEqual(await h.preadSummed(buffer, offset, request, false, 'blake3'), { adler32: 1, digest: sums.digest }, 'no adler32 unless asked');
      }
      await assert.rejects(h.preadSummed(Buffer.alloc(4096), 0, 0, true), TypeError);
      await assert.rejects(h.preadSummed(Buffer.alloc(4096), 0, 4096, true, 'sha256' as 'blake3'), TypeError);
      await assert.rejects(h.preadSummed(Buffer.alloc(4096), h.getSize(), 4096, true), isNativeError('libnbd'));
    } finally {
      await h.close();
    }
  });
});

/** nbdkit's pattern plugin (each 8-byte word holds its offset, big-endian) whose reads fail with EIO while `trigger` exists. */
async function withFailingServer(body: (socket: string, trigger: string) => Promise<void>): Promise<void> {
  const dir = await tempDir();
  const socket = path.join(dir, 'nbd.sock');
  const trigger = path.join(dir, 'fail-reads');
  const args = ['--foreground', '--exit-with-parent', '-U', socket, '--filter=error', 'pattern', '64M', 'error-pread=EIO', 'error-pread-rate=1', `error-pread-file=${trigger}`];
  const server = spawn('nbdkit', args, { stdio: 'ignore' });
  try {
    for (let i = 0; i < 100 && !(await stat(socket).catch(() => undefined)); i++) await sleep(50);
    await body(socket, trigger);
  } finally {
    server.kill();
    await rm(dir, { recursive: true, force: true });
  }
}

function patternAt(offset: number, length: number): Buffer {
  const words = Buffer.alloc(length + 16);
  const first = Math.floor(offset / 8) * 8;
  for (let at = 0; at < words.length; at += 8) words.writeBigUInt64BE(BigInt(first + at), at);
  return words.subarray(offset - first, offset - first + length);
}

test('NbdHandle.preadSummed keeps requests in flight: a failing one settles the rest first, and the connection reads on', async () => {
  await withFailingServer(async (socket, trigger) => {
    const h = new addon.NbdHandle();
    await h.connectUnix(socket, '', []);
    try {
      const size = h.getSize();
      const readsRight = async (offset: number, length: number): Promise<void> => {
        const buffer = Buffer.alloc(length, 0xee);
        const sums = await h.preadSummed(buffer, offset, 256 * 1024, true, 'blake3');
        assert.ok(buffer.equals(patternAt(offset, length)), `${length} bytes at ${offset}`);
        assert.deepEqual(sums, await addon.checksumPiece(buffer, 'blake3'));
      };
      // The fifth request lies beyond the end: libnbd refuses to send it while four are in flight.
      await assert.rejects(h.preadSummed(Buffer.alloc(2 * MiB), size - MiB, 256 * 1024, true), isNativeError('libnbd'));
      await readsRight(size - 4 * MiB, 4 * MiB);
      // The server fails every read: the first failure is the answer, the requests sent after it are retired.
      await writeFile(trigger, '');
      await assert.rejects(h.preadSummed(Buffer.alloc(8 * MiB), 0, 256 * 1024, true, 'blake3'), isNativeError('libnbd', 5));
      await rm(trigger);
      await readsRight(3 * MiB + 8, 8 * MiB - 24);
      // Many pieces on one connection at once take turns and each gets its own bytes.
      await Promise.all(Array.from({ length: 8 }, (_, i) => readsRight(i * 5 * MiB + 512, 4 * MiB + 4096)));
    } finally {
      await h.close();
    }
  });
});

test('NbdHandle connect failures reject with errno', async () => {
  const h = new addon.NbdHandle();
  await assert.rejects(h.connectUnix('/nonexistent/virtnbd.sock', 'vda', []), isNativeError('libnbd', 2));
  assert.throws(() => h.getSize(), /not connected/);
  await h.close();
});

test('NbdEndpoint with a stall timeout: a server that stops answering (SIGSTOP) fails reads, writes and connects with one error naming it, and so does a TCP connect with no answer; cut() ends a connection', async () => {
  await withServer('64M', ['-e', '4', '-t'], async (_image, socket, child) => {
    const server = child.pid as number;
    const stalled = (err: unknown): boolean => {
      assert.ok(err instanceof UserError, `a UserError: ${String(err)}`);
      assert.equal(err.message, `NBD export ${socket} (export vda) answered nothing for 1 s (a hung host, network or storage?); its connections were cut: check the host, or raise --nbd-timeout (0 waits forever)`);
      return true;
    };
    const endpoint = await NbdEndpoint.open({ socket, exportName: 'vda' }, { connections: 2, stallTimeout: 1 });
    const buffer = Buffer.alloc(MiB);
    try {
      await endpoint.read(buffer, 0);
      process.kill(server, 'SIGSTOP');
      await Promise.all([
        assert.rejects(endpoint.read(buffer, 0), stalled),
        assert.rejects(endpoint.write(buffer, MiB), stalled),
      ]);
      await assert.rejects(endpoint.read(buffer, 0), stalled, 'every later request fails the same way');
      await assert.rejects(NbdEndpoint.open({ socket, exportName: 'vda' }, { stallTimeout: 1 }), stalled, 'a connect that gets no greeting');
    } finally {
      process.kill(server, 'SIGCONT');
      await endpoint.close();
    }
    const again = await NbdEndpoint.open({ socket, exportName: 'vda' }, { stallTimeout: 1 });
    await again.read(buffer, 0);
    await again.close();
    // A timeout beyond what Node's timers hold (--nbd-timeout 1e10) waits, where such a timer would fire at once.
    const patient = await NbdEndpoint.open({ socket, exportName: 'vda' }, { stallTimeout: 1e10 });
    await patient.read(buffer, 0);
    await patient.close();

    // A TCP connect the host never answers (its listen queue full: SYNs dropped) is cut too: on Linux shutdown(2)
    // of a socket in SYN_SENT ends its connect.
    await withSilentHost(async (port) => {
      const started = Date.now();
      await assert.rejects(NbdEndpoint.open({ uri: `nbd://127.0.0.1:${port}/vda`, exportName: 'vda' }, { stallTimeout: 1 }), (err: unknown) => {
        assert.ok(err instanceof UserError, `a UserError: ${String(err)}`);
        assert.match(err.message, new RegExp(`^NBD export nbd://127\\.0\\.0\\.1:${port}/vda .*answered nothing for 1 s`));
        return true;
      });
      assert.ok(Date.now() - started < 10_000, `the connect was not cut: it took ${Date.now() - started} ms`);
    });

    const early = new addon.NbdHandle();
    assert.equal(early.cut(), false, 'nothing to cut before a connect');
    await assert.rejects(early.connectUnix(socket, 'vda', []), isNativeError('libnbd'), 'a cut asked for before the connect has its socket applies to it');
    await early.close();
    const handle = new addon.NbdHandle();
    await handle.connectUnix(socket, 'vda', []);
    assert.equal(handle.cut(), true);
    await assert.rejects(handle.pread(buffer, 0), isNativeError('libnbd'));
    await handle.close();
  });
});

test('-q\'s qemu-img map: extents of a sound export; of one that stops answering (SIGSTOP), the stall error after the timeout, qemu-img ended', async () => {
  await withServer('64M', ['-e', '4', '-t'], async (_image, socket, server) => {
    const address = { socket, exportName: 'vda' };
    const endpoint = await NbdEndpoint.open(address, { connections: 1, stallTimeout: 1 });
    const extentsOf = async (mapped: ReturnType<typeof qemuImgExtents>): Promise<number> => {
      let covered = 0;
      for await (const extent of mapped.extents('base:allocation', 0, 64 * MiB)) covered += extent.length;
      return covered;
    };
    const qemuImgRuns = (): boolean => spawnSync('pgrep', ['-f', `qemu-img map .*${socket}`]).status === 0;
    try {
      assert.equal(await extentsOf(qemuImgExtents(endpoint, address)), 64 * MiB);
      process.kill(server.pid as number, 'SIGSTOP');
      const started = Date.now();
      await assert.rejects(extentsOf(qemuImgExtents(endpoint, address)), (err: unknown) => {
        assert.ok(err instanceof UserError, `a UserError: ${String(err)}`);
        assert.match(err.message, new RegExp(`^NBD export ${socket} \\(export vda\\) answered nothing for 1 s`));
        return true;
      });
      assert.ok(Date.now() - started < 10_000, `the map waited ${Date.now() - started} ms`);
      assert.equal(qemuImgRuns(), false, 'qemu-img map outlived the failure');
    } finally {
      process.kill(server.pid as number, 'SIGCONT');
      await endpoint.close();
    }
  });
});

test('a socket this user may not connect to (a backup job\'s, QEMU\'s, to a member of the libvirt group): one line naming its owner, its mode and the way out', async () => {
  await withServer('64M', ['-t'], async (_image, socket) => {
    const endpoint = path.resolve('dist/src/endpoint/nbd.js');
    // As user nobody, in a process of its own: the error's class and message.
    const attempt = (): string => spawnSync('runuser', ['-u', 'nobody', '--', process.execPath, '--input-type=module', '-e',
      `import { NbdEndpoint } from '${endpoint}';
       await NbdEndpoint.open({ socket: '${socket}', exportName: 'vda' }).then(() => console.log('connected'), (e) => console.log(e.constructor.name + ': ' + e.message));`,
    ], { encoding: 'utf8' }).stdout.trim();
    const refusal = `UserError: cannot connect to NBD export ${socket} (export vda): permission denied (EACCES) to nobody: the socket is root:`;
    await chmod(socket, 0o755);
    assert.equal(attempt(), `${refusal}root's (mode 0755); run as root`);
    // Group-writable, as libvirt-qemu's sockets are: joining the group is the other way.
    spawnSync('chgrp', ['daemon', socket]);
    await chmod(socket, 0o775);
    assert.equal(attempt(), `${refusal}daemon's (mode 0775); run as root, or add nobody to group daemon`);
    await chmod(socket, 0o777);
    assert.equal(attempt(), 'connected');
  });
});

test('8 concurrent preads on 2 handles leave the event loop free', async () => {
  await withServer('64M', ['-e', '4'], async (_image, socket) => {
    const handles: NbdHandle[] = [new addon.NbdHandle(), new addon.NbdHandle()];
    await Promise.all(handles.map((h) => h.connectUri(`nbd+unix:///vda?socket=${socket}`, ['base:allocation'])));
    assert.equal(handles[0].canMultiConn(), true, 'qemu-nbd -e 4 advertises multi-conn');
    // Each pread runs on a threadpool thread. A binding that read on the event loop would hand back settled
    // promises; ours must return pending ones at once (checked without any timing).
    const bufs = Array.from({ length: 8 }, () => Buffer.alloc(16 * MiB, 0xee));
    try {
      const reads = bufs.map((buf, i) => handles[i % 2].pread(buf, (i % 4) * 16 * MiB));
      for (const read of reads) assert.match(inspect(read), /<pending>/, 'pread() returns before the data is read');
      await Promise.all(reads);
      for (const [i, buf] of bufs.entries()) {
        const data = i % 4 === 0 ? MiB : 0;
        assert.ok(buf.subarray(0, data).every((b) => b === 0x11), `read ${i} sees the 0x11 data`);
        assert.ok(buf.subarray(data).every((b) => b === 0), `read ${i} is zero past the data`);
      }
    } finally {
      await Promise.all(handles.map((h) => h.close()));
    }
  });
});

test('adler32 matches python zlib.adler32', async () => {
  const data = randomBytes(3 * MiB + 17);
  const expected = Number(await py('import sys, zlib; print(zlib.adler32(sys.stdin.buffer.read()))', data));
  assert.equal(addon.adler32(data, 1), expected);
  const half = addon.adler32(data.subarray(0, MiB), 1);
  assert.equal(addon.adler32(data.subarray(MiB), half), expected, 'continues from a start value');
  assert.equal(addon.adler32(Buffer.alloc(0), 1), 1);
  assert.equal(addon.adler32(Buffer.alloc(0), expected), expected, 'an empty buffer keeps the running sum');
});

test('adler32 on vectors agrees with zlib at every length, alignment and worst-case byte value', async () => {
  const cases: Buffer[] = [];
  for (const length of [1, 31, 32, 33, 255, 256, 257, 5553, 32 * 1024, 32 * 1024 + 1, 3 * 65536 + 5, MiB + 7]) {
    cases.push(randomBytes(length), Buffer.alloc(length, 0xff), randomBytes(length + 1).subarray(1));
  }
  const expected = JSON.parse(await py(
    'import sys, zlib, json\nb = sys.stdin.buffer.read()\n' +
      `sizes = ${JSON.stringify(cases.map((c) => c.length))}\nout = []\nat = 0\n` +
      'for n in sizes:\n  out.append([zlib.adler32(b[at:at+n]), zlib.adler32(b[at:at+n], 0xfff0fff0 % 65521 + (65520 << 16))])\n  at += n\n' +
      'print(json.dumps(out))',
    Buffer.concat(cases),
  )) as Array<[number, number]>;
  for (const [i, data] of cases.entries()) {
    const [fresh, continued] = expected[i] as [number, number];
    assert.equal(addon.adler32(data, 1), fresh, `length ${data.length}`);
    assert.equal((await addon.checksumPiece(data)).adler32, fresh, `checksumPiece, length ${data.length}`);
    assert.equal(addon.adler32(data, 0xfff0fff0 % 65521 + 65520 * 65536), continued, `continued, length ${data.length}`);
  }
});

test('piece digests (checksumPiece, digestPiece): BLAKE3 agrees with b3sum, SHA-256 with OpenSSL through node:crypto', async () => {
  for (const data of [Buffer.alloc(0), randomBytes(1), randomBytes(1025), randomBytes(4 * MiB + 3)]) {
    const b3sum = await new Promise<string>((resolve, reject) => {
      const child = spawn('b3sum', ['--no-names'], { stdio: ['pipe', 'pipe', 'inherit'] });
      let out = '';
      child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
      child.on('error', reject);
      child.on('close', () => resolve(out.trim()));
      child.stdin.end(data);
    });
    assert.equal((await addon.checksumPiece(data, 'blake3')).digest, b3sum, `BLAKE3 of ${data.length} bytes`);
    assert.equal((await addon.checksumPiece(data, 'sha256')).digest, createHash('sha256').update(data).digest('hex'));
    assert.equal((await addon.checksumPiece(data)).digest, undefined);
    assert.equal(await addon.digestPiece(data, 'blake3'), b3sum, `digestPiece BLAKE3 of ${data.length} bytes`);
    assert.equal(await addon.digestPiece(data, 'sha256'), createHash('sha256').update(data).digest('hex'));
    const into = Buffer.alloc(40, 0xaa);
    assert.equal(addon.checksumPieceSync(data, 'blake3', into, 8), (await addon.checksumPiece(data)).adler32, 'checksumPieceSync adler32');
    assert.equal(into.toString('hex', 8, 40), b3sum, `checksumPieceSync BLAKE3 of ${data.length} bytes, in place`);
    assert.equal(into.toString('hex', 0, 8), 'aa'.repeat(8), 'checksumPieceSync writes only its 32 bytes');
  }
  assert.throws(() => addon.checksumPieceSync(Buffer.alloc(1), 'blake3', Buffer.alloc(40), 9), /at must be/);
});

test('alignedBuffer: zeroed, of the size asked, on the boundary O_DIRECT needs', () => {
  const buffer = addon.alignedBuffer(3 * 4096, 4096);
  assert.equal(buffer.length, 3 * 4096);
  assert.ok(buffer.every((b) => b === 0));
  assert.throws(() => addon.alignedBuffer(4096, 3000), /alignment must be/);
});

test('copyInto: the sources one after another from the offset, on a worker; bytes that do not fit are refused', async () => {
  const target = Buffer.alloc(16, 0xff);
  const sources = [Buffer.from('abc'), Buffer.alloc(0), randomBytes(5)];
  await addon.copyInto(target, 4, sources);
  assert.deepEqual(target, Buffer.concat([Buffer.alloc(4, 0xff), ...sources, Buffer.alloc(4, 0xff)]));
  await assert.rejects(addon.copyInto(target, 10, sources), /sources must be/);
  await assert.rejects(addon.copyInto(target, 17, []), /sources must be/);
  await assert.rejects(addon.copyInto(target, 0, ['x' as unknown as Buffer]), /sources must be/);
});

test('readAhead (ReadAhead): the kernel reads the range asked into the page cache; a closed file or a bad descriptor is no error', async () => {
  const dir = await scratchDir('readahead-');
  const file = path.join(dir, 'cold.data');
  try {
    await writeFile(file, randomBytes(48 * 1024 * 1024), { flush: true });
    const resident = (): number => Number(spawnSync('fincore', ['-b', '-n', '-o', 'RES', file], { encoding: 'utf8' }).stdout.trim());
    // dd's nocache with no blocks drops the file (written back: flush) from the page cache.
    spawnSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0'], { stdio: 'ignore' });
    assert.ok(resident() < 1024 * 1024, `${resident()} bytes resident after dropping`);
    const handle = await open(file, 'r');
    new ReadAhead(handle).at(0, 20 * 1024 * 1024);
    for (let i = 0; i < 250 && resident() < 20 * 1024 * 1024; i++) await sleep(20);
    // All of it, or nearly: under memory pressure (DAMON's reclaim runs here) the kernel may already drop a few pages.
    const read = resident();
    assert.ok(read >= 19 * 1024 * 1024 && read <= 20 * 1024 * 1024, `${read} bytes resident, 20 MiB asked`);
    await handle.close();
    new ReadAhead(handle).at(0, 1024 * 1024);
    await addon.readAhead(1 << 20, 0, 4096);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('alignedBuffer with hugePages: on huge pages where the kernel offers them, so a direct write of it is one request', async (t) => {
  if (!(await hugePagesOffered())) return t.skip('transparent huge pages are off on this kernel');
  const before = await anonHugeKiB();
  const buffer = addon.alignedBuffer(4 * MiB, 2 * MiB, true);
  assert.ok(buffer.every((b) => b === 0));
  assert.ok((await anonHugeKiB()) - before >= 4096, 'the 4 MiB buffer is not on huge pages');
  assert.throws(() => addon.alignedBuffer(4096, 4096, 1 as unknown as boolean), /hugePages must be a boolean/);
});

/**
 * One frame through lz4CompressPiece, put together from its segments and checked against its own sums: each
 * segment's adler32, the frame's, and the source's BLAKE3. Returns the frame and how many source bytes it stores.
 */
async function compressFrameStoring(source: Buffer, level: number): Promise<{ frame: Buffer; storedBytes: number }> {
  const output = Buffer.alloc(addon.lz4FrameBound(source.length));
  const piece = await addon.lz4CompressPiece(source, level, output, 'blake3');
  let storedBytes = 0;
  const frame = Buffer.concat(piece.segments.map((segment) => {
    const run = (segment.inSource ? source : output).subarray(segment.start, segment.end);
    assert.equal(segment.adler32, addon.adler32(run, 1));
    if (segment.inSource) storedBytes += run.length;
    return run;
  }));
  assert.equal(frame.length, piece.length);
  assert.equal(piece.adler32, addon.adler32(frame, 1));
  assert.equal(piece.digest, await addon.digestPiece(source, 'blake3'));
  return { frame, storedBytes };
}

async function compressFrame(source: Buffer, level: number): Promise<Buffer> {
  return (await compressFrameStoring(source, level)).frame;
}

/** What python's lz4.frame makes of a frame: the SHA-256 of its content, and its checksums and sizes. */
async function pythonFrameReport(frame: Buffer): Promise<{ sha: string; block: boolean; content: boolean; size: number; blockSize: number }> {
  return JSON.parse(
    await py(
      'import sys, json, hashlib, lz4.frame\n' +
        'b = sys.stdin.buffer.read(); i = lz4.frame.get_frame_info(b)\n' +
        'print(json.dumps({"sha": hashlib.sha256(lz4.frame.decompress(b)).hexdigest(),\n' +
        '  "block": i["block_checksum"], "content": i["content_checksum"], "size": i["content_size"], "blockSize": i["block_size"]}))',
      frame,
    ),
  ) as { sha: string; block: boolean; content: boolean; size: number; blockSize: number };
}

test('lz4 frames interoperate with python lz4.frame', async () => {
  // Compressible but not trivial, and several 64 KiB blocks long.
  const source = Buffer.concat([randomBytes(100_000), Buffer.alloc(300_000, 'virtnbd '), randomBytes(1000)]);
  const sha = createHash('sha256').update(source).digest('hex');
  for (const level of [0, 9]) {
    const frame = await compressFrame(source, level);
    assert.ok(frame.length < source.length);
    const { blockSize, ...rest } = await pythonFrameReport(frame);
    assert.deepEqual(rest, { sha, block: false, content: true, size: source.length });
    assert.ok(blockSize >= source.length, `one block per frame (block size ${blockSize})`);
    assert.deepEqual(await addon.lz4DecompressFrame(frame), source);
    const into = Buffer.alloc(source.length + 10);
    assert.equal(await addon.lz4DecompressInto(frame, into), source.length);
    assert.deepEqual(into.subarray(0, source.length), source);
    await assert.rejects(addon.lz4DecompressInto(frame, Buffer.alloc(source.length - 1)), /larger than its stated content size/);

    const flipped = Buffer.from(frame);
    flipped[flipped.length >> 1] ^= 0x40;
    await assert.rejects(addon.lz4DecompressFrame(flipped), isNativeError('lz4'));
    await assert.rejects(addon.lz4DecompressInto(flipped, into), isNativeError('lz4'));
    await assert.rejects(addon.lz4DecompressInto(frame.subarray(0, frame.length - 9), into), /truncated/);
    await assert.rejects(addon.lz4DecompressInto(Buffer.concat([frame, Buffer.from('x')]), into), /trailing/);
    await assert.rejects(addon.lz4DecompressFrame(frame.subarray(0, frame.length - 9)), /truncated/);
    await assert.rejects(addon.lz4DecompressFrame(Buffer.concat([frame, Buffer.from('x')])), /trailing/);
    // The content checksum (added by the addon, checked by the addon with libxxhash) is the frame's last 4 bytes.
    const badSum = Buffer.from(frame);
    badSum[badSum.length - 2] ^= 0x01;
    await assert.rejects(addon.lz4DecompressFrame(badSum), /contentChecksum_invalid/);
    await assert.rejects(addon.lz4DecompressInto(badSum, into), /contentChecksum_invalid/);
  }

  // Frames as virtnbdbackup writes them (block and content checksums), and with block checksums alone, which
  // liblz4 still checks: a flipped payload byte or checksum byte is refused either way.
  for (const [content, block] of [['True', 'True'], ['False', 'True']]) {
    const checked = Buffer.from(
      await py(`import sys, lz4.frame; sys.stdout.write(lz4.frame.compress(sys.stdin.buffer.read(), content_checksum=${content}, block_checksum=${block}).hex())`, source),
      'hex',
    );
    assert.deepEqual(await addon.lz4DecompressFrame(checked), source);
    for (const at of [checked.length >> 1, checked.length - 1]) {
      const broken = Buffer.from(checked);
      broken[at] ^= 0x40;
      await assert.rejects(addon.lz4DecompressFrame(broken), isNativeError('lz4'), `content ${content}, block ${block}, byte ${at}`);
      await assert.rejects(addon.lz4DecompressInto(broken, Buffer.alloc(source.length)), isNativeError('lz4'));
    }
  }

  // Frames python writes with its defaults (no checksums, content size stored) decompress too.
  const pyFrame = Buffer.from(
    await py('import sys, lz4.frame; sys.stdout.write(lz4.frame.compress(sys.stdin.buffer.read()).hex())', source),
    'hex',
  );
  assert.deepEqual(await addon.lz4DecompressFrame(pyFrame), source);

  const empty = await compressFrame(Buffer.alloc(0), 0);
  assert.equal((await addon.lz4DecompressFrame(empty)).length, 0);
  await assert.rejects(addon.lz4DecompressFrame(Buffer.from('not a frame')), isNativeError('lz4'));
  await assert.rejects(addon.lz4CompressPiece(source, 0, Buffer.alloc(1000)), /output must be/);
});

test('lz4 blocks that do not compress stay in the source, and python lz4.frame reads such frames', async () => {
  // Three 4 MB blocks: random (stored), repeated text (compressed), random again (stored, shorter).
  const block = 4 * MiB;
  const source = Buffer.concat([randomBytes(block), Buffer.alloc(block, 'virtnbd '), randomBytes(MiB + 7)]);
  const sha = createHash('sha256').update(source).digest('hex');
  for (const level of [1, 9]) {
    const { frame, storedBytes } = await compressFrameStoring(source, level);
    assert.equal(storedBytes, block + MiB + 7, 'the random blocks are not copied into the output');
    const { blockSize, ...rest } = await pythonFrameReport(frame);
    assert.deepEqual(rest, { sha, block: false, content: true, size: source.length });
    assert.equal(blockSize, block);
    assert.deepEqual(await addon.lz4DecompressFrame(frame), source);
  }
  const random = randomBytes(1000);
  const { frame, storedBytes } = await compressFrameStoring(random, 0);
  assert.equal(storedBytes, random.length);
  assert.deepEqual(await addon.lz4DecompressFrame(frame), random);
});

async function ensureLibvirtd(): Promise<void> {
  const ok = () => spawnSync('virsh', ['-c', 'qemu:///system', 'version'], { stdio: 'ignore' }).status === 0;
  if (ok()) return;
  spawnSync('virtlogd', ['-d']);
  spawnSync('libvirtd', ['-d']);
  for (let i = 0; i < 100 && !ok(); i++) await sleep(100);
  assert.ok(ok(), 'libvirtd at qemu:///system');
}

function domainXml(name: string, image: string): string {
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>`;
}

function virshListAll(): string {
  return spawnSync('virsh', ['-c', 'qemu:///system', 'list', '--all', '--name'], { encoding: 'utf8' }).stdout;
}

test('libvirt: errors, a throwaway domain, pull backup and checkpoints', async (t) => {
  await ensureLibvirtd();
  const conn = await addon.libvirtOpen('qemu:///system');
  assert.equal(await conn.getURI(), 'qemu:///system');
  await assert.rejects(conn.lookupDomainByName('no-such-domain-xyz'), (err: NativeError) => {
    assert.equal(err.code, VIR_ERR_NO_DOMAIN);
    assert.equal(err.library, 'libvirt');
    assert.match(err.message, /no-such-domain-xyz/);
    return true;
  });

  const name = `virtnbd-native-test-${process.pid}-${randomBytes(3).toString('hex')}`;
  const dir = await tempDir();
  let handedOut: LibvirtDomain | undefined;
  try {
    const image = await makeImage(dir, '16M');
    await chmod(image, 0o666);
    const dom = await conn.defineXML(domainXml(name, image));
    handedOut = dom;
    try {
      assert.equal(dom.name(), name);
      assert.equal(await dom.isActive(), false);
      assert.equal(await dom.getAutostart(), false);
      assert.match(await dom.getXMLDesc(0), new RegExp(`<name>${name}</name>`));
      assert.equal((await conn.lookupDomainByName(name)).name(), name);

      await dom.create(0);
      assert.equal(await dom.isActive(), true);
      assert.equal((await dom.getState())[0], 1, 'VIR_DOMAIN_RUNNING');
      const info = await dom.qemuMonitorCommand('info block', true);
      assert.ok(info.includes('vda') || info.includes(image), info);
      assert.deepEqual(await dom.getJobType(), { type: 0, operation: 0 });
      assert.deepEqual(await dom.listCheckpointNames(), []);

      // Pull-mode backup: the NBD export libvirt sets up is what the backup engine reads.
      const socket = path.join(dir, 'backup.sock');
      const checkpoint = 'virtnbd-cp0';
      const backupXml =
        `<domainbackup mode='pull'><server transport='unix' socket='${socket}'/><disks>` +
        `<disk name='vda' backup='yes' type='file'><scratch file='${dir}/scratch.qcow2'/></disk>` +
        `</disks></domainbackup>`;
      const checkpointXml =
        `<domaincheckpoint><name>${checkpoint}</name>` +
        `<disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>`;
      await dom.backupBegin(backupXml, checkpointXml, 0);
      const job = await dom.getJobType();
      assert.notEqual(job.type, 0);
      assert.equal(job.operation, VIR_DOMAIN_JOB_OPERATION_BACKUP);
      assert.match(await dom.backupGetXMLDesc(), /mode=.pull./);
      await waitForSocket(socket);
      const h = new addon.NbdHandle();
      await h.connectUnix(socket, 'vda', ['base:allocation']);
      try {
        assert.equal(h.getSize(), 16 * MiB);
        assert.equal(h.isReadOnly(), true);
        t.diagnostic(
          `libvirt backup export: multi-conn=${h.canMultiConn()} maxBlock=${h.getMaxBlockSize()} ` +
            `trim=${h.canTrim()} zero=${h.canZero()}`,
        );
        const data = Buffer.alloc(MiB);
        await h.pread(data, 0);
        assert.ok(data.every((b) => b === 0x11));
        const extents = await h.blockStatus(0, h.getSize(), 'base:allocation');
        assert.equal(flagsAt(extents, 0, 0), 0);
      } finally {
        await h.close();
      }
      await dom.abortJob();
      for (let i = 0; i < 100 && (await dom.getJobType()).type !== 0; i++) await sleep(50);
      assert.equal((await dom.getJobType()).type, 0);

      assert.deepEqual(await dom.listCheckpointNames(), [checkpoint]);
      const cpXml = await dom.checkpointGetXMLDesc(checkpoint, 0);
      assert.match(cpXml, new RegExp(`<name>${checkpoint}</name>`));
      // A call that fails on the checkpoint itself keeps libvirt's message past the checkpoint's release.
      await assert.rejects(dom.checkpointDelete(checkpoint, 0x40000000), (err: Error) => /flags/i.test(err.message) && !/unknown libvirt error/.test(err.message));
      await dom.checkpointDelete(checkpoint, VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY);
      assert.deepEqual(await dom.listCheckpointNames(), []);
      assert.equal(await dom.checkpointCreateXML(cpXml, VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE), checkpoint);
      assert.deepEqual(await dom.listCheckpointNames(), [checkpoint]);
      await dom.checkpointDelete(checkpoint, 0);
      assert.deepEqual(await dom.listCheckpointNames(), []);
      await assert.rejects(dom.checkpointGetXMLDesc(checkpoint, 0), isNativeError('libvirt'));

      await dom.suspend();
      assert.equal((await dom.getState())[0], 3, 'VIR_DOMAIN_PAUSED');
      await dom.resume();
    } finally {
      if (await dom.isActive().catch(() => false)) await dom.destroy();
      await dom.undefine(VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA);
    }
    await assert.rejects(conn.lookupDomainByName(name), isNativeError('libvirt', VIR_ERR_NO_DOMAIN));
  } finally {
    await conn.close();
    await conn.close();
    await rm(dir, { recursive: true, force: true });
  }
  // close() takes back the handles of the domains it handed out, so the daemon connection really closes.
  await assert.rejects(handedOut?.getState() ?? Promise.resolve(), /libvirt connection is closed/);
  assert.ok(!virshListAll().split('\n').includes(name), 'the test domain is gone');
});

test('libvirt: a guest agent freeze that succeeds, through the test driver (no test domain of ours runs an agent)', async () => {
  // libvirt's test driver answers virDomainFSFreeze/Thaw as an agent would, so the binding's success path (the
  // mount point array, the counts) and DomainPower's log lines run against the real library.
  const conn = await addon.libvirtOpen('test:///default');
  try {
    const dom = await conn.lookupDomainByName('test');
    assert.equal(await dom.fsFreeze(['/boot']), 1);
    assert.equal(typeof (await dom.fsThaw()), 'number');
    assert.equal(await dom.fsFreeze([]), 2, 'every filesystem');
    await dom.fsThaw();

    const lines: string[] = [];
    const log = new Logger();
    log.info = (msg: string) => void lines.push(msg);
    const power = await DomainPower.prepare(dom, false, log);
    assert.equal(await power.whileFrozen(true, ['/', '/boot'], async () => 'job started'), 'job started');
    assert.match(lines[0] ?? '', /^froze 2 filesystem\(s\) of domain 'test' through its guest agent/);
    assert.match(lines[1] ?? '', /^thawed \d+ filesystem\(s\) of domain 'test'$/);
  } finally {
    await conn.close();
  }
});
