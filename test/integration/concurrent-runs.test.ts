// A restore or verify that runs while a backup into the same set falls back to a full and moves the chain aside
// (chain.<secs>/, then a new chain's files under the old names): sets crafted with the engine's stream writer, the
// move made by the test at a chosen moment of the run (restore's progress hook, verify's verdicts), real
// qemu-img/qemu-nbd. The run fails naming the directory the chain went to, and never restores the new chain's file
// under the old plan (found by a black-box round: a disk was silently restored from the new full, the others from
// the old chain, and a gone file was called damaged). And a set whose `.partial` another program writes right now,
// taking no lock of ours (Python's virtnbdbackup; here a shell holding it open for writing): backup, restore and
// verify say so, where all three called it a failed run's, to be moved out of the set (found by a black-box round).
// And an inc started right after one killed with SIGKILL, while the killed run's guard has yet to end its job: it
// waits for the job to go and backs up, where it was refused for "a backup job" nothing but that guard would end.
import { test, type TestContext } from 'node:test';
import { spawn, spawnSync } from 'node:child_process';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { withTempDir, withDomain, run, TestDomain } from '../support/testbed.js';
import { errorLines, ourBin, runCli, startHeldOnOutput, within } from '../support/cli.js';
import { cleanup } from '../support/cleanup.js';
import { MemoryDisk, craftStream, craftVmConfig } from '../support/craftedSet.js';
import { restore } from '../../src/restore/restore.js';
import { verifySet, type FileVerdict } from '../../src/verify/verify.js';
import { domainLockFile } from '../../src/backup/lock.js';

const MiB = 1024 * 1024;
const ARCHIVE = 'chain.1800000000';

/** A set of disks vda and vdb (full backups, pattern `pattern`) in `dir`, with an inc of each where `inc` is set. */
async function craftSet(dir: string, pattern: number, date: string, inc = false): Promise<void> {
  await fsp.mkdir(dir, { recursive: true });
  for (const [i, target] of ['vda', 'vdb'].entries()) {
    const disk = new MemoryDisk(8 * MiB).fill(pattern + i, 0, 4 * MiB);
    await craftStream({ dir, file: `${target}.full.data`, disk, diskName: target, date, extents: [{ offset: 0, length: 4 * MiB, kind: 'data' }] });
    if (inc) {
      disk.fill(pattern + 0x10, MiB, MiB);
      await craftStream({ dir, file: `${target}.inc.virtnbdbackup.1.data`, disk, diskName: target, date, incremental: true, checkpointName: 'virtnbdbackup.1',
        parentCheckpoint: 'virtnbdbackup.0', extents: [{ offset: MiB, length: MiB, kind: 'data' }] });
    }
  }
  const checkpoints = inc ? ['virtnbdbackup.0', 'virtnbdbackup.1'] : ['virtnbdbackup.0'];
  const disks = ['vda', 'vdb'].map((target) => ({ target, file: `/vm/${target}.qcow2`, format: 'qcow2' }));
  for (const ident of checkpoints) await craftVmConfig(dir, ident, 'web', disks);
  await fsp.writeFile(path.join(dir, 'web.cpt'), JSON.stringify(checkpoints));
}

/** What archiveChain does, at once: every file of `set` into set/chain.<secs>/; then `next`'s files (a new chain) into the set. */
function moveChainAside(set: string, next?: string): void {
  fs.mkdirSync(path.join(set, ARCHIVE));
  for (const name of fs.readdirSync(set)) if (name !== ARCHIVE) fs.renameSync(path.join(set, name), path.join(set, ARCHIVE, name));
  if (next) for (const name of fs.readdirSync(next)) fs.renameSync(path.join(next, name), path.join(set, name));
}

test('a restore whose set gets a new chain before its second disk refuses the new file, naming where its chain went', async (t) => {
  const work = await withTempDir(t, 'vnbd-concurrent-');
  const set = path.join(work, 'set');
  const next = path.join(work, 'next');
  await craftSet(set, 0x11, '2027-01-01T00:00:00.000Z');
  await craftSet(next, 0x51, '2027-01-02T00:00:00.000Z');
  const out = path.join(work, 'out');
  // vdb's restore starts once vda's is done: the chain moves in between, the new full of vdb takes its name.
  const progress = (disk: string): ((bytes: number) => void) => {
    if (disk === 'vdb') moveChainAside(set, next);
    return () => undefined;
  };
  await assert.rejects(restore({ input: set, output: out, progress }), (err: Error) => {
    assert.match(err.message, new RegExp(`vdb\\.full\\.data is no longer the file this restore planned with .*moved its chain into ${path.join(set, ARCHIVE)} while this restore read it.*-i ${path.join(set, ARCHIVE)}`));
    return true;
  });
  assert.equal(fs.existsSync(path.join(out, 'vdb.qcow2')), false, 'vdb restored from the new chain');
  // The chain restores from where it went, as the line says.
  const again = path.join(work, 'again');
  await restore({ input: path.join(set, ARCHIVE), output: again });
  const ref = await new MemoryDisk(8 * MiB).fill(0x12, 0, 4 * MiB).saveRaw(path.join(work, 'vdb.ref'));
  assert.ok((await TestDomain.compare(path.join(again, 'vdb.qcow2'), ref, { formatA: 'qcow2', formatB: 'raw' })).identical);
});

test('a restore whose chain is moved aside under it says where it went, not that the set is damaged', async (t) => {
  const work = await withTempDir(t, 'vnbd-concurrent-');
  const set = path.join(work, 'set');
  await craftSet(set, 0x11, '2027-01-01T00:00:00.000Z', true);
  const progress = (disk: string): ((bytes: number) => void) => {
    if (disk === 'vda') moveChainAside(set);
    return () => undefined;
  };
  await assert.rejects(restore({ input: set, output: path.join(work, 'out'), progress }), (err: Error) => {
    assert.match(err.message, new RegExp(`restore of disk vda failed: .*ENOENT.*moved its chain into ${path.join(set, ARCHIVE)} while this restore read it`));
    assert.doesNotMatch(err.message, /damaged/);
    return true;
  });
});

test('a restore whose chain is moved aside after its images names the domain XML where it went', async (t) => {
  const work = await withTempDir(t, 'vnbd-concurrent-');
  const set = path.join(work, 'set');
  await craftSet(set, 0x11, '2027-01-01T00:00:00.000Z');
  const out = path.join(work, 'out');
  // The last write of the last disk: the images are whole, the domain XML is copied next.
  const progress = (disk: string, total: number): ((bytes: number) => void) => {
    let done = 0;
    return (bytes) => {
      done += bytes;
      if (disk === 'vdb' && done === total) moveChainAside(set);
    };
  };
  await assert.rejects(restore({ input: set, output: out, progress }), (err: Error) => {
    assert.match(err.message, new RegExp(`copy ${path.join(set, ARCHIVE, 'vmconfig.virtnbdbackup.0.xml')} there yourself \\(a backup into the set moved its chain into ${path.join(set, ARCHIVE)} meanwhile\\)`));
    return true;
  });
});

test('verify: a file moved aside with the chain in mid-verify is said to be, not unreadable', async (t) => {
  const work = await withTempDir(t, 'vnbd-concurrent-');
  const set = path.join(work, 'set');
  await craftSet(set, 0x11, '2027-01-01T00:00:00.000Z', true);
  let moved = false;
  const onVerdict = (v: FileVerdict): void => {
    if (!moved && v.file === 'vda.full.data') {
      moved = true;
      moveChainAside(set);
    }
  };
  const verdicts = await verifySet({ input: set, onVerdict });
  assert.deepEqual(verdicts.map((v) => [v.file, v.ok]), [
    ['vda.full.data', true], ['vda.inc.virtnbdbackup.1.data', false], ['vdb.full.data', false], ['vdb.inc.virtnbdbackup.1.data', false],
  ]);
  for (const v of verdicts.slice(1)) assert.match(v.reason ?? '', new RegExp(`^not verified: a backup into the set moved its chain into ${path.join(set, ARCHIVE)} while this verify ran`));
});

/** A shell that holds `file` open (for writing, or reading), as another program's backup holds its .partial; ended with the test. */
async function holdOpen(t: TestContext, file: string, mode: '>>' | '<'): Promise<number> {
  const child = spawn('bash', ['-c', `exec 3${mode}"$0"; exec sleep 60`, file], { stdio: 'ignore' });
  cleanup(t, () => {
    child.kill('SIGKILL');
  });
  const pid = child.pid as number;
  const held = async (): Promise<boolean> => {
    const fds = await fsp.readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    return (await Promise.all(fds.map((fd) => fsp.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')))).includes(file);
  };
  assert.ok(await within(5000, held), `the shell did not open ${file}`);
  return pid;
}

test('a .partial another program writes now (no lock of ours) is said to be written, by backup, restore and verify', async (t) => {
  const work = await withTempDir(t, 'vnbd-concurrent-');
  const set = path.join(work, 'set');
  await craftSet(set, 0x11, '2027-01-01T00:00:00.000Z');
  const partial = path.join(set, 'vda.inc.virtnbdbackup.1.data.partial');
  await fsp.writeFile(partial, '');
  // The backup is refused before it looks for the domain: none is needed.
  const backup = (): Promise<string[]> => runCli(ourBin('virtnbdbackup'), ['-d', 'vnbdtest-no-such-domain', '-l', 'inc', '-o', set]).then((r) => {
    assert.equal(r.code, 1);
    return errorLines(r);
  });
  const reader = await holdOpen(t, partial, '<');
  assert.match((await backup()).join('\n'), /holds what a failed run left: vda\.inc\.virtnbdbackup\.1\.data\.partial/, 'a reader counted as a writer');
  process.kill(reader, 'SIGKILL');

  const writer = await holdOpen(t, partial, '>>');
  assert.deepEqual(await backup(), [`virtnbdbackup: error: ${partial} is being written right now by sleep (pid ${writer}), a program that takes no lock of ours (Python's virtnbdbackup, or a restore into this directory, say): run again once it has ended`]);
  assert.ok(fs.existsSync(partial));
  const restored = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'out')]);
  assert.equal(restored.code, 1);
  assert.deepEqual(errorLines(restored), [`virtnbdrestore: error: a backup (pid ${writer}) is writing into ${set} right now (${partial}); restore once it has ended`]);
  const verified = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']);
  assert.equal(verified.code, 1);
  assert.match(verified.stdout, new RegExp(`FAILED vda\\.inc\\.virtnbdbackup\\.1\\.data\\.partial: being written by a running backup \\(pid ${writer}\\): verify once it has ended`));
});

test('an inc started right after one killed with SIGKILL waits for the killed run\'s job to go (its guard ends it), then backs up', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 32 }] }] });
  const work = await withTempDir(t, 'vnbd-concurrent-');
  const zip = (level: string, name: string): Promise<unknown> => run('bash', ['-c', `cd "$0" && exec "$1" -d "$2" -l ${level} -o - -n > ${name}`, work, ourBin('virtnbdbackup'), dom.name]);
  await zip('full', 'full.zip');
  await dom.write('vda', 0x22, '8M', '16M');
  // Held on its unread output with its job begun; its guard stopped, so that the job outlives the run for a while.
  const killed = startHeldOnOutput(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', '-', '-n'], work);
  cleanup(t, () => {
    killed.child.kill('SIGKILL');
  });
  assert.ok(await within(20_000, async () => /writing vda\.inc\.virtnbdbackup\.1\.data/.test(killed.stderr())), killed.stderr());
  const guard = spawnSync('pgrep', ['-f', `domjobabort .?${dom.name}`], { encoding: 'utf8' }).stdout.trim().split('\n').filter(Boolean);
  assert.equal(guard.length, 1, `one guard of ${dom.name}: ${guard.join(', ')}`);
  const guardPid = Number(guard[0]);
  process.kill(guardPid, 'SIGSTOP');
  cleanup(t, () => {
    try {
      process.kill(guardPid, 'SIGCONT');
    } catch {
      // ended
    }
  });
  killed.child.kill('SIGKILL');
  await killed.done;

  const next = spawn('bash', ['-c', `cd "$0" && exec "$1" -d "$2" -l inc -o - -n > inc.zip`, work, ourBin('virtnbdbackup'), dom.name], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  next.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const ended = new Promise<number | null>((resolve) => next.on('close', (code) => resolve(code)));
  assert.ok(await within(20_000, async () => /has a backup job, maybe of a run that died \(this run took over its lock\): waiting up to 20 s for its guard to end it/.test(stderr)), stderr);
  process.kill(guardPid, 'SIGCONT');
  assert.equal(await ended, 0, stderr);
  assert.match(stderr, /removed checkpoint virtnbdbackup\.1: a run that did not finish created it/);

  const set = path.join(work, 'set');
  await fsp.mkdir(set);
  for (const name of ['full.zip', 'inc.zip']) await run('unzip', ['-o', '-q', path.join(work, name), '-d', set]);
  const restored = path.join(work, 'restored');
  await run(ourBin('virtnbdrestore'), ['-i', set, '-o', restored, '-n']);
  const now = await dom.snapshot('vda');
  const compared = await TestDomain.compare(path.join(restored, 'vda.qcow2'), now, { formatA: 'qcow2' });
  assert.ok(compared.identical, compared.output);
});

test('a run waiting for a dead run\'s job stops at once on SIGTERM (exit 130), the other program\'s job left alone', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16 }] });
  const work = await withTempDir(t, 'vnbd-concurrent-');
  // Another program's job (virsh backup-begin), and a lock of a run that died: the run cannot tell the two apart.
  const jobXml = path.join(work, 'job.xml');
  await fsp.writeFile(jobXml, `<domainbackup mode='pull'><server transport='unix' socket='${path.join(work, 'other.sock')}'/><disks><disk name='vda' backup='yes' type='file'><scratch file='${path.join(work, 'other.scratch')}'/></disk></disks></domainbackup>`);
  await run('virsh', ['-c', 'qemu:///system', 'backup-begin', dom.name, jobXml]);
  cleanup(t, () => run('virsh', ['-c', 'qemu:///system', 'domjobabort', dom.name], { allowFailure: true }));
  const gone = spawnSync('true').pid as number;
  const lock = domainLockFile(dom.name);
  await fsp.writeFile(lock, JSON.stringify({ pid: gone, start: '1' }));
  cleanup(t, () => fsp.rm(lock, { force: true }));

  const waiting = spawn(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', path.join(work, 'set'), '-n'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  waiting.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const ended = new Promise<number | null>((resolve) => waiting.on('close', (code) => resolve(code)));
  assert.ok(await within(20_000, async () => /waiting up to 20 s for its guard to end it/.test(stderr)), stderr);
  const stopped = Date.now();
  waiting.kill('SIGTERM');
  assert.equal(await ended, 130, stderr);
  assert.ok(Date.now() - stopped < 3000, `the run took ${Date.now() - stopped} ms to stop`);
  assert.match(stderr, /interrupted by SIGTERM/);
  assert.match(spawnSync('virsh', ['-c', 'qemu:///system', 'domjobinfo', dom.name], { encoding: 'utf8' }).stdout, /Backup/, 'the other program\'s job was ended');
});

test('a set whose chain was just moved aside, before the new full wrote anything, names where the chain went (restore, verify)', async (t) => {
  const work = await withTempDir(t, 'vnbd-concurrent-');
  const set = path.join(work, 'set');
  await craftSet(set, 0x11, '2027-01-01T00:00:00.000Z');
  moveChainAside(set);
  const line = `${set} holds no *.data files: its chain was moved aside into ${path.join(set, ARCHIVE)} by a backup that fell back to a full backup, whose new chain starts here (its files appear as that backup writes them); give -i ${path.join(set, ARCHIVE)} for the chain moved aside`;
  for (const output of [path.join(work, 'out'), 'verify']) {
    const r = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', output]);
    assert.equal(r.code, 1);
    assert.deepEqual(errorLines(r), [`virtnbdrestore: error: ${line}`]);
  }
});
