// The NBD protocol as the server side needs it (doc/proto.md of NetworkBlockDevice/nbd): fixed newstyle
// handshake, options, transmission commands, simple and structured replies. Values and message layouts only,
// all big-endian; nbdServer.ts holds the behaviour.

export const NBD_MAGIC = 0x4e42444d41474943n; // 'NBDMAGIC'
export const IHAVEOPT = 0x49484156454f5054n; // 'IHAVEOPT': newstyle magic, and the prefix of every option
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;

/** Transmission flags. */
export const TFLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_CACHE: 1 << 10,
} as const;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

export const OPT_NAMES: Record<number, string> = Object.fromEntries(Object.entries(OPT).map(([name, value]) => [value, name]));

const ERROR_BIT = 2 ** 31;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERROR_BIT + 1,
  ERR_POLICY: ERROR_BIT + 2,
  ERR_INVALID: ERROR_BIT + 3,
  ERR_TLS_REQD: ERROR_BIT + 5,
  ERR_UNKNOWN: ERROR_BIT + 6,
  ERR_SHUTDOWN: ERROR_BIT + 7,
  ERR_TOO_BIG: ERROR_BIT + 9,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const CMD_NAMES: Record<number, string> = Object.fromEntries(Object.entries(CMD).map(([name, value]) => [value, name]));

export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 2 ** 15 + 1 } as const;

/** Error values allowed on the wire. */
export const NBD_ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

export const REQUEST_HEADER_LENGTH = 28;
export const OPTION_HEADER_LENGTH = 16;

export interface Request {
  flags: number;
  type: number;
  /** The client's 8-byte handle, echoed in every reply. */
  handle: Buffer;
  offset: number;
  length: number;
}

/** Parses a 28-byte request header; undefined if the magic is wrong (the connection is then unusable). */
export function parseRequest(header: Buffer): Request | undefined {
  if (header.readUInt32BE(0) !== REQUEST_MAGIC) return undefined;
  return {
    flags: header.readUInt16BE(4),
    type: header.readUInt16BE(6),
    handle: Buffer.from(header.subarray(8, 16)),
    // Offsets beyond 2^53 lose precision and then fail the bounds check, as they should.
    offset: Number(header.readBigUInt64BE(16)),
    length: header.readUInt32BE(24),
  };
}

export function greeting(): Buffer {
  const out = Buffer.alloc(18);
  out.writeBigUInt64BE(NBD_MAGIC, 0);
  out.writeBigUInt64BE(IHAVEOPT, 8);
  out.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return out;
}

export function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(20);
  header.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(data.length, 16);
  return Buffer.concat([header, data]);
}

/** The reply to NBD_OPT_EXPORT_NAME: size, flags and (unless the client declined them) 124 zero bytes. */
export function exportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const out = Buffer.alloc(noZeroes ? 10 : 134);
  out.writeBigUInt64BE(BigInt(size), 0);
  out.writeUInt16BE(flags, 8);
  return out;
}

export function infoExport(size: number, flags: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeUInt16BE(INFO.EXPORT, 0);
  out.writeBigUInt64BE(BigInt(size), 2);
  out.writeUInt16BE(flags, 10);
  return out;
}

export function infoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const out = Buffer.alloc(14);
  out.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  out.writeUInt32BE(minimum, 2);
  out.writeUInt32BE(preferred, 6);
  out.writeUInt32BE(maximum, 10);
  return out;
}

export function infoText(type: typeof INFO.NAME | typeof INFO.DESCRIPTION, text: string): Buffer {
  const out = Buffer.alloc(2);
  out.writeUInt16BE(type, 0);
  return Buffer.concat([out, Buffer.from(text, 'utf8')]);
}

/** NBD_REP_SERVER data and NBD_REP_META_CONTEXT data: a 32-bit number then a string. */
export function numberedString(value: number, text: string): Buffer {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(value, 0);
  return Buffer.concat([out, Buffer.from(text, 'utf8')]);
}

export function simpleReply(handle: Buffer, error: number): Buffer {
  const out = Buffer.alloc(16);
  out.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(error, 4);
  handle.copy(out, 8);
  return out;
}

/** Header of one structured reply chunk; `payloadLength` bytes of payload follow it. */
export function chunkHeader(handle: Buffer, flags: number, type: number, payloadLength: number): Buffer {
  const out = Buffer.alloc(20);
  out.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  handle.copy(out, 8);
  out.writeUInt32BE(payloadLength, 16);
  return out;
}

/** Final NBD_REPLY_TYPE_OFFSET_DATA chunk: header plus the 8-byte offset; the data follows. */
export function offsetDataHeader(handle: Buffer, offset: number, dataLength: number): Buffer {
  const out = Buffer.alloc(28);
  chunkHeader(handle, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, 8 + dataLength).copy(out, 0);
  out.writeBigUInt64BE(BigInt(offset), 20);
  return out;
}

export function errorChunk(handle: Buffer, error: number, message: string): Buffer {
  const text = Buffer.from(message, 'utf8').subarray(0, 4096);
  const payload = Buffer.alloc(6 + text.length);
  payload.writeUInt32BE(error, 0);
  payload.writeUInt16BE(text.length, 4);
  text.copy(payload, 6);
  return Buffer.concat([chunkHeader(handle, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, payload.length), payload]);
}

/** Final NBD_REPLY_TYPE_BLOCK_STATUS chunk for one context: (length, flags) descriptors. */
export function blockStatusChunk(handle: Buffer, contextId: number, extents: ReadonlyArray<{ length: number; flags: number }>): Buffer {
  const payload = Buffer.alloc(4 + 8 * extents.length);
  payload.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    payload.writeUInt32BE(e.length, 4 + 8 * i);
    payload.writeUInt32BE(e.flags, 8 + 8 * i);
  });
  return Buffer.concat([chunkHeader(handle, REPLY_FLAG_DONE, REPLY_TYPE.BLOCK_STATUS, payload.length), payload]);
}
