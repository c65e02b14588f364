// An NBD server for one export over any Endpoint, on unix sockets and TCP, for libnbd, QEMU and the kernel.
//   per connection: fixed newstyle handshake (EXPORT_NAME, GO/INFO, LIST, ABORT, STRUCTURED_REPLY,
//   SET/LIST_META_CONTEXT for base:allocation) -> requests read in order, served concurrently, replied as done
//   (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS; DISC waits for the requests in flight)
// Guarantees: at most `threads` requests touch the endpoint at once, over all connections; at most
// `maxConnections` clients at once, and a client that has not finished its handshake within `handshakeTimeoutMs` is
// dropped (so idle or stuck peers cannot pin the server's memory); a connection stops
// reading requests while its unsent replies or requests in flight pile up; MULTI_CONN is advertised because
// every connection shares the one endpoint in this process, so a flush covers all of them; a read's reply buffer
// is used again only once the socket has taken it; stop() answers what is in flight, then closes every
// connection and removes the unix sockets. With `tls`, a TCP client gets nothing but NBD_REP_ERR_TLS_REQD (and a
// hang-up for NBD_OPT_EXPORT_NAME) until NBD_OPT_STARTTLS, and then must show a certificate our CA signed (x509) or
// hold one of our pre-shared keys (psk); the unix socket, reachable only through the file system, serves in the clear.
import fs from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import { CONTEXT_ALLOCATION, type Endpoint, type StatusExtent } from '../endpoint/endpoint.js';
import { Logger, silentLogger } from '../util/log.js';
import { oneLine } from '../util/errors.js';
import { WorkWindow } from '../util/window.js';
import { SizeClassPool } from '../util/bufferPool.js';
import { accepts } from '../util/process.js';
import {
  CMD, CMD_FLAG, CMD_NAMES, OPT_NAMES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, NBD_ERR, OPT, OPTION_HEADER_LENGTH, REP,
  REPLY_FLAG_DONE, REPLY_TYPE, REQUEST_HEADER_LENGTH, TFLAG, blockStatusChunk, chunkHeader, errorChunk, exportNameReply,
  greeting, infoBlockSize, infoExport, infoText, numberedString, offsetDataHeader, optionReply, parseRequest, simpleReply,
  type Request,
} from './nbdProtocol.js';
import { SocketClosedError, SocketReader } from './socketReader.js';

/** `in`: from the client; `out`: to the client. `bytes` is the message head (payloads are cut short). */
export type NbdTrace = (direction: 'in' | 'out', what: string, bytes: Buffer) => void;

/**
 * What a TLS server needs: x509, its certificate and key and the CA that must have signed every client's certificate
 * (PEM); or psk, a pre-shared key per user name, which clients prove they hold.
 */
export type NbdTlsCredentials =
  | { kind: 'x509'; cert: Buffer; key: Buffer; ca: Buffer }
  | { kind: 'psk'; keys: ReadonlyMap<string, Buffer> };

/** PSK cipher suites of TLS 1.2 (TLS 1.3's own suites take a PSK as they are); OpenSSL enables none unless asked. */
const PSK_CIPHERS = 'ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256';

/** Options of a TLS server (tls.createServer) for these credentials. */
export function tlsServerOptions(credentials: NbdTlsCredentials): tls.TlsOptions {
  if (credentials.kind === 'x509') {
    const { cert, key, ca } = credentials;
    return { cert, key, ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' };
  }
  return {
    pskCallback: (_socket, identity) => credentials.keys.get(identity) ?? null,
    ciphers: `${PSK_CIPHERS}:${tls.DEFAULT_CIPHERS}`,
    minVersion: 'TLSv1.2',
  };
}

export interface NbdServerOptions {
  exportName: string;
  readOnly: boolean;
  /** Largest READ/WRITE payload advertised (the maximum block size); up to 32 MiB is accepted regardless. */
  maxBlockSize: number;
  /** Requests worked on at once, over all connections. */
  threads: number;
  /** Shown to clients that ask (NBD_INFO_DESCRIPTION, NBD_OPT_LIST). */
  description?: string;
  /** Clients connected at once; more are hung up on at connect (default MAX_CONNECTIONS). */
  maxConnections?: number;
  /** How long a client may take from connect to transmission (default HANDSHAKE_TIMEOUT_MS). */
  handshakeTimeoutMs?: number;
  /** TLS that every client of the TCP listeners must start before anything else (x509, client certificates checked). */
  tls?: NbdTlsCredentials;
  log?: Logger;
  trace?: NbdTrace;
}

const PREFERRED_BLOCK_SIZE = 4096;
/**
 * Payloads up to this are accepted even above the advertised maximum: some clients (nbdcopy 1.14) ignore it, and
 * the protocol says requests under 32 MiB are never abusive.
 */
const TOLERATED_PAYLOAD = 32 * 1024 * 1024;
/** Options longer than this are not from a well-meaning client. */
const MAX_OPTION_LENGTH = 64 * 1024;
/** Metadata context id of base:allocation on every connection. */
const ALLOCATION_CONTEXT_ID = 1;
/** Requests of one connection in flight before it stops reading more. */
const MAX_IN_FLIGHT = 64;
/** Free read-reply buffers kept for reuse. */
const REPLY_SPARE_BYTES = 64 * 1024 * 1024;
/**
 * Write payloads of one connection held while they wait for a slot, before it stops reading more: read before
 * their turn, they would otherwise pile up (64 requests of 32 MiB) for a client that writes fast.
 */
const PAYLOAD_HIGH_WATER = 64 * 1024 * 1024;
/** Unsent reply bytes of one connection before it stops reading more requests. */
const REPLY_HIGH_WATER = 64 * 1024 * 1024;
/** Block status descriptors in one reply; clients ask again from where it ends. */
const MAX_DESCRIPTORS = 64 * 1024;
/**
 * Clients at once. Each may hold up to REPLY_HIGH_WATER + PAYLOAD_HIGH_WATER bytes; the clients of a mapped backup
 * (qemu-nbd -c, QEMU, libguestfs, nbdcopy's four) use a few.
 */
export const MAX_CONNECTIONS = 16;
/** From connect to transmission, as qemu-nbd's default --handshake-limit. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** How long stop() lets requests in flight finish. */
const STOP_GRACE_MS = 3000;
/** Bytes of a payload included in a trace. */
const TRACE_PAYLOAD = 32;

/** An error that becomes this NBD error value in the reply. */
class CommandError extends Error {
  constructor(readonly errno: number, message: string) {
    super(message);
  }
}

/** Counting semaphore: a slot per request being worked on. */
export class Slots {
  private waiting: Array<() => void> = [];
  constructor(private free: number) {}

  async acquire(): Promise<() => void> {
    if (this.free > 0) this.free--;
    else await new Promise<void>((resolve) => this.waiting.push(resolve));
    return () => {
      const next = this.waiting.shift();
      if (next) next();
      else this.free++;
    };
  }
}

export class NbdServer {
  private readonly listeners: Array<{ server: net.Server; socketPath?: string }> = [];
  private readonly connections = new Set<Connection>();
  readonly slots: Slots;
  /**
   * Read replies' buffers, given back once written: fresh ones were freed only by the GC, in batches, so four
   * readers of a mapped backup held up to 100 MB more than they used.
   */
  readonly replyBuffers = new SizeClassPool(REPLY_SPARE_BYTES);
  readonly log: Logger;
  stopping = false;

  constructor(readonly endpoint: Endpoint, readonly options: NbdServerOptions) {
    this.slots = new Slots(Math.max(1, options.threads));
    this.log = options.log ?? silentLogger;
  }

  /**
   * Listens on a new unix socket at `socketPath`. A socket left there by a server that is gone (killed, so it could
   * not remove it) is replaced; anything else there, or a socket something still answers on, is refused.
   */
  async listenUnix(socketPath: string): Promise<void> {
    const there = await fs.lstat(socketPath).catch(() => undefined);
    if (there) {
      if (!there.isSocket() || (await accepts({ path: socketPath }))) {
        throw Object.assign(new Error(`${socketPath} already exists${there.isSocket() ? ' and a server answers on it (another virtnbdmap?)' : ''}; remove it or choose another --socket`), { code: 'EEXIST' });
      }
      await fs.rm(socketPath);
      this.log.info(`removed ${socketPath}, a socket left by a server that is gone`);
    }
    await this.listen({ path: socketPath }, socketPath);
  }

  /** Listens on TCP; returns the port (useful with port 0, which picks a free one). */
  async listenTcp(host: string, port: number): Promise<number> {
    const server = await this.listen({ host, port }, undefined, this.options.tls !== undefined);
    return (server.address() as net.AddressInfo).port;
  }

  private listen(where: net.ListenOptions, socketPath?: string, tlsRequired = false): Promise<net.Server> {
    const server = net.createServer((socket) => this.accept(socket, tlsRequired));
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(where, () => {
        server.off('error', reject);
        server.on('error', (err) => this.log.error(`NBD listener: ${oneLine(err)}`));
        this.listeners.push({ server, socketPath });
        resolve(server);
      });
    });
  }

  private accept(socket: net.Socket, tlsRequired: boolean): void {
    if (this.stopping) {
      socket.destroy();
      return;
    }
    const most = this.options.maxConnections ?? MAX_CONNECTIONS;
    if (this.connections.size >= most) {
      this.log.warn(`NBD client refused (${socket.remoteAddress ?? 'unix socket'}): ${most} clients are connected, the most served at once`);
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const connection = new Connection(this, socket, tlsRequired);
    this.connections.add(connection);
    this.log.debug(`NBD client connected (${socket.remoteAddress ?? 'unix socket'})`);
    void connection.run().finally(() => {
      this.connections.delete(connection);
      this.log.debug('NBD client disconnected');
    });
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Stops listening, lets requests in flight finish (briefly), closes all connections, removes the sockets. */
  async stop(): Promise<void> {
    this.stopping = true;
    const closed = this.listeners.map(({ server }) => new Promise<void>((resolve) => server.close(() => resolve())));
    await Promise.all([...this.connections].map((c) => c.shutdown()));
    await Promise.all(closed);
    for (const { socketPath } of this.listeners) if (socketPath) await fs.rm(socketPath, { force: true });
  }

  /** Largest READ/WRITE payload served. */
  get payloadLimit(): number {
    return Math.max(this.options.maxBlockSize, TOLERATED_PAYLOAD);
  }

  /** Whether `name` selects our export; the empty name is the default export. */
  knows(name: string): boolean {
    return name === this.options.exportName || name === '';
  }

  transmissionFlags(structured: boolean): number {
    let flags = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_FUA | TFLAG.CAN_MULTI_CONN | TFLAG.SEND_CACHE;
    flags |= this.options.readOnly ? TFLAG.READ_ONLY : TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES;
    // Every read is answered by one data chunk, so "don't fragment" always holds.
    if (structured) flags |= TFLAG.SEND_DF;
    return flags;
  }
}

class Connection {
  /** The client's socket: the TLS one once STARTTLS has been negotiated. */
  private socket: net.Socket;
  private reader: SocketReader;
  /** TLS started (NBD_OPT_STARTTLS, then a handshake with a certificate our CA signed). */
  private secured = false;
  private structured = false;
  private allocationSelected = false;
  private noZeroes = false;
  private inTransmission = false;
  /**
   * Requests being served: at most MAX_IN_FLIGHT, and their write payloads up to PAYLOAD_HIGH_WATER (plus the one
   * just read); what they read is bounded by the server's slots, their replies by REPLY_HIGH_WATER.
   */
  private readonly requests = new WorkWindow(PAYLOAD_HIGH_WATER, MAX_IN_FLIGHT - 1);

  constructor(private readonly server: NbdServer, socket: net.Socket, private readonly tlsRequired: boolean) {
    this.socket = socket;
    this.reader = new SocketReader(socket);
    socket.on('error', (err) => server.log.debug(`NBD connection: ${oneLine(err)}`));
  }

  private get endpoint(): Endpoint {
    return this.server.endpoint;
  }

  async run(): Promise<void> {
    const limit = this.server.options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS;
    const timer = setTimeout(() => this.hangUp(`no handshake within ${limit / 1000} s`), limit);
    try {
      const entered = await this.handshake();
      clearTimeout(timer);
      if (entered) {
        this.inTransmission = true;
        await this.transmission();
      }
    } catch (err) {
      if (!(err instanceof SocketClosedError)) this.server.log.warn(`NBD connection dropped: ${oneLine(err)}`);
      this.socket.destroy();
    } finally {
      clearTimeout(timer);
    }
    await this.requests.settle();
  }

  /** Ends the connection for stop(): at once during the handshake, after the requests in flight otherwise. */
  async shutdown(): Promise<void> {
    if (this.inTransmission) {
      const grace = new Promise((resolve) => setTimeout(resolve, STOP_GRACE_MS).unref());
      await Promise.race([this.requests.settle(), grace]);
    }
    this.socket.destroy();
  }

  private send(what: string, ...buffers: Buffer[]): void {
    this.sendThen(what, undefined, ...buffers);
  }

  /** Sends `buffers`; `written` runs once the socket no longer needs them (sent, or the socket gone). */
  private sendThen(what: string, written: (() => void) | undefined, ...buffers: Buffer[]): void {
    if (this.socket.destroyed || this.socket.writableEnded) {
      written?.();
      return;
    }
    this.server.options.trace?.('out', what, buffers[0] as Buffer);
    buffers.forEach((buffer, i) => this.socket.write(buffer, i === buffers.length - 1 ? () => written?.() : undefined));
  }

  private hangUp(reason: string): false {
    // Once: a TLS handshake cut short by the handshake timeout fails in turn.
    if (!this.droppedBecause) this.server.log.warn(`NBD client dropped: ${reason}`);
    this.droppedBecause ??= reason;
    this.socket.destroy();
    return false;
  }

  private droppedBecause: string | undefined;

  /** Option haggling; true when the client entered transmission. */
  private async handshake(): Promise<boolean> {
    this.send('greeting', greeting());
    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    if (clientFlags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) return this.hangUp(`unknown client flags ${clientFlags}`);
    this.noZeroes = (clientFlags & FLAG_NO_ZEROES) !== 0;
    for (;;) {
      const head = await this.reader.read(OPTION_HEADER_LENGTH);
      if (head.readBigUInt64BE(0) !== IHAVEOPT) return this.hangUp('bad option magic');
      const option = head.readUInt32BE(8);
      const length = head.readUInt32BE(12);
      if (length > MAX_OPTION_LENGTH) return this.hangUp(`option of ${length} bytes`);
      const data = await this.reader.read(length);
      const optionName = OPT_NAMES[option] ?? String(option);
      this.server.options.trace?.('in', `option ${optionName}`, Buffer.concat([head, data.subarray(0, TRACE_PAYLOAD)]));
      const reply = (type: number, payload?: Buffer): void => this.send(`option ${optionName} reply ${type}`, optionReply(option, type, payload));
      const fail = (type: number, message: string): void => reply(type, Buffer.from(message, 'utf8'));
      if (this.server.stopping && option !== OPT.ABORT) {
        // NBD_OPT_EXPORT_NAME has no error reply: the only refusal is to hang up.
        if (option === OPT.EXPORT_NAME) return this.hangUp('server is shutting down');
        fail(REP.ERR_SHUTDOWN, 'server is shutting down');
        continue;
      }
      if (this.tlsRequired && !this.secured && option !== OPT.STARTTLS && option !== OPT.ABORT) {
        const refusal = `${this.peer} did not start TLS, which this export requires (${this.server.options.tls?.kind === 'psk' ? '--tls-psk' : '--tls'})`;
        if (option === OPT.EXPORT_NAME) return this.hangUp(refusal);
        if (!this.refusedPlain) this.server.log.warn(`NBD client refused: ${refusal}`);
        this.refusedPlain = true;
        fail(REP.ERR_TLS_REQD, 'this export requires TLS: connect with nbds:// and the certificates of its CA');
        continue;
      }
      switch (option) {
        case OPT.EXPORT_NAME: {
          const name = data.toString('utf8');
          if (!this.server.knows(name)) return this.hangUp(`unknown export '${name}'`);
          this.send('export', exportNameReply(this.endpoint.size, this.server.transmissionFlags(this.structured), this.noZeroes));
          return true;
        }
        case OPT.ABORT:
          reply(REP.ACK);
          this.socket.end();
          return false;
        case OPT.LIST: {
          if (length > 0) {
            fail(REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          const name = Buffer.from(this.server.options.exportName, 'utf8');
          reply(REP.SERVER, Buffer.concat([numberedString(name.length, this.server.options.exportName), Buffer.from(this.server.options.description ?? '', 'utf8')]));
          reply(REP.ACK);
          break;
        }
        case OPT.STARTTLS:
          if (length > 0) fail(REP.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
          else if (this.secured) fail(REP.ERR_INVALID, 'TLS is already started');
          else if (!this.tlsRequired) fail(REP.ERR_POLICY, this.server.options.tls ? 'TLS is served on the TCP export; this unix socket serves in the clear' : 'TLS is not enabled on this server (virtnbdmap --tls)');
          else {
            reply(REP.ACK);
            if (!(await this.startTls())) return false;
          }
          break;
        case OPT.INFO:
        case OPT.GO:
          if (this.info(data, reply, fail) && option === OPT.GO) return true;
          break;
        case OPT.STRUCTURED_REPLY:
          if (length > 0) {
            fail(REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
            break;
          }
          this.structured = true;
          reply(REP.ACK);
          break;
        case OPT.LIST_META_CONTEXT:
        case OPT.SET_META_CONTEXT:
          this.metaContext(option === OPT.SET_META_CONTEXT, data, reply, fail);
          break;
        default:
          fail(REP.ERR_UNSUP, `option ${option} is not supported`);
      }
    }
  }

  private refusedPlain = false;

  /** Who the client is, for log lines. */
  private get peer(): string {
    return this.socket.remoteAddress ? `${this.socket.remoteAddress}:${this.socket.remotePort}` : 'the unix socket\'s client';
  }

  /**
   * After NBD_OPT_STARTTLS's ACK: the TLS handshake on the same connection, through a tls.Server of its own (which
   * checks the client's certificate against our CA; a socket wrapped by hand checks nothing). False when it fails.
   */
  private async startTls(): Promise<boolean> {
    const credentials = this.server.options.tls as NbdTlsCredentials;
    const options = tlsServerOptions(credentials);
    // The client waits for the ACK before its handshake: bytes after STARTTLS would be read by no one.
    if (this.reader.detach() > 0) return this.hangUp(`${this.peer} sent data after NBD_OPT_STARTTLS before its reply`);
    const raw = this.socket;
    try {
      const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
        const handshake = tls.createServer(options);
        handshake.once('secureConnection', resolve);
        // A certificate our CA did not sign ends the handshake as a hang-up: the socket says why.
        handshake.once('tlsClientError', (err: Error, socket: tls.TLSSocket) => reject(socket.authorizationError ? new Error(`its certificate was refused: ${String(socket.authorizationError)}`) : err));
        // After the TLS socket's own word on it (its close comes later), which says why.
        raw.once('close', () => setImmediate(() => reject(new Error('connection closed'))));
        handshake.emit('connection', raw);
      });
      secure.on('error', (err) => this.server.log.debug(`NBD connection: ${oneLine(err)}`));
      this.socket = secure;
      this.reader = new SocketReader(secure);
      this.secured = true;
      this.server.log.debug(`NBD client ${raw.remoteAddress}:${raw.remotePort} started TLS (${secure.getProtocol() ?? '?'})`);
      return true;
    } catch (err) {
      const message = oneLine(err);
      this.server.log.debug(`NBD TLS handshake: ${message}`);
      // OpenSSL's words: a wrong key fails the binder (TLS 1.3) or the MAC (1.2); an unknown name falls back to
      // certificates, which a PSK server has none of.
      const why = credentials.kind === 'psk' && /psk|bad record mac|decrypt|no suitable signature algorithm|no shared cipher/i.test(message)
        ? 'its user name or key is not one of --tls-psk\'s'
        : /no certificate|peer did not return a certificate/i.test(message) ? 'it showed no client certificate signed by the CA of --tls-cert (a TLS client offers only one that CA signed)' : message;
      return this.hangUp(`TLS handshake with ${raw.remoteAddress}:${raw.remotePort} failed: ${why}`);
    }
  }

  /** NBD_OPT_INFO / NBD_OPT_GO; true when the export was accepted. */
  private info(data: Buffer, reply: (type: number, payload?: Buffer) => void, fail: (type: number, message: string) => void): boolean {
    const nameLength = data.length >= 4 ? data.readUInt32BE(0) : Infinity;
    if (nameLength + 6 > data.length) {
      fail(REP.ERR_INVALID, 'malformed NBD_OPT_INFO/GO');
      return false;
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * count) {
      fail(REP.ERR_INVALID, 'malformed information request list');
      return false;
    }
    if (!this.server.knows(name)) {
      fail(REP.ERR_UNKNOWN, `no export named '${name}'; this server exports '${this.server.options.exportName}'`);
      return false;
    }
    const requested = new Set(Array.from({ length: count }, (_, i) => data.readUInt16BE(6 + nameLength + 2 * i)));
    const { maxBlockSize } = this.server.options;
    reply(REP.INFO, infoExport(this.endpoint.size, this.server.transmissionFlags(this.structured)));
    // Sent unasked too: the maximum is enforced either way.
    reply(REP.INFO, infoBlockSize(1, Math.min(PREFERRED_BLOCK_SIZE, maxBlockSize), maxBlockSize));
    if (requested.has(INFO.NAME)) reply(REP.INFO, infoText(INFO.NAME, this.server.options.exportName));
    if (requested.has(INFO.DESCRIPTION) && this.server.options.description) reply(REP.INFO, infoText(INFO.DESCRIPTION, this.server.options.description));
    reply(REP.ACK);
    return true;
  }

  /** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: base:allocation is the one context. */
  private metaContext(select: boolean, data: Buffer, reply: (type: number, payload?: Buffer) => void, fail: (type: number, message: string) => void): void {
    if (select) this.allocationSelected = false;
    if (!this.structured) {
      fail(REP.ERR_INVALID, 'negotiate structured replies first');
      return;
    }
    const queries = parseContextQueries(data);
    if (!queries) {
      fail(REP.ERR_INVALID, 'malformed meta context request');
      return;
    }
    if (!this.server.knows(queries.exportName)) {
      fail(REP.ERR_UNKNOWN, `no export named '${queries.exportName}'`);
      return;
    }
    const matches = select
      ? queries.list.includes(CONTEXT_ALLOCATION)
      : queries.list.length === 0 || queries.list.some((q) => q === CONTEXT_ALLOCATION || q === 'base:');
    if (matches) {
      reply(REP.META_CONTEXT, numberedString(select ? ALLOCATION_CONTEXT_ID : 0, CONTEXT_ALLOCATION));
      if (select) this.allocationSelected = true;
    }
    reply(REP.ACK);
  }

  /** Reads requests until NBD_CMD_DISC or the end of the connection; each is served on its own. */
  private async transmission(): Promise<void> {
    const { trace } = this.server.options;
    const payloadLimit = this.server.payloadLimit;
    for (;;) {
      const header = await this.reader.read(REQUEST_HEADER_LENGTH);
      const request = parseRequest(header);
      if (!request) {
        this.hangUp('bad request magic');
        return;
      }
      let payload: Buffer | undefined;
      if (request.type === CMD.WRITE) {
        // The payload cannot be skipped safely when it is absurdly large: end the connection instead.
        if (request.length > payloadLimit) {
          this.hangUp(`write of ${request.length} bytes exceeds the maximum block size ${payloadLimit}`);
          return;
        }
        payload = await this.reader.read(request.length);
      }
      trace?.('in', `${CMD_NAMES[request.type] ?? request.type} offset=${request.offset} length=${request.length} flags=${request.flags}`,
        Buffer.concat([header, (payload ?? Buffer.alloc(0)).subarray(0, TRACE_PAYLOAD)]));
      if (request.type === CMD.DISC) {
        await this.requests.settle();
        this.socket.end();
        return;
      }
      await this.requests.add(this.serve(request, payload), payload?.length ?? 0);
      while (!this.socket.destroyed && this.socket.writableLength > REPLY_HIGH_WATER) await drained(this.socket);
      if (this.socket.destroyed) return;
    }
  }

  private async serve(request: Request, payload: Buffer | undefined): Promise<void> {
    if (this.server.stopping) {
      this.replyError(request, NBD_ERR.ESHUTDOWN, 'server is shutting down');
      return;
    }
    const release = await this.server.slots.acquire();
    try {
      await this.execute(request, payload);
    } catch (err) {
      const errno = errnoOf(err);
      if (!(err instanceof CommandError)) this.server.log.warn(`NBD ${CMD_NAMES[request.type]} at ${request.offset}+${request.length} failed: ${oneLine(err)}`);
      this.replyError(request, errno, oneLine(err));
    } finally {
      release();
    }
  }

  private async execute(request: Request, payload: Buffer | undefined): Promise<void> {
    const { offset, length, flags } = request;
    const endpoint = this.endpoint;
    switch (request.type) {
      case CMD.READ: {
        this.allowFlags(request, CMD_FLAG.FUA | CMD_FLAG.DF);
        this.checkRange(request, NBD_ERR.EINVAL);
        const buffers = this.server.replyBuffers;
        // A failed read keeps its buffer: parts of the read may still be filling it.
        const data = buffers.acquire(length);
        if (length > 0) await endpoint.read(data, offset);
        this.replyData(request, data, () => buffers.release(data));
        return;
      }
      case CMD.WRITE:
        this.allowFlags(request, CMD_FLAG.FUA);
        this.checkWritable(request);
        if (length > 0) await endpoint.write(payload as Buffer, offset);
        break;
      case CMD.TRIM:
      case CMD.WRITE_ZEROES:
        this.allowFlags(request, request.type === CMD.TRIM ? CMD_FLAG.FUA : CMD_FLAG.FUA | CMD_FLAG.NO_HOLE);
        this.checkWritable(request);
        if (length > 0) await endpoint.zero(offset, length, !(flags & CMD_FLAG.NO_HOLE));
        break;
      case CMD.FLUSH:
        this.allowFlags(request, CMD_FLAG.FUA);
        await endpoint.flush();
        break;
      case CMD.CACHE:
        this.allowFlags(request, 0);
        this.checkRange(request, NBD_ERR.EINVAL);
        break;
      case CMD.BLOCK_STATUS:
        await this.blockStatus(request);
        return;
      default:
        throw new CommandError(NBD_ERR.EINVAL, `unknown command ${request.type}`);
    }
    if (flags & CMD_FLAG.FUA) await endpoint.flush();
    this.send(`reply ${CMD_NAMES[request.type]}`, simpleReply(request.handle, 0));
  }

  private async blockStatus(request: Request): Promise<void> {
    this.allowFlags(request, CMD_FLAG.REQ_ONE);
    if (!this.structured || !this.allocationSelected) throw new CommandError(NBD_ERR.EINVAL, 'no meta context was negotiated');
    if (request.length === 0) throw new CommandError(NBD_ERR.EINVAL, 'block status of 0 bytes');
    this.checkRange(request, NBD_ERR.EINVAL);
    const extents: StatusExtent[] = [];
    const max = request.flags & CMD_FLAG.REQ_ONE ? 1 : MAX_DESCRIPTORS;
    for await (const extent of this.endpoint.extents(CONTEXT_ALLOCATION, request.offset, request.length)) {
      extents.push(extent);
      if (extents.length >= max) break;
    }
    if (extents.length === 0) throw new Error(`no status for ${request.offset}+${request.length}`);
    this.send('reply BLOCK_STATUS', blockStatusChunk(request.handle, ALLOCATION_CONTEXT_ID, extents));
  }

  private allowFlags(request: Request, allowed: number): void {
    if (request.flags & ~allowed) throw new CommandError(NBD_ERR.EINVAL, `flags ${request.flags} not valid for ${CMD_NAMES[request.type]}`);
  }

  private checkRange(request: Request, errno: number): void {
    if (request.type === CMD.READ && request.length > this.server.payloadLimit) {
      throw new CommandError(NBD_ERR.EINVAL, `read of ${request.length} bytes exceeds the maximum block size`);
    }
    if (request.offset + request.length > this.endpoint.size) {
      throw new CommandError(errno, `${request.offset}+${request.length} is beyond the export's size ${this.endpoint.size}`);
    }
  }

  private checkWritable(request: Request): void {
    if (this.server.options.readOnly) throw new CommandError(NBD_ERR.EPERM, 'the export is read-only');
    this.checkRange(request, NBD_ERR.ENOSPC);
  }

  private replyData(request: Request, data: Buffer, written: () => void): void {
    if (!this.structured) this.sendThen('reply READ', written, simpleReply(request.handle, 0), data);
    else if (data.length === 0) this.sendThen('reply READ', written, chunkHeader(request.handle, REPLY_FLAG_DONE, REPLY_TYPE.NONE, 0));
    else this.sendThen('reply READ', written, offsetDataHeader(request.handle, request.offset, data.length), data);
  }

  private replyError(request: Request, errno: number, message: string): void {
    if (this.structured) this.send('reply error', errorChunk(request.handle, errno, message));
    else this.send('reply error', simpleReply(request.handle, errno));
  }
}

/** The export name and queries of NBD_OPT_LIST/SET_META_CONTEXT data, or undefined when malformed. */
function parseContextQueries(data: Buffer): { exportName: string; list: string[] } | undefined {
  let at = 0;
  const string = (): string | undefined => {
    if (at + 4 > data.length) return undefined;
    const length = data.readUInt32BE(at);
    if (at + 4 + length > data.length) return undefined;
    const text = data.toString('utf8', at + 4, at + 4 + length);
    at += 4 + length;
    return text;
  };
  const exportName = string();
  if (exportName === undefined || at + 4 > data.length) return undefined;
  const count = data.readUInt32BE(at);
  at += 4;
  const list: string[] = [];
  for (let i = 0; i < count; i++) {
    const query = string();
    if (query === undefined) return undefined;
    list.push(query);
  }
  return at === data.length ? { exportName, list } : undefined;
}

/** NBD error value for a failure of the endpoint. */
function errnoOf(err: unknown): number {
  if (err instanceof CommandError) return err.errno;
  if (err instanceof RangeError) return NBD_ERR.EINVAL;
  switch ((err as NodeJS.ErrnoException | undefined)?.code) {
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return NBD_ERR.EPERM;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_ERR.ENOSPC;
    case 'ENOMEM':
      return NBD_ERR.ENOMEM;
    default:
      return NBD_ERR.EIO;
  }
}

/** Resolves when the socket has room for more output again, or is gone. */
function drained(socket: net.Socket): Promise<void> {
  if (socket.destroyed || socket.writableLength === 0) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}
