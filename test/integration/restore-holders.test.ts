// A restore onto an existing raw file that something else holds, which QEMU's image lock does not tell: a loop
// device it backs (also under a name of its own, the file's first name deleted), swap on it, a process with it open
// for writing (a raw qemu-nbd with --cache=none, any program). Each is refused with one line naming the holder, here
// and on another host (-U qemu+ssh://, this machine through a private sshd), and the file is left as it was;
// readers are no holders (the probe's parsing and the line's wording: test/unit/restore-holders.test.ts).
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { run, withTempDir } from '../support/testbed.js';
import { errorLines, ourBin, runCli, runOk, whenExists } from '../support/cli.js';
import { cleanup } from '../support/cleanup.js';
import { randomSet } from '../support/craftedSet.js';
import { freePort, withPrivateSshd } from '../support/sshd.js';

const MiB = 1024 * 1024;
const restoreBin = ourBin('virtnbdrestore');

/** A raw file of `size` bytes of 0xee: a restore onto it changes it. */
async function prefilled(file: string, size = 4 * MiB): Promise<Buffer> {
  const content = Buffer.alloc(size, 0xee);
  await fs.writeFile(file, content);
  return content;
}

/** `file` attached to a loop device, detached when the test ends. */
async function withLoop(t: TestContext, file: string): Promise<string> {
  const device = (await run('losetup', ['-f', '--show', file])).stdout.trim();
  cleanup(t, () => run('losetup', ['-d', device]));
  return device;
}

/** `file` made swap and turned on (its size must be a whole number of pages), off again when the test ends. */
async function withSwap(t: TestContext, file: string): Promise<Buffer> {
  await fs.chmod(file, 0o600);
  await run('mkswap', ['-q', file]);
  await run('swapon', [file]);
  cleanup(t, () => run('swapoff', [file], { allowFailure: true }));
  return fs.readFile(file);
}

/** A process holding `file` open (`flags`: 'r' or 'r+'), ended when the test ends; its fd is not the test's. */
function withHolder(t: TestContext, file: string, flags: 'r' | 'r+'): ChildProcess {
  const fd = fsSync.openSync(file, flags);
  const child = spawn('sleep', ['600'], { stdio: ['ignore', 'ignore', 'ignore', fd] });
  fsSync.closeSync(fd);
  cleanup(t, () => { child.kill(); });
  return child;
}

/** qemu-nbd serving `file` raw with direct I/O (it takes no lock a writer's open would fail on), stopped at the end. */
async function withRawQemuNbd(t: TestContext, file: string, socket: string): Promise<ChildProcess> {
  const child = spawn('qemu-nbd', ['-k', socket, '-f', 'raw', '--cache=none', file], { stdio: 'ignore' });
  cleanup(t, async () => {
    child.kill();
    await fs.rm(socket, { force: true });
  });
  await whenExists(socket);
  return child;
}

/** Checks a refusal: the restore onto `target`, held by `holder`, fails with its line and leaves `content` there. */
type Refused = (target: string, content: Buffer, holder: string, todo: string) => Promise<void>;

/**
 * The holders both hosts refuse, in `work`: a loop device the file backs, swap on it, a raw qemu-nbd writing it; then
 * a reader, which is no holder: `restoreUnder` restores onto its file, which must then hold `disk`.
 */
async function refusesHolders(t: TestContext, work: string, refused: Refused, restoreUnder: (target: string) => Promise<unknown>, disk: string): Promise<void> {
  // It was written under the loop device, exit 0.
  const looped = path.join(work, 'looped.raw');
  const loopedContent = await prefilled(looped);
  const device = await withLoop(t, looped);
  await refused(looped, loopedContent, `it backs the loop device ${device}`, `detach it (losetup -d ${device})`);
  // Active swap: the file was grown, then qemu-nbd's writes failed (EINVAL: the kernel refuses writes to swap), and
  // the line said that it held incomplete data.
  const swap = path.join(work, 'swap.raw');
  await prefilled(swap);
  await refused(swap, await withSwap(t, swap), 'it is active swap (/proc/swaps)', `turn that swap off (swapoff ${swap})`);
  // A raw qemu-nbd with direct I/O takes no lock QEMU's check fails on: the restore wrote under it, exit 0.
  const served = path.join(work, 'served.raw');
  const servedContent = await prefilled(served);
  const nbd = await withRawQemuNbd(t, served, path.join(work, 'nbd.sock'));
  await refused(served, servedContent, `qemu-nbd (pid ${nbd.pid}) holds it open for writing`, 'stop that process');
  // A reader is no holder: the restore goes on, and the file holds the disk.
  const read = path.join(work, 'read.raw');
  await prefilled(read);
  withHolder(t, read, 'r');
  await restoreUnder(read);
  assert.ok((await fs.readFile(read)).equals(await fs.readFile(disk)), 'the restore under a reader differs from the disk');
}

test('onto a raw file that backs a loop device (also by inode: its first name deleted), is swap, or another process writes (a raw qemu-nbd, any program; a block device too): refused naming the holder, the file left as it was; readers do not count', async (t) => {
  const work = await withTempDir(t, 'vnbd-holders-');
  const { set, refs } = await randomSet(work, { vda: 8 });
  const refused: Refused = async (target, content, holder, todo) => {
    const r = await runCli(restoreBin, ['-i', set, '-o', target, '-n']);
    assert.equal(r.code, 1, r.stderr);
    assert.deepEqual(errorLines(r), [`virtnbdrestore: error: ${target} is in use: ${holder}, so it was left untouched; ${todo}, or restore to another file or into a directory`]);
    assert.doesNotMatch(r.stderr, /restoring disk/);
    // Neither grown (a file of 4 MiB, the disk 8) nor written.
    assert.ok((await fs.readFile(target)).equals(content), `${target} changed`);
  };

  await refusesHolders(t, work, refused, (read) => runOk(restoreBin, ['-i', set, '-o', read, '-n']), refs.vda as string);

  // The loop device's file under a second name, its first one deleted: sysfs shows "<first> (deleted)".
  const first = path.join(work, 'first.raw');
  const second = path.join(work, 'second.raw');
  const secondContent = await prefilled(first);
  const other = await withLoop(t, first);
  await fs.link(first, second);
  await fs.rm(first);
  assert.equal((await fs.readFile(`/sys/block/${path.basename(other)}/loop/backing_file`, 'utf8')).trim(), `${first} (deleted)`);
  await refused(second, secondContent, `it backs the loop device ${other}`, `detach it (losetup -d ${other})`);

  // Any program with it open for writing (O_RDWR here).
  const held = path.join(work, 'held.raw');
  const heldContent = await prefilled(held);
  const writer = withHolder(t, held, 'r+');
  await refused(held, heldContent, `sleep (pid ${writer.pid}) holds it open for writing`, 'stop that process');
  // A block device another process writes (no exclusive open, so the system's claim does not tell): the same.
  const behind = path.join(work, 'behind-device.raw');
  const deviceContent = await prefilled(behind, 8 * MiB);
  const target = await withLoop(t, behind);
  const deviceWriter = withHolder(t, target, 'r+');
  await refused(target, deviceContent, `sleep (pid ${deviceWriter.pid}) holds it open for writing`, 'stop that process');
});

test('onto another host (-U qemu+ssh://): a file there that backs a loop device, is swap, or another process writes is refused naming the holder and the host, and left as it was; a reader does not count', async (t) => {
  const sshd = await withPrivateSshd(t);
  const work = await withTempDir(t, 'vnbd-holders-remote-');
  const { set, refs } = await randomSet(work, { vda: 8 });
  const remote = ['-U', sshd.libvirtUri, '-P', String(await freePort())];
  const refused: Refused = async (target, content, holder, todo) => {
    const r = await runCli(restoreBin, ['-i', set, '-o', target, '-n', ...remote]);
    assert.equal(r.code, 1, r.stderr);
    assert.deepEqual(errorLines(r), [`virtnbdrestore: error: ${target} on root@127.0.0.1 is in use: ${holder}, so it was left untouched; ${todo}, or restore to another file or into a directory`]);
    assert.ok((await fs.readFile(target)).equals(content), `${target} changed`);
  };
  await refusesHolders(t, work, refused, (read) => runOk(restoreBin, ['-i', set, '-o', read, '-n', ...remote]), refs.vda as string);
});
