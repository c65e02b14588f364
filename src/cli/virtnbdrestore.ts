// virtnbdrestore: command-line front of restore, dump and verify, flags and defaults as virtnbdbackup 2.x.
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { dump, restore, type RestoreOptions } from '../restore/restore.js';
import { verifySet } from '../verify/verify.js';
import { domainHostOf, tcpServerOn } from '../libvirt/domainHost.js';
import { DEFAULT_NBD_PORT, DEFAULT_TLS_CERT_DIR, checkTlsClientFiles } from '../endpoint/nbd.js';
import { UserError } from '../util/errors.js';
import { DEFAULT_LIBVIRT_URI } from '../libvirt/connection.js';
import { listOption, makeLogger, makeProgress, parseFlags, usageError, loginOf, runCommand, withLoginFlags, withNbdTimeoutFlag, VERSION, withLogFile, flagsCwd } from './common.js';

const argv = parseFlags('virtnbdrestore', withNbdTimeoutFlag(withLoginFlags(yargs(hideBin(process.argv), flagsCwd())))
  .scriptName('virtnbdrestore')
  .usage('$0 -i SETDIR -o OUTDIR [options]\n\nRestore virtual machine disks from a backup set, dump its metadata or verify it.')
  .option('action', { alias: 'a', choices: ['dump', 'restore', 'verify'] as const, default: 'restore' as const, describe: 'Action to perform' })
  .option('input', { alias: 'i', type: 'string', demandOption: true, describe: 'Directory holding a backup set' })
  .option('output', { alias: 'o', type: 'string', demandOption: true, describe: "Restore target: a directory, or an existing raw file or block device for one disk ('dump' and 'verify' select those actions)" })
  .option('until', { alias: 'u', type: 'string', describe: 'Restore (or verify) only up to this checkpoint (point in time)' })
  .option('sequence', { alias: 's', type: 'string', describe: 'Restore exactly these data files of one disk, in chain order (comma-separated); verify or dump only these' })
  .option('disk', { alias: 'd', type: 'string', describe: 'Process only the disk with this target dev' })
  .option('noprogress', { alias: 'n', type: 'boolean', default: false, describe: 'Disable progress bars' })
  .option('socketfile', { alias: 'f', type: 'string', describe: 'Socket for the local NBD server (default under /var/tmp)' })
  .option('raw', { alias: 'r', type: 'boolean', default: false, describe: 'Restore raw-format disks as raw images (and keep cdrom/floppy devices with -c)' })
  .option('adjust-config', { alias: 'c', type: 'boolean', default: false, describe: 'Adjust the domain XML to the restored disks' })
  .option('define', { alias: 'D', type: 'boolean', default: false, describe: 'Define the restored domain in libvirt (implies -c)' })
  .option('config-file', { alias: 'C', type: 'string', describe: 'Domain XML to copy or adjust (default: the vmconfig of the restore point)' })
  .option('name', { alias: 'N', type: 'string', describe: 'Name of the restored domain (default: restore_<name>)' })
  .option('buffsize', { alias: 'B', type: 'number', describe: 'Accepted for compatibility; verify reads 4 MiB at a time' })
  .option('preallocate', { alias: 'A', type: 'boolean', default: false, describe: 'Preallocate restored images (metadata for qcow2, falloc for raw)' })
  .option('compress', { type: 'boolean', default: false, describe: 'Write restored qcow2 images with compressed clusters' })
  .option('uri', { alias: 'U', type: 'string', default: DEFAULT_LIBVIRT_URI, describe: 'libvirt connection URI for -D; a remote one (qemu+ssh://user@host/system) restores onto that host: -o is a directory, raw file or block device there' })
  .option('nbd-port', { alias: 'P', type: 'number', describe: `Onto another host: TCP port of its qemu-nbd (default ${DEFAULT_NBD_PORT})` })
  .option('nbd-ip', { alias: 'I', type: 'string', describe: 'Onto another host: address its qemu-nbd binds and is reached at (default: the URI\'s host)' })
  .option('ssh-user', { type: 'string', describe: 'Onto another host: ssh user (default: a qemu+ssh URI\'s user, else the user running this)' })
  .option('tls', { type: 'boolean', describe: 'Onto another host: NBD over TLS (its certificates in /etc/pki/qemu there)' })
  .option('tls-cert', { type: 'string', describe: `Onto another host, --tls: directory of ca-cert.pem, client-cert.pem and client-key.pem (default ${DEFAULT_TLS_CERT_DIR})` })
  .option('logfile', { alias: 'L', type: 'string', describe: 'Also write the log to this file' })
  .option('quiet', { type: 'boolean', default: false, describe: 'Only warnings and errors' })
  .option('nocolor', { type: 'boolean', default: false, describe: 'No colours in messages' })
  .option('verbose', { alias: 'v', type: 'boolean', default: false, describe: 'Debug output' })
  .version('version', 'Show version and exit', VERSION)
  .alias('version', 'V')
  .help('help')
  .alias('help', 'h')
  .example('$0 -i /backup/webvm -o dump', 'print the metadata of every data file')
  .example('$0 -i /backup/webvm -o verify', 'check every data file against its checksums')
  .example('$0 -i /backup/webvm -o /restore', 'restore all disks at the latest point')
  .example('$0 -i /backup/webvm -o /restore --until virtnbdbackup.2', 'point-in-time restore')
  .example('$0 -i /backup/webvm -o /restore -d vda', 'restore only disk vda')
  .example('$0 -i /backup/webvm -o /dev/vg/webvm -d vda', 'restore disk vda onto an existing block device')
  .example('$0 -i /backup/webvm -o /restore -s vda.full.data,vda.inc.virtnbdbackup.1.data', 'apply exactly these files')
  .example('$0 -cD -N webvm2 -i /backup/webvm -o /restore', 'restore, adjust the domain XML and define it as webvm2')
  .example('$0 -U qemu+ssh://root@kvm2/system -D -i /backup/webvm -o /var/lib/libvirt/images/webvm', 'restore onto host kvm2 and define it there'),
{ extensions: ['config-file', 'buffsize', 'preallocate', 'compress', 'quiet', 'nocolor', 'nbd-timeout'] });

// After parseFlags, which names a word or an empty value (yargs' NaN and 0) as such.
if (argv.buffsize !== undefined && !(Number.isSafeInteger(argv.buffsize) && argv.buffsize > 0)) usageError('virtnbdrestore', `-B ${argv.buffsize}: give a buffer size in bytes, above 0`);

const action = argv.output === 'dump' || argv.output === 'verify' ? argv.output : argv.action;

void runCommand('virtnbdrestore', argv.verbose, async (signal) => {
  const login = loginOf(argv);
  const log = makeLogger(argv);
  // -L logs every action, as Python's does (dump and verify wrote no file).
  if (action === 'dump') {
    // One JSON array, indented as Python's virtnbdrestore prints it, so scripts that parse its output read ours.
    const metadata = await withLogFile(log, argv.logfile, () => dump(argv.input, argv.disk, listOption(argv.sequence, '-s/--sequence')));
    process.stdout.write(`${JSON.stringify(metadata, null, 4)}\n`);
    return 0;
  }
  if (action === 'verify') {
    // The verdicts go to stdout, and into the log file too.
    const verdicts = await withLogFile(log, argv.logfile, () => verifySet({
      input: argv.input, disk: argv.disk, until: argv.until, sequence: listOption(argv.sequence, '-s/--sequence'), signal, log,
      onVerdict: (v) => {
        const line = v.ok ? `OK ${v.file}` : `FAILED ${v.file}: ${v.reason}`;
        log.toFile(v.ok ? 'info' : 'error', line);
        process.stdout.write(`${line}\n`);
      },
    }));
    return verdicts.every((v) => v.ok) ? 0 : 1;
  }
  const onto = await outputHost();
  await withLogFile(log, argv.logfile, async () => {
    const progress = await makeProgress(argv, 'restoring');
    try {
      const result = await restore({
        input: argv.input, output: argv.output, until: argv.until, sequence: listOption(argv.sequence, '-s/--sequence'), disk: argv.disk,
        raw: argv.raw, preallocate: argv.preallocate, compress: argv.compress, socketFile: argv.socketfile,
        adjustConfig: argv['adjust-config'], define: argv.define, name: argv.name, uri: argv.uri, login, configFile: argv['config-file'],
        nbdTimeout: argv['nbd-timeout'], ...onto, log, progress: progress.factory, signal,
      });
      progress.stop();
      for (const d of result.disks) log.info(`disk ${d.disk} restored to ${d.image} (${d.applied.join(', ')})`);
      if (result.configKept) log.info(`domain XML ${result.config} was there already: left as it was`);
      else if (result.config) log.info(`domain XML written to ${result.config}${result.defined ? `, defined as '${result.defined}'` : ''}`);
    } finally {
      progress.stop();
    }
  });
  return 0;
}, { leftover: action === 'restore' ? `an image it was writing (a .partial file) may be left in ${argv.output}: remove it` : undefined });

/** With a remote -U, the restore goes onto that host; the flags for it mean nothing without one. */
async function outputHost(): Promise<Pick<RestoreOptions, 'host' | 'remoteServer'>> {
  const host = domainHostOf(argv.uri, argv['ssh-user'], argv['nbd-timeout']);
  if (!host.remote) {
    const given = (['nbd-port', 'nbd-ip', 'ssh-user', 'tls', 'tls-cert'] as const).filter((flag) => argv[flag] !== undefined);
    if (given.length > 0) {
      throw new UserError(`--${given[0]} applies to a restore onto another host: give that host's libvirt URI with -U (qemu+ssh://user@host/system), or leave it out`);
    }
    return {};
  }
  const remoteServer = tcpServerOn(host, { nbdHost: argv['nbd-ip'], nbdPort: argv['nbd-port'], tls: argv.tls, tlsCertificates: argv['tls-cert'] });
  if (remoteServer.tlsCertificates) await checkTlsClientFiles(remoteServer.tlsCertificates);
  return { host, remoteServer };
}
