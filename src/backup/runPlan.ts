// Decides what one run writes and against which checkpoint, from the set's chain and the domain's state:
//   requested level -> offline? (full becomes copy; inc becomes a diff: no checkpoint can be created)
//   -> inc/diff: the set's checkpoint list under the domain's former name taken over after a rename (same UUID)
//   -> inc/diff: the set's chain (.cpt), its prefix; checkpoints at its end that no data file of the set belongs to
//      (a run that listed its checkpoint first, as Python's tool does, and died) dropped, their changes kept;
//      checkpoints libvirt lost put back from the saved XML
//   -> an inc of the set replaced by Python's offline inc of its checkpoint (the chain cannot restore from there)
//      makes a full, as an unusable parent does
//   -> the parent still usable, no disk's image another disk's at the parent (swapped)? else fall back: the set's chain is moved to chain.<secs>/, this run is a full
//      (with -r, of the raw disks too, as any full)
//   -> inc: checkpoints after the set's last, left by a run that did not finish, removed (their changes kept)
//   -> inc: disks added to the domain since the parent (no bitmap of it) are saved whole, as their chain's base;
//      disks left out of the backups since (-x) resume from their last checkpoint, whose bitmap still runs
// Guarantees: an inc/diff is only planned on a parent checkpoint that is this set's own; anything else
// becomes a full backup with a warning (or a clear error where a full is impossible), never a wrong inc.
import path from 'node:path';
import fs from 'node:fs/promises';
import {
  CHECKPOINT_DIR, archiveChain, checkpointListName, dataFileName, isArchivedChain, lastArchivedChain, listSet, readCheckpointList, savedConfigNames, vmConfigName, type DataFile,
} from '../set/backupSet.js';
import { DirectoryTarget } from '../set/target.js';
import { StreamReader } from '../stream/reader.js';
import type { StreamMetadata } from '../stream/format.js';
import {
  DEFAULT_PREFIX, checkPrefix, checkpointBitmapDisks, checkpointDiskSize, planCheckpoint, prefixOf, type CheckpointPlan, type Level,
} from '../libvirt/checkpoints.js';
import { deleteCheckpoint, foreignCheckpoints, redefineMissing, removeUnlisted, unusableParent, warnForeign } from '../libvirt/chain.js';
import { UserError } from '../util/errors.js';
import { exists } from '../util/fileIo.js';
import { parseDomainXml, selectDisks, type DomainDisk } from '../libvirt/domainXml.js';
import { OUTPUT_LOCK_NAME } from './lock.js';
import { bitmapProblems, imageBitmaps, isImageLocked } from './offline.js';
import { VIR_DOMAIN_CHECKPOINT_XML_SIZE } from '../native/addon.js';
import { imageInfoJson } from './sideFiles.js';
import { ownCheckpointDir, type RunContext } from './context.js';

export interface RunPlan {
  level: Level;
  checkpoint: CheckpointPlan;
  /** This chain's checkpoint name prefix. */
  prefix: string;
  /** The set's checkpoints before this run, oldest first. */
  chain: string[];
  /** Where the previous chain went when this run fell back to a full backup. */
  archivedChain?: string;
  /** Disks added to the domain since the parent checkpoint: an inc saves them whole, as the base of their chain. */
  addedDisks: string[];
  /** Disks left out of the backups since an earlier checkpoint of the chain (-x): an inc saves their changes since it. */
  resumedDisks: Array<{ target: string; from: string }>;
  /**
   * qcow2 disks of 0 bytes (inc/diff): QEMU writes no persistent bitmap into such an image, so after the domain
   * stops they have none; read whole (nothing) instead of against one, where every inc fell back to a full.
   */
  emptyDisks: string[];
}

/**
 * The chain's prefix: the set's own for inc/diff (a mismatching --checkpoint-prefix is refused), else the option.
 * A zip chain's set is the working directory that keeps its state.
 */
function resolvePrefix(wanted: string | undefined, chain: string[], cptFile: string, toZip: boolean): string {
  const own = chain.length > 0 ? prefixOf(chain[0] as string) : undefined;
  if (own !== undefined && wanted !== undefined && wanted !== own) {
    const where = toZip ? `run the '${wanted}' zips from a working directory of their own` : 'use the set of that chain';
    throw new UserError(`the ${toZip ? 'zip chain' : 'set\'s chain'} uses checkpoint prefix '${own}' (${cptFile}), not '${wanted}'; drop --checkpoint-prefix or ${where}`);
  }
  return checkPrefix(own ?? wanted ?? DEFAULT_PREFIX);
}

function planFor(level: Level, chain: string[], prefix: string): RunPlan {
  return { level, chain, prefix, checkpoint: planCheckpoint(level, chain, prefix), addedDisks: [], resumedDisks: [], emptyDisks: [] };
}

/** What disksWithoutBitmap found: disks to save whole, disks to resume, or why this run must be a full one. */
interface DiskChanges {
  added: string[];
  resumed: RunPlan['resumedDisks'];
  problem?: string;
}

/** The newest checkpoint of the chain that gave `target` a bitmap: undefined for a disk new to the chain. */
async function lastBitmapOf(ctx: RunContext, target: string, chain: string[]): Promise<string | undefined> {
  // The parent is the chain's last, which gave the disk none.
  for (const name of chain.slice(0, -1).reverse()) {
    const xml = await ctx.domain.checkpointGetXMLDesc(name, 0).catch(() => '');
    if (checkpointBitmapDisks(xml).includes(target)) return name;
  }
  return undefined;
}

/**
 * Whether `target` still has the bitmap of checkpoint `last`, which has tracked every change since when the disk
 * was left out of the backups after it (-x): no later checkpoint gave the disk a new one. A disk attached anew
 * under that name has not. libvirt's size of the changes since that checkpoint names the disk only where QEMU has
 * the bitmap (a running QEMU writes new bitmaps into the image only when it closes it); a shut-off domain's image
 * lists its bitmaps.
 */
async function stillTracked(ctx: RunContext, target: string, last: string): Promise<boolean> {
  if (!ctx.power.offline) {
    const sized = await ctx.domain.checkpointGetXMLDesc(last, VIR_DOMAIN_CHECKPOINT_XML_SIZE).catch(() => '');
    return sized !== '' && checkpointDiskSize(sized, target) !== undefined;
  }
  const disk = ctx.disks.find((d) => d.target === target);
  const info = disk ? await imageInfoJson(ctx, disk).catch(() => undefined) : undefined;
  return info !== undefined && imageBitmaps(info).some((b) => b.name === last);
}

/**
 * The disks of this run that checkpoint `parent` (its XML: `xml`) gave no bitmap. One no checkpoint of the chain gave a bitmap was
 * added to the domain since: an inc saves it whole (a full stream, `<disk>.full.data`) and the new checkpoint
 * gives it a bitmap, so its own chain goes on from there. One an earlier checkpoint did was left out of the
 * backups since (-x): it resumes from that checkpoint while it still has its bitmap (stillTracked). Where neither
 * can be, the problem to fall back to a full backup for: a diff creates no checkpoint to start a chain, and a disk
 * attached anew under the name of one the chain holds cannot take another base. Judged by the checkpoints, not
 * the files, so that a zip on standard output (whose set is elsewhere) is judged alike.
 */
async function disksWithoutBitmap(ctx: RunContext, parent: string, xml: string | undefined, level: Level, chain: string[]): Promise<DiskChanges> {
  // Unreadable, it tells nothing: the job's start then names a missing bitmap, which falls back to a full.
  if (xml === undefined) return { added: [], resumed: [] };
  const bitmaps = new Set(checkpointBitmapDisks(xml));
  const missing = ctx.disks.filter((d) => d.format !== 'raw' && !bitmaps.has(d.target)).map((d) => d.target);
  const changes: DiskChanges = { added: [], resumed: [] };
  for (const target of missing) {
    const from = await lastBitmapOf(ctx, target, chain);
    if (from === undefined) {
      changes.added.push(target);
    } else if (await stillTracked(ctx, target, from)) {
      const moved = await movedImage(ctx, from, await ctx.domain.checkpointGetXMLDesc(from, 0).catch(() => undefined), [target]);
      if (moved) return { ...changes, problem: moved };
      changes.resumed.push({ target, from });
    } else {
      return { ...changes, problem: `disk ${target} of '${ctx.options.domain}' has no bitmap of checkpoint ${parent} (attached anew since), and the chain already holds a disk ${target} (up to checkpoint ${from})` };
    }
  }
  if (level === 'diff' && changes.added.length > 0) {
    const named = `disk${changes.added.length > 1 ? 's' : ''} ${changes.added.join(', ')}`;
    return { ...changes, problem: `${named} of '${ctx.options.domain}' ${changes.added.length > 1 ? 'have' : 'has'} no bitmap of checkpoint ${parent} (added to the domain since, or left out of every backup of the chain), and a differential backup cannot start ${changes.added.length > 1 ? 'their chains' : 'its chain'}` };
  }
  return changes;
}

/** What names a disk's image in a domain XML: its file or device, or its pool volume; none for a network disk. */
const imageOf = (disk: DomainDisk): string | undefined => (disk.volume ? `volume ${disk.volume.pool}/${disk.volume.name}` : disk.network ? undefined : disk.path);

/**
 * A disk read against a checkpoint whose image another disk of the domain had at that checkpoint (images swapped or
 * moved between targets by an edited XML): libvirt reads the bitmap of that name in whatever image the target has
 * now, so the inc would put one disk's changes onto another disk's chain, and its restore would mix the two. Judged
 * by the domain definition libvirt keeps with the checkpoint (in its XML, `xml`), else the one the set saved then;
 * none tells nothing. `targets` are the disks of this run read against `checkpoint`; undefined where none moved.
 */
async function movedImage(ctx: RunContext, checkpoint: string, xml: string | undefined, targets: string[]): Promise<string | undefined> {
  if (targets.length === 0) return undefined;
  // A checkpoint redefined without it (the domain defined anew): the domain XML the set saved at that checkpoint.
  const definition = (xml === undefined ? undefined : /<domain[\s>][\s\S]*<\/domain>/.exec(xml)?.[0])
    ?? (ctx.toZip ? undefined : await fs.readFile(path.join(ctx.stateDir, vmConfigName(checkpoint)), 'utf8').catch(() => undefined));
  if (definition === undefined) return undefined;
  let then: DomainDisk[];
  try {
    then = parseDomainXml(definition).disks;
  } catch {
    return undefined;
  }
  for (const disk of ctx.disks.filter((d) => targets.includes(d.target))) {
    const image = imageOf(disk);
    const was = image === undefined ? undefined : then.find((d) => d.target !== disk.target && imageOf(d) === image);
    if (was) {
      return `disk ${disk.target} of '${ctx.options.domain}' now has the image ${image as string}, which disk ${was.target} had at checkpoint ${checkpoint} (the disks' images were swapped or moved between targets since): its bitmap holds disk ${was.target}'s changes, and an inc would put them onto disk ${disk.target}'s chain`;
    }
  }
  return undefined;
}

/** movedImage of the disks checkpoint `parent` (its XML: `xml`) gave a bitmap. */
async function movedImages(ctx: RunContext, parent: string, xml: string | undefined): Promise<string | undefined> {
  return xml === undefined ? undefined : movedImage(ctx, parent, xml, checkpointBitmapDisks(xml));
}

/**
 * A set whose checkpoint list bears another name than the domain's: the domain was renamed (virsh domrename keeps
 * its UUID and checkpoints) when the set's newest saved XML has the domain's UUID, and the list is then renamed
 * too (not by -p, which writes nothing), with a line saying so. Another domain's set is refused; without a saved
 * XML, the line says what to check. Returns the list to read.
 */
async function adoptRenamedChain(ctx: RunContext, cptFile: string): Promise<string> {
  if (ctx.toZip || (await exists(cptFile)) || !(await exists(ctx.stateDir))) return cptFile;
  const lists = (await fs.readdir(ctx.stateDir)).filter((n) => n.endsWith('.cpt'));
  if (lists.length !== 1) return cptFile;
  const former = lists[0] as string;
  const newest = (await savedConfigNames(ctx.stateDir))[0];
  // A saved XML that cannot be read or parsed tells no UUID: the line below then says what to check.
  const uuid = newest ? await fs.readFile(path.join(ctx.stateDir, newest), 'utf8').then((xml) => parseDomainXml(xml).uuid).catch(() => '') : '';
  const formerName = former.slice(0, -'.cpt'.length);
  if (!uuid || !ctx.info.uuid) {
    throw new UserError(`the set ${ctx.stateDir} holds the chain of '${formerName}' (${former}), not of '${ctx.options.domain}'; if the domain was renamed, rename ${former} to ${path.basename(cptFile)} to continue its chain, else back up into another directory`);
  }
  if (uuid !== ctx.info.uuid) {
    throw new UserError(`the set ${ctx.stateDir} holds the chain of another domain, '${formerName}' (${former}, UUID ${uuid}), not of '${ctx.options.domain}' (UUID ${ctx.info.uuid}); back up into another directory`);
  }
  if (ctx.options.printOnly) return path.join(ctx.stateDir, former);
  await fs.rename(path.join(ctx.stateDir, former), cptFile);
  ctx.log.info(`domain '${ctx.options.domain}' was '${formerName}' when the set's chain began (same UUID): its checkpoint list ${former} is now ${path.basename(cptFile)}`);
  return cptFile;
}

/**
 * Zip runs keep their chain's state in the working directory's `<domain>.cpt`, one chain per directory: a full of
 * another prefix replaced that chain's state without a word, and its next inc was refused (found by a black-box round).
 */
async function refuseOtherZipChain(cptFile: string, prefix: string): Promise<void> {
  const first = (await readCheckpointList(cptFile).catch(() => [] as string[]))[0];
  const own = first === undefined ? undefined : prefixOf(first);
  if (own !== undefined && own !== prefix) {
    throw new UserError(`${cptFile} keeps the state of the zip chain of checkpoint prefix '${own}', which a full of prefix '${prefix}' would replace; run the zips of each prefix from a working directory of its own, or move that list away to end its chain`);
  }
}

/** Plans the run for `requested` (never 'auto'); may fall back to a full backup (see fallBackToFull). */
export async function planRun(ctx: RunContext, requested: Level): Promise<RunPlan> {
  const { options, log, domain, power } = ctx;
  let level = requested;
  if (power.offline && level === 'full') {
    log.warn(`domain '${options.domain}' is shut off: libvirt cannot create checkpoints without QEMU, so this full backup is a copy (no chain); back it up ${power.runningAdvice} to start a chain`);
    level = 'copy';
  }
  const incremental = level === 'inc' || level === 'diff';
  const listFile = path.join(ctx.stateDir, checkpointListName(options.domain));
  const cptFile = incremental ? await adoptRenamedChain(ctx, listFile) : listFile;
  const chain = incremental ? await readCheckpointList(cptFile) : [];
  const prefix = resolvePrefix(options.checkpointPrefix, chain, cptFile, ctx.toZip);
  if (level === 'copy') return planFor(level, [], prefix);
  if (level === 'full' && ctx.toZip) await refuseOtherZipChain(listFile, prefix);
  warnForeign(await foreignCheckpoints(domain, prefix), options.domain, log);
  if (level === 'full') return planFor(level, [], prefix);

  // Zip sets keep their files in the zips: not judged by files.
  const setFiles = ctx.toZip || chain.length === 0 ? undefined : (await listSet(ctx.stateDir)).dataFiles;
  const savedAt = setFiles && savedDisksOf(ctx, setFiles, chain);
  if (savedAt) await dropUnfinished(ctx, chain, cptFile, savedAt);
  const parent = chain[chain.length - 1];
  if (parent === undefined) {
    const missing = !(await exists(cptFile));
    // A run that was to start the chain anew moved its state aside and did not finish: that is where the state went.
    const archived = await lastArchivedChain(ctx.stateDir);
    const elsewhere = archived
      ? ` (the previous chain's state is in ${archived.path}, moved aside by a run that was to start a new chain and did not finish)`
      : missing && ctx.toZip ? ', or start this run from the directory the chain\'s earlier -o - runs started from (their state is kept there)' : '';
    throw new UserError(`no checkpoints in the backup set (${cptFile} ${missing ? 'is missing' : 'lists none'}): run a full backup first${archived ? ` (-l full${archived.prefixFlag})` : ''}${elsewhere}`);
  }
  // -C may be shared by several sets (of the domain, or in zip mode of several domains): the set's own copy tells
  // whether libvirt's checkpoint is its own (sets made before it kept one have only -C's).
  const own = ownCheckpointDir(ctx);
  await redefineMissing(domain, chain, [...new Set([own, ctx.xmlDir])], log);
  const ownCopy = own !== ctx.xmlDir && (await exists(path.join(own, `${parent}.xml`)));
  const problem = await unusableParent(domain, parent, ownCopy ? own : ctx.xmlDir);
  if (problem) return fallBackToFull(ctx, prefix, problem);
  const unsaved = savedAt && (await disksWithoutFile(ctx, parent, chain, savedAt));
  if (unsaved) return fallBackToFull(ctx, prefix, unsaved);
  const replaced = setFiles && (await replacedIncs(ctx, setFiles, chain));
  if (replaced) return fallBackToFull(ctx, prefix, replaced);
  // The parent's XML, read once for both: whether an image moved between targets, and which disks it tracks.
  const parentXml = await domain.checkpointGetXMLDesc(parent, 0).catch(() => undefined);
  const moved = await movedImages(ctx, parent, parentXml);
  if (moved) return fallBackToFull(ctx, prefix, moved);
  const added = await disksWithoutBitmap(ctx, parent, parentXml, level, chain);
  if (added.problem) return fallBackToFull(ctx, prefix, added.problem);
  if (power.offline && added.added.length > 0) {
    throw new UserError(`disk ${added.added.join(', ')} of '${options.domain}' was added since checkpoint ${parent}: its chain starts with a checkpoint, which libvirt cannot create while the domain is shut off; run again ${power.runningAdvice} (that inc saves it whole)`);
  }
  const resumed = added.resumed[0];
  if (power.offline && resumed) {
    throw new UserError(`disk ${resumed.target} of '${options.domain}' was left out of the backups after checkpoint ${resumed.from}: a shut-off domain's disks are read against one checkpoint, ${parent}; run again ${power.runningAdvice} (that inc saves its changes since ${resumed.from})`);
  }
  const empty = await emptyDisks(ctx);
  const tracked = ctx.disks.filter((d) => !empty.includes(d.target));
  const bitmaps = power.offline ? (await bitmapProblems((disk) => imageInfoJson(ctx, disk), tracked, parent, (disk) => isImageLocked((c, a) => ctx.host.run(c, a), disk.path as string))).join('; ') : '';
  if (bitmaps) return fallBackToFull(ctx, prefix, bitmaps);
  if (!power.offline && level === 'inc' && !options.printOnly) await removeUnlisted(domain, chain, prefix, log);
  if (power.offline && level === 'inc') {
    log.info(`domain '${options.domain}' is shut off: libvirt cannot create checkpoint ${prefix}.${chain.length} now, so this inc saves the changes since ${parent} as a differential backup; the chain continues with the next inc while the domain runs`);
    level = 'diff';
  }
  const plan = { ...planFor(level, chain, prefix), addedDisks: added.added, resumedDisks: added.resumed, emptyDisks: empty.filter((t) => !added.added.includes(t)) };
  for (const target of options.printOnly ? [] : plan.addedDisks) {
    log.info(`disk ${target} has no bitmap of checkpoint ${parent} (added to the domain since, or left out of every backup of the chain): this inc saves it whole as ${dataFileName(target, 'full', '')}, and checkpoint ${plan.checkpoint.name} starts its changes`);
  }
  for (const { target, from } of options.printOnly ? [] : plan.resumedDisks) {
    log.info(`disk ${target} was left out of the backups after checkpoint ${from}: this ${level} saves its changes since ${from}, which its bitmap there has kept`);
  }
  return plan;
}

/**
 * The qcow2 image disks of this run whose image holds 0 bytes (qemu-img info, all at once: about 6 ms each here, an
 * ssh round trip on another host); one it cannot read counts as not empty.
 */
async function emptyDisks(ctx: RunContext): Promise<string[]> {
  const images = ctx.disks.filter((d) => d.format === 'qcow2' && d.path !== undefined && d.type !== 'network');
  const empty = await Promise.all(images.map(async (disk) => {
    const info = await imageInfoJson(ctx, disk).catch(() => undefined);
    try {
      return info !== undefined && (JSON.parse(info) as { 'virtual-size'?: unknown })['virtual-size'] === 0;
    } catch {
      return false; // not JSON: not known to be empty
    }
  }));
  return images.filter((_, i) => empty[i]).map((d) => d.target);
}

/** The disks of which the set holds a finished data file at a checkpoint of the chain, by the checkpoint's index. */
type SavedDisks = (index: number) => Promise<Set<string>>;

/**
 * SavedDisks of the set's `files`: the incs named after the checkpoint, and the fulls of disks added then (an inc
 * saves those whole), told by their metadata, read once each; for the first checkpoint, every full.
 */
function savedDisksOf(ctx: RunContext, files: DataFile[], chain: string[]): SavedDisks {
  const fullsAt = new Map<string, Promise<string | undefined>>();
  const checkpointOf = (file: string): Promise<string | undefined> => {
    if (!fullsAt.has(file)) fullsAt.set(file, StreamReader.metadata(path.join(ctx.stateDir, file)).then((m) => m.checkpointName, () => undefined));
    return fullsAt.get(file) as Promise<string | undefined>;
  };
  return async (index) => {
    const saved = new Set<string>();
    for (const f of files) {
      if (f.level === 'inc' && f.ident === chain[index]) saved.add(f.disk);
      if (f.level === 'full' && (index === 0 || (await checkpointOf(f.file)) === chain[index])) saved.add(f.disk);
    }
    return saved;
  };
}

/**
 * Drops (from `chain`, in place) the checkpoints at its end that no finished data file of the set belongs to: a run
 * that listed its checkpoint before its data was written (Python's tool does; ours lists it last) died, so their
 * changes are in no file, and an inc on them would leave a gap no restore crosses. They are removed from libvirt,
 * which keeps their changes in the previous checkpoint's bitmap, and from the list (-p only says so). A `.partial`
 * of such a run was refused before (checkSet).
 */
async function dropUnfinished(ctx: RunContext, chain: string[], cptFile: string, savedAt: SavedDisks): Promise<void> {
  let kept = chain.length;
  while (kept > 1 && (await savedAt(kept - 1)).size === 0) kept--;
  const dropped = chain.slice(kept);
  if (dropped.length === 0) return;
  const parent = chain[kept - 1] as string;
  const named = `checkpoint${dropped.length > 1 ? 's' : ''} ${dropped.join(', ')}`;
  const what = `the set lists ${named} but holds no data file of ${dropped.length > 1 ? 'them' : 'it'} (a run that did not finish)`;
  if (ctx.power.offline) {
    throw new UserError(`${what}: a shut-off domain's changes since ${parent} cannot be read past ${dropped.length > 1 ? 'them' : 'it'}; run again ${ctx.power.runningAdvice} (that run continues from ${parent})`);
  }
  chain.splice(kept);
  if (ctx.options.printOnly) {
    ctx.log.warn(`${what}: the next backup continues the chain from ${parent}`);
    return;
  }
  const present = new Set(await ctx.domain.listCheckpointNames());
  for (const name of [...dropped].reverse()) if (present.has(name)) await deleteCheckpoint(ctx.domain, name, ctx.log);
  await new DirectoryTarget(ctx.stateDir).writeFile(path.basename(cptFile), JSON.stringify(chain));
  ctx.log.warn(`${what}: this run continues the chain from ${parent}, whose bitmap keeps the changes since; ${named} removed from libvirt and from ${path.basename(cptFile)}`);
}

/**
 * A disk that checkpoint `parent` (the chain's last) gave a bitmap but the set holds no file of (a run that died
 * between two disks, a full of Python's included): its changes up to `parent` are in no file, so an inc would leave
 * a gap in that disk's chain, or start it with no full. Undefined when every such disk has its file.
 */
async function disksWithoutFile(ctx: RunContext, parent: string, chain: string[], savedAt: SavedDisks): Promise<string | undefined> {
  const xml = await ctx.domain.checkpointGetXMLDesc(parent, 0).catch(() => undefined);
  if (xml === undefined) return undefined;
  const saved = await savedAt(chain.length - 1);
  const unsaved = checkpointBitmapDisks(xml).filter((disk) => !saved.has(disk));
  if (unsaved.length === 0) return undefined;
  return `checkpoint ${parent} tracks disk ${unsaved.join(', ')}, but the set holds no ${unsaved.length > 1 ? 'files' : 'file'} of ${unsaved.length > 1 ? 'them' : 'it'} at that checkpoint (a run that did not finish)`;
}

/**
 * An inc of the chain (not of the checkpoint of its disk's full) whose metadata names its checkpoint as its own parent: an offline
 * backup of Python's virtnbdbackup, which saves the changes since the last checkpoint under the name of the inc that
 * made it, replacing that file. The changes up to that checkpoint are then in no file, so no later point restores.
 */
async function replacedIncs(ctx: RunContext, files: DataFile[], chain: string[]): Promise<string | undefined> {
  const listed = new Set(chain);
  const metadata = (file: string): Promise<StreamMetadata | undefined> => StreamReader.metadata(path.join(ctx.stateDir, file)).catch(() => undefined);
  for (const f of files) {
    if (f.level !== 'inc' || !listed.has(f.ident)) continue;
    const meta = await metadata(f.file);
    if (!meta?.incremental || meta.checkpointName !== f.ident || meta.parentCheckpoint !== f.ident) continue;
    // After the disk's full (the chain's first checkpoint, or one that added the disk) it replaced nothing.
    const full = files.find((b) => b.disk === f.disk && b.level === 'full');
    if (full === undefined || (await metadata(full.file))?.checkpointName !== f.ident) {
      return `${f.file} holds only the changes since checkpoint ${f.ident}: an offline backup of Python's virtnbdbackup, which writes them under the name of the inc that made ${f.ident}, replaced that inc, so the set lacks disk ${f.disk}'s changes up to ${f.ident} and no point from there on restores`;
    }
  }
  return undefined;
}

/**
 * The names in the state dir that make up the current chain: never the lock, this run's log or older archives, nor
 * what a file system keeps at a mount's root or an NFS client leaves (lost+found, dot names such as .nfs*,
 * .snapshot), which are not the set's and may not move.
 */
async function chainFiles(ctx: RunContext): Promise<string[]> {
  if (ctx.toZip) {
    const names = [checkpointListName(ctx.options.domain)];
    const own = path.join(CHECKPOINT_DIR, ctx.options.domain);
    if (await exists(path.join(ctx.stateDir, own))) names.push(own);
    return names;
  }
  const names = await fs.readdir(ctx.stateDir);
  return names.filter((n) => n !== OUTPUT_LOCK_NAME && n !== ctx.logName && !isArchivedChain(n) && n !== 'lost+found' && !n.startsWith('.'));
}

/**
 * The set's chain cannot give a correct incremental (`problem`): moves it into chain.<secs>/ (still a complete,
 * restorable set) and plans a full backup that starts a new chain in the set. Refused where a full backup is
 * impossible (shut-off domain) or not wanted (-p, -s).
 */
export async function fallBackToFull(ctx: RunContext, prefix: string, problem: string): Promise<RunPlan> {
  const { options, log } = ctx;
  if (options.printOnly || options.startOnly) throw new UserError(`${problem}; the next backup will be a full one`);
  if (ctx.power.offline) {
    throw new UserError(`${problem}: an incremental backup would be wrong, and a shut-off domain cannot start a new chain; run again ${ctx.power.runningAdvice} (it then makes a full backup)`);
  }
  const archive = await archiveChain(ctx.stateDir, await chainFiles(ctx), new Date());
  const moved = ctx.toZip
    ? `the previous chain's state was moved to ${archive}; its zips still restore, unzipped into a directory of their own (not with this run's zip, which holds a new full)`
    : `the set's previous chain was moved to ${archive} and restores from there`;
  log.warn(`${problem}: an incremental backup would be wrong, so this run makes a full backup instead; ${moved}`);
  if (options.raw) joinRawDisks(ctx);
  return { ...planFor('full', [], prefix), archivedChain: archive };
}

/**
 * -r: the raw disks an inc or diff left out join the full it became (as copies), as in `-l full -r`; else the new
 * chain's set would hold none of them (found by a black-box round).
 */
function joinRawDisks(ctx: RunContext): void {
  const { include, exclude } = ctx.options;
  const full = selectDisks(ctx.info.disks, { include, exclude, raw: true, offline: ctx.power.offline }).disks;
  const joining = full.filter((d) => d.format === 'raw' && !ctx.disks.includes(d));
  if (joining.length === 0) return;
  ctx.disks = full.filter((d) => ctx.disks.includes(d) || joining.includes(d));
  for (const d of joining) ctx.log.info(`disk ${d.target} (raw format, -r) is saved in this full backup as a copy, as a full with -r saves raw disks`);
}
