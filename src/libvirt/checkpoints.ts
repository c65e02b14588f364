// The checkpoint chain of a backup set: which checkpoint a run creates and which it is based on, and the XML
// libvirt needs for both. Pure planning; see backupJob.ts for the calls.
//   full: <prefix>.0, no parent, new chain      inc: <prefix>.<n>, parent = last in the set's .cpt
//   diff: nothing created, changes since the last checkpoint      copy: nothing created, no parent

export type Level = 'copy' | 'full' | 'inc' | 'diff';

export const DEFAULT_PREFIX = 'virtnbdbackup';

export interface CheckpointPlan {
  /** Name written into the stream metadata (and created, when `create`). */
  name: string;
  /** Checkpoint the dirty bitmap is relative to; '' for copy/full. */
  parent: string;
  /** Whether this run creates `name` in libvirt. */
  create: boolean;
}

export function planCheckpoint(level: Level, chain: string[], prefix = DEFAULT_PREFIX): CheckpointPlan {
  switch (level) {
    case 'copy':
      return { name: `${prefix}.0`, parent: '', create: false };
    case 'full':
      return { name: `${prefix}.0`, parent: '', create: true };
    case 'inc':
    case 'diff': {
      const parent = chain[chain.length - 1];
      if (parent === undefined) throw new Error(`no checkpoints in the backup set: run a full backup first`);
      return { name: `${prefix}.${chain.length}`, parent, create: level === 'inc' };
    }
  }
}

function escapeXml(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

/** Checkpoint over `diskTargets`; the domain's other disks are listed with checkpoint='no'. */
export function checkpointXml(plan: CheckpointPlan, diskTargets: string[], allTargets: string[]): string {
  const selected = new Set(diskTargets);
  const disks = allTargets.filter((t) => !selected.has(t)).map((t) => `    <disk name='${escapeXml(t)}' checkpoint='no'/>`);
  disks.unshift(...diskTargets.map((t) => `    <disk name='${escapeXml(t)}' checkpoint='bitmap'/>`));
  const lines = disks.join('\n');
  const parent = plan.parent ? `  <parent><name>${escapeXml(plan.parent)}</name></parent>\n` : '';
  return `<domaincheckpoint>\n  <description>Backup checkpoint</description>\n  <name>${escapeXml(plan.name)}</name>\n${parent}  <disks>\n${lines}\n  </disks>\n</domaincheckpoint>\n`;
}

export interface BackupJobDisk {
  target: string;
  scratchFile: string;
}

/** Pull-mode backup over a unix socket; `<incremental>` makes libvirt export the dirty bitmap as backup-<disk>. */
export function backupJobXml(socket: string, incrementalFrom: string, disks: BackupJobDisk[], allTargets: string[]): string {
  const selected = new Set(disks.map((d) => d.target));
  const lines = disks.map((d) =>
    `    <disk name='${escapeXml(d.target)}' backup='yes' type='file'>\n      <scratch file='${escapeXml(d.scratchFile)}'/>\n    </disk>`);
  for (const t of allTargets) if (!selected.has(t)) lines.push(`    <disk name='${escapeXml(t)}' backup='no'/>`);
  const incremental = incrementalFrom ? `  <incremental>${escapeXml(incrementalFrom)}</incremental>\n` : '';
  return `<domainbackup mode='pull'>\n${incremental}  <server transport='unix' socket='${escapeXml(socket)}'/>\n  <disks>\n${lines.join('\n')}\n  </disks>\n</domainbackup>\n`;
}

/** Name of the dirty-bitmap meta context libvirt's pull backup exports for a disk. */
export function dirtyBitmapContext(target: string): string {
  return `qemu:dirty-bitmap:backup-${target}`;
}
