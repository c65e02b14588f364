// Copy-on-write over a read-only Endpoint: writes land in a sparse overlay file in a fresh temp directory, in
// COW_BLOCK-sized blocks, and one byte per block says where that block now reads from (base, overlay, zero).
//   write:  block already in the overlay -> write in place; else, under the block's lock: its new content
//           (base or zeros, merged with the write) goes to the overlay, then the block is marked as copied
//   zero:   whole blocks are just marked zero; partial blocks are written as zeros
//   read / extents: runs of blocks in the same state, from base, overlay or zeros
// Guarantees: the base is never written; a block is marked copied only once its full content is in the overlay,
// so concurrent readers never see a half-copied block; close() deletes the overlay, and the overlay of a server
// that was killed is deleted when the next one starts (its directory names its pid). The block map (1 byte per
// 64 KiB of disk) is allocated on the first write only.
import fs from 'node:fs/promises';
import type { Stats } from 'node:fs';
import path from 'node:path';
import { CONTEXT_ALLOCATION, STATE_HOLE, STATE_ZERO, type Endpoint, type StatusExtent } from '../endpoint/endpoint.js';
import { coalesce } from './coalesce.js';
import { readInto, writeAt } from '../util/fileIo.js';
import { describeFailure } from '../util/errors.js';
import { silentLogger, type Logger } from '../util/log.js';
import { leftoversOfGoneRuns } from './leftovers.js';
import { processStart } from '../util/process.js';

/** Copy-on-write granularity: a smaller write costs one read of the base block, once. */
export const COW_BLOCK = 64 * 1024;

const FROM_BASE = 0;
const IN_OVERLAY = 1;
const ZEROED = 2;
type BlockState = typeof FROM_BASE | typeof IN_OVERLAY | typeof ZEROED;

interface Run {
  state: BlockState;
  from: number;
  to: number;
}

export class CopyOnWriteEndpoint implements Endpoint {
  private states: Uint8Array | undefined;
  /** Blocks being copied into the overlay or re-marked: the tail of each block's queue of such changes. */
  private readonly locks = new Map<number, Promise<void>>();

  private constructor(
    private readonly base: Endpoint,
    /** Directory holding the overlay, removed by close(). */
    readonly overlayDir: string,
    private readonly overlay: fs.FileHandle,
  ) {}

  /** A copy-on-write view of `base` with its overlay in a new directory under `parentDir`. */
  static async create(base: Endpoint, parentDir: string, log: Logger = silentLogger): Promise<CopyOnWriteEndpoint> {
    const dir = await fs.mkdtemp(path.join(parentDir, `virtnbdmap.${process.pid}.${processStart(process.pid) ?? 0}.`));
    try {
      const overlay = await fs.open(path.join(dir, 'overlay.img'), 'w+', 0o600);
      return new CopyOnWriteEndpoint(base, dir, overlay);
    } catch (err) {
      await fs.rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  get size(): number { return this.base.size; }
  get maxRequestSize(): number { return this.base.maxRequestSize; }
  get parallelism(): number { return this.base.parallelism; }

  /** Runs of blocks with the same state over [offset, offset+length). */
  private *runs(offset: number, length: number): Generator<Run> {
    const end = offset + length;
    if (!this.states) {
      if (length > 0) yield { state: FROM_BASE, from: offset, to: end };
      return;
    }
    let from = offset;
    while (from < end) {
      const state = this.states[Math.floor(from / COW_BLOCK)] as BlockState;
      let to = Math.min(end, (Math.floor(from / COW_BLOCK) + 1) * COW_BLOCK);
      while (to < end && this.states[to / COW_BLOCK] === state) to = Math.min(end, to + COW_BLOCK);
      yield { state, from, to };
      from = to;
    }
  }

  async read(buffer: Buffer, offset: number): Promise<void> {
    checkBounds(offset, buffer.length, this.size);
    const pieces: Promise<unknown>[] = [];
    for (const run of this.runs(offset, buffer.length)) {
      const target = buffer.subarray(run.from - offset, run.to - offset);
      if (run.state === FROM_BASE) pieces.push(this.base.read(target, run.from));
      // The overlay is sparse and only as long as its furthest block: past its end it reads as zeros.
      else if (run.state === IN_OVERLAY) pieces.push(readInto(this.overlay, target, run.from).then((n) => target.fill(0, n)));
      else target.fill(0);
    }
    await Promise.all(pieces);
  }

  async write(buffer: Buffer, offset: number): Promise<void> {
    checkBounds(offset, buffer.length, this.size);
    const states = this.blockStates();
    const pieces: Promise<unknown>[] = [];
    const end = offset + buffer.length;
    for (let block = Math.floor(offset / COW_BLOCK); block * COW_BLOCK < end; block++) {
      const from = Math.max(offset, block * COW_BLOCK);
      const to = Math.min(end, (block + 1) * COW_BLOCK);
      const piece = buffer.subarray(from - offset, to - offset);
      if (states[block] === IN_OVERLAY && !this.locks.has(block)) pieces.push(writeAt(this.overlay, piece, from));
      else pieces.push(this.copyIn(block, piece, from));
    }
    await Promise.all(pieces);
  }

  /** Under the block's lock: puts the block's full new content (old content merged with `piece`) in the overlay. */
  private copyIn(block: number, piece: Buffer, at: number): Promise<void> {
    return this.locked(block, async () => {
      const states = this.blockStates();
      if (states[block] === IN_OVERLAY) {
        await writeAt(this.overlay, piece, at);
        return;
      }
      const start = block * COW_BLOCK;
      const content = Buffer.alloc(Math.min(COW_BLOCK, this.size - start));
      if (piece.length < content.length && states[block] === FROM_BASE) await this.base.read(content, start);
      piece.copy(content, at - start);
      await writeAt(this.overlay, content, start);
      states[block] = IN_OVERLAY;
    });
  }

  async zero(offset: number, length: number): Promise<void> {
    checkBounds(offset, length, this.size);
    const states = this.blockStates();
    const end = offset + length;
    const pieces: Promise<unknown>[] = [];
    for (let block = Math.floor(offset / COW_BLOCK); block * COW_BLOCK < end; block++) {
      const from = Math.max(offset, block * COW_BLOCK);
      const to = Math.min(end, (block + 1) * COW_BLOCK, this.size);
      const whole = from === block * COW_BLOCK && to === Math.min((block + 1) * COW_BLOCK, this.size);
      if (!whole) pieces.push(this.copyIn(block, Buffer.alloc(to - from), from));
      // A block being copied in gets its mark after that copy, so the later request wins.
      else if (this.locks.has(block)) pieces.push(this.locked(block, async () => { states[block] = ZEROED; }));
      else states[block] = ZEROED;
    }
    await Promise.all(pieces);
  }

  async flush(): Promise<void> {
    if (this.states) await this.overlay.datasync();
  }

  extents(context: string, offset: number, length: number): AsyncIterable<StatusExtent> {
    if (context !== CONTEXT_ALLOCATION) return this.base.extents(context, offset, length);
    return coalesce(this.allocation(offset, Math.min(length, this.size - offset)));
  }

  private async *allocation(offset: number, length: number): AsyncGenerator<StatusExtent> {
    for (const run of this.runs(offset, length)) {
      if (run.state === FROM_BASE) yield* this.base.extents(CONTEXT_ALLOCATION, run.from, run.to - run.from);
      else yield { offset: run.from, length: run.to - run.from, flags: run.state === ZEROED ? STATE_HOLE | STATE_ZERO : 0 };
    }
  }

  /** Closes the base too, and deletes the overlay. */
  async close(): Promise<void> {
    await Promise.allSettled(this.locks.values());
    await this.overlay.close().catch(() => undefined);
    await fs.rm(this.overlayDir, { recursive: true, force: true });
    await this.base.close();
  }

  private blockStates(): Uint8Array {
    this.states ??= new Uint8Array(Math.ceil(this.size / COW_BLOCK));
    return this.states;
  }

  /** Runs `change` after every earlier change of the block has finished. */
  private locked(block: number, change: () => Promise<void>): Promise<void> {
    const previous = this.locks.get(block) ?? Promise.resolve();
    const done = previous.then(change);
    const tail = done.catch(() => undefined);
    this.locks.set(block, tail);
    void tail.then(() => {
      if (this.locks.get(block) === tail) this.locks.delete(block);
    });
    return done;
  }
}

function checkBounds(offset: number, length: number, size: number): void {
  if (offset < 0 || offset + length > size) throw new RangeError(`request of ${length} bytes at ${offset} beyond the disk's size ${size}`);
}

/**
 * Overlay directories are named virtnbdmap.<pid>.<start>.<random>: the pid and its process's start tell whether their
 * server still runs (virtnbdmap.<pid>.<random> before 2026-11-29: the pid alone).
 */
const OVERLAY_DIR = /^virtnbdmap\.(\d+)\.(?:(\d+)\.)?[A-Za-z0-9]{6}$/;

/**
 * Removes the overlays in `parentDir` of servers that are gone: one killed (SIGKILL, a crash) could not remove its
 * own, and what a client wrote there was never meant to outlive the server. Only directories as ours make them
 * (mode 0700). Every map runs it, a read-only one too, which makes no overlay of its own.
 */
export async function removeOrphanOverlays(parentDir: string, log: Logger): Promise<void> {
  const isOverlay = (stat: Stats): boolean => stat.isDirectory() && (stat.mode & 0o777) === 0o700;
  for (const { file, pid } of await leftoversOfGoneRuns(parentDir, OVERLAY_DIR, isOverlay)) {
    // Housekeeping: one that cannot be removed is said so, and the map serves all the same.
    await fs.rm(file, { recursive: true, force: true }).then(
      () => log.info(`removed ${file}, the overlay of a virtnbdmap that is gone (pid ${pid})`),
      (err: unknown) => log.warn(`cannot remove ${file}, the overlay of a virtnbdmap that is gone (pid ${pid}): ${describeFailure(err)}`),
    );
  }
}
