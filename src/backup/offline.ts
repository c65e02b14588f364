// Backups of a shut-off domain: every image is exported read-only by its own qemu-nbd, with the checkpoint's
// persistent bitmap for inc/diff (qcow2 bitmaps carry the checkpoint names). libvirt cannot create a checkpoint
// while the domain is off, so an offline inc saves the changes since the last checkpoint as a differential.
// Guarantees: images are opened read-only (QEMU's image locking then also keeps the domain from starting
// meanwhile); end() stops every qemu-nbd and removes its socket.
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import type { DomainDisk } from '../libvirt/domainXml.js';
import type { NbdAddress } from '../endpoint/nbd.js';
import { run, spawnServer, stopServer } from '../util/process.js';
import { oneLine } from '../util/errors.js';

/** Room for the endpoint's connections plus a `qemu-img map` (-q). */
const CLIENTS_PER_EXPORT = 8;

/** Where a run reads its disks: the libvirt job's NBD server (online) or qemu-nbd (offline). */
export interface DiskExports {
  address(target: string): NbdAddress;
  /** Meta context with the changes since the parent checkpoint (inc/diff only). */
  dirtyContext(target: string): string;
  /** Stops serving once every disk is read, so that the teardown runs while the side files are written. */
  release(): Promise<void>;
  /** Stops serving (if release() did not) and cleans up; `failed` undoes what the run created. */
  end(failed: boolean): Promise<void>;
}

export class OfflineExports implements DiskExports {
  private stopping: Promise<void> | undefined;

  private constructor(private readonly servers: Map<string, { child: ChildProcess; socket: string }>, private readonly bitmap: string) {}

  /** Starts one read-only qemu-nbd per disk on `<socketBase>.<target>`, with `bitmap` when given (inc/diff). */
  static async start(disks: DomainDisk[], socketBase: string, bitmap: string): Promise<OfflineExports> {
    const servers = new Map<string, { child: ChildProcess; socket: string }>();
    const exports = new OfflineExports(servers, bitmap);
    try {
      for (const disk of disks) {
        const socket = `${socketBase}.${disk.target}`;
        await fs.rm(socket, { force: true });
        const args = ['--read-only', '--persistent', `--shared=${CLIENTS_PER_EXPORT}`, '--socket', socket, '--export-name', disk.target,
          '--format', disk.format];
        if (bitmap && disk.format !== 'raw') args.push('--bitmap', bitmap);
        servers.set(disk.target, { child: await spawnServer('qemu-nbd', [...args, disk.path as string], socket), socket });
      }
    } catch (err) {
      await exports.end();
      throw new Error(`cannot export the images of the shut-off domain: ${oneLine(err)}`);
    }
    return exports;
  }

  address(target: string): NbdAddress {
    return { socket: this.servers.get(target)?.socket, exportName: target };
  }

  dirtyContext(): string {
    return `qemu:dirty-bitmap:${this.bitmap}`;
  }

  release(): Promise<void> {
    this.stopping ??= Promise.all([...this.servers.values()].map(async ({ child, socket }) => {
      await stopServer(child);
      await fs.rm(socket, { force: true });
    })).then(() => undefined);
    return this.stopping;
  }

  end(): Promise<void> {
    return this.release();
  }
}

interface ImageBitmap {
  name: string;
  flags?: string[];
}

/** What is wrong with the persistent bitmap `name` in each qcow2 image, or [] when every image has it intact. */
export async function bitmapProblems(disks: DomainDisk[], name: string): Promise<string[]> {
  const problems: string[] = [];
  for (const disk of disks.filter((d) => d.format === 'qcow2')) {
    const { stdout } = await run('qemu-img', ['info', '--output=json', '--force-share', disk.path as string]);
    const info = JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: ImageBitmap[] } } };
    const bitmap = info['format-specific']?.data?.bitmaps?.find((b) => b.name === name);
    if (!bitmap) problems.push(`bitmap ${name} is missing from ${disk.path}`);
    else if (bitmap.flags?.includes('in-use')) problems.push(`bitmap ${name} in ${disk.path} is inconsistent (the image was not closed cleanly)`);
  }
  return problems;
}
