// Backup sets crafted without libvirt, for restore and verify tests: streams written by the engine's own
// writeStream from an in-memory disk, with the side files a backup writes beside them (.chksum, .blake3.json,
// vmconfig, qcow.json), so a test can build exactly the set it needs (raw disks, data files, chains) in milliseconds.
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Endpoint, StatusExtent } from '../../src/endpoint/endpoint.js';
import type { PlannedExtent } from '../../src/extents/plan.js';
import type { Sink } from '../../src/set/target.js';
import { writeStream } from '../../src/stream/writer.js';
import { CHECKPOINT_DIR, checksumFileName, vmConfigName, writeDigestFile } from '../../src/set/backupSet.js';
import { DirectoryTarget } from '../../src/set/target.js';

/** A disk held in memory: the source a crafted stream is read from, and the reference a restore is compared with. */
export class MemoryDisk implements Endpoint {
  readonly bytes: Buffer;
  readonly maxRequestSize = 32 * 1024 * 1024;
  readonly parallelism = 4;

  constructor(readonly size: number) {
    this.bytes = Buffer.alloc(size);
  }

  /** Fills [offset, offset+length) with `pattern`. */
  fill(pattern: number, offset: number, length: number): this {
    this.bytes.fill(pattern, offset, offset + length);
    return this;
  }

  async read(buffer: Buffer, offset: number): Promise<void> {
    this.bytes.copy(buffer, 0, offset, offset + buffer.length);
  }

  async write(buffer: Buffer, offset: number): Promise<void> {
    buffer.copy(this.bytes, offset);
  }

  async zero(offset: number, length: number): Promise<void> {
    this.bytes.fill(0, offset, offset + length);
  }

  async flush(): Promise<void> {}

  async *extents(): AsyncIterable<StatusExtent> {
    throw new Error('MemoryDisk has no extents: crafted streams name theirs');
  }

  async close(): Promise<void> {}

  /** The disk as a raw image file (the reference for qemu-img compare). */
  async saveRaw(file: string): Promise<string> {
    await fs.writeFile(file, this.bytes);
    return file;
  }
}

class FileSink implements Sink {
  constructor(private readonly handle: fs.FileHandle) {}
  async write(buffers: Buffer[]): Promise<void> {
    for (const b of buffers) await this.handle.write(b);
  }
  async commit(): Promise<void> {
    await this.handle.close();
  }
  async abort(): Promise<void> {
    await this.handle.close();
  }
}

export interface CraftedStream {
  dir: string;
  /** Data file name, e.g. vda.full.data. */
  file: string;
  disk: MemoryDisk;
  /** What the stream holds: data ranges are read from `disk`, zero ranges carry no payload. */
  extents: PlannedExtent[];
  diskName: string;
  diskFormat?: string;
  checkpointName?: string;
  parentCheckpoint?: string;
  incremental?: boolean;
  compress?: number | false;
  /** libvirt's creation time and description of the stream's checkpoint, as ours writes it. */
  checkpointIdentity?: string;
  /** The metadata's date (default: now, as ours writes it). */
  date?: string;
}

/** Writes a stream and its .chksum and .blake3.json, as backup does. Returns the data file's path. */
export async function craftStream(s: CraftedStream): Promise<string> {
  const file = path.join(s.dir, s.file);
  const sink = new FileSink(await fs.open(file, 'wx'));
  const dataSize = s.extents.filter((e) => e.kind === 'data').reduce((sum, e) => sum + e.length, 0);
  const result = await writeStream({
    source: s.disk,
    plan: { extents: s.extents, dataSize },
    sink,
    meta: {
      date: s.date ?? new Date().toISOString(), diskName: s.diskName, diskFormat: s.diskFormat ?? 'qcow2',
      checkpointName: s.checkpointName ?? 'virtnbdbackup.0', parentCheckpoint: s.parentCheckpoint ?? '', incremental: s.incremental ?? false,
      ...(s.checkpointIdentity === undefined ? {} : { checkpointIdentity: s.checkpointIdentity }),
    },
    compress: s.compress ?? false,
    digests: true,
  });
  await sink.commit();
  await fs.writeFile(checksumFileName(file), String(result.checksum));
  await writeDigestFile(new DirectoryTarget(s.dir), s.file, result.digests ?? []);
  return file;
}

export interface CraftedDiskXml {
  target: string;
  /** Source image path (its basename names the restored image). */
  file: string;
  format: string;
  device?: 'disk' | 'cdrom' | 'floppy';
}

/** The UUID of every crafted domain XML. */
export const CRAFTED_UUID = '8f0e2a9c-1f7e-4c55-9a53-0d1f6a2b3c4d';

/**
 * Writes checkpoints/<name>.xml as a backup saves libvirt's definition of a checkpoint: `definition` (the XML the
 * checkpoint was created with) with its creation time and a copy of the domain (of `uuid`, the crafted one's by
 * default).
 */
export async function craftCheckpointDefinition(dir: string, name: string, definition: string, { creationTime = 1_800_000_000, uuid = CRAFTED_UUID } = {}): Promise<string> {
  const saved = definition.replace('</domaincheckpoint>', `  <creationTime>${creationTime}</creationTime>\n  <domain type='qemu'>\n    <name>crafted</name>\n    <uuid>${uuid}</uuid>\n  </domain>\n</domaincheckpoint>`);
  await fs.mkdir(path.join(dir, CHECKPOINT_DIR), { recursive: true });
  const file = path.join(dir, CHECKPOINT_DIR, `${name}.xml`);
  await fs.writeFile(file, saved);
  return file;
}

/** Writes vmconfig.<ident>.xml for a domain with these disks (and this NVRAM file, if given). */
export async function craftVmConfig(dir: string, ident: string, name: string, disks: CraftedDiskXml[], nvram?: string): Promise<string> {
  const xml = `<domain type='qemu'>
  <name>${name}</name>
  <uuid>${CRAFTED_UUID}</uuid>
  <memory unit='MiB'>128</memory>
  <os><type arch='x86_64'>hvm</type>${nvram ? `<nvram>${nvram}</nvram>` : ''}</os>
  <devices>${disks.map((d) => `
    <disk type='file' device='${d.device ?? 'disk'}'>
      <driver name='qemu' type='${d.format}'/>
      <source file='${d.file}'/>
      <target dev='${d.target}' bus='${d.device === 'cdrom' ? 'sata' : 'virtio'}'/>
    </disk>`).join('')}
  </devices>
</domain>
`;
  const file = path.join(dir, vmConfigName(ident));
  await fs.writeFile(file, xml);
  return file;
}

/** Flips every bit of the byte at `offset` of `file`. */
export async function flipByte(file: string, offset: number): Promise<void> {
  const handle = await fs.open(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    await handle.read(b, 0, 1, offset);
    b[0] = (b[0] as number) ^ 0xff;
    await handle.write(b, 0, 1, offset);
  } finally {
    await handle.close();
  }
}

const MiB = 1024 * 1024;

/**
 * A set (full backups) of qcow2 disks of `sizeMiB` MiB of random data each: compressing or writing it takes a while.
 * The disks named in `scattered` hold it in 512-byte extents 2 KiB apart (the rest zero), so that restoring them takes tens of thousands of writes: long enough to be caught in mid-write,
 * however fast or loaded the machine.
 */
export async function randomSet(work: string, disks: Record<string, number>, scattered: string[] = []): Promise<{ set: string; refs: Record<string, string> }> {
  const set = path.join(work, 'set');
  await fs.mkdir(set);
  const refs: Record<string, string> = {};
  for (const [target, sizeMiB] of Object.entries(disks)) {
    const disk = new MemoryDisk(sizeMiB * MiB);
    randomFillSync(disk.bytes);
    let extents: PlannedExtent[] = [{ offset: 0, length: sizeMiB * MiB, kind: 'data' }];
    if (scattered.includes(target)) {
      extents = [];
      for (let offset = 0; offset < sizeMiB * MiB; offset += 2048) {
        disk.bytes.fill(0, offset + 512, offset + 2048);
        extents.push({ offset, length: 512, kind: 'data' });
      }
    }
    await craftStream({ dir: set, file: `${target}.full.data`, disk, diskName: target, extents });
    refs[target] = await disk.saveRaw(path.join(work, `${target}.ref`));
  }
  await craftVmConfig(set, 'virtnbdbackup.0', 'rnd', Object.keys(disks).map((target) => ({ target, file: `/vm/${target}.qcow2`, format: 'qcow2' })));
  return { set, refs };
}
