// Copies the files a domain boots from (loader, nvram, kernel, initrd) into the set with every backup, as
// virtnbdbackup does: `<basename>.<ident>`, or `<basename>` for a copy. Streamed through the output target,
// so zip output carries them too. Guarantees: a file that cannot be read is a warning, not a failed backup; each
// name is written once (a file named as two kinds is saved once; of two files of one name, the NVRAM's is kept).
import fs from 'node:fs/promises';
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

/** One file of the set: the boot file and the kinds the domain XML names it as. */
interface BootFile {
  file: string;
  kinds: string[];
  name: string;
}

/** What tells two paths of one file apart from two files: the device and inode here, the normalized path on another host. */
async function identityOf(host: DomainHost, file: string): Promise<string> {
  if (host.remote) return path.posix.normalize(file);
  return fs.stat(file).then((st) => `${st.dev}:${st.ino}`, () => path.normalize(file));
}

/**
 * The files to save, each once: a file the XML names as two kinds (kernel and initrd one image) is one file of the
 * set, where a zip got two entries of one name. Two files of one name cannot both be kept: the NVRAM's stays (a
 * restore puts it back), else the first's, and the other is a warning.
 */
async function planBootFiles(host: DomainHost, bootFiles: Record<string, string>, ident: string, log: Logger): Promise<BootFile[]> {
  const byName = new Map<string, BootFile & { identity: string }>();
  for (const [kind, file] of Object.entries(bootFiles)) {
    const name = bootFileName(file, ident);
    const identity = await identityOf(host, file);
    const taken = byName.get(name);
    if (!taken) {
      byName.set(name, { file, kinds: [kind], name, identity });
    } else if (taken.identity === identity) {
      taken.kinds.push(kind);
    } else {
      const keep = kind === 'nvram' ? { file, kinds: [kind], name, identity } : taken;
      const drop = keep === taken ? { file, kind } : { file: taken.file, kind: taken.kinds.join(' and ') };
      const kept = keep === taken ? `${taken.file} (${taken.kinds.join(' and ')})` : `${file} (${kind})`;
      log.warn(`boot files ${taken.file} (${taken.kinds.join(' and ')}) and ${file} (${kind}) have the same name, ${name}: the backup keeps the ${keep.kinds.includes('nvram') ? 'nvram\'s' : 'first'}, ${kept}; ${drop.file} (${drop.kind}) is not saved`);
      byName.set(name, keep);
    }
  }
  return [...byName.values()].map(({ file, kinds, name }) => ({ file, kinds, name }));
}

/** Copies each boot file from the domain's host into the set, once; one that cannot be read is a warning. */
export async function saveBootFiles(host: DomainHost, bootFiles: Record<string, string>, ident: string, target: OutputTarget, log: Logger): Promise<void> {
  for (const { file, kinds, name } of await planBootFiles(host, bootFiles, ident, log)) {
    const kind = kinds.join(' and ');
    try {
      await copyInto(host, file, target, name);
      log.info(`saved ${kind} ${file}${host.remote ? ` of ${host.label}` : ''} as ${name}`);
    } catch (err) {
      log.warn(`could not save ${kind} ${file}${host.remote ? ` of ${host.label}` : ''}: ${describeFailure(err)}`);
    }
  }
}
