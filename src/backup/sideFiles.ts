// The files beside the data of a finished run: image info (qcow.json), domain XML, boot files, autostart flag,
// and for a run that created a checkpoint its saved definition and the set's checkpoint list (.cpt).
// Guarantees: the .cpt is written last, so a run enters the chain only once everything else is in the set.
import path from 'node:path';
import { CHECKPOINT_DIR, autostartName, checkpointListName, qcowInfoName, vmConfigName } from '../set/backupSet.js';
import { DirectoryTarget } from '../set/target.js';
import { run } from '../util/process.js';
import { oneLine } from '../util/errors.js';
import { saveBootFiles } from './bootFiles.js';
import type { RunContext } from './context.js';
import type { RunPlan } from './runPlan.js';

async function saveImageInfo(ctx: RunContext, ident: string): Promise<void> {
  for (const disk of ctx.disks) {
    try {
      const { stdout } = await run('qemu-img', ['info', '--output=json', '--force-share', disk.path as string]);
      await ctx.target.writeFile(qcowInfoName(disk.target, ident), stdout);
    } catch (err) {
      ctx.log.warn(`could not save image info of ${disk.target}: ${oneLine(err)}`);
    }
  }
}

/** Saves the checkpoint's definition (-C dir, and inside a zip) and appends it to the set's .cpt. */
async function enterChain(ctx: RunContext, plan: RunPlan): Promise<void> {
  const { name } = plan.checkpoint;
  const xml = await ctx.domain.checkpointGetXMLDesc(name, 0);
  await new DirectoryTarget(ctx.xmlDir).writeFile(`${name}.xml`, xml);
  const cpt = checkpointListName(ctx.options.domain);
  const next = JSON.stringify([...plan.chain, name]);
  if (ctx.toZip) {
    // An unzipped archive is then a complete set; the state dir keeps the chain for the next run.
    await ctx.target.writeFile(path.join(CHECKPOINT_DIR, `${name}.xml`), xml);
    await ctx.target.writeFile(cpt, next);
  }
  await new DirectoryTarget(ctx.stateDir).writeFile(cpt, next);
}

export async function saveSideFiles(ctx: RunContext, plan: RunPlan, ident: string): Promise<void> {
  await saveImageInfo(ctx, ident);
  await ctx.target.writeFile(vmConfigName(ident), ctx.vmXml);
  await saveBootFiles(ctx.info.bootFiles, ident, ctx.target, ctx.log);
  if (await ctx.domain.getAutostart()) await ctx.target.writeFile(autostartName(ident), 'True');
  if (plan.checkpoint.create) await enterChain(ctx, plan);
}
