// One disk of a run: open its export, plan the extents (whole disk, or the changes since the parent checkpoint),
// write the stream (or a raw image) into the set, then its checksum and digest side files.
// Guarantees: the data file is complete under its name or left as `.partial`; the endpoint is always closed.
import { NbdEndpoint } from '../endpoint/nbd.js';
import { CONTEXT_ALLOCATION, type Endpoint } from '../endpoint/endpoint.js';
import { planDirty, planFull } from '../extents/plan.js';
import { writeStream } from '../stream/writer.js';
import { fillAndCommit, type OutputTarget } from '../set/target.js';
import { checksumFileName, dataFileName, digestFileName, writeDigestFile } from '../set/backupSet.js';
import type { DomainDisk } from '../libvirt/domainXml.js';
import type { Level } from '../libvirt/checkpoints.js';
import type { Logger } from '../util/log.js';
import { UserError, describeFailure, errnoOf, raisedBy } from '../util/errors.js';
import { writeRawImage } from './rawImage.js';
import { denseExtents, qemuImgExtents } from './extentSources.js';
import type { DiskExports } from './offline.js';
import type { RunPlan } from './runPlan.js';

export interface DiskResult {
  disk: string;
  file: string;
  dataSize: number;
  virtualSize: number;
  bytesWritten: number;
}

export interface DiskRunOptions {
  plan: RunPlan;
  /** Names this run's inc/diff files (checkpoint name or diff seconds). */
  ident: string;
  /** libvirt's identity (checkpointIdentity) of the checkpoints the streams name, where it could be read. */
  identities?: ReadonlyMap<string, string>;
  exports: DiskExports;
  /** The domain is shut off: its diffs name their parent as their checkpoint, as Python's offline backups do. */
  offline?: boolean;
  target: OutputTarget;
  /** NBD connections for this disk. */
  connections: number;
  /** Disks the run copies at the same time. */
  disksAtOnce: number;
  /** --nbd-timeout: seconds without an answer before the disk fails (0: forever); default DEFAULT_NBD_TIMEOUT. */
  nbdTimeout?: number;
  type?: 'stream' | 'raw';
  compress: number | false;
  /** -q: extents from qemu-img map. */
  qemuExtents?: boolean;
  /** --no-sparse-detection: inc/diff store every changed range as data, zeroed ones too. */
  noSparseDetection?: boolean;
  progress?: (disk: string, total: number) => (bytes: number) => void;
  /** Called once the disk's first reads are under way. */
  onReading?: () => void;
  /** Called once every read of the disk is done and its connections are closed: the export is no longer needed. */
  onSourceRead?: () => void;
  signal: AbortSignal;
  log: Logger;
}

/** The export of `disk` with the extent source the options ask for. */
async function openSource(disk: DomainDisk, incremental: boolean, options: DiskRunOptions): Promise<Endpoint> {
  const address = options.exports.address(disk.target);
  const contexts = incremental ? [CONTEXT_ALLOCATION, options.exports.dirtyContext(disk.target)] : [CONTEXT_ALLOCATION];
  let endpoint: Endpoint = await NbdEndpoint.open(address, { metaContexts: contexts, connections: options.connections, stallTimeout: options.nbdTimeout });
  if (options.qemuExtents) endpoint = qemuImgExtents(endpoint, address);
  if (options.noSparseDetection && incremental) endpoint = denseExtents(endpoint);
  return endpoint;
}

/** A failure writing `partial`, the data file of `disk`, in words: its NBD export's, or the file's (gone, full...). */
export function writeFailure(disk: DomainDisk, partial: string, err: unknown): Error {
  if (err instanceof UserError) return err; // an interrupt, or another disk's failure
  if (raisedBy(err, 'libnbd')) {
    return new UserError(`backup of disk ${disk.target} failed reading its NBD export: ${describeFailure(err)}`);
  }
  // A file the run made, gone from under it: something removed the set directory (a clean-up script, say).
  const gone = errnoOf(err) === 'ENOENT' ? `it or its directory is gone (ENOENT): was the set directory removed during the backup?` : undefined;
  return new UserError(`backup of disk ${disk.target} failed writing ${partial}: ${gone ?? describeFailure(err)}`);
}

export async function backupDisk(disk: DomainDisk, options: DiskRunOptions): Promise<DiskResult> {
  const { plan, target, log, signal } = options;
  const level: Level = disk.format === 'raw' ? 'copy' : plan.addedDisks.includes(disk.target) ? 'full' : plan.level;
  const incremental = level === 'inc' || level === 'diff';
  // A disk of 0 bytes is read whole in an inc (RunPlan.emptyDisks): no dirty bitmap is exported for it.
  const readsDirty = incremental && !plan.emptyDisks.includes(disk.target);
  const endpoint = await openSource(disk, readsDirty, options);
  const sourceRead = async (): Promise<void> => {
    await endpoint.close();
    options.onSourceRead?.();
  };
  try {
    const extents = readsDirty ? await planDirty(endpoint, options.exports.dirtyContext(disk.target)) : await planFull(endpoint);
    const file = dataFileName(disk.target, level, options.ident);
    const partial = `${target.pathOf(file)}.partial`;
    log.info(`disk ${disk.target}: ${extents.dataSize} bytes of data in ${extents.extents.length} extents of ${endpoint.size} bytes, writing ${file}`);
    const onProgress = options.progress?.(disk.target, extents.dataSize);
    const result = { disk: disk.target, file, dataSize: extents.dataSize, virtualSize: endpoint.size };
    // A raw-format disk is saved as a raw image, as Python's virtnbdbackup saves it, whose restore copies such a file
    // as it is (a stream there became a "disk" of frame headers). -r is refused with -o - (as Python refuses it).
    if ((options.type === 'raw' || disk.format === 'raw') && target.createPositional) {
      const checksum = await fillAndCommit(await target.createPositional(file, endpoint.size), async (image) => {
        const copying = writeRawImage(endpoint, extents, image, onProgress, signal);
        options.onReading?.();
        const sum = await copying;
        await sourceRead();
        return sum;
      }).catch((err: unknown) => { throw writeFailure(disk, partial, err); });
      await target.writeFile(checksumFileName(file), String(checksum));
      return { ...result, bytesWritten: endpoint.size };
    }
    const parent = level === 'full' ? '' : plan.resumedDisks.find((r) => r.target === disk.target)?.from ?? plan.checkpoint.parent;
    const written = await fillAndCommit(await target.create(file, { bulk: true }), async (sink) => {
      const writing = writeStream({
        source: endpoint,
        plan: extents,
        sink,
        meta: {
          date: new Date().toISOString(),
          diskName: disk.target,
          diskFormat: disk.format,
          // A diff names the checkpoint it follows, online or offline: Python's restore stops (-u) at the first file
          // naming that checkpoint, and a diff naming the next one, which the next inc makes, ended a restore to
          // that point at the diff, before its inc (Python's own online diffs do so).
          checkpointName: level === 'diff' ? parent : plan.checkpoint.name,
          parentCheckpoint: parent,
          incremental,
          checkpointIdentity: level === 'diff' ? undefined : options.identities?.get(plan.checkpoint.name),
          parentCheckpointIdentity: parent ? options.identities?.get(parent) : undefined,
        },
        compress: options.compress,
        onProgress,
        digests: true,
        streamsAtOnce: options.disksAtOnce,
        sinkCopies: target.copiesWrites,
        signal,
      });
      options.onReading?.();
      const streamed = await writing;
      await sourceRead();
      return streamed;
    }).catch((err: unknown) => { throw writeFailure(disk, partial, err); });
    await target.writeFile(checksumFileName(file), String(written.checksum));
    // Named as the data file's failures are (a full disk is said so, with what to do), not as Node's bare errno.
    const digests = digestFileName(file);
    await writeDigestFile(target, file, written.digests ?? []).catch((err: unknown) => { throw writeFailure(disk, `${target.pathOf(digests)}.partial`, err); });
    return { ...result, bytesWritten: written.bytesWritten };
  } finally {
    await endpoint.close();
  }
}
