// Ours' copy alone, for the bench: the stream writer and the set's bulk sink (direct I/O, piece digests, adler32)
// reading a running export into one data file, without libvirt, checkpoints or the CLI. Guarantees: the file is
// complete and committed (on disk) when it exits 0; any failure exits 1 with one line.
// Usage: node dist/bench/copyOnly.js NBD_URI EXPORT_NAME OUTPUT_DIR [LZ4_LEVEL]
import { NbdEndpoint } from '../src/endpoint/nbd.js';
import { CONTEXT_ALLOCATION } from '../src/endpoint/endpoint.js';
import { planFull } from '../src/extents/plan.js';
import { DirectoryTarget, fillAndCommit } from '../src/set/target.js';
import { writeStream } from '../src/stream/writer.js';

async function main(): Promise<void> {
  const [uri, exportName, outDir, level] = process.argv.slice(2);
  if (!uri || !exportName || !outDir) throw new Error('usage: copyOnly.js NBD_URI EXPORT_NAME OUTPUT_DIR [LZ4_LEVEL]');
  const endpoint = await NbdEndpoint.open({ uri, exportName }, { metaContexts: [CONTEXT_ALLOCATION], connections: 4 });
  try {
    const plan = await planFull(endpoint);
    await fillAndCommit(await new DirectoryTarget(outDir).create(`${exportName}.full.data`, { bulk: true }), async (sink) => {
      await writeStream({
        source: endpoint, plan, sink, compress: level === undefined ? false : Number(level), digests: true,
        meta: { date: new Date().toISOString(), diskName: exportName, diskFormat: 'qcow2', checkpointName: '', parentCheckpoint: '', incremental: false },
      });
    });
  } finally {
    await endpoint.close();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`copyOnly: ${(err as Error).message}\n`);
  process.exit(1);
});
