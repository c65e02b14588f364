// virtnbdmap's engine: serves a backup at one point in time as an NBD export, for file restore and instant boot.
//   files -> ChainEndpoint (read-only, straight from the backup files) -> CopyOnWriteEndpoint unless read-only
//   -> NbdServer on a unix socket and TCP -> optionally /dev/nbdX through qemu-nbd -c
// Why a server of our own rather than nbdkit: nbdkit cannot read this format, so it would need a plugin in some
// language or our server behind its nbd plugin; the copy-on-write here is small and lets block status show the
// backup's holes and zero ranges through writes. Guarantees: the backup files are never written; stop() (and
// any failure while starting) detaches the device, closes connections and removes the socket and the overlay;
// an exit without stop() (a second Ctrl-C) still removes the socket and the overlay, and detaches the device; the
// sockets and overlays of servers killed (kill -9) are removed by the next one. With TLS, the TCP export serves
// only clients that start TLS and show a certificate of the given CA; its files are read (and checked) before
// anything else, so a missing one fails before anything is served or created.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { ChainEndpoint } from './chainEndpoint.js';
import { CopyOnWriteEndpoint, removeOrphanOverlays } from './copyOnWrite.js';
import { NbdServer, type NbdTlsCredentials, type NbdTrace } from './nbdServer.js';
import type { Endpoint } from '../endpoint/endpoint.js';
import { leftoversOfGoneRuns } from './leftovers.js';
import { listensAt, run } from '../util/process.js';
import { Logger, silentLogger } from '../util/log.js';
import { UserError, describeFailure, errnoOf, oneLine } from '../util/errors.js';

/** Bytes of a unix socket's path the kernel keeps (sun_path, less its terminating zero). */
const MAX_SOCKET_PATH = 107;

export interface MapOptions {
  /** The full or copy stream, then incs/diffs in checkpoint order. */
  files: string[];
  exportName: string;
  /** Serve read-only instead of through copy-on-write. */
  readOnly?: boolean;
  /** Unix socket to create. */
  socket: string;
  /** TCP address and port (0: any free port). */
  listenAddress: string;
  port: number;
  /** Largest request a client may send. */
  maxBlockSize: number;
  /** Requests served at once. */
  threads: number;
  /**
   * Directory of ca-cert.pem (the CA of the clients' certificates), server-cert.pem and server-key.pem: the TCP
   * export then requires TLS. Undefined: no TLS (unless tlsPskFile).
   */
  tlsCertificates?: string;
  /** A file of username:hexkey lines: the TCP export then requires TLS with one of these pre-shared keys instead. */
  tlsPskFile?: string;
  /** Kernel block device to attach (e.g. /dev/nbd0), or undefined for none. */
  device?: string;
  /** Where the copy-on-write overlay goes (default /var/tmp). */
  overlayParent?: string;
  log?: Logger;
  trace?: NbdTrace;
  /** Stops the start (Ctrl-C while the files are indexed), which then cleans up and throws its reason. */
  signal?: AbortSignal;
}

export interface MapSession {
  /** nbd+unix:// and nbd:// (nbds:// with TLS) URIs of the export. */
  uris: string[];
  /** The overlay directory (removed at stop), when writable. */
  overlayDir?: string;
  /** Kernel device attached, if any. */
  device?: string;
  /** What is served: disk, checkpoint, files. */
  description: string;
  server: NbdServer;
  stop(): Promise<void>;
}

const NBD_MODULE = '/sys/module/nbd';

/** Where a server's socket goes unless --socket says otherwise. */
const SOCKET_DIR = '/var/tmp';

/** The socket of the server with process id `pid` unless --socket says otherwise: its name tells its server. */
export function defaultSocket(pid = process.pid): string {
  return path.join(SOCKET_DIR, `virtnbdmap.${pid}.sock`);
}

const DEFAULT_SOCKET = /^virtnbdmap\.(\d+)\.sock$/;

/**
 * Removes the default sockets (virtnbdmap.<pid>.sock) in `dirs` of servers that are gone: one killed (kill -9) could
 * not remove its own, and every run leaves another. A socket something listens on is kept all the same.
 */
async function removeOrphanSockets(dirs: string[], log: Logger): Promise<void> {
  for (const dir of new Set(dirs)) {
    for (const { file, pid } of await leftoversOfGoneRuns(dir, DEFAULT_SOCKET, (stat) => stat.isSocket(), { mtimeTellsReuse: true })) {
      if (await listensAt(file)) continue;
      await fsp.rm(file, { force: true });
      log.info(`removed ${file}, the socket of a virtnbdmap that is gone (pid ${pid})`);
    }
  }
}

/** The files a TLS server needs, in the order --tls names them. */
export const TLS_SERVER_FILES = ['ca-cert.pem', 'server-cert.pem', 'server-key.pem'] as const;

/**
 * Reads a TLS server's certificates from `dir` (--tls-cert): one line naming the first file missing or unreadable,
 * or saying that they do not make a usable certificate and key.
 */
export async function loadTlsServerFiles(dir: string): Promise<NbdTlsCredentials> {
  const [ca, cert, key] = await Promise.all(TLS_SERVER_FILES.map((file) => fsp.readFile(path.join(dir, file)).catch(() => undefined)));
  const missing = [ca, cert, key].findIndex((content) => content === undefined);
  if (missing >= 0) {
    throw new UserError(`--tls: ${path.join(dir, TLS_SERVER_FILES[missing] as string)} is missing or unreadable; give the directory holding ca-cert.pem (the CA that signed the clients' certificates), server-cert.pem and server-key.pem with --tls-cert`);
  }
  const credentials = { kind: 'x509', ca, cert, key } as NbdTlsCredentials & { kind: 'x509' };
  try {
    tls.createSecureContext({ ca, cert, key });
  } catch (err) {
    throw new UserError(`--tls: the certificates in ${dir} cannot be used (${oneLine(err)}); ${TLS_SERVER_FILES.join(', ')} must be PEM files, the key that of server-cert.pem`);
  }
  return credentials;
}

/**
 * Reads --tls-psk's file: `username:hexkey` lines, as psktool (gnutls-bin) writes them and libnbd's tls-psk-file and
 * qemu's tls-creds-psk read them. One line for a file missing or unreadable, a line not of that form, or no key.
 */
export async function loadTlsPskFile(file: string): Promise<NbdTlsCredentials> {
  const text = await fsp.readFile(file, 'utf8').catch(() => undefined);
  if (text === undefined) throw new UserError(`--tls-psk: ${file} is missing or unreadable; give a file of username:hexkey lines (psktool -u NAME -p FILE writes one)`);
  const keys = new Map<string, Buffer>();
  for (const [index, line] of text.split('\n').entries()) {
    if (line.trim() === '') continue;
    const match = /^([^:]+):((?:[0-9a-fA-F]{2})+)$/.exec(line.trim());
    if (!match) throw new UserError(`--tls-psk: line ${index + 1} of ${file} is not username:hexkey (as psktool writes them)`);
    keys.set(match[1] as string, Buffer.from(match[2] as string, 'hex'));
  }
  if (keys.size === 0) throw new UserError(`--tls-psk: ${file} holds no key; give a file of username:hexkey lines (psktool -u NAME -p FILE writes one)`);
  return { kind: 'psk', keys };
}

/** Whether `address` (-l) reaches this host only. */
export function isLoopback(address: string): boolean {
  const bare = address.replace(/^\[|\]$/g, '').toLowerCase();
  if (bare === 'localhost' || bare === '::1') return true;
  const v4 = bare.startsWith('::ffff:') ? bare.slice(7) : bare;
  return net.isIPv4(v4) && v4.startsWith('127.');
}

export async function startMap(options: MapOptions): Promise<MapSession> {
  const log = options.log ?? silentLogger;
  // Before anything is created or served: certificates that cannot serve fail the start.
  const tlsCredentials = options.tlsPskFile !== undefined ? await loadTlsPskFile(options.tlsPskFile)
    : options.tlsCertificates !== undefined ? await loadTlsServerFiles(options.tlsCertificates) : undefined;
  const cleanups: Array<() => Promise<unknown>> = [];
  // Should the process exit without stop() (a second Ctrl-C, a crash), the files still go.
  // The socket only once ours is there: --socket naming something else must never be removed.
  const leftovers: string[] = [];
  let attached: string | undefined;
  const removeLeftovers = (): void => {
    for (const file of leftovers) fs.rmSync(file, { recursive: true, force: true });
    // A device left attached to a server that is gone fails every read; detach it, or say how.
    if (attached && spawnSync('qemu-nbd', ['-d', attached], { stdio: 'ignore', timeout: 5000 }).status !== 0) {
      process.stderr.write(`virtnbdmap: ${attached} may still be attached to the stopped export; detach it with qemu-nbd -d ${attached}\n`);
    }
  };
  process.on('exit', removeLeftovers);
  await removeOrphanSockets([SOCKET_DIR, path.dirname(path.resolve(options.socket))], log);
  const stop = async (): Promise<void> => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch((err: unknown) => log.warn(`cleanup: ${oneLine(err)}`));
    process.off('exit', removeLeftovers);
  };
  try {
    const chain = await ChainEndpoint.open(options.files, { signal: options.signal });
    let endpoint: Endpoint = chain;
    let overlayDir: string | undefined;
    const overlayParent = options.overlayParent ?? '/var/tmp';
    await removeOrphanOverlays(overlayParent, log);
    if (options.readOnly) {
      cleanups.push(() => chain.close());
    } else {
      const cow = await CopyOnWriteEndpoint.create(chain, overlayParent, log).catch(async (err: unknown) => {
        await chain.close();
        const missing = errnoOf(err) === 'ENOENT' && !fs.existsSync(overlayParent);
        const why = missing ? 'the directory does not exist; create it or give another --overlay-dir' : describeFailure(err);
        throw new UserError(`cannot create the copy-on-write overlay in ${overlayParent}: ${why} (or use -r to serve read-only)`);
      });
      endpoint = cow;
      overlayDir = cow.overlayDir;
      leftovers.push(overlayDir);
      cleanups.push(() => cow.close());
    }
    const last = chain.links[chain.links.length - 1];
    // A diff's metadata names the checkpoint the next inc makes: its point is the diff's time, after its parent's.
    const point = last?.level === 'diff' ? `the diff after ${last.meta.parentCheckpoint}` : last?.meta.checkpointName || 'copy';
    const description = `disk ${last?.meta.diskName} at ${point} (${last?.meta.date}) from ${chain.links.map((l) => l.file).join(', ')}`;
    const server = new NbdServer(endpoint, {
      exportName: options.exportName, readOnly: Boolean(options.readOnly), maxBlockSize: options.maxBlockSize,
      threads: options.threads, description, tls: tlsCredentials, log, trace: options.trace,
    });
    cleanups.push(() => server.stop());
    // The kernel keeps 107 bytes of a socket's path (as given: a relative one from the working directory): a longer
    // one was bound cut short, elsewhere, and never removed.
    const pathBytes = Buffer.byteLength(options.socket);
    if (pathBytes > MAX_SOCKET_PATH) throw new UserError(`--socket ${options.socket}: a unix socket's path may hold at most ${MAX_SOCKET_PATH} bytes, this one ${pathBytes}; choose a shorter one`);
    await server.listenUnix(options.socket).catch((err: Error) => {
      // bind() says EACCES, not ENOENT, for a socket in a directory that does not exist.
      const folder = path.dirname(path.resolve(options.socket));
      if (!fs.existsSync(folder)) throw new UserError(`cannot listen on ${options.socket}: its directory ${folder} does not exist; create it or choose another --socket`);
      throw new UserError(`cannot listen on ${options.socket}: ${oneLine(err)}`);
    });
    leftovers.push(options.socket);
    const port = await server.listenTcp(options.listenAddress, options.port).catch((err: NodeJS.ErrnoException) => {
      const hint = err.code === 'EADDRINUSE' ? '; choose another port with -p (0 picks a free one)' : '';
      throw new UserError(`cannot listen on ${options.listenAddress}:${options.port}: ${oneLine(err)}${hint}`);
    });
    const name = encodeURIComponent(options.exportName);
    const host = options.listenAddress.includes(':') ? `[${options.listenAddress}]` : options.listenAddress;
    // A path's space, '&', '#', '%', '+' or non-ASCII letters would end, change or spoil the query: percent-encoded
    // (UTF-8), as libnbd and qemu-nbd decode them.
    // Absolute, so that the URI reaches the socket from any directory (a client names at most 107 bytes of it too).
    const absolute = path.resolve(options.socket);
    if (Buffer.byteLength(absolute) > MAX_SOCKET_PATH) log.warn(`the socket's full path ${absolute} is over the ${MAX_SOCKET_PATH} bytes a client can name: connect from ${path.dirname(absolute)}, with socket=${path.basename(absolute)}`);
    const socket = encodeURIComponent(absolute).replace(/%2F/g, '/');
    const uris = [`nbd+unix:///${name}?socket=${socket}`, `${tlsCredentials ? 'nbds' : 'nbd'}://${host}:${port}/${name}`];
    if (!tlsCredentials && !isLoopback(options.listenAddress)) {
      log.warn(`the TCP export on ${host}:${port} is served to anyone who reaches it, unencrypted and without authentication: give --tls (certificates in --tls-cert) or --tls-psk, or listen on 127.0.0.1`);
    }
    const device = options.device ? await attachDevice(options.device, Boolean(options.readOnly), uris, log) : undefined;
    if (device) {
      attached = device;
      cleanups.push(async () => {
        await run('qemu-nbd', ['-d', device]);
        attached = undefined;
      });
    }
    return { uris, overlayDir, device, description, server, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Attaches the export (its first URI) as `device` through qemu-nbd; where that cannot work, says why and serves on. */
async function attachDevice(device: string, readOnly: boolean, uris: string[], log: Logger): Promise<string | undefined> {
  const only = `serving on ${uris.join(' and ')} only`;
  if (!fs.existsSync(NBD_MODULE)) {
    log.warn(`nbd kernel module not loaded; ${only} (modprobe nbd, then map again to get ${device})`);
    return undefined;
  }
  try {
    await run('qemu-nbd', ['-c', device, '-f', 'raw', ...(readOnly ? ['-r'] : []), uris[0] as string]);
  } catch (err) {
    log.warn(`cannot attach ${device}: ${oneLine(err)}; ${only}`);
    return undefined;
  }
  log.info(`attached as ${device}`);
  return device;
}
