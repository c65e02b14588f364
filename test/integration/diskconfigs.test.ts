// Unusual disk configurations on a real domain, found by a black-box round: each a small domain (a few MiB), backed
// up and restored with ours, compared bit for bit with a copy of the disk at that point.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { withDomain, tempDir, run, TestDomain } from '../support/testbed.js';
import { ourBin, runCli, runOk } from '../support/cli.js';
import { startMap } from '../support/map.js';

const MiB = 1024 * 1024;

test('a transient disk (<transient/>), on which libvirt refuses the whole backup job, is left out with a warning: the other disks back up and restore', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 4, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] },
    { target: 'vdb', sizeMiB: 4, transient: true, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 1 }] },
  ] });
  const work = await tempDir('vnbd-transient-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  for (const level of ['full', 'inc']) {
    // It failed: "block jobs are not supported on transient disk 'vdb'".
    const r = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', set, '-n']);
    assert.match(r.stderr, /warning: skipping disk vdb: transient disk \(<transient\/>\): libvirt runs no backup job on it/);
    if (level === 'full') await dom.write('vda', 0x33, '3M', '1M');
  }
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.data')).sort(), ['vda.full.data', 'vda.inc.virtnbdbackup.1.data']);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  const result = await TestDomain.compare(path.join(out, 'vda.qcow2'), await dom.snapshot('vda'));
  assert.ok(result.identical, result.output);
});

test('a disk of 0 bytes, whose image QEMU gives no persistent bitmap, keeps the chain going across a restart and while shut off', async (t) => {
  const dom = await withDomain(t, { start: false, disks: [
    { target: 'vda', sizeMiB: 4, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] },
    { target: 'vdb', sizeMiB: 1 },
  ] });
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', dom.diskPath('vdb'), '0']); // resize cannot make it 0 bytes
  await dom.start();
  const work = await tempDir('vnbd-empty-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', set, '-n']);
  // Stopped, the domain's bitmaps go into the images: none into the empty one. Every inc fell back to a full since,
  // and a shut-off domain's inc was refused.
  await dom.stop();
  const offline = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  assert.match(offline.stderr, /diff backup of \S+ \(vda, vdb\)/);
  await dom.start();
  // libvirt's estimate names no size for the empty disk's bitmap, which -p and -T took for a broken one.
  const estimate = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-p', '-o', set, '-n']);
  assert.match(estimate.stdout + estimate.stderr, /estimated size of the next inc\/diff: \d+ bytes/);
  await dom.write('vda', 0x22, '3M', '512');
  const inc = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', set, '-n']);
  assert.doesNotMatch(inc.stderr, /missing or broken|makes a full backup instead/);
  const files = (await fs.readdir(set)).filter((f) => f.endsWith('.data')).sort();
  assert.deepEqual(files.filter((f) => !f.includes('.diff.')), ['vda.full.data', 'vda.inc.virtnbdbackup.1.data', 'vdb.full.data', 'vdb.inc.virtnbdbackup.1.data']);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  const result = await TestDomain.compare(path.join(out, 'vda.qcow2'), await dom.snapshot('vda'));
  assert.ok(result.identical, result.output);
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', path.join(out, 'vdb.qcow2')])).stdout) as { 'virtual-size': number };
  assert.equal(info['virtual-size'], 0);
});

test('a raw disk of 0 bytes saved with -r, and a qcow2 one in a -t raw full, restore: their empty raw images were read as truncated streams', async (t) => {
  const dom = await withDomain(t, { start: false, disks: [
    { target: 'vda', sizeMiB: 4, fill: [{ pattern: 0x11, offsetMiB: 3, lengthMiB: 1 }] },
    { target: 'vdb', sizeMiB: 1 },
    { target: 'vdc', sizeMiB: 1, format: 'raw' },
  ] });
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', dom.diskPath('vdb'), '0']);
  await fs.truncate(dom.diskPath('vdc'), 0);
  await dom.start();
  const work = await tempDir('vnbd-emptyraw-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const reference = await dom.snapshot('vda');
  for (const type of ['stream', 'raw']) {
    const set = path.join(work, `set-${type}`);
    await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-t', type, '-r', '-o', set, '-n']);
    const out = path.join(work, `out-${type}`);
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-r', '-n']);
    const result = await TestDomain.compare(path.join(out, 'vda.qcow2'), reference);
    assert.ok(result.identical, `${type}: ${result.output}`);
    assert.equal((await fs.stat(path.join(out, 'vdc.raw'))).size, 0, type);
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', path.join(out, 'vdb.qcow2')])).stdout) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 0, type);
  }
});

test('a vmdk disk beside a qcow2 one: full and inc leave it out with a warning (libvirt refused the whole job), a copy takes it; all restore', async (t) => {
  const dom = await withDomain(t, { start: false, disks: [
    { target: 'vda', sizeMiB: 4, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] },
    { target: 'vdb', sizeMiB: 3 },
  ] });
  // The test bed makes qcow2 and raw images: vdb becomes a vmdk one, named so in the domain.
  const vmdk = path.join(dom.dir, 'vdb.vmdk');
  await run('qemu-img', ['convert', '-q', '-f', 'qcow2', '-O', 'vmdk', dom.diskPath('vdb'), vmdk]);
  await run('qemu-io', ['-f', 'vmdk', '-c', `write -P 0x22 ${3 * 1024 * 1024 - 512} 512`, vmdk]);
  const xml = (await run('virsh', ['-c', 'qemu:///system', 'dumpxml', dom.name])).stdout
    .replace(`<driver name='qemu' type='qcow2' discard='unmap'/>\n      <source file='${dom.diskPath('vdb')}'/>`, `<driver name='qemu' type='vmdk' discard='unmap'/>\n      <source file='${vmdk}'/>`);
  assert.ok(xml.includes(vmdk), 'the domain XML names the vmdk image');
  await fs.writeFile(path.join(dom.dir, 'vmdk.xml'), xml);
  await run('virsh', ['-c', 'qemu:///system', 'define', path.join(dom.dir, 'vmdk.xml')]);
  await dom.start();
  const work = await tempDir('vnbd-vmdk-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  for (const level of ['full', 'inc']) {
    // It failed: "checkpoint for disk vdb unsupported for storage type vmdk", a full after removing the old chain.
    const r = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', set, '-n']);
    assert.match(r.stderr, /warning: skipping disk vdb: vmdk-format disk: libvirt keeps checkpoints in qcow2 images only, .*back it up with -l copy/);
    if (level === 'full') await dom.write('vda', 0x33, '2M', '512');
  }
  assert.deepEqual((await fs.readdir(set)).filter((f) => f.endsWith('.data')).sort(), ['vda.full.data', 'vda.inc.virtnbdbackup.1.data']);
  const copy = path.join(work, 'copy');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-o', copy, '-n']);
  const reference = await dom.snapshot('vda');
  for (const [from, restored] of [[set, ['vda']], [copy, ['vda', 'vdb']]] as const) {
    const out = path.join(work, `out-${path.basename(from)}`);
    await runOk(ourBin('virtnbdrestore'), ['-i', from, '-o', out, '-n']);
    const vda = await TestDomain.compare(path.join(out, 'vda.qcow2'), reference);
    assert.ok(vda.identical, `vda from ${from}: ${vda.output}`);
    if (restored.length > 1) {
      const vdb = await TestDomain.compare(path.join(out, 'vdb.vmdk'), vmdk, { formatB: 'vmdk' });
      assert.ok(vdb.identical, `vdb from ${from}: ${vdb.output}`);
    }
  }
});

test('odd disk sizes and qcow2 layouts (sizes off 4 KiB, cluster 4 KiB and 2 MiB, extended L2): the last sector and single sectors over the disk, full then inc, restore and map bit for bit', async (t) => {
  // Each image is remade with its layout and a size the test bed (whole MiB) does not make; qemu-io -d writes past it.
  const layouts = {
    vda: { size: 10 * MiB + 512, options: [] },
    vdb: { size: 3 * MiB + 1536, options: ['-o', 'cluster_size=4096'] },
    vdc: { size: 5 * MiB + 512, options: ['-o', 'cluster_size=2M'] },
    vdd: { size: 7 * MiB + 1536, options: ['-o', 'extended_l2=on'] },
  };
  const dom = await withDomain(t, { start: false, disks: Object.keys(layouts).map((target) => ({ target, sizeMiB: 1 })) });
  for (const [target, { size, options }] of Object.entries(layouts)) {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', ...options, dom.diskPath(target), String(size)]);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 512', '-c', `write -P 0x22 ${size - 512} 512`, dom.diskPath(target)]);
  }
  await dom.start();
  const work = await tempDir('vnbd-oddsizes-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-w', '1', '-o', set, '-n']);
  for (const [target, { size }] of Object.entries(layouts)) {
    const wrote = /^wrote \d+\/\d+ bytes/m;
    await dom.qemuIo(target, `write -P 0x33 ${size - 512} 512`, wrote);
    for (let offset = 512 * 3; offset < size - 512; offset += Math.floor(size / 9 / 512) * 512) await dom.qemuIo(target, `write -P 0x44 ${offset} 512`, wrote);
    await dom.qemuIo(target, 'write -z 0 512', wrote);
  }
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-w', '4', '-z', '-o', set, '-n']);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  for (const [target, { size }] of Object.entries(layouts)) {
    const reference = await dom.snapshot(target);
    assert.equal((await fs.stat(reference)).size, size, target);
    const restored = await TestDomain.compare(path.join(out, `${target}.qcow2`), reference);
    assert.ok(restored.identical, `${target} restored: ${restored.output}`);
    const files = [`${target}.full.data`, `${target}.inc.virtnbdbackup.1.data`].map((f) => path.join(set, f));
    const map = await startMap(t, work, target, files, ['-r']);
    const mapped = await TestDomain.compare(map.uris[0], reference, { formatA: 'raw' });
    assert.ok(mapped.identical, `${target} mapped: ${mapped.output}`);
    await map.stop();
  }
  // Onto a raw file as large as the disk: the last sector lands in it.
  const file = path.join(work, 'vda.raw');
  await fs.writeFile(file, '');
  await fs.truncate(file, layouts.vda.size);
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-d', 'vda', '-o', file, '-n']);
  const onto = await TestDomain.compare(file, await dom.snapshot('vda'));
  assert.ok(onto.identical, onto.output);
});

test('a raw disk that is a slice of its file (<slices>): shut off and running, -r saves the slice alone; it restores, and -c drops the slice', async (t) => {
  const dom = await withDomain(t, { start: false, disks: [
    { target: 'vda', sizeMiB: 2, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] },
    { target: 'vdb', sizeMiB: 8, format: 'raw', fill: [{ pattern: 0xaa, offsetMiB: 0, lengthMiB: 1 }, { pattern: 0xbb, offsetMiB: 1, lengthMiB: 1 }, { pattern: 0xcc, offsetMiB: 5, lengthMiB: 1 }] },
  ] });
  // The guest sees bytes 1 MiB to 5 MiB of the file: 0xbb, then zeros.
  const xml = (await run('virsh', ['-c', 'qemu:///system', 'dumpxml', '--inactive', dom.name])).stdout
    .replace(`<source file='${dom.diskPath('vdb')}'/>`, `<source file='${dom.diskPath('vdb')}'><slices><slice type='storage' offset='${MiB}' size='${4 * MiB}'/></slices></source>`);
  assert.match(xml, /<slice type='storage'/);
  await fs.writeFile(path.join(dom.dir, 'sliced.xml'), xml);
  await run('virsh', ['-c', 'qemu:///system', 'define', path.join(dom.dir, 'sliced.xml')]);
  const work = await tempDir('vnbd-slice-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const slice = path.join(work, 'slice.raw');
  await run('dd', [`if=${dom.diskPath('vdb')}`, `of=${slice}`, 'bs=1M', 'skip=1', 'count=4', 'status=none']);
  for (const state of ['off', 'running']) {
    if (state === 'running') await dom.start();
    const set = path.join(work, `set-${state}`);
    // Shut off, our qemu-nbd served the whole file: an 8 MiB "disk" holding the bytes around the slice.
    await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-r', '-o', set, '-n']);
    const saved = await TestDomain.compare(path.join(set, 'vdb.copy.data'), slice, { formatA: 'raw', formatB: 'raw' });
    assert.ok(saved.identical && (await fs.stat(path.join(set, 'vdb.copy.data'))).size === 4 * MiB, `${state}: ${saved.output}`);
    // The image details were the whole file's (8 MiB), and the restore refused the 4 MiB image as cut short.
    const out = path.join(work, `out-${state}`);
    await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-r', '-c', '-n']);
    const restored = await TestDomain.compare(path.join(out, 'vdb.raw'), slice, { formatA: 'raw', formatB: 'raw' });
    assert.ok(restored.identical, `${state}: ${restored.output}`);
    assert.doesNotMatch(await fs.readFile(path.join(out, 'vmconfig.copy.xml'), 'utf8'), /<slice/);
  }
});
