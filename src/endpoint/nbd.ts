// Endpoint over an NBD export through libnbd (native addon), with a pool of connections so that several
// requests are in flight. Guarantees: requests never exceed the server's maximum; close() disconnects all; a
// server that answers nothing for the stall timeout (a hung host, network or storage) has its connections cut,
// and every request, and a connect, fails with one error that names the export and the timeout.
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { native, type NbdHandle } from '../native/addon.js';
import { UserError, errnoOf } from '../util/errors.js';
import { DEFAULT_MAX_REQUEST_SIZE } from '../stream/format.js';
import { READ_REQUEST_SIZE, type Endpoint, type ReadSums, type StatusExtent } from './endpoint.js';

export interface NbdAddress {
  /** Unix socket of the server. */
  socket?: string;
  /** Or a full NBD URI (nbd://host:port/name). */
  uri?: string;
  /** With `uri`: require TLS, with the client certificates (ca-cert.pem, client-cert.pem, client-key.pem) here. */
  tlsCertificates?: string;
  exportName: string;
}

export interface NbdOpenOptions {
  metaContexts?: string[];
  /** Connections to open (capped to 1 when the server cannot share a writable export). */
  connections?: number;
  /** The server is one of ours (qemu-nbd --shared) whose connections share one block backend. */
  sharedBackend?: boolean;
  /**
   * Seconds that requests may wait with no answer from the server before the connections are cut (--nbd-timeout);
   * 0 waits forever. Default DEFAULT_NBD_TIMEOUT. Flushes are not watched: writing back a large cache may take long.
   */
  stallTimeout?: number;
}

/** --nbd-timeout's default: far beyond any answer of a working server, short of a night's backup window. */
export const DEFAULT_NBD_TIMEOUT = 300;

/** Requests of an NBD export that went unanswered for the stall timeout. */
export class NbdStalled extends UserError {}

/** The failure of every request of an endpoint whose server stopped answering. */
function stallError(where: string, seconds: number): UserError {
  return new NbdStalled(`NBD export ${where} answered nothing for ${seconds} s (a hung host, network or storage?); its connections were cut: check the host, or raise --nbd-timeout (0 waits forever)`);
}

/**
 * Watches an endpoint's requests: once some have waited `seconds` with none answered, cuts every connection and
 * fails them all (and every later one) with the stall error, in place of the end-of-file errors the cut causes.
 */
class StallWatch {
  private waiting = 0;
  /** When the last request was answered, or the first of a busy spell was sent. */
  private since = 0;
  private readonly timer: NodeJS.Timeout;
  private readonly period: number;
  private lastCheck = Date.now();
  private stalled: UserError | undefined;

  constructor(private readonly seconds: number, private readonly where: string, private readonly handles: NbdHandle[]) {
    this.period = Math.min(5000, Math.max(100, (seconds * 1000) / 4));
    this.timer = setInterval(() => this.check(), this.period);
    this.timer.unref();
  }

  track<T>(request: () => Promise<T>): Promise<T> {
    if (this.stalled) return Promise.reject(this.stalled);
    if (this.waiting++ === 0) this.since = Date.now();
    let pending: Promise<T>;
    try {
      pending = request();
    } catch (err) {
      this.answered();
      return Promise.reject(err);
    }
    return pending.then(
      (value) => { this.answered(); return value; },
      (err: unknown) => { this.answered(); throw this.stalled ?? err; },
    );
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** Whether requests stalled and the connections were cut. */
  hasStalled(): boolean {
    return this.stalled !== undefined;
  }

  private answered(): void {
    this.waiting -= 1;
    this.since = Date.now();
  }

  private check(): void {
    const now = Date.now();
    // A check long overdue means this process did not run (stopped, its host suspended): answers may be waiting
    // unread, so the server gets a whole timeout afresh.
    if (now - this.lastCheck > 2 * this.period + 1000) this.since = now;
    this.lastCheck = now;
    if (this.waiting === 0 || now - this.since < this.seconds * 1000) return;
    this.stalled = stallError(this.where, this.seconds);
    this.stop();
    for (const handle of this.handles) handle.cut();
  }
}

/** Connects `handle`, cutting it once `seconds` pass without the server's handshake (0: waits forever). */
async function connectWithin(handle: NbdHandle, connect: () => Promise<void>, seconds: number, where: string): Promise<void> {
  let cut = false;
  // Node's timers take at most 2^31-1 ms (24.8 days) and fire at once beyond it.
  const timer = seconds > 0 ? setTimeout(() => { cut = true; handle.cut(); }, Math.min(seconds * 1000, 2 ** 31 - 1)) : undefined;
  try {
    await connect();
  } catch (err) {
    throw cut ? stallError(where, seconds) : err;
  } finally {
    clearTimeout(timer);
  }
}

/** The name of user or group `id` in /etc/passwd or /etc/group, else the number. */
async function nameOf(table: '/etc/passwd' | '/etc/group', id: number): Promise<string> {
  const lines = (await fs.readFile(table, 'utf8').catch(() => '')).split('\n');
  return lines.map((line) => line.split(':')).find((fields) => fields[2] === String(id))?.[0] ?? String(id);
}

/**
 * Why a socket refused this user, in words, with the way out: a backup job's socket is QEMU's (libvirt-qemu, mode
 * 0775 here), whatever libvirt lets a member of the libvirt group do; its group, where it may write, is one.
 */
async function socketRefusal(socket: string, where: string): Promise<string> {
  const me = os.userInfo().username;
  const refusal = `cannot connect to NBD export ${where}: permission denied (EACCES) to ${me}`;
  const st = await fs.stat(socket).catch(() => undefined);
  if (!st) return `${refusal}; run as root`;
  const [user, group] = [await nameOf('/etc/passwd', st.uid), await nameOf('/etc/group', st.gid)];
  const groupWrites = (st.mode & 0o020) !== 0;
  return `${refusal}: the socket is ${user}:${group}'s (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}); run as root${groupWrites ? `, or add ${me} to group ${group}` : ''}`;
}

/** virtnbdbackup's default TCP port of a remote host's NBD server (-P). */
export const DEFAULT_NBD_PORT = 10809;

/** Where --tls looks for this side's certificates by default, as virtnbdbackup does. */
export const DEFAULT_TLS_CERT_DIR = '/etc/pki/qemu';

/** --tls refuses to start without the files libnbd needs for a TLS client, naming the first one missing. */
export async function checkTlsClientFiles(dir: string): Promise<void> {
  for (const file of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) {
    const readable = await fs.access(path.join(dir, file), fs.constants.R_OK).then(() => true, () => false);
    if (!readable) {
      throw new UserError(`--tls: ${path.join(dir, file)} is missing or unreadable; give the directory holding ca-cert.pem (the CA of the host's certificates), client-cert.pem and client-key.pem with --tls-cert`);
    }
  }
}

/** nbd://host:port/export (nbds:// with TLS) of a server on TCP; IPv6 addresses in brackets. */
export function nbdUri(server: { host: string; port: number; tlsCertificates?: string }, exportName: string): string {
  const host = server.host.includes(':') ? `[${server.host}]` : server.host;
  return `${server.tlsCertificates ? 'nbds' : 'nbd'}://${host}:${server.port}/${encodeURIComponent(exportName)}`;
}

/** How long a closing connection waits for the server to hang up after its goodbye (it needs no more than a round trip). */
const GOODBYE_MS = 10_000;

/** Largest block-status request: below 4 GiB and aligned. */
const MAX_STATUS_REQUEST = 2 ** 32 - 2 ** 20;
/**
 * Zeroes go in calls of this size: writing zeros onto a raw file or device takes as long as writing data, so that
 * even a disk of 2 MB/s answers each within the stall timeout's default.
 */
const ZERO_STEP = 256 * 1024 * 1024;

/**
 * What to do when the TLS handshake with a server of another host fails (gnutls's words name no file): this side's
 * certificates (--tls-cert) against the host's.
 */
function tlsAdvice(uri: string, dir: string): string {
  let host = '';
  try {
    host = new URL(uri).hostname;
  } catch {
    // a URI libnbd took and URL does not: the advice names no host
  }
  return `; the TLS handshake failed: check that ${path.join(dir, 'ca-cert.pem')} is the CA that signed the host's server certificate${host ? ` (which must name ${host})` : ''}, and that the host takes ${path.join(dir, 'client-cert.pem')}; give the right directory with --tls-cert`;
}

export class NbdEndpoint implements Endpoint {
  private next = 0;
  private readonly watch: StallWatch | undefined;

  private constructor(
    private readonly handles: NbdHandle[],
    readonly size: number,
    readonly maxRequestSize: number,
    private readonly address: string,
    stallTimeout: number,
  ) {
    this.watch = stallTimeout > 0 ? new StallWatch(stallTimeout, address, handles) : undefined;
  }

  get parallelism(): number {
    return this.handles.length * 4;
  }

  static async open(address: NbdAddress, options: NbdOpenOptions = {}): Promise<NbdEndpoint> {
    const contexts = options.metaContexts ?? [];
    const stallTimeout = options.stallTimeout ?? DEFAULT_NBD_TIMEOUT;
    const where = address.uri ? `${address.uri}${address.tlsCertificates ? ' (TLS)' : ''}` : `${address.socket} (export ${address.exportName})`;
    const connect = async (): Promise<NbdHandle> => {
      const handle = new (native().NbdHandle)();
      try {
        await connectWithin(handle, () => (address.uri
          ? handle.connectUri(address.uri, contexts, address.tlsCertificates)
          : handle.connectUnix(address.socket ?? '', address.exportName, contexts)), stallTimeout, where);
      } catch (err) {
        await handle.close().catch(() => undefined);
        if (err instanceof UserError) throw err;
        if (address.socket && errnoOf(err) === 'EACCES') throw new UserError(await socketRefusal(address.socket, where));
        const advice = address.tlsCertificates && /gnutls|certificate|TLS/i.test((err as Error).message) ? tlsAdvice(address.uri ?? '', address.tlsCertificates) : '';
        throw new Error(`cannot connect to NBD export ${where}: ${(err as Error).message}${advice}`, { cause: err });
      }
      return handle;
    };
    const first = await connect();
    for (const context of contexts) {
      if (!first.canMetaContext(context)) {
        await first.close();
        throw new Error(`NBD export ${where} does not offer meta context ${context}`);
      }
    }
    const wanted = Math.max(1, options.connections ?? 1);
    const count = first.isReadOnly() || first.canMultiConn() || options.sharedBackend ? wanted : 1;
    // The other connections side by side: each handshake is a round trip or two with the server.
    const others = await Promise.allSettled(Array.from({ length: count - 1 }, () => connect()));
    const handles = [first, ...others.flatMap((o) => (o.status === 'fulfilled' ? [o.value] : []))];
    const failed = others.find((o): o is PromiseRejectedResult => o.status === 'rejected');
    if (failed) {
      await Promise.all(handles.map((h) => h.close().catch(() => undefined)));
      throw failed.reason;
    }
    const announced = first.getMaxBlockSize();
    const maxRequest = announced > 0 ? Math.min(announced, DEFAULT_MAX_REQUEST_SIZE) : DEFAULT_MAX_REQUEST_SIZE;
    return new NbdEndpoint(handles, first.getSize(), maxRequest, where, stallTimeout);
  }

  private handle(): NbdHandle {
    const h = this.handles[this.next];
    this.next = (this.next + 1) % this.handles.length;
    return h as NbdHandle;
  }

  /** `request` on the next connection, under the stall watch. */
  private send<T>(request: (handle: NbdHandle) => Promise<T>, handle = this.handle()): Promise<T> {
    return this.watch ? this.watch.track(() => request(handle)) : request(handle);
  }

  read(buffer: Buffer, offset: number): Promise<void> {
    return this.send((h) => h.pread(buffer, offset));
  }

  /** The whole buffer from one connection, in READ_REQUEST_SIZE requests, each summed as it arrives. */
  readSummed(buffer: Buffer, offset: number, sums: ReadSums): Promise<{ adler32: number; digest?: string }> {
    return this.send((h) => h.preadSummed(buffer, offset, READ_REQUEST_SIZE, sums.adler, sums.digest));
  }

  write(buffer: Buffer, offset: number): Promise<void> {
    return this.send((h) => h.pwrite(buffer, offset));
  }

  async zero(offset: number, length: number, allowTrim: boolean): Promise<void> {
    for (let at = offset; at < offset + length;) {
      const step = Math.min(offset + length - at, ZERO_STEP);
      await this.send((h) => h.zero(at, step, allowTrim));
      at += step;
    }
  }

  async flush(): Promise<void> {
    await Promise.all(this.handles.map((h) => (h.canFlush() ? h.flush() : Promise.resolve())));
  }

  async *extents(context: string, offset: number, length: number): AsyncIterable<StatusExtent> {
    const end = offset + length;
    let at = offset;
    const handle = this.handles[0] as NbdHandle;
    while (at < end) {
      const flat = await this.send((h) => h.blockStatus(at, Math.min(end - at, MAX_STATUS_REQUEST), context), handle);
      if (flat.length < 2) throw new Error(`NBD export ${this.address}: empty block status reply at ${at}`);
      for (let i = 0; i + 1 < flat.length && at < end; i += 2) {
        const extentLength = Math.min(flat[i] as number, end - at);
        if (extentLength <= 0) throw new Error(`NBD export ${this.address}: zero-length extent at ${at}`);
        yield { offset: at, length: extentLength, flags: flat[i + 1] as number };
        at += extentLength;
      }
    }
  }

  /**
   * Says goodbye (NBD_CMD_DISC) on each connection and waits for the server to hang up: a server that stopped
   * answering never does, so a connection still open after GOODBYE_MS is cut (at once where requests stalled).
   */
  async close(): Promise<void> {
    this.watch?.stop();
    await Promise.all(this.handles.map(async (h) => {
      const closing = h.close().catch(() => undefined);
      const timer = setTimeout(() => h.cut(), this.watch?.hasStalled() ? 0 : GOODBYE_MS);
      await closing;
      clearTimeout(timer);
    }));
  }
}
