// Keeps a domain's checkpoints in step with a backup set's chain: tells this chain's checkpoints from other
// chains' and from foreign ones, puts back checkpoints libvirt lost, finds a chain that can no longer give a
// correct incremental, and removes a chain (before a full, with the bitmaps of its names the images hold without a
// checkpoint), checkpoints a run that did not finish left, or a bitmap left without its checkpoint.
// Guarantees: only checkpoints of the given prefix are ever deleted; other chains' and foreign checkpoints
// are left alone (libvirt keeps one active bitmap per checkpoint, so they do not disturb this chain).
import fs from 'node:fs/promises';
import path from 'node:path';
import {
  VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE, VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY, VIR_DOMAIN_CHECKPOINT_XML_SIZE,
  VIR_ERR_CHECKPOINT_INCONSISTENT,
  type LibvirtDomain, type NativeError,
} from '../native/addon.js';
import {
  CHECKPOINT_DESCRIPTION, DEFAULT_PREFIX, bitmapOwnerXml, checkpointBitmapDisks, checkpointBitmapNames, checkpointCreationTime, checkpointDiskSize, checkpointDescription, checkpointIdentity, checkpointParent, checkpointSize,
  inChain, prefixOf, withoutDomain, withoutParent,
} from './checkpoints.js';
import type { Logger } from '../util/log.js';
import { parseDomainXml } from './domainXml.js';
import { UserError, oneLine } from '../util/errors.js';

function chainIndex(name: string): number {
  return Number(/\.(\d+)$/.exec(name)?.[1] ?? -1);
}

/** This chain's checkpoints (this prefix) among `names`, oldest first: no checkpoint XML needed. */
function chainCheckpoints(names: string[], prefix: string): string[] {
  return names.filter((name) => inChain(name, prefix)).sort((a, b) => chainIndex(a) - chainIndex(b));
}

/** Checkpoints someone else created: neither of this chain nor of virtnbdbackup's other chains. */
export async function foreignCheckpoints(domain: LibvirtDomain, prefix: string): Promise<string[]> {
  const foreign: string[] = [];
  for (const name of await domain.listCheckpointNames()) {
    if (inChain(name, prefix)) continue;
    const xml = await domain.checkpointGetXMLDesc(name, 0).catch(() => '');
    const ours = prefixOf(name) !== undefined && (checkpointDescription(xml)?.startsWith(CHECKPOINT_DESCRIPTION) || name.includes(DEFAULT_PREFIX));
    if (!ours) foreign.push(name);
  }
  return foreign;
}

export function warnForeign(foreign: string[], domainName: string, log: Logger): void {
  for (const name of foreign) {
    log.warn(`domain '${domainName}' has checkpoint '${name}', not created by virtnbdbackup: left alone; it does not affect this chain`);
  }
}

/**
 * Deletes a checkpoint with its bitmaps; where libvirt cannot (a disk of it lost its bitmap: an image replaced or
 * repaired), its metadata, then the bitmaps of that name its other disks still hold. Says which it did.
 */
export async function deleteCheckpoint(domain: LibvirtDomain, name: string, log: Logger): Promise<'with bitmaps' | 'metadata only'> {
  try {
    await domain.checkpointDelete(name, 0);
    return 'with bitmaps';
  } catch {
    const xml = await domain.checkpointGetXMLDesc(name, 0).catch(() => '');
    try {
      await domain.checkpointDelete(name, VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY);
    } catch (again) {
      throw new UserError(`cannot remove checkpoint ${name} of domain '${domain.name()}': ${oneLine(again)}; remove it with 'virsh checkpoint-delete --metadata ${domain.name()} ${name}'`);
    }
    log.info(`checkpoint ${name} had no usable bitmap: removed its metadata only`);
    // libvirt leaves the other disks' bitmaps of it: they tracked every guest write, and the next checkpoint of that
    // name failed with "Bitmap already exists" (Python's inc; ours cleared them then).
    const present = await domain.getXMLDesc(0).then((d) => parseDomainXml(d).disks.map((disk) => disk.target), () => [] as string[]);
    await clearOrphanBitmap(domain, name, checkpointBitmapDisks(xml).filter((target) => present.includes(target)), present, log);
    return 'metadata only';
  }
}

/** Removes this chain's checkpoints, newest first: a full backup starts the chain anew. */
export async function removeChain(domain: LibvirtDomain, prefix: string, log: Logger): Promise<void> {
  for (const name of chainCheckpoints(await domain.listCheckpointNames(), prefix).reverse()) {
    await deleteCheckpoint(domain, name, log);
    log.info(`removed old checkpoint ${name}: a full backup starts a new chain`);
  }
}

/**
 * Removes this chain's checkpoints after the set's last (`chain`), newest first: a run that did not finish (killed,
 * a second Ctrl-C, libvirtd lost) created them and could not list them in the set, and the next inc needs the name.
 * libvirt merges a deleted checkpoint's bitmap into its parent's, so the changes since the set's last checkpoint
 * stay tracked. Only checkpoints virtnbdbackup describes as its own are touched.
 */
export async function removeUnlisted(domain: LibvirtDomain, chain: string[], prefix: string, log: Logger): Promise<void> {
  const unlisted = chainCheckpoints(await domain.listCheckpointNames(), prefix).filter((name) => chainIndex(name) >= chain.length);
  for (const name of unlisted.reverse()) {
    const xml = await domain.checkpointGetXMLDesc(name, 0).catch(() => '');
    if (!checkpointDescription(xml)?.startsWith(CHECKPOINT_DESCRIPTION)) continue;
    await deleteCheckpoint(domain, name, log);
    log.warn(`removed checkpoint ${name}: a run that did not finish created it (its parent ${checkpointParent(xml) ?? 'none'}), and the set does not list it; the changes it tracked stay with ${chain.at(-1) ?? 'the chain'}`);
  }
}

async function readSaved(xmlDir: string, name: string): Promise<string | undefined> {
  return fs.readFile(path.join(xmlDir, `${name}.xml`), 'utf8').catch(() => undefined);
}

/**
 * Puts back the set's checkpoints that libvirt lost (domain undefined and defined again, moved to another host)
 * from the definitions saved in the first of `xmlDirs` that holds one (the set's own copy before a -C that other
 * sets may share), oldest first. A domain defined anew has another UUID, so a definition
 * libvirt refuses is tried again without its copy of the domain. A parent libvirt lacks (the first checkpoint of a
 * chain that began under another prefix's) is left out: libvirt refused the definition, and the inc became a full.
 */
export async function redefineMissing(domain: LibvirtDomain, chain: string[], xmlDirs: string[], log: Logger): Promise<void> {
  const present = new Set(await domain.listCheckpointNames());
  for (const name of chain) {
    if (present.has(name)) continue;
    let saved: string | undefined;
    let xmlDir = '';
    for (const dir of xmlDirs) {
      saved = await readSaved(dir, name);
      xmlDir = dir;
      if (saved !== undefined) break;
    }
    if (saved === undefined) continue;
    const parent = checkpointParent(saved);
    const xml = parent !== undefined && !present.has(parent) ? withoutParent(saved) : saved;
    try {
      await domain.checkpointCreateXML(xml, VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE).catch(() =>
        domain.checkpointCreateXML(withoutDomain(xml), VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE));
      present.add(name);
      log.info(`redefined checkpoint ${name} from ${path.join(xmlDir, `${name}.xml`)}`);
    } catch (err) {
      log.info(`could not redefine checkpoint ${name}: ${oneLine(err)}`);
    }
  }
}

/**
 * Why the set's last checkpoint cannot base an incremental, or undefined when it can (as far as libvirt's
 * metadata tells; a bitmap missing from the image shows when the job starts, see isLostBitmapError).
 */
export async function unusableParent(domain: LibvirtDomain, parent: string, xmlDir: string): Promise<string | undefined> {
  const savedFile = path.join(xmlDir, `${parent}.xml`);
  if (!(await domain.listCheckpointNames()).includes(parent)) {
    return `checkpoint ${parent} is missing in libvirt and no saved definition (${savedFile}) brought it back`;
  }
  const saved = await readSaved(xmlDir, parent);
  // Every set, Python's too, saves each checkpoint's definition: without it, another set's checkpoint of the same
  // name would pass for this one's, and the inc would hold that set's changes.
  if (saved === undefined) {
    return `the set holds no definition of checkpoint ${parent} (${savedFile} is missing), so it cannot tell whether libvirt's checkpoint of that name is its own`;
  }
  if (checkpointCreationTime(saved) === undefined) {
    return `the set's definition of checkpoint ${parent} (${savedFile}) is damaged: it holds no creation time to tell whether libvirt's checkpoint of that name is this set's`;
  }
  if (checkpointIdentity(await domain.checkpointGetXMLDesc(parent, 0)) !== checkpointIdentity(saved)) {
    return `checkpoint ${parent} in libvirt is not this set's (${savedFile}): another chain with the same prefix replaced it`;
  }
  return undefined;
}

/** Whether a failed backup start means the checkpoint's bitmap is missing or broken in the image. */
export function isLostBitmapError(err: unknown): boolean {
  return (err as NativeError).code === VIR_ERR_CHECKPOINT_INCONSISTENT || /missing or broken bitmap/i.test(oneLine(err));
}

/** The bitmap name when a backup start failed because an image already holds a bitmap of that name. */
export function existingBitmapName(err: unknown): string | undefined {
  return /Bitmap already exists: (\S+)/.exec(oneLine(err))?.[1];
}

/**
 * Removes bitmap `name` left in the images without its checkpoint (checkpoint metadata deleted while the domain
 * ran), which blocks creating checkpoint `name`: defines a checkpoint owning it on each disk, then deletes that.
 */
export async function clearOrphanBitmap(domain: LibvirtDomain, name: string, targets: string[], allTargets: string[], log: Logger): Promise<void> {
  for (const target of targets) {
    try {
      await domain.checkpointCreateXML(bitmapOwnerXml(name, target, allTargets), VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE);
    } catch {
      continue;
    }
    // A failure leaves the bitmap where it was; the backup start that follows names it. A disk without the bitmap
    // gives a delete of the metadata alone, which is no news (it said "no usable bitmap" once for each such disk).
    try {
      await domain.checkpointDelete(name, 0);
      log.info(`removed bitmap ${name} of disk ${target}: it was left without its checkpoint`);
    } catch {
      await domain.checkpointDelete(name, VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY).catch(() => undefined);
    }
  }
}

/**
 * Before a full starts chain `prefix` anew (its checkpoints removed): removes the bitmaps of that chain's names
 * (`<prefix>.N`) that the disks' images hold without a checkpoint owning them, as `listed` gives them (per disk
 * target, the bitmaps its image lists). Earlier versions of ours left such bitmaps (a checkpoint deleted by its
 * metadata alone), and so does a checkpoint's metadata deleted by hand: each stayed until the chain reached its
 * name, tracking every guest write, and a Python inc that created that name failed ("Bitmap already exists").
 * Bitmaps of other prefixes and foreign ones are left alone. Returns the names cleared.
 */
export async function clearChainOrphans(domain: LibvirtDomain, prefix: string, listed: Map<string, string[]>, allTargets: string[], log: Logger): Promise<string[]> {
  const holders = new Map<string, string[]>();
  for (const [target, names] of listed) {
    for (const name of names.filter((n) => inChain(n, prefix))) holders.set(name, [...(holders.get(name) ?? []), target]);
  }
  if (holders.size === 0) return [];
  // A bitmap some checkpoint owns is no orphan, whatever its name (a checkpoint may name its bitmap otherwise).
  for (const checkpoint of await domain.listCheckpointNames()) {
    holders.delete(checkpoint);
    const xml = await domain.checkpointGetXMLDesc(checkpoint, 0).catch(() => '');
    for (const owned of checkpointBitmapNames(xml)) holders.delete(owned);
  }
  const orphans = [...holders.keys()].sort((a, b) => chainIndex(a) - chainIndex(b));
  for (const name of orphans) await clearOrphanBitmap(domain, name, holders.get(name) as string[], allTargets, log);
  return orphans;
}

/**
 * Bytes changed since checkpoint `name` on all its disks, as libvirt estimates them (running domains only). A disk
 * of the domain (`present`) that the checkpoint gives a bitmap libvirt sizes not has lost it (removed from the
 * image, or left inconsistent by a crash): refused, where a sum without it read as nothing changed, and -T skipped
 * every backup. libvirt sizes no disk detached since the checkpoint either; that one has nothing to back up.
 */
export async function changedBytesSince(domain: LibvirtDomain, name: string, present: readonly string[]): Promise<number> {
  const xml = await domain.checkpointGetXMLDesc(name, VIR_DOMAIN_CHECKPOINT_XML_SIZE);
  const unsized = checkpointBitmapDisks(xml).filter((target) => present.includes(target) && checkpointDiskSize(xml, target) === undefined);
  if (unsized.length > 0) {
    throw new UserError(`the bitmap of checkpoint ${name} on disk ${unsized.join(', ')} is missing or broken in the image (libvirt sizes no changes since it): the next inc makes a full backup instead`);
  }
  return checkpointSize(xml);
}
