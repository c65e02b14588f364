// Restores disks from a backup set at any point of its chain, and dumps stream metadata.
//   scan set -> per disk: chain (base, inc/diff in checkpoint order, cut at --until) -> new image (.partial)
//   -> qemu-nbd -> each stream's records written in order (zero frames of later links written as zeroes)
//   -> flush, stop qemu-nbd, rename -> copy the matching vmconfig
// Guarantees: never overwrites an existing file; each link is fully written before the next starts, so later
// changes win; a failed restore leaves only `<image>.partial` behind and names the file that broke it.
import fs from 'node:fs/promises';
import path from 'node:path';
import { NbdEndpoint } from '../endpoint/nbd.js';
import type { Endpoint } from '../endpoint/endpoint.js';
import { StreamReader } from '../stream/reader.js';
import type { StreamMetadata } from '../stream/format.js';
import {
  checkLinks, listSet, qcowInfoName, readChains, readCheckpointList, vmConfigName, type ChainLink,
} from '../set/backupSet.js';
import { parseDomainXml } from '../libvirt/domainXml.js';
import { ImageServer, createImage, qcow2CreateOptions } from './qemu.js';
import { Logger, silentLogger } from '../util/log.js';
import { UserError, oneLine } from '../util/errors.js';

export interface RestoreOptions {
  input: string;
  output: string;
  /** Stop after the link whose checkpoint has this name. */
  until?: string;
  /** Restore only this disk (target dev). */
  disk?: string;
  /** Socket for qemu-nbd; default /var/tmp/virtnbdrestore.<pid>.<disk>. */
  socketFile?: string;
  log?: Logger;
  progress?: (disk: string, total: number) => (bytes: number) => void;
  signal?: AbortSignal;
}

export interface RestoredDisk {
  disk: string;
  image: string;
  /** Data files applied, in order. */
  applied: string[];
}

/** Bytes of payload being written at most at once. */
const WRITE_WINDOW = 64 * 1024 * 1024;
const CONNECTIONS = 4;

/** The set's chains, checked and cut at `until`. */
export async function loadChains(input: string, until: string | undefined, onlyDisk: string | undefined): Promise<Map<string, ChainLink[]>> {
  const listing = await listSet(input);
  if (listing.partials.length > 0) {
    throw new UserError(`${path.join(input, listing.partials[0] as string)} is left from a failed backup run; the set is incomplete at that point: restore with --until an earlier checkpoint after moving the .partial file away`);
  }
  if (listing.dataFiles.length === 0) throw new UserError(`${input} is not a backup set: it holds no *.data files`);
  const cpt = listing.checkpointLists[0];
  const checkpoints = cpt ? await readCheckpointList(path.join(input, cpt)) : [];
  const chains = await readChains(listing, checkpoints);
  if (onlyDisk !== undefined) {
    for (const disk of [...chains.keys()]) if (disk !== onlyDisk) chains.delete(disk);
    if (chains.size === 0) throw new UserError(`no backup of disk ${onlyDisk} in ${input}`);
  }
  for (const [disk, chain] of chains) {
    checkLinks(chain);
    if (until !== undefined) {
      const end = chain.findIndex((l) => l.meta.checkpointName === until && l.level !== 'diff');
      if (end < 0) {
        const known = chain.filter((l) => l.level !== 'diff').map((l) => l.meta.checkpointName).join(', ');
        throw new UserError(`checkpoint ${until} is not in the chain of disk ${disk} in ${input} (it has: ${known})`);
      }
      chains.set(disk, chain.slice(0, end + 1));
    }
  }
  return chains;
}

/** Image file name of `disk` as in the domain XML saved with `ident`, or the target name. */
async function imageName(input: string, disk: string, ident: string): Promise<{ name: string; vmconfig?: string }> {
  const vmconfig = vmConfigName(ident);
  try {
    const info = parseDomainXml(await fs.readFile(path.join(input, vmconfig), 'utf8'));
    const source = info.disks.find((d) => d.target === disk)?.path;
    return { name: source ? path.basename(source) : disk, vmconfig };
  } catch {
    return { name: disk };
  }
}

function identOf(link: ChainLink): string {
  return link.level === 'full' ? link.meta.checkpointName : link.level === 'copy' ? 'copy' : link.ident;
}

export async function restore(options: RestoreOptions): Promise<RestoredDisk[]> {
  const log = options.log ?? silentLogger;
  const input = path.resolve(options.input);
  const output = path.resolve(options.output);
  const chains = await loadChains(input, options.until, options.disk);
  await fs.mkdir(output, { recursive: true });

  const restored: RestoredDisk[] = [];
  const vmconfigs = new Set<string>();
  for (const [disk, chain] of chains) {
    const last = chain[chain.length - 1] as ChainLink;
    const { name, vmconfig } = await imageName(input, disk, identOf(last));
    if (vmconfig) vmconfigs.add(vmconfig);
    const image = path.join(output, name);
    for (const existing of [image, `${image}.partial`]) {
      if (await fs.access(existing).then(() => true, () => false)) {
        throw new UserError(`${existing} already exists; restore into another directory or move it away (nothing is overwritten)`);
      }
    }
    restored.push(await restoreDisk(disk, chain, image, input, options, log));
  }
  for (const vmconfig of vmconfigs) {
    await fs.copyFile(path.join(input, vmconfig), path.join(output, vmconfig), fs.constants.COPYFILE_EXCL).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err;
    });
  }
  return restored;
}

async function restoreDisk(disk: string, chain: ChainLink[], image: string, input: string, options: RestoreOptions, log: Logger): Promise<RestoredDisk> {
  const base = chain[0] as ChainLink;
  const last = chain[chain.length - 1] as ChainLink;
  const format = base.meta.diskFormat === 'raw' ? 'raw' : 'qcow2';
  const qcowJson = await fs.readFile(path.join(input, qcowInfoName(disk, identOf(last))), 'utf8')
    .catch(() => fs.readFile(path.join(input, qcowInfoName(disk, identOf(base))), 'utf8'))
    .catch(() => undefined);
  const partial = `${image}.partial`;
  const createOptions = format === 'qcow2' ? qcow2CreateOptions(qcowJson) : [];
  log.info(`restoring disk ${disk} into ${image} (${format}${createOptions.length ? ` ${createOptions.join(',')}` : ''}) from ${chain.map((l) => l.file).join(', ')}`);
  await createImage(partial, format, base.meta.virtualSize, createOptions);

  const socket = options.socketFile ?? `/var/tmp/virtnbdrestore.${process.pid}.${disk}`;
  await fs.rm(socket, { force: true });
  const server = await ImageServer.start(partial, format, socket, disk, CONNECTIONS);
  let endpoint: Endpoint | undefined;
  try {
    endpoint = await NbdEndpoint.open({ socket, exportName: disk }, { connections: CONNECTIONS, sharedBackend: true });
    const total = chain.reduce((sum, l) => sum + l.meta.dataSize, 0);
    const progress = options.progress?.(disk, total);
    for (const [i, link] of chain.entries()) {
      await applyStream(link, endpoint, i === 0, progress, options.signal);
      log.debug(`applied ${link.file}`);
    }
    await endpoint.flush();
  } catch (err) {
    throw new UserError(`restore of disk ${disk} failed: ${oneLine(err)}; ${partial} is incomplete`);
  } finally {
    await endpoint?.close();
    await server.stop();
    await fs.rm(socket, { force: true });
  }
  await fs.rename(partial, image);
  return { disk, image, applied: chain.map((l) => l.file) };
}

/**
 * Writes one stream into the target. `fresh`: the target is a new image and reads as zero, so zero
 * frames need no write; otherwise they are written, which makes restores exact after trims.
 */
export async function applyStream(
  link: { path: string }, target: Endpoint, fresh: boolean, progress?: (bytes: number) => void, signal?: AbortSignal,
): Promise<StreamMetadata> {
  const reader = await StreamReader.open(link.path);
  const inFlight = new Set<Promise<void>>();
  let bytesInFlight = 0;
  let failure: unknown;
  const track = (work: Promise<void>, bytes: number): void => {
    bytesInFlight += bytes;
    const done = work.then(() => progress?.(bytes), (err) => { failure ??= err; }).finally(() => {
      bytesInFlight -= bytes;
      inFlight.delete(done);
    });
    inFlight.add(done);
  };
  try {
    for await (const record of reader.records()) {
      if (signal?.aborted) throw signal.reason ?? new Error('aborted');
      if (failure !== undefined) throw failure;
      if (record.kind === 'zero') {
        if (!fresh) track(target.zero(record.offset, record.length, true), 0);
      } else {
        const offset = record.offset;
        track(record.data.then((data) => target.write(data, offset)), record.length);
      }
      while (bytesInFlight > WRITE_WINDOW || inFlight.size > 64) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    if (failure !== undefined) throw failure;
    return reader.meta;
  } finally {
    await Promise.allSettled(inFlight);
    await reader.close();
  }
}

/** Metadata of every data file of the set, for `-o dump`. */
export async function dump(input: string): Promise<Array<{ file: string } & StreamMetadata>> {
  const listing = await listSet(path.resolve(input));
  if (listing.dataFiles.length === 0) throw new UserError(`${input} is not a backup set: it holds no *.data files`);
  const out: Array<{ file: string } & StreamMetadata> = [];
  for (const f of listing.dataFiles) {
    const meta = await StreamReader.metadata(path.join(listing.dir, f.file)).catch((err: Error) => {
      throw new UserError(err.message);
    });
    out.push({ file: f.file, ...meta });
  }
  return out;
}
