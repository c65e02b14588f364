// The domain's block job seen from outside a backup run: refuse to start while another job runs, and end a
// backup job left running (-k/--killonly, e.g. after -s/--startonly). Guarantees: only a backup job is ever ended.
import fs from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { VIR_DOMAIN_JOB_OPERATION_BACKUP, type LibvirtDomain } from '../native/addon.js';
import { DEFAULT_LIBVIRT_URI, lookupDomain, lostConnectionError, openLibvirt, type LibvirtLogin } from '../libvirt/connection.js';
import { waitForJobTeardown } from '../libvirt/backupJob.js';
import { Logger, silentLogger } from '../util/log.js';
import { UserError, oneLine } from '../util/errors.js';

/**
 * How long a run that took the domain's lock over from a run that died waits for that run's job to go: its guard
 * looks for the job for at most 15 s and ends it (jobGuard.ts). It was refused ("already has a backup job") while
 * the guard was about to end the job (found by a black-box round: an inc started right after one killed with SIGKILL).
 */
export const DEAD_RUN_JOB_WAIT_MS = 20_000;

/**
 * Refuses while the domain has a job. With `deadRun` (this run took the lock over from a run that died), a job is
 * first waited for, up to `deadRun.waitMs`, since that run's guard ends it.
 */
export async function refuseActiveJob(domain: LibvirtDomain, deadRun?: { waitMs: number; log: Logger; signal?: AbortSignal }): Promise<void> {
  let job = await domain.getJobType();
  if (job.type !== 0 && deadRun && job.operation === VIR_DOMAIN_JOB_OPERATION_BACKUP) {
    deadRun.log.info(`domain '${domain.name()}' has a backup job, maybe of a run that died (this run took over its lock): waiting up to ${Math.round(deadRun.waitMs / 1000)} s for its guard to end it`);
    for (const deadline = Date.now() + deadRun.waitMs; job.type !== 0 && Date.now() < deadline;) {
      // A stop signal ends the wait at once (it waited out the 20 s, then failed as refused).
      await sleep(250, undefined, { signal: deadRun.signal }).catch(() => undefined);
      deadRun.signal?.throwIfAborted();
      job = await domain.getJobType();
    }
  }
  if (job.type === 0) return;
  const what = job.operation === VIR_DOMAIN_JOB_OPERATION_BACKUP ? 'a backup job' : `an active job (operation ${job.operation})`;
  throw new UserError(`domain '${domain.name()}' already has ${what}; wait for it, or end it with 'virtnbdbackup -d ${domain.name()} -k' (backup jobs) or 'virsh domjobabort ${domain.name()}'`);
}

export interface EndJobOptions {
  domain: string;
  uri?: string;
  login?: LibvirtLogin;
  /** The job's NBD socket, removed once the job is ended (when known). */
  socketFile?: string;
  /** --nbd-timeout: seconds libvirtd may leave the open or a call unanswered (0: forever); default DEFAULT_NBD_TIMEOUT. */
  nbdTimeout?: number;
  log?: Logger;
}

/** Ends the domain's running backup job; refuses when there is none, or when the job is not a backup. */
export async function endBackupJob(options: EndJobOptions): Promise<void> {
  const log = options.log ?? silentLogger;
  const uri = options.uri ?? DEFAULT_LIBVIRT_URI;
  const conn = await openLibvirt(uri, options.login, options.nbdTimeout);
  try {
    const domain = await lookupDomain(conn, options.domain, uri);
    const job = await domain.getJobType();
    if (job.type === 0) throw new UserError(`domain '${options.domain}' has no active job to end`);
    if (job.operation !== VIR_DOMAIN_JOB_OPERATION_BACKUP) {
      throw new UserError(`the active job of domain '${options.domain}' is not a backup (operation ${job.operation}); not ending it`);
    }
    await domain.abortJob().catch((err: unknown) => {
      throw new UserError(`cannot end the backup job of '${options.domain}': ${oneLine(err)}`);
    });
    await waitForJobTeardown(domain);
    // Only a socket: -f naming a file by mistake must not cost the file.
    if (options.socketFile && (await fs.lstat(options.socketFile).catch(() => undefined))?.isSocket()) await fs.rm(options.socketFile, { force: true });
    log.info(`ended the backup job of '${options.domain}'`);
  } catch (err) {
    throw (await lostConnectionError(conn, uri, err, `run 'virtnbdbackup -d ${options.domain} -k' again`)) ?? err;
  } finally {
    await conn.close().catch(() => undefined);
  }
}
