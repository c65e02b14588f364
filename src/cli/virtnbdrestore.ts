// virtnbdrestore: command-line front of restore and dump, flags and defaults as virtnbdbackup 2.x.
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { dump, restore } from '../restore/restore.js';
import { VERSION, makeLogger, makeProgress, runCommand } from './common.js';

const argv = yargs(hideBin(process.argv))
  .scriptName('virtnbdrestore')
  .usage('$0 -i SETDIR -o OUTDIR [options]\n\nRestore virtual machine disks from a backup set.')
  .option('action', { alias: 'a', choices: ['dump', 'restore'] as const, default: 'restore' as const, describe: 'Action to perform' })
  .option('input', { alias: 'i', type: 'string', demandOption: true, describe: 'Directory holding a backup set' })
  .option('output', { alias: 'o', type: 'string', demandOption: true, describe: "Restore target directory ('dump' prints metadata)" })
  .option('until', { alias: 'u', type: 'string', describe: 'Restore only up to this checkpoint (point in time)' })
  .option('disk', { alias: 'd', type: 'string', describe: 'Restore only the disk with this target dev' })
  .option('socketfile', { alias: 'f', type: 'string', describe: 'Socket for the local NBD server (default under /var/tmp)' })
  .option('noprogress', { alias: 'n', type: 'boolean', default: false, describe: 'Disable progress bars' })
  .option('quiet', { type: 'boolean', default: false, describe: 'Only warnings and errors' })
  .option('nocolor', { type: 'boolean', default: false, describe: 'No colours in messages' })
  .option('verbose', { alias: 'v', type: 'boolean', default: false, describe: 'Debug output' })
  .version('version', 'Show version and exit', VERSION)
  .alias('version', 'V')
  .help('help')
  .alias('help', 'h')
  .example('$0 -i /backup/webvm -o dump', 'print the metadata of every data file')
  .example('$0 -i /backup/webvm -o /restore', 'restore all disks at the latest point')
  .example('$0 -i /backup/webvm -o /restore --until virtnbdbackup.2', 'point-in-time restore')
  .example('$0 -i /backup/webvm -o /restore -d vda', 'restore only disk vda')
  .strict()
  .wrap(Math.min(110, process.stdout.columns || 110))
  .parseSync();

await runCommand('virtnbdrestore', argv.verbose, async (signal) => {
  if (argv.action === 'dump' || argv.output === 'dump') {
    for (const meta of await dump(argv.input)) process.stdout.write(`${JSON.stringify(meta)}\n`);
    return 0;
  }
  const log = makeLogger(argv);
  const progress = makeProgress(argv, 'restoring');
  try {
    const disks = await restore({
      input: argv.input, output: argv.output, until: argv.until, disk: argv.disk, socketFile: argv.socketfile,
      log, progress: progress.factory, signal,
    });
    progress.stop();
    for (const d of disks) log.info(`disk ${d.disk} restored to ${d.image} (${d.applied.join(', ')})`);
  } finally {
    progress.stop();
  }
  return 0;
});
