// Benchmark of issue 6 (`npm run bench`): builds throwaway TCG domains, runs ours, Python virtnbdbackup/virtnbdrestore
// and nbdcopy side by side in alternating rounds (ours, Python, nbdcopy, ours, ...), and prints the machine, a Markdown
// table of medians and the targets. Guarantees: no figure comes from a failed run (any non-zero exit stops the bench);
// ours' set of the last round of every backup case is restored and compared bit for bit with the disk as it was
// backed up, and so is the first restore of each tool; domains and temp files are removed at the end, on error and on
// Ctrl-C (the test bed's clean-up). Exits 1 on such a failure, 0 otherwise: missed targets are reported, not failed.
import { randomFillSync } from 'node:crypto';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ourBin, pythonBin, repoRoot } from '../test/support/cli.js';
import { LIBVIRT_URI, run, sweepStaleTestDomains, tempDir, TestDomain, type TestDisk } from '../test/support/testbed.js';
import { countDataBytes, countDataExtents, createExtentDomain, createRandomDomain, createSystemFilesDomain, DiskUnderTest, qemuPidOf, twoRegions, withPullExport } from './fixtures.js';
import { assertGnuTimeInstalled, measure, type MeasureExtras } from './measure.js';
import { INC_WRITE_BYTES, INC_WRITES, parseOptions, SMALL_EXTENT_BYTES, USAGE, type BenchOptions, type CaseName } from './options.js';
import { Results, TOOL, type CaseInfo, type ToolLabel } from './report.js';
import { STAGE_TRACE_ENV, summarizeStages, type StageEvent } from '../src/util/stageTrace.js';

const BACKUP_TOOLS = [TOOL.ours, TOOL.python] as const;
type BackupTool = (typeof BACKUP_TOOLS)[number];

/** Everything a case needs: the options, where to put files, where results go. */
interface Bench {
  options: BenchOptions;
  work: string;
  results: Results;
  /** Random bytes in memory for the disk-alone dd (made on first use, removed at the end). */
  randomSource?: { file: string; bytes: number };
}

/** A backup set kept to be verified (and restored), with a raw copy of the disk as its last backup saw it. */
interface KeptSet {
  dir: string;
  snapshot: string;
}

function progress(line: string): void {
  process.stderr.write(`bench: ${line}\n`);
}

/** Runs a set-up step and reports how long it took (creation time is part of what keeps the bench usable). */
async function settingUp<T>(what: string, step: () => Promise<T>): Promise<T> {
  const start = Date.now();
  progress(`creating ${what}`);
  const result = await step();
  progress(`  created in ${((Date.now() - start) / 1000).toFixed(1)} s`);
  return result;
}

function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let unit = 0;
  while (bytes >= 1024 && unit < units.length - 1) {
    bytes /= 1024;
    unit++;
  }
  return `${Number(bytes.toFixed(2))} ${units[unit]}`;
}

const slug = (tool: ToolLabel): string => (tool === TOOL.ours ? 'ours' : 'python');

function binaryOf(tool: BackupTool, program: 'virtnbdbackup' | 'virtnbdrestore'): string {
  return tool === TOOL.ours ? ourBin(program) : pythonBin(program);
}

/** Runs a command measured and records it under `info`; without `info` it runs unmeasured (a step other cases need). */
async function runStep(bench: Bench, info: CaseInfo | undefined, tool: ToolLabel, round: number, command: string, args: string[], extras: MeasureExtras = {}): Promise<void> {
  if (!info) {
    await run(command, args);
    await extras.settled?.();
    return;
  }
  const measurement = await measure(path.join(bench.work, 'time.out'), command, args, extras);
  bench.results.record(info, tool, measurement);
  progress(`${info.key}, round ${round + 1}: ${tool} ${measurement.wallSeconds.toFixed(2)} s`);
}

async function backup(bench: Bench, info: CaseInfo | undefined, tool: BackupTool, round: number, domain: TestDomain, level: 'full' | 'inc', set: string, extra: string[] = []): Promise<void> {
  const args = ['-d', domain.name, '-l', level, '-o', set, '-n', ...extra];
  await runStep(bench, info, tool, round, binaryOf(tool, 'virtnbdbackup'), args, { serverPid: await qemuPidOf(domain) });
}

/** The random source of the disk-alone row is a whole number of these (ours' sink takes 4 MiB pieces). */
const SOURCE_BLOCK = 4 * 1024 * 1024;

/**
 * A file in /dev/shm of at least `bytes` random bytes for the disk-alone row: what the backups write is random, and
 * this virtual disk takes zeros 15 to 20 % faster than random data. Reading it is a copy from memory per piece.
 */
async function randomSource(bench: Bench, bytes: number): Promise<string> {
  if (bench.randomSource && bench.randomSource.bytes >= bytes) return bench.randomSource.file;
  const file = bench.randomSource?.file ?? `/dev/shm/vnbdtest-p${process.pid}-bench-random`;
  bench.randomSource = { file, bytes: 0 };
  const handle = await fsp.open(file, 'w');
  try {
    const chunk = Buffer.alloc(16 * 1024 * 1024);
    for (let done = 0; done < bytes; done += chunk.length) await handle.write(randomFillSync(chunk));
  } finally {
    await handle.close();
  }
  bench.randomSource.bytes = bytes;
  return file;
}

/** bench/copyOnly.ts and bench/sinkOnly.ts, compiled next to this file. */
const COPY_ONLY_SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'copyOnly.js');
const SINK_ONLY_SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'sinkOnly.js');
/** `env` arguments that start a script as the launchers in bin/ start the commands: 8 libuv threads, their heap flags. */
const AS_LAUNCHED = ['UV_THREADPOOL_SIZE=8', process.execPath, '--max-semi-space-size=8', '--min-semi-space-size=4'];

/** What runs on the export after nbdcopy: ours' copy alone (lz4 at `lz4Level` for -z) and the other context rows. */
interface Beside {
  copyAlone: boolean;
  lz4Level?: number;
  contextRows: boolean;
}

const NOTHING_BESIDE: Beside = { copyAlone: false, contextRows: false };
/** The level of -z given alone, as the CLI sets it. */
const DEFAULT_LZ4_LEVEL = 2;

/**
 * nbdcopy from a fresh pull-mode export of the disk to a file (the reference), then what `beside` asks for: ours'
 * copy alone (writer and sink, no CLI or job set-up; its stage trace says which stage bounds it), and as context rows
 * nbdcopy to a file flushed to disk before it exits (durable, as ours is) and to null:, and ours' sink writing as
 * many random bytes from memory (the disk alone).
 */
async function nbdcopy(bench: Bench, info: CaseInfo, round: number, domain: TestDomain, target: string, beside: Beside): Promise<void> {
  const serverPid = await qemuPidOf(domain);
  await withPullExport(domain, target, async (uri) => {
    const out = path.join(bench.work, `${info.key}-r${round}-nbdcopy.raw`);
    await runStep(bench, info, TOOL.nbdcopyFile, round, 'nbdcopy', [uri, out], { serverPid });
    await fsp.rm(out, { force: true });
    if (beside.copyAlone) {
      // Ours' writer and sink alone on the same export, started like the launchers start the commands.
      const copyDir = path.join(bench.work, `${info.key}-r${round}-copy-only`);
      const trace = path.join(bench.work, `${info.key}-r${round}-stages.json`);
      await fsp.mkdir(copyDir);
      await runStep(bench, info, TOOL.oursCopyOnly, round, 'env', [
        `${STAGE_TRACE_ENV}=${trace}`, ...AS_LAUNCHED, COPY_ONLY_SCRIPT, uri, target, copyDir,
        ...(beside.lz4Level === undefined ? [] : [String(beside.lz4Level)]),
      ], { serverPid });
      bench.results.recordStages(info, summarizeStages(JSON.parse(await fsp.readFile(trace, 'utf8')) as StageEvent[]));
      await fsp.rm(copyDir, { recursive: true, force: true });
      await fsp.rm(trace, { force: true });
    }
    if (!beside.contextRows) return;
    await runStep(bench, info, TOOL.nbdcopyFlush, round, 'nbdcopy', ['--flush', uri, out], { serverPid });
    await fsp.rm(out, { force: true });
    await runStep(bench, info, TOOL.nbdcopyNull, round, 'nbdcopy', [uri, 'null:'], { serverPid });
    // The disk alone: as many random bytes as ours' data file holds, from memory, through ours' sink (direct I/O from
    // huge-page chunks, synced), started like the launchers start the commands.
    const blocks = Math.ceil(info.dataBytes / SOURCE_BLOCK);
    const source = await randomSource(bench, blocks * SOURCE_BLOCK);
    const sinkDir = path.join(bench.work, `${info.key}-r${round}-sink-only`);
    await fsp.mkdir(sinkDir);
    await runStep(bench, info, TOOL.sinkWrites, round, 'env', [...AS_LAUNCHED, SINK_ONLY_SCRIPT, source, String(info.dataBytes), sinkDir]);
    await fsp.rm(sinkDir, { recursive: true, force: true });
    await fsp.rm(out, { force: true });
  });
}

const RELEASE_TIMEOUT_MS = 60_000;

/**
 * Resolves once no process holds a write lock on the image. Python's virtnbdrestore exits while the qemu-nbd it forked
 * still flushes and closes the image; the restore is done only then, and a compare before reads a half-written file.
 */
async function imageReleased(image: string): Promise<void> {
  const deadline = Date.now() + RELEASE_TIMEOUT_MS;
  for (;;) {
    // Without -U, qemu-img takes a shared lock, which fails while a writer holds the image.
    const info = await run('qemu-img', ['info', image], { allowFailure: true });
    if (info.code === 0) return;
    if (!/lock/i.test(info.stderr) || Date.now() > deadline) throw new Error(`restored image ${image} stays busy: ${info.stderr.trim()}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function assertSameContent(restored: string, snapshot: string, what: string): Promise<void> {
  const result = await TestDomain.compare(restored, snapshot, { formatA: 'qcow2', formatB: 'raw' });
  if (!result.identical) throw new Error(`${what}: the restored disk differs from the source: ${result.output}`);
  progress(`${what}: restored disk identical to the source`);
}

/** Restores `set` with ours (unmeasured) and compares the disk with its snapshot. */
async function verifyWithOurRestore(bench: Bench, set: KeptSet, disk: TestDisk, what: string): Promise<void> {
  const out = path.join(bench.work, 'verify');
  await run(ourBin('virtnbdrestore'), ['-i', set.dir, '-o', out, '-n']);
  await assertSameContent(path.join(out, path.basename(disk.image)), set.snapshot, what);
  await fsp.rm(out, { recursive: true, force: true });
}

async function discardUnlessKept(bench: Bench, dir: string): Promise<void> {
  if (!bench.options.keep) await fsp.rm(dir, { recursive: true, force: true });
}

/**
 * Cases 1-4 and 7 on one domain: -z and zip first, while the regions hold nothing but random data (the issue's
 * reference case; after the inc rounds' pattern writes about half of it would be runs lz4 shrinks), then full and
 * inc alternating per tool (the inc needs the tool's own full), then restore.
 */
async function referenceCases(bench: Bench): Promise<void> {
  const o = bench.options;
  const wants = (name: CaseName): boolean => o.cases.has(name);
  const shape = `${formatSize(o.diskBytes)} disk, ${formatSize(o.dataBytes)} data`;
  const incBytes = INC_WRITES * INC_WRITE_BYTES;
  const full: CaseInfo = { key: 'full', title: `1 full stream (${shape})`, dataBytes: o.dataBytes };
  const inc: CaseInfo = { key: 'inc', title: `3 inc after ${INC_WRITES} × ${formatSize(INC_WRITE_BYTES)} writes`, dataBytes: incBytes };
  const restore: CaseInfo = { key: 'restore', title: '4 restore full + inc', dataBytes: o.dataBytes + incBytes };
  const compressed: CaseInfo = { key: 'full-z', title: `2 full -z (${shape})`, dataBytes: o.dataBytes };

  const regions = twoRegions(o.diskBytes, o.dataBytes, 'middle');
  const domain = await settingUp(`a domain: ${shape} of random data`, () => createRandomDomain([{ target: 'vda', sizeBytes: o.diskBytes, regions }]));
  try {
    const disk = new DiskUnderTest(domain, 'vda');
    if (wants('full-z')) await backupRounds(bench, compressed, domain, disk, ['-z'], { copyAlone: true, lz4Level: DEFAULT_LZ4_LEVEL, contextRows: false });
    if (wants('zip')) await zipRounds(bench, { key: 'zip', title: `7 full as a zip into a file, -o - (${shape})`, dataBytes: o.dataBytes }, domain, disk);
    const chain = wants('inc') || wants('restore');
    const kept = new Map<BackupTool, KeptSet>();
    if (wants('full') || chain) {
      for (let round = 0; round < o.rounds; round++) {
        const last = round === o.rounds - 1;
        for (const [index, tool] of BACKUP_TOOLS.entries()) {
          const set = path.join(bench.work, `chain-r${round}-${slug(tool)}`);
          let snapshot = last && !chain ? await disk.snapshot() : undefined;
          await backup(bench, wants('full') ? full : undefined, tool, round, domain, 'full', set);
          if (chain) {
            await disk.writeScattered(INC_WRITES, INC_WRITE_BYTES, round * BACKUP_TOOLS.length + index + 1, regions);
            if (last) snapshot = await disk.snapshot();
            await backup(bench, wants('inc') ? inc : undefined, tool, round, domain, 'inc', set);
          }
          if (snapshot) kept.set(tool, { dir: set, snapshot });
          else await fsp.rm(set, { recursive: true, force: true });
        }
        if (wants('full')) await nbdcopy(bench, full, round, domain, 'vda', { copyAlone: true, contextRows: true });
      }
      const ours = kept.get(TOOL.ours);
      if (ours && !wants('restore')) await verifyWithOurRestore(bench, ours, disk.disk, `ours' ${chain ? 'full + inc' : 'full'} set`);
    }

    if (wants('restore')) {
      // Each tool restores the set it wrote: both hold the same amount of data, and that is how each is used.
      for (let round = 0; round < o.rounds; round++) {
        for (const tool of BACKUP_TOOLS) {
          const set = kept.get(tool) as KeptSet;
          const out = path.join(bench.work, `restore-r${round}-${slug(tool)}`);
          const image = path.join(out, path.basename(disk.disk.image));
          await runStep(bench, restore, tool, round, binaryOf(tool, 'virtnbdrestore'), ['-i', set.dir, '-o', out, '-n'], { settled: () => imageReleased(image) });
          if (round === 0) await assertSameContent(image, set.snapshot, `${tool} restore of its own set`);
          await fsp.rm(out, { recursive: true, force: true });
        }
        // The floor: writing the same data into a new qcow2 with no NBD and no stream in between.
        const floorOut = path.join(bench.work, `restore-r${round}-qemu-img.qcow2`);
        await runStep(bench, restore, TOOL.qemuImgConvert, round, 'qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', (kept.get(TOOL.ours) as KeptSet).snapshot, floorOut]);
        await fsp.rm(floorOut, { force: true });
      }
    }
    for (const set of kept.values()) await discardUnlessKept(bench, set.dir);
  } finally {
    await domain.destroy();
  }
}

/**
 * Case 8: -z where lz4 has work to do, on the system's files in place of random data (the same disk and regions as
 * cases 1-4); MB/s counts the bytes the export holds, as the files' runs of zeros stay holes.
 */
async function systemFilesCase(bench: Bench): Promise<void> {
  const o = bench.options;
  const shape = `${formatSize(o.diskBytes)} disk, ${formatSize(o.dataBytes)} of /usr`;
  const domain = await settingUp(`a domain: ${shape}`, () =>
    createSystemFilesDomain({ target: 'vda', sizeBytes: o.diskBytes, regions: twoRegions(o.diskBytes, o.dataBytes, 'middle') }));
  try {
    const dataBytes = await withPullExport(domain, 'vda', countDataBytes);
    progress(`the backup export shows ${formatSize(dataBytes)} of data`);
    const info: CaseInfo = { key: 'files-z', title: `8 full -z, system files (${shape})`, dataBytes };
    await backupRounds(bench, info, domain, new DiskUnderTest(domain, 'vda'), ['-z'], { copyAlone: true, lz4Level: DEFAULT_LZ4_LEVEL, contextRows: false });
  } finally {
    await domain.destroy();
  }
}

/** Case 5: peak RSS on a big disk holding many small extents. */
async function memoryCase(bench: Bench): Promise<void> {
  const o = bench.options;
  const info: CaseInfo = {
    key: 'memory',
    title: `5 memory (${formatSize(o.extentDiskBytes)} disk, ${o.extentCount} × ${formatSize(SMALL_EXTENT_BYTES)} extents)`,
    dataBytes: o.extentCount * SMALL_EXTENT_BYTES,
  };
  const domain = await settingUp(`a domain: ${formatSize(o.extentDiskBytes)} disk with ${o.extentCount} small extents`, () =>
    createExtentDomain(o.extentDiskBytes, o.extentCount));
  try {
    const disk = new DiskUnderTest(domain, 'vda');
    const extents = await withPullExport(domain, 'vda', countDataExtents);
    progress(`the backup export shows ${extents} data extents`);
    await backupRounds(bench, info, domain, disk, []);
  } finally {
    await domain.destroy();
  }
}

/** Case 6: the same data on a small and a huge sparse disk of one domain; cost should follow the data. */
async function sparseCase(bench: Bench): Promise<void> {
  const o = bench.options;
  const data = formatSize(o.sparseDataBytes);
  const disks = [
    { target: 'vda', sizeBytes: o.sparseSmallDiskBytes, key: 'sparse-small', n: '6a' },
    { target: 'vdb', sizeBytes: o.sparseLargeDiskBytes, key: 'sparse-large', n: '6b' },
  ];
  const domain = await settingUp(`a domain: ${disks.map((d) => formatSize(d.sizeBytes)).join(' and ')} disks, ${data} of random data on each`, () =>
    createRandomDomain(disks.map((d) => ({ target: d.target, sizeBytes: d.sizeBytes, regions: twoRegions(d.sizeBytes, o.sparseDataBytes, 'end') }))));
  try {
    for (const d of disks) {
      const info: CaseInfo = { key: d.key, title: `${d.n} sparse (${formatSize(d.sizeBytes)} disk, ${data} data)`, dataBytes: o.sparseDataBytes };
      await backupRounds(bench, info, domain, new DiskUnderTest(domain, d.target), ['-i', d.target]);
    }
  } finally {
    await domain.destroy();
  }
}

/** Full backups by each tool and nbdcopy (and `beside` it), `rounds` times; ours' last set is verified. The disk does not change. */
async function backupRounds(bench: Bench, info: CaseInfo, domain: TestDomain, disk: DiskUnderTest, extra: string[], beside = NOTHING_BESIDE): Promise<void> {
  let ours: KeptSet | undefined;
  for (let round = 0; round < bench.options.rounds; round++) {
    for (const tool of BACKUP_TOOLS) {
      const set = path.join(bench.work, `${info.key}-r${round}-${slug(tool)}`);
      const verify = round === bench.options.rounds - 1 && tool === TOOL.ours;
      if (verify) ours = { dir: set, snapshot: await disk.snapshot() };
      await backup(bench, info, tool, round, domain, 'full', set, extra);
      if (!verify) await fsp.rm(set, { recursive: true, force: true });
    }
    await nbdcopy(bench, info, round, domain, disk.target, beside);
  }
  if (ours) {
    bench.results.recordStoredBytes(info, await dataFileBytes(ours.dir));
    await verifyWithOurRestore(bench, ours, disk.disk, `ours' ${info.key} set`);
    await discardUnlessKept(bench, ours.dir);
  }
}

/** Bytes of the data files (streams) in a backup set. */
async function dataFileBytes(dir: string): Promise<number> {
  const files = (await fsp.readdir(dir)).filter((name) => name.endsWith('.data'));
  const sizes = await Promise.all(files.map(async (name) => (await fsp.stat(path.join(dir, name))).size));
  return sizes.reduce((a, b) => a + b, 0);
}

/**
 * Case 7: full backups written as a zip on standard output into a file, each run in a directory of its own (both
 * tools keep their state and log in the current one). Ours' last zip is read back with Python's zipfile, which checks
 * every entry's CRC, and restored: a zip that holds other bytes than the disk fails the bench.
 */
async function zipRounds(bench: Bench, info: CaseInfo, domain: TestDomain, disk: DiskUnderTest): Promise<void> {
  let ours: { zip: string; snapshot: string } | undefined;
  for (let round = 0; round < bench.options.rounds; round++) {
    for (const tool of BACKUP_TOOLS) {
      const cwd = path.join(bench.work, `${info.key}-r${round}-${slug(tool)}`);
      const zip = `${cwd}.zip`;
      const kept = round === bench.options.rounds - 1 && tool === TOOL.ours;
      if (kept) ours = { zip, snapshot: await disk.snapshot() };
      await fsp.mkdir(cwd);
      // sh execs the tool, so GNU time measures the tool itself.
      await runStep(bench, info, tool, round, 'sh', [
        '-c', 'cd "$0" && out=$1 && shift && exec "$@" > "$out"', cwd, zip,
        binaryOf(tool, 'virtnbdbackup'), '-d', domain.name, '-l', 'full', '-o', '-', '-n',
      ], { serverPid: await qemuPidOf(domain) });
      await fsp.rm(cwd, { recursive: true, force: true });
      if (!kept) await fsp.rm(zip, { force: true });
    }
  }
  if (!ours) return;
  const set = path.join(bench.work, `${info.key}-set`);
  await run('/usr/bin/python3', ['-c', 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])', ours.zip, set]);
  await fsp.rm(ours.zip, { force: true });
  await verifyWithOurRestore(bench, { dir: set, snapshot: ours.snapshot }, disk.disk, `ours' ${info.key} set (entries' CRCs checked)`);
  await discardUnlessKept(bench, set);
}

async function firstLine(command: string, args: string[]): Promise<string> {
  const result = await run(command, args, { allowFailure: true });
  return (result.stdout || result.stderr).trim().split('\n')[0] ?? '?';
}

/** The machine and the tools' versions, as the README's Performance section shows them. */
async function describeMachine(): Promise<string[]> {
  const cpuModel = /^model name\s*:\s*(.+)$/m.exec(await fsp.readFile('/proc/cpuinfo', 'utf8'))?.[1] ?? 'unknown CPU';
  const memory = (await run('free', ['-h'])).stdout.split('\n').find((l) => l.startsWith('Mem:'))?.split(/\s+/)[1];
  const libvirt = /Using library: (.+)/.exec((await run('virsh', ['-c', LIBVIRT_URI, 'version'])).stdout)?.[1] ?? '?';
  return [
    `date: ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}`,
    `machine: ${os.availableParallelism()} cores (nproc), ${cpuModel}, ${memory ?? '?'} RAM (free -h), load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`,
    `software: Node ${process.version}, ${await firstLine('qemu-system-x86_64', ['--version'])}, ${libvirt}, ` +
      `Python virtnbdbackup ${await firstLine(pythonBin('virtnbdbackup'), ['-V'])}, ${await firstLine('nbdcopy', ['--version'])}`,
  ];
}

/**
 * Refuses to measure commands that would run unbundled: the launchers pass over a bundle older than the compiled
 * command (a `tsc` run without bundling), and the compiled modules start 0.05 to 0.3 s later with about 8 MB more.
 */
async function assertBundlesCurrent(): Promise<void> {
  for (const program of ['virtnbdbackup', 'virtnbdrestore'] as const) {
    const compiled = path.join(repoRoot, 'dist', 'src', 'cli', `${program}.js`);
    const bundle = path.join(repoRoot, 'dist', 'src', 'cli', `${program}.bundle.cjs`);
    const [c, b] = await Promise.all([fsp.stat(compiled), fsp.stat(bundle).catch(() => undefined)]);
    if (!b || b.mtimeMs < c.mtimeMs) throw new Error(`${bundle} is older than ${compiled}, so ${program} would run unbundled: run npm run build:ts (or npm run bench, which builds)`);
  }
}

async function main(): Promise<number> {
  let options: BenchOptions | undefined;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`bench: ${(err as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  if (!options) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  await assertGnuTimeInstalled();
  await assertBundlesCurrent();
  for (const removed of await sweepStaleTestDomains()) progress(`removed stale ${removed}`);
  const machine = await describeMachine();
  const work = options.keep ? await fsp.mkdtemp('/var/tmp/virtnbd-bench-') : await tempDir('bench-');
  const bench: Bench = { options, work, results: new Results(os.availableParallelism()) };
  progress(`work dir ${work}; ${options.rounds} round(s) of: ${[...options.cases].join(', ')}`);
  try {
    if (['full', 'full-z', 'inc', 'restore', 'zip'].some((c) => options.cases.has(c as CaseName))) await referenceCases(bench);
    if (options.cases.has('memory')) await memoryCase(bench);
    if (options.cases.has('sparse')) await sparseCase(bench);
    if (options.cases.has('files-z')) await systemFilesCase(bench);
  } finally {
    if (bench.randomSource) await fsp.rm(bench.randomSource.file, { force: true });
    if (!options.keep) await fsp.rm(work, { recursive: true, force: true });
    else progress(`kept ${work}`);
  }
  const load = os.loadavg().map((l) => l.toFixed(2)).join(' ');
  process.stdout.write([
    ...machine,
    `load average at the end: ${load}`,
    `rounds: ${options.rounds} (order per round: ours, Python, nbdcopy); figures are medians; MB = 10^6 bytes`,
    '',
    bench.results.table(),
    '',
    ...bench.results.targets(),
    '',
  ].join('\n'));
  return 0;
}

main().then(
  (code) => { process.exitCode = code; },
  (err: Error) => {
    process.stderr.write(`bench: ${err.stack ?? err.message}\n`);
    process.exitCode = 1;
  },
);
