// Verifies a backup set without writing anything and without libvirtd. Per data file, in one read of all of it:
//   stream structure (headers, payload lengths, terminators, stop, trailer, lz4 frame checksums, dataSize)
//   -> adler32 of every byte == <file>.chksum (what Python's verify checks)
//   -> BLAKE3 of every payload piece == <file>.blake3.json (ours; SHA-256 in <file>.sha256.json of earlier
//      backups), which names the extent that rotted.
// Raw images (-t raw) get the adler32 check only. `.partial` leftovers fail as incomplete files. Then the chains:
// the files must link up as a restore needs them (a file missing in between fails). --until narrows all of it to
// what a restore at that checkpoint reads, --sequence to its files (linked as a restore with it needs them).
// Guarantees: every byte of every data file is read; a file passes only when all present checks pass and its
// checksum file exists; the first failing extent is named by disk offset and length.
import path from 'node:path';
import type { Logger } from '../util/log.js';
import { StreamReader } from '../stream/reader.js';
import {
  archivedChainHolding, checksumFileName, checksumMismatch, digestFileName, fileChecksum, isStreamFile, listSet, noDataFilesIn, ofDisk, parseDataFileName, partialsOf, readIfThere, recordedChecksum,
  sideFilesAre,
} from '../set/backupSet.js';
import type { DigestAlgorithm } from '../stream/writer.js';
import { native } from '../native/addon.js';
import { WorkWindow } from '../util/window.js';
import { UserError, oneLine } from '../util/errors.js';
import { partialCause } from '../backup/lock.js';
import { exists } from '../util/fileIo.js';
import { UnknownCheckpoint, checkedChains, sequenceFiles } from '../restore/plan.js';

export interface VerifyOptions {
  input: string;
  /** Only the files of this disk. */
  disk?: string;
  /** Only the files a restore at this checkpoint reads (an unknown one is refused, as restore refuses it). */
  until?: string;
  /** Only these data files of one disk (-s), linked as a restore with --sequence needs them, as Python checks -s. */
  sequence?: string[];
  /** Called with each verdict as soon as it is known (files are verified one after the other). */
  onVerdict?: (verdict: FileVerdict) => void;
  signal?: AbortSignal;
  /** Warnings about the set that fail nothing (a checkpoint listed with no file of it). */
  log?: Logger;
}

export interface FileVerdict {
  /** File name within the set. */
  file: string;
  ok: boolean;
  /** Why it failed. */
  reason?: string;
}

/** A payload piece's recorded digest (hex), as backup wrote it into the digest file. */
export interface RecordedPiece {
  offset: number;
  length: number;
  digest: string;
}

export interface RecordedDigests {
  algorithm: DigestAlgorithm;
  pieces: RecordedPiece[];
}

const ALGORITHM_NAMES: Record<DigestAlgorithm, string> = { blake3: 'BLAKE3', sha256: 'SHA-256' };

/** Digest work in flight at most, in bytes. */
const HASH_WINDOW = 64 * 1024 * 1024;

/** The pieces recorded in `<dataFile>.blake3.json` (or an earlier backup's `.sha256.json`), or undefined. */
export async function recordedPieces(dataFile: string): Promise<RecordedDigests | undefined> {
  for (const algorithm of ['blake3', 'sha256'] as const) {
    const file = digestFileName(dataFile, algorithm);
    const text = await readIfThere(file);
    if (text === undefined) continue;
    const damaged = new Error(`${path.basename(file)} is damaged (not a ${algorithm} piece list), so the data file was not checked against it`);
    let doc: { algorithm?: unknown; pieces?: unknown } | null;
    try {
      doc = JSON.parse(text) as typeof doc;
    } catch {
      throw damaged;
    }
    if (doc?.algorithm !== algorithm || !Array.isArray(doc.pieces)) throw damaged;
    // Earlier SHA-256 files keyed each piece's hash by the algorithm's name.
    const listed = doc.pieces as Array<Partial<RecordedPiece> & { sha256?: unknown } | null>;
    const pieces = listed.map((p) => ({ offset: p?.offset, length: p?.length, digest: p?.digest ?? p?.sha256 }));
    if (!pieces.every((p) => isCount(p.offset, true) && isCount(p.length) && typeof p.digest === 'string')) throw damaged;
    return { algorithm, pieces: pieces as RecordedPiece[] };
  }
  return undefined;
}

/** A byte count in a digest file: a whole number, above zero (or zero, where `zeroAllowed`). */
function isCount(value: unknown, zeroAllowed = false): boolean {
  return Number.isSafeInteger(value) && ((value as number) > 0 || (zeroAllowed && value === 0));
}

/** An error's line without the file's path in front: the verdict line names the file already. */
function withoutPath(err: unknown, file: string): string {
  return oneLine(err).replace(`cannot read ${file}:`, 'cannot read it:').replace(`${file}: `, '').replace(`${file} `, '');
}

const describeExtent = (p: { offset: number; length: number }): string => `extent at disk offset ${p.offset} (${p.length} bytes)`;


/** Reads the stream fully; returns the reasons it fails (empty: sound). */
async function verifyStream(file: string, signal?: AbortSignal): Promise<string[]> {
  const recorded = await recordedChecksum(file);
  const recordedDigests = await recordedPieces(file);
  const pieces = recordedDigests?.pieces;
  const reader = await StreamReader.open(file, { checksum: true });
  const window = new WorkWindow(HASH_WINDOW);
  let firstBad: { index: number; offset: number; length: number; why: string } | undefined;
  let badPieces = 0;
  const noteBad = (index: number, piece: { offset: number; length: number }, why: string): void => {
    badPieces++;
    if (!firstBad || index < firstBad.index) firstBad = { index, ...piece, why };
  };
  let index = 0;
  try {
    for await (const record of reader.records()) {
      if (signal?.aborted) throw signal.reason ?? new Error('aborted');
      if (record.kind !== 'data') continue;
      const at = index++;
      const expected = pieces?.[at];
      const piece = { offset: record.offset, length: record.length };
      if (pieces && (!expected || expected.offset !== piece.offset || expected.length !== piece.length)) {
        noteBad(at, piece, expected ? `recorded as ${describeExtent(expected)}` : 'not in the digest file');
      }
      const check = record.data.then(async (data) => {
        if (!expected || !recordedDigests) return;
        const digest = await native().digestPiece(data, recordedDigests.algorithm);
        if (digest !== expected.digest) noteBad(at, piece, `${ALGORITHM_NAMES[recordedDigests.algorithm]} differs from the recorded one`);
      }).finally(() => record.release());
      await window.add(check, record.length);
    }
    await window.drain();
  } catch (err) {
    // A stop signal is no finding about the file: the run ends, naming no file FAILED.
    if (signal?.aborted) throw err;
    return [withoutPath(err, file)];
  } finally {
    await window.settle();
    await reader.close();
  }
  const reasons: string[] = [];
  if (firstBad) {
    const more = badPieces > 1 ? ` (${badPieces - 1} more bad pieces after it)` : '';
    reasons.push(`${describeExtent(firstBad)}: ${firstBad.why}${more}`);
  }
  if (pieces && index < pieces.length) reasons.push(`the stream has ${index} payload pieces, the digest file lists ${pieces.length}`);
  reasons.push(...checksumReasons(file, reader.checksum as number, recorded));
  return reasons;
}

function checksumReasons(file: string, actual: number, recorded: number | undefined): string[] {
  if (recorded === undefined) return [`no checksum file ${path.basename(checksumFileName(file))}`];
  return actual === recorded ? [] : [checksumMismatch(file, actual, recorded)];
}

export async function verifyDataFile(file: string, signal?: AbortSignal): Promise<FileVerdict> {
  const name = path.basename(file);
  let reasons: string[];
  try {
    reasons = (await isStreamFile(file))
      ? await verifyStream(file, signal)
      : checksumReasons(file, await fileChecksum(file, signal), await recordedChecksum(file));
  } catch (err) {
    if (signal?.aborted) throw err;
    reasons = [withoutPath(err, file)];
  }
  return reasons.length === 0 ? { file: name, ok: true } : { file: name, ok: false, reason: reasons.join('; ') };
}

/**
 * A file that failed because it is gone, and that a chain moved aside (chain.<secs>/) holds now: a backup into the
 * set fell back to a full while this verify ran, which moved the chain under it. Said so, where the file was called
 * unreadable as if the set were damaged; it still fails, since it was not verified.
 */
async function movedAside(verdict: FileVerdict, dir: string): Promise<FileVerdict> {
  if (verdict.ok || (await exists(path.join(dir, verdict.file)))) return verdict;
  const archive = await archivedChainHolding(dir, verdict.file);
  if (!archive) return verdict;
  return { ...verdict, reason: `not verified: a backup into the set moved its chain into ${archive} while this verify ran (an inc that fell back to a full, which starts a new chain); verify that directory` };
}

/**
 * Verifies every data file of the set (and fails every `.partial` leftover), in name order, then that the files
 * form chains a restore can apply: a file missing between others fails as `chain`, as restore would refuse it.
 */
export async function verifySet(options: VerifyOptions): Promise<FileVerdict[]> {
  const input = path.resolve(options.input);
  const listing = await listSet(input);
  const sequence = options.sequence?.map((f) => path.basename(f));
  if (sequence && options.until !== undefined) throw new UserError('--sequence and --until both choose the files to check: give one of them');
  const disk = options.disk ?? (sequence && parseDataFileName(sequence[0] as string)?.disk);
  // A name of the sequence that the set lacks fails as `chain`, with restore's line.
  const known = new Set(listing.dataFiles.map((d) => d.file));
  let files = sequence ? sequence.filter((f) => known.has(f)) : listing.dataFiles.filter(ofDisk(disk)).map((d) => d.file);
  const partials = partialsOf(listing, disk);
  if (!sequence && files.length === 0 && partials.length === 0) throw await noDataFilesIn(options.input, disk);
  // The chains, from the files' metadata (a set with a .partial has none: restore refuses it, and the file fails
  // below). Why they cannot be read or do not link is a verdict of its own; an unknown --until is refused.
  let scanned: Awaited<ReturnType<typeof checkedChains>> | undefined;
  let chainProblem: string | undefined;
  if (partials.length === 0) {
    try {
      if (options.sequence) files = await sequenceFiles(listing, options.sequence, options.disk, options.log);
      else scanned = await checkedChains(listing, options.until, options.disk, options.log);
    } catch (err) {
      if (err instanceof UnknownCheckpoint || !(err instanceof UserError)) throw err;
      chainProblem = oneLine(err);
    }
  }
  // --until: the files a restore at that point reads, and the raw images (-t raw), which stand alone.
  if (options.until !== undefined && scanned) {
    const read = new Set([...[...scanned.chains.values()].flat(), ...scanned.images].map((d) => d.file));
    files = files.filter((f) => read.has(f));
  }
  const verdicts: FileVerdict[] = [];
  const report = (verdict: FileVerdict): void => {
    verdicts.push(verdict);
    options.onVerdict?.(verdict);
  };
  const cause = partials.length > 0 ? await partialCause(listing.dir, 'verify') : undefined;
  const why = cause?.writing ? cause.text : `${cause?.text}: the file is incomplete`;
  for (const partial of partials) report({ file: partial, ok: false, reason: why });
  // Only where the chains tell that the diff was the newest of its disk (an older one passed by a newer file is no loss).
  if (options.until === undefined) {
    for (const lost of scanned?.lostDiffs ?? []) {
      report({ file: lost.dataFile, ok: false, reason: `missing, while its ${sideFilesAre(lost)} in the set: the newest diff of its disk, lost, or removed without its side files` });
    }
  }
  for (const file of files) {
    options.signal?.throwIfAborted();
    report(await movedAside(await verifyDataFile(path.join(listing.dir, file), options.signal), listing.dir));
  }
  // A damaged file is named by its own verdict, more closely than by the chain it breaks; a file lost or foreign to
  // the chain has none (and one failing for want of a .chksum, as Python 1.9.15's all do, says nothing of links).
  const sameDamage = (v: FileVerdict): boolean => !v.ok && (chainProblem?.includes(`file ${v.file} is damaged`) || chainProblem?.includes(`cannot read ${path.join(listing.dir, v.file)}:`)) === true;
  if (chainProblem && !verdicts.some(sameDamage)) report({ file: 'chain', ok: false, reason: chainProblem });
  return verdicts;
}
