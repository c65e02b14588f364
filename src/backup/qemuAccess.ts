// Checks, before a backup job starts, that the domain's QEMU may create its files where the run points it: the job's
// NBD socket (-f) and its scratch files (--scratchdir). QEMU creates both as its own user (libvirt-qemu on Debian),
// and a full backup removes the old chain's checkpoints (an inc that falls back to a full moves the chain aside)
// before the job starts: a job refused then left the earlier set unable to go on.
//   QEMU's user: /proc/<pid>/status of the domain's QEMU (uid, gid, supplementary groups), else the DAC label
//   libvirt gave it (live XML), else qemu.conf's user/group
//   -> each directory: every directory on its path searchable (x), itself writable and searchable (w+x), judged
//      by owner, group and mode as the kernel does (no process spawned); a refusal is then put to the kernel itself
//      as root (access(2) run as that user), which counts ACLs
// Guarantees: refuses only what QEMU's user may not do by the mode bits and, as root, by the kernel (not root, a
// directory whose ACL may allow it is let through: the job's start then says what QEMU met); says which directory,
// which user and what to do, in one line. Looks at this host only: a remote domain's host (qemu+ssh) is not
// checked, and a refusal there is still translated when the job's start fails (backupJob.ts). AppArmor and SELinux
// are not looked at (the same translation covers them).
import fs from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { UserError } from '../util/errors.js';
import { run } from '../util/process.js';
import type { Logger } from '../util/log.js';

/** Who QEMU runs as. */
export interface QemuUser {
  uid: number;
  gid: number;
  /** Supplementary groups. */
  groups: number[];
  /** Where this was read (for the debug line). */
  source: string;
}

/** The owner and mode of one directory on the path. */
export interface DirectoryStat {
  path: string;
  uid: number;
  gid: number;
  mode: number;
}

const SEARCH = 1;
const WRITE = 2;

/** Whether `who` has every bit of `want` (rwx as 4/2/1) on `st`: the owner's class, else the group's, else others'. */
export function modeAllows(st: DirectoryStat, who: QemuUser, want: number): boolean {
  if (who.uid === 0) return true;
  const bits = st.uid === who.uid ? st.mode >> 6 : who.gid === st.gid || who.groups.includes(st.gid) ? st.mode >> 3 : st.mode;
  return (bits & want) === want;
}

/** The first directory of `chain` (root first, the target last) that refuses `who`, with what it lacks. */
export function firstRefusal(chain: DirectoryStat[], who: QemuUser): { dir: DirectoryStat; lacks: 'search' | 'write' } | undefined {
  for (const [index, dir] of chain.entries()) {
    const last = index === chain.length - 1;
    if (last && !modeAllows(dir, who, WRITE | SEARCH)) return { dir, lacks: 'write' };
    if (!modeAllows(dir, who, SEARCH)) return { dir, lacks: 'search' };
  }
  return undefined;
}

/** Every directory from / down to `dir`, as given and as resolved (a symbolic link's target's parents are walked too). */
async function directoryChain(dir: string): Promise<DirectoryStat[]> {
  const real = await fs.realpath(dir).catch(() => dir);
  const seen = new Set<string>();
  const chain: DirectoryStat[] = [];
  for (const target of [dir, real]) {
    const parts: string[] = [];
    for (let p = target; ; p = path.dirname(p)) {
      parts.unshift(p);
      if (path.dirname(p) === p) break;
    }
    for (const p of parts) {
      if (seen.has(p)) continue;
      seen.add(p);
      // A link on the path as given is judged at its target, which the resolved walk reaches.
      const st = await fs.stat(p).catch(() => undefined);
      if (st) chain.push({ path: p, uid: st.uid, gid: st.gid, mode: st.mode & 0o7777 });
    }
  }
  // The resolved target last: it is the one that needs write.
  const lastIndex = chain.findIndex((d) => d.path === real);
  if (lastIndex >= 0) chain.push(...chain.splice(lastIndex, 1));
  return chain;
}

/** The numeric fields of `line` in /proc/<pid>/status (Uid:, Gid:, Groups:). */
function statusField(status: string, field: string): number[] {
  const line = new RegExp(`^${field}:\\s*(.*)$`, 'm').exec(status)?.[1] ?? '';
  return line.trim().split(/\s+/).filter(Boolean).map(Number);
}

/** /etc/passwd or /etc/group as rows of fields; empty when it cannot be read. */
function readTable(file: string): string[][] {
  try {
    return readFileSync(file, 'utf8').split('\n').filter((l) => l && !l.startsWith('#')).map((l) => l.split(':'));
  } catch {
    return [];
  }
}

/** A user's name or uid (`+N` or `N` numeric) as uid and primary gid, from /etc/passwd. */
function lookUpUser(name: string): { uid: number; gid: number; name: string } | undefined {
  const numeric = /^\+?(\d+)$/.exec(name)?.[1];
  const row = readTable('/etc/passwd').find((r) => (numeric !== undefined ? r[2] === numeric : r[0] === name));
  if (row) return { name: row[0] as string, uid: Number(row[2]), gid: Number(row[3]) };
  return numeric !== undefined ? { name: numeric, uid: Number(numeric), gid: Number.NaN } : undefined;
}

function lookUpGroup(name: string): number | undefined {
  const numeric = /^\+?(\d+)$/.exec(name)?.[1];
  if (numeric !== undefined) return Number(numeric);
  const row = readTable('/etc/group').find((r) => r[0] === name);
  return row ? Number(row[2]) : undefined;
}

/** The groups /etc/group lists `user` in (as libvirt gives QEMU: initgroups of the user), and its primary group. */
function groupsOf(user: string, gid: number): number[] {
  const listed = readTable('/etc/group').filter((r) => (r[3] ?? '').split(',').includes(user)).map((r) => Number(r[2]));
  return [...new Set([gid, ...listed].filter((g) => Number.isInteger(g)))];
}

/** The user's name for messages, else its uid. */
export function userName(uid: number): string {
  return readTable('/etc/passwd').find((r) => r[2] === String(uid))?.[0] ?? `uid ${uid}`;
}

function groupName(gid: number): string {
  return readTable('/etc/group').find((r) => r[2] === String(gid))?.[0] ?? String(gid);
}

/** The running QEMU of `domain` as libvirt's system instance records it (pid file), checked against its command line. */
async function fromProcess(domain: string): Promise<QemuUser | undefined> {
  const pidFile = `/run/libvirt/qemu/${domain}.pid`;
  const pid = Number((await fs.readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  if (!cmdline.split('\0').some((arg) => arg === `guest=${domain}` || arg.startsWith(`guest=${domain},`))) return undefined;
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8').catch(() => '');
  const [uid] = statusField(status, 'Uid');
  const [gid] = statusField(status, 'Gid');
  if (uid === undefined || gid === undefined) return undefined;
  return { uid, gid, groups: statusField(status, 'Groups'), source: `/proc/${pid}/status` };
}

/** The DAC label libvirt gave the running domain's QEMU (`<seclabel model='dac'><label>+uid:+gid</label>`). */
export function fromSeclabel(liveXml: string): QemuUser | undefined {
  const label = /<seclabel\b[^>]*model=['"]dac['"][^>]*>\s*<label>([^<:]+):([^<]+)<\/label>/.exec(liveXml);
  if (!label) return undefined;
  const user = lookUpUser(label[1] as string);
  const gid = lookUpGroup(label[2] as string);
  if (!user || gid === undefined) return undefined;
  return { uid: user.uid, gid, groups: groupsOf(user.name, gid), source: 'the domain\'s DAC label' };
}

/** qemu.conf's user and group; unset, Debian's built-in default (libvirt-qemu), where that user exists. */
export function fromQemuConf(conf: string): QemuUser | undefined {
  const setting = (key: string): string | undefined => new RegExp(`^\\s*${key}\\s*=\\s*"([^"]*)"`, 'm').exec(conf)?.[1];
  const user = lookUpUser(setting('user') ?? 'libvirt-qemu');
  if (!user) return undefined;
  const gid = setting('group') !== undefined ? lookUpGroup(setting('group') as string) : user.gid;
  if (gid === undefined || Number.isNaN(gid)) return undefined;
  return { uid: user.uid, gid, groups: groupsOf(user.name, gid), source: 'qemu.conf' };
}

/** Who the running domain's QEMU on this host runs as; undefined when nothing tells. */
export async function qemuUserOf(domain: string, liveXml: string, uri: string): Promise<QemuUser | undefined> {
  // A session instance's QEMU runs as whoever runs it, as this run does.
  if (/^qemu(\+unix)?:\/\/\/session/.test(uri)) {
    return { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, groups: process.getgroups?.() ?? [], source: 'the session instance' };
  }
  return (await fromProcess(domain)) ?? fromSeclabel(liveXml) ?? fromQemuConf(await fs.readFile('/etc/libvirt/qemu.conf', 'utf8').catch(() => ''));
}

/** The kernel's answer, as root: access(2) run as `who` (ACLs counted). Undefined where it cannot be asked. */
async function kernelAllows(dir: string, who: QemuUser): Promise<boolean | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  const groups = who.groups.length > 0 ? ['--groups', who.groups.join(',')] : ['--clear-groups'];
  return run('setpriv', ['--reuid', String(who.uid), '--regid', String(who.gid), ...groups, '--', 'test', '-w', dir, '-a', '-x', dir]).then(() => true, (err: unknown) => {
    if (/failed: exited with code 1$/.test((err as Error).message)) return false;
    return undefined;
  });
}

/** Whether `dir` carries an ACL (ls marks its mode with '+'), which the mode bits alone do not judge. */
async function hasAcl(dir: string): Promise<boolean> {
  const { stdout } = await run('ls', ['-ld', '--', dir]).catch(() => ({ stdout: '' }));
  return /^\S{10}\+/.test(stdout);
}

function describeUser(who: QemuUser): string {
  const groups = [...new Set([who.gid, ...who.groups])].map(groupName).join(', ');
  return `${userName(who.uid)} (groups ${groups})`;
}

/**
 * Refuses when QEMU, running as `who`, may not create files in `dir`. `what` names it (`the scratch directory
 * (--scratchdir)`), `remedy` says what to give instead.
 */
export async function checkQemuMayWrite(dir: string, who: QemuUser, what: string, remedy: string, log: Logger): Promise<void> {
  if (who.uid === 0) return;
  const refusal = firstRefusal(await directoryChain(dir), who);
  if (!refusal) return;
  // An ACL may allow what the mode bits refuse: as root, the kernel's own answer; else a directory with one is let through.
  const kernel = await kernelAllows(dir, who);
  if (kernel === true) return;
  if (kernel === undefined && (await hasAcl(refusal.dir.path))) {
    log.debug(`${refusal.dir.path} has an ACL: not judged by its mode whether QEMU's user, ${describeUser(who)}, may use ${dir}`);
    return;
  }
  const { dir: at, lacks } = refusal;
  const mode = `owner ${userName(at.uid)}, group ${groupName(at.gid)}, mode ${at.mode.toString(8).padStart(4, '0')}`;
  const where = lacks === 'write' ? `${dir} (${mode})` : `${dir}: it may not enter ${at.path} (${mode})`;
  const allow = lacks === 'write' ? 'let that user write there' : `let that user enter ${at.path}`;
  throw new UserError(`QEMU runs as ${describeUser(who)}, which may not create files in ${what} ${where}; ${remedy}, or ${allow}`);
}
