// Backs up a domain into a backup set: locks the domain and the set, checks the set, brings the domain into a
// state to back up (running, started paused with -S, or shut off), plans the checkpoint, exports the disks
// (libvirt pull-mode job, or qemu-nbd on the images of a shut-off domain), streams every selected disk, then
// saves the set's side files.
//   lock -> check set -> domain state -> job paths, scratch space -> plan (runPlan.ts) -> [-p | -T] -> export
//   disks -> [-s] -> per disk (parallel): plan extents, write stream, commit -> side files, .cpt last -> end export
//   -> unlock
// Guarantees: the export is always ended and its socket and scratch files removed; a failed run leaves no
// checkpoint of its own in libvirt and no entry in .cpt, and its unfinished files stay as .partial; a domain
// started for the run is stopped again; locks are released.
import fs from 'node:fs/promises';
import path from 'node:path';
import { DirectoryTarget, type OutputTarget } from '../set/target.js';
import { ZipTarget } from '../set/zipTarget.js';
import { CHECKPOINT_DIR, checkpointListName, checksumFileName, dataFileName, digestFileName, isStreamFile, lastArchivedChain, listSet, logFileName, readCheckpointList } from '../set/backupSet.js';
import { checkPrefix, checkpointIdentity, type CheckpointPlan, type JobServer, type Level } from '../libvirt/checkpoints.js';
import { parseDomainXml, resolveVolumes, selectDisks, type DomainDisk } from '../libvirt/domainXml.js';
import { BackupJob } from '../libvirt/backupJob.js';
import { DEFAULT_TLS_CERT_DIR, NbdStalled, checkTlsClientFiles, nbdUri } from '../endpoint/nbd.js';
import { changedBytesSince, clearChainOrphans, clearOrphanBitmap, deleteCheckpoint, existingBitmapName, isLostBitmapError, removeChain } from '../libvirt/chain.js';
import { DEFAULT_LIBVIRT_URI, lookupDomain, lostConnectionError, openLibvirt, type LibvirtLogin } from '../libvirt/connection.js';
import { domainHostOf, tcpServerOn, type DomainHost } from '../libvirt/domainHost.js';
import type { LibvirtConnection, LibvirtDomain } from '../native/addon.js';
import { Logger, silentLogger } from '../util/log.js';
import { UserError, describeFailure, errnoOf, oneLine } from '../util/errors.js';
import { exists, makeDirectory } from '../util/fileIo.js';
import { domainLockFile, lockRun, partialWriter, tookOverFromDeadRun } from './lock.js';
import { DomainPower } from './domainPower.js';
import { OfflineExports, imageBitmaps, type DiskExports, type OfflineServing } from './offline.js';
import { DEAD_RUN_JOB_WAIT_MS, refuseActiveJob } from './jobControl.js';
import { fallBackToFull, planRun, type RunPlan } from './runPlan.js';
import { backupDisk, writeFailure, type DiskResult } from './diskBackup.js';
import { imageInfoJson, readImageInfo, saveSideFiles, type ImageInfo } from './sideFiles.js';
import { openScratchSpace, scratchLocation, watchScratch, type ScratchSpace, type ScratchWatch } from './scratchWatch.js';
import { guardJob, type JobGuard } from './jobGuard.js';
import type { RunContext } from './context.js';
import { checkSocketPath, clearSocketPath } from '../util/process.js';
import { checkQemuMayWrite, qemuUserOf } from './qemuAccess.js';

export type { DiskResult } from './diskBackup.js';

export interface BackupOptions {
  domain: string;
  /** libvirt URI, default DEFAULT_LIBVIRT_URI. */
  uri?: string;
  /** --user/--password: a login for a libvirtd that asks for one. */
  login?: LibvirtLogin;
  level: Level | 'auto';
  /** Backup set directory (created when missing), or '-' for a zip archive on `stdout`. */
  output: string;
  /** 'stream' (default) or 'raw' (full-size sparse images; copy/full only). */
  type?: 'stream' | 'raw';
  /** Include raw-format disks (always as copy; left out of inc/diff). */
  raw?: boolean;
  /** Where the zip goes for output '-'; default process.stdout. */
  stdout?: NodeJS.WritableStream;
  include?: string[];
  exclude?: string[];
  /** NBD socket of the job; default /var/tmp/virtnbdbackup.<pid> (shut-off domains: one per disk, `.<disk>` appended). */
  socketFile?: string;
  /** -I: for a domain on another host (remote URI), the address its job's NBD server binds; default the URI's host. */
  nbdHost?: string;
  /** -P: for a domain on another host, the NBD server's TCP port; default 10809. */
  nbdPort?: number;
  /** --ssh-user: who runs qemu-img and reads the boot files on a remote host; default the URI's user, else root. */
  sshUser?: string;
  /** --tls: a remote domain's job serves NBD over TLS, with the host libvirt's server certificates. */
  tls?: boolean;
  /** --tls-cert: this side's certificates for --tls (ca-cert.pem, client-cert.pem, client-key.pem); default /etc/pki/qemu. */
  tlsCertificates?: string;
  /** Where QEMU puts scratch files; must be writable by QEMU's user. */
  scratchDir?: string;
  /** Disks backed up at the same time; default all. */
  workers?: number;
  /** lz4 level or false. */
  compress?: number | false;
  /** -C: directory of the saved checkpoint definitions; default <set>/checkpoints. */
  checkpointDir?: string;
  /** Checkpoint name prefix of a new chain (full); inc/diff use the set's. Default virtnbdbackup. */
  checkpointPrefix?: string;
  /** -S: start a shut-off domain paused for the backup and stop it afterwards. */
  startDomain?: boolean;
  /** --pause: suspend a running domain while the backup job starts. */
  pause?: boolean;
  /** -F: freeze only these guest mount points through the guest agent while the job starts (default: all). */
  freezeMountpoints?: string[];
  /** -s: start the backup job and leave it and its NBD export running; creates no checkpoint, writes nothing. */
  startOnly?: boolean;
  /** -p: only estimate the size of the next inc/diff (bytes changed since the set's last checkpoint). */
  printOnly?: boolean;
  /** -T: skip an inc/diff when fewer bytes than this changed since the last checkpoint. */
  threshold?: number;
  /** -q: query extents with qemu-img map instead of NBD block status. */
  qemuExtents?: boolean;
  /** --no-sparse-detection: inc/diff save every changed range as data, also where it now reads as zero. */
  noSparseDetection?: boolean;
  /**
   * --nbd-timeout: seconds an NBD request, or a remote host's ssh, may go unanswered before the run fails (0: forever);
   * default DEFAULT_NBD_TIMEOUT.
   */
  nbdTimeout?: number;
  log?: Logger;
  /** The first line of the set's log (the command's version and flags, as Python's logs them), debug on the console. */
  runDescription?: string;
  /** Called once per disk with its total data bytes; returns the per-chunk progress callback. */
  progress?: (disk: string, total: number) => (bytes: number) => void;
  signal?: AbortSignal;
}

export interface BackupResult {
  level: Level;
  checkpoint: CheckpointPlan;
  disks: DiskResult[];
  /** The domain was shut off: its images were read directly. */
  offline?: boolean;
  /** The set's previous chain was unusable and moved here before this run made a full backup. */
  archivedChain?: string;
  /** -p and -T: bytes changed since the last checkpoint, as libvirt estimates them. */
  estimate?: number;
  /** -T: nothing was backed up, the estimate was below the threshold. */
  skipped?: boolean;
  /** -s: the job left running, served at `server`: its socket, or nbd://host:port for a domain on another host. */
  startedJob?: { server: string; exports: string[] };
}

/** Level `auto`: full when the set has no full backup yet (for a zip: no chain in the state dir), else inc. */
async function resolveLevel(level: Level | 'auto', stateDir: string, toZip: boolean, domain: string): Promise<Level> {
  if (level !== 'auto') return level;
  if (toZip) return (await readCheckpointList(path.join(stateDir, checkpointListName(domain)))).length > 0 ? 'inc' : 'full';
  const names = await fs.readdir(stateDir).catch(() => [] as string[]);
  return names.some((n) => n.endsWith('.full.data')) ? 'inc' : 'full';
}

/** lz4's levels (python-lz4 takes 0 to 16; 0, liblz4's default, left Python's streams without their trailer). */
const MAX_LZ4_LEVEL = 16;

/** Refuses combinations of options that cannot work, before anything is touched. */
function checkOptions(options: BackupOptions, level: Level, toZip: boolean): void {
  if (options.type === 'raw' && (level === 'inc' || level === 'diff')) {
    throw new UserError(`-t raw writes full images only; use it with -l full or -l copy (got -l ${level})`);
  }
  if (toZip && options.type === 'raw') throw new UserError('-t raw cannot be written to standard output (-o -); give an output directory');
  if (toZip && options.raw) throw new UserError('raw disks (-r) cannot be written to standard output (-o -); give an output directory');
  const { compress } = options;
  if (compress !== undefined && compress !== false && !(Number.isInteger(compress) && compress >= 1 && compress <= MAX_LZ4_LEVEL)) {
    throw new UserError(`-z ${compress}: give an lz4 compression level from 1 to ${MAX_LZ4_LEVEL} (-z alone: 2)`);
  }
  if (options.threshold !== undefined && !(Number.isSafeInteger(options.threshold) && options.threshold >= 0)) {
    throw new UserError(`-T ${options.threshold}: give the number of changed bytes, 0 or more`);
  }
  if (options.startOnly && options.printOnly) throw new UserError('-s and -p exclude each other');
  if (options.workers !== undefined && !(Number.isInteger(options.workers) && options.workers >= 1)) {
    throw new UserError(`-w ${options.workers}: give the number of disks to back up at the same time, 1 or more`);
  }
  // Before the output directory is made: a refused run leaves no empty set behind.
  if (options.checkpointPrefix !== undefined) checkPrefix(options.checkpointPrefix);
}

/** Refuses what would damage the set or produce an unusable run. */
async function checkSet(output: string, level: Level, domain: string): Promise<void> {
  const listing = await listSet(output);
  // This run holds the set's lock, but another program's backup (Python's takes none) may be writing there now.
  const writer = listing.partials.length > 0 ? await partialWriter(output) : undefined;
  if (writer) {
    throw new UserError(`${path.join(output, writer.file)} is being written right now by ${writer.program} (pid ${writer.pid}), a program that takes no lock of ours (Python's virtnbdbackup, or a restore into this directory, say): run again once it has ended`);
  }
  const cptFile = path.join(output, checkpointListName(domain));
  if (level === 'full' || level === 'copy') {
    const partials = listing.partials.filter((p) => p.includes('.data'));
    if (listing.dataFiles.length === 0 && partials.length > 0) {
      // This run holds the set's lock: no other backup writes it now.
      throw new UserError(`output directory ${output} holds ${partials[0]}, left from a failed backup run; move it out of the set, or use an empty directory for a ${level} backup`);
    }
    if (listing.dataFiles.length > 0) {
      const existing = listing.dataFiles[0]!.file;
      const onlyCopies = listing.dataFiles.every((d) => d.level === 'copy');
      // Ours lists the chain's first checkpoint last: a full without any list did not finish (killed between disks;
      // a set whose domain was renamed has its list under the former name).
      const unfinished = !onlyCopies && listing.checkpointLists.length === 0;
      const advice = onlyCopies ? ': a copy (as a shut-off domain\'s full or auto backup makes) starts no chain; start one in an empty directory with the domain running, or with -S' : unfinished ? ` (with no checkpoint list, ${path.basename(cptFile)}, the run that wrote it did not finish: move it out of the set)` : ', or -l inc/auto to continue its chain';
      throw new UserError(`output directory ${output} already holds a backup (${existing}); use an empty directory for a ${level} backup${advice}`);
    }
    return;
  }
  const fulls = listing.dataFiles.filter((d) => d.level === 'full');
  const aLevel = level === 'inc' ? 'an inc' : 'a diff';
  if (fulls.length === 0) {
    // A run that fell back to a full moved the chain aside first: if it did not finish, the set is empty but for it.
    const archived = await lastArchivedChain(output);
    const leftover = listing.partials[0];
    const aside = archived ? ` (the previous chain is in ${archived.path}, moved aside by a run that was to start a new one and did not finish${leftover ? `; first move its ${leftover} out of the set` : ''})` : '';
    const copy = listing.dataFiles.find((d) => d.level === 'copy');
    throw new UserError(copy
      ? `${output} holds a copy (${copy.file}), which starts no chain: ${aLevel} backup needs a full one; run -l full (or -l auto) into an empty directory`
      : `no full backup in ${output}: ${aLevel} backup needs one; run with -l full${archived?.prefixFlag ?? ''} (or -l auto) first${aside}`);
  }
  // A raw image holds no frames a chain can build on: the inc would be saved, and no point of the set restore.
  for (const full of fulls) {
    if (!(await isStreamFile(path.join(output, full.file)))) {
      throw new UserError(`${full.file} in ${output} is a raw image (-t raw), which ${aLevel} cannot continue: a restore could not apply it; start a chain with -l full (stream) in an empty directory`);
    }
  }
  // A run lists its checkpoint after its files: a finished inc file of a checkpoint the list does not hold is a run's
  // that did not finish (killed as it named its files), and the next inc would write that name again. It goes with
  // the .partial files into one list of what to move, its checksum and digests too.
  const listed = await readCheckpointList(cptFile).catch(() => [] as string[]);
  const unlisted = listed.length > 0 ? listing.dataFiles.filter((d) => d.level === 'inc' && !listed.includes(d.ident)).map((d) => d.file) : [];
  const sides: string[] = [];
  for (const file of unlisted) {
    for (const side of [checksumFileName(file), digestFileName(file)]) if (await exists(path.join(output, side))) sides.push(side);
  }
  const leftovers = [...listing.partials, ...unlisted, ...sides].sort();
  if (leftovers.length > 0) {
    const shown = leftovers.slice(0, 6).join(', ') + (leftovers.length > 6 ? ` and ${leftovers.length - 6} more` : '');
    const why = unlisted.length > 0 ? ` (checkpoint ${listing.dataFiles.find((d) => d.file === unlisted[0])?.ident} is not in ${path.basename(cptFile)})` : '';
    throw new UserError(`${output} holds what a failed run left${why}: ${shown}; the chain there is incomplete: move ${leftovers.length > 1 ? 'them' : 'it'} out of the set to continue the chain from its last complete backup (or start a new set with -l full in an empty directory)`);
  }
}

/**
 * Where the checkpoints' definitions are kept: -C, else the set's checkpoints/. A zip's state dir is the working
 * directory, which a loop over domains shares: there each domain keeps its own (checkpoints/<domain>/), since the
 * names (virtnbdbackup.N) repeat across domains, and another domain's definition made every inc a full.
 */
function checkpointDirOf(options: BackupOptions, stateDir: string, toZip: boolean): string {
  if (options.checkpointDir) return path.resolve(options.checkpointDir);
  return toZip ? path.join(stateDir, CHECKPOINT_DIR, options.domain) : path.join(stateDir, CHECKPOINT_DIR);
}

/**
 * The chain's state is written at the end of a run: a working directory (-o -) or -C that cannot take it would fail
 * the run after all its data, a full's old checkpoints already removed. Refused now instead.
 */
async function checkStateWritable(options: BackupOptions, stateDir: string, toZip: boolean): Promise<void> {
  const writable = (dir: string): Promise<boolean> => fs.access(dir, fs.constants.W_OK).then(() => true, () => false);
  if (toZip && !(await writable(stateDir))) {
    throw new UserError(`the working directory ${stateDir} keeps the chain's state of a zip on standard output (-o -), but cannot be written: run from a directory you can write to`);
  }
  if (options.checkpointDir !== undefined) {
    const dir = path.resolve(options.checkpointDir);
    await makeDirectory(dir).catch((err: unknown) => {
      throw new UserError(`cannot create the checkpoint directory (-C) ${dir}: ${describeFailure(err)}`);
    });
    if (!(await writable(dir))) throw new UserError(`the checkpoint directory (-C) ${dir} cannot be written: give one you can write to`);
  }
}

/** Runs `task` over `items` with at most `limit` at once; the first failure aborts the rest. */
async function forEachLimited<T>(items: T[], limit: number, task: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < items.length) {
      const item = items[next++] as T;
      try {
        await task(item);
      } catch (err) {
        failure ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failure !== undefined) throw failure;
}

/** The working directory, which keeps a zip chain's state; one removed under the shell is said so (Node's words were "uv_cwd"). */
function zipStateDir(): string {
  try {
    return process.cwd();
  } catch {
    throw new UserError('the working directory no longer exists (removed after the shell entered it): it keeps the chain\'s state of a zip on standard output (-o -); cd to the directory of the earlier -o - runs, or an existing one for a new chain');
  }
}

export async function backup(options: BackupOptions): Promise<BackupResult> {
  const log = options.log ?? silentLogger;
  const toZip = options.output === '-';
  // The state dir holds the chain (.cpt, checkpoints/): the set itself, or for a zip the current directory.
  const stateDir = toZip ? zipStateDir() : path.resolve(options.output);
  const writesSet = !options.printOnly && !options.startOnly;
  // -p and -s look at the next inc: the level only picks the export (-s) and is never written.
  const level = options.printOnly ? 'inc' : await resolveLevel(options.level, stateDir, toZip, options.domain);
  checkOptions(options, level, toZip);
  if (options.type === 'raw' && options.compress !== undefined && options.compress !== false) {
    log.warn('-z does not apply to -t raw: the images are written uncompressed');
  }
  let made = false;
  if (!toZip) {
    const existing = await fs.stat(stateDir).catch(() => undefined);
    if (existing && !existing.isDirectory()) throw new UserError(`-o ${stateDir} is not a directory: give a directory for the set, or - for a zip on standard output`);
    if (!existing && options.printOnly) throw new UserError(`-p estimates the next inc of the set in ${stateDir}, which does not exist: give the set's directory`);
    // -p and -s write nothing there: they leave no empty directory behind.
    if (writesSet) {
      await makeDirectory(stateDir).catch((err: unknown) => {
        throw new UserError(`cannot create output directory ${stateDir}: ${describeFailure(err)}`);
      });
      made = !existing;
    }
  }
  try {
    if (writesSet) await checkStateWritable(options, stateDir, toZip);
    const host = domainHostOf(options.uri ?? DEFAULT_LIBVIRT_URI, options.sshUser, options.nbdTimeout);
    const unlock = await lockRun(options.domain, toZip || !writesSet ? undefined : stateDir, host.remote ? host.hostname : undefined);
    try {
      if (!toZip && writesSet) await checkSet(stateDir, level, options.domain);
      return await backupLocked(options, log, level, stateDir, toZip, writesSet, host);
    } finally {
      await unlock();
    }
  } catch (err) {
    // A run refused before it wrote anything (another run's lock, no full to go on from) leaves no empty directory
    // it made; one that wrote its log keeps it there, as Python's does.
    if (made) await fs.rmdir(stateDir).catch(() => undefined);
    throw err;
  }
}

async function backupLocked(options: BackupOptions, log: Logger, level: Level, stateDir: string, toZip: boolean, writesSet: boolean, host: DomainHost): Promise<BackupResult> {
  const uri = options.uri ?? DEFAULT_LIBVIRT_URI;
  const startedAt = new Date();
  // -l auto's log is named for auto, as Python's is (backup.auto.<time>.log), whatever level it resolved to.
  const logLevel = options.level === 'auto' ? 'auto' : level;
  const logName = writesSet ? await createLogFile(stateDir, logLevel, startedAt) : logFileName(logLevel, startedAt);
  if (writesSet) log.attachFile(path.join(stateDir, logName));
  if (options.runDescription) log.debug(options.runDescription);
  // A set's data files take their names together at the end (publish), just before the checkpoint list names their
  // checkpoint: a run killed between two disks leaves .partial files only, which the next run names as such.
  const target: OutputTarget = toZip && writesSet ? await ZipTarget.open(options.stdout ?? process.stdout) : new DirectoryTarget(stateDir, { publishTogether: true });
  let succeeded = false;
  let conn: LibvirtConnection | undefined;
  const afterZip: RunContext['afterZip'] = [];
  /** A zip run's checkpoint, made permanent only once the archive is whole (removed should its end fail). */
  let zipCheckpoint: { domain: LibvirtDomain; name: string } | undefined;
  try {
    const connection = await openLibvirt(uri, options.login, options.nbdTimeout);
    conn = connection;
    const domain = await lookupDomain(connection, options.domain, uri);
    const startDomain = (options.startDomain ?? false) && !options.startOnly;
    // -S would start the domain only to find no disk to back up (-i vdz): refused first, with the same lines.
    if (startDomain) {
      const defined = parseDomainXml(await domain.getXMLDesc(0)).disks;
      await resolveVolumes(defined, (pool, volume) => connection.storageVolumePath(pool, volume));
      if (selectionOf(options, defined, level, false).disks.length === 0) chooseDisks(options, log, defined, level, false);
    }
    // -s leaves a job running past the run, and -S stops the domain it started as the run ends: not started for -s.
    const power = await DomainPower.prepare(domain, startDomain, log);
    try {
      const vmXml = await domain.getXMLDesc(0);
      const info = parseDomainXml(vmXml);
      await resolveVolumes(info.disks, (pool, volume) => connection.storageVolumePath(pool, volume));
      const ctx: RunContext = {
        options, log, domain, power, vmXml, info, disks: [], stateDir, target, toZip, logName, startedAt, host, offlineImageInfo: new Map(), afterZip,
        xmlDir: checkpointDirOf(options, stateDir, toZip),
      };
      const result = await runBackup(ctx, level);
      succeeded = true;
      if (toZip && writesSet && result.checkpoint.create && !result.skipped) zipCheckpoint = { domain, name: result.checkpoint.name };
      // Logged here, before the log file is closed, so the set's log ends with the outcome.
      if (writesSet && !result.skipped) {
        for (const d of result.disks) log.info(`disk ${d.disk}: ${d.dataSize} bytes of data saved to ${d.file}`);
        log.info(`finished ${result.level} backup${result.checkpoint.create ? `, checkpoint ${result.checkpoint.name}` : ''}`);
      }
      return result;
    } catch (err) {
      throw (await stoppedDomainError(domain, power, options.domain, err, toZip || !writesSet ? undefined : stateDir)) ?? err;
    } finally {
      await power.finish();
    }
  } catch (err) {
    const failure = (conn && (await lostConnectionError(conn, uri, err,
      `end the backup job it may have left with 'virtnbdbackup -d ${options.domain} -k' and run a full backup into a new directory`))) ?? err;
    // The set's log ends with why the run failed, as Python's does; the command prints it on the console.
    log.toFile('error', oneLine(failure));
    throw failure;
  } finally {
    try {
      if (toZip && writesSet) {
        await finishZip(target as ZipTarget, succeeded, path.join(stateDir, logName), logName, log).catch(async (err: unknown) => {
          // Stopped (a signal) or failed as the archive's end was written, after "finished": no whole zip holds the
          // run's checkpoint, which is removed as a failed run's is, its changes merged into its parent's bitmap.
          if (zipCheckpoint) await dropZipCheckpoint(zipCheckpoint.domain, zipCheckpoint.name, log);
          throw err;
        });
        // Only now, the archive whole: the state dir lists the checkpoint.
        if (succeeded) for (const record of afterZip) await record();
      }
    } finally {
      // Closed after the zip's end: a checkpoint to remove needs it.
      await conn?.close().catch(() => undefined);
      await log.detachFile();
    }
  }
}

/**
 * Removes the checkpoint of a zip run whose archive did not end whole; one that cannot be removed is a warning (the
 * next inc removes it, as it does one left by a run killed there).
 */
async function dropZipCheckpoint(domain: LibvirtDomain, name: string, log: Logger): Promise<void> {
  try {
    await deleteCheckpoint(domain, name, log);
    log.info(`removed checkpoint ${name}: the zip holding it did not end whole, so the chain goes on from its parent`);
  } catch (err) {
    log.warn(`could not remove checkpoint ${name} of the unfinished zip: ${oneLine(err)}; the next inc removes it`);
  }
}

/**
 * Creates the run's log in `dir`, empty, and names it: `backup.<level>.<time>.log` (`auto` for -l auto), or where a run of that level
 * began in the same second (a diff then refused for its name, another domain's zip from the same directory), a log
 * of its own after that one, which is never appended to. A log that cannot be created is named all the same: the
 * logger says it cannot write it.
 */
async function createLogFile(dir: string, level: Level | 'auto', when: Date): Promise<string> {
  for (let run = 1; ; run++) {
    const name = logFileName(level, when, run);
    const taken = await fs.open(path.join(dir, name), 'wx').then((handle) => handle.close().then(() => false), (err: unknown) => errnoOf(err) === 'EEXIST');
    if (!taken) return name;
  }
}

/**
 * `err` restated when the domain that ran at the start is no longer running: its QEMU, which served the export,
 * is gone, and libnbd's words ("server disconnected unexpectedly") do not say why. Undefined otherwise. The run's
 * checkpoint is gone with it, so the set (`set`, not for a zip) goes on from its last complete backup once this
 * run's .partial files are out of it.
 */
async function stoppedDomainError(domain: LibvirtDomain, power: DomainPower, name: string, err: unknown, set?: string): Promise<UserError | undefined> {
  if (power.offline || (await domain.isActive().catch(() => true))) return undefined;
  const again = set
    ? `move this run's .partial files out of ${set} and back it up again once it runs (an inc goes on from the set's last complete backup; shut off, a full is a copy and an inc a diff)`
    : 'back it up again once it runs (shut off, a full is a copy and an inc a diff)';
  return new UserError(`domain '${name}' stopped during the backup (${oneLine(err)}); ${again}`);
}

/** A zip ends with the run's log; a failed run's archive is left invalid on purpose. */
async function finishZip(zip: ZipTarget, succeeded: boolean, logFile: string, logName: string, log: Logger): Promise<void> {
  if (!succeeded) {
    await zip.abort();
    return;
  }
  await log.detachFile();
  await zip.writeFile(logName, await fs.readFile(logFile));
  await zip.close();
}

/**
 * Marks a shut-off domain's optional disks (startupPolicy='optional') whose image is gone: libvirt starts the domain
 * without them, so selectDisks leaves them out, as a running domain's backup does, where qemu-img failed on them or
 * an inc said to run with -S, which would not have saved them either (found by a black-box round).
 */
async function markMissingImages(disks: DomainDisk[], host: DomainHost): Promise<void> {
  for (const disk of disks) {
    if (disk.optional && disk.path && !(await host.exists(disk.path))) disk.missing = true;
  }
}

/** Picks the disks: -i/-x, raw disks only with -r and never in inc/diff. */
function chooseDisks(options: BackupOptions, log: Logger, domainDisks: DomainDisk[], level: Level, offline: boolean): DomainDisk[] {
  const incremental = level === 'inc' || level === 'diff';
  if (options.raw && incremental) log.warn('raw disks have no checkpoints: they are left out of inc and diff backups');
  const { disks, skipped } = selectionOf(options, domainDisks, level, offline);
  for (const s of skipped) (s.expected ? log.info : log.warn).call(log, `skipping disk ${s.disk.target}: ${s.reason}`);
  // A mistyped -i (vdz) would else go unnoticed: a warning. -x of a disk the domain lacks is a line of the log:
  // one -x for every domain in a script is common, and -e would fail each domain without that disk.
  const targets = domainDisks.map((d) => d.target);
  for (const [flag, names, say] of [['-i', options.include, log.warn], ['-x', options.exclude, log.info]] as const) {
    for (const name of (names ?? []).filter((n) => !targets.includes(n))) {
      say.call(log, `${flag} ${name}: domain '${options.domain}' has no disk ${name} (its disks: ${targets.join(', ') || 'none'})`);
    }
  }
  for (const d of disks.filter((disk) => disk.encrypted)) {
    log.info(`disk ${d.target} is encrypted in its image: the backup holds its data as the guest reads it, not encrypted; keep the set as safe as the key`);
  }
  if (disks.length === 0) {
    const why = options.include?.length ? ` matching -i ${options.include.join(',')}`
      : options.exclude?.length ? ` but those left out with -x ${options.exclude.join(',')}`
        : skipped.length ? ' that can be backed up (see the lines above)' : '';
    throw new UserError(`domain '${options.domain}' has no disk to back up${why}`);
  }
  return disks;
}

function selectionOf(options: BackupOptions, domainDisks: DomainDisk[], level: Level, offline: boolean): ReturnType<typeof selectDisks> {
  const incremental = level === 'inc' || level === 'diff';
  return selectDisks(domainDisks, { include: options.include, exclude: options.exclude, raw: options.raw && !incremental, rawNotInThisLevel: options.raw && incremental, offline, checkpoints: level !== 'copy' });
}

/**
 * libvirt's identity of the checkpoints this run's streams name (its own, once the job made it, and the parents),
 * recorded in the streams so that restore tells one chain from files of two sets with the same names. One that
 * cannot be read is left out, and the check with it.
 */
async function checkpointIdentities(domain: LibvirtDomain, plan: RunPlan): Promise<Map<string, string>> {
  const names = new Set([plan.checkpoint.create ? plan.checkpoint.name : '', plan.checkpoint.parent ?? '', ...plan.resumedDisks.map((r) => r.from)]);
  const identities = new Map<string, string>();
  for (const name of [...names].filter(Boolean)) {
    const identity = await domain.checkpointGetXMLDesc(name, 0).then(checkpointIdentity, () => '');
    if (identity.trim()) identities.set(name, identity);
  }
  return identities;
}

function identOf(plan: RunPlan, startedAt: Date): string {
  if (plan.level === 'copy') return 'copy';
  return plan.level === 'diff' ? String(Math.floor(startedAt.getTime() / 1000)) : plan.checkpoint.name;
}

async function runBackup(ctx: RunContext, requested: Level): Promise<BackupResult> {
  const { options, log, power } = ctx;
  // A run that died held this lock a moment ago: its guard may be ending its job right now.
  const deadRun = tookOverFromDeadRun(domainLockFile(options.domain, ctx.host.remote ? ctx.host.hostname : undefined)) ? { waitMs: DEAD_RUN_JOB_WAIT_MS, log, signal: options.signal } : undefined;
  if (!power.offline) await refuseActiveJob(ctx.domain, deadRun);
  if (options.tls && !ctx.host.remote) {
    log.warn(`--tls: domain '${options.domain}' runs on this host, whose backup job serves through a unix socket: no TLS needed, none used`);
  }
  // Python's tool ignores them here without a word; a -P meant to keep two backups apart went unnoticed.
  const remoteOnly = ([['-I', options.nbdHost], ['-P', options.nbdPort], ['--ssh-user', options.sshUser]] as const).filter(([, value]) => value !== undefined).map(([flag]) => flag);
  if (remoteOnly.length > 0 && !ctx.host.remote) {
    log.warn(`${remoteOnly.join(', ')}: domain '${options.domain}' runs on this host, whose backup job serves through a unix socket (-f): ${remoteOnly.length > 1 ? 'they apply' : 'it applies'} to domains of another host (-U qemu+ssh://user@host/system) only, and ${remoteOnly.length > 1 ? 'are' : 'is'} ignored`);
  }
  const tls = ctx.host.remote ? tcpServerOn(ctx.host, options).tlsCertificates : undefined;
  if (tls) await checkTlsClientFiles(tls);
  if (power.offline && options.startOnly) {
    const notHere = options.startDomain ? ' (virsh start: -S would stop the domain again as the run ends, and the job with it)' : '';
    throw new UserError(`domain '${options.domain}' is shut off: -s leaves a backup job running, which needs a running domain; start it first${notHere}`);
  }
  if (power.offline) await markMissingImages(ctx.info.disks, ctx.host);
  ctx.disks = chooseDisks(options, log, ctx.info.disks, requested, power.offline);
  // libvirt refuses the job only after a full has removed the old chain's checkpoints ("has a blockjob assigned").
  const mirrored = power.offline || options.printOnly ? undefined : ctx.disks.find((d) => d.mirror !== undefined);
  if (mirrored) {
    const what = mirrored.mirror === 'active-commit' ? 'a commit of its overlay (virsh blockcommit --active)' : mirrored.mirror === 'copy' ? 'a copy to another image (virsh blockcopy)' : `a ${mirrored.mirror} job`;
    throw new UserError(`disk ${mirrored.target} of '${options.domain}' has a block job running, ${what}: libvirt starts no backup job while it runs; end it (virsh blockjob ${options.domain} ${mirrored.target} --pivot, or --abort) and run again`);
  }
  // QEMU decrypts with the key libvirt gives it; our qemu-nbd has none, and failed with QEMU's words on a parameter.
  const encrypted = power.offline ? ctx.disks.find((d) => d.encrypted) : undefined;
  if (encrypted) {
    throw new UserError(`disk ${encrypted.target} of '${options.domain}' is encrypted in its image, with a key libvirt keeps for QEMU: a shut-off domain's images are read without it; back it up ${power.runningAdvice}, or leave the disk out with -x ${encrypted.target}`);
  }
  let level = requested;
  if (level === 'full' && ctx.disks.every((d) => d.format === 'raw')) {
    log.info('only raw disks selected: they cannot carry checkpoints, switching to level copy');
    level = 'copy';
  }
  // The scratch directory's first look (a directory there at all, on another host too; free space enough) needs no
  // plan: made here, an inc that was to fall back to a full had moved the chain aside before it was refused. The run
  // owns it until it ends (a watch's stop closes it too; closing twice is harmless).
  const scratch = power.offline || options.printOnly ? undefined : await openScratchSpace(ctx.host, scratchDirOf(options), options.domain, log);
  try {
    // Before the plan, which may move a chain aside (an inc that falls back to a full) or remove checkpoints a run
    // that did not finish left, and the job's start, before which a full removes the old chain's checkpoints.
    if (!power.offline && !ctx.host.remote && !options.printOnly) await checkJobPaths(ctx);
    return await planAndSave(ctx, level, scratch);
  } finally {
    scratch?.close();
  }
}

/** Plans the run, then -p, -T, and the backup itself with the scratch space looked at before the plan. */
async function planAndSave(ctx: RunContext, level: Level, scratch: ScratchSpace | undefined): Promise<BackupResult> {
  const { options, log } = ctx;
  const plan = await planRun(ctx, level);
  const base = resultOf(ctx, plan);
  if (options.printOnly) return { ...base, estimate: await estimate(ctx, plan) };
  const unestimated = [...plan.addedDisks, ...plan.resumedDisks.map((r) => r.target)];
  if (options.threshold !== undefined && plan.checkpoint.parent && unestimated.length > 0) {
    log.info(`-T: the changes of disk ${unestimated.join(', ')} are not in libvirt's estimate (added, or left out of the backups since ${plan.checkpoint.parent}): backing up whatever changed`);
  } else if (options.threshold !== undefined && plan.checkpoint.parent) {
    const changed = await thresholdEstimate(ctx, plan);
    if (changed !== undefined && changed < options.threshold) {
      log.info(`${changed} bytes changed since ${plan.checkpoint.parent}, below the threshold of ${options.threshold} bytes (-T): no backup this time`);
      return { ...base, estimate: changed, skipped: true };
    }
  }
  if (plan.level === 'diff' && !ctx.toZip) await refuseTakenDiffName(ctx, plan);
  options.signal?.throwIfAborted();
  return exportAndSave(ctx, plan, scratch);
}

/**
 * A diff is named by the second it starts in, as Python's are: one begun in the same second as the last would meet
 * that one's file only after all its reads. Refused before the job instead.
 */
async function refuseTakenDiffName(ctx: RunContext, plan: RunPlan): Promise<void> {
  const ident = identOf(plan, ctx.startedAt);
  for (const disk of ctx.disks) {
    const file = dataFileName(disk.target, 'diff', ident);
    if (await exists(path.join(ctx.stateDir, file))) {
      throw new UserError(`${file} is already in ${ctx.stateDir}: a diff is named by the second it starts in, and another one began in this second; run again a second later`);
    }
  }
}

/** What a result of `plan` says whatever the run did: no disks yet. */
function resultOf(ctx: RunContext, plan: RunPlan): BackupResult {
  return { level: plan.level, checkpoint: plan.checkpoint, disks: [], offline: ctx.power.offline, archivedChain: plan.archivedChain };
}

async function estimate(ctx: RunContext, plan: RunPlan): Promise<number> {
  if (ctx.power.offline) {
    throw new UserError(`domain '${ctx.options.domain}' is shut off: libvirt estimates sizes only with QEMU running; run ${ctx.power.runningAdvice}`);
  }
  // libvirt counts changes on the disks the checkpoint has bitmaps on; an added disk goes whole into the next inc.
  for (const target of plan.addedDisks) ctx.log.info(`disk ${target} was added since ${plan.checkpoint.parent}: the next inc saves it whole, which this estimate leaves out`);
  for (const { target, from } of plan.resumedDisks) ctx.log.info(`disk ${target} was left out of the backups after ${from}: the next inc saves its changes since then, which this estimate leaves out`);
  return changedBytesSince(ctx.domain, plan.checkpoint.parent, ctx.info.disks.map((d) => d.target).filter((t) => !plan.emptyDisks.includes(t)));
}

/** The estimate for -T, or undefined when none can be made (shut-off domain, broken checkpoint). */
async function thresholdEstimate(ctx: RunContext, plan: RunPlan): Promise<number | undefined> {
  if (ctx.power.offline) {
    ctx.log.info('-T: no size estimate for a shut-off domain (libvirt needs QEMU for it): backing up');
    return undefined;
  }
  return changedBytesSince(ctx.domain, plan.checkpoint.parent, ctx.info.disks.map((d) => d.target).filter((t) => !plan.emptyDisks.includes(t))).catch((err: unknown) => {
    ctx.log.info(`-T: no size estimate (${oneLine(err)}): backing up`);
    return undefined;
  });
}

/**
 * Refuses a job on this host whose socket (-f) or scratch directory QEMU could not create files in: the socket's
 * directory not there, or either not writable by QEMU's user (a scratch directory that is not there is
 * openScratchSpace's refusal). The job's start failed on them only after a full had removed the old chain's
 * checkpoints, and the earlier set could not go on.
 */
async function checkJobPaths(ctx: RunContext): Promise<void> {
  const { options, log } = ctx;
  const socket = socketOf(options);
  await checkSocketPath(socket);
  // A directory: openScratchSpace, just before, refused anything else.
  const scratch = scratchDirOf(options);
  const who = await qemuUserOf(options.domain, ctx.vmXml, options.uri ?? DEFAULT_LIBVIRT_URI);
  if (!who) {
    log.debug(`cannot tell which user QEMU of '${options.domain}' runs as: not checked whether it may write to ${path.dirname(socket)} and ${scratch}`);
    return;
  }
  log.debug(`QEMU of '${options.domain}' runs as uid ${who.uid}, gid ${who.gid}, groups ${who.groups.join(',') || 'none'} (${who.source})`);
  await checkQemuMayWrite(path.dirname(socket), who, 'the directory of the NBD socket (-f)', 'give -f a path in a directory it may write to, such as /var/tmp (the default)', log);
  await checkQemuMayWrite(scratch, who, 'the scratch directory (--scratchdir)', 'give --scratchdir a directory it may write to, such as /var/tmp (the default)', log);
}

/**
 * Starts the libvirt backup job for `plan`; a full first removes this chain's old checkpoints, then the bitmaps of
 * the chain's names its images hold without a checkpoint.
 */
async function startJob(ctx: RunContext, plan: RunPlan, guard?: JobGuard): Promise<BackupJob> {
  const { domain, disks, log, options } = ctx;
  if (plan.level === 'full' && plan.checkpoint.create) {
    await removeChain(domain, plan.prefix, log);
    await clearChainOrphans(domain, plan.prefix, await listedBitmaps(ctx), ctx.info.disks.map((d) => d.target), log);
  }
  // The guard hears of a guest held, so that a run killed meanwhile does not leave it paused or frozen.
  const frozen = (held: boolean): void => guard?.guestHeld('frozen', held);
  const paused = (held: boolean): void => guard?.guestHeld('paused', held);
  return ctx.power.whileFrozen(ctx.info.guestAgent, options.freezeMountpoints, () => ctx.power.whilePaused(options.pause ?? false, () => BackupJob.start(domain, {
    server: serverOf(ctx),
    scratchDir: scratchDirOf(options),
    targets: disks.map((d) => d.target),
    wholeTargets: [...plan.addedDisks, ...plan.emptyDisks],
    resumedTargets: plan.resumedDisks,
    checkpointTargets: disks.filter((d) => d.format !== 'raw').map((d) => d.target),
    allTargets: ctx.info.disks.map((d) => d.target),
    checkpoint: plan.checkpoint,
    log,
    hooks: guard,
  }), paused), frozen);
}

/**
 * The bitmaps each qcow2 image of the domain lists (`qemu-img info`), by disk target; a disk whose image cannot be
 * read is left out with a debug line. A running QEMU writes the bitmaps it made into the image only when it closes
 * it: those made since it started are not listed (a job's start still clears one in the way, see openExports).
 */
async function listedBitmaps(ctx: RunContext): Promise<Map<string, string[]>> {
  const listed = new Map<string, string[]>();
  for (const disk of ctx.info.disks.filter((d) => d.format === 'qcow2' && d.path && d.type !== 'network' && !d.missing)) {
    try {
      listed.set(disk.target, imageBitmaps(await imageInfoJson(ctx, disk)).map((b) => b.name));
    } catch (err) {
      ctx.log.debug(`bitmaps of disk ${disk.target} not looked at: ${oneLine(err)}`);
    }
  }
  return listed;
}

/**
 * Disks copied at once without -w (virtnbdbackup: all). They share one window of reads ahead, and here more did
 * not copy sooner: 8 disks of 384 MiB took 4.8 to 6.0 s with -w 1, 4 or 8, at a peak RSS of 121, 159 to 167 and
 * 168 to 172 MB.
 */
const DEFAULT_MAX_WORKERS = 4;

/** A relative --scratchdir is the working directory's, as -f is: libvirt refused it ("failed to validate against schema"). */
function scratchDirOf(options: BackupOptions): string {
  return path.resolve(options.scratchDir ?? '/var/tmp');
}

function socketOf(options: BackupOptions): string {
  return options.socketFile ? path.resolve(options.socketFile) : `/var/tmp/virtnbdbackup.${process.pid}`;
}


/** Where the job serves: the socket here, or a TCP address on a domain's remote host (-I, -P), with --tls TLS. */
function serverOf(ctx: RunContext): JobServer {
  return ctx.host.remote ? tcpServerOn(ctx.host, ctx.options) : { socket: socketOf(ctx.options) };
}

/** Where a shut-off domain's images are served: sockets here, or qemu-nbd on its remote host at -I/-P (through ssh). */
function offlineServing(ctx: RunContext): OfflineServing {
  if (!ctx.host.remote) return { socketBase: socketOf(ctx.options) };
  const { host, port, tlsCertificates } = tcpServerOn(ctx.host, ctx.options);
  return { ssh: ctx.host, host, firstPort: port, tlsCertificates };
}

/** What to do about a job refused on a domain's remote host: a port in use, an address it lacks, or TLS the host is not set up for. */
function jobStartHint(server: JobServer, err: unknown): string {
  // A block job without a mirror in the domain XML (blockpull, commit) is found by libvirt alone.
  if (/has a blockjob assigned/i.test(oneLine(err))) return '; end the disk\'s block job first (virsh blockjob DOMAIN DISK --info shows it; --abort ends it), then run again';
  if ('socket' in server) return '';
  if (/address already in use/i.test(oneLine(err))) return `; port ${server.port} on ${server.host} is taken (another backup?): choose another with -P`;
  // -I (default: the URI's host name) names an address of that host as seen from here, which it may not have (NAT).
  if (/cannot assign requested address/i.test(oneLine(err))) return `; ${server.host} is no address of the domain's host: give one of its own with -I`;
  if (server.tlsCertificates && /tls|x509|certificate|pki/i.test(oneLine(err))) {
    return `; --tls needs the host's libvirt to serve TLS: ca-cert.pem, server-cert.pem and server-key.pem in its backup_tls_x509_cert_dir (qemu.conf; default ${DEFAULT_TLS_CERT_DIR})`;
  }
  return '';
}

/**
 * QEMU refuses a checkpoint on a qcow2 v2 image naming a block node ("libvirt-60-format"), not the disk: the disks
 * whose images are v2 (compat 0.10), and the ways out.
 */
async function oldQcowHint(ctx: RunContext, err: unknown): Promise<string> {
  if (!/Cannot store dirty bitmaps in qcow2 v2/i.test(oneLine(err))) return '';
  const old: DomainDisk[] = [];
  for (const disk of ctx.disks.filter((d) => d.format === 'qcow2' && d.path)) {
    const info = await imageInfoJson(ctx, disk).then((json) => JSON.parse(json) as { 'format-specific'?: { data?: { compat?: string } } }, () => undefined);
    if (info?.['format-specific']?.data?.compat === '0.10') old.push(disk);
  }
  const named = old.length > 0 ? `disk ${old.map((d) => `${d.target} (${d.path})`).join(', ')} is` : 'a disk is';
  const exclude = old.length > 0 ? ` -x ${old.map((d) => d.target).join(',')}` : ' -x';
  return `; ${named} a qcow2 v2 image (compat 0.10), which cannot hold checkpoint bitmaps: upgrade it with 'qemu-img amend -o compat=1.1 IMAGE' while the domain is shut off, leave it out with${exclude}, or back up with -l copy`;
}

function describeServer(server: JobServer): string {
  return 'socket' in server ? server.socket : nbdUri(server, '').replace(/\/$/, '');
}

/**
 * Exports the disks for `plan`: qemu-nbd for a shut-off domain, else a backup job, whose scratch space (`looked`)
 * was looked at before the plan. A job refused for a lost bitmap falls back to a full backup; one refused for a
 * bitmap left without its checkpoint clears it and retries.
 */
async function openExports(ctx: RunContext, initial: RunPlan, looked: ScratchSpace | undefined, guard?: JobGuard): Promise<{ exports: DiskExports; plan: RunPlan; scratch?: ScratchSpace }> {
  const { options } = ctx;
  if (!ctx.host.remote) await clearSocketPath(socketOf(options));
  if (ctx.power.offline) return { exports: await OfflineExports.start(ctx.disks, offlineServing(ctx), initial.checkpoint.parent, initial.emptyDisks), plan: initial };
  let scratch = looked;
  if (options.startOnly) {
    // A job left running (-s) is not watched: its scratch space is looked at once, here.
    scratch?.close();
    scratch = undefined;
  }
  try {
    let plan = options.startOnly ? { ...initial, checkpoint: { ...initial.checkpoint, create: false } } : initial;
    for (let attempt = 1; ; attempt++) {
      try {
        return { exports: await startJob(ctx, plan, guard), plan, scratch };
      } catch (err) {
        const orphan = existingBitmapName(err);
        if (attempt < 3 && plan.checkpoint.parent && isLostBitmapError(err)) {
          plan = await fallBackToFull(ctx, plan.prefix, `the bitmap of checkpoint ${plan.checkpoint.parent} is missing or broken in the disk images (${oneLine(err)})`);
        } else if (attempt < 3 && orphan) {
          await clearOrphanBitmap(ctx.domain, orphan, ctx.disks.filter((d) => d.format !== 'raw').map((d) => d.target), ctx.info.disks.map((d) => d.target), ctx.log);
        } else {
          const server = serverOf(ctx);
          throw new UserError(`cannot start the backup job of '${options.domain}': ${oneLine(err)}${jobStartHint(server, err)}${await oldQcowHint(ctx, err)}`);
        }
      }
    }
  } catch (err) {
    scratch?.close();
    throw err;
  }
}

async function exportAndSave(ctx: RunContext, initial: RunPlan, looked: ScratchSpace | undefined): Promise<BackupResult> {
  const { options, log } = ctx;
  // The job's guard is spawned here, before a guest is frozen or paused for the job's begin (its spawn holds the event
  // loop 8 to 15 ms), and told of each begin. It is released once the job is ended, or, with -s, once it has begun.
  const guard: JobGuard | undefined = ctx.power.offline ? undefined
    : guardJob(options.uri ?? DEFAULT_LIBVIRT_URI, options.domain, ctx.host.remote ? undefined : socketOf(options), options.login);
  let opened: Awaited<ReturnType<typeof openExports>>;
  try {
    opened = await openExports(ctx, initial, looked, guard);
  } catch (err) {
    await guard?.release();
    throw err;
  }
  const { exports, plan, scratch: scratchSpace } = opened;
  // Read after the job's start: a fallback to a full there adds the raw disks (-r).
  const { disks } = ctx;
  const base = resultOf(ctx, plan);
  if (options.startOnly) {
    await guard?.release();
    const server = describeServer(serverOf(ctx));
    log.info(`backup job of '${options.domain}' started and left running: NBD server ${server}, exports ${disks.map((d) => d.target).join(', ')}; end it with -k${ctx.power.offline ? '' : ` (until then, guest writes keep their old data in ${scratchLocation(ctx.host, scratchDirOf(options))}, which nothing watches for space)`}`);
    return { ...base, startedJob: { server, exports: disks.map((d) => d.target) } };
  }
  const ident = identOf(plan, ctx.startedAt);
  const identities = await checkpointIdentities(ctx.domain, plan);
  // qemu-img's spawn holds the event loop for about 5 ms: it starts once the first disk's reads are under way (after
  // the microtasks that issue them), not before them. The images look then as they will when the data is in.
  let imageInfo: Promise<ImageInfo[]> | undefined;
  const onReading = (): void => {
    if (!imageInfo) imageInfo = new Promise((resolve) => setImmediate(resolve)).then(() => readImageInfo(ctx));
  };
  log.info(`${plan.level} backup of ${options.domain} (${disks.map((d) => d.target).join(', ')}) into ${ctx.toZip ? `a zip on standard output (checkpoints in ${ctx.stateDir})` : ctx.stateDir}, checkpoint ${plan.checkpoint.create ? plan.checkpoint.name : 'none'}${plan.checkpoint.parent ? `, changes since ${plan.checkpoint.parent}` : ''}`);
  let failed = true;
  const controller = new AbortController();
  let scratch: ScratchWatch | undefined;
  const results: DiskResult[] = [];
  try {
    if (scratchSpace) {
      const output = ctx.toZip || ctx.host.remote ? undefined : ctx.stateDir;
      scratch = watchScratch(scratchSpace, scratchDirOf(options), options.domain, output, log, (err) => controller.abort(err));
    }
    const signal = options.signal ? AbortSignal.any([options.signal, controller.signal]) : controller.signal;
    // A stopped run ends its job at once, not once the copy has unwound: a zip's reader that stalls would keep the
    // job (and the scratch file system's growth) going until it read on, a scratch directory filling up to the end.
    signal.addEventListener('abort', () => {
      exports.release().catch(() => undefined);
      ctx.target.interrupt?.(signal.reason);
    }, { once: true });
    const workers = ctx.toZip ? 1 : options.workers ?? Math.min(disks.length, DEFAULT_MAX_WORKERS);
    const disksAtOnce = Math.min(disks.length, workers);
    const connections = Math.max(1, Math.ceil(4 / disksAtOnce));
    log.debug(`copying ${disks.length} disk(s), ${disksAtOnce} at a time, ${connections} NBD connection(s) each`);
    // The job ends as soon as every disk is read: its teardown (10 to 20 ms here) then overlaps the last writes,
    // their flush and the side files. end() below waits for it and reports a failure of it.
    let unread = disks.length;
    const onSourceRead = (): void => {
      if (--unread === 0) exports.release().catch(() => undefined);
    };
    await forEachLimited(disks, workers, async (disk) => {
      try {
        results.push(await backupDisk(disk, {
          plan, ident, identities, exports, offline: ctx.power.offline, target: ctx.target, connections, disksAtOnce, type: options.type, compress: options.compress ?? false,
          qemuExtents: options.qemuExtents, noSparseDetection: options.noSparseDetection, nbdTimeout: options.nbdTimeout, progress: options.progress, onReading, onSourceRead,
          signal, log,
        }));
      } catch (err) {
        // Once stopped, reads fail as the job ends under them: the reason to tell is the stop's.
        if (signal.aborted) throw signal.reason;
        // A hung QEMU holds the job's end too (libvirt asks it): said now, not once it answers again.
        if (err instanceof NbdStalled) log.info(`${err.message}; ending the backup job, which waits until libvirt and the domain's QEMU answer (Ctrl-C twice stops at once, leaving the job to the run's guard)`);
        controller.abort(err);
        throw err;
      }
    });
    signal.throwIfAborted();
    await ctx.target.publish?.().catch((err: unknown) => {
      // Named as a failure of the disk whose file it was (a rename's error names the .partial as its path).
      const partial = (err as NodeJS.ErrnoException).path;
      const result = results.find((r) => `${ctx.target.pathOf(r.file)}.partial` === partial);
      const disk = result && disks.find((d) => d.target === result.disk);
      throw disk && partial ? writeFailure(disk, partial, err) : err;
    });
    await saveSideFiles(ctx, plan, ident, imageInfo ?? readImageInfo(ctx));
    failed = false;
    return { ...base, disks: results.sort((a, b) => a.disk.localeCompare(b.disk)) };
  } finally {
    scratch?.stop();
    try {
      await exports.end(failed);
    } finally {
      await guard?.release();
      if (failed && !ctx.toZip) await setAsideFinished(ctx, results);
    }
    // The reads failed for it, in libnbd's words ("Transport endpoint is not connected"), which did not say why.
    if (failed && exports.endedElsewhere && !options.signal?.aborted) {
      throw new UserError(`the backup job of '${options.domain}' was ended by another program in mid-backup (virtnbdbackup -k, or virsh domjobabort); this run's checkpoint is removed: back it up again${ctx.toZip ? '' : ` once its .partial files are out of ${ctx.stateDir}`}`);
    }
  }
}

/**
 * A failed run's data files that did finish, with their checksums and digests, are renamed back to .partial where
 * they were published (a failure after publish; else they still are): its checkpoint is gone, so they belong to no
 * chain, and the next inc would make the same names. As .partial, the set's checks say what to do with them.
 */
async function setAsideFinished(ctx: RunContext, results: DiskResult[]): Promise<void> {
  for (const { file } of results) {
    const final = ctx.target.pathOf(file);
    const partial = `${final}.partial`;
    try {
      const held = await exists(partial);
      const published = !held && (await exists(final));
      if (!held && !published) continue; // gone (the set directory removed)
      if (published) await fs.rename(final, partial);
      // Under their names they would stop the next inc, which writes them again; as .partial, as those held back.
      for (const side of [checksumFileName, digestFileName]) {
        if ((await exists(side(final))) && !(await exists(`${side(final)}.partial`))) await fs.rename(side(final), `${side(final)}.partial`);
      }
      ctx.log.info(`${published ? `renamed ${file} to` : `${file} stays`} ${path.basename(partial)}: the run failed, so it belongs to no chain`);
    } catch (err) {
      ctx.log.warn(`could not set ${final} aside as ${path.basename(partial)} after the run failed: ${describeFailure(err)}; move it and its .chksum and .blake3.json out of the set before the next inc`);
    }
  }
}
