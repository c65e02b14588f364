// One libvirt pull-mode backup job: started with an optional new checkpoint, ended exactly once.
// Guarantees: release() aborts the job and waits until libvirt has torn it down before removing what is left of
// the NBD socket and scratch files (libvirt removes its own scratch files then; removing them earlier raced it and
// filled its log with errors); end() also, when the run failed, deletes the checkpoint this run created so the
// chain stays consistent. Neither ever throws.
import fs from 'node:fs/promises';
import crypto from 'node:crypto';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { LibvirtDomain } from '../native/addon.js';
import { nbdUri, type NbdAddress } from '../endpoint/nbd.js';
import { backupJobXml, checkpointXml, dirtyBitmapContext, type CheckpointPlan, type JobServer } from './checkpoints.js';
import type { Logger } from '../util/log.js';
import { deleteCheckpoint } from './chain.js';
import { UserError, oneLine } from '../util/errors.js';

export interface BackupJobOptions {
  server: JobServer;
  scratchDir: string;
  /** Disk targets to export. */
  targets: string[];
  /** Of those, the ones an incremental job exports whole (added to the domain since its parent checkpoint). */
  wholeTargets?: string[];
  /** Of those, the ones an incremental job exports from an earlier checkpoint (left out of the backups since). */
  resumedTargets?: Array<{ target: string; from: string }>;
  /** Disk targets that get a bitmap in the new checkpoint (raw-format disks cannot). */
  checkpointTargets: string[];
  /** All disk targets of the domain (the others are listed as not participating). */
  allTargets: string[];
  checkpoint: CheckpointPlan;
  log: Logger;
  /**
   * `beginning` right before the job's begin is asked of libvirt, with a string only this job's definition holds (a
   * throw there asks nothing).
   */
  hooks?: { beginning(jobMarker: string): void };
}

/** How long a run waits for libvirt to tear an aborted job down before it removes the leftovers itself. */
const TEARDOWN_WAIT_MS = 30_000;

/**
 * Waits until the domain has no job: libvirt tears an aborted backup job down after virDomainAbortJob returns,
 * and a job query waits for that. Returns early when libvirt cannot be asked (the files are removed anyway).
 */
export async function waitForJobTeardown(domain: LibvirtDomain, waitMs = TEARDOWN_WAIT_MS): Promise<void> {
  const deadline = Date.now() + waitMs;
  for (;;) {
    try {
      if ((await domain.getJobType()).type === 0) return;
    } catch {
      return;
    }
    if (Date.now() >= deadline) return;
    await sleep(10);
  }
}

/** The start of this job's scratch file names: `backup.<tag>.`, the tag random per job. */
const scratchMarker = (tag: string): string => `backup.${tag}.`;

export class BackupJob {
  private ended = false;
  private releasing: Promise<void> | undefined;
  /**
   * The job was gone when the run came to end it, the domain still running: a pull-mode job never ends by itself,
   * so another program ended it (virtnbdbackup -k, virsh domjobabort) under the run.
   */
  endedElsewhere = false;

  private constructor(
    private readonly domain: LibvirtDomain,
    readonly server: JobServer,
    /** The socket and scratch files to remove after the teardown: none for a domain on another host. */
    private readonly leftovers: string[],
    /** The checkpoint this job created, if any. */
    readonly createdCheckpoint: string | undefined,
    private readonly log: Logger,
  ) {}

  static async start(domain: LibvirtDomain, options: BackupJobOptions): Promise<BackupJob> {
    const { checkpoint } = options;
    const tag = crypto.randomBytes(3).toString('hex');
    const whole = new Set(options.wholeTargets);
    const since = new Map((options.resumedTargets ?? []).map((r) => [r.target, r.from]));
    const disks = options.targets.map((target) => ({ target, scratchFile: path.join(options.scratchDir, `${scratchMarker(tag)}${target}`), full: whole.has(target), since: since.get(target) }));
    const jobXml = backupJobXml(options.server, checkpoint.parent, disks, options.allTargets);
    const cptXml = checkpoint.create ? checkpointXml(checkpoint, options.checkpointTargets, options.allTargets, tag) : null;
    options.log.block('debug', `backup job XML:\n${jobXml}`);
    if (cptXml) options.log.block('debug', `checkpoint XML:\n${cptXml}`);
    const leftovers = 'socket' in options.server ? [options.server.socket, ...disks.map((d) => d.scratchFile)] : [];
    const job = (): BackupJob => new BackupJob(domain, options.server, leftovers, checkpoint.create ? checkpoint.name : undefined, options.log);
    // Before the job is asked for: a run killed while libvirt begins it is then watched too.
    options.hooks?.beginning(scratchMarker(tag));
    const beginning = domain.backupBegin(jobXml, cptXml, 0);
    await beginning.catch((err: unknown) => {
      throw (('socket' in options.server) && socketRefused(err, options.server.socket)) || scratchRefused(err, options.scratchDir) || err;
    });
    return job();
  }

  /** The job's NBD export of disk `target`. */
  address(target: string): NbdAddress {
    if ('socket' in this.server) return { socket: this.server.socket, exportName: target };
    return { uri: nbdUri(this.server, target), exportName: target, tlsCertificates: this.server.tlsCertificates };
  }

  dirtyContext(target: string): string {
    return dirtyBitmapContext(target);
  }

  /** Ends the job once every disk is read; a second call returns the first one's promise. */
  release(): Promise<void> {
    this.releasing ??= this.abortAndClean();
    return this.releasing;
  }

  /** Ends the job (release()); with `failed`, also removes the checkpoint it created. */
  async end(failed: boolean): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    await this.release();
    if (failed && this.createdCheckpoint) {
      try {
        // With its bitmaps, or its metadata alone where a bitmap is already gone (a disk detached, an image replaced).
        await deleteCheckpoint(this.domain, this.createdCheckpoint, this.log);
        this.log.info(`removed checkpoint ${this.createdCheckpoint} of the failed run`);
      } catch (err) {
        this.log.warn(`could not remove checkpoint ${this.createdCheckpoint} of the failed run: ${(err as Error).message}`);
      }
    }
  }

  private async abortAndClean(): Promise<void> {
    try {
      await this.domain.abortJob();
    } catch (err) {
      if (await this.jobGoneUnderRun()) this.endedElsewhere = true;
      else this.log.warn(`ending the backup job of ${this.domain.name()}: ${(err as Error).message}`);
    }
    await waitForJobTeardown(this.domain);
    await Promise.all(this.leftovers.map((f) => fs.rm(f, { force: true }).catch(() => undefined)));
  }

  /** No job (type 0) on the domain, which still runs. */
  private async jobGoneUnderRun(): Promise<boolean> {
    try {
      return (await this.domain.getJobType()).type === 0 && (await this.domain.isActive());
    } catch {
      return false;
    }
  }
}

/** QEMU opens the job's scratch files as its own user (blockdev-add): a --scratchdir it may not write, said so. */
function scratchRefused(err: unknown, scratchDir: string): UserError | undefined {
  const text = oneLine(err);
  if (!/blockdev-add/.test(text) || !/Permission denied/i.test(text)) return undefined;
  return new UserError(`QEMU may not create the backup job's scratch files in ${scratchDir}: permission denied for QEMU's user (libvirt-qemu on Debian), by the directory's permissions or by AppArmor/SELinux; give --scratchdir a directory QEMU may write to, such as /var/tmp (the default)`);
}

/** QEMU, which creates the job's socket as its own user, may not write where -f points: said so, with the way out. */
function socketRefused(err: unknown, socket: string): UserError | undefined {
  if (!/Failed to bind socket.*Permission denied/i.test(oneLine(err))) return undefined;
  return new UserError(`QEMU may not create the backup job's socket ${socket}: permission denied in ${path.dirname(socket)} for QEMU's user (libvirt-qemu on Debian), by its permissions or by AppArmor/SELinux; give -f a path QEMU may write to, such as one in /var/tmp (the default)`);
}
