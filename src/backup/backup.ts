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
  /** Backup set directory (created when missing). */
  output: string;
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

/** Level `auto`: full when the set has no full backup yet, else inc. */
async function resolveLevel(level: Level | 'auto', output: string): Promise<Level> {
  if (level !== 'auto') return level;
  const names = await fs.readdir(output).catch(() => [] as string[]);
  return names.some((n) => n.endsWith('.full.data')) ? 'inc' : 'full';
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
  const output = path.resolve(options.output);
  const level = await resolveLevel(options.level, output);
  await checkSet(output, level);
  const target: OutputTarget = new DirectoryTarget(output);
  const started = new Date();
  log.attachFile(target.pathOf(logFileName(level, started)));

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
    const { disks, skipped } = selectDisks(info.disks, { include: options.include, exclude: options.exclude });
    for (const s of skipped) log.warn(`skipping disk ${s.disk.target}: ${s.reason}`);
    if (disks.length === 0) throw new UserError(`domain '${options.domain}' has no disk to back up${options.include?.length ? ` matching -i ${options.include.join(',')}` : ''}`);

    const cptFile = target.pathOf(checkpointListName(options.domain));
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
      const perDiskConnections = Math.max(1, Math.ceil(4 / Math.min(disks.length, options.workers ?? disks.length)));
      await forEachLimited(disks, options.workers ?? disks.length, async (disk) => {
        try {
          results.push(await backupDisk(disk, level, ident, checkpoint, socket, target, perDiskConnections, options, signal, log));
        } catch (err) {
          controller.abort(err);
          throw err;
        }
      });
      await saveSideFiles(domain, disks, level, ident, checkpoint, vmXml, target, cptFile, chain, log);
      failed = false;
      return { level, checkpoint, disks: results.sort((a, b) => a.disk.localeCompare(b.disk)) };
    } finally {
      await backupJob.end(failed);
    }
  } finally {
    await conn.close().catch(() => undefined);
    await log.detachFile();
  }
}

async function backupDisk(
  disk: DomainDisk, level: Level, ident: string, checkpoint: CheckpointPlan, socket: string, target: OutputTarget,
  connections: number, options: BackupOptions, signal: AbortSignal, log: Logger,
): Promise<DiskResult> {
  const incremental = level === 'inc' || level === 'diff';
  const dirtyContext = dirtyBitmapContext(disk.target);
  const endpoint = await NbdEndpoint.open(
    { socket, exportName: disk.target },
    { metaContexts: incremental ? [CONTEXT_ALLOCATION, dirtyContext] : [CONTEXT_ALLOCATION], connections },
  );
  try {
    const plan = incremental ? await planDirty(endpoint, dirtyContext) : await planFull(endpoint);
    const file = dataFileName(disk.target, level, ident);
    log.info(`disk ${disk.target}: ${plan.dataSize} bytes of data in ${plan.extents.length} extents of ${endpoint.size} bytes, writing ${file}`);
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
        onProgress: options.progress?.(disk.target, plan.dataSize),
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
  target: OutputTarget, cptFile: string, chain: string[], log: Logger,
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
  await target.writeFile(path.join(CHECKPOINT_DIR, `${checkpoint.name}.xml`), xml);
  const next = level === 'full' ? [checkpoint.name] : [...chain, checkpoint.name];
  await target.writeFile(path.basename(cptFile), JSON.stringify(next));
}
