// virtnbdbackup: command-line front of the backup engine, flags and defaults as virtnbdbackup 2.x.
import { fstatSync, statSync } from 'node:fs';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { backup, type BackupResult } from '../backup/backup.js';
import { DEFAULT_NBD_PORT, DEFAULT_TLS_CERT_DIR } from '../endpoint/nbd.js';
import { endBackupJob } from '../backup/jobControl.js';
import type { Logger } from '../util/log.js';
import { DEFAULT_LIBVIRT_URI, type LibvirtLogin } from '../libvirt/connection.js';
import { UserError, oneLine } from '../util/errors.js';
import { STAGE_TRACE_ENV } from '../util/stageTrace.js';
import { argumentsForLog, compressLevel, flagGiven, workerCount, flagsCwd, listOption, makeLogger, makeProgress, parseFlags, loginOf, runCommand, withLoginFlags, withNbdTimeoutFlag, VERSION } from './common.js';

const argv = parseFlags('virtnbdbackup', withNbdTimeoutFlag(withLoginFlags(yargs(hideBin(process.argv), flagsCwd())))
  .scriptName('virtnbdbackup')
  .usage('$0 -d DOMAIN -l {copy,full,inc,diff,auto} -o DIR [options]\n\nBack up libvirt/qemu virtual machines over NBD.')
  .option('domain', { alias: 'd', type: 'string', demandOption: true, describe: 'Domain to back up' })
  .option('level', { alias: 'l', choices: ['copy', 'full', 'inc', 'diff', 'auto'] as const, default: 'copy' as const, describe: 'Backup level' })
  .option('type', { alias: 't', choices: ['stream', 'raw'] as const, default: 'stream' as const, describe: 'Output type' })
  .option('raw', { alias: 'r', type: 'boolean', default: false, describe: 'Include raw-format disks (saved as copy; not in inc/diff)' })
  .option('output', { alias: 'o', type: 'string', describe: "Output target directory, or '-' for a zip archive on stdout" })
  .option('checkpointdir', { alias: 'C', type: 'string', describe: 'Persistent checkpoint definitions directory (default: <output>/checkpoints)' })
  .option('checkpoint-prefix', { type: 'string', describe: 'Checkpoint name prefix of a new chain (default: virtnbdbackup); one prefix per set' })
  .option('scratchdir', { type: 'string', default: '/var/tmp', describe: 'Directory for temporary scratch files (writable by QEMU)' })
  .option('start-domain', { alias: 'S', type: 'boolean', default: false, describe: 'Start a shut-off domain paused for the backup, stop it afterwards' })
  .option('pause', { type: 'boolean', default: false, describe: 'Suspend a running domain while the backup job starts' })
  .option('freeze-mountpoint', { alias: 'F', type: 'string', describe: 'With a QEMU guest agent, freeze only these guest mount points while the job starts (comma-separated; default: all)' })
  .option('include', { alias: 'i', type: 'string', describe: 'Back up only these disks (target dev, comma-separated: -i vda,vdb)' })
  .option('exclude', { alias: 'x', type: 'string', describe: 'Exclude these disks (-x vda,vdb)' })
  .option('socketfile', { alias: 'f', type: 'string', describe: 'NBD server socket of the backup job (default: /var/tmp/virtnbdbackup.<pid>)' })
  .option('noprogress', { alias: 'n', type: 'boolean', default: false, describe: 'Disable progress bars' })
  .option('compress', { alias: 'z', type: 'number', describe: 'Compress with lz4 at this level (-z alone: level 2)' })
  .option('worker', { alias: 'w', type: 'number', describe: 'Disks backed up in parallel (default: all, at most 4)' })
  .option('strict', { alias: 'e', type: 'boolean', default: false, describe: 'Exit with code 2 when warnings occurred' })
  .option('no-sparse-detection', { type: 'boolean', default: false, describe: 'inc/diff: save changed ranges that now read as zero as data, not as zero frames' })
  .option('threshold', { alias: 'T', type: 'number', describe: 'Back up (inc/diff) only when at least this many bytes changed' })
  .option('uri', { alias: 'U', type: 'string', default: DEFAULT_LIBVIRT_URI, describe: 'libvirt connection URI; a remote one (qemu+ssh://user@host/system) backs up a domain of that host over TCP' })
  .option('nbd-port', { alias: 'P', type: 'number', describe: `Remote domains: TCP port of the backup job's NBD server (default ${DEFAULT_NBD_PORT})` })
  .option('nbd-ip', { alias: 'I', type: 'string', describe: 'Remote domains: address the NBD server binds and is reached at (default: the URI\'s host)' })
  .option('tls', { type: 'boolean', default: false, describe: 'Remote domains: NBD over TLS (the host\'s libvirt must serve TLS)' })
  .option('tls-cert', { type: 'string', default: DEFAULT_TLS_CERT_DIR, describe: 'Remote domains, --tls: directory of ca-cert.pem, client-cert.pem and client-key.pem' })
  .option('ssh-user', { type: 'string', describe: 'Remote domains: ssh user for qemu-img info and the boot files (default: a qemu+ssh URI\'s user, else the user running this)' })
  .option('syslog', { alias: 'L', type: 'boolean', default: false, describe: 'Also send log messages to syslog' })
  .option('quiet', { type: 'boolean', default: false, describe: 'Only warnings and errors' })
  .option('nocolor', { type: 'boolean', default: false, describe: 'No colours in messages' })
  .option('qemu', { alias: 'q', type: 'boolean', default: false, describe: 'Query extents with qemu-img map' })
  .option('startonly', { alias: 's', type: 'boolean', default: false, describe: 'Only start the backup job and leave it running (prints the NBD socket)' })
  .option('killonly', { alias: 'k', type: 'boolean', default: false, describe: 'End a running backup job of the domain' })
  .option('printonly', { alias: 'p', type: 'boolean', default: false, describe: 'Print the estimated size of the next inc/diff and exit' })
  .option('verbose', { alias: 'v', type: 'boolean', default: false, describe: 'Debug output' })
  .version('version', 'Show version and exit', VERSION)
  .alias('version', 'V')
  .help('help')
  .alias('help', 'h')
  .example('$0 -d webvm -l full -o /backup/webvm', 'full backup of all disks of webvm')
  .example('$0 -d webvm -l inc -o /backup/webvm', 'incremental backup into the same set')
  .example('$0 -d webvm -l diff -o /backup/webvm', 'differential backup (changes since the last checkpoint)')
  .example('$0 -d webvm -l auto -o /backup/webvm', 'full into an empty set, else incremental')
  .example('$0 -d webvm -l full -x vda -o /backup/webvm', 'full backup without disk vda')
  .example('$0 -d webvm -l full -z -o /backup/webvm', 'full backup, lz4 compressed')
  .example('$0 -d webvm -l full -t raw -o /backup/webvm', 'full backup as sparse raw images')
  .example('$0 -d webvm -l full -o - > webvm.full.zip', 'full backup as a zip archive on stdout')
  .example("$0 -d webvm -l inc -o - | ssh host 'cat > webvm.inc.zip'", 'incremental into a zip on another host')
  .example('$0 -d webvm -l auto -S -o /backup/webvm', 'also when webvm is shut off (started paused for the backup)')
  .example('$0 -U qemu+ssh://root@kvm1/system -d webvm -l auto -o /backup/webvm', 'webvm of host kvm1 (NBD over TCP, port 10809)')
  .example('$0 -d webvm -l auto --checkpoint-prefix weekly -o /backup/weekly', 'a second, independent chain')
  .example('$0 -d webvm -l inc -T 104857600 -o /backup/webvm', 'inc only when at least 100 MiB changed')
  .epilog([
    'Environment:',
    '  VIRTNBD_SYSLOG_SOCKET=PATH  the syslog socket for -L (default /dev/log)',
    `  ${STAGE_TRACE_ENV}=FILE  write to FILE (JSON) when each read, lz4 compression and disk write of the copy ran`,
  ].join('\n')),
// -z alone means level 2, as Python's optional -z value; -k ends a job, which needs no -o.
{
  valueOptional: ['compress'],
  requiredUnless: { output: 'killonly' },
  extensions: ['checkpoint-prefix', 'start-domain', 'pause', 'no-sparse-detection', 'quiet', 'nocolor', 'nbd-timeout'],
});

void runCommand('virtnbdbackup', argv.verbose, async (signal) => {
  const log = makeLogger(argv);
  if (argv.syslog) log.attachSyslog('virtnbdbackup', process.env.VIRTNBD_SYSLOG_SOCKET);
  try {
    const login = loginOf(argv);
    if (argv.killonly) {
      if (argv.startonly || argv.printonly) throw new UserError(`-k ends a running backup job, so it excludes ${argv.startonly ? '-s' : '-p'}: give one of them`);
      await endBackupJob({ domain: argv.domain, uri: argv.uri, login, socketFile: argv.socketfile, nbdTimeout: argv['nbd-timeout'], log });
      return 0;
    }
    await runBackup(log, login, signal);
    // Why the exit code is 2, as Python's says it (it was 2 without a word), on the console and in syslog.
    if (argv.strict && log.warnings > 0) log.info(`exit code 2: ${log.warnings} warning${log.warnings > 1 ? 's' : ''} with -e/--strict`);
  } catch (err) {
    // syslog gets the error the run ends with, as the set's log does (the command prints it on the console).
    log.toSyslog('error', oneLine(err));
    throw err;
  } finally {
    await log.detachSyslog();
  }
  return argv.strict && log.warnings > 0 ? 2 : 0;
}, { leftover: `a backup job it started, if any, is ended in the background (virsh domjobabort), and a guest it paused (--pause) or froze is resumed and thawed; should a job still run, end it with 'virtnbdbackup -d ${argv.domain} -k', and check the guest with 'virsh domstate ${argv.domain}'` });

/** Whether `fd` is closed or /dev/null (Node opens /dev/null in place of a closed standard stream, `>&-`). */
function discardsOutput(fd: number): boolean {
  try {
    const out = fstatSync(fd);
    const devNull = statSync('/dev/null');
    return out.isCharacterDevice() && out.rdev === devNull.rdev;
  } catch {
    return true;
  }
}

async function runBackup(log: Logger, login: LibvirtLogin | undefined, signal: AbortSignal): Promise<void> {
  const output = argv.output as string;
  if (output === '-' && process.stdout.isTTY && !argv.printonly && !argv.startonly) {
    throw new UserError('-o - writes a zip archive to standard output: redirect it to a file or a pipe');
  }
  if (output === '-' && !argv.printonly && !argv.startonly && discardsOutput(1)) {
    throw new UserError('-o - writes a zip archive to standard output, which is closed or /dev/null: the archive would be lost while the chain counts it saved; redirect it to a file or a pipe');
  }
  const compress = compressLevel(flagGiven('-z', '--compress'), argv.compress);
  const progress = await makeProgress(argv, 'saving');
  try {
    const result = await backup({
      domain: argv.domain,
      uri: argv.uri,
      login,
      level: argv.level,
      output,
      type: argv.type,
      raw: argv.raw,
      include: listOption(argv.include, '-i/--include'),
      exclude: listOption(argv.exclude, '-x/--exclude'),
      socketFile: argv.socketfile,
      scratchDir: argv.scratchdir,
      workers: workerCount(argv.worker),
      compress,
      checkpointDir: argv.checkpointdir,
      checkpointPrefix: argv['checkpoint-prefix'],
      startDomain: argv['start-domain'],
      pause: argv.pause,
      nbdPort: argv['nbd-port'],
      nbdHost: argv['nbd-ip'],
      sshUser: argv['ssh-user'],
      tls: argv.tls,
      tlsCertificates: argv['tls-cert'],
      freezeMountpoints: listOption(argv['freeze-mountpoint'], '-F/--freeze-mountpoint'),
      startOnly: argv.startonly,
      printOnly: argv.printonly,
      threshold: argv.threshold,
      qemuExtents: argv.qemu,
      noSparseDetection: argv['no-sparse-detection'],
      nbdTimeout: argv['nbd-timeout'],
      log,
      runDescription: `virtnbdbackup ${VERSION}, arguments: ${argumentsForLog()}`,
      progress: progress.factory,
      signal,
    });
    progress.stop();
    report(result);
  } finally {
    progress.stop();
  }
}

/** On stdout the values scripts read (-p estimate, -s socket); the engine logs the rest. */
function report(result: BackupResult): void {
  if (argv.printonly) {
    process.stdout.write(`estimated size of the next inc/diff: ${result.estimate ?? 0} bytes\n`);
    return;
  }
  if (result.startedJob) process.stdout.write(`${result.startedJob.server}\n`);
}
