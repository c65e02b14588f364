// --sequence: the files of one disk, from its base, in chain order, with no incremental left out.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { chainFromSequence, partialName } from '../../src/restore/plan.js';
import { checkLinks, type ChainLink } from '../../src/set/backupSet.js';
import type { Level } from '../../src/libvirt/checkpoints.js';

function link(disk: string, level: Level, ident: string, checkpointName: string, parentCheckpoint: string): ChainLink {
  const file = level === 'full' ? `${disk}.full.data` : `${disk}.${level}.${ident}.data`;
  return {
    file, disk, level, ident, path: `/set/${file}`,
    meta: { virtualSize: 1, dataSize: 0, date: '', diskName: disk, diskFormat: 'qcow2', checkpointName, compressed: false, compressionMethod: 'lz4', parentCheckpoint, incremental: level !== 'full', streamVersion: 2 },
  };
}

const chainOf = (disk: string): ChainLink[] => [
  link(disk, 'full', '', 'virtnbdbackup.0', ''),
  link(disk, 'inc', 'virtnbdbackup.1', 'virtnbdbackup.1', 'virtnbdbackup.0'),
  link(disk, 'diff', '1700000000', 'virtnbdbackup.2', 'virtnbdbackup.1'),
  link(disk, 'inc', 'virtnbdbackup.2', 'virtnbdbackup.2', 'virtnbdbackup.1'),
  link(disk, 'inc', 'virtnbdbackup.3', 'virtnbdbackup.3', 'virtnbdbackup.2'),
];
const chains = new Map([['vda', chainOf('vda')], ['vdb', chainOf('vdb')]]);
const files = (links: ChainLink[]): string[] => links.map((l) => l.file);

test('a sequence in chain order gives those links; a diff may be skipped or used', () => {
  assert.deepEqual(files(chainFromSequence(['vda.full.data', 'vda.inc.virtnbdbackup.1.data'], chains, '/set')), ['vda.full.data', 'vda.inc.virtnbdbackup.1.data']);
  assert.deepEqual(files(chainFromSequence(['/set/vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.diff.1700000000.data'], chains, '/set')).length, 3);
  assert.equal(chainFromSequence(['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vda.inc.virtnbdbackup.2.data', 'vda.inc.virtnbdbackup.3.data'], chains, '/set').length, 4);
});

const refused: Array<[string, string[], RegExp]> = [
  ['out of chain order', ['vda.full.data', 'vda.inc.virtnbdbackup.2.data', 'vda.inc.virtnbdbackup.1.data'], /out of chain order: vda\.inc\.virtnbdbackup\.1\.data comes before vda\.inc\.virtnbdbackup\.2\.data/],
  ['with a gap', ['vda.full.data', 'vda.inc.virtnbdbackup.2.data'], /gap before vda\.inc\.virtnbdbackup\.2\.data: it needs vda\.inc\.virtnbdbackup\.1\.data first/],
  ['mixing disks', ['vda.full.data', 'vdb.inc.virtnbdbackup.1.data'], /mixes the disks vda and vdb/],
  ['not starting at the base', ['vda.inc.virtnbdbackup.1.data'], /must start with the base of disk vda \(vda\.full\.data\)/],
  ['naming a file the set lacks', ['vda.full.data', 'vda.inc.virtnbdbackup.9.data'], /vda\.inc\.virtnbdbackup\.9\.data in --sequence is not in the set \/set/],
  ['naming no data file', ['vda.qcow2'], /not a data file name/],
];
for (const [what, sequence, message] of refused) {
  test(`a sequence ${what} is refused`, () => {
    assert.throws(() => chainFromSequence(sequence, chains, '/set'), message);
  });
}

test('checkLinks: identities recorded in the streams must match where both sides have one; a diff is checked against the inc before it', () => {
  const withIds = (l: ChainLink, own?: string, parent?: string): ChainLink => ({ ...l, meta: { ...l.meta, checkpointIdentity: own, parentCheckpointIdentity: parent } });
  const [full, inc1, diff, inc2] = chainOf('vda') as [ChainLink, ChainLink, ChainLink, ChainLink];
  const A0 = '1764000000 Backup checkpoint (run aaaaaa)';
  const A1 = '1764000100 Backup checkpoint (run bbbbbb)';
  const B0 = '1764009999 Backup checkpoint (run cccccc)';
  checkLinks([withIds(full, A0), withIds(inc1, A1, A0), withIds(diff, undefined, A1), withIds(inc2, undefined, A1)]);
  // Python's files (no keys), or ours before the keys: names alone, as before.
  checkLinks([full, withIds(inc1, A1, B0), inc2]);
  assert.throws(() => checkLinks([withIds(full, A0), withIds(inc1, A1, B0)]),
    /broken chain: vda\.inc\.virtnbdbackup\.1\.data is based on another checkpoint virtnbdbackup\.0 \(made 2025-11-24T18:46:39Z by run cccccc\) than vda\.full\.data holds \(made 2025-11-24T16:00:00Z by run aaaaaa\): the files come from two sets with the same names/);
  assert.throws(() => checkLinks([withIds(full, A0), withIds(inc1, A1, A0), withIds(diff, undefined, B0)]), /vda\.diff\.1700000000\.data is based on another checkpoint virtnbdbackup\.1/);
});

test('partialName: <image>.partial, or where that would pass 255 bytes, the name cut short with a hash, whole letters only', () => {
  assert.equal(partialName('/out/vda.qcow2'), '/out/vda.qcow2.partial');
  assert.equal(partialName('/out/vda.qcow2', '.uncompressed.partial'), '/out/vda.qcow2.uncompressed.partial');
  for (const base of [`${'a'.repeat(250)}.qcow2`, `${'ü'.repeat(124)}.qcow2`]) {
    for (const suffix of ['.partial', '.uncompressed.partial']) {
      const name = path.basename(partialName(`/out/${base}`, suffix));
      assert.ok(Buffer.byteLength(name) <= 255, name);
      assert.match(name, new RegExp(`^${base.slice(0, 8)}.*\\.[0-9a-f]{8}${suffix.replace(/\./g, '\\.')}$`));
      assert.doesNotMatch(name, /\uFFFD/);
    }
  }
  assert.notEqual(partialName(`/out/${'a'.repeat(250)}.qcow2`), partialName(`/out/${'a'.repeat(250)}.qcow3`), 'names that differ past the cut differ');
});
