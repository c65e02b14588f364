// The files beside the data of a finished run: image info (qcow.json, read while the data is copied), domain XML,
// boot files, autostart flag, and for a run that created a checkpoint its saved definition and the set's checkpoint
// list (.cpt). Guarantees: the .cpt is written last, so a run enters the chain only once everything else is in the set.
import path from 'node:path';
import { CHECKPOINT_DIR, autostartName, checkpointListName, qcowInfoName, vmConfigName } from '../set/backupSet.js';
import { DirectoryTarget } from '../set/target.js';
import { oneLine } from '../util/errors.js';
import { saveBootFiles } from './bootFiles.js';
import { ownCheckpointDir, type RunContext } from './context.js';
import { sliceImageOpts, type DomainDisk } from '../libvirt/domainXml.js';
import type { RunPlan } from './runPlan.js';

/** `qemu-img info` (JSON) of one disk, or why it could not be read; neither for a network disk, which has no image file here. */
export interface ImageInfo {
  target: string;
  json?: string;
  failure?: unknown;
}

/**
 * Starts `qemu-img info` of every disk. Once the exports are open the images look as they will when the data is in
 * (the checkpoint's bitmap exists), so this runs during the copy instead of after it. Never rejects.
 */
export function readImageInfo(ctx: RunContext): Promise<ImageInfo[]> {
  return Promise.all(ctx.disks.map(async (disk): Promise<ImageInfo> => {
    if (disk.type === 'network') return { target: disk.target };
    try {
      return { target: disk.target, json: await imageInfoJson(ctx, disk) };
    } catch (failure) {
      return { target: disk.target, failure };
    }
  }));
}

/** `qemu-img info` JSON of `disk` on the domain's host; for a shut-off domain read once per run (the plan's bitmap check and qcow.json share it). */
export function imageInfoJson(ctx: RunContext, disk: DomainDisk): Promise<string> {
  // A slice (<slices>) is the disk: its size and layout, not the whole file's.
  const opts = sliceImageOpts(disk);
  const image = opts ? ['--image-opts', opts] : [disk.path as string];
  const read = async (): Promise<string> => (await ctx.host.run('qemu-img', ['info', '--output=json', '--force-share', ...image])).stdout;
  if (!ctx.power.offline) return read();
  let info = ctx.offlineImageInfo.get(disk.target);
  if (!info) {
    info = read();
    ctx.offlineImageInfo.set(disk.target, info);
  }
  return info;
}

async function saveImageInfo(ctx: RunContext, ident: string, infos: ImageInfo[]): Promise<void> {
  for (const { target, json, failure } of infos) {
    if (json !== undefined) await ctx.target.writeFile(qcowInfoName(target, ident), json);
    else if (failure !== undefined) ctx.log.warn(`could not save image info of ${target}: ${oneLine(failure)}`);
  }
}

/** Saves the checkpoint's definition (-C dir, and inside a zip) and appends it to the set's .cpt. */
async function enterChain(ctx: RunContext, plan: RunPlan): Promise<void> {
  const { name } = plan.checkpoint;
  const xml = await ctx.domain.checkpointGetXMLDesc(name, 0);
  await new DirectoryTarget(ctx.xmlDir).writeFile(`${name}.xml`, xml);
  // With -C, the set keeps a copy too: -C may serve several sets of the domain, whose names repeat.
  const own = ownCheckpointDir(ctx);
  if (own !== ctx.xmlDir) await new DirectoryTarget(own).writeFile(`${name}.xml`, xml);
  const cpt = checkpointListName(ctx.options.domain);
  const next = JSON.stringify([...plan.chain, name]);
  if (ctx.toZip) {
    // An unzipped archive is then a complete set; the state dir keeps the chain for the next run.
    await ctx.target.writeFile(path.join(CHECKPOINT_DIR, `${name}.xml`), xml);
    await ctx.target.writeFile(cpt, next);
    ctx.afterZip.push(() => new DirectoryTarget(ctx.stateDir).writeFile(cpt, next));
    return;
  }
  await new DirectoryTarget(ctx.stateDir).writeFile(cpt, next);
}

export async function saveSideFiles(ctx: RunContext, plan: RunPlan, ident: string, imageInfo: Promise<ImageInfo[]>): Promise<void> {
  await saveImageInfo(ctx, ident, await imageInfo);
  await ctx.target.writeFile(vmConfigName(ident), ctx.vmXml);
  await saveBootFiles(ctx.host, ctx.info.bootFiles, ident, ctx.target, ctx.log);
  if (await ctx.domain.getAutostart()) await ctx.target.writeFile(autostartName(ident), 'True');
  if (plan.checkpoint.create) await enterChain(ctx, plan);
}
