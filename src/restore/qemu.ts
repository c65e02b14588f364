// The restore target image: created with qemu-img to match the source (qcow.json), served by qemu-nbd on a
// unix socket for the stream to be written into, or filled by qemu-img convert from a raw image. Guarantees:
// a thin server detects zero writes and unmaps them, so restored images stay thin; stop() flushes by
// terminating qemu-nbd cleanly.
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { run, serverExit, spawnServer, stopServer } from '../util/process.js';
import { LOCAL_HOST, qemuNbdOverSsh, type DomainHost, type SshHost } from '../libvirt/domainHost.js';
import type { NbdAddress } from '../endpoint/nbd.js';
import { oneLine } from '../util/errors.js';

export type ImageFormat = 'qcow2' | 'raw';

/** Subset of `qemu-img info --output=json` that decides how the image is created. */
interface QemuImageInfo {
  format?: string;
  'cluster-size'?: number;
  'format-specific'?: { type?: string; data?: Record<string, unknown> };
}

function formatData(infoJson: string | undefined): Record<string, unknown> & { clusterSize?: number } {
  if (!infoJson) return {};
  try {
    const info = JSON.parse(infoJson) as QemuImageInfo;
    return { ...(info['format-specific']?.data ?? {}), clusterSize: info['cluster-size'] };
  } catch {
    return {};
  }
}

/** A word qemu-img's -o takes as one value: a comma or '=' would let a crafted qcow.json add options of its own. */
const OPTION_WORD = /^[A-Za-z0-9._-]+$/;
const isWord = (value: unknown): boolean => typeof value === 'string' && OPTION_WORD.test(value);
const isCount = (value: unknown): boolean => Number.isSafeInteger(value) && (value as number) > 0;

/**
 * `-o` options that recreate the source image's qcow2 layout (without its data file, see qcow2DataFile); values
 * that are not what `qemu-img info` writes are left out and named in `ignored`, so the image gets QEMU's default.
 */
export function qcow2CreateOptions(infoJson: string | undefined): { options: string[]; ignored: string[] } {
  const data = formatData(infoJson);
  const options: string[] = [];
  const ignored: string[] = [];
  const put = (key: string, option: string, valid: (value: unknown) => boolean): void => {
    const value = key === 'cluster-size' ? data.clusterSize : data[key];
    if (value === undefined) return;
    if (valid(value)) options.push(`${option}=${String(value)}`);
    else ignored.push(`${key} ${JSON.stringify(value)}`);
  };
  put('compat', 'compat', isWord);
  put('cluster-size', 'cluster_size', isCount);
  if (data['lazy-refcounts'] === true) options.push('lazy_refcounts=on');
  put('compression-type', 'compression_type', isWord);
  put('refcount-bits', 'refcount_bits', isCount);
  if (data['extended-l2'] === true) options.push('extended_l2=on');
  return { options, ignored };
}

/** The source image's external data file (qcow2 `data-file`), if it had one with a usable file name. */
export function qcow2DataFile(infoJson: string | undefined): { file: string; raw: boolean } | undefined {
  const data = formatData(infoJson);
  const file = data['data-file'];
  if (typeof file !== 'string' || ['', '.', '..'].includes(path.basename(file))) return undefined;
  return { file, raw: data['data-file-raw'] === true };
}

/** `-o` options that give a new qcow2 image the external data file `file` (created by qemu-img). */
export function dataFileOptions(file: string, raw: boolean): string[] {
  // qemu-img -o takes commas as separators: a path with one must double it.
  return [`data_file=${path.resolve(file).replace(/,/g, ',,')}`, `data_file_raw=${raw ? 'on' : 'off'}`];
}

/** qemu-img create, on `host` (this one by default). */
export async function createImage(file: string, format: ImageFormat, size: number, options: string[], host: DomainHost = LOCAL_HOST): Promise<void> {
  const args = ['create', '-q', '-f', format];
  if (options.length > 0) args.push('-o', options.join(','));
  args.push(file, String(size));
  await host.run('qemu-img', args);
}

export interface ConvertOptions {
  /** `-o` options of a newly created target. */
  options?: string[];
  /** Write compressed clusters (qcow2 targets). */
  compress?: boolean;
  /** The target exists (a file or device): write into it, zeroes included, instead of creating it. */
  existing?: boolean;
  /** Where both files are: this host by default. */
  host?: DomainHost;
  /** Aborted: qemu-img is ended, and the conversion rejects with the signal's reason once it is gone. */
  signal?: AbortSignal;
}

/**
 * qemu-img convert; zero ranges stay holes in new targets and are written as zeroes into existing ones. It ends
 * with this process (here a parent-death signal, on another host the end of its ssh session): killed, we leave no
 * qemu-img writing on into a file nobody removes.
 */
export async function convertImage(source: string, sourceFormat: ImageFormat, target: string, targetFormat: ImageFormat, opts: ConvertOptions = {}): Promise<void> {
  const args = ['convert', '-q', '-f', sourceFormat, '-O', targetFormat];
  if (opts.existing) args.push('-n');
  if (opts.compress) args.push('-c');
  if (opts.options?.length) args.push('-o', opts.options.join(','));
  args.push(source, target);
  const host = opts.host ?? LOCAL_HOST;
  if (host.remote) await host.runBound('qemu-img', args, opts.signal);
  else await run('qemu-img', args, { signal: opts.signal, bound: true });
}

/**
 * Whether another process holds `file` open for writing (a running domain, a restore's qemu-nbd or qemu-img), by
 * QEMU's image lock: it is opened for writing with nothing written, which that lock refuses. Other failures count
 * as not in use, and are left to the steps that follow, which name them.
 */
export async function heldForWriting(file: string, host: DomainHost = LOCAL_HOST): Promise<boolean> {
  return host.run('qemu-io', ['-f', 'raw', '-c', 'quit', file]).then(() => false, (err: unknown) => /lock\b|another process using the image/i.test(oneLine(err)));
}

/** The first bytes of every qcow2 image. */
export const QCOW2_MAGIC = Buffer.from('QFI\xfb', 'latin1');

/** Virtual size of a file or block device read as raw. */
export async function rawSize(file: string): Promise<number> {
  const { stdout } = await run('qemu-img', ['info', '--output=json', '-f', 'raw', file]);
  return (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
}

export interface ServeOptions {
  file: string;
  format: ImageFormat;
  exportName: string;
  /** Clients that may connect at once. */
  connections: number;
  /** Unmap zero writes and discards, so the image stays thin (false for preallocated images). */
  thin: boolean;
  /** Here: the socket to serve on. On another host: its ssh and the TCP address (with TLS: this side's certificates). */
  at: { socket: string } | { ssh: SshHost; host: string; port: number; tlsCertificates?: string };
}

/** qemu-nbd serving an image writable for a restore, here on a socket or on the image's remote host over TCP. */
export class ImageServer {
  private constructor(readonly address: NbdAddress, private readonly halt: () => Promise<void>, private readonly child?: ChildProcess) {}

  static async start(opts: ServeOptions): Promise<ImageServer> {
    const args = [
      '--format', opts.format, '--export-name', opts.exportName, '--shared', String(opts.connections), '--aio', 'threads',
      '--persistent', '--discard', opts.thin ? 'unmap' : 'ignore', '--detect-zeroes', opts.thin ? 'unmap' : 'off',
    ];
    if (!('socket' in opts.at)) {
      // A remote file system may refuse O_DIRECT; the writes are flushed at the end either way.
      const remote = await qemuNbdOverSsh(opts.at.ssh, [...args, '--cache', 'writeback'], opts.file, opts.exportName, opts.at);
      return new ImageServer(remote.address, () => remote.stop());
    }
    const { socket } = opts.at;
    // Direct I/O: a restore is written once and flushed at the end, so the page cache only adds a copy and a long
    // final flush (2.5 GiB: 3 s in place of 5.4 s here). File systems without O_DIRECT get writeback.
    const cache = (await takesDirectIo(opts.file, opts.format)) ? 'none' : 'writeback';
    const child = await spawnServer('qemu-nbd', ['--socket', socket, ...args, '--cache', cache, opts.file], socket);
    return new ImageServer({ socket, exportName: opts.exportName }, () => stopServer(child, socket), child);
  }

  /** How qemu-nbd ended when it exited on its own (killed, crashed), else undefined (see serverExit; here only). */
  async exitedEarly(): Promise<string | undefined> {
    return this.child ? serverExit(this.child) : undefined;
  }

  /** Stops it, and removes its socket. */
  stop(): Promise<void> {
    return this.halt();
  }
}

/**
 * Whether `file` opens with O_DIRECT (tmpfs before Linux 6.6 and some FUSE file systems refuse it) and QEMU will
 * write it so: a raw file whose size is no multiple of 4 KiB (a disk of 10 MiB + 512 bytes) and whose first block is
 * a hole (a file grown with truncate for a restore onto it) makes QEMU take 4 KiB alignment, and qemu-nbd then
 * refuses to open it ("Image size is not a multiple of request alignment").
 */
async function takesDirectIo(file: string, format: ImageFormat): Promise<boolean> {
  try {
    const handle = await fs.open(file, fs.constants.O_RDWR | fs.constants.O_DIRECT);
    const { size } = await handle.stat().finally(() => handle.close());
    return format !== 'raw' || size % 4096 === 0;
  } catch {
    return false;
  }
}
