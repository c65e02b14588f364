// Collects the benchmark's measurements per case and tool and renders them: a Markdown table of medians with ratios
// to nbdcopy and to Python, and one line per issue-6 target saying OK or MISSED. Guarantees: a ratio or target whose
// figures were not measured is shown as '—' or left out, never guessed.
import { median, medianMeasurement, type Measurement } from './measure.js';
import type { Stage, StageSummary } from '../src/util/stageTrace.js';

export const TOOL = {
  ours: 'ours',
  oursCopyOnly: 'ours, copy alone',
  python: 'Python',
  nbdcopyFile: 'nbdcopy → file',
  nbdcopyNull: 'nbdcopy → null:',
  nbdcopyFlush: 'nbdcopy --flush → file',
  sinkWrites: "ours' sink alone, random data from memory (the disk alone)",
  qemuImgConvert: 'qemu-img convert',
} as const;
export type ToolLabel = (typeof TOOL)[keyof typeof TOOL];
/** Table order of tools within a case. */
const TOOL_ORDER: readonly ToolLabel[] = [TOOL.ours, TOOL.oursCopyOnly, TOOL.python, TOOL.nbdcopyFile, TOOL.nbdcopyFlush, TOOL.nbdcopyNull, TOOL.sinkWrites, TOOL.qemuImgConvert];

export interface CaseInfo {
  /** Short key the targets refer to, e.g. 'full', 'sparse-large'. */
  key: string;
  /** What the table shows and sorts by, e.g. '1 full stream (4 GiB disk, 2.5 GiB data)'. */
  title: string;
  /** Bytes of data the case moves (for MB/s). */
  dataBytes: number;
}

/** Megabytes of 10^6 bytes, as in the table headers. */
const MB = 1e6;
/** Memory targets of issue 6. */
const PEAK_RSS_LIMIT_BYTES = 200 * MB;
/** "Does not grow": the memory case may use at most this much more than the reference full backup. */
const MEMORY_GROWTH_LIMIT = 1.2;
/** "Both cores busy": ours and the QEMU serving it together use at least this share of the machine's cores. */
const BUSY_LIMIT = 0.9;

interface Row {
  info: CaseInfo;
  tool: ToolLabel;
  runs: Measurement[];
}

export class Results {
  private readonly rows: Row[] = [];
  /** Stage summaries of ours' copy alone, per case key, one per round. */
  private readonly stages = new Map<string, StageSummary[]>();
  /** Bytes of ours' data files in the set of a case's last round, with the bytes the case moves. */
  private readonly stored = new Map<string, { storedBytes: number; dataBytes: number }>();

  /** `cores`: the machine's, for the "both cores busy" target. */
  constructor(private readonly cores: number) {}

  record(info: CaseInfo, tool: ToolLabel, measurement: Measurement): void {
    let row = this.rows.find((r) => r.info.key === info.key && r.tool === tool);
    if (!row) this.rows.push((row = { info, tool, runs: [] }));
    row.runs.push(measurement);
  }

  recordStoredBytes(info: CaseInfo, storedBytes: number): void {
    this.stored.set(info.key, { storedBytes, dataBytes: info.dataBytes });
  }

  recordStages(info: CaseInfo, summary: StageSummary): void {
    const runs = this.stages.get(info.key) ?? [];
    runs.push(summary);
    this.stages.set(info.key, runs);
  }

  /**
   * Where ours' copy alone spent its time (median of the rounds): the share of the copy with a direct write in flight,
   * a read, and an lz4 compression running, each with how many ran on average.
   */
  private stageLine(caseKey: string, label: string): string | undefined {
    const runs = this.stages.get(caseKey);
    if (!runs?.length) return undefined;
    const part = (stage: Stage, name: string): string => {
      const busy = median(runs.map((r) => r.busy[stage]));
      const mean = median(runs.map((r) => r.meanRunning[stage]));
      return `${name} ${(busy * 100).toFixed(0)} % (${mean.toFixed(1)} on average)`;
    };
    const parts = [part('diskWrite', 'a disk write in flight'), part('read', 'a read'), ...(runs.some((r) => r.busy.compress > 0) ? [part('compress', 'lz4')] : [])];
    // The data file's final fsync: the host's write cache under this virtual disk drains then; nbdcopy → file skips it.
    const syncSeconds = median(runs.map((r) => r.busy.sync * r.spanMs / 1000));
    const spanSeconds = median(runs.map((r) => r.spanMs / 1000));
    return `${label}, ours' copy alone, share of its time with ${parts.join(', ')}; its final fsync took ${syncSeconds.toFixed(2)} s of ${spanSeconds.toFixed(2)} s (for context)`;
  }

  /**
   * The serving QEMU's page faults per run (median), for each tool that read its export: many mean QEMU's heap gave
   * its request buffers back to the kernel and touched them again, a cost that shows as QEMU's CPU and the copy's time.
   */
  private faultLine(caseKey: string, label: string): string | undefined {
    const tools = [TOOL.ours, TOOL.oursCopyOnly, TOOL.nbdcopyFile].flatMap((tool) => {
      const m = this.median(caseKey, tool);
      return m ? [`${tool} ${Math.round(m.serverFaults)}`] : [];
    });
    return tools.length ? `${label}: QEMU's page faults while serving, median per run: ${tools.join(', ')} (for context)` : undefined;
  }

  median(caseKey: string, tool: ToolLabel): Measurement | undefined {
    const row = this.rows.find((r) => r.info.key === caseKey && r.tool === tool);
    return row ? medianMeasurement(row.runs) : undefined;
  }

  /** Wall-time ratio of two tools' medians in one case. */
  ratio(caseKey: string, tool: ToolLabel, reference: ToolLabel, referenceCase = caseKey): number | undefined {
    const mine = this.median(caseKey, tool);
    const theirs = this.median(referenceCase, reference);
    return mine && theirs ? mine.wallSeconds / theirs.wallSeconds : undefined;
  }

  /**
   * The -z targets of one case: the ratio to Python -z and both cores busy (ours' CPU and the serving QEMU's), then for
   * context the same count for ours' copy alone, where its time went, and how much lz4 kept of the data.
   */
  private compressedLines(caseKey: string, label: string): string[] {
    const lines: string[] = [];
    const toPython = this.ratio(caseKey, TOOL.ours, TOOL.python);
    if (toPython !== undefined) lines.push(`${label}: ${toPython.toFixed(2)} × Python -z (target ≤ 0.5) ${verdict(toPython <= 0.5)}`);
    const coresBusy = (m: Measurement): { text: string; total: number } => {
      const ours = m.cpuSeconds / m.wallSeconds;
      const server = m.serverCpuSeconds / m.wallSeconds;
      return { text: `ours ${ours.toFixed(2)} + QEMU ${server.toFixed(2)} = ${(ours + server).toFixed(2)} of ${this.cores} cores busy`, total: ours + server };
    };
    const command = this.median(caseKey, TOOL.ours);
    if (command) {
      const busy = coresBusy(command);
      const wanted = BUSY_LIMIT * this.cores;
      lines.push(`${label}: ${busy.text} (target ≥ ${wanted.toFixed(1)}; whole machine ${(command.machineBusy * 100).toFixed(0)} % busy) ${verdict(busy.total >= wanted)}`);
    }
    const copyOnly = this.ratio(caseKey, TOOL.oursCopyOnly, TOOL.nbdcopyFile);
    const alone = this.median(caseKey, TOOL.oursCopyOnly);
    if (copyOnly !== undefined && alone) {
      lines.push(`${label}, ours' copy alone: ${copyOnly.toFixed(2)} × nbdcopy, ${coresBusy(alone).text}, whole machine ${(alone.machineBusy * 100).toFixed(0)} % busy ` +
        '(no CLI start-up, libvirt or job: for context)');
    }
    const stages = this.stageLine(caseKey, label);
    if (stages) lines.push(stages);
    const faults = this.faultLine(caseKey, label);
    if (faults) lines.push(faults);
    const stored = this.stored.get(caseKey);
    if (stored) lines.push(`${label}: ours' data file holds ${(stored.storedBytes / MB).toFixed(0)} MB for ${(stored.dataBytes / MB).toFixed(0)} MB of data (${(100 * stored.storedBytes / stored.dataBytes).toFixed(0)} %; for context)`);
    return lines;
  }

  table(): string {
    const lines = [
      '| case | tool | wall s | CPU s (user+sys) | peak RSS MB | MB/s | × nbdcopy | × Python |',
      '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
    ];
    const ordered = [...this.rows].sort((a, b) =>
      a.info.title.localeCompare(b.info.title, 'en', { numeric: true }) || TOOL_ORDER.indexOf(a.tool) - TOOL_ORDER.indexOf(b.tool));
    for (const row of ordered) {
      const m = medianMeasurement(row.runs);
      const cells = [
        row.info.title, row.tool, m.wallSeconds.toFixed(2), m.cpuSeconds.toFixed(2), (m.peakRssBytes / MB).toFixed(0),
        (row.info.dataBytes / MB / m.wallSeconds).toFixed(0),
        formatRatio(this.ratio(row.info.key, row.tool, TOOL.nbdcopyFile)), formatRatio(this.ratio(row.info.key, row.tool, TOOL.python)),
      ];
      lines.push(`| ${cells.join(' | ')} |`);
    }
    return lines.join('\n');
  }

  /** One line per target of issue 6 whose figures were measured. */
  targets(): string[] {
    const lines: string[] = [];
    const versus = (label: string, value: number | undefined, unit: string, limit: number): void => {
      if (value !== undefined) lines.push(`${label}: ${value.toFixed(2)} ${unit} (target ≤ ${limit}) ${verdict(value <= limit)}`);
    };
    versus('full stream', this.ratio('full', TOOL.ours, TOOL.nbdcopyFile), '× nbdcopy', 1.15);
    const durable = this.ratio('full', TOOL.ours, TOOL.nbdcopyFlush);
    // Not a target of the issue: nbdcopy --flush also syncs its copy before it exits, as ours does.
    if (durable !== undefined) lines.push(`full stream: ${durable.toFixed(2)} × nbdcopy --flush (its copy on disk too; for context)`);
    const copyOnly = this.ratio('full', TOOL.oursCopyOnly, TOOL.nbdcopyFile);
    if (copyOnly !== undefined) lines.push(`full stream, ours' copy alone (no CLI, libvirt or job set-up): ${copyOnly.toFixed(2)} × nbdcopy (for context)`);
    const diskFloor = this.ratio('full', TOOL.oursCopyOnly, TOOL.sinkWrites);
    if (diskFloor !== undefined) lines.push(`full stream, ours' copy alone: ${diskFloor.toFixed(2)} × ours' sink alone writing as many random bytes from memory (the disk's floor for ours' writes; for context)`);
    const fullStages = this.stageLine('full', 'full stream');
    if (fullStages) lines.push(fullStages);
    const fullFaults = this.faultLine('full', 'full stream');
    if (fullFaults) lines.push(fullFaults);
    versus('full stream', this.ratio('full', TOOL.ours, TOOL.python), '× Python', 0.4);
    lines.push(...this.compressedLines('full-z', 'full -z'));
    lines.push(...this.compressedLines('files-z', 'full -z, system files'));
    const zip = this.ratio('zip', TOOL.ours, TOOL.python);
    if (zip !== undefined) lines.push(`full as a zip into a file (-o -): ${zip.toFixed(2)} × Python (no target; for context)`);
    versus('incremental', this.ratio('inc', TOOL.ours, TOOL.python), '× Python', 0.6);
    versus('restore full + inc', this.ratio('restore', TOOL.ours, TOOL.python), '× Python virtnbdrestore', 0.5);
    const ours = this.rows.filter((r) => r.tool === TOOL.ours);
    if (ours.length) {
      // Which run: a single high one among low medians is otherwise not found again (201 MB once, 2026-11-27).
      const runs = ours.flatMap((r) => r.runs.map((m, round) => ({ title: r.info.title, round: round + 1, peak: m.peakRssBytes })));
      const top = runs.reduce((a, b) => (b.peak > a.peak ? b : a));
      lines.push(`peak RSS: ours at most ${(top.peak / MB).toFixed(0)} MB over all runs, in ${top.title}, round ${top.round} (target ≤ ${PEAK_RSS_LIMIT_BYTES / MB}) ${verdict(top.peak <= PEAK_RSS_LIMIT_BYTES)}`);
    }
    const many = this.median('memory', TOOL.ours);
    const reference = this.median('full', TOOL.ours);
    if (many && reference) {
      const growth = many.peakRssBytes / reference.peakRssBytes;
      lines.push(`memory vs size and extents: ours ${(many.peakRssBytes / MB).toFixed(0)} MB on the many-extents disk, ` +
        `${growth.toFixed(2)} × its ${(reference.peakRssBytes / MB).toFixed(0)} MB on case 1 (target ≤ ${MEMORY_GROWTH_LIMIT} ×) ` +
        verdict(growth <= MEMORY_GROWTH_LIMIT));
    }
    versus('cost follows data', this.ratio('sparse-large', TOOL.ours, TOOL.ours, 'sparse-small'), '× the small disk', 1.5);
    const steal = this.rows.flatMap((r) => r.runs.map((m) => m.stealShare));
    if (steal.length) {
      lines.push(`steal: the hypervisor took ${(median(steal) * 100).toFixed(0)} % of the cores' time in the median run, ` +
        `${(Math.max(...steal) * 100).toFixed(0)} % at most (figures of a run with much steal are not this machine's own; for context)`);
    }
    return lines;
  }
}

function formatRatio(value: number | undefined): string {
  return value === undefined ? '—' : value.toFixed(2);
}

function verdict(ok: boolean): string {
  return ok ? 'OK' : 'MISSED';
}
