// Copies the files a domain boots from (loader, nvram, kernel, initrd) into the set with every backup, as
// virtnbdbackup does: `<basename>.<ident>`, or `<basename>` for a copy. Streamed through the output target,
// so zip output carries them too. Guarantees: a file that cannot be read is a warning, not a failed backup.
import fsp from 'node:fs/promises';
import path from 'node:path';
import { fillAndCommit, type OutputTarget } from '../set/target.js';
import type { Logger } from '../util/log.js';
import { describeFailure } from '../util/errors.js';

export function bootFileName(file: string, ident: string): string {
  return ident === 'copy' ? path.basename(file) : `${path.basename(file)}.${ident}`;
}

async function copyInto(source: string, target: OutputTarget, name: string): Promise<void> {
  // Opened before the set's file is created, so a missing source leaves no .partial behind.
  const handle = await fsp.open(source, 'r');
  const sink = await target.create(name).catch(async (err: unknown) => {
    await handle.close();
    throw err;
  });
  await fillAndCommit(sink, async () => {
    for await (const chunk of handle.createReadStream({ highWaterMark: 1024 * 1024 })) await sink.write([chunk as Buffer]);
  });
}

export async function saveBootFiles(bootFiles: Record<string, string>, ident: string, target: OutputTarget, log: Logger): Promise<void> {
  for (const [kind, file] of Object.entries(bootFiles)) {
    const name = bootFileName(file, ident);
    try {
      await copyInto(file, target, name);
      log.info(`saved ${kind} ${file} as ${name}`);
    } catch (err) {
      log.warn(`could not save ${kind} ${file}: ${describeFailure(err)}`);
    }
  }
}
