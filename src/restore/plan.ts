// Plans a restore before anything is written: which disks, from which data files (chain, --until, --sequence),
// into which images of which format and layout, and whether the output is a directory of new images or one
// existing raw file or block device.
//   scan set (refuse .partial, non-sets) -> streams vs raw images -> chains -> select (--sequence | -d, --until)
//   -> the point (--until, else the set's latest) has every file its checkpoints say was saved, none of another chain
//   -> per disk: restore point, vmconfig, raw-format check (-r), image name, qcow.json layout -> output checks
// Guarantees: every refusal (bad set, broken chain, bad sequence, unknown checkpoint, images already there,
// unusable target) happens here, so a refused restore touches nothing.
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import {
  DamagedCheckpointList, MixedChain, checkLinks, refuseOlderChains, dataFileName, isArchivedChain, isStreamFile, listSet, recordedChecksum, noDataFilesIn, ofDisk, parseDataFileName, partialsOf, qcowInfoName, readChains, readCheckpointList, savedCheckpoint, savedConfigNames, lostDiffs, sideFilesAre, vmConfigName,
  type ChainLink, type DataFile, type SetListing, type StrandedSideFiles,
} from '../set/backupSet.js';
import { parseDomainXml, type DomainDisk, type DomainInfo } from '../libvirt/domainXml.js';
import { StreamReader } from '../stream/reader.js';
import { QCOW2_MAGIC, dataFileOptions, heldForWriting, qcow2CreateOptions, qcow2DataFile, rawSize, type ImageFormat } from './qemu.js';
import { UserError, oneLine } from '../util/errors.js';
import { silentLogger, type Logger } from '../util/log.js';
import { LOCAL_HOST, type DomainHost } from '../libvirt/domainHost.js';
import { runningWriter } from '../backup/lock.js';

export interface PlanOptions {
  input: string;
  /** A directory for new images, or an existing raw file or block device to restore one disk onto. */
  output: string;
  /** Stop after the link whose checkpoint has this name. */
  until?: string;
  /** Explicit data files of one disk, in chain order (--sequence). */
  sequence?: string[];
  /** Restore only this disk (target dev). */
  disk?: string;
  /** Restore raw-format disks (as raw images); without it they are left out. */
  raw?: boolean;
  /** Preallocate new images instead of keeping them thin. */
  preallocate?: boolean;
  /** Write new qcow2 images with compressed clusters. */
  compress?: boolean;
  /** The host the output is on: this one (default), or a remote libvirt URI's (then `output` is a directory there). */
  host?: DomainHost;
  log?: Logger;
}

/** Where a disk's data comes from: a stream chain, or one raw image copied as it is. */
export type DiskSource =
  | { kind: 'stream'; chain: ChainLink[] }
  | { kind: 'image'; file: string; path: string };

export interface DiskPlan {
  disk: string;
  source: DiskSource;
  /** Ident of the restore point (checkpoint, 'copy' or diff seconds): names its vmconfig and qcow.json. */
  ident: string;
  virtualSize: number;
  format: ImageFormat;
  /** `qemu-img create -o` options of a new image. */
  createOptions: string[];
  /** The restored image: a new file in the output directory, or the existing target. */
  image: string;
  /** The image is the existing target (not known to read as zero), not a new file. */
  existing: boolean;
  /** The existing target is a block device. */
  block: boolean;
  /** External data file created with a new qcow2 image (qcow.json `data-file`), in the output directory. */
  dataFile?: string;
  /** Bytes of payload to write, for progress. */
  dataSize: number;
}

export interface RestorePlan {
  input: string;
  /** The output directory (for an existing target: none). */
  outputDir?: string;
  disks: DiskPlan[];
  /** The saved domain XML of the restore point, when the set has one. */
  vmconfig?: string;
  /** Ident of the restore point of the vmconfig. */
  ident?: string;
}

export const identOf = (link: ChainLink): string => (link.level === 'full' ? link.meta.checkpointName : link.level === 'copy' ? 'copy' : link.ident);

/** A file system's longest name, in bytes (NAME_MAX). */
const NAME_MAX = 255;

/**
 * The name an image is written under until it is whole: `<image><suffix>`, or where that name would be longer than
 * a file system takes (an image named near 255 bytes), the image's name cut short with a hash of all of it.
 */
export function partialName(image: string, suffix = '.partial'): string {
  const base = path.basename(image);
  if (Buffer.byteLength(base + suffix) <= NAME_MAX) return `${image}${suffix}`;
  const hash = crypto.createHash('sha256').update(base).digest('hex').slice(0, 8);
  let cut = Buffer.from(base).subarray(0, NAME_MAX - Buffer.byteLength(`.${hash}${suffix}`)).toString('utf8');
  // A letter cut in half decodes as U+FFFD, which has more bytes than the half had: drop it.
  cut = cut.replace(/\uFFFD$/, '');
  return path.join(path.dirname(image), `${cut}.${hash}${suffix}`);
}

/** Refuses, naming the first, if any of `files` exists on `host`: a restore never overwrites. */
export async function refuseExisting(files: readonly string[], host: DomainHost = LOCAL_HOST): Promise<void> {
  for (const file of files) {
    if (await host.exists(file)) {
      throw new UserError(`${file}${host.remote ? ` on ${host.label}` : ''} already exists; restore into another directory or move it away (nothing is overwritten)`);
    }
  }
}

interface ScannedSet {
  /** The set's checkpoints in order: those its list names, then those only its files name (a list left behind). */
  checkpoints: string[];
  /** Those its list (`<domain>.cpt`) names. */
  listed: string[];
  chains: Map<string, ChainLink[]>;
  images: Map<string, DataFile>;
  /** The checkpoints some data file of the set (of any disk, also with -d) belongs to. */
  filed: Set<string>;
  /** The set's saved domain XMLs (vmconfig): listed when first asked for, each read once for the point and the plan. */
  configs: () => Promise<SavedConfigs>;
  bitmapsAt: BitmapsAt;
  /** Diffs (of the disk asked for) whose side files are there without them, newer than the files that are (lostDiffs). */
  lostDiffs: StrandedSideFiles[];
}

/** A set by its directory, or by the listing of it that the caller made already (then it is not listed again). */
export type SetOrListing = string | SetListing;

/**
 * Lists the set (the files of `disk`, where one is asked for), refuses leftovers and non-sets, and reads the
 * chains; raw images stand alone.
 */
async function scanSet(set: SetOrListing, log: Logger, disk?: string, chosenPoint = false): Promise<ScannedSet> {
  const all = typeof set === 'string' ? await listSet(set) : set;
  const input = all.dir;
  const listing = { ...all, dataFiles: all.dataFiles.filter(ofDisk(disk)), partials: partialsOf(all, disk) };
  // A backup writing now, into any disk, may yet set this disk's finished file aside: wait for it.
  const writer = all.partials.length > 0 ? await runningWriter(input) : undefined;
  if (writer !== undefined) {
    // Moving the file away, as said for a dead run's, would break a backup that is writing it.
    throw new UserError(`a backup${writer ? ` (pid ${writer})` : ''} is writing into ${input} right now (${path.join(input, all.partials[0] as string)}); restore once it has ended`);
  }
  if (listing.partials.length > 0) {
    // An inc's or diff's leftover is no part of a point chosen with --until or -s (a point that needs its file finds
    // it missing from the chain): a set on read-only storage, whose leftover cannot be moved, still restores.
    const level = (partial: string): string | undefined => parseDataFileName(partial.slice(0, -'.partial'.length).replace(/\.(chksum|blake3\.json|sha256\.json)$/, ''))?.level;
    const base = listing.partials.find((p) => !['inc', 'diff'].includes(level(p) ?? ''));
    if (base !== undefined || !chosenPoint) {
      const what = base !== undefined ? 'move the .partial file out of the set' : 'restore an earlier checkpoint with --until';
      throw new UserError(`${path.join(input, base ?? (listing.partials[0] as string))} is left from a failed backup run; the set is incomplete at that point: ${what}`);
    }
    log.warn(`${listing.partials.join(', ')} in ${input} ${listing.partials.length > 1 ? 'are' : 'is'} left from a failed backup run: not read`);
  }
  if (all.dataFiles.length === 0) throw await noDataFilesIn(input);
  if (listing.dataFiles.length === 0) throw new UserError(`no backup of disk ${disk} in ${input}`);
  const cpt = listing.checkpointLists[0];
  // The list only orders the incrementals, which their names (.N) order too: a damaged one need not stop a restore.
  const checkpoints = cpt ? await readCheckpointList(path.join(input, cpt)).catch((err: unknown) => {
    if (!(err instanceof DamagedCheckpointList)) throw err;
    log.warn(`${err.file} is damaged (no JSON array of checkpoint names): the chain is ordered by the data files' names`);
    return [];
  }) : [];
  const streams: DataFile[] = [];
  const images = new Map<string, DataFile>();
  for (const f of listing.dataFiles) {
    // Only a base can be a raw image (-t raw, or a raw disk saved by Python); anything else is a stream.
    const base = f.level === 'full' || f.level === 'copy';
    if (base && !(await isStreamFile(path.join(input, f.file)))) images.set(f.disk, f);
    else streams.push(f);
  }
  const chains = await readChains({ ...listing, dataFiles: streams }, checkpoints);
  if (cpt) for (const chain of chains.values()) checkListedOrder(chain, checkpoints, path.join(input, cpt));
  // The checkpoints of the set's full and inc files, by their metadata (Python names an offline inc after its
  // parent): those of the disks not asked for (-d) are read too, since any disk's file makes a checkpoint a point.
  const filed = new Set<string>();
  for (const chain of chains.values()) for (const link of chain) if (link.level !== 'diff') filed.add(link.meta.checkpointName);
  for (const f of all.dataFiles) {
    if (disk === undefined || f.disk === disk || f.level === 'diff' || f.level === 'copy') continue;
    const meta = await StreamReader.metadata(path.join(input, f.file)).catch(() => undefined);
    if (meta) filed.add(meta.checkpointName);
  }
  // A list left behind names fewer checkpoints than the files do (zips unzipped with -n keep the first zip's): the
  // files' own follow it, by their numbers, so that a point of theirs is a point of the set.
  const number = (name: string): number => Number(/\.(\d+)$/.exec(name)?.[1] ?? Number.NaN);
  const unlisted = [...filed].filter((name) => name !== '' && !checkpoints.includes(name)).sort((a, b) => number(a) - number(b) || a.localeCompare(b));
  const ordered = checkpoints.length > 0 ? [...checkpoints, ...unlisted] : checkpoints;
  let read: Promise<SavedConfigs> | undefined;
  const configs = (): Promise<SavedConfigs> => (read ??= SavedConfigs.read(input));
  return { checkpoints: ordered, listed: checkpoints, chains, images, filed, configs, bitmapsAt: setsOwnBitmaps(input, chains, configs), lostDiffs: lostDiffs(all, disk, chains) };
}

/**
 * Refuses a checkpoint list whose order disagrees with the chain its data files' metadata make (each names the
 * checkpoint it is based on): its incs were ordered by the list, so the chain check would call a file missing that
 * is there. Only a checkpoint that no file before names, and a later one does, tells of the order; the chain's own
 * order, by the metadata, is said when it covers the list, for the user to write into it.
 */
function checkListedOrder(chain: ChainLink[], listed: string[], cptFile: string): void {
  const makers = chain.filter((l) => l.level !== 'diff');
  for (const [i, link] of makers.entries()) {
    const parent = link.meta.parentCheckpoint;
    if (i === 0 || (makers[i - 1] as ChainLink).meta.checkpointName === parent) continue;
    if (makers.slice(0, i).some((l) => l.meta.checkpointName === parent)) continue;
    const maker = makers.slice(i + 1).find((l) => l.meta.checkpointName === parent);
    if (!maker) continue;
    // The order of the chain by its links alone: from the base, each time the file based on the one before.
    const order = [(makers[0] as ChainLink).meta.checkpointName];
    for (;;) {
      const next = makers.find((l) => l.meta.parentCheckpoint === order.at(-1));
      if (!next || order.includes(next.meta.checkpointName)) break;
      order.push(next.meta.checkpointName);
    }
    const covers = order.length === makers.length && listed.every((name) => order.includes(name));
    const fix = covers ? `write the chain's order into it, oldest first: ${JSON.stringify(order)}` : 'write its checkpoints into it in the chain\'s order, each after the one its files are based on';
    throw new UserError(`${cptFile} lists the checkpoints in another order than the data files' chain (each file's metadata names the checkpoint it is based on): ${link.file} is based on ${parent}, which ${maker.file} makes, but the list has ${parent} after ${link.meta.checkpointName}; the list is damaged: put it back from a copy, or ${fix}`);
  }
}

/**
 * BitmapsAt from the set's saved checkpoint definitions, those alone that are this set's: of the domain its saved
 * XMLs (vmconfig) describe, by UUID, and not older than its chains' first checkpoint where the streams tell when
 * that was (checkpointIdentity). Python's zip mode keeps every domain's definitions in one directory and zips it
 * whole, so an unzipped set may hold another domain's under a name of its own chain; a directory used before may
 * hold an earlier chain's.
 */
function setsOwnBitmaps(input: string, chains: Map<string, ChainLink[]>, configs: () => Promise<SavedConfigs>): BitmapsAt {
  let uuids: Promise<Set<string>> | undefined;
  const starts = [...chains.values()].map((chain) => Number(/^(\d+) /.exec((chain[0] as ChainLink).meta.checkpointIdentity ?? '')?.[1])).filter((t) => t > 0);
  const chainStart = starts.length > 0 ? Math.min(...starts) : undefined;
  const saved = new Map<string, Promise<string[] | undefined>>();
  const read = async (name: string): Promise<string[] | undefined> => {
    const definition = await savedCheckpoint(input, name);
    if (!definition?.domainUuid || !(await (uuids ??= configs().then((c) => c.uuids()))).has(definition.domainUuid)) return undefined;
    if (chainStart !== undefined && (definition.creationTime ?? 0) < chainStart) return undefined;
    return definition.bitmapDisks;
  };
  return (name) => {
    if (!saved.has(name)) saved.set(name, read(name));
    return saved.get(name) as Promise<string[] | undefined>;
  };
}

/** --until names a checkpoint the chain does not have. */
export class UnknownCheckpoint extends UserError {}

/** Cuts a checked chain after the checkpoint `until` (diffs carry no checkpoint of their own). */
function cutAt(chain: ChainLink[], until: string, disk: string, input: string): ChainLink[] {
  const end = chain.findIndex((l) => l.meta.checkpointName === until && l.level !== 'diff');
  if (end < 0) {
    const known = chain.filter((l) => l.level !== 'diff').map((l) => l.meta.checkpointName).join(', ');
    throw new UnknownCheckpoint(`checkpoint ${until} is not in the chain of disk ${disk} in ${input} (it has: ${known}); pick one of those with --until`);
  }
  return chain.slice(0, end + 1);
}

/**
 * `err` (a checkpoint the set's chain lacks) naming the earlier chains of the set that list `until`: a backup that
 * had to start a new chain moved the old one into chain.<secs>/, which restores from there, under the same names.
 */
async function withArchivedChains(err: UnknownCheckpoint, input: string, until: string): Promise<UnknownCheckpoint> {
  const holding: string[] = [];
  for (const name of (await fs.readdir(input).catch(() => [] as string[])).filter(isArchivedChain).sort().reverse()) {
    const dir = path.join(input, name);
    const lists = (await fs.readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith('.cpt'));
    for (const list of lists) {
      if ((await readCheckpointList(path.join(dir, list)).catch(() => [] as string[])).includes(until)) {
        holding.push(dir);
        break;
      }
    }
  }
  if (holding.length === 0) return err;
  const which = holding.length === 1 ? `${holding[0]}, an earlier chain of the set,` : `the set's earlier chains ${holding.join(', ')} (newest first)`;
  return new UnknownCheckpoint(`${err.message.replace(/; pick one of those with --until$/, '')}: ${which} moved aside when a backup had to start a new chain, ${holding.length === 1 ? 'holds' : 'hold'} a checkpoint ${until}; restore it with -i ${holding[0]} --until ${until}, or pick one of the set's own with --until`);
}

/**
 * The chain a --sequence names: files of one disk, starting at its base, in chain order, with no incremental
 * left out between two of them (diffs may be skipped: each holds all changes since its checkpoint).
 */
export function chainFromSequence(sequence: string[], chains: ReadonlyMap<string, ChainLink[]>, input: string): ChainLink[] {
  const names = sequence.map((f) => path.basename(f));
  const disks = new Set(names.map((n) => {
    const parsed = parseDataFileName(n);
    if (!parsed) throw new UserError(`${n} in --sequence is not a data file name (<disk>.<level>[.<ident>].data)`);
    return parsed.disk;
  }));
  if (disks.size !== 1) throw new UserError(`--sequence mixes the disks ${[...disks].join(' and ')}: give the files of one disk per restore`);
  const disk = [...disks][0] as string;
  const chain = chains.get(disk) ?? [];
  const positions = names.map((n) => {
    const at = chain.findIndex((l) => l.file === n);
    if (at < 0) throw new UserError(`${n} in --sequence is not in the set ${input}; list the set with -o dump`);
    return at;
  });
  const order = chain.map((l) => l.file).join(',');
  if (positions[0] !== 0) throw new UserError(`--sequence must start with the base of disk ${disk} (${chain[0]?.file}), not ${names[0]}; the chain is ${order}`);
  checkLinks(chain.slice(0, Math.max(...positions) + 1));
  const misplaced = positions.findIndex((at, i) => i > 0 && at <= (positions[i - 1] as number));
  if (misplaced > 0) throw new UserError(`--sequence is out of chain order: ${names[misplaced]} comes before ${names[misplaced - 1]}; the chain is ${order}`);
  for (let i = 1; i < positions.length; i++) {
    const [from, to] = [positions[i - 1] as number, positions[i] as number];
    const missing = chain.slice(from + 1, to).filter((l) => l.level === 'inc').map((l) => l.file);
    if (missing.length > 0) throw new UserError(`--sequence has a gap before ${names[i]}: it needs ${missing.join(', ')} first; the chain is ${order}`);
  }
  return positions.map((at) => chain[at] as ChainLink);
}

/** The set's chains, checked, selected by disk and cut at `until`: what a restore of every disk would apply. */
export async function loadChains(input: string, until: string | undefined, onlyDisk: string | undefined, log: Logger = silentLogger): Promise<Map<string, ChainLink[]>> {
  const { chains: selected } = await checkedChains(input, until, onlyDisk, log);
  if (selected.size === 0) throw new UserError(`no backup of disk ${onlyDisk} in ${input}`);
  return selected;
}

/**
 * As loadChains, but a set of raw images (-t raw) alone has no chains, which is no error here; with the raw images
 * (of `onlyDisk`), which stand apart from the chains.
 */
export async function checkedChains(set: SetOrListing, until: string | undefined, onlyDisk: string | undefined, log: Logger = silentLogger): Promise<{ chains: Map<string, ChainLink[]>; images: DataFile[]; lostDiffs: StrandedSideFiles[] }> {
  const scanned = await scanSet(set, log, onlyDisk);
  const input = typeof set === 'string' ? set : set.dir;
  return { chains: await selectChains(scanned, { input, until, disk: onlyDisk }, log), images: [...scanned.images.values()], lostDiffs: scanned.lostDiffs };
}

/**
 * Why a disk has no state at checkpoint `until` (by the set's checkpoint order), if it has none: its chain starts
 * after it (the disk was added later), ends before it (removed, or left out of the backups since), or skips it
 * (left out of that backup, then resumed).
 */
function absentAt(chain: ChainLink[], until: string, checkpoints: string[]): string | undefined {
  const point = checkpoints.indexOf(until);
  const base = chain[0] as ChainLink;
  const last = chain.filter((l) => l.level !== 'diff').at(-1) as ChainLink;
  const [first, end] = [checkpoints.indexOf(base.meta.checkpointName), checkpoints.indexOf(last.meta.checkpointName)];
  if (point < 0 || first < 0 || end < 0) return undefined;
  if (first > point) return `its backups start at checkpoint ${base.meta.checkpointName} (${base.file}), after ${until}: it was added to the domain later`;
  if (end < point) return `its backups end at checkpoint ${last.meta.checkpointName} (${last.file}), before ${until}: it was removed from the domain or left out of the backups since`;
  if (!chain.some((l) => l.level !== 'diff' && l.meta.checkpointName === until)) {
    return `the backup at checkpoint ${until} did not save it (left out with -x, or not attached to the domain then); restore it alone with -d ${base.disk} and --until one of its own points`;
  }
  return undefined;
}

/** The disks the set's saved definition of a checkpoint gives a bitmap; undefined where it has none that reads. */
export type BitmapsAt = (checkpoint: string) => Promise<readonly string[] | undefined>;

/** A disk's data files the set lacks up to a restore point, and the newest file it holds there. */
export interface LostFiles {
  disk: string;
  /** Missing files, oldest first. */
  files: string[];
  /** Index into the set's checkpoints of the first missing file's checkpoint. */
  first: number;
  newest: ChainLink;
}

/**
 * The files `chain` lacks up to the restore point `point` (an index into the set's `checkpoints`): one per
 * checkpoint after the newest the chain holds there whose saved definition gives the disk a bitmap, since the
 * backup at such a checkpoint saved the disk. Undefined when none is missing, or nothing tells: a copy, a chain
 * starting after the point (the disk was added later), a checkpoint the list does not name, no saved definitions.
 */
export async function lostFiles(chain: ChainLink[], point: number, checkpoints: readonly string[], bitmapsAt: BitmapsAt): Promise<LostFiles | undefined> {
  const base = chain[0] as ChainLink;
  const { newest, held } = newestAt(chain, point, checkpoints) ?? {};
  if (!newest || held === undefined) return undefined;
  const files: string[] = [];
  let first = -1;
  for (let at = held + 1; at <= point; at++) {
    const name = checkpoints[at] as string;
    if (!(await bitmapsAt(name))?.includes(base.disk)) continue;
    files.push(dataFileName(base.disk, 'inc', name));
    if (first < 0) first = at;
  }
  return files.length > 0 ? { disk: base.disk, files, first, newest } : undefined;
}

/**
 * The newest file of `chain` at the restore point `point` (an index into the set's `checkpoints`) and its
 * checkpoint's index; undefined for a copy, a chain that starts after the point, or one naming a checkpoint the list
 * does not.
 */
function newestAt(chain: ChainLink[], point: number, checkpoints: readonly string[]): { newest: ChainLink; held: number } | undefined {
  if ((chain[0] as ChainLink).level === 'copy' || point < 0) return undefined;
  let newest: ChainLink | undefined;
  let held = -1;
  for (const link of chain) {
    if (link.level === 'diff') continue;
    const at = checkpoints.indexOf(link.meta.checkpointName);
    if (at < 0) return undefined;
    if (at <= point && at > held) [newest, held] = [link, at];
  }
  return newest ? { newest, held } : undefined;
}

/**
 * A disk whose newest file is older than the set's latest point, where no saved checkpoint definition after that
 * file tells whether the backups since left the disk out (-x, detached) or its files were lost: restored at its
 * newest file, said once as a warning.
 */
async function warnIfShortUnproven(chain: ChainLink[], point: number, checkpoints: readonly string[], bitmapsAt: BitmapsAt, at: string, log: Logger): Promise<void> {
  const { newest, held } = newestAt(chain, point, checkpoints) ?? {};
  if (!newest || held === undefined || held >= point) return;
  const unknown: string[] = [];
  for (let i = held + 1; i <= point; i++) if ((await bitmapsAt(checkpoints[i] as string)) === undefined) unknown.push(checkpoints[i] as string);
  if (unknown.length === 0) return;
  log.warn(`disk ${newest.disk}'s newest file is ${newest.file} (checkpoint ${newest.meta.checkpointName}), before ${at}, and a restore of that point brings the disk back from there: no saved definition of ${unknown.join(', ')} (checkpoints/<name>.xml, of this domain and chain) tells whether those backups left it out or its files were lost`);
}

/**
 * The set's latest point (an index into `checkpoints`): its last checkpoint some data file belongs to. One listed
 * after it has no file of any disk: a run that listed it and died before it wrote (Python's tool lists first),
 * which the next inc continues past, or files all removed; restored from the point before, with a warning.
 */
function latestPoint(checkpoints: string[], filed: ReadonlySet<string>, input: string, log: Logger): number {
  let point = checkpoints.length - 1;
  while (point > 0 && !filed.has(checkpoints[point] as string)) point--;
  const unfiled = checkpoints.slice(point + 1);
  if (unfiled.length > 0) {
    const [named, them] = unfiled.length > 1 ? [`checkpoints ${unfiled.join(', ')}`, 'them'] : [`checkpoint ${unfiled[0]}`, 'it'];
    log.warn(`${input} lists ${named} but holds no data file of ${them} (a backup that did not finish, or its files were removed): its latest point is the one before, ${checkpoints[point]}`);
  }
  return point;
}

/**
 * Refuses a file of `chain` up to `point` (an index into the set's checkpoints) at a checkpoint whose own saved
 * definition gave its disk no bitmap: that backup did not save the disk, so the file is another chain's with the
 * same names (a disk the old chain had, its files unzipped beside a new chain's that leaves it out).
 */
async function refuseUnsaved(chain: ChainLink[], point: number, checkpoints: readonly string[], bitmapsAt: BitmapsAt, input: string): Promise<void> {
  for (const link of chain) {
    if (link.level !== 'full' && link.level !== 'inc') continue;
    const at = checkpoints.indexOf(link.meta.checkpointName);
    if (at < 0 || at > point) continue;
    const saved = await bitmapsAt(link.meta.checkpointName);
    if (saved === undefined || saved.includes(link.disk)) continue;
    throw new MixedChain(`broken chain: the backup at checkpoint ${link.meta.checkpointName} did not save disk ${link.disk} (checkpoints/${link.meta.checkpointName}.xml), yet ${input} holds ${link.file}: it comes from another chain with the same names; move the disk's files out of the set, or restore the other disks one by one with -d`);
  }
}

/**
 * Refuses a restore point (`until`, else the set's latest) whose files do not make one point in time: files of
 * another chain with the same names (refuseOlderChains, refuseUnsaved), or a disk restored that lacks files its
 * checkpoints say were saved: its chain would still link up, and the disk would come back from an earlier point
 * than the others, silently. One line names the files and an earlier point to restore instead.
 */
async function refuseLostFiles(scanned: ScannedSet, options: { input: string; until?: string; disk?: string }, log: Logger): Promise<void> {
  const { chains, checkpoints, images, bitmapsAt } = scanned;
  if (checkpoints.length === 0) return;
  const point = options.until === undefined ? latestPoint(checkpoints, scanned.filed, options.input, log) : checkpoints.indexOf(options.until);
  if (point < 0) return;
  const name = checkpoints[point] as string;
  // Another chain's files first: the latest point reads them all, and they would make other disks look short.
  if (options.until === undefined) for (const [disk, chain] of chains) if (options.disk === undefined || disk === options.disk) refuseOlderChains(chain, scanned.listed);
  const lost: LostFiles[] = [];
  const short: ChainLink[][] = [];
  const savedThere = await bitmapsAt(name);
  for (const [disk, chain] of chains) {
    if (options.disk !== undefined && disk !== options.disk) continue;
    await refuseUnsaved(chain, point, checkpoints, bitmapsAt, options.input);
    // --until a point whose checkpoint did not save the disk (detached, -x) leaves it out: nothing of it is read.
    if (options.until !== undefined && savedThere !== undefined && !savedThere.includes(disk)) continue;
    const missing = await lostFiles(chain, point, checkpoints, bitmapsAt);
    if (missing) lost.push(missing);
    else short.push(chain);
  }
  const at = options.until === undefined ? `the set's latest point (${name})` : name;
  if (lost.length === 0) {
    // A disk the point's checkpoint saved, of which the set holds no file at all (-d asks for one it has).
    const gone = options.disk === undefined ? (savedThere ?? []).filter((d) => !chains.has(d) && !images.has(d)) : [];
    if (gone.length === 0) {
      // --until leaves such a disk out (absentAt); the latest point restores it at its newest file.
      if (options.until === undefined) for (const chain of short) await warnIfShortUnproven(chain, point, checkpoints, bitmapsAt, at, log);
      return;
    }
    throw new UserError(`${options.input} holds no data file of disk ${gone.join(', ')}, which checkpoint ${name} backed up: a restore at ${at} would leave it out; put its files back, or restore the other disks one by one with -d`);
  }
  lost.sort((a, b) => a.first - b.first);
  const [worst, ...others] = lost as [LostFiles, ...LostFiles[]];
  const also = others.length > 0 ? ` (and ${others.flatMap((l) => l.files).join(', ')})` : '';
  const { newest } = worst;
  // One disk (-d): a point of its own chain; all: the point before the first loss, which every disk holds or leaves out.
  const earlier = options.disk === undefined ? checkpoints[worst.first - 1] : newest.meta.checkpointName;
  // That point may not have saved the disk (-x), and a restore there leaves it out: say how to get the disk too.
  const alone = earlier === newest.meta.checkpointName ? '' : ` (disk ${worst.disk} alone: -d ${worst.disk} --until ${newest.meta.checkpointName})`;
  throw new UserError(`${options.input} lacks ${worst.files.join(', ')}${also}: checkpoint ${checkpoints[worst.first]} backed up disk ${worst.disk}, so ${worst.disk} cannot be restored at ${at}: its newest file there is ${newest.file} (${newest.meta.checkpointName}); put ${worst.files.length + others.length > 1 ? 'them' : 'it'} back, or restore the earlier point with --until ${earlier}${alone}`);
}

async function selectChains(scanned: ScannedSet, options: { input: string; until?: string; disk?: string }, log: Logger): Promise<Map<string, ChainLink[]>> {
  const { chains, checkpoints } = scanned;
  await refuseLostFiles(scanned, options, log);
  const selected = new Map<string, ChainLink[]>();
  const timeless: string[] = [];
  for (const [disk, chain] of chains) {
    if (options.disk !== undefined && disk !== options.disk) continue;
    // A copy alone (a raw disk saved along a full; earlier builds wrote it as a stream) has no checkpoints of its
    // own: as a raw image, it is restored as it is at any point (it was left out as "removed from the domain").
    const base = chain[0] as ChainLink;
    if (options.until !== undefined && chain.length === 1 && base.level === 'copy') {
      const known = checkpoints.includes(options.until) || [...chains.values()].some((c) => c.some((l) => l.level !== 'diff' && l.meta.checkpointName === options.until));
      if (!known) throw new UnknownCheckpoint(`checkpoint ${options.until} is not in ${options.input} (${checkpoints.length > 0 ? `it has: ${checkpoints.join(', ')}` : 'it holds copies, which have no checkpoints: restore without --until'})`);
      timeless.push(base.file);
      selected.set(disk, chain);
      continue;
    }
    const absent = options.until !== undefined && options.disk === undefined ? absentAt(chain, options.until, checkpoints) : undefined;
    if (absent) {
      log.info(`disk ${disk} is left out of the restore at ${options.until}: ${absent}`);
      continue;
    }
    // Cut first: a file missing after the restore point does not stop a restore of that point.
    let applied = chain;
    try {
      if (options.until !== undefined) applied = cutAt(chain, options.until, disk, options.input);
    } catch (err) {
      throw err instanceof UnknownCheckpoint ? await withArchivedChains(err, options.input, options.until as string) : err;
    }
    checkLinks(applied, undefined, scanned.listed);
    selected.set(disk, applied);
  }
  if (timeless.length > 0) log.warn(`--until does not apply to copies, which have no checkpoints (${timeless.join(', ')}): they are restored as they are`);
  return selected;
}

/**
 * The domain XMLs saved in the set (vmconfig.<ident>.xml), newest first. A disk is described by the XML of its
 * own restore point when there is one, else by the newest that has it (a raw disk copied along a full backup
 * is saved under the full's ident, not under 'copy').
 */
class SavedConfigs {
  /** Each XML read and parsed once; undefined where it does not read. */
  private readonly parsed = new Map<string, Promise<DomainInfo | undefined>>();

  private constructor(private readonly input: string, readonly files: string[]) {}

  static async read(input: string): Promise<SavedConfigs> {
    return new SavedConfigs(input, await savedConfigNames(input));
  }

  private domain(file: string): Promise<DomainInfo | undefined> {
    let domain = this.parsed.get(file);
    if (!domain) {
      domain = fs.readFile(path.join(this.input, file), 'utf8').then(parseDomainXml).catch(() => undefined);
      this.parsed.set(file, domain);
    }
    return domain;
  }

  private async disks(file: string): Promise<DomainDisk[]> {
    return (await this.domain(file))?.disks ?? [];
  }

  /** The UUIDs of the domains the XMLs describe: the set's domain's (more than one where it was defined anew). */
  async uuids(): Promise<Set<string>> {
    const domains = await Promise.all(this.files.map((file) => this.domain(file)));
    return new Set(domains.map((d) => d?.uuid ?? '').filter(Boolean));
  }

  /** The disk as the XML of the first of `idents` that has one describes it, else as the newest XML does. */
  async disk(disk: string, idents: string[]): Promise<DomainDisk | undefined> {
    const own = idents.map(vmConfigName).filter((f) => this.files.includes(f));
    for (const file of [...own, ...this.files]) {
      const found = (await this.disks(file)).find((d) => d.target === disk);
      if (found) return found;
    }
    return undefined;
  }

  has(ident: string): boolean {
    return this.files.includes(vmConfigName(ident));
  }

  /** The XML of the restore point `ident`, else the newest one. */
  pick(ident: string): string | undefined {
    const own = vmConfigName(ident);
    const file = this.files.includes(own) ? own : this.files[0];
    return file && path.join(this.input, file);
  }
}

interface OutputTarget {
  dir?: string;
  /** An existing raw file or block device. */
  file?: string;
  block: boolean;
  /** The existing target's size in bytes. */
  size?: number;
}

/** How many first bytes of an existing target tell what it is. */
const HEAD_LENGTH = 8;
/**
 * Files that are no raw disk, told by their first bytes: a restore onto one would overwrite it, and a backup
 * (a zip of -o -, a data file, an archive) is what a mistyped -o most likely names.
 */
const NOT_RAW: Array<[string, string]> = [
  ['PK\x03\x04', 'a zip archive (a backup made with -o -?)'], ['PK\x05\x06', 'a zip archive'],
  ['meta 000', 'a backup data file'], ['\x04\x22\x4d\x18', 'an lz4 file'], ['\x1f\x8b', 'a gzip file'],
  ['\xfd7zXZ\x00', 'an xz file'], ['\x28\xb5\x2f\xfd', 'a zstd file'], ['BZh', 'a bzip2 file'],
  ['KDMV', 'a VMDK image'], ['vhdxfile', 'a VHDX image'], ['conectix', 'a VHD image'], ['QED\x00', 'a QED image'],
  ['<<< ', 'a VDI image'], ['<?xml', 'an XML file'], ['<domain', 'a libvirt XML definition (a set\'s vmconfig or checkpoint?)'],
];

/** An existing target, once its kind and first bytes are known: a raw file or block device, never an image of another format or an archive. */
function existingTarget(output: string, kind: 'file' | 'block' | 'other', head: Buffer, size: number, where: string): OutputTarget {
  if (kind === 'other') throw new UserError(`-o ${output}${where} is neither a directory, a regular file nor a block device`);
  if (head.subarray(0, 4).equals(QCOW2_MAGIC)) {
    throw new UserError(`-o ${output}${where} is a qcow2 image; restore writes raw data onto existing files: give a raw file, a block device or a directory`);
  }
  const known = NOT_RAW.find(([magic]) => head.subarray(0, magic.length).equals(Buffer.from(magic, 'latin1')));
  if (known) {
    throw new UserError(`-o ${output}${where} is ${known[1]}, not a raw disk: a restore would overwrite it; give a raw file, a block device or a directory`);
  }
  return { file: output, block: kind === 'block', size };
}

/** On another host: a directory there (made if missing), or an existing raw file or block device there. */
async function resolveRemoteOutput(output: string, host: DomainHost): Promise<OutputTarget> {
  if (!path.isAbsolute(output)) throw new UserError(`-o ${output} is on ${host.label}: give it as an absolute path`);
  // One round trip: the kind, the size and the first bytes (hex) of whatever is there.
  const probe = [
    'p=$1',
    'if [ -d "$p" ] || [ ! -e "$p" ]; then echo dir; exit 0; fi',
    'if [ -b "$p" ]; then k=block; s=$(blockdev --getsize64 "$p"); elif [ -f "$p" ]; then k=file; s=$(stat -c %s "$p"); else echo other; exit 0; fi',
    `echo "$k $s $(head -c ${HEAD_LENGTH} "$p" | od -An -tx1 | tr -d ' \\n')"`,
  ].join('\n');
  const [kind = '', size = '0', head = ''] = (await host.run('sh', ['-c', probe, 'sh', output])).stdout.trim().split(' ');
  if (kind === 'dir') return { dir: output, block: false };
  return existingTarget(output, kind === 'block' || kind === 'file' ? kind : 'other', Buffer.from(head, 'hex'), Number(size), ` on ${host.label}`);
}

async function resolveOutput(output: string): Promise<OutputTarget> {
  const stat = await fs.stat(output).catch(() => undefined);
  if (!stat || stat.isDirectory()) return { dir: output, block: false };
  const kind = stat.isBlockDevice() ? 'block' : stat.isFile() ? 'file' : 'other';
  let head = Buffer.alloc(0);
  if (kind !== 'other') {
    const handle = await fs.open(output, 'r');
    const { bytesRead, buffer } = await handle.read(Buffer.alloc(HEAD_LENGTH), 0, HEAD_LENGTH, 0).finally(() => handle.close());
    head = buffer.subarray(0, bytesRead);
  }
  return existingTarget(output, kind, head, kind === 'other' ? 0 : await rawSize(output), '');
}

/** `p` with symbolic links resolved, or as an absolute path where it cannot be (it is not there). */
const realPath = (p: string): Promise<string> => fs.realpath(p).catch(() => path.resolve(p));

/**
 * The --sequence entries as names of files of the set: a bare name is one in -i (as Python reads it); a path must
 * lead into -i, through symbolic links too, since the files applied are always the set's.
 */
export async function sequenceInSet(sequence: string[], input: string): Promise<string[]> {
  const set = await realPath(input);
  const names: string[] = [];
  for (const entry of sequence) {
    // Relative to -i, as Python joins it: `./vda.full.data` is the set's.
    if (entry.includes('/') && (await realPath(path.resolve(input, path.dirname(entry)))) !== set) {
      throw new UserError(`${entry} in --sequence is not in the set ${input}: --sequence names files of the set given with -i (a name alone will do)`);
    }
    names.push(path.basename(entry));
  }
  return names;
}

/**
 * The data files a restore with `--sequence` reads, checked as restore checks them (verify -s, which checks those
 * files alone, as Python's verify does): names of the set's files; a bad sequence throws restore's UserError.
 */
export async function sequenceFiles(set: SetListing, sequence: string[], disk: string | undefined, log: Logger = silentLogger): Promise<string[]> {
  const resolved = { input: set.dir, output: '', disk, sequence: await sequenceInSet(sequence, set.dir) };
  // Only the sequence's disk: a damaged file of another one is no fault of these.
  const { chains, images } = await selectSources(await scanSet(set, log, parseDataFileName(resolved.sequence[0] ?? '')?.disk), resolved, log);
  return [...[...chains.values()].flat(), ...images.values()].map((d) => d.file);
}

/** What gets applied per disk: the --sequence, or the chains selected by -d and cut at --until, and raw images. */
async function selectSources(scanned: ScannedSet, options: PlanOptions, log: Logger): Promise<ScannedSet> {
  const { input } = options;
  if (options.sequence && options.until) throw new UserError('--sequence and --until both choose the files to apply: give one of them');
  const named = options.sequence?.length === 1 ? path.basename(options.sequence[0] as string) : undefined;
  const image = [...scanned.images.values()].find((f) => f.file === named);
  if (image) return { ...scanned, chains: new Map(), images: new Map([[image.disk, image]]) };
  if (options.sequence) {
    const chain = chainFromSequence(options.sequence, scanned.chains, input);
    const disk = (chain[0] as ChainLink).disk;
    if (options.disk !== undefined && options.disk !== disk) throw new UserError(`-d ${options.disk} and --sequence of disk ${disk} contradict each other: give one of them`);
    return { ...scanned, chains: new Map([[disk, chain]]), images: new Map() };
  }
  const chains = await selectChains(scanned, { input, until: options.until, disk: options.disk }, log);
  // The latest point would include a lost diff (none after the checkpoint --until names is read).
  if (options.until === undefined) {
    for (const lost of scanned.lostDiffs) {
      const them = lost.sideFiles.length > 1 ? 'them' : 'it';
      log.warn(`${input} lacks ${lost.dataFile}, whose ${sideFilesAre(lost)} there: that diff, the newest backup of its disk, was lost or removed, and the restore ends before it; put it back, or move ${them} out of the set if the diff was removed on purpose`);
    }
  }
  const images = new Map([...scanned.images].filter(([disk]) => options.disk === undefined || disk === options.disk));
  for (const [disk, file] of images) {
    if (chains.has(disk)) throw new UserError(`${input} holds a raw image (${file.file}) and streams of disk ${disk}, which form no chain; restore the image alone with -s ${file.file}`);
  }
  if (options.until !== undefined && images.size > 0) log.warn(`--until does not apply to raw images (${[...images.values()].map((f) => f.file).join(', ')}): they are restored as they are`);
  return { ...scanned, chains, images };
}

export async function planRestore(options: PlanOptions): Promise<RestorePlan> {
  const log = options.log ?? silentLogger;
  const input = path.resolve(options.input);
  const host = options.host ?? LOCAL_HOST;
  const output = host.remote ? await resolveRemoteOutput(options.output, host) : await resolveOutput(path.resolve(options.output));
  if (!host.remote && output.file) {
    // Through symbolic links too, in its folders too (checkpoints/, a chain.* moved aside); and a data file of any set.
    const [dir, set] = [await realPath(path.dirname(output.file)), await realPath(input)];
    const inSet = dir === set || dir.startsWith(`${set}/`);
    if (inSet || parseDataFileName(path.basename(output.file)) !== undefined) {
      throw new UserError(`-o ${output.file} is ${inSet ? `a file of the backup set ${input}` : 'a backup data file'}: a restore would overwrite it; give a raw file, a block device or a directory outside the set`);
    }
  }
  const resolved = { ...options, input, sequence: options.sequence && (await sequenceInSet(options.sequence, input)) };
  // --sequence names its disk itself: a -d that contradicts it is said so in selectSources, not "not in the set".
  const { chains, images, checkpoints, configs: savedConfigs } = await selectSources(await scanSet(input, log, options.sequence ? undefined : options.disk, options.until !== undefined || options.sequence !== undefined), resolved, log);
  const configs = await savedConfigs();
  const disks: DiskPlan[] = [];
  for (const [disk, chain] of chains) disks.push(await planStreamDisk(disk, chain, configs));
  for (const [disk, file] of images) disks.push(await planImageDisk(disk, file, input, checkpoints, configs));
  if (disks.length === 0) throw new UserError(`no backup of disk ${options.disk} in ${input}`);

  const kept = disks.filter((d) => {
    if (d.format !== 'raw' || options.raw) return true;
    log.warn(`disk ${d.disk} is a raw-format disk: left out; restore it with -r/--raw`);
    return false;
  });
  if (kept.length === 0) throw new UserError(`nothing to restore from ${input}: ${disks.map((d) => d.disk).join(', ')} ${disks.length > 1 ? 'are raw-format disks' : 'is a raw-format disk'}; add -r/--raw`);
  kept.sort((a, b) => a.disk.localeCompare(b.disk));
  // Each data file's .chksum is checked as or after the file is written: one that cannot be read must stop the run now.
  for (const d of kept) {
    for (const file of d.source.kind === 'stream' ? d.source.chain.map((l) => l.path) : [d.source.path]) {
      await recordedChecksum(file).catch((err: unknown) => {
        throw new UserError(`${oneLine(err)} in ${input}; restore its .chksum from a copy, or remove it to restore without that check`);
      });
    }
  }

  if (output.file) await placeOnto(kept, output.file, output.block, output.size ?? 0, resolved);
  else await placeInDirectory(kept, output.dir as string, resolved);
  const point = pickRestorePoint(kept, configs);
  return { input, outputDir: output.dir, disks: kept, vmconfig: configs.pick(point), ident: point };
}

/** The latest restore point among the disks that has a saved XML (it describes the machine then). */
function pickRestorePoint(disks: DiskPlan[], configs: SavedConfigs): string {
  const byDate = disks.map((d) => ({ ident: d.ident, date: d.source.kind === 'stream' ? d.source.chain.at(-1)?.meta.date ?? '' : '' }))
    .sort((a, b) => b.date.localeCompare(a.date));
  return (byDate.find((p) => configs.has(p.ident)) ?? byDate[0])?.ident ?? 'copy';
}

async function planStreamDisk(disk: string, chain: ChainLink[], configs: SavedConfigs): Promise<DiskPlan> {
  const base = chain[0] as ChainLink;
  const last = chain[chain.length - 1] as ChainLink;
  const ident = identOf(last);
  const saved = await configs.disk(disk, [ident, identOf(base)]);
  const format: ImageFormat = (saved?.format ?? base.meta.diskFormat) === 'raw' ? 'raw' : 'qcow2';
  return {
    disk, source: { kind: 'stream', chain }, ident, virtualSize: last.meta.virtualSize, format, createOptions: [],
    image: imageBaseName(saved, disk, format), existing: false, block: false,
    dataSize: chain.reduce((sum, l) => sum + l.meta.dataSize, 0),
  };
}

async function planImageDisk(disk: string, file: DataFile, input: string, checkpoints: string[], configs: SavedConfigs): Promise<DiskPlan> {
  const ident = file.level === 'copy' ? 'copy' : checkpoints[0] ?? 'virtnbdbackup.0';
  const saved = await configs.disk(disk, [ident]);
  const filePath = path.join(input, file.file);
  const size = (await fs.stat(filePath)).size;
  // A raw image has no header to say its size: a copy cut short (no .chksum in older sets) restored a smaller disk.
  const recorded = await recordedVirtualSize(path.join(input, qcowInfoName(disk, ident)));
  if (recorded !== undefined && recorded !== size) {
    throw new UserError(`${file.file} in ${input} holds ${size} bytes, but disk ${disk} had ${recorded} (${qcowInfoName(disk, ident)}): the raw image is cut short or damaged; copy it again from where it came, or restore the other disks with -d`);
  }
  const format: ImageFormat = (saved?.format ?? 'raw') === 'raw' ? 'raw' : 'qcow2';
  return {
    disk, source: { kind: 'image', file: file.file, path: filePath }, ident, virtualSize: size, format, createOptions: [],
    image: imageBaseName(saved, disk, format), existing: false, block: false, dataSize: size,
  };
}

/** The disk's size as `qemu-img info` recorded it at backup time (qcow.json), if the set holds a readable one. */
async function recordedVirtualSize(qcowJson: string): Promise<number | undefined> {
  const text = await fs.readFile(qcowJson, 'utf8').catch(() => undefined);
  try {
    const size: unknown = text === undefined ? undefined : (JSON.parse(text) as { 'virtual-size'?: unknown })['virtual-size'];
    return Number.isSafeInteger(size) ? (size as number) : undefined;
  } catch {
    return undefined; // a damaged qcow.json is named where its layout is read
  }
}

/**
 * The restored image's name: the source image's, or for a volume disk (type='volume') the volume's. A network
 * disk's image has no file name: the last part of its name there (`vms/web` of rbd gives `web`) or the disk's, with
 * the format.
 */
function imageBaseName(saved: DomainDisk | undefined, disk: string, format: ImageFormat): string {
  if (saved?.network) return `${path.basename(saved.network.name ?? '') || disk}.${format}`;
  const source = saved?.path ?? saved?.volume?.name;
  return source ? path.basename(source) : disk;
}

/** One disk onto an existing raw file or device: no layout, and it must be large enough. */
async function placeOnto(disks: DiskPlan[], target: string, block: boolean, size: number, options: PlanOptions): Promise<void> {
  if (disks.length !== 1) {
    throw new UserError(`-o ${target} is a ${block ? 'block device' : 'file'}: a restore onto it takes one disk, the set has ${disks.map((d) => d.disk).join(', ')}; choose one with -d`);
  }
  if (options.compress || options.preallocate) throw new UserError(`--compress and -A/--preallocate shape new images; -o ${target} exists: leave them out, or restore into a directory`);
  const disk = disks[0] as DiskPlan;
  if (block && size < disk.virtualSize) {
    throw new UserError(`block device ${target} holds ${size} bytes, disk ${disk.disk} needs ${disk.virtualSize}; give a device at least that large`);
  }
  Object.assign(disk, { image: target, format: 'raw', existing: true, block });
  // A file is not cut: what lies past the disk's end stays, and the file reads as a larger disk than the one restored.
  if (!block && size > disk.virtualSize) {
    (options.log ?? silentLogger).warn(`${target} holds ${size} bytes, disk ${disk.disk} ${disk.virtualSize}: its bytes past the disk's end are left as they are, so it reads as a larger disk; truncate -s ${disk.virtualSize} ${target} after the restore if it is to be the disk alone`);
  }
}

/** New images in `dir`: unique names, the source's qcow2 layout, nothing of the same name already there. */
async function placeInDirectory(disks: DiskPlan[], dir: string, options: PlanOptions): Promise<void> {
  if (options.compress && options.preallocate) throw new UserError('--compress and -A/--preallocate contradict each other: give one of them');
  const taken = new Set<string>();
  const outputs: string[] = [];
  const partials: string[] = [];
  for (const disk of disks) {
    let name = disk.image;
    if (taken.has(name)) name = `${disk.disk}.${name}`; // two source images of the same file name
    taken.add(name);
    disk.image = path.join(dir, name);
    const qcowJson = await readQcowInfo(options.input, disk, options.log ?? silentLogger);
    if (disk.format === 'qcow2') {
      const layout = qcow2CreateOptions(qcowJson);
      disk.createOptions = layout.options;
      if (layout.ignored.length > 0) {
        (options.log ?? silentLogger).warn(`the qcow.json of disk ${disk.disk} in ${options.input} holds values qemu-img info does not write (${layout.ignored.join(', ')}): left out, and QEMU's defaults used for them`);
      }
    }
    const dataFile = disk.format === 'qcow2' ? qcow2DataFile(qcowJson) : undefined;
    if (dataFile) {
      if (options.compress) throw new UserError(`--compress cannot be used for disk ${disk.disk}: its image keeps its data in an external data file (${dataFile.file}), which holds no compressed clusters`);
      disk.dataFile = path.join(dir, path.basename(dataFile.file));
      disk.createOptions.push(...dataFileOptions(disk.dataFile, dataFile.raw));
      outputs.push(disk.dataFile);
    }
    if (options.preallocate) disk.createOptions.push(`preallocation=${disk.format === 'qcow2' ? 'metadata' : 'falloc'}`);
    partials.push(partialName(disk.image), partialName(disk.image, '.uncompressed.partial'));
    outputs.push(disk.image);
  }
  outputs.push(...partials);
  const twice = outputs.find((file, i) => outputs.indexOf(file) !== i);
  if (twice) throw new UserError(`two restored files would be named ${twice}; restore the disks one by one with -d`);
  await refuseLeftPartials(partials, dir, options.host);
  await refuseExisting(outputs, options.host);
}

/**
 * Refuses images a restore is still writing (.partial), or left unfinished: a restore killed (kill -9) could not
 * remove them. Either way they are named, with what to do.
 */
async function refuseLeftPartials(partials: readonly string[], dir: string, host: DomainHost = LOCAL_HOST): Promise<void> {
  const there: string[] = [];
  for (const file of partials) if (await host.exists(file)) there.push(file);
  if (there.length === 0) return;
  const on = host.remote ? ` on ${host.label}` : '';
  // A restore that has just made its .partial takes the image's lock a moment later (qemu-img, then qemu-nbd start):
  // looked at again after a second before it is called killed, which says to remove it. Gone by then, it was
  // renamed (the check of existing files says so) or removed.
  let left = there;
  for (const pause of [0, 1000]) {
    if (pause > 0) {
      await new Promise((resolve) => setTimeout(resolve, pause));
      left = (await Promise.all(left.map(async (file) => ((await host.exists(file)) ? [file] : [])))).flat();
    }
    for (const file of left) {
      if (await heldForWriting(file, host)) throw new UserError(`${file}${on} is being written by a restore that runs now; wait for it to end, or restore into another directory`);
    }
  }
  if (left.length === 0) return;
  const [them, are] = left.length > 1 ? ['them', 'are'] : ['it', 'is'];
  throw new UserError(`${left.join(', ')}${on} ${are} left unfinished by a restore into ${dir} that was killed before it could clean up: remove ${them}, then restore again`);
}

async function readQcowInfo(input: string, disk: DiskPlan, log: Logger): Promise<string | undefined> {
  const idents = [disk.ident, ...(disk.source.kind === 'stream' ? [identOf(disk.source.chain[0] as ChainLink)] : [])];
  for (const ident of idents) {
    const file = path.join(input, qcowInfoName(disk.disk, ident));
    const text = await fs.readFile(file, 'utf8').catch(() => undefined);
    if (text === undefined) continue;
    try {
      JSON.parse(text);
      return text;
    } catch (err) {
      log.warn(`${file} is damaged (${oneLine(err)}): disk ${disk.disk}'s image gets qemu-img's default qcow2 layout`);
      return undefined;
    }
  }
  return undefined;
}
