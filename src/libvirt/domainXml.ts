// Reads what backup and restore need from domain XML: name, UUID, MAC addresses, the disks (target, image path,
// storage volume or network source, slice, format, device, read-only, transient, block job, encrypted) and the boot
// files. Parsing only, but for resolveVolumes, which asks libvirt for volume paths; the decision which disks to back
// up lives in selectDisks; sliceImageOpts says how QEMU opens a slice.
import { XMLParser } from 'fast-xml-parser';

export interface DomainDisk {
  /** Target dev: vda, sda, ... */
  target: string;
  /** 'disk' | 'cdrom' | 'floppy' | 'lun' */
  device: string;
  /** 'file' | 'block' | 'network' | 'volume' */
  type: string;
  /** Image file or block device; undefined for network disks and empty drives, and for volume disks until resolved. */
  path: string | undefined;
  /** `<encryption>` (of the disk or its source): QEMU decrypts, so the export and the backup hold plain data. */
  encrypted?: boolean;
  /** `<readonly/>`: libvirt's backup jobs refuse such a disk ("empty or readonly"). */
  readOnly?: boolean;
  /** `<transient/>`: QEMU writes to an overlay libvirt drops at shutdown, and libvirt runs no block job on the disk. */
  transient?: boolean;
  /** The job of a `<mirror>` (live XML): a block copy or active commit running, which no backup job may join. */
  mirror?: string;
  /** startupPolicy='optional' (of its source): libvirt starts the domain without the disk when its image is missing. */
  optional?: boolean;
  /** `<slices><slice type='storage' offset size/>` of its source: the disk is that range of the file or device alone. */
  slice?: { offset: number; size: number };
  /** An optional disk of a shut-off domain whose image is missing (the backup looks): the domain starts without it. */
  missing?: boolean;
  /** type='volume': the storage pool and volume libvirt names the image by (resolveVolumes gives the path). */
  volume?: { pool: string; name: string; unresolved?: string };
  /** type='network': QEMU reaches the image itself (rbd, nbd, iscsi, ...); `name` is the image's name there, if any. */
  network?: { protocol: string; name?: string };
  /** Driver type: qcow2, raw, ... */
  format: string;
}

export interface DomainInfo {
  name: string;
  /** The domain's UUID; '' when the XML has none. */
  uuid: string;
  /** The MAC addresses of its network interfaces, lower case. */
  macs: string[];
  disks: DomainDisk[];
  /** loader, nvram, kernel, initrd paths when set. */
  bootFiles: Record<string, string>;
  /** A QEMU guest agent channel is configured (whether an agent answers in the guest is another matter). */
  guestAgent: boolean;
}

/** The virtio channel name of the QEMU guest agent. */
export const GUEST_AGENT_CHANNEL = 'org.qemu.guest_agent.0';

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@_',
  isArray: (name) => name === 'disk' || name === 'channel' || name === 'interface',
  textNodeName: '#text',
});

type Node = Record<string, unknown>;

function text(node: unknown): string | undefined {
  if (node === undefined || node === null) return undefined;
  if (typeof node === 'string' || typeof node === 'number') return String(node);
  const t = (node as Node)['#text'];
  return t === undefined ? undefined : String(t);
}

export function parseDomainXml(xml: string): DomainInfo {
  const doc = parser.parse(xml) as Node;
  const domain = doc.domain as Node | undefined;
  if (!domain) throw new Error('not a libvirt domain XML (no <domain> element)');
  const devices = (domain.devices ?? {}) as Node;
  const disks: DomainDisk[] = ((devices.disk ?? []) as Node[]).map((d) => {
    const source = (d.source ?? {}) as Node;
    const driver = (d.driver ?? {}) as Node;
    const target = (d.target ?? {}) as Node;
    const type = String(d['@_type'] ?? 'file');
    const volume = type === 'volume' && source['@_pool'] !== undefined && source['@_volume'] !== undefined
      ? { pool: String(source['@_pool']), name: String(source['@_volume']) }
      : undefined;
    const storageSlice = ([] as unknown[]).concat(((source.slices ?? {}) as Node).slice ?? []).find((x) => ((x ?? {}) as Node)['@_type'] === 'storage') as Node | undefined;
    const slice = storageSlice ? { offset: Number(storageSlice['@_offset'] ?? 0), size: Number(storageSlice['@_size']) } : undefined;
    const network = type === 'network' ? { protocol: String(source['@_protocol'] ?? ''), ...(source['@_name'] !== undefined ? { name: String(source['@_name']) } : {}) } : undefined;
    return {
      target: String(target['@_dev'] ?? ''),
      device: String(d['@_device'] ?? 'disk'),
      type,
      path: (source['@_file'] ?? source['@_dev']) as string | undefined,
      format: String(driver['@_type'] ?? 'raw'),
      ...(d.readonly !== undefined ? { readOnly: true } : {}),
      ...(d.transient !== undefined ? { transient: true } : {}),
      ...(slice && Number.isSafeInteger(slice.offset) && Number.isSafeInteger(slice.size) ? { slice } : {}),
      ...(d.mirror !== undefined ? { mirror: String(((d.mirror ?? {}) as Node)['@_job'] ?? 'copy') } : {}),
      ...(source['@_startupPolicy'] === 'optional' ? { optional: true } : {}),
      ...(d.encryption !== undefined || source.encryption !== undefined ? { encrypted: true } : {}),
      ...(volume ? { volume } : {}),
      ...(network ? { network } : {}),
    };
  });
  const os = (domain.os ?? {}) as Node;
  const bootFiles: Record<string, string> = {};
  for (const key of ['loader', 'nvram', 'kernel', 'initrd']) {
    const value = text(os[key]);
    if (value) bootFiles[key] = value;
  }
  const guestAgent = ((devices.channel ?? []) as Node[]).some((c) => ((c.target ?? {}) as Node)['@_name'] === GUEST_AGENT_CHANNEL);
  const macs = ((devices.interface ?? []) as Node[]).flatMap((i) => {
    const mac = ((i.mac ?? {}) as Node)['@_address'];
    return mac === undefined ? [] : [String(mac).toLowerCase()];
  });
  return { name: String(text(domain.name) ?? ''), uuid: String(text(domain.uuid) ?? ''), macs, disks, bootFiles, guestAgent };
}

export interface DiskSelection {
  include?: string[];
  exclude?: string[];
  /** Back up raw-format disks too (always as copy). */
  raw?: boolean;
  /** -r given for an inc or diff, which raw disks cannot join: they are left out as asked, without a warning each. */
  rawNotInThisLevel?: boolean;
  /** The domain is shut off: its disks are read from their images by a qemu-nbd of ours, which needs a path. */
  offline?: boolean;
  /** The level makes or reads checkpoints (all but copy), which libvirt keeps in qcow2 images only. */
  checkpoints?: boolean;
}

export interface SelectedDisks {
  disks: DomainDisk[];
  /**
   * Why each left-out disk is left out, for warnings; `expected` marks what the user asked for or no one backs up
   * (-x, cdrom and floppy devices), which is said without a warning, so that -e does not fail every such run.
   */
  skipped: Array<{ disk: DomainDisk; reason: string; expected?: boolean }>;
}

/**
 * Gives each volume disk (type='volume') the path of its volume, as libvirt resolves it (a file of a directory
 * pool, a logical volume, ...). One libvirt cannot resolve keeps no path, and its `unresolved` says why.
 */
export async function resolveVolumes(disks: DomainDisk[], volumePath: (pool: string, volume: string) => Promise<string>): Promise<void> {
  for (const disk of disks) {
    if (!disk.volume || disk.path) continue;
    try {
      disk.path = await volumePath(disk.volume.pool, disk.volume.name);
    } catch (err) {
      disk.volume.unresolved = (err as Error).message;
    }
  }
}

/** Which disks a backup covers: -i/-x filters, no cdrom/floppy, raw only with `raw`, only file/block images that are there. */
export function selectDisks(all: DomainDisk[], selection: DiskSelection): SelectedDisks {
  const disks: DomainDisk[] = [];
  const skipped: SelectedDisks['skipped'] = [];
  for (const disk of all) {
    if (selection.include?.length && !selection.include.includes(disk.target)) continue;
    if (selection.exclude?.includes(disk.target)) {
      skipped.push({ disk, reason: 'left out with -x', expected: true });
    } else if (disk.device === 'cdrom' || disk.device === 'floppy') {
      skipped.push({ disk, reason: `${disk.device} device`, expected: true });
    } else if (disk.device === 'lun') {
      skipped.push({ disk, reason: 'lun device (SCSI passthrough): QEMU passes its commands through to the device, whose changes no bitmap tracks' });
    } else if (disk.readOnly) {
      skipped.push({ disk, reason: 'read-only disk (<readonly/>): libvirt backs up only writable disks, and nothing this domain does changes it; copy its image once, or leave it out with -x' });
    } else if (disk.transient) {
      skipped.push({ disk, reason: 'transient disk (<transient/>): libvirt runs no backup job on it, and its image never changes (QEMU writes to an overlay that is dropped at shutdown); copy its image once, or leave it out with -x' });
    } else if (disk.missing) {
      // Advice to run with -S was wrong: libvirt starts the domain without the disk, and no job then sees it.
      skipped.push({ disk, reason: `its image ${disk.path} is missing, and startupPolicy='optional' starts the domain without it (with -S too), so no backup holds it; put the image back to back it up, or leave the disk out with -x ${disk.target}` });
    } else if (disk.volume?.unresolved !== undefined) {
      skipped.push({ disk, reason: `libvirt gives no path of its volume ${disk.volume.name} in storage pool ${disk.volume.pool} (${disk.volume.unresolved})` });
    } else if (disk.type === 'network' && selection.offline) {
      skipped.push({ disk, reason: `network disk (${disk.network?.protocol || 'no protocol'}) of a shut-off domain: only a running domain's backup job reads it; back it up with -S (the domain started paused), or while the domain runs` });
    } else if (disk.type !== 'network' && (!disk.path || (disk.type !== 'file' && disk.type !== 'block' && disk.type !== 'volume'))) {
      skipped.push({ disk, reason: `${disk.type} disk without a local image path is not supported` });
    } else if (selection.checkpoints && disk.format !== 'raw' && disk.format !== 'qcow2') {
      // libvirt refused the whole backup job for it ("checkpoint for disk vdb unsupported for storage type vmdk").
      skipped.push({ disk, reason: `${disk.format}-format disk: libvirt keeps checkpoints in qcow2 images only, and refuses a backup job with a checkpoint on it; back it up with -l copy, convert its image to qcow2 (qemu-img convert -O qcow2) while the domain is shut off, or leave it out with -x` });
    } else if (disk.format === 'raw' && selection.rawNotInThisLevel) {
      skipped.push({ disk, reason: 'raw-format disk (no checkpoints possible): -r takes it into full and copy backups only', expected: true });
    } else if (disk.format === 'raw' && !selection.raw) {
      skipped.push({ disk, reason: 'raw-format disk (no checkpoints possible); include it with -r/--raw' });
    } else {
      disks.push(disk);
    }
  }
  return { disks, skipped };
}

/**
 * QEMU's --image-opts for a disk that is a slice of its file or device (`<slices>`), as libvirt opens it: the range
 * alone, under the disk's format. Undefined for a disk without one, which is opened by its path.
 */
export function sliceImageOpts(disk: DomainDisk): string | undefined {
  if (!disk.slice || !disk.path) return undefined;
  const { offset, size } = disk.slice;
  const driver = disk.type === 'block' ? 'host_device' : 'file';
  const name = disk.path.replace(/,/g, ',,'); // a comma in an option value is written twice
  return disk.format === 'raw'
    ? `driver=raw,offset=${offset},size=${size},file.driver=${driver},file.filename=${name}`
    : `driver=${disk.format},file.driver=raw,file.offset=${offset},file.size=${size},file.file.driver=${driver},file.file.filename=${name}`;
}
