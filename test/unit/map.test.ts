// virtnbdmap's engine without libvirt: segment overlay, the frame cache, the chain endpoint over streams written
// by our own writer (plain and lz4, full + incs with zero frames), copy-on-write, sequence errors, and the NBD
// server spoken to by libnbd (our NbdEndpoint) over a unix socket, with its handshake timeout and connection cap,
// and fed damaged client sessions; its TLS gate (STARTTLS) spoken to byte by byte, damaged sessions against it too.
import { spawn } from 'node:child_process';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import os from 'node:os';
import path from 'node:path';
import { CONTEXT_ALLOCATION, type Endpoint, type StatusExtent } from '../../src/endpoint/endpoint.js';
import { NbdEndpoint } from '../../src/endpoint/nbd.js';
import type { PlannedExtent } from '../../src/extents/plan.js';
import { ChainEndpoint } from '../../src/map/chainEndpoint.js';
import { COW_BLOCK, CopyOnWriteEndpoint } from '../../src/map/copyOnWrite.js';
import { FrameCache } from '../../src/map/frameCache.js';
import { leftoversOfGoneRuns } from '../../src/map/leftovers.js';
import { NbdServer, type NbdServerOptions } from '../../src/map/nbdServer.js';
import { OPT, OPTION_REPLY_MAGIC, REP } from '../../src/map/nbdProtocol.js';
import { loadTlsServerFiles } from '../../src/map/map.js';
import { SocketClosedError, SocketReader } from '../../src/map/socketReader.js';
import { withScratchCertificates } from '../support/tls.js';
import { overlay, truncate, type Segment } from '../../src/map/segments.js';
import { writeStream } from '../../src/stream/writer.js';
import type { Sink } from '../../src/set/target.js';
import { UserError } from '../../src/util/errors.js';
import { processStart } from '../../src/util/process.js';
import { Logger } from '../../src/util/log.js';
import { damageOnce, seeded } from '../support/fuzz.js';
import { run } from '../support/testbed.js';

const MiB = 1024 * 1024;
const DISK = 48 * MiB;

/** A disk in memory, as the source of writeStream and as the expected content. */
class MemoryDisk implements Endpoint {
  readonly maxRequestSize = 32 * MiB;
  readonly parallelism = 4;
  constructor(readonly image: Buffer) {}
  get size(): number { return this.image.length; }
  async read(buffer: Buffer, offset: number): Promise<void> { this.image.copy(buffer, 0, offset, offset + buffer.length); }
  async write(buffer: Buffer, offset: number): Promise<void> { buffer.copy(this.image, offset); }
  async zero(offset: number, length: number): Promise<void> { this.image.fill(0, offset, offset + length); }
  async flush(): Promise<void> {}
  async *extents(): AsyncIterable<StatusExtent> { yield { offset: 0, length: this.size, flags: 0 }; }
  async close(): Promise<void> {}
}

function fileSink(file: string): Sink {
  return {
    write: (buffers) => fs.appendFile(file, Buffer.concat(buffers)),
    commit: async () => undefined,
    abort: async () => undefined,
  };
}

interface Link { name: string; checkpoint: string; parent: string }
const FULL: Link = { name: 'vda.full.data', checkpoint: 'virtnbdbackup.0', parent: '' };
const INC1: Link = { name: 'vda.inc.virtnbdbackup.1.data', checkpoint: 'virtnbdbackup.1', parent: 'virtnbdbackup.0' };
const INC2: Link = { name: 'vda.inc.virtnbdbackup.2.data', checkpoint: 'virtnbdbackup.2', parent: 'virtnbdbackup.1' };

async function writeLink(dir: string, link: Link, disk: MemoryDisk, extents: PlannedExtent[], compress: number | false): Promise<string> {
  const file = path.join(dir, link.name);
  const dataSize = extents.filter((e) => e.kind === 'data').reduce((sum, e) => sum + e.length, 0);
  await writeStream({
    source: disk, plan: { extents, dataSize }, sink: fileSink(file), compress,
    meta: {
      date: '2026-01-01T00:00:00', diskName: 'vda', diskFormat: 'qcow2', checkpointName: link.checkpoint,
      parentCheckpoint: link.parent, incremental: link.parent !== '',
    },
  });
  return file;
}

const data = (offset: number, length: number): PlannedExtent => ({ offset, length, kind: 'data' });
const zero = (offset: number, length: number): PlannedExtent => ({ offset, length, kind: 'zero' });

/**
 * full (a 40 MiB extent: several lz4 frames when compressed; a small one; zero frames), inc1 rewriting ranges
 * across old extents and holes, inc2 zeroing part of both. Returns the files and the disk at each point.
 */
async function buildChain(dir: string, compress: number | false): Promise<{ files: string[]; points: Buffer[] }> {
  const disk = new MemoryDisk(Buffer.alloc(DISK));
  randomBytes(20 * MiB).copy(disk.image, 0);
  disk.image.fill(0x11, 20 * MiB, 40 * MiB);
  disk.image.fill(0x22, 44 * MiB, 45 * MiB);
  const files = [await writeLink(dir, FULL, disk, [data(0, 40 * MiB), zero(40 * MiB, 4 * MiB), data(44 * MiB, MiB)], compress)];
  const points = [Buffer.from(disk.image)];

  disk.image.fill(0x33, 10 * MiB + 4097, 12 * MiB);
  disk.image.fill(0x44, 39 * MiB, 46 * MiB + 512);
  files.push(await writeLink(dir, INC1, disk, [data(10 * MiB + 4096, 2 * MiB - 4096), data(39 * MiB, 7 * MiB + 512)], compress));
  points.push(Buffer.from(disk.image));

  disk.image.fill(0, 11 * MiB, 40 * MiB);
  disk.image.fill(0x55, 47 * MiB, 48 * MiB);
  files.push(await writeLink(dir, INC2, disk, [zero(11 * MiB, 29 * MiB), data(47 * MiB, MiB)], compress));
  points.push(Buffer.from(disk.image));
  return { files, points };
}

async function withDir(t: { after: (fn: () => Promise<void>) => void }, label: string): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), `vnbdtest-map-${label}-`));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Reads at assorted offsets and lengths (unaligned, across segment borders, whole disk) and compares. */
async function assertReadsMatch(endpoint: Endpoint, expected: Buffer, label: string): Promise<void> {
  const probes: Array<[number, number]> = [[0, DISK], [10 * MiB + 4000, 200], [39 * MiB - 3, 7 * MiB + 10], [40 * MiB - 1, 2], [DISK - 1, 1]];
  for (let i = 0; i < 40; i++) {
    const offset = Math.floor(Math.random() * (DISK - 1));
    probes.push([offset, 1 + Math.floor(Math.random() * Math.min(3 * MiB, DISK - offset - 1))]);
  }
  await Promise.all(probes.map(async ([offset, length]) => {
    const buffer = Buffer.alloc(length, 0xee);
    await endpoint.read(buffer, offset);
    assert.ok(buffer.equals(expected.subarray(offset, offset + length)), `${label}: read ${offset}+${length} differs`);
  }));
}

async function allExtents(endpoint: Endpoint, offset = 0, length = endpoint.size): Promise<StatusExtent[]> {
  const out: StatusExtent[] = [];
  for await (const e of endpoint.extents(CONTEXT_ALLOCATION, offset, length)) out.push(e);
  return out;
}

const seg = (start: number, length: number, at: number, extra: Partial<Segment> = {}): Segment =>
  ({ start, length, kind: 'data', file: 0, at, packed: 0, skip: 0, ...extra });

test('overlay: the later stream wins, earlier segments are cut at both ends and still point at their bytes', () => {
  const base = [seg(0, 100, 1000), seg(200, 100, 5000, { packed: 77, skip: 0 })];
  const top = [seg(50, 20, 9000, { file: 1 }), seg(250, 100, 0, { file: 1, kind: 'zero' })];
  assert.deepEqual(overlay(base, top).map((s) => [s.start, s.length, s.file, s.at, s.skip]), [
    [0, 50, 0, 1000, 0], [50, 20, 1, 9000, 0], [70, 30, 0, 1070, 0], [200, 50, 0, 5000, 0], [250, 100, 1, 0, 0],
  ]);
  // A compressed segment cut at its front keeps its frame position and skips into the frame instead.
  assert.deepEqual(overlay(base, [seg(150, 60, 1, { file: 1 })]).map((s) => [s.start, s.length, s.at, s.skip]).slice(-1), [[210, 90, 5000, 10]]);
  assert.deepEqual(overlay([], top), top);
  assert.deepEqual(overlay(base, []), base);
});

test('truncate: a disk shrunk keeps what lies below its new size; a segment across it is cut and still points at its bytes', () => {
  const base = [seg(0, 100, 1000), seg(200, 100, 5000, { packed: 77, skip: 0 }), seg(400, 50, 8000)];
  assert.deepEqual(truncate(base, 250).map((s) => [s.start, s.length, s.at, s.skip]), [[0, 100, 1000, 0], [200, 50, 5000, 0]]);
  assert.deepEqual(truncate(base, 200).map((s) => s.start), [0]);
  assert.deepEqual(truncate(base, 450), base);
  assert.deepEqual(truncate(base, 0), []);
});

test('frame cache: one load per frame, a dropped frame is handed back once and only after its readers return', async () => {
  const dropped: Buffer[] = [];
  const cache = new FrameCache(2 * 65536, (frame) => dropped.push(frame));
  let loads = 0;
  const load = (fill: number) => async (): Promise<Buffer> => {
    loads += 1;
    await new Promise((resolve) => setImmediate(resolve));
    return Buffer.alloc(65536, fill);
  };
  const first = (frame: Buffer): number => frame[0] as number;
  assert.deepEqual(await Promise.all([cache.read('a', load(1), first), cache.read('a', load(9), first)]), [1, 1]);
  assert.equal(loads, 1);
  // A reader of 'a' is still inside read() when 'b' and 'c' push it out: it reaches `dropped` only afterwards.
  let inside!: () => void;
  const held = cache.read('a', load(9), async (frame) => {
    await new Promise<void>((resolve) => { inside = resolve; });
    return frame[0];
  });
  await cache.read('b', load(2), first);
  await cache.read('c', load(3), first);
  assert.deepEqual(dropped, []);
  inside();
  assert.equal(await held, 1);
  assert.deepEqual(dropped.map((f) => f[0]), [1]);
  // A failed load is not cached, and the next read loads again.
  await assert.rejects(cache.read('d', () => Promise.reject(new Error('bad frame')), first), /bad frame/);
  assert.equal(await cache.read('d', load(4), first), 4);
  cache.clear();
  assert.deepEqual(dropped.map((f) => f[0]).sort(), [1, 2, 3, 4]);
});

for (const compress of [false, 2] as const) {
  const kind = compress === false ? 'plain' : 'lz4';
  test(`chain endpoint (${kind}): every point in time reads exactly as the disk was, extents show data, zero and holes`, async (t) => {
    const dir = await withDir(t, kind);
    const { files, points } = await buildChain(dir, compress);
    for (const [i, expected] of points.entries()) {
      const chain = await ChainEndpoint.open(files.slice(0, i + 1), { cacheBytes: 8 * MiB });
      // With room for one frame, concurrent reads keep dropping frames whose buffers the next loads reuse.
      const tight = await ChainEndpoint.open(files.slice(0, i + 1), { cacheBytes: 1 });
      try {
        assert.equal(chain.size, DISK);
        await assertReadsMatch(chain, expected, `${kind} point ${i}`);
        await assertReadsMatch(tight, expected, `${kind} point ${i}, one frame cached`);
      } finally {
        await chain.close();
        await tight.close();
      }
    }
    const chain = await ChainEndpoint.open(files);
    t.after(() => chain.close());
    assert.deepEqual((await allExtents(chain)).map((e) => [e.offset / MiB, e.length / MiB, e.flags]), [
      [0, 11, 0], [11, 29, 3], [40, 6 + 512 / MiB, 0], [46 + 512 / MiB, 1 - 512 / MiB, 3], [47, 1, 0],
    ]);
    assert.deepEqual(await allExtents(chain, 12 * MiB, 4096), [{ offset: 12 * MiB, length: 4096, flags: 3 }]);
    await assert.rejects(chain.write(Buffer.alloc(1), 0), /read-only/);
  });
}

test('chain endpoint: a chain with Python\'s offline inc (named after its parent checkpoint, as the full is) maps in order', async (t) => {
  const dir = await withDir(t, 'offline');
  const disk = new MemoryDisk(Buffer.alloc(DISK));
  disk.image.fill(0x11, 0, 8 * MiB);
  const full = await writeLink(dir, FULL, disk, [data(0, 8 * MiB)], false);
  disk.image.fill(0x22, 2 * MiB, 3 * MiB);
  const offline = await writeLink(dir, { name: 'vda.inc.virtnbdbackup.0.data', checkpoint: 'virtnbdbackup.0', parent: 'virtnbdbackup.0' }, disk, [data(2 * MiB, MiB)], false);
  disk.image.fill(0x33, 5 * MiB, 6 * MiB);
  const inc = await writeLink(dir, INC1, disk, [data(5 * MiB, MiB)], false);
  const chain = await ChainEndpoint.open([full, offline, inc]);
  t.after(() => chain.close());
  await assertReadsMatch(chain, disk.image, 'full, offline inc, inc');
});

test('chain endpoint: files out of order (renamed ones too, by their metadata), an inc first, another disk or a non-stream give one-line UserErrors', async (t) => {
  const dir = await withDir(t, 'errors');
  const { files } = await buildChain(dir, false);
  const [full, inc1, inc2] = files as [string, string, string];
  const notStream = path.join(dir, 'notes.txt');
  await fs.writeFile(notStream, 'these are not the frames you are looking for\n'.repeat(10));
  // Renamed, the files' metadata alone tells the order (it said a file was missing).
  const [one, two] = [path.join(dir, 'one.bin'), path.join(dir, 'two.bin')];
  await fs.copyFile(inc1, one);
  await fs.copyFile(inc2, two);
  const cases: Array<[string[], RegExp]> = [
    [[full, inc2, inc1], /^-f is out of chain order: \S+vda\.inc\.virtnbdbackup\.2\.data is based on checkpoint virtnbdbackup\.1, which \S+vda\.inc\.virtnbdbackup\.1\.data makes, so it goes right after that file, not after \S+vda\.full\.data/],
    [[full, two, one], /^-f is out of chain order: \S+two\.bin is based on checkpoint virtnbdbackup\.1, which \S+one\.bin, given after it, names as its own \(by their metadata\); give the full backup first/],
    [[full, inc2, one], /^-f is out of chain order: \S+vda\.inc\.virtnbdbackup\.2\.data is based on checkpoint virtnbdbackup\.1, which \S+one\.bin, given after it/],
    [[full, two], /a data file is missing from the set: add it to -f/],
    // virtnbdmap has no --until: the way out it names is its own.
    [[full, inc2], /a data file is missing from the set: add it to -f \(the full backup first, then each incremental in checkpoint order\), or map only the files before it$/],
    [[inc1, inc2], /must start with the full or copy backup/],
    [[full, full], /vda\.full\.data is given twice: give each file once/],
    [[notStream], /notes\.txt is not a usable backup stream/],
    [[full, path.join(dir, 'missing.data')], /cannot read .*missing\.data: no such file or directory \(ENOENT\)$/],
    [[dir], /is not a backup data file/],
    [[], /no backup files given/],
  ];
  for (const [sequence, message] of cases) {
    await assert.rejects(ChainEndpoint.open(sequence), (err: Error) => {
      assert.ok(err instanceof UserError, `${sequence.join(',')}: ${err.stack}`);
      assert.match(err.message, message);
      assert.doesNotMatch(err.message, /\n/);
      return true;
    });
  }
  const renamed = await ChainEndpoint.open([full, one, two]);
  await renamed.close();
  // A stream cut short is refused when it is indexed, not when a client happens to read there.
  const truncated = path.join(dir, 'vda.inc.virtnbdbackup.1.data.cut');
  await fs.writeFile(truncated, (await fs.readFile(inc1)).subarray(0, 5000));
  await assert.rejects(ChainEndpoint.open([full, truncated]), /not a usable backup stream.*(truncated|end of file)/);
  // A -t raw backup is an image already: said so, with what serves it ("invalid frame header" said nothing).
  const image = path.join(dir, 'vda.full.img');
  await fs.writeFile(image, Buffer.alloc(1024 * 1024, 0x5a));
  await assert.rejects(ChainEndpoint.open([image]), new RegExp(`${image} is a raw disk image \\(a -t raw backup, or a raw-format disk's copy\\), not a stream: serve it as it is, read-only: qemu-nbd -r -f raw '${image}' \\(or losetup -r\\)$`));
  // A qcow2 image (the disk, a restored one) is said to be one: served as raw it would show qcow2's bytes.
  const qcow2 = path.join(dir, 'vda.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '1M']);
  await assert.rejects(ChainEndpoint.open([qcow2]), new RegExp(`${qcow2} is a qcow2 disk image, not a backup stream: serve it read-only with qemu-nbd -r -f qcow2 '${qcow2}'$`));
});

test('copy-on-write: reads see every write and zero, the base and its files stay untouched, close removes the overlay', async (t) => {
  const dir = await withDir(t, 'cow');
  const { files, points } = await buildChain(dir, 2);
  const hashes = async (): Promise<string[]> => Promise.all(files.map(async (f) => createHash('sha256').update(await fs.readFile(f)).digest('hex')));
  const before = await hashes();
  const chain = await ChainEndpoint.open(files);
  const chainExtents = await allExtents(chain);
  const cow = await CopyOnWriteEndpoint.create(chain, dir);
  const model = new MemoryDisk(Buffer.from(points[2] as Buffer));
  assert.deepEqual(await allExtents(cow), chainExtents, 'before any write, the overlay reports the extents of the backup');
  const ops: Array<(e: Endpoint) => Promise<void>> = [
    (e) => e.write(Buffer.alloc(100, 0xa1), 5),
    (e) => e.write(Buffer.alloc(3 * COW_BLOCK + 7, 0xa2), 12 * MiB - 3),
    (e) => e.zero(2 * COW_BLOCK + 1, 5 * COW_BLOCK, true),
    (e) => e.write(Buffer.alloc(10, 0xa3), 2 * COW_BLOCK + 100),
    (e) => e.zero(30 * MiB, 2 * MiB, true),
    (e) => e.write(Buffer.alloc(2 * MiB, 0xa4), DISK - 2 * MiB),
  ];
  for (const op of ops) {
    await op(cow);
    await op(model);
  }
  // Concurrent unaligned writes into the same fresh blocks must all land.
  const concurrent = Array.from({ length: 16 }, (_, i) => [20 * MiB + 1 + i * 4099, 0xb0 + i] as const);
  await Promise.all(concurrent.map(([offset, value]) => cow.write(Buffer.alloc(4099, value), offset)));
  for (const [offset, value] of concurrent) model.image.fill(value, offset, offset + 4099);
  await assertReadsMatch(cow, model.image, 'cow');
  const extents = await allExtents(cow, 30 * MiB, 2 * MiB);
  assert.deepEqual(extents, [{ offset: 30 * MiB, length: 2 * MiB, flags: 3 }]);
  assert.deepEqual((await allExtents(cow, 0, COW_BLOCK))[0]?.flags, 0);
  await cow.flush();
  await cow.close();
  assert.deepEqual(await hashes(), before);
  assert.deepEqual((await fs.readdir(dir)).filter((f) => f.startsWith('virtnbdmap.')), [], 'overlay directory left behind');
});

test('NBD server: libnbd reads, block status, writes through copy-on-write over several connections; read-only refuses writes', async (t) => {
  const dir = await withDir(t, 'server');
  const { files, points } = await buildChain(dir, 2);
  const expected = Buffer.from(points[2] as Buffer);
  const serve = async (readOnly: boolean): Promise<{ socket: string; server: NbdServer }> => {
    const chain = await ChainEndpoint.open(files);
    const endpoint = readOnly ? chain : await CopyOnWriteEndpoint.create(chain, dir);
    const server = new NbdServer(endpoint, { exportName: 'sda', readOnly, maxBlockSize: 4 * MiB, threads: 4 });
    const socket = path.join(dir, `nbd-${readOnly ? 'ro' : 'rw'}.sock`);
    await server.listenUnix(socket);
    t.after(async () => { await server.stop(); await endpoint.close(); });
    return { socket, server };
  };

  const rw = await serve(false);
  // Client and server share this process and its 4 libuv threads, and each libnbd call holds one until the reply
  // comes: 2 calls at a time leave the server threads to answer them. (Out-of-process clients in the integration
  // test use more connections.)
  const client = await NbdEndpoint.open({ socket: rw.socket, exportName: 'sda' }, { metaContexts: [CONTEXT_ALLOCATION], connections: 2 });
  t.after(() => client.close());
  assert.equal(client.size, DISK);
  assert.equal(client.maxRequestSize, 4 * MiB);
  for (let at = 0; at < DISK; at += 4 * MiB) {
    const chunk = Buffer.alloc(4 * MiB);
    await client.read(chunk, at);
    assert.ok(chunk.equals(expected.subarray(at, at + 4 * MiB)), `read at ${at} differs`);
  }
  assert.deepEqual((await allExtents(client)).map((e) => [e.offset / MiB, e.flags]), [[0, 0], [11, 3], [40, 0], [46 + 512 / MiB, 3], [47, 0]]);

  for (const pair of [[0, 1], [2, 3]]) await Promise.all(pair.map((i) => client.write(Buffer.alloc(MiB, 0xc0 + i), i * 3 * MiB + 17)));
  for (const i of [0, 1, 2, 3]) expected.fill(0xc0 + i, i * 3 * MiB + 17, i * 3 * MiB + 17 + MiB);
  await client.zero(44 * MiB, MiB, true);
  expected.fill(0, 44 * MiB, 45 * MiB);
  await client.flush();
  // A second client sees what the first wrote (MULTI_CONN: one shared overlay).
  const other = await NbdEndpoint.open({ socket: rw.socket, exportName: '' });
  t.after(() => other.close());
  const whole = Buffer.alloc(4 * MiB);
  for (let at = 0; at < DISK; at += 4 * MiB) {
    await other.read(whole, at);
    assert.ok(whole.equals(expected.subarray(at, at + 4 * MiB)), `second client: read at ${at} differs`);
  }
  await assert.rejects(NbdEndpoint.open({ socket: rw.socket, exportName: 'nosuch' }), /cannot connect/);

  const ro = await serve(true);
  const reader = await NbdEndpoint.open({ socket: ro.socket, exportName: 'sda' });
  t.after(() => reader.close());
  await assert.rejects(reader.write(Buffer.alloc(512), 0));
  const first = Buffer.alloc(4096);
  await reader.read(first, 0);
  assert.ok(first.equals((points[2] as Buffer).subarray(0, 4096)));

  await rw.server.stop();
  await assert.rejects(fs.access(rw.socket), 'stop() removes the socket');
});

/** An NBD server of `endpoint` on a unix socket in `dir`, stopped (and the endpoint closed) when the test ends; its warnings are kept. */
async function serveRecording(t: { after: (fn: () => Promise<void>) => void }, dir: string, endpoint: Endpoint, options: Partial<NbdServerOptions>): Promise<{ server: NbdServer; socket: string; warnings: string[] }> {
  const warnings: string[] = [];
  const log = new (class extends Logger { override warn(msg: string): void { warnings.push(msg); } })({ quiet: true });
  const server = new NbdServer(endpoint, { exportName: 'sda', readOnly: true, maxBlockSize: 4 * MiB, threads: 2, ...options, log });
  const socket = path.join(dir, 'recorded.sock');
  await server.listenUnix(socket);
  t.after(async () => { await server.stop(); await endpoint.close(); });
  return { server, socket, warnings };
}

test('NBD server: a client that never finishes its handshake is dropped, and clients beyond the cap are refused', async (t) => {
  const dir = await withDir(t, 'limits');
  const { files } = await buildChain(dir, false);
  const { server, socket, warnings } = await serveRecording(t, dir, await ChainEndpoint.open(files), { maxConnections: 2, handshakeTimeoutMs: 300 });
  /** A peer that reads the greeting and then says nothing; resolves with how long the server kept it. */
  const silentPeer = (): { closed: Promise<number> } => {
    const started = Date.now();
    const peer = net.connect(socket);
    peer.resume();
    return { closed: new Promise((resolve) => peer.on('close', () => resolve(Date.now() - started))) };
  };

  const stuck = silentPeer();
  const kept = await stuck.closed;
  assert.ok(kept >= 250 && kept < 5000, `dropped after ${kept} ms`);
  assert.deepEqual(warnings, ['NBD client dropped: no handshake within 0.3 s']);

  // Two clients in transmission fill the cap: a third is refused at connect, and served once one has gone.
  const first = await NbdEndpoint.open({ socket, exportName: 'sda' });
  const second = await NbdEndpoint.open({ socket, exportName: 'sda' });
  await assert.rejects(NbdEndpoint.open({ socket, exportName: 'sda' }));
  assert.match(warnings[1] ?? '', /^NBD client refused \(unix socket\): 2 clients are connected, the most served at once$/);
  const byte = Buffer.alloc(512);
  await first.read(byte, 0);
  await second.close();
  for (let waited = 0; server.connectionCount > 1 && waited < 5000; waited += 20) await new Promise((resolve) => setTimeout(resolve, 20));
  const third = await NbdEndpoint.open({ socket, exportName: 'sda' });
  await third.read(byte, 0);
  // Connected clients in transmission are not timed out.
  await new Promise((resolve) => setTimeout(resolve, 400));
  await first.read(byte, 512);
  await Promise.all([first.close(), third.close()]);
  assert.equal(warnings.length, 2, warnings.join('\n'));
});

/** A client's whole session as bytes: handshake with every option we serve, then one request of each command. */
function clientSession(): Buffer {
  const u16 = (n: number): Buffer => Buffer.from([n >> 8, n & 0xff]);
  const u32 = (n: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
  const u64 = (n: number): Buffer => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; };
  const text = (s: string): Buffer => Buffer.concat([u32(Buffer.byteLength(s)), Buffer.from(s)]);
  const option = (code: number, data: Buffer = Buffer.alloc(0)): Buffer => Buffer.concat([Buffer.from('IHAVEOPT'), u32(code), u32(data.length), data]);
  const request = (flags: number, type: number, handle: number, offset: number, length: number, payload = Buffer.alloc(0)): Buffer =>
    Buffer.concat([u32(0x25609513), u16(flags), u16(type), u64(handle), u64(offset), u32(length), payload]);
  return Buffer.concat([
    u32(3),
    option(8), option(10, Buffer.concat([text('sda'), u32(1), text('base:allocation')])), option(3),
    option(6, Buffer.concat([text('sda'), u16(1), u16(1)])), option(7, Buffer.concat([text('sda'), u16(0)])),
    request(0, 0, 1, 0, 65536), request(0, 7, 2, 0, DISK), request(1, 1, 3, 4096, 512, Buffer.alloc(512, 0xab)),
    request(0, 6, 4, 8192, 4096), request(0, 4, 5, 12288, 4096), request(0, 3, 6, 0, 0), request(0, 5, 7, 0, 65536),
    request(8, 7, 8, MiB, MiB), request(0, 0, 9, DISK - 512, 512), request(0, 2, 10, 0, 0),
  ]);
}

test('NBD server: 1000 damaged client sessions neither crash it nor wedge it; a client after them reads the backup', async (t) => {
  const dir = await withDir(t, 'fuzz');
  const { files, points } = await buildChain(dir, 2);
  const cow = await CopyOnWriteEndpoint.create(await ChainEndpoint.open(files), dir);
  // No cap on clients here: on a busy machine, sessions that have hung up may still be unwinding when the next come.
  const { server, socket, warnings } = await serveRecording(t, dir, cow, { readOnly: false, threads: 4, handshakeTimeoutMs: 2000, maxConnections: 1_000_000 });
  const pick = seeded(20261128);
  const session = clientSession();
  for (let round = 0; round < 1000; round++) {
    let bytes = session;
    const what: string[] = [];
    for (let n = 1 + pick(3); n > 0 && bytes.length > 0; n--) {
      const [damaged, how] = damageOnce(bytes, pick);
      bytes = damaged;
      what.push(how);
    }
    const ended = await new Promise<boolean>((resolve) => {
      const peer = net.connect(socket);
      const timer = setTimeout(() => { peer.destroy(); resolve(false); }, 5000);
      peer.on('error', () => undefined);
      peer.resume();
      peer.on('close', () => { clearTimeout(timer); resolve(true); });
      peer.end(bytes);
    });
    assert.ok(ended, `round ${round} (${what.join(', ')}): the server neither answered to the end nor hung up`);
  }
  for (let waited = 0; server.connectionCount > 0 && waited < 5000; waited += 20) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(server.connectionCount, 0);
  assert.ok(warnings.length > 100 && warnings.every((w) => w.startsWith('NBD client dropped: ')), warnings.filter((w) => !w.startsWith('NBD client dropped: ')).join('\n'));
  // The sessions wrote into the overlay; the last point of the chain shows through where they did not.
  const client = await NbdEndpoint.open({ socket, exportName: 'sda' });
  t.after(() => client.close());
  const untouched = Buffer.alloc(MiB);
  await client.read(untouched, 20 * MiB);
  assert.ok(untouched.equals((points[2] as Buffer).subarray(20 * MiB, 21 * MiB)));
});

/** A client speaking the handshake byte by byte: options sent, their replies read (type and data). */
class OptionClient {
  reader: SocketReader;
  constructor(public socket: net.Socket) {
    this.reader = new SocketReader(socket);
  }

  static async connect(where: net.NetConnectOpts): Promise<OptionClient> {
    const socket = net.connect(where);
    socket.on('error', () => undefined);
    const client = new OptionClient(socket);
    const greeting = await client.reader.read(18);
    assert.equal(greeting.toString('latin1', 0, 16), 'NBDMAGICIHAVEOPT');
    socket.write(Buffer.from([0, 0, 0, 3])); // fixed newstyle, no zeroes
    return client;
  }

  send(option: number, data: Buffer = Buffer.alloc(0), after: Buffer = Buffer.alloc(0)): void {
    const head = Buffer.alloc(16);
    head.write('IHAVEOPT', 'latin1');
    head.writeUInt32BE(option, 8);
    head.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([head, data, after]));
  }

  /** The next reply to `option`: its type and data. */
  async reply(option: number): Promise<{ type: number; data: Buffer }> {
    const head = await this.reader.read(20);
    assert.equal(head.readBigUInt64BE(0), OPTION_REPLY_MAGIC);
    assert.equal(head.readUInt32BE(8), option);
    return { type: head.readUInt32BE(12), data: await this.reader.read(head.readUInt32BE(16)) };
  }

  async ask(option: number, data?: Buffer): Promise<{ type: number; data: Buffer }> {
    this.send(option, data);
    return this.reply(option);
  }

  /** Resolves once the server has hung up. */
  async hungUp(): Promise<void> {
    await assert.rejects(this.reader.read(1), SocketClosedError);
  }
}

/** NBD_OPT_GO / INFO data for export `name`, no information requests. */
const goData = (name: string): Buffer => {
  const out = Buffer.alloc(6 + name.length);
  out.writeUInt32BE(name.length, 0);
  out.write(name, 4, 'latin1');
  return out;
};

test('NBD server with TLS: TCP clients get only NBD_REP_ERR_TLS_REQD (EXPORT_NAME a hang-up) until STARTTLS; after it, TLS with our CA\'s client certificate, a second STARTTLS refused; bytes after STARTTLS, a bad handshake and damaged sessions hung up on; the unix socket plain', async (t) => {
  const dir = await withDir(t, 'tls');
  const { files, points } = await buildChain(dir, false);
  const certs = await withScratchCertificates(t);
  const { server, socket, warnings } = await serveRecording(t, dir, await ChainEndpoint.open(files), { tls: await loadTlsServerFiles(certs.server), maxConnections: 1_000_000, handshakeTimeoutMs: 1000 });
  const port = await server.listenTcp('127.0.0.1', 0);
  const tcp = { host: '127.0.0.1', port };

  const plain = await OptionClient.connect(tcp);
  for (const option of [OPT.GO, OPT.INFO, OPT.LIST, OPT.STRUCTURED_REPLY, OPT.SET_META_CONTEXT, 99]) {
    const data = option === OPT.GO || option === OPT.INFO ? goData('sda') : undefined;
    assert.equal((await plain.ask(option, data)).type, REP.ERR_TLS_REQD, `option ${option} before TLS`);
  }
  assert.equal((await plain.ask(OPT.STARTTLS, Buffer.from('x'))).type, REP.ERR_INVALID, 'STARTTLS with data');
  assert.equal((await plain.ask(OPT.ABORT)).type, REP.ACK, 'ABORT before TLS');
  await plain.hungUp();
  const oldStyle = await OptionClient.connect(tcp);
  oldStyle.send(OPT.EXPORT_NAME, Buffer.from('sda'));
  await oldStyle.hungUp();
  // Bytes after STARTTLS before its reply would be read by no one: a hang-up.
  const eager = await OptionClient.connect(tcp);
  eager.send(OPT.STARTTLS, undefined, Buffer.from('too early'));
  assert.equal((await eager.reply(OPT.STARTTLS)).type, REP.ACK);
  await eager.hungUp();
  // A handshake that is not TLS.
  const garbled = await OptionClient.connect(tcp);
  assert.equal((await garbled.ask(OPT.STARTTLS)).type, REP.ACK);
  garbled.socket.write(Buffer.alloc(64, 0x42));
  await garbled.hungUp();

  // A client that stops within the TLS handshake is dropped at the handshake timeout, with one warning.
  const stalled = await OptionClient.connect(tcp);
  assert.equal((await stalled.ask(OPT.STARTTLS)).type, REP.ACK);
  const before = warnings.length;
  await stalled.hungUp();
  await new Promise((resolve) => setTimeout(resolve, 200)); // the handshake's own failure comes after
  assert.deepEqual(warnings.slice(before), ['NBD client dropped: no handshake within 1 s']);

  // The whole way: STARTTLS, TLS with our CA's client certificate, then the handshake inside it.
  const client = await OptionClient.connect(tcp);
  assert.equal((await client.ask(OPT.STARTTLS)).type, REP.ACK);
  client.reader.detach();
  const read = (name: string): Promise<Buffer> => fs.readFile(path.join(certs.client, name));
  const secure = tls.connect({ socket: client.socket, ca: await read('ca-cert.pem'), cert: await read('client-cert.pem'), key: await read('client-key.pem'), servername: 'localhost' });
  await new Promise<void>((resolve, reject) => { secure.once('secureConnect', resolve); secure.once('error', reject); });
  const inside = new OptionClient(secure);
  assert.equal((await inside.ask(OPT.STARTTLS)).type, REP.ERR_INVALID, 'a second STARTTLS');
  assert.equal((await inside.ask(OPT.STRUCTURED_REPLY)).type, REP.ACK);
  inside.send(OPT.GO, goData('sda'));
  const replies: number[] = [];
  for (let type = 0; type !== REP.ACK;) replies.push(type = (await inside.reply(OPT.GO)).type);
  assert.deepEqual(replies, [REP.INFO, REP.INFO, REP.ACK]);
  // One READ in transmission (structured reply: a 20-byte chunk header, the offset, the data).
  const request = Buffer.alloc(28);
  request.writeUInt32BE(0x25609513, 0);
  request.writeBigUInt64BE(BigInt(20 * MiB), 16);
  request.writeUInt32BE(4096, 24);
  secure.write(request);
  const chunk = await inside.reader.read(20 + 8 + 4096);
  assert.ok(chunk.subarray(28).equals((points[2] as Buffer).subarray(20 * MiB, 20 * MiB + 4096)), 'the read over TLS');
  secure.destroy();

  // The unix socket serves in the clear, and says TLS is not for it.
  const local = await OptionClient.connect({ path: socket });
  assert.equal((await local.ask(OPT.STARTTLS)).type, REP.ERR_POLICY);
  assert.equal((await local.ask(OPT.INFO, goData('sda'))).type, REP.INFO);
  local.socket.destroy();

  // Damaged sessions (the plain one, STARTTLS first) against the gate: each answered or hung up on.
  const pick = seeded(20261129);
  const starttls = Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from('IHAVEOPT'), Buffer.from([0, 0, 0, 5, 0, 0, 0, 0])]);
  for (let round = 0; round < 200; round++) {
    const [bytes] = damageOnce(round % 2 ? clientSession() : Buffer.concat([starttls, randomBytes(300)]), pick);
    const ended = await new Promise<boolean>((resolve) => {
      const peer = net.connect(tcp);
      const timer = setTimeout(() => { peer.destroy(); resolve(false); }, 5000);
      peer.on('error', () => undefined);
      peer.resume();
      peer.on('close', () => { clearTimeout(timer); resolve(true); });
      peer.end(bytes);
    });
    assert.ok(ended, `round ${round}: the server neither answered to the end nor hung up`);
  }
  for (let waited = 0; server.connectionCount > 0 && waited < 5000; waited += 20) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(server.connectionCount, 0);
  assert.ok(warnings.some((w) => /^NBD client refused: 127\.0\.0\.1:\d+ did not start TLS, which this export requires \(--tls\)$/.test(w)), warnings.join('\n'));
  assert.ok(warnings.some((w) => /^NBD client dropped: 127\.0\.0\.1:\d+ sent data after NBD_OPT_STARTTLS before its reply$/.test(w)), warnings.join('\n'));
  assert.ok(warnings.some((w) => /^NBD client dropped: TLS handshake with 127\.0\.0\.1:\d+ failed: /.test(w)), warnings.join('\n'));
});

test("leftovers of gone runs: a name with its process's start is gone exactly when that process is (a zombie is gone); one without, only when its pid is free", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-leftovers-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const live = spawn('sleep', ['60'], { stdio: 'ignore' });
  t.after(() => { live.kill(); });
  const ended = spawn('true', [], { stdio: 'ignore' });
  await new Promise((resolve) => ended.once('exit', resolve));
  const start = processStart(live.pid as number) as string;
  // A zombie: sh starts `true` and becomes sleep, which never waits for it (as a killed server whose parent does not).
  const parent = spawn('sh', ['-c', 'true & exec sleep 60'], { stdio: 'ignore' });
  t.after(() => { parent.kill(); });
  let zombie: number | undefined;
  for (let tries = 0; zombie === undefined; tries++) {
    assert.ok(tries < 200, 'no zombie child of sleep');
    await new Promise((resolve) => setTimeout(resolve, 10));
    const child = Number((await fs.readFile(`/proc/${parent.pid}/task/${parent.pid}/children`, 'utf8')).trim());
    if (child && (await fs.readFile(`/proc/${child}/stat`, 'utf8').catch(() => '')).includes(') Z ')) zombie = child;
  }
  const names = {
    liveWithStart: `virtnbdmap.${live.pid}.${start}.aB3dE6`,
    reusedPid: `virtnbdmap.${live.pid}.${Number(start) + 1}.aB3dE6`,
    liveOldForm: `virtnbdmap.${live.pid}.123456`,
    endedOldForm: `virtnbdmap.${ended.pid}.aB3dE6`,
    zombieWithStart: `virtnbdmap.${zombie}.${processStart(zombie)}.aB3dE6`,
  };
  for (const name of Object.values(names)) await fs.mkdir(path.join(dir, name));
  const pattern = /^virtnbdmap\.(\d+)\.(?:(\d+)\.)?[A-Za-z0-9]{6}$/;
  const found = async (mtimeTellsReuse: boolean): Promise<string[]> =>
    (await leftoversOfGoneRuns(dir, pattern, (stat) => stat.isDirectory(), { mtimeTellsReuse })).map((f) => path.basename(f.file)).sort();
  assert.deepEqual(await found(false), [names.endedOldForm, names.reusedPid, names.zombieWithStart].sort());
  // An old-form entry last changed before its pid's process started, by the wall clock (which a clock step can
  // fool): kept, unless the caller takes that as the pid used again (sockets, checked for a listener too).
  const hourAgo = new Date(Date.now() - 3_600_000);
  await fs.utimes(path.join(dir, names.liveOldForm), hourAgo, hourAgo);
  assert.deepEqual(await found(false), [names.endedOldForm, names.reusedPid, names.zombieWithStart].sort());
  assert.deepEqual(await found(true), [names.endedOldForm, names.liveOldForm, names.reusedPid, names.zombieWithStart].sort());
});
