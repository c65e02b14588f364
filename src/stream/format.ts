// Stream format version 2 of virtnbdbackup: frame headers, metadata and the lz4 trailer, encode and parse.
// Guarantees: every header is exactly FRAME_HEADER_LENGTH bytes; parsing rejects anything else with a
// StreamFormatError naming what was wrong, so a corrupt file never reads as valid frames.

/** `KIND SP %016x SP %016x CR LF`: 4 + 1 + 16 + 1 + 16 + 2 bytes. */
export const FRAME_HEADER_LENGTH = 40;
export const TERMINATOR = Buffer.from('\r\n');
export const STREAM_VERSION = 2;
/** Chunk size for lz4 frames when the server does not announce a maximum request size. */
export const DEFAULT_MAX_REQUEST_SIZE = 32 * 1024 * 1024;
/**
 * Uncompressed payload is digested, and large extents are cut into lz4 frames, in pieces of this size: the writer,
 * the reader and the digest files of every backup so far agree on it.
 */
export const PAYLOAD_PIECE_SIZE = 4 * 1024 * 1024;

export type FrameKind = 'meta' | 'data' | 'zero' | 'stop' | 'comp';
const KINDS: ReadonlySet<string> = new Set(['meta', 'data', 'zero', 'stop', 'comp']);

export interface FrameHeader {
  kind: FrameKind;
  start: number;
  length: number;
}

/** The JSON of the meta frame, keys as virtnbdbackup writes them. */
export interface StreamMetadata {
  virtualSize: number;
  dataSize: number;
  date: string;
  diskName: string;
  diskFormat: string;
  checkpointName: string;
  compressed: false | number;
  compressionMethod: string;
  parentCheckpoint: string;
  incremental: boolean;
  streamVersion: number;
  /**
   * Ours, which the Python tools ignore: who made this stream's checkpoint and its parent, as libvirt describes them
   * (creation time and description, which names the run), so a chain of files from two sets with the same names is
   * told from one chain.
   */
  checkpointIdentity?: string;
  parentCheckpointIdentity?: string;
}

/** One entry per data frame in the lz4 trailer: a single frame's size, or {total: [frame sizes]}. */
export type TrailerEntry = number | Record<string, number[]>;

export class StreamFormatError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'StreamFormatError';
  }
}

function hex16(value: number): string {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`frame field out of range: ${value}`);
  return value.toString(16).padStart(16, '0');
}

export function encodeHeader(kind: FrameKind, start: number, length: number): Buffer {
  return Buffer.from(`${kind} ${hex16(start)} ${hex16(length)}\r\n`, 'latin1');
}

const HEX16 = /^[0-9a-f]{16}$/;

/** Parses one 40-byte header; `where` names the file and offset for the error message. */
export function parseHeader(header: Buffer, where: string): FrameHeader {
  if (header.length !== FRAME_HEADER_LENGTH) {
    throw new StreamFormatError(`${where}: truncated frame header (${header.length} of ${FRAME_HEADER_LENGTH} bytes)`);
  }
  const text = header.toString('latin1');
  const kind = text.slice(0, 4);
  const start = text.slice(5, 21);
  const length = text.slice(22, 38);
  if (!KINDS.has(kind) || text[4] !== ' ' || text[21] !== ' ' || text.slice(38) !== '\r\n' ||
      !HEX16.test(start) || !HEX16.test(length)) {
    // Bytes that are no text (a damaged header) show as dots: the line stays readable.
    throw new StreamFormatError(`${where}: invalid frame header ${JSON.stringify(text.replace(/[^\x20-\x7e\r\n]/g, '.'))}`);
  }
  const frame = { kind: kind as FrameKind, start: parseInt(start, 16), length: parseInt(length, 16) };
  if (!Number.isSafeInteger(frame.start + frame.length)) {
    throw new StreamFormatError(`${where}: frame header ${JSON.stringify(text.slice(0, 38))} reaches beyond any disk (damaged)`);
  }
  return frame;
}

/**
 * Whether the first bytes of a data file are a stream's meta header, allowing for a few damaged bytes, as
 * opposed to a raw disk image (-t raw, or a raw disk saved by Python), which has no frames at all.
 */
export function looksLikeStream(head: Buffer): boolean {
  const expected = 'meta 0000000000000000 ';
  let matching = 0;
  for (let i = 0; i < FRAME_HEADER_LENGTH; i++) {
    const c = head[i];
    if (c === undefined) return true; // too short for an image: a truncated stream
    const ch = String.fromCharCode(c);
    const fits = i < expected.length ? ch === expected[i] : i < 38 ? /[0-9a-f]/.test(ch) : ch === '\r\n'[i - 38];
    if (fits) matching++;
  }
  return matching >= FRAME_HEADER_LENGTH - 4;
}

/** Whether the last FRAME_HEADER_LENGTH bytes of a data file are a stream's end: its `stop` frame, or a compressed one's `comp`. */
export function looksLikeStreamEnd(tail: Buffer): boolean {
  if (tail.equals(encodeHeader('stop', 0, 0))) return true;
  try {
    const last = parseHeader(tail, 'the end');
    return last.kind === 'comp' && last.start === 0;
  } catch {
    return false; // no frame header at all: a raw image's last bytes
  }
}

export function encodeMetadata(meta: StreamMetadata): Buffer {
  const json = Buffer.from(JSON.stringify(meta, null, 4), 'utf8');
  return Buffer.concat([encodeHeader('meta', 0, json.length), json, TERMINATOR]);
}

/** Validates the meta JSON: the keys restore depends on must be there with the right types. */
export function parseMetadata(json: Buffer, where: string): StreamMetadata {
  let meta: unknown;
  try {
    meta = JSON.parse(json.toString('utf8'));
  } catch (err) {
    throw new StreamFormatError(`${where}: metadata is not valid JSON (${(err as Error).message})`);
  }
  const m = meta as Record<string, unknown>;
  if (typeof m !== 'object' || m === null || typeof m.virtualSize !== 'number' || typeof m.dataSize !== 'number') {
    throw new StreamFormatError(`${where}: metadata lacks virtualSize/dataSize`);
  }
  return {
    virtualSize: m.virtualSize,
    dataSize: m.dataSize,
    date: String(m.date ?? ''),
    diskName: String(m.diskName ?? ''),
    diskFormat: String(m.diskFormat ?? 'qcow2'),
    checkpointName: String(m.checkpointName ?? ''),
    compressed: typeof m.compressed === 'number' ? m.compressed : m.compressed === true ? 0 : false,
    compressionMethod: String(m.compressionMethod ?? 'lz4'),
    parentCheckpoint: String(m.parentCheckpoint ?? ''),
    incremental: Boolean(m.incremental),
    streamVersion: typeof m.streamVersion === 'number' ? m.streamVersion : 1,
    ...(typeof m.checkpointIdentity === 'string' ? { checkpointIdentity: m.checkpointIdentity } : {}),
    ...(typeof m.parentCheckpointIdentity === 'string' ? { parentCheckpointIdentity: m.parentCheckpointIdentity } : {}),
  };
}

/** `stop` header, then for compressed streams: trailer JSON, CRLF, `comp` header. */
export function encodeEnd(trailer: TrailerEntry[] | null): Buffer {
  const stop = encodeHeader('stop', 0, 0);
  if (!trailer) return stop;
  const json = Buffer.from(JSON.stringify(trailer), 'utf8');
  return Buffer.concat([stop, json, TERMINATOR, encodeHeader('comp', 0, json.length)]);
}

/** Where the trailer JSON of a compressed stream of `fileSize` bytes starts, given the `comp` length. */
export function trailerOffset(fileSize: number, trailerLength: number): number {
  return fileSize - FRAME_HEADER_LENGTH - TERMINATOR.length - trailerLength;
}

export function parseTrailer(json: Buffer, where: string): TrailerEntry[] {
  let trailer: unknown;
  try {
    trailer = JSON.parse(json.toString('utf8'));
  } catch (err) {
    throw new StreamFormatError(`${where}: compression trailer is not valid JSON (${(err as Error).message})`);
  }
  const size = (n: unknown): boolean => Number.isSafeInteger(n) && (n as number) >= 0;
  const valid = Array.isArray(trailer) && trailer.every((e) =>
    size(e) || (typeof e === 'object' && e !== null && Object.values(e).every((v) => Array.isArray(v) && v.every(size))));
  if (!valid) throw new StreamFormatError(`${where}: compression trailer has an unexpected shape`);
  return trailer as TrailerEntry[];
}

/** The lz4 frame sizes of one data frame's payload, whichever trailer form it has. */
export function frameSizes(entry: TrailerEntry): number[] {
  if (typeof entry === 'number') return [entry];
  const sizes = Object.values(entry)[0];
  return sizes ?? [];
}

/** What an lz4 frame that does not decompress is called, by every reader. */
export const undecompressable = (err: Error): string => `cannot decompress it (${err.message}): damaged`;

/** Reports a structural fault; the caller adds the file and byte position. */
export type FaultReporter = (message: string) => never;

/**
 * The structural checks of one walk over a stream's frames, shared by the reader and the map's index: frame kinds,
 * order and bounds, the trailer entry of each compressed data frame and the lz4 frames' content sizes, and at the
 * stop frame the bytes left, the trailer's count and dataSize.
 */
export class FrameSequence {
  private lastEnd = 0;
  private dataSize = 0;
  private dataFrames = 0;

  constructor(private readonly meta: StreamMetadata, private readonly trailer: TrailerEntry[] | null) {}

  /** Checks the next frame header before the stop frame; returns a compressed data frame's trailer entry. */
  next(frame: FrameHeader, fail: FaultReporter): TrailerEntry | undefined {
    if (frame.kind !== 'data' && frame.kind !== 'zero') fail(`unexpected ${frame.kind} frame inside the stream`);
    if (frame.start < this.lastEnd) fail(`frames out of order (${frame.start} after ${this.lastEnd})`);
    if (frame.start + frame.length > this.meta.virtualSize) fail(`frame beyond the disk's virtual size ${this.meta.virtualSize}`);
    this.lastEnd = frame.start + frame.length;
    if (frame.kind === 'zero') return undefined;
    this.dataSize += frame.length;
    const index = this.dataFrames++;
    if (!this.trailer) return undefined;
    const entry = this.trailer[index];
    if (entry === undefined) fail(`data frame ${index} has no entry in the compression trailer`);
    return entry;
  }

  /** Checks that an lz4 frame of `size` bytes at `at` lies inside the stream body, before it is read. */
  lz4FrameFits(at: number, size: number, bodyEnd: number, fail: FaultReporter): void {
    if (at + size > bodyEnd) fail(`lz4 frame of ${size} bytes runs past the end of the stream`);
  }

  /** An lz4 frame of `frame` whose content ends at disk offset `end` must stay inside it. */
  lz4FrameEnds(frame: FrameHeader, end: number, fail: FaultReporter): void {
    if (end > frame.start + frame.length) fail(`lz4 frames exceed the data frame's length ${frame.length}`);
  }

  /** The lz4 frames of `frame`, ending at disk offset `end`, must fill it exactly. */
  lz4FramesDone(frame: FrameHeader, end: number, fail: FaultReporter): void {
    if (end !== frame.start + frame.length) fail(`lz4 frames hold ${end - frame.start} bytes, data frame says ${frame.length}`);
  }

  /** After the stop frame, which ended at `at`; the body must end at `bodyEnd`. */
  end(at: number, bodyEnd: number, fail: FaultReporter): void {
    if (at !== bodyEnd) fail(`${bodyEnd - at} unexpected bytes after the stop frame`);
    if (this.trailer && this.dataFrames !== this.trailer.length) fail(`trailer lists ${this.trailer.length} data frames, stream has ${this.dataFrames}`);
    if (this.dataSize !== this.meta.dataSize) fail(`data frames hold ${this.dataSize} bytes, metadata says ${this.meta.dataSize}`);
  }
}
