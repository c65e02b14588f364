// Indexes one stream file for random access without reading its payloads: walks the frame headers with
// positional reads (one read per frame: a payload's CRLF and the next header come in one piece) and, for
// compressed streams, reads just the header of each lz4 frame the trailer lists, for its content size.
// Guarantees: the structural checks of a full read (order, bounds, CRLFs, stop frame, trailer, dataSize); the
// first inconsistency throws a StreamFormatError naming the file and byte. Payload checksums are verified
// later, whenever a compressed frame is decompressed.
import fs from 'node:fs/promises';
import { native } from '../native/addon.js';
import { FRAME_HEADER_LENGTH, TERMINATOR, FrameSequence, StreamFormatError, frameSizes, parseHeader, undecompressable, type FaultReporter, type StreamMetadata } from '../stream/format.js';
import { LZ4_HEADER_BYTES, StreamReader, lz4ContentSize, readExactly } from '../stream/reader.js';
import type { Segment } from './segments.js';

export interface StreamIndex {
  path: string;
  meta: StreamMetadata;
  /** Data and zero frames in disk order; lz4-compressed data frames give one segment per lz4 frame. */
  segments: Segment[];
}

const CRLF_AND_HEADER = TERMINATOR.length + FRAME_HEADER_LENGTH;
/** Frames indexed between looks at the stop signal: a set of many frames takes seconds (200,000: 7 s here). */
const FRAMES_PER_SIGNAL_CHECK = 1024;

/**
 * Indexes `file`, which is stream number `fileId` of a chain (the id goes into its segments); `signal` stops it
 * (Ctrl-C), throwing its reason.
 */
export async function indexStream(file: string, fileId: number, signal?: AbortSignal): Promise<StreamIndex> {
  const reader = await StreamReader.open(file);
  await reader.close();
  const { meta, trailer, bodyStart, bodyEnd } = reader;
  const handle = await fs.open(file, 'r');
  const fail = (at: number, message: string): never => {
    throw new StreamFormatError(`${file} at byte ${at}: ${message}`);
  };
  const failAt = (at: number): FaultReporter => (message) => fail(at, message);
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
    const frames = new FrameSequence(meta, trailer);
    for (let count = 1; ; count++) {
      if (count % FRAMES_PER_SIGNAL_CHECK === 0) signal?.throwIfAborted();
      const frame = parseHeader(headerBytes, `${file} at byte ${at}`);
      if (frame.kind === 'stop') {
        at += FRAME_HEADER_LENGTH;
        break;
      }
      const entry = frames.next(frame, failAt(at));
      const payloadAt = at + FRAME_HEADER_LENGTH;
      if (frame.kind === 'zero') {
        if (frame.length > 0) segments.push({ start: frame.start, length: frame.length, kind: 'zero', file: fileId, at: 0, packed: 0, skip: 0 });
        at = payloadAt;
        if (at + FRAME_HEADER_LENGTH > bodyEnd) fail(at, 'stream ends without a stop frame (truncated)');
        headerBytes = await readExactly(handle, at, FRAME_HEADER_LENGTH, file);
        continue;
      }
      let payloadEnd: number;
      if (entry !== undefined) {
        let offset = frame.start;
        let position = payloadAt;
        for (const size of frameSizes(entry)) {
          frames.lz4FrameFits(position, size, bodyEnd, failAt(position));
          const head = await readExactly(handle, position, Math.min(size, LZ4_HEADER_BYTES), file);
          // Both writers record the content size; without it, the frame must be decompressed once to learn it.
          const length = lz4ContentSize(head) ??
            (await native().lz4DecompressFrame(await readExactly(handle, position, size, file)).catch((err: Error) => fail(position, `lz4 frame: ${undecompressable(err)}`))).length;
          frames.lz4FrameEnds(frame, offset + length, failAt(position));
          if (length > 0) segments.push({ start: offset, length, kind: 'data', file: fileId, at: position, packed: size, skip: 0 });
          offset += length;
          position += size;
        }
        frames.lz4FramesDone(frame, offset, failAt(at));
        payloadEnd = position;
      } else {
        if (frame.length > 0) segments.push({ start: frame.start, length: frame.length, kind: 'data', file: fileId, at: payloadAt, packed: 0, skip: 0 });
        payloadEnd = payloadAt + frame.length;
      }
      headerBytes = await terminatorAndHeader(payloadEnd);
      at = payloadEnd + TERMINATOR.length;
    }
    frames.end(at, bodyEnd, failAt(at));
    return { path: file, meta, segments };
  } finally {
    await handle.close();
  }
}
