// Throwaway libvirt/QEMU (TCG) domains for tests and the demo, guest writes via the monitor, snapshots and compares; all it creates is removed (destroy, t.after, exit, or a later sweep) and failed guest I/O throws.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { native, type LibvirtConnection, type LibvirtDomain } from '../../src/native/addon.js';
import { domainLockFile } from '../../src/backup/lock.js';
import { runCli, type CliResult } from './cli.js';
import { cleanup } from './cleanup.js';

export const LIBVIRT_URI = 'qemu:///system';
/** Name prefix of test domains and dirs. */
export const TEST_PREFIX = 'vnbdtest';
/** Name prefix of the demo's domain and dirs (scripts/demo.ts). */
export const DEMO_PREFIX = 'virtnbd-demo';
/** The prefixes sweepStaleTestDomains() recognises. */
export type OwnerPrefix = typeof TEST_PREFIX | typeof DEMO_PREFIX;
/** QEMU runs as libvirt-qemu and must reach images, sockets and scratch files here (a root 0755 /tmp dir fails). */
const SCRATCH_ROOT = '/var/tmp';
const QEMU_LOG_DIR = '/var/log/libvirt/qemu';
const OWNER_NAMESPACE = 'urn:virtnbd:testbed';
/** <prefix>-p<owner pid>-...: lets a later sweep tell leftovers of dead processes from dirs in use. */
const SCRATCH_DIR_NAME = new RegExp(`^(?:${TEST_PREFIX}|${DEMO_PREFIX})-p(\\d+)-`);
const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------------------------
// Processes, sizes, temp dirs

export interface RunOptions {
  /** Resolve with the result on a non-zero exit instead of throwing (a signal still throws). */
  allowFailure?: boolean;
}

/** Runs a program without a shell; throws with its stderr when it exits non-zero (unless allowFailure). */
export async function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<CliResult> {
  const result = await runCli(cmd, [...args]);
  if (result.code === 0 || (opts.allowFailure && result.signal === null)) return result;
  const how = result.signal ? `was killed by ${result.signal}` : `exited ${result.code}`;
  throw new Error(`${path.basename(cmd)} ${args.join(' ')} ${how}: ${(result.stderr || result.stdout).trim()}`);
}

/** A byte count, or a string like '64K', '8M', '1G' (binary units, as qemu-io reads them). */
export type Size = number | string;

export function toBytes(size: Size): number {
  if (typeof size === 'number') {
    if (!Number.isSafeInteger(size) || size < 0) throw new Error(`not a byte count: ${size}`);
    return size;
  }
  const match = /^(\d+)\s*([KMGT]?)(?:i?B)?$/i.exec(size.trim());
  if (!match) throw new Error(`not a size: '${size}' (use bytes or e.g. '64K', '8M', '1G')`);
  const unit = (match[2] ?? '').toUpperCase();
  return Number(match[1]) * 1024 ** (unit ? 'KMGT'.indexOf(unit) + 1 : 0);
}

/** Sync clean-ups still owed at exit; entries are dropped once done the normal way. */
const owedAtExit = new Set<() => void>();
let exitHooksInstalled = false;

function oweAtExit(cleanup: () => void): () => void {
  if (!exitHooksInstalled) {
    exitHooksInstalled = true;
    process.once('exit', payExitDebts);
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
      process.once(signal, () => {
        payExitDebts();
        process.exit(128 + os.constants.signals[signal]);
      });
    }
  }
  owedAtExit.add(cleanup);
  return () => owedAtExit.delete(cleanup);
}

function payExitDebts(): void {
  for (const cleanup of owedAtExit) {
    try {
      cleanup();
    } catch {
      // Best effort: the next run's sweep gets whatever is left.
    }
  }
  owedAtExit.clear();
}

/** mkdtemp under /var/tmp, named <owner>-p<pid>-<label>XXXXXX, mode 0777 so QEMU (libvirt-qemu) can use it. */
async function makeScratchDir(owner: OwnerPrefix, label: string): Promise<string> {
  const dir = await fsp.mkdtemp(path.join(SCRATCH_ROOT, `${owner}-p${process.pid}-${label}`));
  await fsp.chmod(dir, 0o777);
  return dir;
}

/**
 * A fresh dir /var/tmp/vnbdtest-p<pid>-<prefix>XXXXXX (mode 0777). The caller removes it; it is removed at process
 * exit if still there, and by a later sweep if this process died.
 */
export async function tempDir(prefix: string, owner: OwnerPrefix = TEST_PREFIX): Promise<string> {
  const dir = await makeScratchDir(owner, prefix);
  oweAtExit(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** tempDir removed when the test ends (cleanup), whatever its outcome. */
export async function withTempDir(t: TestContext, prefix: string): Promise<string> {
  const dir = await tempDir(prefix);
  cleanup(t, () => fsp.rm(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A tmpfs mounted with `options` (size=4M, ro, mode=1777, ...) on a new scratch dir, unmounted and removed when the
 * test ends, after what was started on it since (cleanup: last in, first out). QEMU sees only the mounts of its
 * start: mount one before the domain that is to use it.
 */
export async function withTmpfs(t: TestContext, prefix: string, options: string): Promise<string> {
  const dir = await tempDir(prefix);
  await run('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', dir]);
  cleanup(t, async () => {
    // A process leaving it (a remote shell its ssh's end stops a moment later) may still hold it: up to 3 s.
    for (let attempt = 1; ; attempt++) {
      const result = await run('umount', [dir], { allowFailure: true });
      if (result.code === 0) break;
      if (attempt >= 30 || !/busy/.test(result.stderr)) throw new Error(`umount ${dir} failed: ${result.stderr.trim()}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    await fsp.rm(dir, { recursive: true, force: true });
  });
  return dir;
}

/**
 * Unmounts `mountPoint` and waits (up to 5 s) until its block device `device` opens exclusively again: right after
 * umount, a restore onto the device was refused once as "in use by the system" (its claim not yet released).
 */
export async function unmountDevice(mountPoint: string, device: string): Promise<void> {
  await run('umount', [mountPoint]);
  for (let attempt = 1; ; attempt++) {
    const claimed = await fsp.open(device, fs.constants.O_RDONLY | fs.constants.O_EXCL).then((handle) => handle.close().then(() => false), (err: NodeJS.ErrnoException) => err.code === 'EBUSY');
    if (!claimed) return;
    if (attempt >= 50) throw new Error(`${device} is still claimed 5 s after umount ${mountPoint}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Image helpers

export type ImageFormat = 'qcow2' | 'raw';

export interface CompareResult {
  identical: boolean;
  /** qemu-img's own words, e.g. "Images are identical." or "Content mismatch at offset 1048576!". */
  output: string;
}

/** Throws unless [offset, offset+length) of the image reads as `pattern` bytes (qemu-io read -P). */
export async function assertPattern(image: string, format: ImageFormat, pattern: number, offset: Size, length: Size): Promise<void> {
  const command = `read -P ${hexByte(pattern)} ${toBytes(offset)} ${toBytes(length)}`;
  const result = await run('qemu-io', ['-r', '-U', '-f', format, '-c', command, image], { allowFailure: true });
  const output = (result.stdout + result.stderr).trim();
  if (result.code !== 0 || /failed/i.test(output)) throw new Error(`${image}: ${command}: ${output}`);
}

/** raw for *.raw: probing raw data could mistake it for another format if it starts like one. */
function knownFormat(file: string): ImageFormat | undefined {
  return file.endsWith('.raw') ? 'raw' : undefined;
}

function hexByte(pattern: number): string {
  if (!Number.isInteger(pattern) || pattern < 0 || pattern > 0xff) throw new Error(`pattern must be a byte, got ${pattern}`);
  return `0x${pattern.toString(16).padStart(2, '0')}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Domains

export interface FillSpec {
  /** A byte repeated, or random bytes: buffer mix-ups hide in repeated bytes (every piece looks the same). */
  pattern: number | 'random';
  offsetMiB: number;
  lengthMiB: number;
}

export interface DiskSpec {
  /** vda, vdb, ... (virtio bus) */
  target: string;
  sizeMiB: number;
  /** qcow2 (v3, the default) can hold the persistent bitmaps that incremental backups need. */
  format?: ImageFormat;
  /** Written with qemu-io into the image before the domain starts. */
  fill?: FillSpec[];
  /** The domain sees the image through a loop device, as a block disk (type='block'), as on LVM. */
  block?: boolean;
  /** The image is an empty qcow2 overlay (a linked clone) on a backing image that holds the fill. */
  backing?: boolean;
  /** The domain names the image as a volume of a storage pool (type='volume'): a transient dir pool over the work dir. */
  volume?: boolean;
  /** The domain sees the disk read-only (`<readonly/>`). */
  readOnly?: boolean;
  /** `<transient/>`: libvirt gives QEMU a throwaway overlay of the image, and runs no block job on the disk. */
  transient?: boolean;
  /** startupPolicy='optional': libvirt starts the domain without the disk when its image file is missing (file disks). */
  optional?: boolean;
  /**
   * The domain reaches the image over the network (type='network', NBD, as it reaches Ceph RBD or iSCSI images):
   * a qemu-nbd of the test's serves the image file's bytes, which the domain reads in the disk's format.
   */
  network?: boolean;
}

export interface DomainOptions {
  disks: DiskSpec[];
  /** Start the domain after defining it (default true). */
  start?: boolean;
  /** Domain and dir name prefix (default TEST_PREFIX). */
  namePrefix?: OwnerPrefix;
  /** Configure a QEMU guest agent channel (no guest OS answers on it: the agent stays "not connected"). */
  guestAgent?: boolean;
  /** A network interface (user-mode, needing no host network) with this MAC address. */
  mac?: string;
  /** An empty cdrom drive (hdc, IDE), as most domains have. */
  cdrom?: boolean;
}

export interface TestDisk {
  readonly target: string;
  /** Image file; its basename is also the name virtnbdrestore gives the restored disk. */
  readonly image: string;
  readonly format: ImageFormat;
  readonly sizeBytes: number;
  /** The loop device the domain sees the image through (DiskSpec.block); detached when the domain is removed. */
  device?: string;
  /** The storage pool the domain names the image in (DiskSpec.volume). */
  pool?: string;
  /** The unix socket of the qemu-nbd serving the image (DiskSpec.network); stopped when the domain is removed. */
  socket?: string;
  readOnly?: boolean;
  transient?: boolean;
  optional?: boolean;
}

/** What qemu-io prints that means a command did not do its work (it never fails the monitor command itself). */
const QEMU_IO_FAILURE = /\b(failed|error|not found|invalid|usage|cannot|unknown)\b/i;
/** Read after every qemu-io command: its output in the log proves the command before it has printed all it will. */
const SENTINEL_COMMAND = 'read 0 512';
const SENTINEL_OUTPUT = /^read 512\/512 bytes at offset 0$/m;
const SENTINEL_TIMEOUT_MS = 10_000;

export class TestDomain {
  private running = false;
  private monitor?: Promise<{ connection: LibvirtConnection; domain: LibvirtDomain }>;
  private qdevByImage?: Map<string, string>;
  /** qemu-io output is read from the shared domain log, so commands on one domain go one at a time. */
  private qemuIoQueue: Promise<unknown> = Promise.resolve();
  private snapshotCount = 0;
  private destroyed?: Promise<void>;
  private readonly forgetExitCleanup: () => void;

  private constructor(
    readonly name: string,
    /** Work dir (mode 0777) holding the images, domain.xml and default snapshots. */
    readonly dir: string,
    private diskList: TestDisk[],
    private readonly guestAgent = false,
    private readonly mac?: string,
    private readonly cdrom = false,
  ) {
    this.forgetExitCleanup = oweAtExit(() => removeDomainSync(name, dir));
  }

  /** Creates and fills the images, defines the domain and (unless start: false) starts it. */
  static async create(opts: DomainOptions): Promise<TestDomain> {
    validateDisks(opts.disks);
    const prefix = opts.namePrefix ?? TEST_PREFIX;
    const id = randomBytes(4).toString('hex');
    const dir = await makeScratchDir(prefix, `${id}-`);
    const pool = poolName(`${prefix}-${id}`);
    const disks = opts.disks.map((spec): TestDisk => {
      const format = spec.format ?? 'qcow2';
      const disk: TestDisk = { target: spec.target, image: path.join(dir, `${spec.target}.${format}`), format, sizeBytes: spec.sizeMiB * MiB };
      return {
        ...disk, ...(spec.volume ? { pool } : {}), ...(spec.readOnly ? { readOnly: true } : {}), ...(spec.transient ? { transient: true } : {}), ...(spec.optional ? { optional: true } : {}),
        ...(spec.network ? { socket: path.join(dir, `${spec.target}.nbd.sock`) } : {}),
      };
    });
    const domain = new TestDomain(`${prefix}-${id}`, dir, disks, opts.guestAgent, opts.mac, opts.cdrom);
    try {
      for (const [i, disk] of disks.entries()) await makeImage(disk, opts.disks[i] as DiskSpec, dir);
      if (disks.some((d) => d.pool)) await virsh('pool-create-as', pool, 'dir', '--target', dir);
      const xmlFile = path.join(dir, 'domain.xml');
      await fsp.writeFile(xmlFile, domain.domainXml());
      await virsh('define', xmlFile);
      if (opts.start ?? true) await domain.start();
    } catch (err) {
      await domain.destroy().catch(() => undefined);
      throw err;
    }
    return domain;
  }

  get disks(): readonly TestDisk[] {
    return this.diskList;
  }

  /** Adds a disk to the shut-off domain's definition (virsh attach-disk --config), its image made as create() makes them. */
  async attachDisk(spec: DiskSpec): Promise<TestDisk> {
    if (this.running) throw new Error(`${this.name} is running: attachDisk changes the definition of a shut-off domain`);
    if (spec.block) throw new Error('attachDisk: block disks are not supported');
    validateDisks([...this.diskList.map((d) => ({ target: d.target, sizeMiB: 1 })), spec]);
    const format = spec.format ?? 'qcow2';
    const disk: TestDisk = { target: spec.target, image: path.join(this.dir, `${spec.target}.${format}`), format, sizeBytes: spec.sizeMiB * MiB };
    await makeImage(disk, spec, this.dir);
    await virsh('attach-disk', this.name, disk.image, disk.target, '--driver', 'qemu', '--subdriver', format, '--targetbus', 'virtio', '--config');
    this.diskList.push(disk);
    return disk;
  }

  /** Removes a disk from the shut-off domain's definition (virsh detach-disk --config); its image stays in the work dir. */
  async detachDisk(target: string): Promise<void> {
    if (this.running) throw new Error(`${this.name} is running: detachDisk changes the definition of a shut-off domain`);
    const disk = this.disk(target);
    await virsh('detach-disk', this.name, target, '--config');
    this.diskList = this.diskList.filter((d) => d !== disk);
  }

  /** Grows a disk of the running domain (virsh blockresize), as an administrator does before growing a guest's file system. */
  async resizeDisk(target: string, sizeMiB: number): Promise<void> {
    const disk = this.disk(target);
    if (!this.running) throw new Error(`${this.name} is not running: resizeDisk goes through virsh blockresize`);
    await virsh('blockresize', this.name, target, `${sizeMiB}M`);
    this.diskList = this.diskList.map((d) => (d === disk ? { ...d, sizeBytes: sizeMiB * MiB } : d));
  }

  diskPath(target: string): string {
    return this.disk(target).image;
  }

  disk(target: string): TestDisk {
    const disk = this.disks.find((d) => d.target === target);
    if (!disk) throw new Error(`${this.name} has no disk ${target} (it has ${this.disks.map((d) => d.target).join(', ')})`);
    return disk;
  }

  async start(): Promise<void> {
    await virsh('start', this.name);
    this.running = true;
    this.qdevByImage = undefined;
  }

  /** Powers the domain off (virsh destroy) and keeps its definition, e.g. for offline backups. */
  async stop(): Promise<void> {
    await virsh('destroy', this.name);
    this.running = false;
  }

  /** One HMP command through the native addon (VIRTNBD_TESTBED_MONITOR=virsh uses virsh, to tell fixture faults from addon faults). */
  async monitorCommand(command: string): Promise<string> {
    if (process.env.VIRTNBD_TESTBED_MONITOR === 'virsh') {
      return (await virsh('qemu-monitor-command', '--hmp', this.name, command)).stdout;
    }
    this.monitor ??= openMonitor(this.name);
    const monitor = this.monitor;
    try {
      return await (await monitor).domain.qemuMonitorCommand(command, true);
    } catch (err) {
      if (this.monitor === monitor) this.monitor = undefined;
      throw err;
    }
  }

  /**
   * Runs one qemu-io command on a disk of the running domain, as guest I/O (dirty bitmaps see it), and returns what
   * it printed. Throws when it reports a failure or does not print `expect`.
   */
  qemuIo(target: string, command: string, expect?: RegExp): Promise<string> {
    const result = this.qemuIoQueue.then(() => this.qemuIoNow(target, command, expect));
    this.qemuIoQueue = result.catch(() => undefined);
    return result;
  }

  async write(target: string, pattern: number, offset: Size, length: Size): Promise<void> {
    const [start, count] = this.range(target, offset, length);
    await this.qemuIo(target, `write -P ${hexByte(pattern)} ${start} ${count}`, /^wrote \d+\/\d+ bytes/m);
  }

  /** Guest write-zeroes (qemu-io write -z). */
  async writeZeroes(target: string, offset: Size, length: Size): Promise<void> {
    const [start, count] = this.range(target, offset, length);
    await this.qemuIo(target, `write -z ${start} ${count}`, /^wrote \d+\/\d+ bytes/m);
  }

  /** Guest discard (trim); with discard='unmap' the qcow2 clusters are really freed. */
  async discard(target: string, offset: Size, length: Size): Promise<void> {
    const [start, count] = this.range(target, offset, length);
    await this.qemuIo(target, `discard ${start} ${count}`, /^discard \d+\/\d+ bytes/m);
  }

  async flush(target: string): Promise<void> {
    await this.qemuIo(target, 'flush');
  }

  /**
   * Raw copy of the disk as it is now (the reference for bit-identity checks), by default in the work dir.
   * Flushes first when running, so the qcow2 metadata on disk is current. Returns the file.
   */
  async snapshot(target: string, file?: string): Promise<string> {
    const disk = this.disk(target);
    const out = file ?? path.join(this.dir, `${target}.snapshot${++this.snapshotCount}.raw`);
    if (this.running) await this.flush(target);
    await run('qemu-img', ['convert', '-U', '-f', disk.format, '-O', 'raw', disk.device ?? disk.image, out]);
    return out;
  }

  /**
   * qemu-img compare: same guest-visible content (unallocated counts as zeroes). A format not given is raw for a
   * *.raw file (snapshots) and probed otherwise.
   */
  static async compare(a: string, b: string, formats: { formatA?: string; formatB?: string } = {}): Promise<CompareResult> {
    const args = ['compare', '-U'];
    const formatA = formats.formatA ?? knownFormat(a);
    const formatB = formats.formatB ?? knownFormat(b);
    if (formatA) args.push('-f', formatA);
    if (formatB) args.push('-F', formatB);
    const result = await run('qemu-img', [...args, a, b], { allowFailure: true });
    const output = (result.stdout + result.stderr).trim();
    if (result.code !== 0 && result.code !== 1) throw new Error(`qemu-img compare ${a} ${b} failed: ${output}`);
    return { identical: result.code === 0, output };
  }

  /** Removes the domain (checkpoint metadata included), its log and its work dir. Safe to call twice. */
  destroy(): Promise<void> {
    this.destroyed ??= this.teardown();
    return this.destroyed;
  }

  private async teardown(): Promise<void> {
    this.running = false;
    const monitor = this.monitor;
    this.monitor = undefined;
    if (monitor) await monitor.then(({ connection }) => connection.close()).catch(() => undefined);
    const problems = await removeDomain(this.name, this.dir);
    this.forgetExitCleanup();
    if (problems.length) throw new Error(`removing ${this.name}: ${problems.join('; ')}`);
  }

  private range(target: string, offset: Size, length: Size): [number, number] {
    const disk = this.disk(target);
    const [start, count] = [toBytes(offset), toBytes(length)];
    if (count === 0 || start + count > disk.sizeBytes) {
      throw new Error(`${this.name} ${target}: range ${start}+${count} is empty or past the end (${disk.sizeBytes} bytes)`);
    }
    return [start, count];
  }

  private async qemuIoNow(target: string, command: string, expect?: RegExp): Promise<string> {
    if (!this.running) throw new Error(`${this.name} is not running: qemu-io through the monitor needs a running domain`);
    const qdev = await this.qdevPath(target);
    // qemu-io prints to QEMU's stdout, which libvirt sends to the domain log, not to the monitor reply.
    const log = path.join(QEMU_LOG_DIR, `${this.name}.log`);
    const logStart = await fileSize(log);
    const reply = await this.monitorCommand(`qemu-io -d ${qdev} "${command}"`);
    const sentinelReply = await this.monitorCommand(`qemu-io -d ${qdev} "${SENTINEL_COMMAND}"`);
    const printed = await readLogUntilSentinel(log, logStart, sentinelReply);
    const output = `${reply}${printed}`.trim();
    if (QEMU_IO_FAILURE.test(output)) throw new Error(`${this.name} ${target}: qemu-io "${command}" failed: ${output}`);
    if (expect && !expect.test(output)) throw new Error(`${this.name} ${target}: qemu-io "${command}" did not confirm: '${output}'`);
    return output;
  }

  /** The disk's qdev path (/machine/peripheral/virtio-diskN/virtio-backend), as `info block` shows it. */
  private async qdevPath(target: string): Promise<string> {
    const disk = this.disk(target);
    const image = disk.device ?? disk.image;
    this.qdevByImage ??= parseInfoBlock(await this.monitorCommand('info block'));
    // A network disk is listed by its NBD address (a URI or json: description naming the socket).
    const qdev = disk.socket ? [...this.qdevByImage].find(([name]) => name.includes(disk.socket as string))?.[1] : this.qdevByImage.get(image);
    if (!qdev) throw new Error(`${this.name}: 'info block' lists no device for ${image} (only ${[...this.qdevByImage.keys()].join(', ') || 'none'})`);
    return qdev;
  }

  private domainXml(): string {
    const source = (d: TestDisk): string => {
      if (d.socket) return `<source protocol='nbd'><host transport='unix' socket='${d.socket}'/></source>`;
      if (d.pool) return `<source pool='${d.pool}' volume='${path.basename(d.image)}'/>`;
      return d.device ? `<source dev='${d.device}'/>` : `<source file='${d.image}'${d.optional ? " startupPolicy='optional'" : ''}/>`;
    };
    const disks = this.disks.map((d) => `
    <disk type='${d.socket ? 'network' : d.pool ? 'volume' : d.device ? 'block' : 'file'}' device='disk'>
      <driver name='qemu' type='${d.format}' discard='unmap'/>
      ${source(d)}
      <target dev='${d.target}' bus='virtio'/>${d.readOnly ? '<readonly/>' : ''}${d.transient ? '<transient/>' : ''}
    </disk>`).join('');
    const cdrom = this.cdrom ? `
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>` : '';
    const agent = this.guestAgent ? `
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>` : '';
    const nic = this.mac ? `
    <interface type='user'><mac address='${this.mac}'/><model type='virtio'/></interface>` : '';
    // The owner element lets sweepStaleTestDomains() spare domains of live processes (parallel runs).
    return `<domain type='qemu'>
  <name>${this.name}</name>
  <metadata>
    <vnbd:owner xmlns:vnbd='${OWNER_NAMESPACE}' pid='${process.pid}' dir='${this.dir}'/>
  </metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>${disks}${cdrom}${agent}${nic}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
`;
  }
}

/** Creates a disk's image (its loop device too, for a block disk) and writes its fill. */
async function makeImage(disk: TestDisk, spec: DiskSpec, dir: string): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', disk.format, disk.image, String(disk.sizeBytes)]);
  await fillImage(disk, spec.fill ?? [], dir);
  if (spec.backing) {
    const base = path.join(dir, `${disk.target}.base.${disk.format}`);
    await fsp.rename(disk.image, base);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', disk.format, disk.image]);
  }
  if (disk.socket) {
    // An NBD export does not grow either: room for qcow2's clusters, as for a block device (sparse).
    if (disk.format === 'qcow2') await fsp.truncate(disk.image, disk.sizeBytes + 16 * MiB);
    // --fork returns once the socket listens; QEMU (user libvirt-qemu) must be able to connect.
    await run('qemu-nbd', ['--fork', '--persistent', '--shared=0', '-f', 'raw', '-k', disk.socket, '--pid-file', `${disk.socket}.pid`, disk.image]);
    await fsp.chmod(disk.socket, 0o777);
  }
  if (spec.block) {
    // A block device does not grow: room for every cluster of the disk and qcow2's metadata (sparse).
    await fsp.truncate(disk.image, disk.sizeBytes + 16 * MiB);
    disk.device = (await run('losetup', ['-f', '--show', disk.image])).stdout.trim();
    await fsp.chmod(disk.device, 0o666); // QEMU runs as libvirt-qemu
  }
}

/** Writes the fills into a new image with qemu-io; random ones from a file of random bytes in `dir`, removed after. */
async function fillImage(disk: TestDisk, fills: FillSpec[], dir: string): Promise<void> {
  if (fills.length === 0) return;
  const randomMiB = Math.max(0, ...fills.filter((f) => f.pattern === 'random').map((f) => f.lengthMiB));
  const randomFile = path.join(dir, `${disk.target}.random`);
  if (randomMiB > 0) await fsp.writeFile(randomFile, randomBytes(randomMiB * MiB));
  try {
    const writes = fills.flatMap((f) => ['-c', f.pattern === 'random'
      ? `write -s ${randomFile} ${f.offsetMiB * MiB} ${f.lengthMiB * MiB}`
      : `write -P ${hexByte(f.pattern)} ${f.offsetMiB * MiB} ${f.lengthMiB * MiB}`]);
    await run('qemu-io', ['-f', disk.format, ...writes, disk.image]);
  } finally {
    await fsp.rm(randomFile, { force: true });
  }
}

/** A domain removed when the test ends (cleanup), whatever its outcome. */
export async function withDomain(t: TestContext, opts: DomainOptions): Promise<TestDomain> {
  const domain = await TestDomain.create(opts);
  cleanup(t, () => domain.destroy());
  return domain;
}

function validateDisks(disks: DiskSpec[]): void {
  if (disks.length === 0) throw new Error('a test domain needs at least one disk');
  const targets = new Set<string>();
  for (const disk of disks) {
    if (!/^vd[a-z]+$/.test(disk.target) || targets.has(disk.target)) throw new Error(`bad or repeated virtio target '${disk.target}'`);
    targets.add(disk.target);
    if (!Number.isInteger(disk.sizeMiB) || disk.sizeMiB < 1) throw new Error(`${disk.target}: sizeMiB must be a whole number >= 1`);
    for (const f of disk.fill ?? []) {
      if (f.offsetMiB < 0 || f.lengthMiB <= 0 || f.offsetMiB + f.lengthMiB > disk.sizeMiB) {
        throw new Error(`${disk.target}: fill ${f.offsetMiB}M+${f.lengthMiB}M does not fit in ${disk.sizeMiB}M`);
      }
    }
  }
}

async function openMonitor(name: string): Promise<{ connection: LibvirtConnection; domain: LibvirtDomain }> {
  const connection = await native().libvirtOpen(LIBVIRT_URI);
  try {
    return { connection, domain: await connection.lookupDomainByName(name) };
  } catch (err) {
    await connection.close();
    throw err;
  }
}

/** Maps each image file to the qdev path it is attached to, from HMP `info block`. */
export function parseInfoBlock(info: string): Map<string, string> {
  const byImage = new Map<string, string>();
  for (const block of info.split(/\r?\n\s*\r?\n/)) {
    const image = /^\S+: (.+) \([^)]*\)\s*$/m.exec(block)?.[1];
    const qdev = /^\s*Attached to:\s*(\S+)/m.exec(block)?.[1];
    if (image && qdev) byImage.set(image, qdev);
  }
  return byImage;
}

async function fileSize(file: string): Promise<number> {
  return fsp.stat(file).then((s) => s.size, () => 0);
}

/** What the log gained since `start`, up to the sentinel's output (or all of it if the reply carried the sentinel). */
async function readLogUntilSentinel(log: string, start: number, sentinelReply: string): Promise<string> {
  const deadline = Date.now() + SENTINEL_TIMEOUT_MS;
  for (;;) {
    // virtlogd rotates a full log: then read the new file from its start.
    const from = (await fileSize(log)) < start ? 0 : start;
    const added = await readFrom(log, from);
    if (SENTINEL_OUTPUT.test(sentinelReply)) return added;
    const at = added.search(SENTINEL_OUTPUT);
    if (at >= 0) return added.slice(0, at);
    if (Date.now() > deadline) throw new Error(`no qemu-io output in ${log} after ${SENTINEL_TIMEOUT_MS / 1000} s; seen: '${added.trim()}'`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function readFrom(file: string, offset: number): Promise<string> {
  const handle = await fsp.open(file, 'r');
  try {
    const { size } = await handle.stat();
    const buffer = Buffer.alloc(Math.max(0, size - offset));
    await handle.read(buffer, 0, buffer.length, offset);
    return buffer.toString('utf8');
  } finally {
    await handle.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Removal and sweeping

function virsh(...args: string[]): Promise<CliResult> {
  return run('virsh', ['-c', LIBVIRT_URI, ...args]);
}

/** virsh calls that remove a domain, running or not; --nvram is harmless where there is none. */
/** The transient storage pool of a domain's volume disks (DiskSpec.volume). */
const poolName = (domain: string): string => `${domain}-pool`;

function removalCommands(name: string): string[][] {
  return [
    ['-c', LIBVIRT_URI, 'destroy', name],
    ['-c', LIBVIRT_URI, 'undefine', '--checkpoints-metadata', '--nvram', '--managed-save', name],
    ['-c', LIBVIRT_URI, 'pool-destroy', poolName(name)],
  ];
}
const DOMAIN_ALREADY_GONE = /not running|failed to get domain|domain not found|no domain with matching|failed to get pool|storage pool not found/i;

/** Removes a domain, its log files and its dir; returns the problems met (an absent domain is none). */
async function removeDomain(name: string, dir?: string): Promise<string[]> {
  const problems: string[] = [];
  for (const args of removalCommands(name)) {
    const result = await run('virsh', args, { allowFailure: true });
    if (result.code !== 0 && !DOMAIN_ALREADY_GONE.test(result.stderr)) problems.push(result.stderr.trim());
  }
  if (dir) {
    detachLoopDevices(dir);
    stopNbdServers(dir);
    await fsp.rm(dir, { recursive: true, force: true }).catch((err: Error) => problems.push(err.message));
  }
  for (const log of await qemuLogs(name)) await fsp.rm(log, { force: true });
  // A backup killed with -9 (tests do that on purpose) cannot remove its domain lock; the domain is gone now.
  await fsp.rm(domainLockFile(name), { force: true });
  return problems;
}

function removeDomainSync(name: string, dir: string): void {
  for (const args of removalCommands(name)) {
    try {
      execFileSync('virsh', args, { stdio: 'ignore' });
    } catch {
      // Already gone or not running.
    }
  }
  detachLoopDevices(dir);
  stopNbdServers(dir);
  fs.rmSync(dir, { recursive: true, force: true });
  for (const file of fs.readdirSync(QEMU_LOG_DIR)) {
    if (isLogOf(name, file)) fs.rmSync(path.join(QEMU_LOG_DIR, file), { force: true });
  }
  fs.rmSync(domainLockFile(name), { force: true });
}

/** Stops the qemu-nbd servers of the network disks in `dir` (their pid files: <socket>.pid). */
function stopNbdServers(dir: string): void {
  let names: string[] = [];
  try {
    names = fs.readdirSync(dir).filter((n) => n.endsWith('.nbd.sock.pid'));
  } catch {
    return; // no dir
  }
  for (const name of names) {
    const pid = Number(fs.readFileSync(path.join(dir, name), 'utf8').trim());
    try {
      if (pid > 0) process.kill(pid, 'SIGTERM');
    } catch {
      // already gone
    }
  }
}

/** Detaches the loop devices whose backing files are in `dir` (block disks of a domain being removed). */
function detachLoopDevices(dir: string): void {
  let listing = '';
  try {
    listing = execFileSync('losetup', ['-l', '-n', '-O', 'NAME,BACK-FILE'], { encoding: 'utf8' });
  } catch {
    return; // no loop devices, or no losetup
  }
  for (const line of listing.split('\n')) {
    const [device, backing] = line.trim().split(/\s+/, 2);
    if (device && backing?.startsWith(`${dir}/`)) execFileSync('losetup', ['-d', device], { stdio: 'ignore' });
  }
}

function isLogOf(name: string, file: string): boolean {
  return file === `${name}.log` || file.startsWith(`${name}.log.`);
}

async function qemuLogs(name: string): Promise<string[]> {
  const files = await fsp.readdir(QEMU_LOG_DIR).catch(() => [] as string[]);
  return files.filter((f) => isLogOf(name, f)).map((f) => path.join(QEMU_LOG_DIR, f));
}

/** Whether `pid` is a live node process (the owner of a domain or dir); pid reuse by another program counts as dead. */
function ownerAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0]?.includes('node') ?? false;
  } catch {
    return false;
  }
}

async function domainOwner(name: string): Promise<{ pid: number; dir: string } | undefined> {
  const result = await run('virsh', ['-c', LIBVIRT_URI, 'metadata', name, OWNER_NAMESPACE], { allowFailure: true });
  const pid = /\bpid=["'](\d+)["']/.exec(result.stdout)?.[1];
  const dir = /\bdir=["']([^"']+)["']/.exec(result.stdout)?.[1];
  return pid && dir ? { pid: Number(pid), dir } : undefined;
}

/**
 * Removes test and demo domains (vnbdtest-*, virtnbd-demo-*) and their /var/tmp dirs left by processes that are gone
 * (crashed or killed runs), sparing those of live processes such as a parallel run. Returns what it removed; what it
 * could not remove is reported on stderr, never thrown.
 */
export async function sweepStaleTestDomains(): Promise<string[]> {
  const removed: string[] = [];
  const list = await run('virsh', ['-c', LIBVIRT_URI, 'list', '--all', '--name'], { allowFailure: true });
  if (list.code !== 0) {
    process.stderr.write(`sweep: cannot list domains (${list.stderr.trim()}); is libvirtd running?\n`);
  }
  const names = list.stdout.split('\n').map((n) => n.trim()).filter((n) => n.startsWith(`${TEST_PREFIX}-`) || n.startsWith(`${DEMO_PREFIX}-`));
  for (const name of names) {
    const owner = await domainOwner(name);
    if (owner && ownerAlive(owner.pid)) continue;
    // Only a dir of ours: the metadata is not trusted to name what gets deleted.
    const dir = owner && path.dirname(owner.dir) === SCRATCH_ROOT && SCRATCH_DIR_NAME.test(path.basename(owner.dir)) ? owner.dir : undefined;
    const problems = await removeDomain(name, dir);
    if (problems.length) process.stderr.write(`sweep: ${name}: ${problems.join('; ')}\n`);
    else removed.push(name);
  }
  for (const entry of await fsp.readdir(SCRATCH_ROOT)) {
    const owner = SCRATCH_DIR_NAME.exec(entry)?.[1];
    if (owner === undefined || ownerAlive(Number(owner))) continue;
    const dir = path.join(SCRATCH_ROOT, entry);
    try {
      await fsp.rm(dir, { recursive: true, force: true });
      removed.push(dir);
    } catch (err) {
      process.stderr.write(`sweep: ${dir}: ${(err as Error).message}\n`);
    }
  }
  return removed;
}
