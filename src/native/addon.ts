// Typed face of the native addon (native/*.cc): libnbd, libvirt (+ libvirt-qemu), zlib adler32 and liblz4 frames.
// Guarantees: every call that can block on I/O returns a Promise and runs off the event loop; errors are
// rejected as NativeError with the library's own message.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

/** Error thrown by the addon. `code` is libvirt's virErrorNumber or libnbd's errno, when known. */
export interface NativeError extends Error {
  code?: number;
  /** 'libvirt' | 'libnbd' | 'lz4' */
  library?: string;
}

/** One open libnbd handle (one NBD connection). Operations on one handle are serialised by libnbd. */
export interface NbdHandle {
  /** Connect to a unix socket export; request the given meta contexts (e.g. 'base:allocation'). */
  connectUnix(socketPath: string, exportName: string, metaContexts: string[]): Promise<void>;
  /**
   * Connect to an NBD URI (nbd://host:port/export, nbd+unix:///export?socket=...); with `tlsCertificates`, a
   * directory holding ca-cert.pem, client-cert.pem and client-key.pem, TLS is required.
   */
  connectUri(uri: string, metaContexts: string[], tlsCertificates?: string): Promise<void>;
  /** Export size in bytes (valid after connect). */
  getSize(): number;
  /** Largest request the server accepts (LIBNBD_SIZE_MAXIMUM), 0 when the server does not say. */
  getMaxBlockSize(): number;
  canMultiConn(): boolean;
  isReadOnly(): boolean;
  canZero(): boolean;
  canFlush(): boolean;
  canTrim(): boolean;
  /** Whether the server agreed to the named meta context. */
  canMetaContext(name: string): boolean;
  /**
   * One NBD_CMD_BLOCK_STATUS for [offset, offset+length) in the given context. Returns a flat array
   * [length0, flags0, length1, flags1, ...] of consecutive extents starting at `offset`; the server may
   * answer for less than `length` (the caller loops).
   */
  blockStatus(offset: number, length: number, context: string): Promise<number[]>;
  /** Fill `buffer` entirely from the export at `offset`. */
  pread(buffer: Buffer, offset: number): Promise<void>;
  /**
   * Fills `buffer` from `offset` in requests of `requestSize`, one after the other, summing each slice on the worker
   * as it arrives: the adler32 (from 1; 1 without `withAdler`) and, with `digest`, the BLAKE3 digest (hex) of the
   * whole buffer.
   */
  preadSummed(buffer: Buffer, offset: number, requestSize: number, withAdler: boolean, digest?: 'blake3'): Promise<{ adler32: number; digest?: string }>;
  /** Write all of `buffer` at `offset`. */
  pwrite(buffer: Buffer, offset: number): Promise<void>;
  /** NBD_CMD_WRITE_ZEROES; `allowTrim` false sets NBD_CMD_FLAG_NO_HOLE. */
  zero(offset: number, length: number, allowTrim: boolean): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** Graceful NBD_CMD_DISC then close; safe to call twice. */
  close(): Promise<void>;
  /**
   * Shuts the socket down at once, from the event loop: requests in flight, and a connect waiting for the server's
   * greeting, fail with end of file. False when there is no socket (yet, or any more). close() is still needed.
   */
  cut(): boolean;
}

export interface LibvirtDomain {
  name(): string;
  getXMLDesc(flags: number): Promise<string>;
  isActive(): Promise<boolean>;
  /** virDomainHasManagedSaveImage: the shut-off domain's RAM is saved (virsh managedsave), and a start resumes it. */
  hasManagedSaveImage(): Promise<boolean>;
  /** virDomainGetState: [state, reason]. */
  getState(): Promise<[number, number]>;
  getAutostart(): Promise<boolean>;
  setAutostart(autostart: boolean): Promise<void>;
  /** virDomainCreateWithFlags (start); flags e.g. VIR_DOMAIN_START_PAUSED = 1. */
  create(flags: number): Promise<void>;
  destroy(): Promise<void>;
  suspend(): Promise<void>;
  resume(): Promise<void>;
  /** virDomainFSFreeze through the guest agent; [] freezes every filesystem. Resolves to the number frozen. */
  fsFreeze(mountpoints: string[]): Promise<number>;
  /** virDomainFSThaw of everything the agent froze; resolves to the number thawed. */
  fsThaw(): Promise<number>;
  undefine(flags: number): Promise<void>;
  backupBegin(backupXml: string, checkpointXml: string | null, flags: number): Promise<void>;
  backupGetXMLDesc(): Promise<string>;
  /** virDomainAbortJob: ends (or cancels) the running backup job. */
  abortJob(): Promise<void>;
  /** virDomainGetJobStats type (0 = none, VIR_DOMAIN_JOB_*), and the operation (VIR_DOMAIN_JOB_OPERATION_*). */
  getJobType(): Promise<{ type: number; operation: number }>;
  listCheckpointNames(): Promise<string[]>;
  checkpointGetXMLDesc(name: string, flags: number): Promise<string>;
  /** virDomainCheckpointCreateXML; flags e.g. VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE = 1. Returns the name. */
  checkpointCreateXML(xml: string, flags: number): Promise<string>;
  /** virDomainCheckpointDelete; flags e.g. VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY = 2. */
  checkpointDelete(name: string, flags: number): Promise<void>;
  /** virDomainQemuMonitorCommand; hmp=true sets VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP. */
  qemuMonitorCommand(command: string, hmp: boolean): Promise<string>;
}

export interface LibvirtConnection {
  lookupDomainByName(name: string): Promise<LibvirtDomain>;
  defineXML(xml: string): Promise<LibvirtDomain>;
  /** The path of a storage volume (virStorageVolGetPath), for disks of type='volume'. */
  storageVolumePath(pool: string, volume: string): Promise<string>;
  /** virConnectGetURI */
  getURI(): Promise<string>;
  /** virConnectIsAlive: false once the daemon connection is lost (libvirtd stopped or crashed). */
  isAlive(): Promise<boolean>;
  /** Closes the daemon connection; the domains it handed out are closed with it (their calls then reject). */
  close(): Promise<void>;
}

/** A run of an LZ4 frame: bytes [start, end) of the output buffer, or of the source for a block that does not compress. */
export interface FrameSegment {
  inSource: boolean;
  start: number;
  end: number;
  adler32: number;
}

/** What lz4CompressPiece made: the frame's runs, its length and adler32, and the source's digest when asked. */
export interface CompressedPiece {
  length: number;
  adler32: number;
  segments: FrameSegment[];
  digest?: string;
}

export interface NativeAddon {
  NbdHandle: new () => NbdHandle;
  /** virConnectOpenAuth(uri) (read-write): a daemon's login gets `user` and `password`, else libvirt's auth.conf. */
  /** With a keepalive interval (s) and count, libvirt closes the connection once libvirtd has answered none of them. */
  /** The open runs on a thread of its own; `abandon()` once given up on it, so that it keeps the event loop alive no longer. */
  libvirtOpen(uri: string, user?: string, password?: string, keepaliveInterval?: number, keepaliveCount?: number): Promise<LibvirtConnection> & { abandon(): void };
  /** zlib adler32 continuing from `start` (1 for a fresh checksum). Synchronous: CPU only. */
  adler32(buffer: Buffer, start: number): number;
  /** adler32 (from 1) and, with `digest`, that digest (hex) of `buffer`, computed on a worker thread. */
  checksumPiece(buffer: Buffer, digest?: 'blake3' | 'sha256'): Promise<{ adler32: number; digest?: string }>;
  /** The digest alone (hex), where no adler32 of the same bytes is needed. */
  digestPiece(buffer: Buffer, digest: 'blake3' | 'sha256'): Promise<string>;
  /** adler32 of A followed by B, from adler32(A), adler32(B) and B's length (zlib adler32_combine). */
  adler32Combine(a: number, b: number, lengthOfB: number): number;
  /**
   * `size` zeroed bytes starting on an `alignment` boundary (O_DIRECT buffers); with `hugePages`, a fresh mapping on
   * transparent huge pages where the kernel has them, so a direct write of it reaches the disk as one request.
   */
  alignedBuffer(size: number, alignment: number, hugePages?: boolean): Buffer;
  /** checksumPiece on the calling thread, for small pieces: the adler32, with the raw digest written to into[at..at+32). */
  checksumPieceSync(buffer: Buffer, digest?: 'blake3' | 'sha256', into?: Buffer, at?: number): number;
  /** Bytes an output buffer needs for the LZ4 frame of `length` source bytes. */
  lz4FrameBound(length: number): number;
  /**
   * One LZ4 frame of `source` (content checksum, no block checksums, independent 4 MB blocks; `level` 0 is lz4's
   * default). Its bytes go into `output`, but for the blocks that do not compress, which stay in `source`:
   * `segments` are the frame's runs in order, each in `output` or (`inSource`) in `source`, with its adler32.
   * Also the frame's length and adler32 and, with `digest`, the digest (hex) of the source bytes: one worker task,
   * no allocation.
   */
  lz4CompressPiece(source: Buffer, level: number, output: Buffer, digest?: 'blake3' | 'sha256'): Promise<CompressedPiece>;
  /** Decompress one LZ4 frame; checksums verified; rejects on corruption. Runs on a worker. */
  lz4DecompressFrame(source: Buffer): Promise<Buffer>;
  /**
   * One LZ4 frame decompressed into `output` (checksums verified), resolving to its length; rejects on corruption
   * and when the frame holds more than `output`. Runs on a worker.
   */
  lz4DecompressInto(source: Buffer, output: Buffer): Promise<number>;
  /** Copies `sources`, one after another, into `target` from `at`, on a worker thread. */
  copyInto(target: Buffer, at: number, sources: Buffer[]): Promise<void>;
  /** Hints the kernel to read [offset, offset+length) of the open file `fd` into the page cache; never fails. */
  readAhead(fd: number, offset: number, length: number): Promise<void>;
  /** Library versions, for -V and logs. */
  versions(): { libnbd: string; libvirt: string; lz4: string; zlib: string };
  /** Ends the process at once with `code`, without joining libuv's threads (process.exit waits for them). */
  exitNow(code: number): never;
}

export const VIR_ERR_NO_DOMAIN = 42;
export const VIR_ERR_AUTH_FAILED = 45;
export const VIR_ERR_AUTH_CANCELLED = 79;
export const VIR_ERR_AUTH_UNAVAILABLE = 94;
export const VIR_ERR_NO_DOMAIN_CHECKPOINT = 102;
export const VIR_DOMAIN_XML_SECURE = 1;
export const VIR_DOMAIN_XML_INACTIVE = 2;
export const VIR_DOMAIN_CHECKPOINT_XML_SIZE = 4;
export const VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE = 1;
export const VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY = 2;
export const VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA = 16;
export const VIR_DOMAIN_JOB_OPERATION_BACKUP = 9;
export const VIR_DOMAIN_START_PAUSED = 1;
export const VIR_DOMAIN_START_AUTODESTROY = 2;
export const VIR_DOMAIN_RUNNING = 1;
/** virErrorNumber of "checkpoint inconsistent: missing or broken bitmap" (libvirt >= 6.10). */
export const VIR_ERR_CHECKPOINT_INCONSISTENT = 109;

const here = path.dirname(fileURLToPath(import.meta.url));
let loaded: NativeAddon | undefined;

/** The addon if this process has loaded it, without loading it. */
export function loadedNative(): NativeAddon | undefined {
  return loaded;
}

/** Loads build/Release/virtnbd_native.node once; a missing build gets an error that says how to build it. */
export function native(): NativeAddon {
  if (loaded) return loaded;
  const require = createRequire(import.meta.url);
  // dist/src/native -> repository root
  const root = path.resolve(here, '..', '..', '..');
  const file = path.join(root, 'build', 'Release', 'virtnbd_native.node');
  try {
    loaded = require(file) as NativeAddon;
  } catch (err) {
    throw new Error(`native addon ${file} could not be loaded (${(err as Error).message}); run 'npm run build'`);
  }
  return loaded;
}
