// Proves the test bed on a real domain: fills and monitor writes/zeroes/discards land, snapshots and compare are right, failures throw, nothing is left.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { assertPattern, run, TestDomain, tempDir, withDomain, withTempDir } from '../support/testbed.js';

const virshListAll = async (): Promise<string[]> =>
  (await run('virsh', ['-c', 'qemu:///system', 'list', '--all', '--name'])).stdout.split('\n').map((n) => n.trim());

/** Whether [offset, offset+length) of a qcow2 image holds no data clusters (qemu-img map). */
async function unallocated(image: string, offset: number, length: number): Promise<boolean> {
  const map = JSON.parse((await run('qemu-img', ['map', '-U', '-f', 'qcow2', '--output=json', image])).stdout) as
    Array<{ start: number; length: number; data: boolean }>;
  return map.filter((e) => e.start < offset + length && e.start + e.length > offset).every((e) => !e.data);
}

test('testbed: filled disks, monitor writes, snapshots, compare, and removal', async (t) => {
  const dom = await withDomain(t, {
    disks: [
      { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 8 }] },
      { target: 'vdb', sizeMiB: 32 },
    ],
  });
  assert.match(dom.name, /^vnbdtest-[0-9a-f]{8}$/);
  assert.ok((await virshListAll()).includes(dom.name));
  assert.equal((await fs.stat(dom.dir)).mode & 0o777, 0o777);
  const work = await withTempDir(t, 'testbed-');

  await dom.write('vda', 0x33, '1M', '1M');
  const afterWrite = await dom.snapshot('vda', path.join(work, 'vda-1.raw'));
  await assertPattern(afterWrite, 'raw', 0x11, 0, '1M');
  await assertPattern(afterWrite, 'raw', 0x33, '1M', '1M');
  await assertPattern(afterWrite, 'raw', 0x11, '2M', '6M');
  await assertPattern(afterWrite, 'raw', 0x00, '8M', '56M');
  await assert.rejects(assertPattern(afterWrite, 'raw', 0x11, '1M', '1M'), /Pattern verification failed/);

  await dom.writeZeroes('vda', '2M', '1M');
  await dom.discard('vda', '4M', '2M');
  const afterZero = await dom.snapshot('vda');
  await assertPattern(afterZero, 'raw', 0x00, '2M', '1M');
  await assertPattern(afterZero, 'raw', 0x00, '4M', '2M');
  await assertPattern(afterZero, 'raw', 0x11, '3M', '1M');
  assert.ok(await unallocated(dom.diskPath('vda'), 4 << 20, 2 << 20), 'discard did not free the qcow2 clusters');

  const differ = await TestDomain.compare(afterWrite, afterZero, { formatA: 'raw', formatB: 'raw' });
  assert.equal(differ.identical, false, differ.output);
  assert.match(differ.output, /mismatch at offset 2097152/);
  const same = await TestDomain.compare(afterZero, dom.diskPath('vda'), { formatA: 'raw', formatB: 'qcow2' });
  assert.equal(same.identical, true, same.output);

  // vdb was never written: equal to an empty image of its size.
  const empty = path.join(work, 'empty.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', empty, '32M']);
  assert.equal((await TestDomain.compare(await dom.snapshot('vdb'), empty)).identical, true);

  // qemu-io failures arrive as text; the fixture turns them into errors.
  await assert.rejects(dom.qemuIo('vda', 'write -P 0x44 63M 2M'), /failed/);
  await assert.rejects(dom.qemuIo('vda', 'no-such-command'), /failed/);
  await assert.rejects(dom.write('vdb', 0x44, '32M', '1'), /past the end/);
  assert.match(await dom.qemuIo('vda', 'read -P 0x33 1M 1M'), /^read 1048576\/1048576 bytes at offset 1048576$/m);

  await dom.destroy();
  await dom.destroy();
  assert.ok(!(await virshListAll()).includes(dom.name), 'domain still defined');
  await assert.rejects(fs.stat(dom.dir), { code: 'ENOENT' });
  await assert.rejects(fs.stat(`/var/log/libvirt/qemu/${dom.name}.log`), { code: 'ENOENT' });
});

test('testbed: a domain defined without starting refuses guest writes and is still removed', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16, format: 'raw', fill: [{ pattern: 0x5a, offsetMiB: 1, lengthMiB: 1 }] }], start: false });
  await assert.rejects(dom.write('vda', 0x01, 0, '1M'), /not running/);
  const snapshot = await dom.snapshot('vda');
  await assertPattern(snapshot, 'raw', 0x5a, '1M', '1M');
  await assertPattern(snapshot, 'raw', 0x00, 0, '1M');
});

test('testbed: bad disk specs are refused before anything is created', async () => {
  // Only this process's entries: test files run side by side (scripts/test.sh), each making its own.
  const ours = async (): Promise<string[]> => (await fs.readdir('/var/tmp')).filter((name) => name.startsWith(`vnbdtest-p${process.pid}-`));
  const before = await ours();
  await assert.rejects(TestDomain.create({ disks: [] }), /at least one disk/);
  await assert.rejects(TestDomain.create({ disks: [{ target: 'sda', sizeMiB: 8 }] }), /virtio target/);
  await assert.rejects(TestDomain.create({ disks: [{ target: 'vda', sizeMiB: 8, fill: [{ pattern: 1, offsetMiB: 4, lengthMiB: 8 }] }] }), /does not fit/);
  assert.deepEqual(await ours(), before);
  const dir = await tempDir('probe-');
  assert.match(path.basename(dir), new RegExp(`^vnbdtest-p${process.pid}-probe-`));
  await fs.rm(dir, { recursive: true });
});
