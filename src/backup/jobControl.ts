// The domain's block job seen from outside a backup run: refuse to start while another job runs, and end a
// backup job left running (-k/--killonly, e.g. after -s/--startonly). Guarantees: only a backup job is ever ended.
import fs from 'node:fs/promises';
import { VIR_DOMAIN_JOB_OPERATION_BACKUP, type LibvirtDomain } from '../native/addon.js';
import { DEFAULT_LIBVIRT_URI, lookupDomain, lostConnectionError, openLibvirt, type LibvirtLogin } from '../libvirt/connection.js';
import { waitForJobTeardown } from '../libvirt/backupJob.js';
import { Logger, silentLogger } from '../util/log.js';
import { UserError, oneLine } from '../util/errors.js';

export async function refuseActiveJob(domain: LibvirtDomain): Promise<void> {
  const job = await domain.getJobType();
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
