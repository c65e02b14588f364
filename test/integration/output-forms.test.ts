// Output forms on a real domain: the zip stream on stdout through a pipe (full + inc unzipped into one set,
// restored by ours and by Python; random data, plain and -z, kept intact; a reader that goes away; Python's zips of a chain begun anew
// unzipped over the old one's), -t raw images, -r raw-format disks, lz4 over compressible and
// incompressible data, and offsets/files beyond 4 GiB (reduced by default; VNBD_LARGE=1 for > 4 GiB of data).
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { withDomain, tempDir, run, type TestDomain } from '../support/testbed.js';
import { assertNoNodeWarning, errorLines, ourBin, pythonBin, repoRoot, runCli, runOk } from '../support/cli.js';
import { TestDomain as Domain } from '../support/testbed.js';
import { flipByte } from '../support/craftedSet.js';

const MiB = 1024 * 1024;

/** Runs `virtnbdbackup ... -o -` in `cwd` piped through `cat` into `zipFile`, as `| ssh host 'cat > f'` would. */
function backupToZip(cwd: string, args: string[], zipFile: string): Promise<{ code: number | null; stderr: string }> {
  return backupPiped(cwd, args, `cat > '${zipFile}'`);
}

/** Runs a program in `cwd`, capturing its output (the zip state dir is the working directory). */
function runCliIn(cwd: string, command: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Runs `virtnbdbackup ... -o -` in `cwd` piped into the shell command `reader` (the exit code is pipefail's). */
function backupPiped(cwd: string, args: string[], reader: string): Promise<{ code: number | null; stderr: string }> {
  return backupInShell(cwd, args, `| ${reader}`);
}

/** Runs `virtnbdbackup ... -o - <where>` in `cwd`, `where` a pipe or a redirection of the shell's. */
function backupInShell(cwd: string, args: string[], where: string, command = ourBin('virtnbdbackup')): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const shell = spawn('bash', ['-o', 'pipefail', '-c', `"$0" "$@" -o - ${where}`, command, ...args], { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    shell.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    shell.on('error', reject);
    shell.on('close', (code) => {
      try {
        if (command === ourBin('virtnbdbackup')) assertNoNodeWarning('virtnbdbackup', stderr);
        resolve({ code, stderr });
      } catch (err) {
        reject(err);
      }
    });
  });
}

async function assertSame(image: string, reference: string, formatA: 'qcow2' | 'raw' = 'qcow2'): Promise<void> {
  const r = await Domain.compare(image, reference, { formatA, formatB: 'raw' });
  assert.ok(r.identical, `${image} differs from ${reference}: ${r.output}`);
}

test('zip on stdout through a pipe: full + inc unzipped into one set restore with ours and Python', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 128, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 12 }, { pattern: 0x11, offsetMiB: 12, lengthMiB: 4 }] },
    { target: 'vdb', sizeMiB: 64, fill: [{ pattern: 0x22, offsetMiB: 8, lengthMiB: 8 }] },
  ] });
  const work = await tempDir('vnbd-zip-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const state = path.join(work, 'state');
  await fs.mkdir(state);
  const full = await backupToZip(state, ['-d', dom.name, '-l', 'full', '-n'], path.join(work, 'full.zip'));
  assert.equal(full.code, 0, full.stderr);
  assert.match(full.stderr, /finished full backup/, 'log lines go to stderr');
  // The chain state stays in the current directory for the next run.
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(state, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0']);
  await dom.write('vda', 0x33, '4M', '2M');
  await dom.write('vdb', 0x44, '1M', '1M');
  const refs = { vda: await dom.snapshot('vda', path.join(work, 'vda.ref')), vdb: await dom.snapshot('vdb', path.join(work, 'vdb.ref')) };
  // Python's restore orders data files by modification time, and a zip keeps times to 2 seconds: backups
  // minutes apart, as real schedules are, unzip in order; ones within the same 2 seconds would tie.
  await new Promise((resolve) => setTimeout(resolve, 2100));
  const inc = await backupToZip(state, ['-d', dom.name, '-l', 'inc', '-n'], path.join(work, 'inc.zip'));
  assert.equal(inc.code, 0, inc.stderr);

  for (const zip of ['full.zip', 'inc.zip']) {
    await run('unzip', ['-tq', path.join(work, zip)]);
    const listed = await run('/usr/bin/python3', ['-c', 'import sys,zipfile; z=zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; print("\\n".join(z.namelist()))', path.join(work, zip)]);
    assert.match(listed.stdout, /vda\.(full|inc\.virtnbdbackup\.1)\.data\n/);
    assert.match(listed.stdout, /checkpoints\/virtnbdbackup\.\d\.xml/);
    assert.match(listed.stdout, /backup\.(full|inc)\.\d{14}\.log/);
  }
  const set = path.join(work, 'set');
  await fs.mkdir(set);
  await run('unzip', ['-oq', path.join(work, 'full.zip'), '-d', set]);
  await run('unzip', ['-oq', path.join(work, 'inc.zip'), '-d', set]);
  for (const [tool, name] of [[ourBin('virtnbdrestore'), 'ours'], [pythonBin('virtnbdrestore'), 'python']] as const) {
    const out = path.join(work, name);
    await runOk(tool, ['-i', set, '-o', out, '-n']);
    await assertSame(path.join(out, 'vda.qcow2'), refs.vda);
    await assertSame(path.join(out, 'vdb.qcow2'), refs.vdb);
  }
  const tty = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', '-', '-t', 'raw', '-n']);
  assert.equal(tty.code, 1);
  assert.match(tty.stderr, /-t raw (writes full images only|cannot be written to standard output)/);
  // An inc started from another directory finds no chain state there, and says where it is kept.
  const elsewhere = path.join(work, 'elsewhere');
  await fs.mkdir(elsewhere);
  const lost = await backupToZip(elsewhere, ['-d', dom.name, '-l', 'inc', '-n'], path.join(work, 'lost.zip'));
  assert.equal(lost.code, 1);
  assert.match(lost.stderr, /no checkpoints in the backup set \(.*\/elsewhere\/.*\.cpt is missing\): run a full backup first, or start this run from the directory the chain's earlier -o - runs started from/);
});

test('a reader of the zip that goes away, or a full output: one line saying so, the job ended, no checkpoint left, the next full works', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 'random', offsetMiB: 0, lengthMiB: 32 }] }] });
  const state = await tempDir('vnbd-epipe-');
  t.after(() => fs.rm(state, { recursive: true, force: true }));
  // Readers that go at once, after the zip's first bytes, and in mid-entry (the archive's flow then stops, which
  // once left the run waiting for nothing: it exited 0 with its job still running).
  for (const bytes of [0, 1000, 100_000, 5_000_000]) {
    const cut = await backupPiped(state, ['-d', dom.name, '-l', 'full', '-n'], `head -c ${bytes} > /dev/null`);
    assert.equal(cut.code, 1, `${bytes}: ${cut.stderr}`);
    const errors = cut.stderr.split('\n').filter((l) => /error/i.test(l));
    assert.equal(errors.length, 1, cut.stderr);
    assert.match(errors[0] ?? '', /^virtnbdbackup: error: backup of disk vda failed writing zip:vda\.full\.data\.partial: the reader of the output went away \(broken pipe\); check the command the output is piped into \(EPIPE\)$/);
    assert.match((await run('virsh', ['-c', 'qemu:///system', 'domjobinfo', dom.name])).stdout, /Job type:\s+None/);
    assert.equal((await run('virsh', ['-c', 'qemu:///system', 'checkpoint-list', dom.name, '--name'])).stdout.trim(), '');
  }
  // Standard output on a full file system from its first byte: one line, and the job is ended too (it was left).
  const full = await backupInShell(state, ['-d', dom.name, '-l', 'full', '-n'], '> /dev/full');
  assert.equal(full.code, 1, full.stderr);
  const errors = full.stderr.split('\n').filter((l) => /error/i.test(l));
  assert.equal(errors.length, 1, full.stderr);
  assert.match(errors[0] ?? '', /^virtnbdbackup: error: .*no space left on device; .+ \(ENOSPC\)$/);
  assert.match((await run('virsh', ['-c', 'qemu:///system', 'domjobinfo', dom.name])).stdout, /Job type:\s+None/);
  assert.equal((await run('virsh', ['-c', 'qemu:///system', 'checkpoint-list', dom.name, '--name'])).stdout.trim(), '');
  const again = await backupToZip(state, ['-d', dom.name, '-l', 'full', '-n'], path.join(state, 'full.zip'));
  assert.equal(again.code, 0, again.stderr);
  await run('unzip', ['-tq', path.join(state, 'full.zip')]);
});

/**
 * A domain with a full zip in a working directory `state` (named `prefix`), its .cpt then (`chainBefore`), and a guest
 * write since; `engine` is the engine's module, for a script that runs the next backup in-process.
 */
async function zipFullThenChange(t: TestContext, prefix: string): Promise<{ dom: TestDomain; state: string; cpt: string; chainBefore: string; engine: string }> {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] }] });
  const state = await tempDir(prefix);
  t.after(() => fs.rm(state, { recursive: true, force: true }));
  const full = await backupToZip(state, ['-d', dom.name, '-l', 'full', '-n'], path.join(state, 'full.zip'));
  assert.equal(full.code, 0, full.stderr);
  const cpt = path.join(state, `${dom.name}.cpt`);
  const chainBefore = await fs.readFile(cpt, 'utf8');
  await dom.write('vda', 0x5a, '8M', '2M');
  return { dom, state, cpt, chainBefore, engine: path.join(repoRoot, 'dist', 'src', 'index.js') };
}

test('a zip that fails at its very end (its central directory) leaves the chain state as it was and removes its checkpoint: the next inc saves those changes too', async (t) => {
  const { dom, state, cpt, chainBefore, engine } = await zipFullThenChange(t, 'vnbd-zipend-');
  // The engine itself, its output failing on the write of the end of central directory: all data and side files
  // are in, the archive is not whole.
  const script = `import { Writable } from 'node:stream';
    import { backup } from ${JSON.stringify(engine)};
    const ends = [Buffer.from('504b0506', 'hex'), Buffer.from('504b0606', 'hex')];
    const stdout = new Writable({ write(chunk, _enc, done) {
      done(ends.some((e) => chunk.includes(e)) ? Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }) : undefined);
    } });
    await backup({ domain: ${JSON.stringify(dom.name)}, level: 'inc', output: '-', stdout }).then(
      () => { console.log('finished'); process.exit(0); }, (err) => { console.log('failed: ' + err.message); process.exit(1); });`;
  const cut = await runCliIn(state, process.execPath, ['--input-type=module', '-e', script]);
  assert.equal(cut.code, 1, cut.stdout + cut.stderr);
  assert.match(cut.stdout, /^failed: cannot finish the zip on standard output: the reader of the output went away \(broken pipe\); check the command the output is piped into \(EPIPE\)$/m);
  assert.equal(await fs.readFile(cpt, 'utf8'), chainBefore, 'the .cpt lists the checkpoint of a zip that failed');
  // The run removed its checkpoint itself (its bitmap merged into the full's): the next inc finds none to remove
  // and saves the write.
  assert.equal((await run('virsh', ['-c', 'qemu:///system', 'checkpoint-list', dom.name, '--name'])).stdout.trim(), 'virtnbdbackup.0');
  const reference = await dom.snapshot('vda', path.join(state, 'vda.raw'));
  const inc = await backupToZip(state, ['-d', dom.name, '-l', 'inc', '-n'], path.join(state, 'inc.zip'));
  assert.equal(inc.code, 0, inc.stderr);
  assert.doesNotMatch(inc.stderr, /warning/);
  const set = path.join(state, 'set');
  await fs.mkdir(set);
  for (const zip of ['full.zip', 'inc.zip']) await run('unzip', ['-oq', path.join(state, zip), '-d', set]);
  const out = path.join(state, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n']);
  const compared = await Domain.compare(path.join(out, 'vda.qcow2'), reference);
  assert.ok(compared.identical, compared.output);
});

test('zip on stdout: two domains backed up from one working directory keep their chains apart (each inc an inc), with one -C too; a full of another prefix there is refused', async (t) => {
  const doms = await Promise.all([0x11, 0x22].map((pattern) => withDomain(t, { disks: [{ target: 'vda', sizeMiB: 32, fill: [{ pattern, offsetMiB: 0, lengthMiB: 2 }] }] })));
  const state = await tempDir('vnbd-zipdoms-');
  t.after(() => fs.rm(state, { recursive: true, force: true }));
  for (const dom of doms) {
    const r = await backupToZip(state, ['-d', dom.name, '-l', 'auto', '-n'], path.join(state, `${dom.name}.full.zip`));
    assert.equal(r.code, 0, r.stderr);
  }
  for (const dom of doms) {
    await dom.write('vda', 0x33, '4M', '1M');
    const r = await backupToZip(state, ['-d', dom.name, '-l', 'auto', '-n'], path.join(state, `${dom.name}.inc.zip`));
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stderr, /warning/, r.stderr);
    const listed = await run('/usr/bin/python3', ['-c', 'import sys,zipfile; print("\\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))', path.join(state, `${dom.name}.inc.zip`)]);
    assert.match(listed.stdout, /^vda\.inc\.virtnbdbackup\.1\.data$/m);
    assert.match(listed.stdout, /^checkpoints\/virtnbdbackup\.1\.xml$/m);
    assert.match(listed.stdout, /^backup\.auto\.\d{14}(\.\d+)?\.log$/m, '-l auto\'s log is named for auto, as Python\'s');
  }
  assert.deepEqual((await fs.readdir(path.join(state, 'checkpoints'))).sort(), doms.map((d) => d.name).sort());
  // Another chain (a set in a directory) replaces a domain's checkpoints: the next zip is a full, and the line says
  // where the old chain's state went and that its zips still restore (it said the moved state "restores from there").
  const first = doms[0] as TestDomain;
  await runOk(ourBin('virtnbdbackup'), ['-d', first.name, '-l', 'full', '-o', path.join(state, 'dirset'), '-n']);
  const fallback = await backupToZip(state, ['-d', first.name, '-l', 'inc', '-n'], path.join(state, 'after.zip'));
  assert.equal(fallback.code, 0, fallback.stderr);
  assert.match(fallback.stderr, /makes a full backup instead; the previous chain's state was moved to \S+\/chain\.\d+; its zips still restore, unzipped into a directory of their own \(not with this run's zip, which holds a new full\)/);
  // The directory holds one chain's state per domain: a full of another prefix replaced it without a word, and
  // that chain's next inc was refused (found by a black-box round).
  const second = doms[1] as TestDomain;
  const otherPrefix = await backupToZip(state, ['-d', second.name, '-l', 'full', '--checkpoint-prefix', 'weekly', '-n'], path.join(state, 'weekly.zip'));
  assert.equal(otherPrefix.code, 1, otherPrefix.stderr);
  assert.match(otherPrefix.stderr, /\.cpt keeps the state of the zip chain of checkpoint prefix 'virtnbdbackup', which a full of prefix 'weekly' would replace; run the zips of each prefix from a working directory of its own/);
  assert.deepEqual(JSON.parse(await fs.readFile(path.join(state, `${second.name}.cpt`), 'utf8')), ['virtnbdbackup.0', 'virtnbdbackup.1']);
  // An inc (auto) of another prefix there: the line spoke of the set of that chain, which a zip run has not.
  const otherInc = await backupToZip(state, ['-d', second.name, '-l', 'auto', '--checkpoint-prefix', 'weekly', '-n'], path.join(state, 'weekly.zip'));
  assert.equal(otherInc.code, 1, otherInc.stderr);
  assert.match(otherInc.stderr, /error: the zip chain uses checkpoint prefix 'virtnbdbackup' \(\S+\.cpt\), not 'weekly'; drop --checkpoint-prefix or run the 'weekly' zips from a working directory of their own\n/);

  // One -C for both domains' zip chains holds one definition per name, the last domain's: the other domain's inc
  // took its checkpoint for another chain's and made a full, every time (found by a black-box round). Each chain's
  // state keeps its own copy, in checkpoints/<domain>/, as it does without -C.
  const shared = await tempDir('vnbd-zipdoms-c-');
  t.after(() => fs.rm(shared, { recursive: true, force: true }));
  const cdir = path.join(shared, 'cpt');
  for (const level of ['full', 'inc', 'inc']) {
    for (const dom of doms) {
      const r = await backupToZip(shared, ['-d', dom.name, '-l', level, '-C', cdir, '-n'], path.join(shared, `${dom.name}.zip`));
      assert.equal(r.code, 0, r.stderr);
      assert.doesNotMatch(r.stderr, /warning/, r.stderr);
    }
  }
  for (const dom of doms) {
    assert.deepEqual(JSON.parse(await fs.readFile(path.join(shared, `${dom.name}.cpt`), 'utf8')), ['virtnbdbackup.0', 'virtnbdbackup.1', 'virtnbdbackup.2']);
    assert.deepEqual((await fs.readdir(path.join(shared, 'checkpoints', dom.name))).sort(), ['virtnbdbackup.0.xml', 'virtnbdbackup.1.xml', 'virtnbdbackup.2.xml']);
  }
  // The first domain defined anew loses its checkpoints: they come back from its own copies, not from -C, which
  // holds the other domain's (the inc became a full).
  await first.stop();
  await run('virsh', ['-c', 'qemu:///system', 'undefine', '--checkpoints-metadata', first.name]);
  await run('virsh', ['-c', 'qemu:///system', 'define', path.join(first.dir, 'domain.xml')]);
  await first.start();
  const redefined = await backupToZip(shared, ['-d', first.name, '-l', 'inc', '-C', cdir, '-n'], path.join(shared, 'redefined.zip'));
  assert.equal(redefined.code, 0, redefined.stderr);
  assert.match(redefined.stderr, new RegExp(`redefined checkpoint virtnbdbackup\\.2 from ${path.join(shared, 'checkpoints', first.name, 'virtnbdbackup.2.xml')}`));
  assert.doesNotMatch(redefined.stderr, /warning/, redefined.stderr);
});

test('zip of random data, plain and -z: the archive holds the bytes read, not buffers reused after the write', async (t) => {
  // Patterned data would hide a reused buffer (every piece the same bytes); random data in many pieces does not.
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 96, fill: [{ pattern: 0x5a, offsetMiB: 0, lengthMiB: 8 }, { pattern: 'random', offsetMiB: 16, lengthMiB: 48 }] }] });
  const work = await tempDir('vnbd-ziprandom-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const ref = await dom.snapshot('vda', path.join(work, 'vda.ref'));
  for (const [form, flags] of [['plain', []], ['lz4', ['-z']]] as const) {
    const state = path.join(work, `state-${form}`);
    await fs.mkdir(state);
    const zip = path.join(work, `${form}.zip`);
    const r = await backupToZip(state, ['-d', dom.name, '-l', 'copy', '-n', ...flags], zip);
    assert.equal(r.code, 0, r.stderr);
    await run('unzip', ['-tq', zip]);
    const set = path.join(work, `set-${form}`);
    await fs.mkdir(set);
    await run('unzip', ['-oq', zip, '-d', set]);
    const tools = form === 'lz4' ? [[ourBin('virtnbdrestore'), 'ours'], [pythonBin('virtnbdrestore'), 'python']] as const : [[ourBin('virtnbdrestore'), 'ours']] as const;
    for (const [tool, name] of tools) {
      const out = path.join(work, `out-${form}-${name}`);
      await runOk(tool, ['-i', set, '-o', out, '-n']);
      await assertSame(path.join(out, 'vda.qcow2'), ref);
    }
  }
});

test('-t raw writes full-size sparse images (-z a warning) with their .chksum, which verify and restore check, and restores; inc with -t raw is refused', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 256, fill: [
    { pattern: 0x11, offsetMiB: 3, lengthMiB: 1 }, { pattern: 'random', offsetMiB: 100, lengthMiB: 12 }] }] });
  const work = await tempDir('vnbd-raw-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const set = path.join(work, 'set');
  const ref = await dom.snapshot('vda', path.join(work, 'vda.ref'));
  // -z has nothing to compress in a raw image: said, not silently dropped.
  const full = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-t', 'raw', '-z', '-o', set, '-n']);
  assert.match(full.stderr, /warning: -z does not apply to -t raw: the images are written uncompressed/);
  const image = path.join(set, 'vda.full.data');
  const stat = await fs.stat(image);
  assert.equal(stat.size, 256 * MiB);
  assert.ok(stat.blocks * 512 < 64 * MiB, `raw image is not sparse: ${stat.blocks * 512} bytes allocated`);
  await assertSame(image, ref, 'raw');
  // The adler32 of every byte of the image, holes as zeros, as Python's zlib sums the file.
  const adler = await run('/usr/bin/python3', ['-c', 'import sys,zlib; print(zlib.adler32(open(sys.argv[1], "rb").read()))', image]);
  assert.equal(await fs.readFile(`${image}.chksum`, 'utf8'), adler.stdout.trim());
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']);
  const restored = path.join(work, 'restored');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', restored, '-n']);
  await assertSame(path.join(restored, 'vda.qcow2'), ref, 'qcow2');
  // Flipped, not overwritten: that region is random, and a fixed byte matched what was there one time in 256.
  await flipByte(image, 100 * MiB + 5);
  const rotted = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']);
  assert.equal(rotted.code, 1, rotted.stderr);
  assert.match(rotted.stdout, /^FAILED vda\.full\.data: adler32 of the file is \d+, vda\.full\.data\.chksum says \d+$/m);
  // Restore checks it too (it used to copy it as it was): one line naming the file; no output dir or .partial left.
  const damagedLine = /^virtnbdrestore: error: restore of disk vda failed: \S+\/vda\.full\.data: adler32 of the file is \d+, vda\.full\.data\.chksum says \d+; the set's file is damaged: check the set with -a verify; it is disk vda's raw image, which stands alone, so no point in time of that disk restores from this set; (nothing of it was kept|\S+ was left untouched)$/;
  const refusedDir = path.join(work, 'refused', 'nested');
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', refusedDir, '-n']);
  assert.equal(refused.code, 1, refused.stderr);
  assert.deepEqual(errorLines(refused).length, 1, refused.stderr);
  assert.match(errorLines(refused)[0] ?? '', damagedLine);
  assert.match(refused.stderr, /nothing of it was kept$/m);
  assert.equal(await fs.access(path.join(work, 'refused')).then(() => true, () => false), false, 'the output dirs it made are left');
  // Onto an existing raw file it is checked before anything is written: the file keeps its bytes.
  const onto = path.join(work, 'onto.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', onto, String(256 * MiB)]);
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', onto]);
  const ontoBefore = (await run('sha256sum', [onto])).stdout;
  const refusedOnto = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', onto, '-n']);
  assert.equal(refusedOnto.code, 1, refusedOnto.stderr);
  assert.match(errorLines(refusedOnto).join('\n'), damagedLine);
  assert.match(refusedOnto.stderr, /onto\.raw was left untouched$/m);
  assert.equal((await run('sha256sum', [onto])).stdout, ontoBefore, `${onto} was written`);
  await fs.rm(onto);
  const inc = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-t', 'raw', '-o', set, '-n']);
  assert.equal(inc.code, 1);
  assert.match(inc.stderr, /-t raw writes full images only/);
  // A stream inc onto the raw full was saved, and then no point of the set restored.
  for (const level of ['inc', 'auto']) {
    const onRaw = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', level, '-o', set, '-n']);
    assert.equal(onRaw.code, 1, onRaw.stderr);
    assert.match(onRaw.stderr.trim(), /^virtnbdbackup: error: vda\.full\.data in \S+ is a raw image \(-t raw\), which an inc cannot continue: a restore could not apply it; start a chain with -l full \(stream\) in an empty directory$/);
  }
  // A set of a copy alone starts no chain: each refusal says what does, not the other's way (auto said "-l inc/auto").
  const copies = path.join(work, 'copies');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-o', copies, '-n']);
  const auto = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'auto', '-o', copies, '-n']);
  assert.match(auto.stderr.trim(), /already holds a backup \(vda\.copy\.data\); use an empty directory for a full backup: a copy \(as a shut-off domain's full or auto backup makes\) starts no chain; start one in an empty directory with the domain running, or with -S$/);
  const incOnCopy = await runCli(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-o', copies, '-n']);
  assert.match(incOnCopy.stderr.trim(), /holds a copy \(vda\.copy\.data\), which starts no chain: an inc backup needs a full one; run -l full \(or -l auto\) into an empty directory$/);
});

test('-r includes raw-format disks as copy; without it they are skipped with a warning', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] },
    { target: 'vdb', sizeMiB: 32, format: 'raw', fill: [{ pattern: 0x77, offsetMiB: 2, lengthMiB: 3 }] },
  ] });
  const work = await tempDir('vnbd-rawdisk-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const without = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', path.join(work, 'a'), '-n']);
  assert.match(without.stderr, /skipping disk vdb: raw-format disk/);
  assert.ok(!(await fs.readdir(path.join(work, 'a'))).some((f) => f.startsWith('vdb.')));

  const set = path.join(work, 'b');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-r', '-o', set, '-n']);
  const files = await fs.readdir(set);
  assert.ok(files.includes('vda.full.data') && files.includes('vdb.copy.data'), files.join(' '));
  const ref = await dom.snapshot('vdb', path.join(work, 'vdb.ref'));
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vdb', '-r']);
  await assertSame(path.join(out, 'vdb.raw'), ref, 'raw');
  // Saved as a raw image, as Python saves raw disks: its restore copies the file as it is (a stream of ours came out
  // as frame headers and data, exit 0). --until keeps it, as a copy taken with the full.
  assert.equal((await fs.stat(path.join(set, 'vdb.copy.data'))).size, 32 * 1024 * 1024);
  const python = path.join(work, 'python');
  await runOk(pythonBin('virtnbdrestore'), ['-i', set, '-o', python, '-r']);
  await assertSame(path.join(python, 'vdb.raw'), ref, 'raw');
  const atFull = await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'at-full'), '-n', '-r', '--until', 'virtnbdbackup.0']);
  await assertSame(path.join(work, 'at-full', 'vdb.raw'), ref, 'raw');
  assert.match(atFull.stderr, /--until does not apply to raw images \(vdb\.copy\.data\): they are restored as they are/);
  // In an incremental, raw disks are left out with a warning; the qcow2 disk continues its chain.
  await dom.write('vda', 0x12, '1M', '1M');
  const inc = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'inc', '-r', '-o', set, '-n']);
  assert.match(inc.stderr, /warning: raw disks have no checkpoints/);
  // One warning for all; each raw disk is a line that does not tell to give the -r that was given.
  assert.match(inc.stderr, /^skipping disk vdb: raw-format disk \(no checkpoints possible\): -r takes it into full and copy backups only$/m);
  assert.equal(inc.stderr.match(/warning:/g)?.length, 1, inc.stderr);
  assert.ok((await fs.readdir(set)).includes('vda.inc.virtnbdbackup.1.data'));
});

test('lz4 over compressible and incompressible data: smaller where it can be, exact everywhere', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 256, fill: [{ pattern: 0x61, offsetMiB: 0, lengthMiB: 48 }, { pattern: 'random', offsetMiB: 100, lengthMiB: 40 }] }] });
  const work = await tempDir('vnbd-lz4mix-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const ref = await dom.snapshot('vda', path.join(work, 'vda.ref'));
  const plain = path.join(work, 'plain');
  const packed = path.join(work, 'lz4');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-o', plain, '-n']);
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-z', '-o', packed, '-n']);
  const plainSize = (await fs.stat(path.join(plain, 'vda.copy.data'))).size;
  const packedSize = (await fs.stat(path.join(packed, 'vda.copy.data'))).size;
  assert.ok(packedSize < plainSize - 40 * MiB, `compressed ${packedSize} vs plain ${plainSize}`);
  assert.ok(packedSize > 40 * MiB, 'random data cannot shrink');
  for (const [tool, name] of [[ourBin('virtnbdrestore'), 'ours'], [pythonBin('virtnbdrestore'), 'python']] as const) {
    const out = path.join(work, `out-${name}`);
    await runOk(tool, ['-i', packed, '-o', out, '-n']);
    await assertSame(path.join(out, 'vda.qcow2'), ref);
  }
});

/**
 * Offsets beyond 4 GiB always; with VNBD_LARGE=1 also data files larger than 4 GiB (about 4.2 GiB of data),
 * in a directory and in the zip stream. The reduced form keeps the suite fast.
 */
test('beyond 4 GiB: offsets (and, with VNBD_LARGE=1, file sizes) in a directory and in the zip', async (t) => {
  const large = process.env.VNBD_LARGE === '1';
  const fill = large
    ? [{ pattern: 0x21, offsetMiB: 0, lengthMiB: 2200 }, { pattern: 0x43, offsetMiB: 4200, lengthMiB: 2100 }]
    : [{ pattern: 0x21, offsetMiB: 0, lengthMiB: 4 }, { pattern: 0x43, offsetMiB: 4600, lengthMiB: 8 }];
  const dom: TestDomain = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: large ? 6400 : 5120, fill }] });
  const work = await tempDir('vnbd-4g-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const ref = await dom.snapshot('vda', path.join(work, 'vda.ref'));
  const set = path.join(work, 'set');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', '-o', set, '-n']);
  if (large) assert.ok((await fs.stat(path.join(set, 'vda.copy.data'))).size > 4 * 1024 * MiB);
  const zipState = path.join(work, 'state');
  await fs.mkdir(zipState);
  const zipped = await backupToZip(zipState, ['-d', dom.name, '-l', 'copy', '-n'], path.join(work, 'copy.zip'));
  assert.equal(zipped.code, 0, zipped.stderr);
  const unzipped = path.join(work, 'unzipped');
  await fs.mkdir(unzipped);
  await run('/usr/bin/python3', ['-c', 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])', path.join(work, 'copy.zip'), unzipped]);
  for (const [source, tool, name] of [[set, ourBin('virtnbdrestore'), 'ours'], [unzipped, ourBin('virtnbdrestore'), 'ours-zip'], [set, pythonBin('virtnbdrestore'), 'python']] as const) {
    const out = path.join(work, `out-${name}`);
    await runOk(tool, ['-i', source, '-o', out, '-n']);
    await assertSame(path.join(out, 'vda.qcow2'), ref);
  }
});

test('zip on stdout: a disk left out of one inc (-x) resumes in the next zip as an inc, whose files unzip beside the earlier ones into a set that restores', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] },
    { target: 'vdb', sizeMiB: 32, fill: [{ pattern: 0x22, offsetMiB: 0, lengthMiB: 2 }] },
  ] });
  const work = await tempDir('vnbd-zipx-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const state = path.join(work, 'state');
  await fs.mkdir(state);
  const zips = ['full', 'inc1', 'inc2'].map((n) => path.join(work, `${n}.zip`));
  assert.equal((await backupToZip(state, ['-d', dom.name, '-l', 'full', '-n'], zips[0] as string)).code, 0);
  await dom.write('vdb', 0x33, '4M', '1M');
  assert.equal((await backupToZip(state, ['-d', dom.name, '-l', 'inc', '-n', '-x', 'vdb'], zips[1] as string)).code, 0);
  await dom.write('vdb', 0x44, '6M', '1M');
  const reference = await dom.snapshot('vdb', path.join(work, 'vdb.ref'));
  const resumed = await backupToZip(state, ['-d', dom.name, '-l', 'inc', '-n'], zips[2] as string);
  assert.equal(resumed.code, 0, resumed.stderr);
  assert.match(resumed.stderr, /disk vdb was left out of the backups after checkpoint virtnbdbackup\.0/);
  const names = (await run('unzip', ['-Z1', zips[2] as string])).stdout.split('\n');
  assert.ok(names.includes('vdb.inc.virtnbdbackup.2.data') && !names.includes('vdb.full.data'), names.join(' '));
  const set = path.join(work, 'set');
  for (const zip of zips) await run('unzip', ['-n', '-q', zip, '-d', set]);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vdb']);
  await assertSame(path.join(out, 'vdb.qcow2'), reference);
});

test("Python's zip chain begun anew, its zips unzipped over the old chain's: the old chain's newer inc is refused as another chain's by restore and verify; the new chain's points restore", async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 64, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 4 }] }] });
  const work = await tempDir('vnbd-pyzip-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const state = path.join(work, 'state');
  await fs.mkdir(state);
  const zips: string[] = [];
  const pythonZip = async (level: string): Promise<void> => {
    const zip = path.join(work, `${zips.length}.${level}.zip`);
    const r = await backupInShell(state, ['-d', dom.name, '-l', level, '-n'], `> '${zip}'`, pythonBin('virtnbdbackup'));
    assert.equal(r.code, 0, r.stderr);
    zips.push(zip);
  };
  // The old chain: full, inc 1, inc 2; then a new chain: full, inc 1.
  await pythonZip('full');
  await dom.write('vda', 0x22, '8M', '2M');
  await pythonZip('inc');
  await dom.write('vda', 0x33, '12M', '2M');
  await pythonZip('inc');
  await dom.write('vda', 0x44, '16M', '2M');
  await pythonZip('full');
  await dom.write('vda', 0x55, '20M', '2M');
  const reference = await dom.snapshot('vda', path.join(work, 'vda.ref'));
  await pythonZip('inc');
  const set = path.join(work, 'set');
  for (const zip of zips) await run('unzip', ['-o', '-q', zip, '-d', set]);
  const line = /broken chain: vda\.inc\.virtnbdbackup\.2\.data was written at \S+, before the chain's base vda\.full\.data \(\S+\): it comes from an earlier chain with the same names/;
  const refused = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', path.join(work, 'refused'), '-n']);
  assert.equal(refused.code, 1, refused.stderr);
  assert.match(errorLines(refused).join('\n'), line);
  await assert.rejects(fs.access(path.join(work, 'refused', 'vda.qcow2')));
  const verified = await runCli(ourBin('virtnbdrestore'), ['-i', set, '-o', 'verify']);
  assert.equal(verified.code, 1, verified.stdout);
  assert.match(verified.stdout, /^FAILED chain: .*was written at .* before the chain's base/m);
  const out = path.join(work, 'out');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '--until', 'virtnbdbackup.1']);
  await assertSame(path.join(out, 'vda.qcow2'), reference);
});

test('a boot file the domain XML names twice (kernel and initrd one file) is one entry of the zip and one file of a set; of two boot files of one name the nvram\'s is kept, which restore puts back', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] }], start: false });
  const work = await tempDir('vnbd-zipboot-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const shared = path.join(dom.dir, 'boot-both');
  await fs.writeFile(shared, Buffer.alloc(4096, 7));
  // The loader and the NVRAM both named vars.fd, in two directories: different files of one name in the set.
  await fs.mkdir(path.join(dom.dir, 'code'));
  await fs.mkdir(path.join(dom.dir, 'vars'));
  const loader = path.join(dom.dir, 'code', 'vars.fd');
  const nvram = path.join(dom.dir, 'vars', 'vars.fd');
  await fs.writeFile(loader, Buffer.alloc(65536, 1));
  await fs.writeFile(nvram, Buffer.alloc(65536, 2));
  const virsh = (...args: string[]): Promise<{ stdout: string }> => run('virsh', ['-c', 'qemu:///system', ...args]);
  const xml = (await virsh('dumpxml', dom.name)).stdout
    .replace('</os>', `<loader readonly='yes' type='pflash'>${loader}</loader><nvram>${nvram}</nvram><kernel>${shared}</kernel><initrd>${shared}</initrd></os>`)
    .replace('<devices>', '<features><acpi/></features><devices>');
  await fs.writeFile(path.join(work, 'domain.xml'), xml);
  await virsh('define', path.join(work, 'domain.xml'));

  const state = path.join(work, 'state');
  await fs.mkdir(state);
  const zip = await backupToZip(state, ['-d', dom.name, '-l', 'copy', '-n'], path.join(work, 'copy.zip'));
  assert.equal(zip.code, 0, zip.stderr);
  assert.match(zip.stderr, new RegExp(`warning: boot files ${loader.replace(/[.]/g, '\\.')} \\(loader\\) and ${nvram.replace(/[.]/g, '\\.')} \\(nvram\\) have the same name, vars\\.fd: the backup keeps the nvram's`));
  const listed = await run('/usr/bin/python3', ['-W', 'error', '-c', 'import sys,zipfile; z=zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; print("\\n".join(z.namelist()))', path.join(work, 'copy.zip')]);
  const names = listed.stdout.trim().split('\n');
  assert.deepEqual(names.filter((n) => n === 'boot-both'), ['boot-both'], names.join(' '));
  assert.deepEqual(names.filter((n) => n === 'vars.fd'), ['vars.fd'], names.join(' '));
  const set = path.join(work, 'set');
  await run('unzip', ['-q', path.join(work, 'copy.zip'), '-d', set]);
  assert.ok((await fs.readFile(path.join(set, 'boot-both'))).equals(await fs.readFile(shared)));
  assert.ok((await fs.readFile(path.join(set, 'vars.fd'))).equals(await fs.readFile(nvram)), 'the NVRAM saved is the loader');
  // Restore puts the NVRAM back beside the disks, from that one file.
  const restored = path.join(work, 'restored');
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', restored, '-c']);
  assert.ok((await fs.readFile(path.join(restored, 'vars.fd'))).equals(await fs.readFile(nvram)));
  // A set directory: the file named twice is saved once, without a warning that it is already there.
  const dirSet = await runOk(ourBin('virtnbdbackup'), ['-n', '-d', dom.name, '-l', 'copy', '-o', path.join(work, 'dirset')]);
  assert.doesNotMatch(dirSet.stderr, /could not save/);
  assert.match(dirSet.stderr, new RegExp(`saved kernel and initrd ${shared.replace(/[.]/g, '\\.')} as boot-both`));
});

test('a zip run stopped (SIGINT, SIGTERM) after \'finished\', while the archive\'s end waits for its reader: the run\'s checkpoint is removed, the chain goes on from its parent', async (t) => {
  const { dom, state, cpt, chainBefore, engine } = await zipFullThenChange(t, 'vnbd-zipstop-');
  // The engine, as the command runs it: its output takes every byte but the archive's end, which it holds as a
  // slow reader would; the stop comes then, as the command's signal handler gives it (an abort of the signal).
  const script = `import { Writable } from 'node:stream';
    import { backup } from ${JSON.stringify(engine)};
    const stop = new AbortController();
    const ends = [Buffer.from('504b0506', 'hex'), Buffer.from('504b0606', 'hex'), Buffer.from('504b0102', 'hex')];
    import { Logger } from ${JSON.stringify(path.join(repoRoot, 'dist', 'src', 'util', 'log.js'))};
    import { UserError } from ${JSON.stringify(path.join(repoRoot, 'dist', 'src', 'util', 'errors.js'))};
    let finished = false;
    class Watching extends Logger { info(m) { if (/^finished /.test(m)) finished = true; super.info(m); } }
    const stdout = new Writable({ write(chunk, _enc, done) {
      if (!ends.some((e) => chunk.includes(e))) return done();
      console.log(finished ? 'held after finished' : 'held before finished');
      setTimeout(() => stop.abort(new UserError('interrupted by SIGTERM; cleaned up', 130)), 50);
    } });
    await backup({ domain: ${JSON.stringify(dom.name)}, level: 'inc', output: '-', stdout, signal: stop.signal, log: new Watching() }).then(
      () => { console.log('finished'); process.exit(0); }, (err) => { console.log('failed: ' + err.message); process.exit(1); });`;
  const cut = await runCliIn(state, process.execPath, ['--input-type=module', '-e', script]);
  assert.equal(cut.code, 1, cut.stdout + cut.stderr);
  assert.match(cut.stdout, /^held after finished$/m);
  assert.match(cut.stdout, /^failed: interrupted by SIGTERM; cleaned up$/m);
  assert.equal(await fs.readFile(cpt, 'utf8'), chainBefore);
  assert.equal((await run('virsh', ['-c', 'qemu:///system', 'checkpoint-list', dom.name, '--name'])).stdout.trim(), 'virtnbdbackup.0', 'the stopped zip\'s checkpoint is left');
  const inc = await backupToZip(state, ['-d', dom.name, '-l', 'inc', '-n'], path.join(state, 'inc.zip'));
  assert.equal(inc.code, 0, inc.stderr);
  assert.doesNotMatch(inc.stderr, /warning/);
  assert.match(inc.stderr, /checkpoint virtnbdbackup\.1/);
});

test('-l auto names the run\'s log backup.auto.<time>.log, whatever level it resolves to, as Debian\'s virtnbdbackup does (log rotation matches on it)', async (t) => {
  const dom = await withDomain(t, { disks: [{ target: 'vda', sizeMiB: 16, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 1 }] }] });
  const work = await tempDir('vnbd-autolog-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const logs = async (dir: string): Promise<string[]> => (await fs.readdir(dir)).filter((f) => f.endsWith('.log')).sort();
  const ours = path.join(work, 'ours');
  const full = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'auto', '-o', ours, '-n']);
  assert.match(full.stderr, /full backup/);
  await dom.write('vda', 0x22, '2M', '1M');
  const inc = await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'auto', '-o', ours, '-n']);
  assert.match(inc.stderr, /finished inc backup/);
  const named = await logs(ours);
  assert.equal(named.length, 2, named.join(' '));
  for (const log of named) assert.match(log, /^backup\.auto\.\d{14}(\.\d+)?\.log$/);
  // The peer, for the record: its auto full's log has that name too.
  const python = path.join(work, 'python');
  await runOk(pythonBin('virtnbdbackup'), ['-d', dom.name, '-l', 'auto', '-o', python, '-n']);
  assert.deepEqual((await logs(python)).map((log) => log.replace(/\d{14}/, 'TIME')), ['backup.auto.TIME.log']);
  // A level given names its own log.
  const explicit = path.join(work, 'explicit');
  await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'full', '-o', explicit, '-n']);
  assert.match((await logs(explicit)).join(' '), /^backup\.full\.\d{14}\.log$/);
});

test('-z and -w values Python\'s virtnbdbackup takes: -z 0 compresses nothing, -z 99 is level 16 and -z -3 level 1, -w 0 one disk at a time; each set restores with ours and Python', async (t) => {
  const dom = await withDomain(t, { disks: [
    { target: 'vda', sizeMiB: 32, fill: [{ pattern: 0x61, offsetMiB: 0, lengthMiB: 4 }] },
    { target: 'vdb', sizeMiB: 16, fill: [{ pattern: 0x62, offsetMiB: 1, lengthMiB: 2 }] },
  ] });
  const work = await tempDir('vnbd-pyvalues-');
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  const refs = await Promise.all(['vda', 'vdb'].map((disk) => dom.snapshot(disk, path.join(work, `${disk}.ref`))));
  for (const [name, flags, compressed] of [['z0', ['-z', '0', '-w', '0'], false], ['z99', ['-z', '99'], 16], ['zneg', ['-z', '-3', '-w', '-2'], 1], ['zeq0', ['--compress=0'], false]] as const) {
    const set = path.join(work, name);
    await runOk(ourBin('virtnbdbackup'), ['-d', dom.name, '-l', 'copy', ...flags, '-o', set, '-n']);
    const dumped = JSON.parse((await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', 'dump'])).stdout) as Array<{ compressed: unknown }>;
    assert.deepEqual(dumped.map((m) => m.compressed), [compressed, compressed], `${flags.join(' ')}: ${JSON.stringify(dumped)}`);
    for (const [tool, who] of [[ourBin('virtnbdrestore'), 'ours'], [pythonBin('virtnbdrestore'), 'python']] as const) {
      const out = path.join(work, `${name}-${who}`);
      await runOk(tool, ['-i', set, '-o', out, '-n']);
      for (const [i, disk] of ['vda', 'vdb'].entries()) await assertSame(path.join(out, `${disk}.qcow2`), refs[i] as string);
    }
  }
});
