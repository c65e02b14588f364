// Measures one command as a child process: wall time, user+sys CPU and peak RSS (the kernel's wait4 figures, read
// through GNU time) and how busy the whole machine was meanwhile. Guarantees: a run that exits non-zero throws with its
// output, so no figure ever comes from a failed run; dirty pages of earlier runs are written back before the clock starts.
import fs from 'node:fs/promises';
import { run } from '../test/support/testbed.js';

const GNU_TIME = '/usr/bin/time';

export interface Measurement {
  wallSeconds: number;
  /** user + sys of the command and the children it waited for. */
  cpuSeconds: number;
  /** Largest resident set of the command or of one of its children. */
  peakRssBytes: number;
  /** Share of all cores' time the machine was busy during the run (0..1), whoever used it. */
  machineBusy: number;
  /** CPU time the serving process (the domain's QEMU, NBD server side) used during the run; 0 when none was named. */
  serverCpuSeconds: number;
  /** Page faults the serving process took during the run (minor ones: QEMU's heap given back and touched again). */
  serverFaults: number;
  /** Share of the cores' time the hypervisor gave to others during the run (steal, 0..1): a noisy host shows here. */
  stealShare: number;
}

export interface MeasureExtras {
  /** Waited for after the command exits, counted as wall time: work the command left to a detached process. */
  settled?: () => Promise<void>;
  /** The process serving the command (the domain's QEMU), whose CPU time is reported as serverCpuSeconds. */
  serverPid?: number;
}

/** /proc/<pid>/stat counts CPU time in USER_HZ ticks, 100 per second on Linux. */
const USER_HZ = 100;

export async function assertGnuTimeInstalled(): Promise<void> {
  await fs.access(GNU_TIME).catch(() => {
    throw new Error(`${GNU_TIME} is missing: install Debian's package 'time' (apt-get install time)`);
  });
}

/** Runs `command` to completion and measures it; `statFile` is scratch space for GNU time's report. */
export async function measure(statFile: string, command: string, args: readonly string[], extras: MeasureExtras = {}): Promise<Measurement> {
  // Otherwise the write-back of the previous tool's output would be charged to this one.
  await run('sync', []);
  const before = await readCpuJiffies();
  const serverBefore = extras.serverPid ? await readProcessCounts(extras.serverPid) : NO_COUNTS;
  const start = process.hrtime.bigint();
  await run(GNU_TIME, ['-f', '%U %S %M', '-o', statFile, command, ...args]);
  await extras.settled?.();
  const wallSeconds = Number(process.hrtime.bigint() - start) / 1e9;
  const serverAfter = extras.serverPid ? await readProcessCounts(extras.serverPid) : NO_COUNTS;
  const after = await readCpuJiffies();
  // GNU time may put a "Command exited with ..." line first; the figures are on the last line.
  const last = (await fs.readFile(statFile, 'utf8')).trim().split('\n').at(-1) ?? '';
  const [user, sys, maxRssKiB] = last.split(' ').map(Number);
  if (user === undefined || sys === undefined || maxRssKiB === undefined || [user, sys, maxRssKiB].some(Number.isNaN)) {
    throw new Error(`cannot read GNU time's report '${last}' for ${command}`);
  }
  const total = after.total - before.total;
  const stolen = after.steal - before.steal;
  return {
    wallSeconds,
    cpuSeconds: user + sys,
    peakRssBytes: maxRssKiB * 1024,
    machineBusy: total > 0 ? (after.busy - before.busy) / total : 0,
    serverCpuSeconds: (serverAfter.ticks - serverBefore.ticks) / USER_HZ,
    serverFaults: serverAfter.minorFaults - serverBefore.minorFaults,
    stealShare: total + stolen > 0 ? stolen / (total + stolen) : 0,
  };
}

const NO_COUNTS = { ticks: 0, minorFaults: 0 };

/** utime + stime of a process, in ticks, and its minor page faults. */
async function readProcessCounts(pid: number): Promise<{ ticks: number; minorFaults: number }> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields after "pid (comm) ": state is the 3rd field of the line, minflt the 10th, utime the 14th, stime the 15th.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { ticks: Number(fields[11]) + Number(fields[12]), minorFaults: Number(fields[7]) };
}

/** Jiffies of all cores from /proc/stat; idle and iowait count as not busy, steal is apart. */
async function readCpuJiffies(): Promise<{ busy: number; total: number; steal: number }> {
  const line = (await fs.readFile('/proc/stat', 'utf8')).split('\n')[0] ?? '';
  // cpu user nice system idle iowait irq softirq steal: steal (the hypervisor's) is kept apart, guest is inside user.
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = line.trim().split(/\s+/).slice(1).map(Number);
  const busy = user + nice + system + irq + softirq;
  return { busy, total: busy + idle + iowait, steal };
}

export function median(values: readonly number[]): number {
  if (values.length === 0) throw new Error('median of nothing');
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

/** The median of each figure on its own. */
export function medianMeasurement(runs: readonly Measurement[]): Measurement {
  return {
    wallSeconds: median(runs.map((r) => r.wallSeconds)),
    cpuSeconds: median(runs.map((r) => r.cpuSeconds)),
    peakRssBytes: median(runs.map((r) => r.peakRssBytes)),
    machineBusy: median(runs.map((r) => r.machineBusy)),
    serverCpuSeconds: median(runs.map((r) => r.serverCpuSeconds)),
    serverFaults: median(runs.map((r) => r.serverFaults)),
    stealShare: median(runs.map((r) => r.stealShare)),
  };
}
