// Restores disks from a backup set at any point of its chain, and dumps stream metadata.
//   plan (plan.ts: every refusal before anything is written) -> -c: adjusted domain XML, -D: name free in libvirt
//   -> per disk: new image (.partial, qcow.json layout) or the existing raw file/device (refused while the system
//      or another process holds it: mounted, a loop device's file, swap, open for writing; holders.ts) -> qemu-nbd
//   -> each stream's records in order (zero frames of later links written; onto an existing target, the base
//      also zeroes every range it does not cover) -> adler32 of each file == its .chksum -> flush, stop qemu-nbd
//   -> (--compress: qemu-img convert -c) -> rename; raw images: qemu-img convert (onto another host: their data
//   through its qemu-nbd, as for streams), their adler32 == .chksum read alongside (onto an existing target:
//   before it is written) -> vmconfig copied, or adjusted with the saved NVRAM copied beside it
//   -> -D: defined through libvirt (a warning when the backed-up domain is defined there too with the same MAC
//   addresses). With a remote URI, every step on the output's side (files, qemu-img, qemu-nbd) runs on that host
//   through ssh, and NBD goes over TCP.
// Guarantees: never overwrites an existing file; each link is fully written before the next starts, so later
// changes win; a damaged file (bad frame, bad lz4 checksum, checksum mismatch) fails the restore naming it, and a
// failed or interrupted restore into a directory leaves nothing of that disk behind, and keeps the images of disks
// restored before it, naming them; the directories it made for -o (here or there) go again where left empty;
// here, qemu-nbd and qemu-img end with the run, even one killed (kill -9). Only -D needs libvirtd.
import fs from 'node:fs/promises';
import path from 'node:path';
import { NbdEndpoint } from '../endpoint/nbd.js';
import type { Endpoint } from '../endpoint/endpoint.js';
import { StreamReader } from '../stream/reader.js';
import { StreamFormatError, type StreamMetadata } from '../stream/format.js';
import { archivedChainHolding, autostartName, checksumMismatch, fileChecksum, isStreamFile, listSet, noDataFiles, ofDisk, partialsOf, recordedChecksum, type ChainLink } from '../set/backupSet.js';
import { DEFAULT_LIBVIRT_URI, connectAdvice, loginRefused, lostConnectionError, openConnection, openLibvirt, type LibvirtLogin } from '../libvirt/connection.js';
import { VIR_ERR_NO_DOMAIN, type LibvirtConnection, type NativeError } from '../native/addon.js';
import { ImageServer, convertImage, createImage, heldForWriting, type ServeOptions } from './qemu.js';
import { LOCAL_HOST, type DomainHost } from '../libvirt/domainHost.js';
import { partialName, planRestore, refuseExisting, sequenceInSet, type DiskPlan, type PlanOptions, type RestorePlan } from './plan.js';
import { adjustDomainConfig } from './vmconfig.js';
import { holdersRefusal, targetHolders } from './holders.js';
import { parseDomainXml } from '../libvirt/domainXml.js';
import { bootFileName } from '../backup/bootFiles.js';
import { Logger, silentLogger } from '../util/log.js';
import { UserError, describeFailure, describeReadFailure, oneLine, outOfSpace, raisedBy } from '../util/errors.js';
import { WorkWindow } from '../util/window.js';
import { leasePool } from '../util/bufferPool.js';
import { ReadAhead, exists, readInto } from '../util/fileIo.js';
import { partialCause } from '../backup/lock.js';
import { qemuImgMapEntries } from '../backup/extentSources.js';
import { checkSocketPath } from '../util/process.js';

export { loadChains } from './plan.js';

export interface RestoreOptions extends PlanOptions {
  /** Socket for qemu-nbd; default /var/tmp/virtnbdrestore.<pid>.<disk>. */
  socketFile?: string;
  /** Onto another host (`host` remote): where its qemu-nbd listens (-I, -P) and, for TLS, this side's certificates. */
  remoteServer?: { host: string; port: number; tlsCertificates?: string };
  /** --nbd-timeout: seconds qemu-nbd may leave a write, or libvirtd a call, unanswered before the restore fails (0: forever); default DEFAULT_NBD_TIMEOUT. */
  nbdTimeout?: number;
  /** -c: write the domain XML adjusted to the restored disks (implied by `define`). */
  adjustConfig?: boolean;
  /** -D: define the adjusted domain in libvirt. */
  define?: boolean;
  /** -N: name of the restored domain; default restore_<name>. */
  name?: string;
  /** libvirt URI for `define`; default DEFAULT_LIBVIRT_URI. */
  uri?: string;
  /** --user/--password: a login for a libvirtd that asks for one. */
  login?: LibvirtLogin;
  /** -C: the domain XML to copy or adjust instead of the set's vmconfig of the restore point. */
  configFile?: string;
  log?: Logger;
  progress?: (disk: string, total: number) => (bytes: number) => void;
  signal?: AbortSignal;
}

export interface RestoredDisk {
  disk: string;
  image: string;
  /** Data files applied, in order. */
  applied: string[];
}

export interface RestoreResult {
  disks: RestoredDisk[];
  /** The domain XML written into the output directory (copied or adjusted), or found there already (configKept). */
  config?: string;
  /** An XML of that name was in the output directory already (an earlier restore, or the set itself): left as it was. */
  configKept?: boolean;
  /** Name of the domain defined with `define`. */
  defined?: string;
  /** The defined domain was set to start with the host, as the backed-up one did. */
  autostart?: boolean;
}

/** Bytes of payload being written at most at once. */
const WRITE_WINDOW = 64 * 1024 * 1024;
const CONNECTIONS = 4;
/** Pieces of a raw image sent onto another host. */
const RAW_PIECE = 4 * 1024 * 1024;

/** What the error line adds when a file of the set is damaged: an earlier point helps unless it is the base or a raw image. */
function damagedHint(err: unknown, disk: DiskPlan): string {
  const check = "the set's file is damaged: check the set with -a verify";
  if (disk.source.kind === 'image') return `${check}; it is disk ${disk.disk}'s raw image, which stands alone, so no point in time of that disk restores from this set`;
  const base = disk.source.chain[0];
  const inBase = base !== undefined && oneLine(err).includes(base.path);
  return `${check}${inBase ? `; it is the base of disk ${disk.disk}'s chain, so no point in time of that disk restores from this set` : ', or restore an earlier point with --until'}`;
}

interface ConfigPlan {
  source: string;
  /** Where it goes in the output directory. */
  target?: string;
  /** The adjusted XML and the domain name in it, with -c/-D; the name it had, and its MAC addresses (kept). */
  adjusted?: { xml: string; name: string; formerName: string; macs: string[] };
  /** The domain's NVRAM as saved in the set, and where its copy goes. */
  nvram?: { saved: string; target: string };
}

/**
 * Refuses a -N name libvirt would refuse only when defining, after every image is written: '/', a newline (libvirt's
 * own checks), control characters XML cannot hold (-c wrote them into a file no parser reads), and the tab, CR and
 * DEL it takes but virsh prints unreadably, which only a pasted name brings.
 */
function checkDomainName(name: string): void {
  const control = /[\u0000-\u001f\u007f]/.exec(name)?.[0];
  if (control !== undefined) {
    const which = control === '\n' ? 'a newline' : control === '\t' ? 'a tab' : `the control character 0x${control.charCodeAt(0).toString(16).padStart(2, '0')}`;
    // Escaped, so that the line stays one and shows what was typed (JSON leaves DEL as it is).
    const shown = JSON.stringify(name).replace(/\u007f/g, '\\u007f');
    throw new UserError(`-N ${shown}: a domain name cannot contain ${which}; choose another name`);
  }
  if (name.includes('/')) throw new UserError(`-N ${name}: a domain name cannot contain '/'; choose another name`);
}

export async function restore(options: RestoreOptions): Promise<RestoreResult> {
  const log = options.log ?? silentLogger;
  const adjust = Boolean(options.adjustConfig || options.define);
  if (options.name !== undefined) checkDomainName(options.name);
  const plan = await planRestore({ ...options, log });
  const config = await planConfig(plan, options, adjust, log);
  const uri = options.uri ?? DEFAULT_LIBVIRT_URI;
  // The name is checked now, before anything is written; the define connects at the end, so a libvirtd restarted
  // while the images are written does not fail the run.
  if (options.define) await checkNameFree(uri, options.login, config?.adjusted?.name as string, options.nbdTimeout);
  const host = outputHost(options);
  // Before anything is written: qemu-nbd's socket path is cleared for it, so it must not hold a file of the user's.
  if (options.socketFile && !host.remote) await checkSocketPath(options.socketFile);
  // The directories this run makes, here or on the output's host (-o and any missing parents, innermost first): a
  // failed run removes them again.
  const made = plan.outputDir ? await missingDirectories(plan.outputDir, host) : [];
  if (plan.outputDir) {
    const dir = plan.outputDir;
    await host.makeDir(dir).catch(async (err: unknown) => {
      await removeEmptyDirectories(made, host);
      throw new UserError(`cannot create output directory ${dir}${host.remote ? ` on ${host.label}` : ''}: ${describeFailure(err)}`);
    });
  }
  const disks: RestoredDisk[] = [];
  try {
    for (const disk of plan.disks) disks.push(await restoreDisk(disk, options, log));
  } catch (err) {
    // A failed disk's image is removed: a directory this run made is then left only if something else is in it (as
    // it surely is where a file could not be removed: a host gone silent is not waited for again).
    if (!filesLeft.has(err as object)) await removeEmptyDirectories(made, host);
    throw keptImages(err, disks, plan, adjust, host);
  }
  const result: RestoreResult = { disks };
  // The images are whole by now: a file that cannot be written after them must say they are kept.
  const writeAfterImages = (file: string, content: Buffer | { localFile: string }, what: string): Promise<void> =>
    host.createNew(file, content).catch(async (err: unknown) => {
      // A backup into the set that moved its chain aside meanwhile took the file along: named where it is now.
      const source = Buffer.isBuffer(content) || (await exists(content.localFile)) ? undefined : content.localFile;
      const archive = source && (await archivedChainHolding(path.dirname(source), path.basename(source)));
      const advice = archive ? `${what.split(source).join(path.join(archive, path.basename(source)))} (a backup into the set moved its chain into ${archive} meanwhile)` : what;
      throw new UserError(`the restored images are in place in ${plan.outputDir ?? 'their targets'}, but ${file} could not be written: ${describeFailure(err)}; ${advice}`);
    });
  if (config?.nvram) await writeAfterImages(config.nvram.target, { localFile: config.nvram.saved }, `copy ${config.nvram.saved} there yourself`);
  if (config?.target) {
    const from = config.adjusted ? Buffer.from(config.adjusted.xml) : { localFile: config.source };
    const what = config.adjusted ? 'run the restore again with -c into a new directory, or adjust the set\'s domain XML yourself' : `copy ${config.source} there yourself`;
    if (config.adjusted) await writeAfterImages(config.target, from, what);
    else if (await host.exists(config.target)) result.configKept = true;
    else await writeAfterImages(config.target, from, what);
    result.config = config.target;
  }
  if (options.define && config?.adjusted) {
    const autostart = plan.ident !== undefined && (await exists(path.join(plan.input, autostartName(plan.ident))));
    await defineRestored(uri, options.login, config.adjusted, config.target ?? '', autostart, log, options.nbdTimeout);
    result.defined = config.adjusted.name;
    if (autostart) {
      result.autostart = true;
      log.info(`domain '${config.adjusted.name}' starts with the host, as the backed-up domain did (autostart)`);
    }
  }
  return result;
}

/**
 * A run that failed or was interrupted after some disks were restored keeps their images, which are whole: its line
 * names them and says how to go on, since a new restore into that directory refuses them. The domain XML (-c, -D)
 * names every restored disk, so it takes a restore of all of them again.
 */
function keptImages(err: unknown, done: RestoredDisk[], plan: RestorePlan, adjust: boolean, host: DomainHost): unknown {
  if (done.length === 0 || !(err instanceof UserError)) return err;
  const images = done.map((d) => d.image);
  const [them, are] = images.length > 1 ? ['them', 'are'] : ['it', 'is'];
  const rest = plan.disks.filter((disk) => !done.some((d) => d.disk === disk.disk)).map((disk) => disk.disk);
  const onlyRest = !adjust && rest.length > 0 ? `restore ${rest.length > 1 ? `the disks ${rest.join(', ')} one by one with -d` : `disk ${rest[0]} with -d ${rest[0]}`} into ${plan.outputDir}, or ` : '';
  return new UserError(`${err.message}; ${images.join(', ')}${host.remote ? ` on ${host.label}` : ''} ${are} restored whole and kept: ${onlyRest}remove ${them} and restore again`, err.exitCode);
}

/** Failures of a disk whose files could not all be removed (its output directory is not empty). */
const filesLeft = new WeakSet<object>();

/** `dir` and those of its parents that do not exist on `host`, innermost first (on another host, `dir` is absolute). */
async function missingDirectories(dir: string, host: DomainHost): Promise<string[]> {
  const candidates: string[] = [];
  for (let at = path.resolve(dir); at !== path.dirname(at); at = path.dirname(at)) candidates.push(at);
  if (!host.remote) {
    const missing: string[] = [];
    for (const at of candidates) {
      if (await exists(at)) break;
      missing.push(at);
    }
    return missing;
  }
  // One round trip: each name up to the first that is there, NUL-separated (a name may hold a newline).
  const script = 'for d; do if [ -e "$d" ] || [ -L "$d" ]; then break; fi; printf "%s\\0" "$d"; done';
  const { stdout } = await host.run('sh', ['-c', script, 'sh', ...candidates]);
  return stdout.split('\0').filter((d) => candidates.includes(d));
}

/**
 * Removes the directories this run made (`made`, innermost first) where they are empty, stopping at the first that
 * is not (or cannot be reached): nothing that was there before the run, nor anything in them, is removed. Those it
 * did not get to make (its mkdir failed part way) are passed over.
 */
async function removeEmptyDirectories(made: string[], host: DomainHost): Promise<void> {
  if (made.length === 0) return;
  if (!host.remote) {
    for (const dir of made) {
      const removed = await fs.rmdir(dir).then(() => true, (err: NodeJS.ErrnoException) => err.code === 'ENOENT' || err.code === 'ENAMETOOLONG');
      if (!removed) break;
    }
    return;
  }
  const script = 'for d; do if [ -d "$d" ]; then rmdir -- "$d" 2>/dev/null || break; fi; done';
  await host.run('sh', ['-c', script, 'sh', ...made]).catch(() => undefined);
}

/**
 * -C's file: a path as given, from the working directory (as Python reads it); a bare name that is not there names
 * a file of the set (-C vmconfig.virtnbdbackup.0.xml).
 */
async function configFilePath(file: string, input: string): Promise<string> {
  return file.includes('/') || (await exists(file)) ? path.resolve(file) : path.join(input, file);
}

/** Which domain XML goes into the output, adjusted or as saved; refuses before anything is written. */
async function planConfig(plan: RestorePlan, options: RestoreOptions, adjust: boolean, log: Logger): Promise<ConfigPlan | undefined> {
  const source = options.configFile ? await configFilePath(options.configFile, plan.input) : plan.vmconfig;
  if (!source) {
    if (adjust) throw new UserError(`${plan.input} holds no vmconfig.${plan.ident}.xml for -c/-D; give the domain XML with -C`);
    log.warn(`${plan.input} holds no vmconfig.${plan.ident}.xml: no domain XML copied`);
    return undefined;
  }
  const xml = await fs.readFile(source, 'utf8').catch((err: NodeJS.ErrnoException) => {
    throw new UserError(`cannot read the domain XML ${source}: ${describeReadFailure(err)}`);
  });
  if (!adjust) return { source, target: plan.outputDir && path.join(plan.outputDir, path.basename(source)) };
  if (!plan.outputDir) throw new UserError('-c/-D adjust the domain XML to images in a directory: restore into a directory, or define the domain yourself with the target as its disk');
  const target = path.join(plan.outputDir, path.basename(source));
  const nvram = await savedNvram(xml, plan, plan.outputDir);
  await refuseExisting([target, ...(nvram ? [nvram.target] : [])]);
  let adjusted;
  try {
    adjusted = adjustDomainConfig(xml, {
      name: options.name,
      disks: new Map(plan.disks.map((d) => [d.disk, { path: d.image, format: d.format, block: d.block }])),
      keepRawDevices: Boolean(options.raw),
      nvram: nvram?.target,
    });
  } catch (err) {
    throw new UserError(`cannot adjust the domain XML ${source}: ${oneLine(err)}; give another with -C`);
  }
  for (const change of adjusted.changes) log.info(`config: ${change}`);
  const { name: formerName, macs } = parseDomainXml(xml);
  return { source, target, adjusted: { xml: adjusted.xml, name: adjusted.name, formerName, macs }, nvram };
}

/** The NVRAM the domain XML names, if the backup saved it (`<basename>.<ident>`), and its place in the output. */
async function savedNvram(xml: string, plan: RestorePlan, outputDir: string): Promise<ConfigPlan['nvram']> {
  let nvram: string | undefined;
  try {
    nvram = parseDomainXml(xml).bootFiles.nvram;
  } catch {
    return undefined; // adjustDomainConfig reports the XML itself
  }
  if (!nvram) return undefined;
  const saved = path.join(plan.input, bootFileName(nvram, plan.ident ?? 'copy'));
  if (!(await exists(saved))) return undefined;
  return { saved, target: path.join(outputDir, path.basename(nvram)) };
}

/** -D never replaces an existing domain: refuses a name that is taken. */
async function checkNameFree(uri: string, login: LibvirtLogin | undefined, name: string, silentSeconds?: number): Promise<void> {
  const connection = await openLibvirt(uri, login, silentSeconds);
  try {
    await refuseTakenName(connection, uri, name);
  } finally {
    await connection.close().catch(() => undefined);
  }
}

async function refuseTakenName(connection: LibvirtConnection, uri: string, name: string): Promise<void> {
  const taken = await connection.lookupDomainByName(name).then(() => true, (err: NativeError) => {
    if (err.code === VIR_ERR_NO_DOMAIN) return false;
    throw new UserError(`cannot look up domain '${name}' at ${uri}: ${oneLine(err)}`);
  });
  if (taken) throw new UserError(`domain '${name}' already exists at ${uri}; name the restored domain with -N`);
}

/**
 * Defines the restored domain (-D) on a connection of its own, checking again that its name is free; with
 * `autostart`, it starts with the host. Every failure says that the images and the XML at `xmlFile` are in place.
 */
async function defineRestored(uri: string, login: LibvirtLogin | undefined, adjusted: NonNullable<ConfigPlan['adjusted']>, xmlFile: string, autostart: boolean, log: Logger, silentSeconds?: number): Promise<void> {
  const inPlace = `the restored images and ${xmlFile} are in place`;
  const defineByHand = `'virsh define ${xmlFile}'${autostart ? ` and 'virsh autostart ${adjusted.name}'` : ''}`;
  let connection: LibvirtConnection;
  try {
    connection = await openConnection(uri, login, silentSeconds);
  } catch (err) {
    throw new UserError(`cannot connect to libvirt at ${uri} to define domain '${adjusted.name}' (${oneLine(err)}); ${inPlace}: ${loginRefused(err) ? `${connectAdvice(err, login)}, or` : 'once libvirtd runs,'} run ${defineByHand}`);
  }
  let step = 'defining';
  try {
    await refuseTakenName(connection, uri, adjusted.name);
    const domain = await connection.defineXML(adjusted.xml);
    step = 'setting autostart of';
    if (autostart) await domain.setAutostart(true);
    await warnSharedMacs(connection, uri, adjusted, log).catch(() => undefined);
  } catch (err) {
    const lost = await lostConnectionError(connection, uri, err, `run ${defineByHand}; ${inPlace}`);
    if (lost) throw lost;
    if (err instanceof UserError) throw new UserError(`${err.message}; ${inPlace}`);
    const next = step === 'defining' ? 'fix the XML and run virsh define' : `run 'virsh autostart ${adjusted.name}'`;
    throw new UserError(`${step} domain '${adjusted.name}' failed: ${oneLine(err)}; ${inPlace}: ${next}`);
  } finally {
    await connection.close().catch(() => undefined);
  }
}

/**
 * Refuses an existing target the system uses (a mounted device, a loop device it backs, swap), or that another
 * process holds open for writing, such as a running domain's disk or a raw qemu-nbd: the probe of holders.ts names
 * them, and QEMU's image lock tells of others. A restore would write under each (qemu-nbd failed on a lock only
 * after the file was grown, with a message that data was left incomplete). Other failures are left to the steps
 * that follow, which name them.
 */
async function refuseInUse(disk: DiskPlan, host: DomainHost): Promise<void> {
  if (disk.block && (await claimedBySystem(disk.image, host))) {
    throw new UserError(`${disk.image}${host.remote ? ` on ${host.label}` : ''} is in use by the system (a mounted file system, or part of LVM, RAID or swap), so it was left untouched; unmount or release it, or give another device`);
  }
  // Loop devices, swap and writers that take no QEMU lock (a raw qemu-nbd with --cache=none, dd): each named.
  const holders = await targetHolders(disk.image, host);
  if (holders.length > 0) throw new UserError(holdersRefusal(disk.image, host.remote ? ` on ${host.label}` : '', holders));
  // Opened for writing, nothing written: a shared read (qemu-img info) passes where qemu-nbd's write lock fails.
  // It still tells where the probe sees no holder (a process in a pid namespace of its own, another NFS client).
  if (await heldForWriting(disk.image, host)) {
    throw new UserError(`${disk.image}${host.remote ? ` on ${host.label}` : ''} is in use: another process (a running domain?) holds it open for writing, so it was left untouched; stop what uses it, or restore to another file or into a directory`);
  }
}

/**
 * Whether the kernel holds block device `device` (a mounted file system, an LVM physical volume, swap, RAID): that
 * takes no QEMU lock, and such a device was written over. Its exclusive open fails (EBUSY); on another host through
 * perl, which Debian always has (perl-base): without it, or on any other failure, not known, and left to the steps
 * that follow.
 */
async function claimedBySystem(device: string, host: DomainHost): Promise<boolean> {
  if (!host.remote) {
    return fs.open(device, fs.constants.O_RDONLY | fs.constants.O_EXCL).then((handle) => handle.close().then(() => false), (err: NodeJS.ErrnoException) => err.code === 'EBUSY');
  }
  const open = 'sysopen(my $f, $ARGV[0], O_RDONLY | O_EXCL) || !$!{EBUSY} || die "EBUSY\\n"';
  return host.run('perl', ['-MFcntl', '-e', open, device]).then(() => false, (err: unknown) => /\bEBUSY\b/.test(oneLine(err)));
}

/**
 * The restored domain keeps the backed-up one's MAC addresses, as a machine brought back in its place must (DHCP
 * reservations, licences). Where the backed-up domain is still defined there, the two would clash on one network:
 * says so. Never fails the restore.
 */
async function warnSharedMacs(connection: LibvirtConnection, uri: string, adjusted: NonNullable<ConfigPlan['adjusted']>, log: Logger): Promise<void> {
  if (adjusted.macs.length === 0 || adjusted.formerName === adjusted.name) return;
  const original = await connection.lookupDomainByName(adjusted.formerName).then((d) => d.getXMLDesc(0), () => undefined);
  if (original === undefined) return;
  const shared = parseDomainXml(original).macs.filter((mac) => adjusted.macs.includes(mac));
  if (shared.length === 0) return;
  log.warn(`domain '${adjusted.name}' has the MAC address${shared.length > 1 ? 'es' : ''} ${shared.join(', ')} of '${adjusted.formerName}', which is defined at ${uri} too: do not run both on one network, or give '${adjusted.name}' new ones (virsh edit ${adjusted.name}: remove its <mac> lines, and libvirt makes new ones)`);
}

async function restoreDisk(disk: DiskPlan, options: RestoreOptions, log: Logger): Promise<RestoredDisk> {
  const created: string[] = [];
  const applied = disk.source.kind === 'stream' ? disk.source.chain.map((l) => l.file) : [disk.source.file];
  if (disk.existing) await refuseInUse(disk, outputHost(options));
  log.info(`restoring disk ${disk.disk} onto ${disk.image} (${disk.format}${disk.createOptions.length ? ` ${disk.createOptions.join(',')}` : ''}) from ${applied.join(', ')}`);
  let touched = false;
  try {
    // A damaged raw image must not replace an existing target's data: checked before it is written (a new image's
    // copy is checked alongside, its .partial removed on a mismatch).
    if (disk.existing && disk.source.kind === 'image') await checkImageChecksum(disk.source.path, options.signal);
    touched = true;
    if (disk.existing) await growRegularFile(disk, outputHost(options));
    if (disk.source.kind === 'stream') {
      await writeChain(disk, disk.source.chain, options, created);
    } else if (outputHost(options).remote) {
      await sendImage(disk, disk.source.path, options, created);
    } else {
      await copyImage(disk, disk.source.path, options, created);
    }
  } catch (err) {
    const host = outputHost(options);
    // A host that went away keeps what it holds: then the line names it, not "nothing kept".
    const kept = (await Promise.all(created.map((file) => host.remove(file).then(() => undefined, () => file)))).filter((file) => file !== undefined);
    if (err instanceof UserError && err.exitCode === 130) {
      // Interrupted: cleaned up, but the run's writes onto an existing target cannot be taken back.
      throw disk.existing && touched ? new UserError(`${err.message}, but ${disk.image} now holds incomplete data: restore onto it again`, 130) : err;
    }
    const moved = await chainMovedAside(disk, err);
    const hint = moved ? `; a backup into the set moved its chain into ${moved} while this restore read it (an inc that fell back to a full, which starts a new chain): restore from there (-i ${moved})`
      : err instanceof StreamFormatError ? `; ${damagedHint(err, disk)}` : '';
    const left = kept.length > 0 ? `${kept.join(', ')}${host.remote ? ` on ${host.label}` : ''} could not be removed: remove ${kept.length > 1 ? 'them' : 'it'}`
      : disk.existing ? (touched ? `${disk.image} now holds incomplete data: restore onto it again` : `${disk.image} was left untouched`) : 'nothing of it was kept';
    // A full output is named as such: libnbd only says that qemu-nbd's write failed.
    const full = outOfSpace(err);
    const failure = full ? `failed writing ${disk.image}: ${full}` : `failed: ${oneLine(err)}`;
    const error = new UserError(`restore of disk ${disk.disk} ${failure}${hint}; ${left}`);
    if (kept.length > 0) filesLeft.add(error);
    throw error;
  }
  return { disk: disk.disk, image: disk.image, applied };
}

/** An existing regular file smaller than the disk grows to its size (devices were checked in the plan). */
async function growRegularFile(disk: DiskPlan, host: DomainHost): Promise<void> {
  if (disk.block) return;
  await host.run('truncate', ['-s', `>${disk.virtualSize}`, disk.image]); // GNU truncate: to at least that size
}

/**
 * A raw image of the set (-t raw, or Python's raw disks): copied as it is, or converted to the disk's format; into a
 * new image, its checksum is read alongside the copy (onto an existing target, restoreDisk checked it before).
 */
async function copyImage(disk: DiskPlan, source: string, options: RestoreOptions, created: string[]): Promise<void> {
  if (disk.existing) {
    await convertImage(source, 'raw', disk.image, 'raw', { existing: true, signal: options.signal });
    return;
  }
  const partial = partialName(disk.image);
  await claimNew([partial, ...(disk.dataFile ? [disk.dataFile] : [])], LOCAL_HOST, created);
  await copyChecked(source, options.signal, (signal) =>
    convertImage(source, 'raw', partial, disk.format, { options: disk.createOptions, compress: options.compress && disk.format === 'qcow2', signal }));
  await LOCAL_HOST.rename(partial, disk.image);
}

/**
 * `copy` of the raw image `source` with its checksum read alongside: a mismatch stops the copy at once (a damaged
 * image is not copied to its end first). Both have ended when it throws, the checksum's failure first.
 */
async function copyChecked(source: string, signal: AbortSignal | undefined, copy: (signal: AbortSignal) => Promise<void>): Promise<void> {
  const mismatch = new AbortController();
  const check = checkImageChecksum(source, signal).catch((err: unknown) => {
    mismatch.abort(err);
    throw err;
  });
  await allDone([check, copy(signal ? AbortSignal.any([signal, mismatch.signal]) : mismatch.signal)]);
}

/**
 * Waits for every step, then throws the first failure in their order: a step still running when another failed
 * would write into a file the clean-up has removed, or create it again after.
 */
async function allDone(steps: Array<Promise<unknown>>): Promise<void> {
  for (const result of await Promise.allSettled(steps)) if (result.status === 'rejected') throw result.reason;
}

/** Where the image's qemu-nbd serves: a socket here, or TCP on the output's remote host. */
function serveAt(disk: DiskPlan, options: RestoreOptions): ServeOptions['at'] {
  const host = outputHost(options);
  if (!host.remote) return { socket: options.socketFile ?? `/var/tmp/virtnbdrestore.${process.pid}.${disk.disk}` };
  if (!options.remoteServer) throw new Error('a restore onto another host needs its server address');
  return { ssh: host, ...options.remoteServer };
}

function outputHost(options: RestoreOptions): DomainHost {
  return options.host ?? LOCAL_HOST;
}

/** Applies the chain's streams in order to the disk's image, through qemu-nbd. */
async function writeChain(disk: DiskPlan, chain: ChainLink[], options: RestoreOptions, created: string[]): Promise<void> {
  await writeThroughServer(disk, options, created, async (endpoint, progress) => {
    // Where the disk grew within the chain, the range its new size adds reads as zero on the disk, and a later
    // stream's frames leave it out: it is zeroed on an existing target (the old bytes), and on a new image where an
    // earlier, larger size left data there (a disk shrunk, then grown). What lies past the size at the point
    // restored (a disk shrunk since) is left out.
    let size = 0;
    let largest = 0;
    for (const [i, link] of chain.entries()) {
      const base = i === 0;
      const end = Math.min(link.meta.virtualSize, disk.virtualSize);
      if (!base && end > size && (disk.existing || largest > size)) await endpoint.zero(size, end - size, true);
      size = link.meta.virtualSize;
      largest = Math.max(largest, size);
      const { checksum } = await applyStream(link, endpoint, {
        targetIsZero: base && !disk.existing, zeroUncovered: base && disk.existing, diskSize: disk.virtualSize, progress, signal: options.signal,
      });
      await checkRecordedChecksum(link.path, checksum);
      options.log?.debug(`applied ${link.file}`);
    }
  });
}

/**
 * A raw image of the set onto another host: its data written through the qemu-nbd there (holes stay holes); into a
 * new image, its checksum is read alongside (onto an existing target, restoreDisk checked it before).
 */
async function sendImage(disk: DiskPlan, source: string, options: RestoreOptions, created: string[]): Promise<void> {
  await writeThroughServer(disk, options, created, async (endpoint, progress) => {
    const send = (signal?: AbortSignal): Promise<void> => sendRawImage(source, endpoint, { targetIsZero: !disk.existing, progress, signal });
    await (disk.existing ? send(options.signal) : copyChecked(source, options.signal, send));
  });
}

/**
 * Creates the files a disk's restore writes, empty, before qemu-img writes them, and adds them to `created` (which a
 * failure removes). The plan found none of them, but a run started since may have: two restores into one
 * directory at once (a second disk restored with -d while the first run still writes another) both passed that
 * check, and the later one's qemu-img wrote over the other's .partial, then its clean-up removed it.
 */
async function claimNew(files: string[], host: DomainHost, created: string[]): Promise<void> {
  for (const file of files) {
    try {
      await host.createEmpty(file);
    } catch (err) {
      if (!(await host.exists(file))) throw new Error(`cannot create ${file}: ${describeFailure(err)}`, { cause: err });
      throw new UserError(`${file}${host.remote ? ` on ${host.label}` : ''} appeared after this restore checked its output: another run writes it now; wait for it to end, or restore into another directory (it was left as it is)`);
    }
    created.push(file);
  }
}

/**
 * Creates the disk's image (unless it exists), serves it with qemu-nbd, lets `fill` write it, flushes, and gives the
 * new image its name (--compress: through a compressing qemu-img convert).
 */
async function writeThroughServer(
  disk: DiskPlan, options: RestoreOptions, created: string[],
  fill: (endpoint: Endpoint, progress?: (bytes: number) => void) => Promise<void>,
): Promise<void> {
  const host = outputHost(options);
  const compress = Boolean(options.compress) && disk.format === 'qcow2' && !disk.existing;
  const partial = partialName(disk.image);
  const work = disk.existing ? disk.image : compress ? partialName(disk.image, '.uncompressed.partial') : partial;
  if (!disk.existing) {
    await claimNew([work, ...(disk.dataFile ? [disk.dataFile] : [])], host, created);
    await createImage(work, disk.format, disk.virtualSize, disk.createOptions, host);
  }
  // -A preallocates new images (plan.ts refuses it for an existing target): zero writes must not unmap them.
  const server = await ImageServer.start({
    file: work, format: disk.format, exportName: disk.disk, connections: CONNECTIONS, thin: !options.preallocate, at: serveAt(disk, options),
  });
  let endpoint: Endpoint | undefined;
  try {
    endpoint = await NbdEndpoint.open(server.address, { connections: CONNECTIONS, sharedBackend: true, stallTimeout: options.nbdTimeout });
    await fill(endpoint, options.progress?.(disk.disk, disk.dataSize));
    await endpoint.flush();
  } catch (err) {
    // libnbd only sees a closed socket; the cause is the server gone.
    const exited = raisedBy(err, 'libnbd') ? await server.exitedEarly() : undefined;
    throw exited ? new Error(`qemu-nbd, which writes the image, ${exited} (${oneLine(err)})`) : err;
  } finally {
    await endpoint?.close();
    await server.stop();
  }
  if (disk.existing) return;
  if (compress) {
    await claimNew([partial], host, created);
    await convertImage(work, 'qcow2', partial, 'qcow2', { options: disk.createOptions, compress: true, host, signal: options.signal });
    await host.remove(work);
  }
  await host.rename(partial, disk.image);
}

/**
 * Writes the local raw image `file` into `target`: its data where `qemu-img map` finds some, and zeroes elsewhere
 * unless the target already reads as zero (a new image).
 */
async function sendRawImage(file: string, target: Endpoint, options: Omit<ApplyOptions, 'zeroUncovered'>): Promise<void> {
  const { targetIsZero, progress, signal } = options;
  const handle = await fs.open(file, 'r');
  const window = new WorkWindow(WRITE_WINDOW);
  const lease = leasePool(RAW_PIECE, WRITE_WINDOW / RAW_PIECE + 1);
  const pieces = lease.pool;
  const ahead = new ReadAhead(handle);
  try {
    for (const extent of await qemuImgMapEntries(['-f', 'raw', file])) {
      if (!extent.data || extent.zero) {
        if (!targetIsZero) await window.add(target.zero(extent.start, extent.length, true), 0);
        progress?.(extent.length);
        continue;
      }
      const end = extent.start + extent.length;
      for (let at = extent.start; at < end; at += RAW_PIECE) {
        if (signal?.aborted) throw signal.reason ?? new Error('aborted');
        const piece = pieces.acquire(Math.min(RAW_PIECE, end - at));
        ahead.at(at, end);
        if ((await readInto(handle, piece, at)) !== piece.length) throw new Error(`${file} ended at ${at} while qemu-img map reported data up to ${end}`);
        const written = target.write(piece, at).then(() => progress?.(piece.length)).finally(() => pieces.release(piece));
        await window.add(written, piece.length);
      }
    }
    await window.drain();
  } finally {
    await window.settle();
    lease.end();
    await handle.close();
  }
}

/**
 * A data file whose adler32 differs from its `.chksum` is damaged, even where its frames parse. Without a `.chksum`
 * it is not checked (`actual`, where it is a reading of the file, is then not read).
 */
async function checkRecordedChecksum(file: string, actual: number | (() => Promise<number>)): Promise<void> {
  const recorded = await recordedChecksum(file);
  if (recorded === undefined) return;
  const sum = typeof actual === 'number' ? actual : await actual();
  if (sum !== recorded) throw new StreamFormatError(`${file}: ${checksumMismatch(file, sum, recorded)}`);
}

/** A raw image's adler32 against its `.chksum`, as verify checks it: a reading of every byte (holes as zeros). */
function checkImageChecksum(file: string, signal?: AbortSignal): Promise<void> {
  return checkRecordedChecksum(file, () => fileChecksum(file, signal));
}

export interface ApplyOptions {
  /** The target reads as zero where this stream has zero frames: they need no write. */
  targetIsZero: boolean;
  /** Also zero every range the stream does not cover, up to its virtual size (a base onto a used target). */
  zeroUncovered?: boolean;
  /**
   * The disk's size at the point restored: an earlier stream of a disk shrunk since has frames past it, which are
   * left out (their bytes are still read and checked). Default: the stream's own size.
   */
  diskSize?: number;
  progress?: (bytes: number) => void;
  signal?: AbortSignal;
}

export interface AppliedStream {
  meta: StreamMetadata;
  /** adler32 of every byte of the file. */
  checksum: number;
}

/** Writes one stream into the target, several writes in flight, and checks its structure to the last byte. */
export async function applyStream(link: { path: string; meta?: StreamMetadata }, target: Endpoint, options: ApplyOptions): Promise<AppliedStream> {
  const reader = await StreamReader.open(link.path, { checksum: true });
  if (link.meta && !sameStream(link.meta, reader.meta)) {
    await reader.close();
    throw new Error(`${link.path} is no longer the file this restore planned with (its metadata changed since): the set was written meanwhile`);
  }
  const diskEnd = Math.min(options.diskSize ?? reader.meta.virtualSize, reader.meta.virtualSize);
  const window = new WorkWindow(WRITE_WINDOW);
  const zero = (offset: number, length: number): Promise<void> => {
    const end = Math.min(offset + length, diskEnd);
    return end > offset ? window.add(target.zero(offset, end - offset, true), 0) : Promise.resolve();
  };
  let covered = 0;
  try {
    for await (const record of reader.records()) {
      if (options.signal?.aborted) throw options.signal.reason ?? new Error('aborted');
      if (options.zeroUncovered && record.offset > covered) await zero(covered, record.offset - covered);
      covered = record.offset + record.length;
      if (record.kind === 'zero') {
        if (!options.targetIsZero) await zero(record.offset, record.length);
      } else {
        const { offset, length } = record;
        const kept = Math.max(0, Math.min(length, diskEnd - offset));
        const written = record.data.then((data) => (kept > 0 ? target.write(kept < length ? data.subarray(0, kept) : data, offset) : undefined)).finally(() => record.release());
        await window.add(written.then(() => options.progress?.(length)), length);
      }
    }
    if (options.zeroUncovered && diskEnd > covered) await zero(covered, diskEnd - covered);
    await window.drain();
    return { meta: reader.meta, checksum: reader.checksum as number };
  } finally {
    await window.settle();
    await reader.close();
  }
}

/** Whether two metadata describe the same stream: a file the plan read, and the one opened under its name later. */
function sameStream(a: StreamMetadata, b: StreamMetadata): boolean {
  return a.date === b.date && a.checkpointName === b.checkpointName && a.parentCheckpoint === b.parentCheckpoint && a.dataSize === b.dataSize
    && a.virtualSize === b.virtualSize && a.checkpointIdentity === b.checkpointIdentity;
}

/**
 * Where the chain of `disk` went when a backup into the set moved it aside (chain.<secs>/, a full that starts a new
 * chain) while this restore read it: the file `err` names is gone or another one, and that directory holds the one
 * planned with. Its restore failed for a damaged file, where nothing was.
 */
async function chainMovedAside(disk: DiskPlan, err: unknown): Promise<string | undefined> {
  if (disk.source.kind !== 'stream') return undefined;
  const text = oneLine(err);
  const link = disk.source.chain.find((l) => text.includes(l.path));
  if (!link) return undefined;
  const archive = await archivedChainHolding(path.dirname(link.path), path.basename(link.path));
  const there = archive && (await StreamReader.metadata(path.join(archive, path.basename(link.path))).catch(() => undefined));
  return there && sameStream(there, link.meta) ? archive : undefined;
}

/** One entry of `-o dump`: a stream's metadata, or the size of a raw image (`-t raw`), which has none. */
export type DumpEntry = ({ file: string } & StreamMetadata) | { file: string; rawImage: true; size: number };

/**
 * The metadata of the set's data files in name order, of `disk` alone where given (by the file name's disk, as
 * restore reads it); with `sequence` (-s), of those files alone in the order given, as Python dumps them.
 */
export async function dump(input: string, disk?: string, sequence?: string[]): Promise<DumpEntry[]> {
  const listing = await listSet(path.resolve(input));
  let files = listing.dataFiles.filter(ofDisk(disk));
  const partial = partialsOf(listing, disk)[0];
  if (listing.dataFiles.length === 0 && partial !== undefined) {
    throw new UserError(`${input} holds no finished data file yet, only ${partial} (${(await partialCause(listing.dir, 'dump')).text})`);
  }
  if (sequence) {
    // Files to look at, not a chain to apply: a gap or another disk's file is no error here (restore -s checks those).
    const byName = new Map(listing.dataFiles.map((f) => [f.file, f]));
    const named = (await sequenceInSet(sequence, listing.dir)).map((name) => {
      const found = byName.get(name);
      if (!found) throw new UserError(`${name} in --sequence is not a data file of the set ${input}; list the set with -o dump`);
      return found;
    });
    files = named.filter(ofDisk(disk));
    if (files.length === 0) throw new UserError(`-d ${disk} and --sequence of disk ${[...new Set(named.map((f) => f.disk))].join(' and ')} contradict each other: give one of them`);
  }
  if (files.length === 0) throw noDataFiles(input, disk);
  const out: DumpEntry[] = [];
  for (const f of files) {
    const file = path.join(listing.dir, f.file);
    if (!(await isStreamFile(file).catch(() => true))) {
      out.push({ file: f.file, rawImage: true, size: (await fs.stat(file)).size });
      continue;
    }
    const meta = await StreamReader.metadata(file).catch((err: Error) => {
      throw new UserError(err.message);
    });
    out.push({ file: f.file, ...meta });
  }
  return out;
}
