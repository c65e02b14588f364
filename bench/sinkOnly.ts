// Ours' data-file sink alone, for the bench: writes BYTES of a file in memory (random bytes in /dev/shm) through the
// set's bulk sink (direct I/O from huge-page chunks, two writes in flight), as a backup writes its data file, with
// no source behind it: the disk's floor for ours' writes. Guarantees: the file is complete and on disk when it exits
// 0; any failure exits 1 with one line.
// Usage: node dist/bench/sinkOnly.js SOURCE_FILE BYTES OUTPUT_DIR
import fs from 'node:fs/promises';
import { DirectoryTarget, fillAndCommit } from '../src/set/target.js';

/** Bytes handed to the sink per write, as the stream writer hands it a payload piece. */
const PIECE_BYTES = 4 * 1024 * 1024;

async function main(): Promise<void> {
  const [source, bytesArg, outDir] = process.argv.slice(2);
  const bytes = Number(bytesArg);
  if (!source || !outDir || !Number.isSafeInteger(bytes) || bytes <= 0) throw new Error('usage: sinkOnly.js SOURCE_FILE BYTES OUTPUT_DIR');
  const input = await fs.open(source, 'r');
  try {
    const sourceBytes = (await input.stat()).size;
    if (sourceBytes < PIECE_BYTES) throw new Error(`${source} holds less than one piece (${PIECE_BYTES} bytes)`);
    await fillAndCommit(await new DirectoryTarget(outDir).create('sink-only.data', { bulk: true }), async (sink) => {
      // One buffer for all pieces: the sink has copied a piece into its own chunks when write resolves.
      const piece = Buffer.allocUnsafe(PIECE_BYTES);
      for (let done = 0; done < bytes;) {
        const length = Math.min(PIECE_BYTES, bytes - done);
        const { bytesRead } = await input.read(piece, 0, length, done % (sourceBytes - sourceBytes % PIECE_BYTES));
        if (bytesRead !== length) throw new Error(`${source}: short read at ${done}`);
        await sink.write([piece.subarray(0, length)]);
        done += length;
      }
    });
  } finally {
    await input.close();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`sinkOnly: ${(err as Error).message}\n`);
  process.exit(1);
});
