// The files of a backup set (virtnbdbackup-compatible names) and the per-disk chains they form.
// A chain is the base (full or copy) followed by inc and diff files in checkpoint order, read from each stream's
// metadata, never from file times. Guarantees: scanning refuses a set with leftovers of a failed run
// (.partial) or a chain whose files do not link up, naming the file.
import fs from 'node:fs/promises';
import path from 'node:path';
import { StreamReader } from '../stream/reader.js';
import { looksLikeStream, looksLikeStreamEnd, FRAME_HEADER_LENGTH, type StreamMetadata } from '../stream/format.js';
import { PIECE_DIGEST, type DigestAlgorithm, type PieceDigest } from '../stream/writer.js';
import { fillAndCommit, type OutputTarget } from './target.js';
import { DEFAULT_PREFIX, checkpointBitmapDisks, checkpointCreationTime, checkpointDomainUuid, prefixOf, type Level } from '../libvirt/checkpoints.js';
import { UserError, describeFailure, describeReadFailure, errnoOf } from '../util/errors.js';
import { native } from '../native/addon.js';

export function dataFileName(disk: string, level: Level, ident: string): string {
  if (level === 'full' || level === 'copy') return `${disk}.${level}.data`;
  return `${disk}.${level}.${ident}.data`;
}

export const checksumFileName = (dataFile: string): string => `${dataFile}.chksum`;
/** Our side file: a strong hash of every payload piece, so verify can name the extent that rotted. */
export const digestFileName = (dataFile: string, algorithm: DigestAlgorithm = PIECE_DIGEST): string => `${dataFile}.${algorithm}.json`;

/** Pieces per chunk of the digest file: small enough (~28 KB of JSON) that no chunk is a large-object allocation. */
const DIGEST_CHUNK = 256;

/**
 * Writes the digest file of `dataFile` (`{"algorithm": PIECE_DIGEST, "pieces": [...]}`, byte for byte what
 * JSON.stringify gives) through `target`, chunk by chunk.
 */
export async function writeDigestFile(target: OutputTarget, dataFile: string, pieces: Iterable<PieceDigest>): Promise<void> {
  await fillAndCommit(await target.create(digestFileName(dataFile)), async (sink) => {
    await sink.write([Buffer.from(`{"algorithm":${JSON.stringify(PIECE_DIGEST)},"pieces":[`)]);
    let chunk: PieceDigest[] = [];
    let first = true;
    const writeChunk = async (): Promise<void> => {
      const json = JSON.stringify(chunk).slice(1, -1);
      await sink.write([Buffer.from(first ? json : `,${json}`)]);
      first = false;
      chunk = [];
    };
    for (const piece of pieces) {
      chunk.push(piece);
      if (chunk.length === DIGEST_CHUNK) await writeChunk();
    }
    if (chunk.length > 0) await writeChunk();
    await sink.write([Buffer.from(']}')]);
  });
}
/** A side file's text, or undefined when the set has none; one that cannot be read fails naming it. */
export async function readIfThere(file: string): Promise<string | undefined> {
  return fs.readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw new Error(`cannot read ${path.basename(file)}: ${describeReadFailure(err)}`);
  });
}

/** The adler32 recorded in `<dataFile>.chksum`, or undefined when there is none. */
export async function recordedChecksum(dataFile: string): Promise<number | undefined> {
  const file = checksumFileName(dataFile);
  const text = await readIfThere(file);
  if (text === undefined) return undefined;
  if (!/^\s*\d+\s*$/.test(text)) throw new Error(`${path.basename(file)} holds no decimal checksum`);
  return Number(text.trim());
}

/** How much of a file fileChecksum reads at once. */
const CHECKSUM_READ_SIZE = 4 * 1024 * 1024;

/** adler32 of every byte of a file, read in large pieces: what its `.chksum` records (a raw image's holes as zeros). */
export async function fileChecksum(file: string, signal?: AbortSignal): Promise<number> {
  const handle = await fs.open(file, 'r');
  try {
    const buffer = Buffer.allocUnsafe(CHECKSUM_READ_SIZE);
    let sum = 1;
    for (;;) {
      if (signal?.aborted) throw signal.reason ?? new Error('aborted');
      const { bytesRead } = await handle.read(buffer, 0, CHECKSUM_READ_SIZE, null);
      if (bytesRead === 0) return sum;
      sum = native().adler32(buffer.subarray(0, bytesRead), sum);
    }
  } finally {
    await handle.close();
  }
}

/** The one line a checksum mismatch reads as, in verify and restore alike. */
export function checksumMismatch(dataFile: string, actual: number, recorded: number): string {
  return `adler32 of the file is ${actual}, ${path.basename(checksumFileName(dataFile))} says ${recorded}`;
}

/** adler32 (start value 1) of no bytes: the .chksum of an empty file. */
const ADLER32_OF_NOTHING = 1;

/** A raw image holds a whole disk, whose size QEMU keeps to a multiple of this. */
const SECTOR = 512;

/**
 * Whether a data file is a stream, as opposed to a raw image (-t raw), which has no frames: its first bytes are a
 * meta header (a few damaged bytes allowed), or else it ends as a stream does or has no whole disk's size. So a
 * stream with a damaged start is read as a stream and fails naming the damage, never restored as an image of garbage.
 */
export async function isStreamFile(file: string): Promise<boolean> {
  const handle = await fs.open(file, 'r').catch((err: unknown) => {
    throw new UserError(`cannot read ${file}: ${describeReadFailure(err)}`);
  });
  try {
    const { size } = await handle.stat();
    // An empty file is the raw image of a disk of 0 bytes (-r, -t raw) where its .chksum says so (adler32 of nothing
    // is 1); a stream cut to nothing otherwise. It failed as a truncated stream, and the set would not restore.
    if (size === 0) return (await recordedChecksum(file).catch(() => undefined)) !== ADLER32_OF_NOTHING;
    const head = Buffer.alloc(FRAME_HEADER_LENGTH);
    const { bytesRead } = await handle.read(head, 0, FRAME_HEADER_LENGTH, 0);
    if (looksLikeStream(head.subarray(0, bytesRead))) return true;
    if (size % SECTOR !== 0) return true;
    const tail = Buffer.alloc(FRAME_HEADER_LENGTH);
    await handle.read(tail, 0, FRAME_HEADER_LENGTH, size - FRAME_HEADER_LENGTH);
    return looksLikeStreamEnd(tail);
  } finally {
    await handle.close();
  }
}

export const checkpointListName = (domain: string): string => `${domain}.cpt`;
export const vmConfigName = (ident: string): string => `vmconfig.${ident}.xml`;

/** The domain XMLs saved in the set `dir` (vmconfig.<ident>.xml), newest first by modification time. */
export async function savedConfigNames(dir: string): Promise<string[]> {
  const names = (await fs.readdir(dir)).filter((n) => /^vmconfig\..+\.xml$/.test(n));
  const dated = await Promise.all(names.map(async (n) => ({ n, at: (await fs.stat(path.join(dir, n))).mtimeMs })));
  return dated.sort((a, b) => b.at - a.at).map((d) => d.n);
}
/** Present when the domain was set to start with the host at backup `ident`. */
export const autostartName = (ident: string): string => `autostart.${ident}`;
export const qcowInfoName = (disk: string, ident: string): string => `${disk}.${ident}.qcow.json`;
export const CHECKPOINT_DIR = 'checkpoints';

/** What a set's saved definition of a checkpoint (`checkpoints/<name>.xml`) tells of it. */
export interface SavedCheckpoint {
  /** The disks it gives a bitmap: those the backup at that checkpoint saved. */
  bitmapDisks: string[];
  /** libvirt's `<creationTime>`, seconds since the epoch. */
  creationTime?: number;
  /** The UUID of the domain in its copy of the domain definition. */
  domainUuid?: string;
}

/** The set's saved definition of checkpoint `name`; undefined where it has none that reads (-C elsewhere, old sets). */
export async function savedCheckpoint(dir: string, name: string): Promise<SavedCheckpoint | undefined> {
  const xml = await readIfThere(path.join(dir, CHECKPOINT_DIR, `${name}.xml`)).catch(() => undefined);
  if (xml === undefined) return undefined;
  try {
    const created = checkpointCreationTime(xml);
    return { bitmapDisks: checkpointBitmapDisks(xml), creationTime: created === undefined ? undefined : Number(created), domainUuid: checkpointDomainUuid(xml) };
  } catch {
    return undefined;
  }
}

/**
 * A run's log, `backup.<level>.<time>.log`, the level as given (-l auto's is `backup.auto.`, as Python's); the `run`-th
 * of that level in that second (from 2) gets `.<run>` before `.log`.
 */
export function logFileName(level: Level | 'auto', when: Date, run = 1): string {
  const p = (n: number): string => String(n).padStart(2, '0');
  const stamp = `${p(when.getMonth() + 1)}${p(when.getDate())}${when.getFullYear()}${p(when.getHours())}${p(when.getMinutes())}${p(when.getSeconds())}`;
  return `backup.${level}.${stamp}${run > 1 ? `.${run}` : ''}.log`;
}

const DATA_FILE = /^(.+)\.(full|copy|inc|diff)(?:\.(.+))?\.data$/;

export interface DataFile {
  file: string;
  disk: string;
  level: Level;
  /** Checkpoint name (inc) or unix seconds (diff); '' for full/copy. */
  ident: string;
}

export function parseDataFileName(name: string): DataFile | undefined {
  const m = DATA_FILE.exec(name);
  if (!m) return undefined;
  const [, disk, level, ident] = m;
  if ((level === 'full' || level === 'copy') !== (ident === undefined)) return undefined;
  return { file: name, disk: disk as string, level: level as Level, ident: ident ?? '' };
}

/** A data file of `disk` (of any disk without one), by the disk its name gives: a prefix would let -d vd match vd.x. */
export const ofDisk = (disk: string | undefined) => (data: DataFile | undefined): data is DataFile =>
  data !== undefined && (disk === undefined || data.disk === disk);

/** The refusal of a directory that holds no data files (of `disk`, where one was asked for). */
export const noDataFiles = (input: string, disk?: string): UserError =>
  new UserError(`${input} is not a backup set: it holds no *.data files${disk ? ` of disk ${disk}` : ''}`);

/**
 * noDataFiles for a whole set, or where the set's chain was moved aside and no new chain's file is there yet: a
 * backup that fell back to a full is writing the new one (or failed), and a restore or verify that came then was
 * told that the directory is no backup set (found by a black-box round).
 */
export async function noDataFilesIn(input: string, disk?: string): Promise<UserError> {
  const archived = disk === undefined ? await lastArchivedChain(input) : undefined;
  if (!archived) return noDataFiles(input, disk);
  return new UserError(`${input} holds no *.data files: its chain was moved aside into ${archived.path} by a backup that fell back to a full backup, whose new chain starts here (its files appear as that backup writes them); give -i ${archived.path} for the chain moved aside`);
}

export async function readCheckpointList(file: string): Promise<string[]> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new UserError(`cannot read the checkpoint list ${file}: ${describeReadFailure(err)}`);
  }
  try {
    const list: unknown = JSON.parse(text);
    // Checkpoint names, which also name files: nothing that could reach out of the set's directory.
    if (Array.isArray(list) && list.every((x) => typeof x === 'string' && /^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(x))) return list as string[];
  } catch { /* fall through */ }
  throw new DamagedCheckpointList(file);
}

/** A `.cpt` that is no JSON array of names: a backup cannot go on from it; a restore orders by file names instead. */
export class DamagedCheckpointList extends UserError {
  constructor(readonly file: string) {
    super(`${file} is not a checkpoint list (JSON array of names); restore it from a copy or start a new set with a full backup`);
  }
}

export interface SetListing {
  dir: string;
  dataFiles: DataFile[];
  partials: string[];
  /** `<domain>.cpt` files found. */
  checkpointLists: string[];
  /** Data files the set lacks while their side files (`.chksum`, digests) are there. */
  stranded: StrandedSideFiles[];
}

export interface StrandedSideFiles {
  dataFile: string;
  sideFiles: string[];
}

/** A stranded data file's side files in words, with their verb: "x.chksum is", "x.blake3.json and x.chksum are". */
export const sideFilesAre = (stranded: StrandedSideFiles): string => `${stranded.sideFiles.join(' and ')} ${stranded.sideFiles.length > 1 ? 'are' : 'is'}`;

/** The endings of a data file's side files: its checksum, and its digests of either algorithm. */
const SIDE_FILE_SUFFIXES = [checksumFileName(''), digestFileName('', 'blake3'), digestFileName('', 'sha256')];

/**
 * The side files whose data file is not among `names`: a data file lost, or removed without them. The only trace
 * of a lost diff, which makes no checkpoint.
 */
function strandedSideFiles(names: string[]): StrandedSideFiles[] {
  const present = new Set(names);
  const stranded = new Map<string, string[]>();
  for (const name of names) {
    const suffix = SIDE_FILE_SUFFIXES.find((s) => name.endsWith(s));
    const dataFile = suffix === undefined ? undefined : name.slice(0, -suffix.length);
    if (dataFile && !present.has(dataFile) && parseDataFileName(dataFile)) stranded.set(dataFile, [...(stranded.get(dataFile) ?? []), name]);
  }
  return [...stranded].map(([dataFile, sideFiles]) => ({ dataFile, sideFiles }));
}

export async function listSet(dir: string): Promise<SetListing> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    if (errnoOf(err) === 'ENOTDIR' && (await fs.stat(dir).catch(() => undefined))?.isFile()) {
      throw new UserError(`${dir} is a file, not a backup set directory (a zip written with -o -? unzip it into a directory and give that)`);
    }
    throw new UserError(`cannot read backup set directory ${dir}: ${describeReadFailure(err)}`);
  }
  names.sort();
  const dataFiles = names.map(parseDataFileName).filter((d): d is DataFile => d !== undefined);
  // A FIFO or device would block the first read for ever (a FIFO waits for a writer) or read as anything.
  for (const { file } of dataFiles) {
    const stat = await fs.stat(path.join(dir, file)).catch(() => undefined);
    if (stat && !stat.isFile()) throw new UserError(`${path.join(dir, file)} is not a regular file; a backup set's data files are files: move it out of the set`);
  }
  return {
    dir,
    dataFiles,
    partials: names.filter((n) => n.endsWith('.partial')),
    checkpointLists: names.filter((n) => n.endsWith('.cpt')),
    stranded: strandedSideFiles(names),
  };
}

/**
 * The `.partial` leftovers that concern `disk` (every disk's when undefined): its data files', and any that is no
 * data file (a checksum, the checkpoint list, a domain XML a failed run left half written), which concern all.
 */
export function partialsOf(listing: SetListing, disk: string | undefined): string[] {
  return listing.partials.filter((p) => {
    const data = parseDataFileName(p.slice(0, -'.partial'.length));
    return data === undefined || disk === undefined || data.disk === disk;
  });
}

/**
 * The diffs of `disk` (every disk's when undefined) the set lacks while their side files are there, made after
 * every file the set holds of their disk (`chains`): such a lost diff leaves the chain whole, and a restore of the
 * latest point short of it. One made before a file still there was passed by it (a newer diff or inc holds its
 * changes), so pruning old diffs is no loss. A lost full or inc breaks the chain, or is told by the checkpoint
 * definitions (lostFiles), more closely.
 */
export function lostDiffs(listing: SetListing, disk: string | undefined, chains: ReadonlyMap<string, ChainLink[]>): StrandedSideFiles[] {
  return listing.stranded.filter((s) => {
    const data = parseDataFileName(s.dataFile);
    const made = diffSeconds(data?.ident ?? '');
    if (data?.level !== 'diff' || !ofDisk(disk)(data) || made === undefined) return false;
    // Whole seconds, as a diff's name has them: a diff run starts after the file before it, within a second maybe.
    const times = (chains.get(data.disk) ?? []).map(madeAt).filter((t) => !Number.isNaN(t));
    return times.every((t) => made >= Math.floor(t));
  });
}

/** A diff's unix seconds from its name's ident, or undefined for a name that holds none. */
const diffSeconds = (ident: string): number | undefined => (/^\d+$/.test(ident) ? Number(ident) : undefined);

/** When a file was made, in unix seconds: a diff's name says; else its metadata's date (local time where it has no zone). */
function madeAt(link: ChainLink): number {
  return (link.level === 'diff' ? diffSeconds(link.ident) : undefined) ?? Date.parse(String(link.meta.date)) / 1000;
}

export interface ChainLink extends DataFile {
  path: string;
  meta: StreamMetadata;
}

/** Sort key of a non-base file: inc N sits at N, a diff taken after checkpoint N at N + 0.5 (then by time). */
function chainPosition(link: ChainLink, order: Map<string, number>): number {
  const index = (name: string): number => order.get(name) ?? Number(/\.(\d+)$/.exec(name)?.[1] ?? Number.NaN);
  return link.level === 'diff' ? index(link.meta.parentCheckpoint) + 0.5 : index(link.meta.checkpointName);
}

/**
 * The chain of every disk in the set, base first. `checkpoints` (the .cpt list) orders incrementals;
 * names ending in .N order them when it is missing (sets copied without their .cpt).
 */
export async function readChains(listing: SetListing, checkpoints: string[]): Promise<Map<string, ChainLink[]>> {
  const order = new Map(checkpoints.map((name, i) => [name, i] as [string, number]));
  const byDisk = new Map<string, ChainLink[]>();
  for (const f of listing.dataFiles) {
    const p = path.join(listing.dir, f.file);
    const meta = await StreamReader.metadata(p).catch((err: Error) => {
      // A file that cannot be opened (permissions) is not damaged: say only why.
      if (errnoOf(err) !== undefined) throw new UserError(`cannot read ${p}: ${describeReadFailure(err.cause ?? err)}`);
      throw new UserError(`${err.message}; the set's file ${f.file} is damaged or not a stream`);
    });
    const list = byDisk.get(f.disk) ?? [];
    list.push({ ...f, path: p, meta });
    byDisk.set(f.disk, list);
  }
  for (const [disk, links] of byDisk) {
    const bases = links.filter((l) => l.level === 'full' || l.level === 'copy');
    if (bases.length !== 1) {
      throw new UserError(bases.length === 0
        ? `no full or copy backup of disk ${disk} in ${listing.dir}: the chain has no base to restore onto; put it back, or restore the other disks one by one with -d`
        : `${listing.dir} holds ${bases.map((b) => b.file).join(' and ')}: one base per disk expected`);
    }
    const rest = links.filter((l) => l.level === 'inc' || l.level === 'diff');
    rest.sort((a, b) => chainPosition(a, order) - chainPosition(b, order) || madeOrder(a, b));
    byDisk.set(disk, [bases[0] as ChainLink, ...rest]);
  }
  return byDisk;
}

/**
 * Checks that every inc and diff is based on the last checkpoint of the chain before it, and, where the set's
 * checkpoint list is given (`listed`), that no file of another chain with the same names is among them (olderChains).
 */
export function checkLinks(chain: ChainLink[], remedy = 'put it back, or restore an earlier point with --until', listed: readonly string[] = []): void {
  // First: once those files are moved away, the links after them would ask for them back.
  refuseOlderChains(chain, listed);
  const base = chain[0];
  // A copy makes no checkpoint: an inc naming the one a copy's metadata carries was made after another base.
  if (base?.level === 'copy' && chain.length > 1) {
    throw new MixedChain(`broken chain: ${(chain[1] as ChainLink).file} cannot follow ${base.file}: a copy backup makes no checkpoint, so no inc or diff builds on it, and this one comes from a chain of its own; restore the copy alone, or the inc with the full backup it was made after, each from a directory of its own`);
  }
  let last = base;
  let lastDiff: ChainLink | undefined;
  for (const link of chain.slice(1)) {
    const lastCheckpoint = last?.meta.checkpointName ?? '';
    if (link.meta.parentCheckpoint !== lastCheckpoint) {
      // Python's offline inc saves the changes since the last checkpoint under the name of the inc that made it.
      if (link.level === 'inc' && link.meta.incremental && link.meta.parentCheckpoint === link.meta.checkpointName) {
        const since = link.meta.parentCheckpoint;
        throw new UserError(`broken chain: ${link.file} holds only the changes since checkpoint ${since}, which it names as its own and as its parent: an offline backup of Python's virtnbdbackup, which writes them under the name of the inc that made ${since}, replacing that inc; the changes from ${lastCheckpoint || 'the base'} to ${since} are lost from the set, and nothing can put them back: ${last?.file} (${lastCheckpoint || 'the base'}) is the latest point before it that restores${lastCheckpoint ? ` (--until ${lastCheckpoint})` : ''}`);
      }
      throw new UserError(`broken chain: ${link.file} is based on checkpoint ${link.meta.parentCheckpoint || '(none)'}, but the chain before it ends at ${lastCheckpoint || 'no checkpoint'} (${last?.file}); a data file is missing from the set: ${remedy}`);
    }
    // Same names, another chain: a set's file copied over with another set's (ours record who made each checkpoint).
    const made = last?.meta.checkpointIdentity;
    const expected = link.meta.parentCheckpointIdentity;
    if (made !== undefined && expected !== undefined && made !== expected) {
      const [named, held] = [describeIdentity(expected), describeIdentity(made)];
      // Identities that read the same in words differ where no other set would: in bytes a damaged file changed.
      if (named === held && / by run /.test(named)) throw new UserError(`broken chain: ${link.file} names checkpoint ${lastCheckpoint} by an identity that differs from the one ${last?.file} holds, though both read "${named}": the metadata of one of them is damaged; check the set with -a verify, or restore an earlier point with --until`);
      throw new MixedChain(`broken chain: ${link.file} is based on another checkpoint ${lastCheckpoint} (${named}) than ${last?.file} holds (${held}): the files come from two sets with the same names; keep each set's files in a directory of its own, and restore from the one they were written into`);
    }
    // Diffs after one checkpoint each hold every change since it: one older than the diff before it would undo changes.
    if (link.level === 'diff' && lastDiff && madeBefore(link, lastDiff)) {
      throw new UserError(`${link.file} (${link.meta.date}) comes after ${lastDiff.file} (${lastDiff.meta.date}), a later diff after the same checkpoint ${lastCheckpoint}: each holds every change since it, so the older one after would undo changes; give the newest diff alone, or the diffs in the order they were made`);
    }
    if (link.level === 'inc') [last, lastDiff] = [link, undefined];
    else lastDiff = link;
  }
}

/**
 * Refuses the files of `chain` written before its base that the set's checkpoint list (`listed`) does not vouch
 * for: they belong to an earlier chain whatever their names say. Python's files carry no checkpoint identities, so
 * a chain begun anew, its zips unzipped over the old one's, leaves the old chain's newer incs (which the new list
 * does not name) and diffs (whose checkpoint name, the next one's, the new chain may well have reached). A listed
 * inc is the chain's even if the clock went back; a file of ours proves its link by identity, not by date.
 */
export function refuseOlderChains(chain: ChainLink[], listed: readonly string[]): void {
  const base = chain[0];
  if (listed.length === 0 || !base) return;
  const older = chain.slice(1).filter((link) => link.meta.parentCheckpointIdentity === undefined
    && (link.level === 'diff' || !listed.includes(link.meta.checkpointName)) && writtenBefore(link, base));
  const [first] = older;
  if (!first) return;
  const what = older.length === 1 ? `${first.file} was written at ${first.meta.date}, before` : `${older.map((l) => l.file).join(', ')} were written before`;
  const them = older.length === 1 ? 'it' : 'them';
  throw new MixedChain(`broken chain: ${what} the chain's base ${base.file} (${base.meta.date}): ${older.length === 1 ? 'it comes' : 'they come'} from an earlier chain with the same names (a chain begun anew over the old one's files, or their zips unzipped into one directory); move ${them} out of the set, or restore with --until ${listed.at(-1)}`);
}

/**
 * Whether `link` was written before `base`, by their dates in one form: Python writes local time without a zone,
 * ours UTC. Local times are compared as they read (as UTC), so the restoring host's zone and DST do not enter.
 */
function writtenBefore(link: ChainLink, base: ChainLink): boolean {
  const zoned = (date: string): boolean => /(Z|[+-]\d\d:?\d\d)$/.test(date);
  const [at, from] = [link.meta.date, base.meta.date];
  if (typeof at !== 'string' || typeof from !== 'string' || zoned(at) !== zoned(from)) return false;
  const asRead = (date: string): number => Date.parse(zoned(date) ? date : `${date}Z`);
  return asRead(at) < asRead(from);
}

/** Whether diff `link` was made before diff `other`: by the seconds their names hold, else by their dates. */
function madeBefore(link: ChainLink, other: ChainLink): boolean {
  const [at, from] = [diffSeconds(link.ident), diffSeconds(other.ident)];
  return at !== undefined && from !== undefined ? at < from : writtenBefore(link, other);
}

/** Diffs after one checkpoint in the order they were made (madeBefore), else by name: the order checkLinks asks for. */
function madeOrder(a: ChainLink, b: ChainLink): number {
  return madeBefore(a, b) ? -1 : madeBefore(b, a) ? 1 : a.file.localeCompare(b.file);
}

/** Files of two chains with the same names: in order, and still no chain. */
export class MixedChain extends UserError {}

/** A checkpoint's identity ("<creation seconds> <description>") in words: when it was made, and by which run. */
function describeIdentity(identity: string): string {
  const [seconds = '', ...description] = identity.split(' ');
  const when = /^\d+$/.test(seconds) ? new Date(Number(seconds) * 1000).toISOString().replace('.000Z', 'Z') : 'unknown time';
  const run = /\(run (\w+)\)/.exec(description.join(' '))?.[1];
  return `made ${when}${run ? ` by run ${run}` : ''}`;
}

/** A chain moved aside (`chain.<unix-seconds>`) when its checkpoints became unusable; itself a complete set. */
export const archivedChainName = (when: Date): string => `chain.${Math.floor(when.getTime() / 1000)}`;
export const isArchivedChain = (name: string): boolean => /^chain\.\d+$/.test(name);

/**
 * The newest chain moved aside in `dir`, and the flag its checkpoints' prefix asks of the full backup that starts
 * the set anew (` --checkpoint-prefix P`, or '' for the default): a full without it starts a chain of another
 * name, and removes the default chain's checkpoints of other sets of the domain.
 */
export async function lastArchivedChain(dir: string): Promise<{ path: string; prefixFlag: string } | undefined> {
  const archived = (await fs.readdir(dir).catch(() => [] as string[])).filter(isArchivedChain).sort().at(-1);
  if (!archived) return undefined;
  const archive = path.join(dir, archived);
  const list = (await fs.readdir(archive).catch(() => [] as string[])).find((n) => n.endsWith('.cpt'));
  const [first] = list ? await readCheckpointList(path.join(archive, list)).catch(() => [] as string[]) : [];
  const prefix = first === undefined ? undefined : prefixOf(first);
  return { path: archive, prefixFlag: prefix && prefix !== DEFAULT_PREFIX ? ` --checkpoint-prefix ${prefix}` : '' };
}

/**
 * The newest chain moved aside in the set `dir` (chain.<secs>/) that holds a file `name`, or undefined: where a file
 * that a restore or verify listed at its start went, when a backup into the set fell back to a full meanwhile and
 * moved the chain aside under it (found by a black-box round: the file was then called damaged).
 */
export async function archivedChainHolding(dir: string, name: string): Promise<string | undefined> {
  const seconds = (archive: string): number => Number(archive.slice('chain.'.length));
  const archives = (await fs.readdir(dir).catch(() => [] as string[])).filter(isArchivedChain).sort((a, b) => seconds(b) - seconds(a));
  for (const archive of archives) {
    if (await fs.lstat(path.join(dir, archive, name)).then(() => true, () => false)) return path.join(dir, archive);
  }
  return undefined;
}

/**
 * Moves `names` (files and directories of the set `dir`) into a new subdirectory `chain.<unix-seconds>`, where
 * they still form a set that restores; returns its path. Never overwrites: an existing subdirectory is refused.
 * All or nothing: should a move fail, those done are moved back and the subdirectory removed, so the set stays whole
 * where it was.
 */
export async function archiveChain(dir: string, names: string[], when: Date): Promise<string> {
  const archive = path.join(dir, archivedChainName(when));
  await fs.mkdir(archive).catch((err: NodeJS.ErrnoException) => {
    throw new UserError(`cannot move the set's chain aside into ${archive}: ${describeFailure(err)}`);
  });
  const moved: string[] = [];
  for (const name of names) {
    try {
      if (path.dirname(name) !== '.') await fs.mkdir(path.join(archive, path.dirname(name)), { recursive: true });
      await fs.rename(path.join(dir, name), path.join(archive, name));
      moved.push(name);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') continue;
      const failure = `cannot move ${path.join(dir, name)} into ${archive}: ${describeFailure(err)}`;
      const stuck: string[] = [];
      for (const back of moved.reverse()) await fs.rename(path.join(archive, back), path.join(dir, back)).catch(() => stuck.push(back));
      if (stuck.length > 0) throw new UserError(`${failure}; ${stuck.join(', ')} could not be moved back from ${archive}: move them back by hand`);
      // Only the empty folders made above are left in it.
      await fs.rm(archive, { recursive: true }).catch(() => undefined);
      throw new UserError(`${failure}; the set was left as it was`);
    }
  }
  return archive;
}
