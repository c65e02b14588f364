// The benchmark's domains on the test bed: disks filled with random data or with many small extents before the domain
// starts, scattered guest writes, raw snapshots of a disk's content for verification, and a plain pull-mode backup
// job whose NBD export nbdcopy reads. Guarantees: domains are TestDomains (removed by destroy(), at exit and on Ctrl-C);
// a fill that did not write every byte throws; an export's backup job is aborted whatever its user does.
import { spawn } from 'node:child_process';
import { randomFill } from 'node:crypto';
import fs from 'node:fs';
import fsp, { type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { backupJobXml } from '../src/libvirt/checkpoints.js';
import { LIBVIRT_URI, run, TestDomain, type TestDisk } from '../test/support/testbed.js';
import { SMALL_EXTENT_BYTES } from './options.js';

const MiB = 1024 ** 2;
/** Largest write from the random file; regions are filled with repeats of it (lz4 cannot see repeats this far apart). */
const RANDOM_FILE_BYTES = 256 * MiB;

export interface Region {
  offset: number;
  length: number;
}

/**
 * Two equal regions of `dataBytes` in all: at the start, and at the middle ('middle') or the very end ('end') of the
 * disk. 'end' gives a small and a huge disk the same data and the same extents, one just before the end of each.
 */
export function twoRegions(diskBytes: number, dataBytes: number, second: 'middle' | 'end'): Region[] {
  const half = dataBytes / 2;
  return [{ offset: 0, length: half }, { offset: second === 'middle' ? diskBytes / 2 : diskBytes - half, length: half }];
}

export interface RandomDiskSpec {
  target: string;
  sizeBytes: number;
  regions: Region[];
}

/** A running domain whose disks hold random data in the given regions, written before it started. */
export async function createRandomDomain(disks: RandomDiskSpec[]): Promise<TestDomain> {
  const domain = await TestDomain.create({ disks: disks.map((d) => ({ target: d.target, sizeMiB: d.sizeBytes / MiB })), start: false });
  return fillThenStart(domain, async () => {
    const randomFile = path.join(domain.dir, 'random.bin');
    const randomBytes = Math.min(RANDOM_FILE_BYTES, Math.max(...disks.flatMap((d) => d.regions.map((r) => r.length))));
    await writeRandomFile(randomFile, randomBytes);
    for (const spec of disks) {
      const writes = spec.regions.flatMap((r) => chunks(r, randomBytes)).flatMap((c) => ['-c', `write -s ${randomFile} ${c.offset} ${c.length}`]);
      const result = await run('qemu-io', ['-t', 'unsafe', '-f', 'qcow2', ...writes, domain.diskPath(spec.target)]);
      assertAllWritten(result.stdout, writes.length / 2, spec.target);
    }
    await fsp.rm(randomFile);
  });
}

/** Where case 8's compressible data comes from: the system's own files, as a guest's system disk holds them. */
const SYSTEM_FILES_DIR = '/usr';

/**
 * A running domain with one disk holding the system's files (a tar stream of SYSTEM_FILES_DIR, started again if it
 * runs short) in the given regions, written before it started: data that lz4 shrinks, as a real disk's does, where
 * the other cases hold random data. Runs of zeros in it (tar's padding) stay holes, as qemu-img convert leaves them.
 */
export async function createSystemFilesDomain(spec: RandomDiskSpec): Promise<TestDomain> {
  const domain = await TestDomain.create({ disks: [{ target: spec.target, sizeMiB: spec.sizeBytes / MiB }], start: false });
  return fillThenStart(domain, async () => {
    const raw = path.join(domain.dir, 'system-files.raw');
    const handle = await fsp.open(raw, 'w');
    try {
      await handle.truncate(spec.sizeBytes);
      await writeSystemFiles(handle, spec.regions);
    } finally {
      await handle.close();
    }
    // The new image reads as zeros, so the holes of the raw file need no writes.
    await run('qemu-img', ['convert', '-n', '--target-is-zero', '-f', 'raw', '-O', 'qcow2', raw, domain.diskPath(spec.target)]);
    await fsp.rm(raw);
  });
}

/** Fills `regions` of the open file with tar streams of SYSTEM_FILES_DIR, one after another until all are full. */
async function writeSystemFiles(handle: FileHandle, regions: readonly Region[]): Promise<void> {
  let index = 0;
  let filled = 0;
  while (index < regions.length) {
    const tar = spawn('tar', ['-cf', '-', '--one-file-system', SYSTEM_FILES_DIR], { stdio: ['ignore', 'pipe', 'ignore'] });
    let streamed = 0;
    try {
      for await (const chunk of tar.stdout as AsyncIterable<Buffer>) {
        streamed += chunk.length;
        for (let at = 0; at < chunk.length && index < regions.length;) {
          const region = regions[index] as Region;
          const length = Math.min(chunk.length - at, region.length - filled);
          const { bytesWritten } = await handle.write(chunk, at, length, region.offset + filled);
          if (bytesWritten !== length) throw new Error(`short write of the system files at ${region.offset + filled}`);
          at += length;
          filled += length;
          if (filled === region.length) [index, filled] = [index + 1, 0];
        }
        if (index === regions.length) break;
      }
    } finally {
      tar.kill();
    }
    if (streamed === 0) throw new Error(`tar of ${SYSTEM_FILES_DIR} gave no bytes`);
  }
}

/** Fills a shut-off domain's images with `fill`, then starts it; a failure removes the domain. */
async function fillThenStart(domain: TestDomain, fill: () => Promise<void>): Promise<TestDomain> {
  try {
    await fill();
    await domain.start();
    return domain;
  } catch (err) {
    await domain.destroy().catch(() => undefined);
    throw err;
  }
}

/**
 * A running domain whose disk (qcow2, 4 KiB clusters) holds `count` separate 4 KiB data extents spread over the whole
 * disk. The writes go to one qemu-io from a command file (too many for a command line), with no flushes.
 */
export async function createExtentDomain(diskBytes: number, count: number): Promise<TestDomain> {
  const domain = await TestDomain.create({ disks: [{ target: 'vda', sizeMiB: diskBytes / MiB }], start: false });
  return fillThenStart(domain, async () => {
    const image = domain.diskPath('vda');
    // Small clusters, so that each write is one small extent and not a 64 KiB one.
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${SMALL_EXTENT_BYTES}`, image, String(diskBytes)]);
    const spacing = Math.floor(diskBytes / count / SMALL_EXTENT_BYTES) * SMALL_EXTENT_BYTES;
    const commandFile = path.join(domain.dir, 'extents.qemu-io');
    const commands = Array.from({ length: count }, (_, i) => `write -P 0x5a ${i * spacing} ${SMALL_EXTENT_BYTES}\n`);
    await fsp.writeFile(commandFile, commands.join(''));
    const written = await qemuIoFromFile(image, commandFile);
    if (written !== count) throw new Error(`qemu-io confirmed ${written} of ${count} extent writes on ${image}`);
    await fsp.rm(commandFile);
  });
}

/** Runs the commands of `commandFile` (fed as stdin) on a qcow2 image; returns how many writes it confirmed. */
function qemuIoFromFile(image: string, commandFile: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const input = fs.openSync(commandFile, 'r');
    const child = spawn('qemu-io', ['-t', 'unsafe', '-f', 'qcow2', image], { stdio: [input, 'pipe', 'pipe'] });
    fs.closeSync(input);
    let confirmed = 0;
    let partialLine = '';
    let stderr = '';
    child.stdout?.on('data', (data: Buffer) => {
      const lines = (partialLine + data.toString()).split('\n');
      partialLine = lines.pop() ?? '';
      confirmed += lines.filter((l) => /wrote (\d+)\/\1 bytes/.test(l)).length;
    });
    child.stderr?.on('data', (data: Buffer) => { stderr += data.toString(); });
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(confirmed) : reject(new Error(`qemu-io on ${image} exited ${code}: ${stderr.trim()}`))));
  });
}

async function writeRandomFile(file: string, bytes: number): Promise<void> {
  const handle = await fsp.open(file, 'w');
  try {
    const block = Buffer.alloc(4 * MiB);
    for (let done = 0; done < bytes; done += block.length) {
      await promisify(randomFill)(block);
      await handle.write(block, 0, Math.min(block.length, bytes - done));
    }
  } finally {
    await handle.close();
  }
}

function chunks(region: Region, max: number): Region[] {
  const out: Region[] = [];
  for (let at = 0; at < region.length; at += max) out.push({ offset: region.offset + at, length: Math.min(max, region.length - at) });
  return out;
}

function assertAllWritten(qemuIoOutput: string, expected: number, target: string): void {
  const confirmed = qemuIoOutput.split('\n').filter((l) => /^wrote (\d+)\/\1 bytes/.test(l)).length;
  if (confirmed !== expected) throw new Error(`${target}: qemu-io confirmed ${confirmed} of ${expected} writes: ${qemuIoOutput.trim()}`);
}

/**
 * One disk of a running domain as the benchmark changes it: scattered guest writes, each batch a new generation, and
 * a raw snapshot per generation (kept with the domain's files until it is destroyed) to compare restores with.
 */
export class DiskUnderTest {
  private generation = 0;
  private readonly snapshots = new Map<number, string>();

  constructor(readonly domain: TestDomain, readonly target: string) {}

  get disk(): TestDisk {
    return this.domain.disk(this.target);
  }

  /**
   * `count` guest writes of `size` bytes at distinct size-aligned offsets inside `within` (the data regions, so that the
   * amount of allocated data stays the same for every later full backup), chosen from `seed`; new pattern per batch.
   */
  async writeScattered(count: number, size: number, seed: number, within: readonly Region[]): Promise<void> {
    const slots = within.flatMap((r) => Array.from({ length: Math.floor(r.length / size) }, (_, i) => r.offset + i * size));
    if (slots.some((offset) => offset % size !== 0)) throw new Error(`the regions for scattered writes must be ${size}-byte aligned`);
    const pattern = 0x41 + (this.generation % 0xbe);
    for (const index of pickDistinct(slots.length, count, seed)) await this.domain.write(this.target, pattern, slots[index] as number, size);
    this.generation++;
  }

  /** Raw copy of the disk as it is now; taken once per generation. */
  async snapshot(): Promise<string> {
    let file = this.snapshots.get(this.generation);
    if (!file) {
      file = await this.domain.snapshot(this.target);
      this.snapshots.set(this.generation, file);
    }
    return file;
  }
}

/** `count` distinct numbers below `range`, from a seeded generator (partial Fisher-Yates). */
function pickDistinct(range: number, count: number, seed: number): number[] {
  if (count > range) throw new Error(`cannot pick ${count} distinct slots out of ${range}`);
  const random = mulberry32(seed);
  const pool = Array.from({ length: range }, (_, i) => i);
  for (let i = 0; i < count; i++) {
    const j = i + Math.floor(random() * (range - i));
    [pool[i], pool[j]] = [pool[j] as number, pool[i] as number];
  }
  return pool.slice(0, count).sort((a, b) => a - b);
}

function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/**
 * Starts a pull-mode backup job (no checkpoint) exporting one disk, the kind of export the backup tools read, runs
 * `use` with its NBD URI and aborts the job. Socket and scratch file live in the domain's dir, which QEMU can write.
 */
export async function withPullExport<T>(domain: TestDomain, target: string, use: (uri: string) => Promise<T>): Promise<T> {
  const socket = path.join(domain.dir, `export.${target}.sock`);
  const scratch = path.join(domain.dir, `export.${target}.scratch`);
  const jobFile = path.join(domain.dir, `export.${target}.xml`);
  const others = domain.disks.map((d) => d.target);
  await fsp.writeFile(jobFile, backupJobXml({ socket }, '', [{ target, scratchFile: scratch }], others));
  await run('virsh', ['-c', LIBVIRT_URI, 'backup-begin', domain.name, jobFile]);
  try {
    return await use(`nbd+unix:///${target}?socket=${socket}`);
  } finally {
    await run('virsh', ['-c', LIBVIRT_URI, 'domjobabort', domain.name]);
    await Promise.all([socket, scratch, jobFile].map((f) => fsp.rm(f, { force: true })));
  }
}

/** Pid of the QEMU process running the domain (libvirt's pid file). */
export async function qemuPidOf(domain: TestDomain): Promise<number> {
  const pid = Number((await fsp.readFile(`/run/libvirt/qemu/${domain.name}.pid`, 'utf8')).trim());
  if (!Number.isSafeInteger(pid) || pid <= 0) throw new Error(`no QEMU pid for ${domain.name}`);
  return pid;
}

/** The extents the export reports as holding data (nbdinfo --map, types 0 and 2: allocated), with their lengths. */
async function dataExtents(uri: string): Promise<Array<{ length: number }>> {
  const map = await run('nbdinfo', ['--map', uri]);
  return map.stdout.split('\n').map((line) => line.trim().split(/\s+/))
    .filter((fields) => fields[2] === '0' || fields[2] === '2')
    .map((fields) => ({ length: Number(fields[1]) }));
}

/** Bytes the export reports as holding data. */
export async function countDataBytes(uri: string): Promise<number> {
  return (await dataExtents(uri)).reduce((sum, extent) => sum + extent.length, 0);
}

/** Number of extents the export reports as holding data. */
export async function countDataExtents(uri: string): Promise<number> {
  return (await dataExtents(uri)).length;
}
