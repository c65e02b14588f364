// Backs up a running domain into a backup set: checks the set, plans the checkpoint, starts a pull-mode backup
// job, streams every selected disk from the job's NBD export, then saves the set's side files.
//   check set -> plan checkpoint -> begin job -> per disk (parallel): plan extents, write stream, commit
//   -> qcow.json, vmconfig, checkpoint XML, .cpt (last: it admits the run to the chain) -> end job
// Guarantees: the job is always ended and its socket and scratch files removed; a failed run leaves no
// checkpoint of its own in libvirt and no entry in .cpt, and its unfinished files stay as .partial.
import fs from 'node:fs/promises';
import path from 'node:path';
import { NbdEndpoint } from '../endpoint/nbd.js';
import { CONTEXT_ALLOCATION } from '../endpoint/endpoint.js';
import { planDirty, planFull } from '../extents/plan.js';
import { writeStream } from '../stream/writer.js';
import { DirectoryTarget, type OutputTarget } from '../set/target.js';
import { ZipTarget } from '../set/zipTarget.js';
import { writeRawImage } from './rawImage.js';
import {
  CHECKPOINT_DIR, checkpointListName, checksumFileName, dataFileName, digestFileName, listSet, logFileName, qcowInfoName,
  readCheckpointList, vmConfigName,
} from '../set/backupSet.js';
import { DEFAULT_PREFIX, dirtyBitmapContext, planCheckpoint, type CheckpointPlan, type Level } from '../libvirt/checkpoints.js';
import { parseDomainXml, selectDisks, type DomainDisk } from '../libvirt/domainXml.js';
import { BackupJob } from '../libvirt/backupJob.js';
import { lookupDomain, openLibvirt } from '../libvirt/connection.js';
import { VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE, type LibvirtDomain } from '../native/addon.js';
import { Logger, silentLogger } from '../util/log.js';
import { UserError, describeFailure, oneLine } from '../util/errors.js';
import { run } from '../util/process.js';

export interface BackupOptions {
  domain: string;
  /** libvirt URI, default qemu:///system. */
  uri?: string;
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
  /** NBD socket of the job; default /var/tmp/virtnbdbackup.<pid>. */
  socketFile?: string;
  /** Where QEMU puts scratch files; must be writable by QEMU's user. */
  scratchDir?: string;
  /** Disks backed up at the same time; default all. */
  workers?: number;
  /** lz4 level or false. */
  compress?: number | false;
  log?: Logger;
  /** Called once per disk with its total data bytes; returns the per-chunk progress callback. */
  progress?: (disk: string, total: number) => (bytes: number) => void;
  signal?: AbortSignal;
}

export interface DiskResult {
  disk: string;
  file: string;
  dataSize: number;
  virtualSize: number;
  bytesWritten: number;
}

export interface BackupResult {
  level: Level;
  checkpoint: CheckpointPlan;
  disks: DiskResult[];
}

/** Level `auto`: full when the set has no full backup yet (for a zip: no chain in the state dir), else inc. */
async function resolveLevel(level: Level | 'auto', stateDir: string, toZip: boolean, domain: string): Promise<Level> {
  if (level !== 'auto') return level;
  if (toZip) return (await readCheckpointList(path.join(stateDir, checkpointListName(domain)))).length > 0 ? 'inc' : 'full';
  const names = await fs.readdir(stateDir).catch(() => [] as string[]);
  return names.some((n) => n.endsWith('.full.data')) ? 'inc' : 'full';
}

/** Refuses combinations of options that cannot work, before anything is touched. */
function checkOptions(options: BackupOptions, level: Level, toZip: boolean): void {
  if (options.type === 'raw' && (level === 'inc' || level === 'diff')) {
    throw new UserError(`-t raw writes full images only; use it with -l full or -l copy (got -l ${level})`);
  }
  if (toZip && options.type === 'raw') throw new UserError('-t raw cannot be written to standard output (-o -); give an output directory');
  if (toZip && options.raw) throw new UserError('raw disks (-r) cannot be written to standard output (-o -); give an output directory');
}

/** Refuses what would damage the set or produce an unusable run. */
async function checkSet(output: string, level: Level): Promise<void> {
  await fs.mkdir(output, { recursive: true }).catch((err: NodeJS.ErrnoException) => {
    throw new UserError(`cannot create output directory ${output}: ${err.code ?? err.message}`);
  });
  const listing = await listSet(output);
  if (level === 'full' || level === 'copy') {
    const existing = [...listing.dataFiles.map((d) => d.file), ...listing.partials.filter((p) => p.includes('.data'))];
    if (existing.length > 0) {
      throw new UserError(`output directory ${output} already holds a backup (${existing[0]}); use an empty directory for a ${level} backup, or -l inc/auto to continue its chain`);
    }
    return;
  }
  if (!listing.dataFiles.some((d) => d.level === 'full')) {
    throw new UserError(`no full backup in ${output}: an ${level} backup needs one; run with -l full (or -l auto) first`);
  }
  if (listing.partials.length > 0) {
    throw new UserError(`${path.join(output, listing.partials[0] as string)} is left from a failed run, so the chain in ${output} is incomplete; start a new set with -l full in an empty directory`);
  }
}

/** Puts back checkpoints libvirt lost (domain redefined, host moved) from the set's saved XML. */
async function redefineMissing(domain: LibvirtDomain, chain: string[], output: string, log: Logger): Promise<void> {
  const present = new Set(await domain.listCheckpointNames());
  for (const name of chain) {
    if (present.has(name)) continue;
    const file = path.join(output, CHECKPOINT_DIR, `${name}.xml`);
    const xml = await fs.readFile(file, 'utf8').catch(() => undefined);
    if (xml === undefined) continue;
    try {
      await domain.checkpointCreateXML(xml, VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE);
      log.info(`redefined checkpoint ${name} from ${file}`);
    } catch (err) {
      log.warn(`could not redefine checkpoint ${name} from ${file}: ${oneLine(err)}`);
    }
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

export async function backup(options: BackupOptions): Promise<BackupResult> {
  const log = options.log ?? silentLogger;
  const uri = options.uri ?? 'qemu:///system';
  const toZip = options.output === '-';
  // The state dir holds the chain (.cpt, checkpoints/): the set itself, or for a zip the current directory.
  const output = toZip ? process.cwd() : path.resolve(options.output);
  let level = await resolveLevel(options.level, output, toZip, options.domain);
  checkOptions(options, level, toZip);
  if (!toZip) await checkSet(output, level);
  const state = new DirectoryTarget(output);
  const target: OutputTarget = toZip ? new ZipTarget(options.stdout ?? process.stdout) : state;
  const started = new Date();
  const logName = logFileName(level, started);
  log.attachFile(state.pathOf(logName));
  let targetClosed = false;

  const conn = await openLibvirt(uri);
  try {
    const domain = await lookupDomain(conn, options.domain, uri);
    if (!(await domain.isActive())) {
      throw new UserError(`domain '${options.domain}' is not running; start it, then back it up (offline backups are not supported yet)`);
    }
    const job = await domain.getJobType();
    if (job.type !== 0) {
      throw new UserError(`domain '${options.domain}' already has an active job (type ${job.type}); wait for it or end it with 'virsh domjobabort ${options.domain}'`);
    }
    const vmXml = await domain.getXMLDesc(0);
    const info = parseDomainXml(vmXml);
    const incremental = level === 'inc' || level === 'diff';
    if (options.raw && incremental) log.warn('raw disks have no checkpoints: they are left out of inc and diff backups');
    const { disks, skipped } = selectDisks(info.disks, { include: options.include, exclude: options.exclude, raw: options.raw && !incremental });
    for (const s of skipped) log.warn(`skipping disk ${s.disk.target}: ${s.reason}`);
    if (disks.length === 0) throw new UserError(`domain '${options.domain}' has no disk to back up${options.include?.length ? ` matching -i ${options.include.join(',')}` : ''}`);
    if (level === 'full' && disks.every((d) => d.format === 'raw')) {
      log.info('only raw disks selected: they cannot carry checkpoints, switching to level copy');
      level = 'copy';
    }

    const cptFile = state.pathOf(checkpointListName(options.domain));
    const chain = level === 'full' || level === 'copy' ? [] : await readCheckpointList(cptFile);
    let checkpoint: CheckpointPlan;
    try {
      checkpoint = planCheckpoint(level, chain);
    } catch (err) {
      throw new UserError(`${oneLine(err)} (${cptFile} lists none)`);
    }
    const existing = await domain.listCheckpointNames();
    if (level === 'full') {
      for (const name of existing.filter((n) => n.startsWith(`${DEFAULT_PREFIX}.`)).reverse()) {
        await domain.checkpointDelete(name, 0);
        log.info(`removed old checkpoint ${name}: a full backup starts a new chain`);
      }
    } else if (checkpoint.parent) {
      await redefineMissing(domain, chain, output, log);
      if (!(await domain.listCheckpointNames()).includes(checkpoint.parent)) {
        throw new UserError(`checkpoint ${checkpoint.parent} of the set ${output} is missing in libvirt for '${options.domain}'; start a new set with -l full`);
      }
    }
    const ident = level === 'copy' ? 'copy' : level === 'diff' ? String(Math.floor(started.getTime() / 1000)) : checkpoint.name;
    log.info(`${level} backup of ${options.domain} (${disks.map((d) => d.target).join(', ')}) into ${output}, checkpoint ${checkpoint.create ? checkpoint.name : 'none'}${checkpoint.parent ? `, changes since ${checkpoint.parent}` : ''}`);

    const socket = options.socketFile ?? `/var/tmp/virtnbdbackup.${process.pid}`;
    await fs.rm(socket, { force: true });
    let backupJob: BackupJob;
    try {
      backupJob = await BackupJob.start(domain, {
        socket,
        scratchDir: options.scratchDir ?? '/var/tmp',
        targets: disks.map((d) => d.target),
        checkpointTargets: disks.filter((d) => d.format !== 'raw').map((d) => d.target),
        allTargets: info.disks.map((d) => d.target),
        checkpoint,
        log,
      });
    } catch (err) {
      throw new UserError(`cannot start the backup job of '${options.domain}': ${oneLine(err)}`);
    }
    let failed = true;
    try {
      const results: DiskResult[] = [];
      const controller = new AbortController();
      const signal = options.signal ? AbortSignal.any([options.signal, controller.signal]) : controller.signal;
      const workers = toZip ? 1 : options.workers ?? disks.length;
      const perDiskConnections = Math.max(1, Math.ceil(4 / Math.min(disks.length, workers)));
      await forEachLimited(disks, workers, async (disk) => {
        try {
          results.push(await backupDisk(disk, level, ident, checkpoint, socket, target, perDiskConnections, options, signal, log));
        } catch (err) {
          controller.abort(err);
          throw err;
        }
      });
      await saveSideFiles(domain, disks, level, ident, checkpoint, vmXml, target, state, cptFile, chain, log);
      failed = false;
      return { level, checkpoint, disks: results.sort((a, b) => a.disk.localeCompare(b.disk)) };
    } finally {
      await backupJob.end(failed);
      if (!failed && toZip) {
        await log.detachFile();
        await target.writeFile(logName, await fs.readFile(state.pathOf(logName)));
        await target.close();
        targetClosed = true;
      }
    }
  } finally {
    await conn.close().catch(() => undefined);
    await log.detachFile();
    if (!targetClosed && toZip) await (target as ZipTarget).abort();
  }
}

async function backupDisk(
  disk: DomainDisk, level: Level, ident: string, checkpoint: CheckpointPlan, socket: string, target: OutputTarget,
  connections: number, options: BackupOptions, signal: AbortSignal, log: Logger,
): Promise<DiskResult> {
  const diskLevel: Level = disk.format === 'raw' ? 'copy' : level;
  const incremental = diskLevel === 'inc' || diskLevel === 'diff';
  const dirtyContext = dirtyBitmapContext(disk.target);
  const endpoint = await NbdEndpoint.open(
    { socket, exportName: disk.target },
    { metaContexts: incremental ? [CONTEXT_ALLOCATION, dirtyContext] : [CONTEXT_ALLOCATION], connections },
  );
  try {
    const plan = incremental ? await planDirty(endpoint, dirtyContext) : await planFull(endpoint);
    const file = dataFileName(disk.target, diskLevel, ident);
    log.info(`disk ${disk.target}: ${plan.dataSize} bytes of data in ${plan.extents.length} extents of ${endpoint.size} bytes, writing ${file}`);
    const onProgress = options.progress?.(disk.target, plan.dataSize);
    if (options.type === 'raw' && target.createPositional) {
      const image = await target.createPositional(file, endpoint.size);
      try {
        await writeRawImage(endpoint, plan, image, onProgress, signal);
        await image.commit();
      } catch (err) {
        await image.abort();
        if (err instanceof UserError) throw err;
        throw new UserError(`backup of disk ${disk.target} failed writing ${target.pathOf(file)}.partial: ${describeFailure(err)}`);
      }
      return { disk: disk.target, file, dataSize: plan.dataSize, virtualSize: endpoint.size, bytesWritten: endpoint.size };
    }
    const sink = await target.create(file);
    let result;
    try {
      result = await writeStream({
        source: endpoint,
        plan,
        sink,
        meta: {
          date: new Date().toISOString(),
          diskName: disk.target,
          diskFormat: disk.format,
          checkpointName: checkpoint.name,
          parentCheckpoint: checkpoint.parent,
          incremental,
        },
        compress: options.compress ?? false,
        onProgress,
        digests: true,
        signal,
      });
      await sink.commit();
    } catch (err) {
      await sink.abort();
      if (err instanceof UserError) throw err; // an interrupt, or another disk's failure
      throw new UserError(`backup of disk ${disk.target} failed writing ${target.pathOf(file)}.partial: ${describeFailure(err)}`);
    }
    await target.writeFile(checksumFileName(file), String(result.checksum));
    await target.writeFile(digestFileName(file), JSON.stringify({ algorithm: 'sha256', pieces: result.digests ?? [] }));
    return { disk: disk.target, file, dataSize: plan.dataSize, virtualSize: endpoint.size, bytesWritten: result.bytesWritten };
  } finally {
    await endpoint.close();
  }
}

async function saveSideFiles(
  domain: LibvirtDomain, disks: DomainDisk[], level: Level, ident: string, checkpoint: CheckpointPlan, vmXml: string,
  target: OutputTarget, state: OutputTarget, cptFile: string, chain: string[], log: Logger,
): Promise<void> {
  for (const disk of disks) {
    try {
      const { stdout } = await run('qemu-img', ['info', '--output=json', '--force-share', disk.path as string]);
      await target.writeFile(qcowInfoName(disk.target, ident), stdout);
    } catch (err) {
      log.warn(`could not save image info of ${disk.target}: ${oneLine(err)}`);
    }
  }
  await target.writeFile(vmConfigName(ident), vmXml);
  if (await domain.getAutostart()) await target.writeFile(`autostart.${ident}`, 'True');
  if (!checkpoint.create) return;
  const xml = await domain.checkpointGetXMLDesc(checkpoint.name, 0);
  const next = level === 'full' ? [checkpoint.name] : [...chain, checkpoint.name];
  // The chain state lives in the state dir (for a zip, also inside it, so unzipped sets are complete).
  for (const out of new Set([target, state])) {
    await out.writeFile(path.join(CHECKPOINT_DIR, `${checkpoint.name}.xml`), xml);
    await out.writeFile(path.basename(cptFile), JSON.stringify(next));
  }
}
