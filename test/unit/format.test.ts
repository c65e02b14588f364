// Stream format v2: header encoding and parsing, metadata, trailer, as the Python peer writes them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  FRAME_HEADER_LENGTH, StreamFormatError, encodeEnd, encodeHeader, encodeMetadata, frameSizes, parseHeader,
  parseMetadata, parseTrailer, trailerOffset,
} from '../../src/stream/format.js';

test('headers are 40 bytes of kind, two %016x fields and CRLF', () => {
  const h = encodeHeader('data', 0x100000, 4096);
  assert.equal(h.length, FRAME_HEADER_LENGTH);
  assert.equal(h.toString(), 'data 0000000000100000 0000000000001000\r\n');
  assert.deepEqual(parseHeader(h, 'x'), { kind: 'data', start: 0x100000, length: 4096 });
});

test('offsets beyond 4 GiB survive the round trip', () => {
  const start = 5 * 2 ** 40 + 12345;
  assert.equal(parseHeader(encodeHeader('zero', start, 2 ** 33), 'x').start, start);
});

const corrupt: Array<[string, string]> = [
  ['unknown kind', 'dada 0000000000000000 0000000000001000\r\n'],
  ['uppercase hex', 'data 00000000000000AA 0000000000001000\r\n'],
  ['missing CRLF', 'data 0000000000000000 0000000000001000xx'],
  ['bad separator', 'data_0000000000000000 0000000000001000\r\n'],
];
for (const [name, text] of corrupt) {
  test(`a header with ${name} is rejected`, () => {
    assert.throws(() => parseHeader(Buffer.from(text, 'latin1'), 'file at 0'), StreamFormatError);
  });
}

test('a short header reads as truncated', () => {
  assert.throws(() => parseHeader(Buffer.from('data 00'), 'f'), /truncated/);
});

test('metadata frame is header + JSON + CRLF and parses back', () => {
  const meta = {
    virtualSize: 1 << 30, dataSize: 4096, date: '2026-01-01T00:00:00', diskName: 'vda', diskFormat: 'qcow2',
    checkpointName: 'virtnbdbackup.0', compressed: false as const, compressionMethod: 'lz4', parentCheckpoint: '',
    incremental: false, streamVersion: 2,
  };
  const frame = encodeMetadata(meta);
  const header = parseHeader(frame.subarray(0, 40), 'm');
  assert.equal(header.kind, 'meta');
  assert.equal(frame.length, 40 + header.length + 2);
  assert.deepEqual(parseMetadata(frame.subarray(40, 40 + header.length), 'm'), meta);
});

test('metadata without sizes is rejected', () => {
  assert.throws(() => parseMetadata(Buffer.from('{"diskName":"vda"}'), 'm'), /virtualSize/);
  assert.throws(() => parseMetadata(Buffer.from('{not json'), 'm'), /not valid JSON/);
});

test('compressed end: stop, trailer JSON, CRLF, comp header; trailer found from the end', () => {
  const trailer = [123, { 300: [100, 200] }];
  const end = encodeEnd(trailer);
  const stop = parseHeader(end.subarray(0, 40), 's');
  assert.equal(stop.kind, 'stop');
  const comp = parseHeader(end.subarray(end.length - 40), 'c');
  assert.equal(comp.kind, 'comp');
  const at = trailerOffset(end.length, comp.length);
  assert.equal(at, 40);
  const parsed = parseTrailer(end.subarray(at, at + comp.length), 't');
  assert.deepEqual(parsed.map(frameSizes), [[123], [100, 200]]);
  assert.equal(encodeEnd(null).length, 40);
});
