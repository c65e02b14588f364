// Backups of a shut-off domain: every image is exported read-only by its own qemu-nbd, with the checkpoint's
// persistent bitmap for inc/diff (qcow2 bitmaps carry the checkpoint names); for a domain of another host, qemu-nbd
// runs there through ssh and serves over TCP. libvirt cannot create a checkpoint while the domain is off, so an
// offline inc saves the changes since the last checkpoint as a differential.
// Guarantees: images are opened read-only (QEMU's image locking then also keeps the domain from starting
// meanwhile); end() stops every qemu-nbd and removes its socket.
import { sliceImageOpts, type DomainDisk } from '../libvirt/domainXml.js';
import type { NbdAddress } from '../endpoint/nbd.js';
import { spawnServer, stopServer } from '../util/process.js';
import { qemuNbdOverSsh, type SshHost } from '../libvirt/domainHost.js';
import { UserError, oneLine } from '../util/errors.js';
import { HIGHEST_PORT } from '../util/tcpPort.js';

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
  /** Another program ended the exports under the run (a backup job's -k). */
  readonly endedElsewhere?: boolean;
}

/** Where a shut-off domain's images are served: sockets here, or TCP ports on its remote host (through ssh). */
export type OfflineServing =
  | { socketBase: string }
  | { ssh: SshHost; host: string; firstPort: number; tlsCertificates?: string };

/** One running qemu-nbd and how to reach it. */
interface ImageServer {
  address: NbdAddress;
  stop(): Promise<void>;
}

export class OfflineExports implements DiskExports {
  private stopping: Promise<void> | undefined;

  private constructor(private readonly servers: Map<string, ImageServer>, private readonly bitmap: string) {}

  /**
   * Starts one read-only qemu-nbd per disk, with `bitmap` when given (inc/diff): here on `<socketBase>.<target>`,
   * or on the remote host on ports firstPort, firstPort+1, ... in disk order. `empty` disks (0 bytes) have no bitmap.
   */
  static async start(disks: DomainDisk[], serving: OfflineServing, bitmap: string, empty: readonly string[] = []): Promise<OfflineExports> {
    if (!('socketBase' in serving)) {
      const lastPort = serving.firstPort + disks.length - 1;
      if (lastPort > HIGHEST_PORT) {
        throw new UserError(`-P ${serving.firstPort}: the shut-off domain's ${disks.length} disks are served on ports ${serving.firstPort} to ${lastPort}, past ${HIGHEST_PORT}; give -P ${HIGHEST_PORT - disks.length + 1} or lower`);
      }
    }
    const servers = new Map<string, ImageServer>();
    const exports = new OfflineExports(servers, bitmap);
    try {
      for (const [index, disk] of disks.entries()) {
        // A slice (<slices>) is served alone, as QEMU reads it for the domain: the whole file held other bytes.
        const opts = sliceImageOpts(disk);
        const args = ['--read-only', '--persistent', `--shared=${CLIENTS_PER_EXPORT}`, '--export-name', disk.target, ...(opts ? ['--image-opts'] : ['--format', disk.format])];
        if (bitmap && disk.format !== 'raw' && !empty.includes(disk.target)) args.push('--bitmap', bitmap);
        servers.set(disk.target, 'socketBase' in serving
          ? await serveHere(args, disk, `${serving.socketBase}.${disk.target}`)
          : await serveRemotelyOver(serving, args, disk, serving.firstPort + index));
      }
    } catch (err) {
      await exports.end();
      const heldPath = lockedImage(oneLine(err));
      const held = disks.find((d) => d.path === heldPath);
      if (held) throw imageInUse(held);
      throw new Error(`cannot export the images of the shut-off domain: ${oneLine(err)}`);
    }
    return exports;
  }

  address(target: string): NbdAddress {
    return this.servers.get(target)?.address ?? { exportName: target };
  }

  dirtyContext(): string {
    return `qemu:dirty-bitmap:${this.bitmap}`;
  }

  release(): Promise<void> {
    this.stopping ??= Promise.all([...this.servers.values()].map((server) => server.stop())).then(() => undefined);
    return this.stopping;
  }

  end(): Promise<void> {
    return this.release();
  }
}

async function serveHere(args: string[], disk: DomainDisk, socket: string): Promise<ImageServer> {
  const child = await spawnServer('qemu-nbd', [...args, '--socket', socket, sliceImageOpts(disk) ?? (disk.path as string)], socket);
  return { address: { socket, exportName: disk.target }, stop: () => stopServer(child, socket) };
}

async function serveRemotelyOver(serving: Extract<OfflineServing, { ssh: SshHost }>, args: string[], disk: DomainDisk, port: number): Promise<ImageServer> {
  return qemuNbdOverSsh(serving.ssh, args, sliceImageOpts(disk) ?? (disk.path as string), disk.target, { host: serving.host, port, tlsCertificates: serving.tlsCertificates });
}

interface ImageBitmap {
  name: string;
  flags?: string[];
}

/** The persistent bitmaps `qemu-img info --output=json` lists for a qcow2 image. */
export function imageBitmaps(infoJson: string): ImageBitmap[] {
  const info = JSON.parse(infoJson) as { 'format-specific'?: { data?: { bitmaps?: ImageBitmap[] } } };
  return info['format-specific']?.data?.bitmaps ?? [];
}

/**
 * What is wrong with the persistent bitmap `name` in each qcow2 image, or [] when every image has it intact. A bitmap
 * marked in use in an image another process holds open (QEMU's lock) is that process's, not a crash's: refused with
 * a line saying so, where it read as broken and asked for a full backup that -S could not make either.
 */
export async function bitmapProblems(infoOf: (disk: DomainDisk) => Promise<string>, disks: DomainDisk[], name: string, lockHolder: (disk: DomainDisk) => Promise<boolean>): Promise<string[]> {
  const problems: string[] = [];
  for (const disk of disks.filter((d) => d.format === 'qcow2')) {
    const bitmap = imageBitmaps(await infoOf(disk)).find((b) => b.name === name);
    if (!bitmap) problems.push(`bitmap ${name} is missing from ${disk.path}`);
    else if (bitmap.flags?.includes('in-use')) {
      if (await lockHolder(disk)) throw imageInUse(disk);
      problems.push(`bitmap ${name} in ${disk.path} is inconsistent (the image was not closed cleanly)`);
    }
  }
  return problems;
}

/** What to do about an image another process holds: the end of the lines that name it. */
export const IMAGE_HELD = 'is in use by another process, which holds QEMU\'s lock on it: stop that process (a qemu-nbd, qemu-io, guestmount ...) and run again';

/** The image QEMU's lock refusal in `message` names ("Is another process using the image [<path>]?"), if any. */
export function lockedImage(message: string): string | undefined {
  return /another process using the image \[([^\]]+)\]/.exec(message)?.[1];
}

function imageInUse(disk: DomainDisk): UserError {
  return new UserError(`image ${disk.path} of disk ${disk.target} ${IMAGE_HELD}`);
}

/** Whether another process holds `image` open for writing (QEMU's lock): qemu-img then cannot open it unshared. */
export async function isImageLocked(run: (command: string, args: string[]) => Promise<unknown>, image: string): Promise<boolean> {
  try {
    await run('qemu-img', ['info', '--output=json', image]);
    return false;
  } catch (err) {
    return /lock|another process/i.test(oneLine(err));
  }
}
