// What every step of one backup run needs to know, gathered once by backup.ts and passed along.
import path from 'node:path';
import { CHECKPOINT_DIR } from '../set/backupSet.js';
import type { LibvirtDomain } from '../native/addon.js';
import type { DomainDisk, DomainInfo } from '../libvirt/domainXml.js';
import type { OutputTarget } from '../set/target.js';
import type { Logger } from '../util/log.js';
import type { DomainHost } from '../libvirt/domainHost.js';
import type { DomainPower } from './domainPower.js';
import type { BackupOptions } from './backup.js';

export interface RunContext {
  options: BackupOptions;
  log: Logger;
  domain: LibvirtDomain;
  power: DomainPower;
  /** Domain XML at backup time (saved as vmconfig.<ident>.xml). */
  vmXml: string;
  info: DomainInfo;
  /** The disks this run backs up. */
  disks: DomainDisk[];
  /** The set directory; for zip output, the directory that keeps the chain state (.cpt, checkpoints). */
  stateDir: string;
  /** Where the set's files go: the set directory, or the zip on stdout. */
  target: OutputTarget;
  toZip: boolean;
  /** Saved checkpoint definitions (-C), used to redefine checkpoints libvirt lost. */
  xmlDir: string;
  /** The run's log file, in the state dir. */
  logName: string;
  /** When the run started: names diffs and the log. */
  startedAt: Date;
  /** Where the domain runs: this machine or a remote libvirt URI's host (qemu-img info and boot files go there). */
  host: DomainHost;
  /** `qemu-img info` JSON by disk, read once in a run of a shut-off domain (its images do not change meanwhile). */
  offlineImageInfo: Map<string, Promise<string>>;
  /**
   * Zip output: what the state dir records of the run (its .cpt), done once the archive is whole. Recorded before, a
   * zip that failed at its end would leave the next inc continuing from changes no valid archive holds.
   */
  afterZip: Array<() => Promise<void>>;
}

/**
 * The set's own copy of its checkpoints' definitions (with -C as well): its checkpoints/, or for a zip chain
 * checkpoints/<domain>/ of the state dir. A -C shared by several domains' zip chains holds one definition per name,
 * the last domain's, which made every other domain's inc a full.
 */
export function ownCheckpointDir(ctx: RunContext): string {
  return ctx.toZip ? path.join(ctx.stateDir, CHECKPOINT_DIR, ctx.options.domain) : path.join(ctx.stateDir, CHECKPOINT_DIR);
}
