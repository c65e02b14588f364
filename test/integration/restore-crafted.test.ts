// Restore of sets crafted with the engine's own stream writer (no domain needed, real qemu-img/qemu-nbd): raw-format
// disks with and without -r, raw images (-t raw) copied or converted, qcow2 images with an external data file,
// --compress and -A layouts, the saved NVRAM with -c, a restore (with -c) in a mount namespace where libvirtd
// cannot be reached, restores interrupted (SIGINT) or killed (SIGKILL) while they write or compress, -o dump -s,
// -N names refused, the images' names in a set without a domain XML, -L's log of verify and dump, and commands run
// from a removed working directory.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { TestDomain, run, tempDir, withTempDir, unmountDevice } from '../support/testbed.js';
import { errorLines, helperPid, ourBin, pythonBin, qemuImgIn, restoreCompressing, runCli, runOk, startCli, within, type CliResult, type CliRun } from '../support/cli.js';
import { MemoryDisk, craftCheckpointDefinition, craftStream, craftVmConfig, flipByte, randomSet } from '../support/craftedSet.js';
import { qcowInfoName } from '../../src/set/backupSet.js';

const MiB = 1024 * 1024;

interface Crafted {
  set: string;
  /** Raw reference images of the disks, by target. */
  refs: Record<string, string>;
}

/** A set of a qcow2 disk vda (full + inc with a zeroed range) and a raw-format disk vdb (copy). */
async function craftTwoDiskSet(work: string): Promise<Crafted> {
  const set = path.join(work, 'set');
  await fs.mkdir(set);
  const vda = new MemoryDisk(64 * MiB).fill(0x11, 0, 8 * MiB).fill(0x22, 40 * MiB, 4 * MiB);
  await craftStream({ dir: set, file: 'vda.full.data', disk: vda, diskName: 'vda', extents: [
    { offset: 0, length: 8 * MiB, kind: 'data' }, { offset: 40 * MiB, length: 4 * MiB, kind: 'data' },
  ] });
  vda.fill(0x33, 4 * MiB, MiB).fill(0, 40 * MiB, 2 * MiB);
  await craftStream({ dir: set, file: 'vda.inc.virtnbdbackup.1.data', disk: vda, diskName: 'vda', incremental: true,
    checkpointName: 'virtnbdbackup.1', parentCheckpoint: 'virtnbdbackup.0', compress: 2,
    extents: [{ offset: 4 * MiB, length: MiB, kind: 'data' }, { offset: 40 * MiB, length: 2 * MiB, kind: 'zero' }] });
  const vdb = new MemoryDisk(16 * MiB).fill(0x44, 2 * MiB, 3 * MiB);
  await craftStream({ dir: set, file: 'vdb.copy.data', disk: vdb, diskName: 'vdb', diskFormat: 'raw', checkpointName: '',
    extents: [{ offset: 0, length: 2 * MiB, kind: 'zero' }, { offset: 2 * MiB, length: 3 * MiB, kind: 'data' }] });
  const disks = [{ target: 'vda', file: '/vm/web.qcow2', format: 'qcow2' }, { target: 'vdb', file: '/vm/data.img', format: 'raw' },
    { target: 'sda', file: '/iso/boot.iso', format: 'raw', device: 'cdrom' as const }];
  for (const ident of ['virtnbdbackup.0', 'virtnbdbackup.1']) await craftVmConfig(set, ident, 'web', disks);
  await fs.writeFile(path.join(set, 'web.cpt'), JSON.stringify(['virtnbdbackup.0', 'virtnbdbackup.1']));
  return { set, refs: { vda: await vda.saveRaw(path.join(work, 'vda.ref')), vdb: await vdb.saveRaw(path.join(work, 'vdb.ref')) } };
}

async function assertSame(image: string, reference: string, format: 'qcow2' | 'raw'): Promise<void> {
  const r = await TestDomain.compare(image, reference, { formatA: format, formatB: 'raw' });
  assert.ok(r.identical, `${image} differs from ${reference}: ${r.output}`);
}

async function imageInfo(image: string): Promise<Record<string, unknown> & { 'format-specific'?: { data?: Record<string, unknown> } }> {
  return JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', image])).stdout);
}

/** Bytes qemu-img map reports as allocated data. */
async function allocatedBytes(image: string): Promise<number> {
  const map = JSON.parse((await run('qemu-img', ['map', '--output=json', '-U', image])).stdout) as Array<{ length: number; data: boolean }>;
  return map.filter((e) => e.data).reduce((sum, e) => sum + e.length, 0);
}

test('raw-format disks: left out with a warning without -r, restored as raw images with -r; -c follows', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);

  const plain = path.join(work, 'plain');
  const without = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', plain, '-n', '-c']);
  assert.match(without.stderr, /disk vdb is a raw-format disk: left out; restore it with -r\/--raw/);
  assert.deepEqual((await fs.readdir(plain)).sort(), ['vmconfig.virtnbdbackup.1.xml', 'web.qcow2']);
  await assertSame(path.join(plain, 'web.qcow2'), refs.vda as string, 'qcow2');
  const adjusted = await fs.readFile(path.join(plain, 'vmconfig.virtnbdbackup.1.xml'), 'utf8');
  assert.match(adjusted, /<name>restore_web<\/name>/);
  assert.doesNotMatch(adjusted, /data\.img|boot\.iso|<uuid>/);
  assert.match(adjusted, new RegExp(`<source file="${path.join(plain, 'web.qcow2')}"/>`));

  const withRaw = path.join(work, 'raw');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', withRaw, '-n', '-r', '-c', '-N', 'web2']);
  assert.equal((await imageInfo(path.join(withRaw, 'data.img'))).format, 'raw');
  await assertSame(path.join(withRaw, 'data.img'), refs.vdb as string, 'raw');
  await assertSame(path.join(withRaw, 'web.qcow2'), refs.vda as string, 'qcow2');
  const kept = await fs.readFile(path.join(withRaw, 'vmconfig.virtnbdbackup.1.xml'), 'utf8');
  assert.match(kept, /<name>web2<\/name>/);
  assert.match(kept, new RegExp(`<source file="${path.join(withRaw, 'data.img')}"/>`));
  assert.match(kept, /boot\.iso/, 'with -r the cdrom stays');

  const only = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'only'), '-n', '-d', 'vdb']);
  assert.equal(only.code, 1);
  assert.match(errorLines(only).join('\n'), /nothing to restore from .*: vdb is a raw-format disk; add -r\/--raw/);
});

// Direct I/O where the file system takes it, cached writes where not (tmpfs before Linux 6.6; this kernel's takes it).
test('an image named near the file system\'s 255 bytes is written under a shorter temporary name and restores exactly', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);
  // `<name>.partial` did not fit: qemu-img said "File name too long", and the line said to remove what was never made.
  const long = `${'w'.repeat(248)}.qcow2`;
  await craftVmConfig(set, 'virtnbdbackup.1', 'web', [{ target: 'vda', file: `/vm/${long}`, format: 'qcow2' }]);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vda']);
  assert.deepEqual((await fs.readdir(out)).filter((f) => f.endsWith('.qcow2')), [long]);
  await assertSame(path.join(out, long), refs.vda as string, 'qcow2');
  const compressed = path.join(work, 'out-compressed');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', compressed, '-n', '-d', 'vda', '--compress']);
  await assertSame(path.join(compressed, long), refs.vda as string, 'qcow2');
});

test('a restore into tmpfs is exact', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);
  const mount = path.join(work, 'tmpfs');
  await fs.mkdir(mount);
  await run('mount', ['-t', 'tmpfs', '-o', 'size=256M', 'tmpfs', mount]);
  try {
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', mount, '-n', '-r']);
    await assertSame(path.join(mount, 'web.qcow2'), refs.vda as string, 'qcow2');
    await assertSame(path.join(mount, 'data.img'), refs.vdb as string, 'raw');
  } finally {
    await run('umount', [mount]); // before the work dir is removed
  }
});

test('raw images in the set (-t raw) are copied as they are, or converted into qcow2 like the source', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const set = path.join(work, 'set');
  await fs.mkdir(set);
  const disk = new MemoryDisk(32 * MiB).fill(0x5a, 3 * MiB, 2 * MiB);
  await disk.saveRaw(path.join(set, 'vda.full.data'));
  await disk.saveRaw(path.join(set, 'vdb.copy.data'));
  await craftVmConfig(set, 'virtnbdbackup.0', 'img', [{ target: 'vda', file: '/vm/a.qcow2', format: 'qcow2' }, { target: 'vdb', file: '/vm/b.raw', format: 'raw' }]);
  const ref = await disk.saveRaw(path.join(work, 'ref'));
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-r']);
  assert.equal((await imageInfo(path.join(out, 'a.qcow2'))).format, 'qcow2');
  await assertSame(path.join(out, 'a.qcow2'), ref, 'qcow2');
  await assertSame(path.join(out, 'b.raw'), ref, 'raw');
  assert.ok(await allocatedBytes(path.join(out, 'a.qcow2')) <= 2 * MiB, 'converted image is not thin');
  const dumped = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump'])).stdout);
  assert.deepEqual(dumped, [
    { file: 'vda.full.data', rawImage: true, size: 32 * MiB },
    { file: 'vdb.copy.data', rawImage: true, size: 32 * MiB },
  ]);

  // Cut short (a copy of the set that ran out of room), with no .chksum to tell (older sets): the size backup
  // recorded in qcow.json does. It restored a 16 MiB disk, exit 0.
  await fs.writeFile(path.join(set, qcowInfoName('vda', 'virtnbdbackup.0')), JSON.stringify({ 'virtual-size': 32 * MiB, format: 'qcow2' }));
  await fs.truncate(path.join(set, 'vda.full.data'), 16 * MiB);
  const short = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'short'), '-n', '-d', 'vda']);
  assert.equal(short.code, 1, short.stderr);
  assert.deepEqual(errorLines(short), [`virtnbdrestore: error: vda.full.data in ${set} holds ${16 * MiB} bytes, but disk vda had ${32 * MiB} (vda.virtnbdbackup.0.qcow.json): the raw image is cut short or damaged; copy it again from where it came, or restore the other disks with -d`]);
  await assert.rejects(fs.access(path.join(work, 'short')), 'the output directory was made');
});

test('-o dump -s dumps those files alone, in the order given, as Python\'s does; -d narrows them; a name the set lacks is refused', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set } = await craftTwoDiskSet(work);
  const files = async (args: string[]): Promise<string[]> => (JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump', ...args])).stdout) as Array<{ file: string }>).map((m) => m.file);
  // It dumped every file of the set.
  assert.deepEqual(await files(['-s', 'vda.full.data']), ['vda.full.data']);
  assert.deepEqual(await files(['-s', 'vda.inc.virtnbdbackup.1.data,vda.full.data,vdb.copy.data']), ['vda.inc.virtnbdbackup.1.data', 'vda.full.data', 'vdb.copy.data']);
  assert.deepEqual(await files(['-s', 'vda.full.data,vdb.copy.data', '-d', 'vdb']), ['vdb.copy.data']);
  const ours = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump', '-s', 'vda.full.data,vda.inc.virtnbdbackup.1.data'])).stdout) as Array<Record<string, unknown>>;
  const python = JSON.parse((await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', 'dump', '-s', 'vda.full.data,vda.inc.virtnbdbackup.1.data'])).stdout) as unknown;
  assert.deepEqual(ours.map(({ file: _, ...meta }) => meta), python);
  // Python leaves a name it cannot read out without a word.
  const gone = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump', '-s', 'vda.full.data,vda.gone.data']);
  assert.deepEqual([gone.code, gone.stdout, errorLines(gone)], [1, '', [`virtnbdrestore: error: vda.gone.data in --sequence is not a data file of the set ${set}; list the set with -o dump`]]);
  const other = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump', '-s', 'vda.full.data', '-d', 'vdb']);
  assert.deepEqual([other.code, errorLines(other)], [1, ['virtnbdrestore: error: -d vdb and --sequence of disk vda contradict each other: give one of them']]);
});

test('a working directory removed under the shell: absolute paths work, as in Python, a relative one is one line saying so, and -o - (its chain state kept there) is refused naming it', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);
  /** Runs `command` from a directory removed after it was entered (yargs read it as it started: a stack trace). */
  const inRemovedDir = async (command: string, args: string[]): Promise<CliResult> => {
    const gone = path.join(work, `gone-${path.basename(command)}-${args.length}`);
    await fs.mkdir(gone);
    return runCli('sh', ['-c', 'cd "$1" && rmdir "$1" && shift && exec "$@"', 'sh', gone, command, ...args]);
  };
  const out = path.join(work, 'out');
  const restored = await inRemovedDir(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vda']);
  assert.equal(restored.code, 0, restored.stderr);
  await assertSame(path.join(out, 'web.qcow2'), refs.vda as string, 'qcow2');
  const relative = await inRemovedDir(ourBin('virtnbdrestore'), ['-i', set, '-o', 'out', '-n', '-d', 'vda']);
  assert.deepEqual([relative.code, errorLines(relative)], [1, ['virtnbdrestore: error: the working directory no longer exists (removed after the shell entered it), and a relative path needs it: cd to an existing directory, or give absolute paths']]);
  const zip = await inRemovedDir(ourBin('virtnbdbackup'), ['-d', 'vnbd-no-such-domain', '-l', 'inc', '-o', '-', '-n']);
  assert.deepEqual([zip.code, zip.stdout, errorLines(zip)], [1, '', ['virtnbdbackup: error: the working directory no longer exists (removed after the shell entered it): it keeps the chain\'s state of a zip on standard output (-o -); cd to the directory of the earlier -o - runs, or an existing one for a new chain']]);
});

test('a set without a domain XML (vmconfig) restores each disk to an image named after it, as Python names an image it knows no file name of', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);
  for (const name of await fs.readdir(set)) if (name.startsWith('vmconfig.')) await fs.rm(path.join(set, name));
  const out = path.join(work, 'out');
  const r = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vda']);
  assert.match(r.stderr, /holds no vmconfig\.virtnbdbackup\.1\.xml: no domain XML copied/);
  // No extension, as Python's -s (and a disk of its XML without a file) names it: `vda`, a qcow2 image.
  assert.deepEqual(await fs.readdir(out), ['vda']);
  assert.equal((await imageInfo(path.join(out, 'vda'))).format, 'qcow2');
  await assertSame(path.join(out, 'vda'), refs.vda as string, 'qcow2');
});

test('a qcow2 image with an external data file is recreated with its data file in the output directory; a damaged qcow.json is a warning; restored into the set itself, the set\'s domain XML is left as it is', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);
  const info = { 'virtual-size': 64 * MiB, format: 'qcow2', 'cluster-size': 65536, 'format-specific': { type: 'qcow2', data: { compat: '1.1', 'data-file': '/vm/web.data', 'data-file-raw': true } } };
  await fs.writeFile(path.join(set, qcowInfoName('vda', 'virtnbdbackup.1')), JSON.stringify(info));
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vda']);
  const data = (await imageInfo(path.join(out, 'web.qcow2')))['format-specific']?.data ?? {};
  assert.equal(data['data-file'], path.join(out, 'web.data'));
  assert.equal(data['data-file-raw'], true);
  await assertSame(path.join(out, 'web.qcow2'), refs.vda as string, 'qcow2');
  await assertSame(path.join(out, 'web.data'), refs.vda as string, 'raw'); // data-file-raw: the data file is the disk

  const again = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'again'), '-n', '-d', 'vda', '--compress']);
  assert.equal(again.code, 1);
  assert.match(errorLines(again).join('\n'), /--compress cannot be used for disk vda: its image keeps its data in an external data file/);

  // A damaged qcow.json: a warning naming it, and the image in qemu-img's default layout, still exact.
  await fs.writeFile(path.join(set, qcowInfoName('vda', 'virtnbdbackup.1')), '{"virtual-size": 671');
  const damaged = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'damaged'), '-n', '-d', 'vda']);
  assert.match(damaged.stderr, /warning: \S+vda\.virtnbdbackup\.1\.qcow\.json is damaged \(.*\): disk vda's image gets qemu-img's default qcow2 layout/);
  assert.equal((await imageInfo(path.join(work, 'damaged', 'web.qcow2')))['format-specific']?.data?.['data-file'], undefined);
  await assertSame(path.join(work, 'damaged', 'web.qcow2'), refs.vda as string, 'qcow2');

  // Restored into the set's own directory: the domain XML there is the set's, left as it was, and said so.
  const own = path.join(set, 'vmconfig.virtnbdbackup.1.xml');
  const saved = await fs.stat(own);
  const intoSet = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', set, '-n', '-d', 'vda']);
  assert.ok(intoSet.stderr.includes(`domain XML ${own} was there already: left as it was`), intoSet.stderr);
  assert.equal((await fs.stat(own)).mtimeMs, saved.mtimeMs);
  await assertSame(path.join(set, 'web.qcow2'), refs.vda as string, 'qcow2');
});

test('--compress writes compressed clusters and -A preallocates; both restore the same content', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);
  const compressed = path.join(work, 'compressed');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', compressed, '-n', '-d', 'vda', '--compress']);
  const check = await run('qemu-img', ['check', path.join(compressed, 'web.qcow2')]);
  assert.match(check.stdout, /100\.00% compressed clusters/);
  await assertSame(path.join(compressed, 'web.qcow2'), refs.vda as string, 'qcow2');
  assert.deepEqual(await fs.readdir(compressed), ['vmconfig.virtnbdbackup.1.xml', 'web.qcow2'], 'no working image left');

  const preallocated = path.join(work, 'prealloc');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', preallocated, '-n', '-d', 'vda', '-A']);
  const map = JSON.parse((await run('qemu-img', ['map', '--output=json', path.join(preallocated, 'web.qcow2')])).stdout) as Array<{ present: boolean }>;
  assert.ok(map.every((e) => e.present), 'preallocated image has unallocated ranges');
  await assertSame(path.join(preallocated, 'web.qcow2'), refs.vda as string, 'qcow2');
});

test('restore and -c need no libvirtd; -D does, and says so before touching anything', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set, refs } = await craftTwoDiskSet(work);
  // A private mount namespace with an empty /run/libvirt: no libvirt socket for this restore only.
  const isolated = (args: string[]): Promise<{ code: number | null; stderr: string }> => runCli('unshare', [
    '-m', 'sh', '-c', 'mount -t tmpfs tmpfs /run/libvirt && exec "$@"', 'sh', ourBin('virtnbdrestore'), ...args,
  ]);
  const out = path.join(work, 'out');
  const ok = await isolated(['-i', set, '-o', out, '-n', '-c']);
  assert.equal(ok.code, 0, ok.stderr);
  await assertSame(path.join(out, 'web.qcow2'), refs.vda as string, 'qcow2');

  const defined = path.join(work, 'defined');
  const refused = await isolated(['-i', set, '-o', defined, '-n', '-D', '-N', 'vnbdtest-never-defined']);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /cannot connect to libvirt at qemu:\/\/\/system: .*is libvirtd running\?/);
  assert.equal(await fs.access(defined).then(() => true, () => false), false, 'the output directory was created');
});

test('-N with a newline or another control character is refused before anything is written (libvirt refused it at define, after the images)', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set } = await craftTwoDiskSet(work);
  const refused: Array<[string, string]> = [
    ['bad\nname', '"bad\\nname": a domain name cannot contain a newline'],
    ['bad\tname', '"bad\\tname": a domain name cannot contain a tab'],
    // -c wrote it into an XML no parser reads; libvirt takes DEL, but virsh shows it as nothing.
    ['bad\x01name', '"bad\\u0001name": a domain name cannot contain the control character 0x01'],
    ['bad\x7f', '"bad\\u007f": a domain name cannot contain the control character 0x7f'],
  ];
  for (const [name, why] of refused) {
    for (const flag of ['-D', '-c']) {
      const out = path.join(work, 'out');
      const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vda', flag, '-N', name]);
      assert.deepEqual([r.code, errorLines(r)], [1, [`virtnbdrestore: error: -N ${why}; choose another name`]], `${flag} ${JSON.stringify(name)}`);
      await assert.rejects(fs.access(out), `${flag} ${JSON.stringify(name)}: the output directory was made`);
    }
  }
});

test('-c copies the NVRAM the backup saved beside the images and points the XML at it; without a copy it is dropped', async (t) => {
  const work = await withTempDir(t, 'vnbd-crafted-');
  const { set } = await craftTwoDiskSet(work);
  const disks = [{ target: 'vda', file: '/vm/web.qcow2', format: 'qcow2' }];
  await fs.rm(path.join(set, 'vmconfig.virtnbdbackup.1.xml'));
  await craftVmConfig(set, 'virtnbdbackup.1', 'web', disks, '/var/lib/libvirt/qemu/nvram/web_VARS.fd');
  await fs.writeFile(path.join(set, 'web_VARS.fd.virtnbdbackup.1'), 'efi variables');
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-c']);
  assert.equal(await fs.readFile(path.join(out, 'web_VARS.fd'), 'utf8'), 'efi variables');
  assert.match(await fs.readFile(path.join(out, 'vmconfig.virtnbdbackup.1.xml'), 'utf8'), new RegExp(`<nvram>${path.join(out, 'web_VARS.fd')}</nvram>`));

  await fs.rm(path.join(set, 'web_VARS.fd.virtnbdbackup.1'));
  const bare = path.join(work, 'bare');
  const r = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', bare, '-n', '-c']);
  assert.match(r.stderr, /nvram \/var\/lib\/libvirt\/qemu\/nvram\/web_VARS\.fd dropped \(the set holds no copy\)/);
  assert.doesNotMatch(await fs.readFile(path.join(bare, 'vmconfig.virtnbdbackup.1.xml'), 'utf8'), /nvram/);
});

/** A set of one 8 MiB disk saved as a raw image (image a.qcow2 when restored), in a work dir removed after the test. */
async function smallRawSet(t: TestContext, prefix: string): Promise<{ work: string; set: string }> {
  const work = await withTempDir(t, prefix);
  const set = path.join(work, 'set');
  await fs.mkdir(set);
  await new MemoryDisk(8 * MiB).fill(0x5a, MiB, MiB).saveRaw(path.join(set, 'vda.full.data'));
  await craftVmConfig(set, 'virtnbdbackup.0', 'img', [{ target: 'vda', file: '/vm/a.qcow2', format: 'qcow2' }]);
  return { work, set };
}

test('-f naming a file, or a socket a server listens on, is refused before anything is written; the file is kept', async (t) => {
  const { work, set } = await smallRawSet(t, 'vnbd-sockpath-');
  const out = path.join(work, 'out');
  // A data file of the set given to -f by mistake (virtnbdmap's -f names files): it was removed for qemu-nbd's socket.
  const dataFile = path.join(set, 'vda.full.data');
  const before = await fs.readFile(dataFile);
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-f', dataFile]);
  assert.equal(refused.code, 1, refused.stderr);
  assert.deepEqual(errorLines(refused), [`virtnbdrestore: error: ${dataFile} already exists and is not a socket, so it cannot be the NBD socket (-f); give a path where nothing is (${dataFile} was left as it is)`]);
  assert.ok(before.equals(await fs.readFile(dataFile)), 'the data file changed');
  await assert.rejects(fs.access(out), 'the output directory was made');

  const socket = path.join(work, 'live.sock');
  const server = net.createServer((c) => c.destroy());
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  t.after(() => new Promise((resolve) => server.close(resolve)));
  const busy = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-f', socket]);
  assert.equal(busy.code, 1, busy.stderr);
  assert.deepEqual(errorLines(busy), [`virtnbdrestore: error: a server listens on the socket ${socket}; give another socket path (-f)`]);
  assert.ok((await fs.lstat(socket)).isSocket(), 'the live socket was removed');
  // A socket whose server is gone is replaced, as before.
  await new Promise((resolve) => server.close(resolve));
  const stale = path.join(work, 'stale.sock');
  await fs.writeFile(path.join(work, 'bind.py'), 'import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\n');
  await run('/usr/bin/python3', [path.join(work, 'bind.py'), stale]);
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-f', stale]);
  await fs.access(path.join(out, 'a.qcow2'));
});

test('-L naming a log file that cannot be written is a warning; the restore goes on', async (t) => {
  const { work, set } = await smallRawSet(t, 'vnbd-logfile-');
  const logFile = path.join(work, 'no-such-dir', 'restore.log');
  const r = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'out'), '-n', '-L', logFile]);
  assert.match(r.stderr, new RegExp(`warning: cannot write the log file ${logFile}: .*ENOENT.*; the log goes on the console only`));
  await fs.access(path.join(work, 'out', 'a.qcow2'));
});

test('-L logs verify and dump too: the verdicts, and the error line of a failed run (no file was written)', async (t) => {
  const { work, set } = await smallRawSet(t, 'vnbd-logverify-');
  const verifyLog = path.join(work, 'verify.log');
  const verified = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify', '-L', verifyLog]);
  const verdicts = verified.stdout.trimEnd().split('\n');
  assert.ok(verdicts.length > 0 && verdicts.every((v) => /^(OK|FAILED) /.test(v)), verified.stdout);
  const logged = (await fs.readFile(verifyLog, 'utf8')).trimEnd().split('\n').map((l) => l.replace(/^\S+ (INFO|ERROR) /, ''));
  assert.deepEqual(logged, verdicts);
  const dumpLog = path.join(work, 'dump.log');
  const failed = await runCli(ourBin('virtnbdrestore'), ['-i', path.join(work, 'no-such-set'), '-o', 'dump', '-L', dumpLog]);
  assert.equal(failed.code, 1, failed.stderr);
  assert.match(await fs.readFile(dumpLog, 'utf8'), /ERROR cannot read backup set directory .*no-such-set/);
});

test('a domain XML that cannot be written after the images says that the images are in place, and leaves no part of it', async (t) => {
  const { work, set } = await smallRawSet(t, 'vnbd-xmlfail-');
  const out = path.join(work, 'out');
  const xml = path.join(out, 'vmconfig.virtnbdbackup.0.xml');
  // Something in the way of the XML's partial file, as a full disk or a lost permission would be.
  await fs.mkdir(`${xml}.partial`, { recursive: true });
  const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-c']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(errorLines(r).join('\n'), new RegExp(`^virtnbdrestore: error: the restored images are in place in ${out}, but ${xml} could not be written: .*; run the restore again with -c into a new directory, or adjust the set's domain XML yourself$`));
  await fs.access(path.join(out, 'a.qcow2'));
  await assert.rejects(fs.access(xml), 'a part of the XML was left under its name');
});

test('--compress interrupted (SIGINT) while qemu-img compresses: exit 130 at once, qemu-img ended, nothing left; killed (SIGKILL), qemu-img ends with it and a rerun names what is left', async (t) => {
  const work = await withTempDir(t, 'vnbd-intcompress-');
  const { set } = await randomSet(work, { vda: 128 }); // about 2.5 s of compressing here
  const out = path.join(work, 'out');
  const partial = path.join(out, 'vda.qcow2.partial');
  const args = ['-i', set, '-o', out, '-n', '--compress'];
  const qemuImgOnOut = (): Promise<string | undefined> => qemuImgIn(out);
  const compressing = (): Promise<CliRun> => restoreCompressing(args, out);

  const interrupted = await compressing();
  const signalled = Date.now();
  interrupted.child.kill('SIGINT');
  const stopped = await interrupted.done;
  assert.equal(stopped.code, 130, stopped.stderr);
  assert.ok(Date.now() - signalled < 2000, `took ${Date.now() - signalled} ms to stop`);
  assert.deepEqual(errorLines(stopped), ['virtnbdrestore: error: interrupted by SIGINT; cleaned up']);
  assert.doesNotMatch(stopped.stderr, /after the work was complete/);
  assert.equal(await qemuImgOnOut(), undefined, 'qemu-img still runs');
  await assert.rejects(fs.access(out), 'the output directory the run made is left');

  const killed = await compressing();
  killed.child.kill('SIGKILL');
  await killed.done;
  assert.ok(await within(2000, async () => (await qemuImgOnOut()) === undefined), 'qemu-img outlived the killed restore');
  assert.deepEqual((await fs.readdir(out)).sort(), ['vda.qcow2.partial', 'vda.qcow2.uncompressed.partial']);
  const rerun = await runCli(ourBin('virtnbdrestore'), args);
  assert.equal(rerun.code, 1, rerun.stderr);
  assert.deepEqual(errorLines(rerun), [`virtnbdrestore: error: ${partial}, ${out}/vda.qcow2.uncompressed.partial are left unfinished by a restore into ${out} that was killed before it could clean up: remove them, then restore again`]);
});

/**
 * Starts virtnbdrestore with `args`, and SIGINTs it while the qemu-nbd serving `image` is stopped (SIGSTOP), so that
 * the restore cannot end first; that qemu-nbd goes on (SIGCONT) after. Resolves with the run's result.
 */
async function interruptWhileServing(args: string[], image: string): Promise<CliResult> {
  const running = startCli(ourBin('virtnbdrestore'), args);
  let server: string | undefined;
  assert.ok(await within(10_000, async () => (server = await helperPid('qemu-nbd', (arg) => arg === image)) !== undefined), `no qemu-nbd served ${image}`);
  process.kill(Number(server), 'SIGSTOP');
  running.child.kill('SIGINT');
  await new Promise((r) => setTimeout(r, 200));
  process.kill(Number(server), 'SIGCONT');
  return running.done;
}

test('a restore onto an existing raw file interrupted (SIGINT) says that the file now holds incomplete data', async (t) => {
  const work = await withTempDir(t, 'vnbd-intexisting-');
  const { set } = await randomSet(work, { vda: 32 }, ['vda']);
  const target = path.join(work, 'target.raw');
  await fs.writeFile(target, Buffer.alloc(32 * MiB, 0x77));
  const stopped = await interruptWhileServing(['-i', set, '-o', target, '-n'], target);
  assert.equal(stopped.code, 130, stopped.stderr);
  assert.deepEqual(errorLines(stopped), [`virtnbdrestore: error: interrupted by SIGINT; cleaned up, but ${target} now holds incomplete data: restore onto it again`]);
});

test('a two-disk restore interrupted (SIGINT) or failing on its second disk keeps the first disk\'s whole image and says so, with how to go on', async (t) => {
  const work = await withTempDir(t, 'vnbd-intsecond-');
  const { set, refs } = await randomSet(work, { vda: 8, vdb: 32 }, ['vdb']);
  const out = path.join(work, 'out');
  const stopped = await interruptWhileServing(['-i', set, '-o', out, '-n'], path.join(out, 'vdb.qcow2.partial'));
  assert.equal(stopped.code, 130, stopped.stderr);
  assert.deepEqual(errorLines(stopped), [`virtnbdrestore: error: interrupted by SIGINT; cleaned up; ${out}/vda.qcow2 is restored whole and kept: restore disk vdb with -d vdb into ${out}, or remove it and restore again`]);
  assert.deepEqual(await fs.readdir(out), ['vda.qcow2']);
  // As the line says: the rest goes beside it.
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vdb']);
  await assertSame(path.join(out, 'vda.qcow2'), refs.vda as string, 'qcow2');
  await assertSame(path.join(out, 'vdb.qcow2'), refs.vdb as string, 'qcow2');

  // A failure says the same; with -c, whose domain XML names every disk, only a restore of all of them helps.
  await flipByte(path.join(set, 'vdb.full.data'), 5 * MiB);
  const failed = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'failed'), '-n', '-c']);
  assert.equal(failed.code, 1, failed.stderr);
  assert.match(errorLines(failed).join('\n'), new RegExp(`^virtnbdrestore: error: restore of disk vdb failed: .*; nothing of it was kept; ${work}/failed/vda\\.qcow2 is restored whole and kept: remove it and restore again$`));
});

test('Ctrl-C at a terminal (SIGINT to the whole process group) during a restore: exit 130, interrupted, not a failed qemu-nbd', async (t) => {
  const work = await withTempDir(t, 'vnbd-groupint-');
  const { set } = await randomSet(work, { vda: 512 }); // about 1.5 s of writing here
  for (const [round, delay] of [0, 50, 150].entries()) {
    const out = path.join(work, `out${round}`);
    // A process group of its own, as a shell gives a job: the terminal's SIGINT goes to every process in it.
    const running = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n'], { detached: true });
    assert.ok(await within(10_000, () => fs.access(path.join(out, 'vda.qcow2.partial')).then(() => true, () => false)), 'the restore began');
    await new Promise((resolve) => setTimeout(resolve, delay));
    process.kill(-(running.child.pid as number), 'SIGINT');
    const stopped = await running.done;
    assert.equal(stopped.code, 130, `round ${round}: ${stopped.stderr}`);
    assert.deepEqual(errorLines(stopped), ['virtnbdrestore: error: interrupted by SIGINT; cleaned up'], `round ${round}`);
    await assert.rejects(fs.access(out), 'the output directory the run made is left');
  }
});

test('a data file or .chksum the user may not read is named as unreadable, not as damaged, by restore and verify', async (t) => {
  const work = await withTempDir(t, 'vnbd-unreadable-');
  const { set } = await craftTwoDiskSet(work);
  const inc = path.join(set, 'vda.inc.virtnbdbackup.1.data');
  const asNobody = (args: string[]): Promise<CliResult> => runCli('runuser', ['-u', 'nobody', '--', ourBin('virtnbdrestore'), ...args]);
  await fs.chmod(inc, 0o600);
  const out = path.join(work, 'out');
  const refused = await asNobody(['-i', set, '-o', out, '-n']);
  assert.equal(refused.code, 1, refused.stderr);
  // It said "cannot open (permission denied (EACCES)); the set's file ... is damaged or not a stream".
  assert.deepEqual(errorLines(refused), [`virtnbdrestore: error: cannot read ${inc}: permission denied (EACCES)`]);
  await assert.rejects(fs.access(out), 'the output directory was made');
  const verify = await asNobody(['-i', set, '-o', 'verify']);
  assert.equal(verify.code, 1, verify.stderr);
  // It said "cannot read permission denied; check the directory permissions (EACCES)".
  assert.match(verify.stdout, /^FAILED vda\.inc\.virtnbdbackup\.1\.data: cannot read it: permission denied \(EACCES\)$/m);
  await fs.chmod(inc, 0o644);
  await fs.chmod(`${inc}.chksum`, 0o600);
  const chksum = await asNobody(['-i', set, '-o', out, '-n']);
  assert.equal(chksum.code, 1, chksum.stderr);
  assert.match(errorLines(chksum)[0] ?? '', /^virtnbdrestore: error: cannot read vda\.inc\.virtnbdbackup\.1\.data\.chksum: permission denied \(EACCES\)/);
  await fs.chmod(`${inc}.chksum`, 0o644);
  // An output directory the user may not write in is named so, not with Node's own words (EACCES: ..., open '...').
  const closed = path.join(work, 'closed');
  await fs.mkdir(closed, { mode: 0o755 });
  const denied = await asNobody(['-i', set, '-o', closed, '-n', '-d', 'vda']);
  assert.equal(denied.code, 1, denied.stderr);
  assert.deepEqual(errorLines(denied), [`virtnbdrestore: error: restore of disk vda failed: cannot create ${closed}/web.qcow2.partial: permission denied; check the directory permissions (EACCES); nothing of it was kept`]);
});

test('a .partial that appears after the plan (another run restoring that disk now) is neither written over nor removed', async (t) => {
  const work = await withTempDir(t, 'vnbd-claim-');
  const { set, refs } = await randomSet(work, { vda: 16, vdb: 8 }, ['vda']);
  const out = path.join(work, 'out');
  const running = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  const pid = running.child.pid as number;
  t.after(() => { try { process.kill(pid, 'SIGCONT'); } catch { /* ended */ } });
  // Held while it writes vda (checked, planned): meanwhile another run (here: the test) takes vdb's .partial.
  assert.ok(await within(10_000, () => fs.access(path.join(out, 'vda.qcow2.partial')).then(() => true, () => false)), 'the restore began');
  process.kill(pid, 'SIGSTOP');
  const other = path.join(out, 'vdb.qcow2.partial');
  await fs.writeFile(other, 'another run\'s image');
  process.kill(pid, 'SIGCONT');
  const r = await running.done;
  assert.equal(r.code, 1, r.stderr);
  // It created its image over that file (qemu-img create), wrote vdb into it and named it vdb.qcow2: the other run's file was gone.
  assert.deepEqual(errorLines(r), [`virtnbdrestore: error: restore of disk vdb failed: ${other} appeared after this restore checked its output: another run writes it now; wait for it to end, or restore into another directory (it was left as it is); nothing of it was kept; ${out}/vda.qcow2 is restored whole and kept: restore disk vdb with -d vdb into ${out}, or remove it and restore again`]);
  assert.equal(await fs.readFile(other, 'utf8'), 'another run\'s image');
  assert.deepEqual((await fs.readdir(out)).sort(), ['vda.qcow2', 'vdb.qcow2.partial']);
  await assertSame(path.join(out, 'vda.qcow2'), refs.vda as string, 'qcow2');
});

test('a disk whose size is no multiple of 4 KiB restores onto a new file grown to it (a hole at its start) and as a new raw image', async (t) => {
  const work = await withTempDir(t, 'vnbd-oddsize-');
  const set = path.join(work, 'set');
  await fs.mkdir(set);
  const size = 10 * MiB + 512;
  const disk = new MemoryDisk(size).fill(0x41, 0, 64 * 1024).fill(0x42, size - 4096, 4096);
  for (const [target, format] of [['vda', 'qcow2'], ['vdb', 'raw']] as const) {
    await craftStream({ dir: set, file: `${target}.full.data`, disk, diskName: target, diskFormat: format, extents: [
      { offset: 0, length: 64 * 1024, kind: 'data' }, { offset: size - 4096, length: 4096, kind: 'data' },
    ] });
  }
  await craftVmConfig(set, 'virtnbdbackup.0', 'odd', [{ target: 'vda', file: '/vm/odd.qcow2', format: 'qcow2' }, { target: 'vdb', file: '/vm/odd.img', format: 'raw' }]);
  const ref = await disk.saveRaw(path.join(work, 'ref.raw'));
  const target = path.join(work, 'target.raw');
  await fs.writeFile(target, '');
  // qemu-nbd with direct I/O refused it: "Image size is not a multiple of request alignment".
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', target, '-n', '-d', 'vda']);
  await assertSame(target, ref, 'raw');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'out'), '-n', '-r']);
  await assertSame(path.join(work, 'out', 'odd.qcow2'), ref, 'qcow2');
  await assertSame(path.join(work, 'out', 'odd.img'), ref, 'raw');
  // A larger file keeps its tail, and so reads as a larger disk: said, with how to cut it (it was silent).
  const larger = path.join(work, 'larger.raw');
  await fs.writeFile(larger, Buffer.alloc(12 * MiB, 0xee));
  const r = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', larger, '-n', '-d', 'vda']);
  assert.match(r.stderr, new RegExp(`warning: ${larger} holds ${12 * MiB} bytes, disk vda ${size}: its bytes past the disk's end are left as they are, so it reads as a larger disk; truncate -s ${size} ${larger} after the restore`));
  await fs.truncate(larger, size);
  await assertSame(larger, ref, 'raw');
});

test('a symbolic link to nothing named as the image is refused before anything is written, as a file there is', async (t) => {
  const work = await withTempDir(t, 'vnbd-danglink-');
  const { set } = await randomSet(work, { vda: 8 });
  const out = path.join(work, 'out');
  await fs.mkdir(out);
  await fs.symlink(path.join(work, 'nowhere'), path.join(out, 'vda.qcow2'));
  const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  assert.equal(r.code, 1, r.stderr);
  // The disk was written whole first, then its rename refused: "restore of disk vda failed: ... already exists".
  assert.deepEqual(errorLines(r), [`virtnbdrestore: error: ${out}/vda.qcow2 already exists; restore into another directory or move it away (nothing is overwritten)`]);
  assert.doesNotMatch(r.stderr, /restoring disk/);
  assert.deepEqual(await fs.readdir(out), ['vda.qcow2']);
});

test('a block device the system uses (a mounted file system) is refused before anything is written; unmounted, it is restored onto', async (t) => {
  const work = await tempDir('vnbd-mounted-');
  const { set, refs } = await randomSet(work, { vda: 8 });
  const backing = path.join(work, 'fs.img');
  await fs.writeFile(backing, Buffer.alloc(8 * MiB)); // the disk's size: compared whole after
  await run('mkfs.ext4', ['-q', backing]);
  const device = (await run('losetup', ['-f', '--show', backing])).stdout.trim();
  const mountPoint = path.join(work, 'mnt');
  await fs.mkdir(mountPoint);
  let mounted = false;
  // Unmounted and detached before the work dir goes, which would otherwise be removed through the mount.
  t.after(async () => {
    if (mounted) await run('umount', [mountPoint]);
    await run('losetup', ['-d', device]);
    await fs.rm(work, { recursive: true, force: true });
  });
  await run('mount', [device, mountPoint]);
  mounted = true;
  await fs.writeFile(path.join(mountPoint, 'file'), 'precious');
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', device, '-n']);
  assert.equal(refused.code, 1, refused.stderr);
  // It wrote the disk over the mounted file system, exit 0.
  assert.deepEqual(errorLines(refused), [`virtnbdrestore: error: ${device} is in use by the system (a mounted file system, or part of LVM, RAID or swap), so it was left untouched; unmount or release it, or give another device`]);
  await unmountDevice(mountPoint, device);
  mounted = false;
  await run('fsck.ext4', ['-n', device]);
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', device, '-n']);
  await assertSame(device, refs.vda as string, 'raw');
});

test('-o naming a file in a folder of the set (checkpoints/, a chain moved aside), or a domain or checkpoint XML anywhere, is refused and left as it was', async (t) => {
  const work = await withTempDir(t, 'vnbd-setfolder-');
  const { set } = await randomSet(work, { vda: 8 });
  const definition = await craftCheckpointDefinition(set, 'virtnbdbackup.0', '<domaincheckpoint>\n  <name>virtnbdbackup.0</name>\n  <disks><disk name="vda" checkpoint="bitmap"/></disks>\n</domaincheckpoint>');
  const moved = path.join(set, 'chain.1800000000', 'old.raw');
  await fs.mkdir(path.dirname(moved));
  await fs.writeFile(moved, Buffer.alloc(MiB, 0x42));
  const config = path.join(work, 'web.xml');
  await fs.copyFile(path.join(set, 'vmconfig.virtnbdbackup.0.xml'), config);
  for (const [file, what] of [
    [definition, 'a libvirt XML definition \\(a set\'s vmconfig or checkpoint\\?\\), not a raw disk'],
    [moved, `a file of the backup set ${set}`],
    [config, 'a libvirt XML definition \\(a set\'s vmconfig or checkpoint\\?\\), not a raw disk'],
  ] as const) {
    const before = await fs.readFile(file);
    // The checkpoint definition was grown to the disk's size and written over, exit 0.
    const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', file, '-n']);
    assert.equal(r.code, 1, r.stderr);
    assert.match(errorLines(r).join('\n'), new RegExp(`^virtnbdrestore: error: -o ${file} is ${what}: a restore would overwrite it`));
    assert.ok(before.equals(await fs.readFile(file)), `${file} changed`);
  }
});

test('a .partial another restore has just made, and locks a moment later, is said to be written now, not left by a killed run', async (t) => {
  const work = await withTempDir(t, 'vnbd-youngpartial-');
  const { set } = await randomSet(work, { vda: 8 });
  const out = path.join(work, 'out');
  await fs.mkdir(out);
  const partial = path.join(out, 'vda.qcow2.partial');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', partial, '8M']); // made, its qemu-nbd not started yet
  const running = startCli(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  await new Promise((resolve) => setTimeout(resolve, 300));
  // The other run's qemu-nbd: QEMU's write lock on the image (qemu-io holds it while its input is open).
  const holder = spawn('qemu-io', ['-f', 'qcow2', partial], { stdio: ['pipe', 'ignore', 'ignore'] });
  t.after(() => { holder.kill(); });
  const r = await running.done;
  assert.equal(r.code, 1, r.stderr);
  // It said: "... is left unfinished by a restore into ... that was killed before it could clean up: remove it".
  assert.deepEqual(errorLines(r), [`virtnbdrestore: error: ${partial} is being written by a restore that runs now; wait for it to end, or restore into another directory`]);
  await fs.access(partial);
});
