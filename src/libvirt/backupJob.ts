// One libvirt pull-mode backup job: started with an optional new checkpoint, ended exactly once.
// Guarantees: end() aborts the job, removes the NBD socket and scratch files, and, when the run failed,
// deletes the checkpoint this run created so the chain stays consistent. end() never throws.
import fs from 'node:fs/promises';
import crypto from 'node:crypto';
import path from 'node:path';
import type { LibvirtDomain } from '../native/addon.js';
import type { NbdAddress } from '../endpoint/nbd.js';
import { backupJobXml, checkpointXml, dirtyBitmapContext, type CheckpointPlan } from './checkpoints.js';
import type { Logger } from '../util/log.js';

export interface BackupJobOptions {
  socket: string;
  scratchDir: string;
  /** Disk targets to export. */
  targets: string[];
  /** Disk targets that get a bitmap in the new checkpoint (raw-format disks cannot). */
  checkpointTargets: string[];
  /** All disk targets of the domain (the others are listed as not participating). */
  allTargets: string[];
  checkpoint: CheckpointPlan;
  log: Logger;
}

export class BackupJob {
  private ended = false;

  private constructor(
    private readonly domain: LibvirtDomain,
    readonly socket: string,
    private readonly scratchFiles: string[],
    /** The checkpoint this job created, if any. */
    readonly createdCheckpoint: string | undefined,
    private readonly log: Logger,
  ) {}

  static async start(domain: LibvirtDomain, options: BackupJobOptions): Promise<BackupJob> {
    const { checkpoint } = options;
    const tag = crypto.randomBytes(3).toString('hex');
    const disks = options.targets.map((target) => ({ target, scratchFile: path.join(options.scratchDir, `backup.${tag}.${target}`) }));
    const jobXml = backupJobXml(options.socket, checkpoint.parent, disks, options.allTargets);
    const cptXml = checkpoint.create ? checkpointXml(checkpoint, options.checkpointTargets, options.allTargets, tag) : null;
    options.log.debug(`backup job XML:\n${jobXml}`);
    if (cptXml) options.log.debug(`checkpoint XML:\n${cptXml}`);
    await domain.backupBegin(jobXml, cptXml, 0);
    return new BackupJob(domain, options.socket, disks.map((d) => d.scratchFile), checkpoint.create ? checkpoint.name : undefined, options.log);
  }

  /** The job's NBD export of disk `target`. */
  address(target: string): NbdAddress {
    return { socket: this.socket, exportName: target };
  }

  dirtyContext(target: string): string {
    return dirtyBitmapContext(target);
  }

  /** Ends the job; with `failed`, also removes the checkpoint it created. */
  async end(failed: boolean): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    try {
      await this.domain.abortJob();
    } catch (err) {
      this.log.warn(`ending the backup job of ${this.domain.name()}: ${(err as Error).message}`);
    }
    await Promise.all([this.socket, ...this.scratchFiles].map((f) => fs.rm(f, { force: true }).catch(() => undefined)));
    if (failed && this.createdCheckpoint) {
      try {
        await this.domain.checkpointDelete(this.createdCheckpoint, 0);
        this.log.info(`removed checkpoint ${this.createdCheckpoint} of the failed run`);
      } catch (err) {
        this.log.warn(`could not remove checkpoint ${this.createdCheckpoint} of the failed run: ${(err as Error).message}`);
      }
    }
  }
}
