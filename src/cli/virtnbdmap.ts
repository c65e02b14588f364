// virtnbdmap: command-line front of the map engine, flags as virtnbdbackup 2.x (plus --socket, --overlay-dir, -H, --nocolor):
// serves a backup at a point in time over NBD until Ctrl-C / SIGTERM, then cleans up and exits 0.
import os from 'node:os';
import path from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { defaultSocket, startMap } from '../map/map.js';
import { DEFAULT_MAX_REQUEST_SIZE } from '../stream/format.js';
import { DEFAULT_TLS_CERT_DIR } from '../endpoint/nbd.js';
import { UserError } from '../util/errors.js';
import { checkTcpPort } from '../util/tcpPort.js';
import { listOption, makeLogger, parseFlags, runCommand, VERSION, withLogFile, flagsCwd } from './common.js';

const argv = parseFlags('virtnbdmap', yargs(hideBin(process.argv), flagsCwd())
  .scriptName('virtnbdmap')
  .usage('$0 -f FILE[,FILE...] [options]\n\nServe a backup (full, then incrementals up to the point wanted) as an NBD export:\n'
    + 'writable through a copy-on-write overlay that is discarded at exit, or read-only with -r.')
  .option('file', { alias: 'f', type: 'string', demandOption: true, describe: 'Backup files to map: the full (or copy) data file, then incrementals in order, comma-separated' })
  .option('blocksize', { alias: 'b', type: 'number', default: DEFAULT_MAX_REQUEST_SIZE, describe: 'Largest request clients are told to send, in bytes (a power of two)' })
  .option('device', { alias: 'd', type: 'string', default: '/dev/nbd0', describe: "Kernel block device to attach (needs the nbd module; '' for none)" })
  .option('export-name', { alias: 'e', type: 'string', default: 'sda', describe: 'NBD export name' })
  .option('threads', { alias: 't', type: 'number', default: 8, describe: 'Requests served at the same time' })
  .option('listen-address', { alias: 'l', type: 'string', default: '127.0.0.1', describe: 'TCP address to listen on' })
  .option('listen-port', { alias: 'p', type: 'number', default: 10809, describe: 'TCP port to listen on (0: any free port)' })
  .option('socket', { type: 'string', default: defaultSocket(), describe: 'Unix socket to listen on (a default one left by a killed virtnbdmap is removed by the next)' })
  .option('overlay-dir', { type: 'string', default: '/var/tmp', describe: 'Where the copy-on-write overlay of writes goes (deleted at exit)' })
  .option('noprogress', { alias: 'n', type: 'boolean', default: false, describe: 'Disable progress bar (mapping reads only frame headers: nothing to show)' })
  .option('tls', { type: 'boolean', default: false, describe: 'The TCP export requires TLS, with client certificates signed by the CA of --tls-cert (the unix socket stays plain)' })
  .option('tls-cert', { type: 'string', default: DEFAULT_TLS_CERT_DIR, describe: '--tls: directory of ca-cert.pem, server-cert.pem and server-key.pem' })
  .option('tls-psk', { type: 'string', describe: 'The TCP export requires TLS with a pre-shared key of this file (username:hexkey lines, as psktool writes) instead of certificates' })
  .group(['file', 'blocksize', 'device', 'export-name', 'threads', 'listen-address', 'listen-port', 'socket', 'overlay-dir', 'noprogress', 'tls', 'tls-cert', 'tls-psk'], 'General options:')
  .option('logfile', { alias: 'L', type: 'string', default: `${os.homedir()}/virtnbdmap.log`, describe: 'Also log to this file' })
  .option('nocolor', { type: 'boolean', default: false, describe: 'No colours in messages' })
  .group(['logfile', 'nocolor'], 'Logging options:')
  .option('readonly', { alias: 'r', type: 'boolean', default: false, describe: 'Serve read-only (no copy-on-write overlay)' })
  .option('verbose', { alias: 'v', type: 'boolean', default: false, describe: 'Debug output' })
  .option('hexdump', { alias: 'H', type: 'boolean', default: false, describe: 'Hex dump of every NBD message head' })
  .version('version', 'Show version and exit', VERSION)
  .alias('version', 'V')
  .group(['readonly', 'verbose', 'hexdump', 'version'], 'Debug options:')
  .help('help')
  .alias('help', 'h')
  .example('$0 -f /backup/sda.full.data', 'serve the full backup; Ctrl-C to stop')
  .example('$0 -f /backup/sda.full.data,/backup/sda.inc.virtnbdbackup.1.data -d /dev/nbd2', 'the point of the first incremental, as /dev/nbd2')
  .example('$0 -f /backup/vda.full.data -r -p 0 --socket /run/vda.sock', 'read-only, any free TCP port, own socket')
  .example('$0 -f /backup/vda.full.data -l 0.0.0.0 --tls', 'to other hosts over TLS (certificates in /etc/pki/qemu)'),
// -d '' attaches no device; -e '' is NBD's default export name.
{ emptyAllowed: ['device', 'export-name'], extensions: ['socket', 'overlay-dir', 'nocolor', 'hexdump', 'tls', 'tls-cert', 'tls-psk'] });

/** `offset  hex bytes  |ascii|` lines of `bytes`. */
function hexdump(bytes: Buffer): string[] {
  const lines: string[] = [];
  for (let at = 0; at < bytes.length; at += 16) {
    const row = bytes.subarray(at, at + 16);
    const hex = [...row].map((b) => b.toString(16).padStart(2, '0')).join(' ');
    const text = [...row].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(`  ${at.toString(16).padStart(4, '0')}  ${hex.padEnd(47)}  |${text}|`);
  }
  return lines;
}

void runCommand('virtnbdmap', argv.verbose, async (signal) => {
  const log = makeLogger(argv);
  await withLogFile(log, argv.logfile, async () => {
    const files = listOption(argv.file, '-f/--file') ?? [];
    // NBD clients (QEMU) take only a power of two as the preferred block size.
    if (!Number.isInteger(argv.blocksize) || argv.blocksize < 512 || argv.blocksize > 2 ** 30 || (argv.blocksize & (argv.blocksize - 1)) !== 0) {
      throw new UserError(`-b ${argv.blocksize}: the block size must be a power of two between 512 and 1 GiB (1 GiB = 1073741824)`);
    }
    if (!Number.isInteger(argv.threads) || argv.threads < 1) throw new UserError(`-t ${argv.threads}: give at least 1 thread`);
    const port = checkTcpPort(argv['listen-port'], '-p', { anyFree: true });
    const session = await startMap({
      files,
      exportName: argv['export-name'],
      readOnly: argv.readonly,
      socket: argv.socket,
      listenAddress: argv['listen-address'],
      port,
      maxBlockSize: argv.blocksize,
      threads: argv.threads,
      device: argv.device || undefined,
      overlayParent: argv['overlay-dir'],
      tlsCertificates: argv.tls ? argv['tls-cert'] : undefined,
      tlsPskFile: argv['tls-psk'],
      log,
      trace: argv.hexdump ? (direction, what, bytes) => log.block('info', [`${direction === 'in' ? '>' : '<'} ${what}`, ...hexdump(bytes)].join('\n')) : undefined,
      signal,
    });
    try {
      // Stopped while it started: no URIs of a server about to go.
      signal.throwIfAborted();
      log.info(`serving ${session.description}, ${argv.readonly ? 'read-only' : `writable (copy-on-write overlay in ${session.overlayDir}, discarded at exit)`}`);
      for (const uri of session.uris) process.stdout.write(`${uri}\n`);
      log.info('press Ctrl-C to stop');
      if (!signal.aborted) await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
      log.info(`stopping: disconnecting ${session.server.connectionCount} client(s)`);
    } finally {
      await session.stop();
    }
    log.info(`stopped; removed ${path.resolve(argv.socket)}${session.overlayDir ? ` and ${session.overlayDir}` : ''}`);
  });
  return 0;
}, { servesUntilStopped: true });
