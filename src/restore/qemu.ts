// The restore target image: created with qemu-img to match the source (qcow.json), served by qemu-nbd on a
// unix socket for the stream to be written into. Guarantees: qemu-nbd detects zero writes and unmaps them, so
// restored images stay thin; stop() flushes by terminating qemu-nbd cleanly.
import type { ChildProcess } from 'node:child_process';
import { run, spawnServer, stopServer } from '../util/process.js';

/** Subset of `qemu-img info --output=json` that decides how the image is created. */
interface QemuImageInfo {
  format?: string;
  'cluster-size'?: number;
  'format-specific'?: { type?: string; data?: Record<string, unknown> };
}

/** `-o` options that recreate the source image's qcow2 layout. */
export function qcow2CreateOptions(infoJson: string | undefined): string[] {
  if (!infoJson) return [];
  let info: QemuImageInfo;
  try {
    info = JSON.parse(infoJson) as QemuImageInfo;
  } catch {
    return [];
  }
  const options: string[] = [];
  const data = info['format-specific']?.data ?? {};
  if (typeof data.compat === 'string') options.push(`compat=${data.compat}`);
  if (typeof info['cluster-size'] === 'number') options.push(`cluster_size=${info['cluster-size']}`);
  if (data['lazy-refcounts'] === true) options.push('lazy_refcounts=on');
  if (typeof data['compression-type'] === 'string') options.push(`compression_type=${data['compression-type']}`);
  return options;
}

export async function createImage(file: string, format: string, size: number, options: string[]): Promise<void> {
  const args = ['create', '-q', '-f', format];
  if (options.length > 0) args.push('-o', options.join(','));
  args.push(file, String(size));
  await run('qemu-img', args);
}

export class ImageServer {
  private constructor(private readonly child: ChildProcess, readonly socket: string, readonly exportName: string) {}

  /** Serves `file` writable on `socket` for up to `connections` clients. */
  static async start(file: string, format: string, socket: string, exportName: string, connections: number): Promise<ImageServer> {
    const child = await spawnServer('qemu-nbd', [
      '--socket', socket, '--format', format, '--export-name', exportName, '--shared', String(connections),
      '--cache', 'writeback', '--aio', 'threads', '--discard', 'unmap', '--detect-zeroes', 'unmap', '--persistent', file,
    ], socket);
    return new ImageServer(child, socket, exportName);
  }

  async stop(): Promise<void> {
    await stopServer(this.child);
  }
}
