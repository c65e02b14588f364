// Copies the files a domain boots from (loader, nvram, kernel, initrd) into the set with every backup, as
// virtnbdbackup does: `<basename>.<ident>`, or `<basename>` for a copy. Streamed through the output target,
// so zip output carries them too. Guarantees: a file that cannot be read is a warning, not a failed backup.
import path from 'node:path';
import { fillAndCommit, type OutputTarget } from '../set/target.js';
import type { Logger } from '../util/log.js';
import type { DomainHost } from '../libvirt/domainHost.js';
import { describeFailure } from '../util/errors.js';

export function bootFileName(file: string, ident: string): string {
  return ident === 'copy' ? path.basename(file) : `${path.basename(file)}.${ident}`;
}

async function copyInto(host: DomainHost, source: string, target: OutputTarget, name: string): Promise<void> {
  // Opened before the set's file is created, so a missing source leaves no .partial (nor a zip entry) behind.
  const chunks = await host.openRead(source);
  const sink = await target.create(name).catch(async (err: unknown) => {
    await chunks[Symbol.asyncIterator]().return?.(); // closes the file (or ends the remote read)
    throw err;
  });
  await fillAndCommit(sink, async () => {
    for await (const chunk of chunks) await sink.write([chunk]);
  });
}

/** Copies each boot file from the domain's host into the set; one that cannot be read is a warning. */
export async function saveBootFiles(host: DomainHost, bootFiles: Record<string, string>, ident: string, target: OutputTarget, log: Logger): Promise<void> {
  for (const [kind, file] of Object.entries(bootFiles)) {
    const name = bootFileName(file, ident);
    try {
      await copyInto(host, file, target, name);
      log.info(`saved ${kind} ${file}${host.remote ? ` of ${host.label}` : ''} as ${name}`);
    } catch (err) {
      log.warn(`could not save ${kind} ${file}${host.remote ? ` of ${host.label}` : ''}: ${describeFailure(err)}`);
    }
  }
}
