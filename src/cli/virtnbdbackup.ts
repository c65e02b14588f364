// virtnbdbackup: command-line front of the backup engine, flags and defaults as virtnbdbackup 2.x.
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { backup } from '../backup/backup.js';
import { UserError } from '../util/errors.js';
import { VERSION, listOption, makeLogger, makeProgress, runCommand } from './common.js';

const argv = yargs(hideBin(process.argv))
  .scriptName('virtnbdbackup')
  .usage('$0 -d DOMAIN -l {copy,full,inc,diff,auto} -o DIR [options]\n\nBack up libvirt/qemu virtual machines over NBD.')
  .option('domain', { alias: 'd', type: 'string', demandOption: true, describe: 'Domain to back up' })
  .option('level', { alias: 'l', choices: ['copy', 'full', 'inc', 'diff', 'auto'] as const, default: 'copy' as const, describe: 'Backup level' })
  .option('type', { alias: 't', choices: ['stream', 'raw'] as const, default: 'stream' as const, describe: 'Output type' })
  .option('raw', { alias: 'r', type: 'boolean', default: false, describe: 'Include raw-format disks (saved as copy; not in inc/diff)' })
  .option('output', { alias: 'o', type: 'string', demandOption: true, describe: "Output target directory, or '-' for a zip archive on stdout" })
  .option('scratchdir', { alias: 'S', type: 'string', default: '/var/tmp', describe: 'Directory for temporary scratch files (writable by QEMU)' })
  .option('include', { alias: 'i', type: 'string', describe: 'Back up only these disks (target dev, comma-separated: -i vda,vdb)' })
  .option('exclude', { alias: 'x', type: 'string', describe: 'Exclude these disks (-x vda,vdb)' })
  .option('socketfile', { alias: 'f', type: 'string', default: `/var/tmp/virtnbdbackup.${process.pid}`, describe: 'NBD server socket of the backup job' })
  .option('noprogress', { alias: 'n', type: 'boolean', default: false, describe: 'Disable progress bars' })
  .option('compress', { alias: 'z', type: 'number', describe: 'Compress with lz4 at this level (-z alone: level 2)' })
  .option('worker', { alias: 'w', type: 'number', describe: 'Disks backed up in parallel (default: all)' })
  .option('strict', { alias: 'e', type: 'boolean', default: false, describe: 'Exit with code 2 when warnings occurred' })
  .option('uri', { alias: 'U', type: 'string', default: 'qemu:///system', describe: 'libvirt connection URI' })
  .option('quiet', { type: 'boolean', default: false, describe: 'Only warnings and errors' })
  .option('nocolor', { type: 'boolean', default: false, describe: 'No colours in messages' })
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
  .strict()
  .wrap(Math.min(110, process.stdout.columns || 110))
  .parseSync();

await runCommand('virtnbdbackup', argv.verbose, async (signal) => {
  if (argv.output === '-' && process.stdout.isTTY) throw new UserError('-o - writes a zip archive to standard output: redirect it to a file or a pipe');
  const compressFlag = process.argv.slice(2).some((a) => a === '-z' || a === '--compress' || a.startsWith('--compress='));
  const compress = argv.compress !== undefined && !Number.isNaN(argv.compress) ? argv.compress : compressFlag ? 2 : false;
  const log = makeLogger(argv);
  const progress = makeProgress(argv, 'saving');
  try {
    const result = await backup({
      domain: argv.domain,
      uri: argv.uri,
      level: argv.level,
      output: argv.output,
      type: argv.type,
      raw: argv.raw,
      include: listOption(argv.include),
      exclude: listOption(argv.exclude),
      socketFile: argv.socketfile,
      scratchDir: argv.scratchdir,
      workers: argv.worker,
      compress,
      log,
      progress: progress.factory,
      signal,
    });
    progress.stop();
    for (const d of result.disks) log.info(`disk ${d.disk}: ${d.dataSize} bytes of data saved to ${d.file}`);
    log.info(`finished ${result.level} backup${result.checkpoint.create ? `, checkpoint ${result.checkpoint.name}` : ''}`);
  } finally {
    progress.stop();
  }
  return argv.strict && log.warnings > 0 ? 2 : 0;
});
