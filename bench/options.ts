// Command-line options of the benchmark: which cases, how many rounds, the sizes of every case. Guarantees: sizes are
// checked (whole MiB, data fits its disk) before anything is created; --quick only changes defaults, explicit options win.
import { parseArgs } from 'node:util';
import { toBytes } from '../test/support/testbed.js';

export const CASES = ['full', 'full-z', 'inc', 'restore', 'memory', 'sparse', 'zip', 'files-z'] as const;
export type CaseName = (typeof CASES)[number];

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;

/** The guest writes before the incremental: 64 scattered 4 MiB writes (issue 6). */
export const INC_WRITES = 64;
export const INC_WRITE_BYTES = 4 * MiB;
/** Each small extent of the memory case: one 4 KiB write into a qcow2 with 4 KiB clusters. */
export const SMALL_EXTENT_BYTES = 4096;

export interface BenchOptions {
  cases: ReadonlySet<CaseName>;
  rounds: number;
  /** Keep the work dir (sets, restores, logs); domains are removed regardless. */
  keep: boolean;
  /** Cases full, full-z, inc, restore, zip: one disk with random data in two equal regions; files-z: the same shape. */
  diskBytes: number;
  dataBytes: number;
  /** Case memory: a disk holding `extentCount` separate 4 KiB extents. */
  extentDiskBytes: number;
  extentCount: number;
  /** Case sparse: the same random data on a small and a huge disk. */
  sparseSmallDiskBytes: number;
  sparseLargeDiskBytes: number;
  sparseDataBytes: number;
}

const FULL_DEFAULTS = {
  rounds: 3, disk: 4 * GiB, data: 2.5 * GiB, extentDisk: 64 * GiB, extents: 100_000,
  sparseSmall: 4 * GiB, sparseLarge: 1024 * GiB, sparseData: 1 * GiB, cases: CASES as readonly CaseName[],
};
const QUICK_DEFAULTS = {
  rounds: 1, disk: 512 * MiB, data: 256 * MiB, extentDisk: 4 * GiB, extents: 5_000,
  sparseSmall: 512 * MiB, sparseLarge: 64 * GiB, sparseData: 128 * MiB, cases: ['full', 'full-z', 'inc', 'restore', 'zip', 'files-z'] as readonly CaseName[],
};

export const USAGE = `Usage: npm run bench -- [options]     (or: node dist/bench/bench.js [options])

Runs ours, Python virtnbdbackup/virtnbdrestore and nbdcopy side by side in alternating rounds on throwaway
TCG domains and prints a Markdown table (medians) and the issue-6 targets.

  --cases LIST        comma-separated names or numbers (default: all):
                        1 full     full backup, stream format
                        2 full-z   full backup with -z (lz4)
                        3 inc      incremental after ${INC_WRITES} scattered ${INC_WRITE_BYTES / MiB} MiB guest writes into the data
                        4 restore  restore of full + 1 incremental (each tool restores its own set)
                        5 memory   full backup of a disk holding many small extents (peak RSS)
                        6 sparse   the same data on a small and a huge sparse disk
                        7 zip      full backup as a zip on standard output (-o -) into a file (no target)
                        8 files-z  full backup with -z of a disk holding the system's files (a tar of /usr),
                                   which lz4 shrinks: both cores busy where compression is the work
  --rounds N          measured runs per tool and case (default 3; the median is shown)
  --quick             small sizes, 1 round, cases 1-4, 7 and 8 (a fast check that everything works)
  --disk SIZE         cases 1-4, 7, 8: disk size (default 4G; quick 512M)
  --data SIZE         cases 1-4, 7, 8: data, in two equal regions (default 2560M; quick 256M)
  --extent-disk SIZE  case 5: disk size (default 64G; quick 4G)
  --extents N         case 5: number of 4 KiB extents (default 100000; quick 5000)
  --sparse-small SIZE case 6: the small disk (default 4G; quick 512M)
  --sparse-large SIZE case 6: the huge disk (default 1T; quick 64G)
  --sparse-data SIZE  case 6: random data on each, in two equal regions (default 1G; quick 128M)
  --keep              keep the work dir under /var/tmp (domains are removed regardless)
  -h, --help          this text

SIZE is bytes or a number with K, M, G or T (binary units).`;

/** Parses argv; returns undefined when --help was asked for. Throws on anything invalid. */
export function parseOptions(argv: string[]): BenchOptions | undefined {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      cases: { type: 'string' }, rounds: { type: 'string' }, quick: { type: 'boolean', default: false },
      disk: { type: 'string' }, data: { type: 'string' }, 'extent-disk': { type: 'string' }, extents: { type: 'string' },
      'sparse-small': { type: 'string' }, 'sparse-large': { type: 'string' }, 'sparse-data': { type: 'string' },
      keep: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) return undefined;
  const defaults = values.quick ? QUICK_DEFAULTS : FULL_DEFAULTS;
  const size = (value: string | undefined, fallback: number): number => (value === undefined ? fallback : toBytes(value));
  const options: BenchOptions = {
    cases: values.cases === undefined ? new Set(defaults.cases) : parseCases(values.cases),
    rounds: values.rounds === undefined ? defaults.rounds : positiveInteger('--rounds', values.rounds),
    keep: values.keep ?? false,
    diskBytes: size(values.disk, defaults.disk),
    dataBytes: size(values.data, defaults.data),
    extentDiskBytes: size(values['extent-disk'], defaults.extentDisk),
    extentCount: values.extents === undefined ? defaults.extents : positiveInteger('--extents', values.extents),
    sparseSmallDiskBytes: size(values['sparse-small'], defaults.sparseSmall),
    sparseLargeDiskBytes: size(values['sparse-large'], defaults.sparseLarge),
    sparseDataBytes: size(values['sparse-data'], defaults.sparseData),
  };
  validate(options);
  return options;
}

function parseCases(list: string): Set<CaseName> {
  const cases = new Set<CaseName>();
  for (const item of list.split(',').map((s) => s.trim()).filter(Boolean)) {
    const byNumber = /^\d+$/.test(item) ? CASES[Number(item) - 1] : undefined;
    const name = byNumber ?? CASES.find((c) => c === item);
    if (!name) throw new Error(`unknown case '${item}' (use 1-8 or ${CASES.join(', ')})`);
    cases.add(name);
  }
  if (cases.size === 0) throw new Error('--cases names no case');
  return cases;
}

function positiveInteger(flag: string, value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`${flag} needs a whole number >= 1, got '${value}'`);
  return n;
}

function validate(o: BenchOptions): void {
  const wholeMiB = (flag: string, bytes: number): void => {
    if (bytes < MiB || bytes % MiB !== 0) throw new Error(`${flag} must be a whole number of MiB, got ${bytes} bytes`);
  };
  // Data goes in two equal regions, each in one half of the disk.
  const twoRegionsFit = (flag: string, data: number, disk: number): void => {
    if (data % (2 * MiB) !== 0 || data / 2 > disk / 2) throw new Error(`${flag} must be a multiple of 2 MiB and at most the disk size, got ${data} bytes`);
  };
  wholeMiB('--disk', o.diskBytes);
  twoRegionsFit('--data', o.dataBytes, o.diskBytes);
  // The guest writes before the incremental overwrite data, so that every full backup sees the same amount; they are
  // aligned to their size, and the second region starts at the middle of the disk.
  if (o.diskBytes % (2 * INC_WRITE_BYTES) !== 0) throw new Error(`--disk must be a multiple of ${(2 * INC_WRITE_BYTES) / MiB} MiB`);
  if (o.dataBytes % (2 * INC_WRITE_BYTES) !== 0 || o.dataBytes < INC_WRITES * INC_WRITE_BYTES) {
    throw new Error(`--data must be a multiple of ${(2 * INC_WRITE_BYTES) / MiB} MiB holding ${INC_WRITES} separate ${INC_WRITE_BYTES / MiB} MiB writes`);
  }
  wholeMiB('--extent-disk', o.extentDiskBytes);
  if (o.extentDiskBytes / o.extentCount < 2 * SMALL_EXTENT_BYTES) throw new Error('--extents: too many for --extent-disk to keep them apart');
  wholeMiB('--sparse-small', o.sparseSmallDiskBytes);
  wholeMiB('--sparse-large', o.sparseLargeDiskBytes);
  twoRegionsFit('--sparse-data', o.sparseDataBytes, o.sparseSmallDiskBytes);
}
