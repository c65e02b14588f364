// virtnbdmap: serve a backup as an NBD export. Not implemented yet; says so clearly.
import { runCommand } from './common.js';

await runCommand('virtnbdmap', false, async () => {
  process.stderr.write('virtnbdmap: not implemented yet\n');
  return 1;
});
