// Indexes one stream file for random access without reading its payloads: walks the frame headers with
// positional reads (one read per frame: a payload's CRLF and the next header come in one piece) and, for
// compressed streams, reads just the header of each lz4 frame the trailer lists, for its content size.
// Guarantees: the structural checks of a full read (order, bounds, CRLFs, stop frame, trailer, dataSize); the
// first inconsistency throws a StreamFormatError naming the file and byte. Payload checksums are verified
// later, whenever a compressed frame is decompressed.
import fs from 'node:fs/promises';
import { native } from '../native/addon.js';
import { FRAME_HEADER_LENGTH, TERMINATOR, StreamFormatError, frameSizes, parseHeader, type StreamMetadata } from '../stream/format.js';
import { StreamReader, lz4ContentSize, readExactly } from '../stream/reader.js';
import type { Segment } from './segments.js';

export interface StreamIndex {
  path: string;
  meta: StreamMetadata;
  /** Data and zero frames in disk order; lz4-compressed data frames give one segment per lz4 frame. */
  segments: Segment[];
}

/** Bytes of an lz4 frame header that hold its content size (magic, FLG, BD, 8-byte size, header checksum). */
const LZ4_HEADER_BYTES = 15;
const CRLF_AND_HEADER = TERMINATOR.length + FRAME_HEADER_LENGTH;

/** Indexes `file`, which is stream number `fileId` of a chain (the id goes into its segments). */
export async function indexStream(file: string, fileId: number): Promise<StreamIndex> {
  const reader = await StreamReader.open(file);
  await reader.close();
  const { meta, trailer, bodyStart, bodyEnd } = reader;
  const handle = await fs.open(file, 'r');
  const fail = (at: number, message: string): never => {
    throw new StreamFormatError(`${file} at byte ${at}: ${message}`);
  };
  /** The CRLF after a payload ending at `at`, then the header after it; returns that header's bytes. */
  const terminatorAndHeader = async (at: number): Promise<Buffer> => {
    if (at + CRLF_AND_HEADER > bodyEnd) fail(at, 'stream ends without a stop frame (truncated)');
    const bytes = await readExactly(handle, at, CRLF_AND_HEADER, file);
    if (!bytes.subarray(0, TERMINATOR.length).equals(TERMINATOR)) fail(at, 'payload not followed by CRLF (corrupt or wrong length)');
    return bytes.subarray(TERMINATOR.length);
  };

  try {
    const segments: Segment[] = [];
    let at = bodyStart;
    if (at + FRAME_HEADER_LENGTH > bodyEnd) fail(at, 'stream ends without a stop frame (truncated)');
    let headerBytes = await readExactly(handle, at, FRAME_HEADER_LENGTH, file);
    let lastEnd = 0;
    let dataSize = 0;
    let dataFrames = 0;
    for (;;) {
      const frame = parseHeader(headerBytes, `${file} at byte ${at}`);
      if (frame.kind === 'stop') {
        at += FRAME_HEADER_LENGTH;
        break;
      }
      if (frame.kind !== 'data' && frame.kind !== 'zero') fail(at, `unexpected ${frame.kind} frame inside the stream`);
      if (frame.start < lastEnd) fail(at, `frames out of order (${frame.start} after ${lastEnd})`);
      if (frame.start + frame.length > meta.virtualSize) fail(at, `frame beyond the disk's virtual size ${meta.virtualSize}`);
      lastEnd = frame.start + frame.length;
      const payloadAt = at + FRAME_HEADER_LENGTH;
      if (frame.kind === 'zero') {
        if (frame.length > 0) segments.push({ start: frame.start, length: frame.length, kind: 'zero', file: fileId, at: 0, packed: 0, skip: 0 });
        at = payloadAt;
        if (at + FRAME_HEADER_LENGTH > bodyEnd) fail(at, 'stream ends without a stop frame (truncated)');
        headerBytes = await readExactly(handle, at, FRAME_HEADER_LENGTH, file);
        continue;
      }
      let payloadEnd: number;
      if (trailer) {
        const entry = trailer[dataFrames];
        if (entry === undefined) fail(at, `data frame ${dataFrames} has no entry in the compression trailer`);
        let offset = frame.start;
        let position = payloadAt;
        for (const size of frameSizes(entry as NonNullable<typeof entry>)) {
          if (position + size > bodyEnd) fail(position, `lz4 frame of ${size} bytes runs past the end of the stream`);
          const head = await readExactly(handle, position, Math.min(size, LZ4_HEADER_BYTES), file);
          // Both writers record the content size; without it, the frame must be decompressed once to learn it.
          const length = lz4ContentSize(head) ??
            (await native().lz4DecompressFrame(await readExactly(handle, position, size, file)).catch((err: Error) => fail(position, `lz4 frame: ${err.message}`))).length;
          if (offset + length > frame.start + frame.length) fail(position, `lz4 frames exceed the data frame's length ${frame.length}`);
          if (length > 0) segments.push({ start: offset, length, kind: 'data', file: fileId, at: position, packed: size, skip: 0 });
          offset += length;
          position += size;
        }
        if (offset !== frame.start + frame.length) fail(at, `lz4 frames hold ${offset - frame.start} bytes, data frame says ${frame.length}`);
        payloadEnd = position;
      } else {
        if (frame.length > 0) segments.push({ start: frame.start, length: frame.length, kind: 'data', file: fileId, at: payloadAt, packed: 0, skip: 0 });
        payloadEnd = payloadAt + frame.length;
      }
      dataSize += frame.length;
      dataFrames++;
      headerBytes = await terminatorAndHeader(payloadEnd);
      at = payloadEnd + TERMINATOR.length;
    }
    if (at !== bodyEnd) fail(at, `${bodyEnd - at} unexpected bytes after the stop frame`);
    if (trailer && dataFrames !== trailer.length) fail(at, `trailer lists ${trailer.length} data frames, stream has ${dataFrames}`);
    if (dataSize !== meta.dataSize) fail(at, `data frames hold ${dataSize} bytes, metadata says ${meta.dataSize}`);
    return { path: file, meta, segments };
  } finally {
    await handle.close();
  }
}
