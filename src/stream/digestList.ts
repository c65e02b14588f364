// The piece digests of one stream in typed arrays (48 bytes a piece, in fixed blocks that never move), so a disk
// of 100 000 extents keeps a few MB and no object per piece. Guarantees: pieces iterate in the order added; a
// piece whose digest never arrived reads as the empty string.
import type { PieceDigest } from './writer.js';

const PER_BLOCK = 4096;
/** BLAKE3 and SHA-256 digests are both 32 bytes. */
export const DIGEST_BYTES = 32;

interface Block {
  offsets: Float64Array;
  lengths: Float64Array;
  digests: Buffer;
  /** Set per piece once its digest is stored. */
  present: Uint8Array;
}

export class DigestList implements Iterable<PieceDigest> {
  private readonly blocks: Block[] = [];
  private count = 0;

  get length(): number {
    return this.count;
  }

  /** Adds a piece whose digest comes later (through set or place); returns its slot. */
  add(offset: number, length: number): number {
    const slot = this.count++;
    const block = this.blockOf(slot, true);
    block.offsets[slot % PER_BLOCK] = offset;
    block.lengths[slot % PER_BLOCK] = length;
    return slot;
  }

  /** Where the raw digest of `slot` goes, for a native call that writes it in place; marks it present. */
  place(slot: number): { into: Buffer; at: number } {
    const block = this.blockOf(slot, false);
    block.present[slot % PER_BLOCK] = 1;
    return { into: block.digests, at: (slot % PER_BLOCK) * DIGEST_BYTES };
  }

  /** Stores the hex digest of `slot`. */
  set(slot: number, hex: string): void {
    const { into, at } = this.place(slot);
    into.write(hex, at, DIGEST_BYTES, 'hex');
  }

  *[Symbol.iterator](): Iterator<PieceDigest> {
    for (let slot = 0; slot < this.count; slot++) {
      const block = this.blockOf(slot, false);
      const i = slot % PER_BLOCK;
      const digest = block.present[i] ? block.digests.toString('hex', i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES) : '';
      yield { offset: block.offsets[i]!, length: block.lengths[i]!, digest };
    }
  }

  private blockOf(slot: number, grow: boolean): Block {
    const index = Math.floor(slot / PER_BLOCK);
    if (grow && index === this.blocks.length) {
      this.blocks.push({
        offsets: new Float64Array(PER_BLOCK), lengths: new Float64Array(PER_BLOCK),
        digests: Buffer.alloc(PER_BLOCK * DIGEST_BYTES), present: new Uint8Array(PER_BLOCK),
      });
    }
    return this.blocks[index]!;
  }
}
