// The checkpoint chain of a backup set: which checkpoint a run creates and which it is based on, and the XML
// libvirt needs for both. Pure planning and parsing; see chain.ts and backupJob.ts for the calls.
//   full: <prefix>.0, no parent, new chain      inc: <prefix>.<n>, parent = last in the set's .cpt
//   diff: nothing created, changes since the last checkpoint      copy: nothing created, no parent
// A chain is named by its prefix: checkpoints <prefix>.0, <prefix>.1, ...; one set holds one chain.
import { XMLParser } from 'fast-xml-parser';
import { UserError } from '../util/errors.js';

export type Level = 'copy' | 'full' | 'inc' | 'diff';

/** The prefix virtnbdbackup always uses; ours is the default and can be changed per chain. */
export const DEFAULT_PREFIX = 'virtnbdbackup';
/** Start of the description of every checkpoint we (and virtnbdbackup) create: marks checkpoints of our chains. */
export const CHECKPOINT_DESCRIPTION = 'Backup checkpoint';

const PREFIX = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;
const CHAIN_NAME = /^(.+)\.(\d+)$/;

/** Throws unless `prefix` can name checkpoints and the files named after them. */
export function checkPrefix(prefix: string): string {
  if (!PREFIX.test(prefix) || prefix.length > 64) {
    throw new UserError(`checkpoint prefix '${prefix}' is not usable: letters, digits, '_', '-' and '.', starting with a letter or digit, at most 64`);
  }
  return prefix;
}

/** The prefix of a chain checkpoint name (`weekly.3` -> `weekly`), undefined for other names. */
export function prefixOf(name: string): string | undefined {
  return CHAIN_NAME.exec(name)?.[1];
}

/** Whether `name` is a checkpoint of the chain `prefix`. */
export function inChain(name: string, prefix: string): boolean {
  return prefixOf(name) === prefix;
}

export interface CheckpointPlan {
  /** Name written into the stream metadata (and created, when `create`). */
  name: string;
  /** Checkpoint the dirty bitmap is relative to; '' for copy/full. */
  parent: string;
  /** Whether this run creates `name` in libvirt. */
  create: boolean;
}

export function planCheckpoint(level: Level, chain: string[], prefix = DEFAULT_PREFIX): CheckpointPlan {
  switch (level) {
    case 'copy':
      return { name: `${prefix}.0`, parent: '', create: false };
    case 'full':
      return { name: `${prefix}.0`, parent: '', create: true };
    case 'inc':
    case 'diff': {
      const parent = chain[chain.length - 1];
      if (parent === undefined) throw new Error(`no checkpoints in the backup set: run a full backup first`);
      return { name: `${prefix}.${chain.length}`, parent, create: level === 'inc' };
    }
  }
}

function escapeXml(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

/** `<disks>` of a checkpoint: a bitmap on each of `targets` (named `bitmap`, default the checkpoint's name), the rest 'no'. */
function checkpointDisks(targets: string[], allTargets: string[], bitmap?: string): string {
  const selected = new Set(targets);
  const bitmapAttribute = bitmap ? ` bitmap='${escapeXml(bitmap)}'` : '';
  const lines = targets.map((t) => `    <disk name='${escapeXml(t)}' checkpoint='bitmap'${bitmapAttribute}/>`);
  for (const t of allTargets) if (!selected.has(t)) lines.push(`    <disk name='${escapeXml(t)}' checkpoint='no'/>`);
  return `  <disks>\n${lines.join('\n')}\n  </disks>\n`;
}

/**
 * Checkpoint over `diskTargets`; the domain's other disks are listed with checkpoint='no'. `runId` goes into the
 * description, so that a later checkpoint of the same name (another chain's) is told apart even within a second.
 */
export function checkpointXml(plan: CheckpointPlan, diskTargets: string[], allTargets: string[], runId?: string): string {
  const parent = plan.parent ? `  <parent><name>${escapeXml(plan.parent)}</name></parent>\n` : '';
  const description = runId ? `${CHECKPOINT_DESCRIPTION} (run ${escapeXml(runId)})` : CHECKPOINT_DESCRIPTION;
  return `<domaincheckpoint>\n  <description>${description}</description>\n  <name>${escapeXml(plan.name)}</name>\n${parent}${checkpointDisks(diskTargets, allTargets)}</domaincheckpoint>\n`;
}

export interface BackupJobDisk {
  target: string;
  scratchFile: string;
  /** Exported whole in an incremental job: the disk has no bitmap of the parent checkpoint (added since). */
  full?: boolean;
  /** In an incremental job, this disk's changes since this checkpoint instead of the job's (left out since, -x). */
  since?: string;
}

/** Pull-mode backup over a unix socket; `<incremental>` makes libvirt export the dirty bitmap as backup-<disk>. */
/**
 * Where a backup job's NBD server listens: a unix socket, or a TCP address for a domain on another host, with TLS
 * when `tlsCertificates` names the client's certificates (the server's are the host libvirt's).
 */
export type JobServer = { socket: string } | { host: string; port: number; tlsCertificates?: string };

/** The `<server>` element of a job served at `server`. */
function serverXml(server: JobServer): string {
  if ('socket' in server) return `<server transport='unix' socket='${escapeXml(server.socket)}'/>`;
  const tls = server.tlsCertificates ? ` tls='yes'` : '';
  return `<server transport='tcp'${tls} name='${escapeXml(server.host)}' port='${server.port}'/>`;
}

export function backupJobXml(server: JobServer, incrementalFrom: string, disks: BackupJobDisk[], allTargets: string[]): string {
  const selected = new Set(disks.map((d) => d.target));
  // Per-disk modes (libvirt >= 7.6): this disk whole, or its changes since another checkpoint than the job's.
  const mode = (d: BackupJobDisk): string => {
    if (!incrementalFrom) return '';
    if (d.full) return ` backupmode='full'`;
    return d.since ? ` backupmode='incremental' incremental='${escapeXml(d.since)}'` : '';
  };
  const lines = disks.map((d) =>
    `    <disk name='${escapeXml(d.target)}' backup='yes' type='file'${mode(d)}>\n      <scratch file='${escapeXml(d.scratchFile)}'/>\n    </disk>`);
  for (const t of allTargets) if (!selected.has(t)) lines.push(`    <disk name='${escapeXml(t)}' backup='no'/>`);
  const incremental = incrementalFrom ? `  <incremental>${escapeXml(incrementalFrom)}</incremental>\n` : '';
  return `<domainbackup mode='pull'>\n${incremental}  ${serverXml(server)}\n  <disks>\n${lines.join('\n')}\n  </disks>\n</domainbackup>\n`;
}

/** Name of the dirty-bitmap meta context libvirt's pull backup exports for a disk. */
export function dirtyBitmapContext(target: string): string {
  return `qemu:dirty-bitmap:backup-${target}`;
}

/** A checkpoint definition without its `<domain>` copy, for redefining on a domain defined anew (other UUID). */
export function withoutDomain(checkpointXml: string): string {
  return checkpointXml.replace(/<domain[\s>][\s\S]*<\/domain>\s*/, '');
}

/**
 * The checkpoint XML without its `<parent>`, for a redefinition whose parent libvirt no longer has: another chain's
 * checkpoint (the chains of a domain share one tree) that its full removed, or one not redefined yet.
 */
export function withoutParent(checkpointXml: string): string {
  return checkpointXml.replace(/<parent>\s*<name>[^<]*<\/name>\s*<\/parent>\s*/, '');
}

const checkpointParser = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@_', isArray: (name) => name === 'disk' });

/** The attributes of each `<disk>` of a checkpoint XML's `<disks>` (not of its copy of the domain). */
function checkpointDiskEntries(xml: string): Array<Record<string, string>> {
  const root = (checkpointParser.parse(xml) as { domaincheckpoint?: { disks?: { disk?: Array<Record<string, string>> } } }).domaincheckpoint;
  return root?.disks?.disk ?? [];
}

/** The disks a checkpoint XML gives a bitmap (checkpoint='bitmap'): the only ones an incremental from it can read. */
export function checkpointBitmapDisks(xml: string): string[] {
  return checkpointDiskEntries(xml).filter((d) => d['@_checkpoint'] === 'bitmap').map((d) => d['@_name'] ?? '');
}

/** The bitmaps a checkpoint XML owns: each bitmap disk's `bitmap` attribute, else the checkpoint's name (libvirt's default). */
export function checkpointBitmapNames(xml: string): string[] {
  const name = element(xml, 'name');
  return checkpointDiskEntries(xml).filter((d) => d['@_checkpoint'] === 'bitmap').map((d) => d['@_bitmap'] ?? name ?? '').filter(Boolean);
}

/** The `size` (bytes changed since the checkpoint) an XML got with the size flag gives `target`: none without its bitmap. */
export function checkpointDiskSize(xml: string, target: string): number | undefined {
  const size = checkpointDiskEntries(xml).find((d) => d['@_name'] === target)?.['@_size'];
  return size === undefined ? undefined : Number(size);
}

/** Text of the first `<tag>` element of a checkpoint XML. */
function element(xml: string, tag: string): string | undefined {
  return new RegExp(`<${tag}>([^<]*)</${tag}>`).exec(xml)?.[1]?.trim();
}

export function checkpointDescription(xml: string): string | undefined {
  return element(xml, 'description');
}

/** The name of a checkpoint XML's `<parent>`, if it has one. */
export function checkpointParent(xml: string): string | undefined {
  return /<parent>\s*<name>([^<]*)<\/name>/.exec(xml)?.[1]?.trim();
}

/** The `<creationTime>` (seconds since the epoch) of a checkpoint XML, if it holds one. */
export function checkpointCreationTime(xml: string): string | undefined {
  const time = element(xml, 'creationTime');
  return time !== undefined && /^\d+$/.test(time) ? time : undefined;
}

/** The UUID in a checkpoint XML's copy of its domain's definition, if it holds one. */
export function checkpointDomainUuid(xml: string): string | undefined {
  return /<domain[\s>][\s\S]*?<uuid>\s*([^<\s]+)\s*<\/uuid>/.exec(xml)?.[1];
}

/** Creation time and description: tell a checkpoint apart from a later one of the same name (another chain's). */
export function checkpointIdentity(xml: string): string {
  return `${element(xml, 'creationTime') ?? ''} ${element(xml, 'description') ?? ''}`;
}

/** Sum of the per-disk `size` attributes (bytes changed since the checkpoint) of an XML got with the size flag. */
export function checkpointSize(xml: string): number {
  return checkpointDiskEntries(xml).reduce((total, d) => total + Number(d['@_size'] ?? 0), 0);
}

/**
 * A definition (for REDEFINE) of checkpoint `name` owning only the bitmap of that name on `target`: deleting it
 * through libvirt removes a bitmap left in the image without a checkpoint, which would block creating `name`.
 */
export function bitmapOwnerXml(name: string, target: string, allTargets: string[]): string {
  return `<domaincheckpoint>\n  <name>${escapeXml(name)}</name>\n  <creationTime>1</creationTime>\n${checkpointDisks([target], allTargets, name)}</domaincheckpoint>\n`;
}
