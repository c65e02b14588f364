// Newcomer walk-through: full + incremental backup of a throwaway 2-disk domain, both points restored and compared bit for bit; exit 1 on a difference, always cleans up.
// Run as `npm run demo` (or `node dist/scripts/demo.js` after a build); VIRTNBD_DEMO_BIN=/usr/bin runs Debian's Python tools instead of bin/.
import fs from 'node:fs/promises';
import path from 'node:path';
import { repoRoot } from '../test/support/cli.js';
import { DEMO_PREFIX, run, tempDir, TestDomain, type DiskSpec } from '../test/support/testbed.js';

const binDir = process.env.VIRTNBD_DEMO_BIN ?? path.join(repoRoot, 'bin');
const DISKS: DiskSpec[] = [
  { target: 'vda', sizeMiB: 128, fill: [{ pattern: 0x11, offsetMiB: 0, lengthMiB: 16 }, { pattern: 0x22, offsetMiB: 64, lengthMiB: 8 }] },
  { target: 'vdb', sizeMiB: 64, fill: [{ pattern: 0x44, offsetMiB: 4, lengthMiB: 4 }] },
];

/** A backup point: the checkpoint the backup created and a raw copy of each disk as that backup saw it. */
interface Point {
  checkpoint: string;
  copies: Map<string, string>;
}

let stepNumber = 0;
const step = (text: string): void => console.log(`${++stepNumber}. ${text}`);
const detail = (text: string): void => console.log(`   ${text}`);

/** Runs one of the backup tools, showing the command line as a user would type it. */
async function tool(name: string, args: string[]): Promise<void> {
  detail(`$ ${name} ${args.join(' ')}`);
  await run(path.join(binDir, name), args);
}

async function copyDisks(domain: TestDomain, work: string, checkpoint: string): Promise<Point> {
  const copies = new Map<string, string>();
  for (const disk of domain.disks) copies.set(disk.target, await domain.snapshot(disk.target, path.join(work, `${checkpoint}.${disk.target}.raw`)));
  return { checkpoint, copies };
}

async function demo(domain: TestDomain, work: string): Promise<boolean> {
  const set = path.join(work, 'backup-set');

  step(`full backup of ${domain.name} (the first point in time)`);
  const full = await copyDisks(domain, work, 'virtnbdbackup.0');
  await tool('virtnbdbackup', ['-d', domain.name, '-l', 'full', '-o', set, '-n']);
  detail(`backup set now holds: ${(await fs.readdir(set)).sort().join(' ')}`);

  step('changing data on both disks through the QEMU monitor, as the guest would');
  await domain.write('vda', 0x33, '2M', '3M');
  detail('vda: 3 MiB of 0x33 at 2 MiB');
  await domain.discard('vda', '64M', '4M');
  detail('vda: discarded (trimmed) 4 MiB at 64 MiB');
  await domain.write('vdb', 0x55, '40M', '1M');
  await domain.writeZeroes('vdb', '5M', '1M');
  detail('vdb: 1 MiB of 0x55 at 40 MiB, 1 MiB of zeroes at 5 MiB');

  step('incremental backup: only what changed since the full one');
  const inc = await copyDisks(domain, work, 'virtnbdbackup.1');
  await tool('virtnbdbackup', ['-d', domain.name, '-l', 'inc', '-o', set, '-n']);

  step('restoring both points in time');
  const restored = new Map<Point, string>([[full, path.join(work, 'restore-0')], [inc, path.join(work, 'restore-1')]]);
  await tool('virtnbdrestore', ['-i', set, '-o', restored.get(full) as string, '--until', full.checkpoint, '-n']);
  await tool('virtnbdrestore', ['-i', set, '-o', restored.get(inc) as string, '-n']);

  step('comparing every restored disk with the copy taken at its point (qemu-img compare)');
  let allIdentical = true;
  for (const [point, dir] of restored) {
    for (const disk of domain.disks) {
      const image = path.join(dir, path.basename(disk.image));
      const result = await TestDomain.compare(image, point.copies.get(disk.target) as string, { formatA: 'qcow2', formatB: 'raw' });
      allIdentical &&= result.identical;
      detail(`${disk.target} at ${point.checkpoint}: ${result.identical ? 'identical' : `DIFFERENT (${result.output})`}`);
    }
  }
  return allIdentical;
}

async function main(): Promise<number> {
  console.log(`virtnbd demo, tools from ${binDir}`);
  let domain: TestDomain | undefined;
  let work: string | undefined;
  try {
    step('creating a throwaway domain with two qcow2 disks holding data');
    domain = await TestDomain.create({ disks: DISKS, namePrefix: DEMO_PREFIX });
    for (const disk of domain.disks) detail(`${disk.target}: ${disk.image} (${disk.sizeBytes / 2 ** 20} MiB)`);
    work = await tempDir('work-', DEMO_PREFIX);
    const ok = await demo(domain, work);
    console.log(ok ? 'All restored disks are identical to the originals.' : 'Some restored disks differ.');
    return ok ? 0 : 1;
  } finally {
    step('removing the domain and the temporary files');
    await domain?.destroy();
    if (work) await fs.rm(work, { recursive: true, force: true });
  }
}

main().then(
  (code) => { process.exitCode = code; },
  (err: unknown) => {
    console.error(`demo failed: ${err instanceof Error ? err.message : String(err)}`);
    process.exitCode = 1;
  },
);
