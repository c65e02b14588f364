// Endpoint over an NBD export through libnbd (native addon), with a pool of connections so that several
// requests are in flight. Guarantees: requests never exceed the server's maximum; close() disconnects all.
import fs from 'node:fs/promises';
import path from 'node:path';
import { native, type NbdHandle } from '../native/addon.js';
import { UserError } from '../util/errors.js';
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

/** Largest block-status request: below 4 GiB and aligned. */
const MAX_STATUS_REQUEST = 2 ** 32 - 2 ** 20;

export class NbdEndpoint implements Endpoint {
  private next = 0;

  private constructor(
    private readonly handles: NbdHandle[],
    readonly size: number,
    readonly maxRequestSize: number,
    private readonly address: string,
  ) {}

  get parallelism(): number {
    return this.handles.length * 4;
  }

  static async open(address: NbdAddress, options: NbdOpenOptions = {}): Promise<NbdEndpoint> {
    const contexts = options.metaContexts ?? [];
    const where = address.uri ? `${address.uri}${address.tlsCertificates ? ' (TLS)' : ''}` : `${address.socket} (export ${address.exportName})`;
    const connect = async (): Promise<NbdHandle> => {
      const handle = new (native().NbdHandle)();
      try {
        if (address.uri) await handle.connectUri(address.uri, contexts, address.tlsCertificates);
        else await handle.connectUnix(address.socket ?? '', address.exportName, contexts);
      } catch (err) {
        await handle.close().catch(() => undefined);
        throw new Error(`cannot connect to NBD export ${where}: ${(err as Error).message}`, { cause: err });
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
    return new NbdEndpoint(handles, first.getSize(), maxRequest, where);
  }

  private handle(): NbdHandle {
    const h = this.handles[this.next];
    this.next = (this.next + 1) % this.handles.length;
    return h as NbdHandle;
  }

  read(buffer: Buffer, offset: number): Promise<void> {
    return this.handle().pread(buffer, offset);
  }

  /** The whole buffer from one connection, in READ_REQUEST_SIZE requests, each summed as it arrives. */
  readSummed(buffer: Buffer, offset: number, sums: ReadSums): Promise<{ adler32: number; digest?: string }> {
    return this.handle().preadSummed(buffer, offset, READ_REQUEST_SIZE, sums.adler, sums.digest);
  }

  write(buffer: Buffer, offset: number): Promise<void> {
    return this.handle().pwrite(buffer, offset);
  }

  async zero(offset: number, length: number, allowTrim: boolean): Promise<void> {
    // NBD lengths are 32-bit: split large ranges.
    for (let at = offset; at < offset + length;) {
      const step = Math.min(offset + length - at, MAX_STATUS_REQUEST);
      await this.handle().zero(at, step, allowTrim);
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
      const flat = await handle.blockStatus(at, Math.min(end - at, MAX_STATUS_REQUEST), context);
      if (flat.length < 2) throw new Error(`NBD export ${this.address}: empty block status reply at ${at}`);
      for (let i = 0; i + 1 < flat.length && at < end; i += 2) {
        const extentLength = Math.min(flat[i] as number, end - at);
        if (extentLength <= 0) throw new Error(`NBD export ${this.address}: zero-length extent at ${at}`);
        yield { offset: at, length: extentLength, flags: flat[i + 1] as number };
        at += extentLength;
      }
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.handles.map((h) => h.close().catch(() => undefined)));
  }
}
