// Ends a backup job whose run dies without ending it (kill -9, a crash, the OOM killer, a second Ctrl-C): left
// running, such a job would keep guest writes' old data in its scratch files until someone ran -k, filling them.
// A small shell, in a session of its own so that no terminal signal reaches it, reads a pipe from the run: "begin
// <marker>" before the run asks libvirt for its job (the marker: a string only that job's definition holds, in its
// scratch file names), "done" once the run has ended the job itself. The pipe's end without "done" means the run
// died, before its job began, while libvirt began it, or after: the shell then resumes and thaws a guest the run
// had paused (--pause) or frozen ("paused 1", "frozen 1"; an empty word when it let it go), waits for the domain's
// backup job and ends it (`virsh domjobabort`) only if its definition holds the marker, and removes the run's
// socket unless another run's job serves on it now. Guarantees: a run
// that ends its job itself (whether it succeeded or failed) leaves the domain's jobs alone, and so does one that
// dies while another tool's job runs (or a migration, which domjobabort would end too); one sh process per run,
// spawned before the job is asked for, no cost on the copy's path; a login given to the run is the guard's too, held
// in an unlinked file only the guard has open: no name on any file system once the guard has started, and nothing
// left behind however the guard ends (kill -9 included).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { LibvirtLogin } from '../libvirt/connection.js';
import { shellQuote } from '../util/process.js';

/** A tmpfs every Linux system mounts, where the guard's auth.conf stays off the disks. */
const SHARED_MEMORY = '/dev/shm';

export interface JobGuard {
  /** The run is about to ask libvirt for the job whose definition holds `jobMarker` (again, on a retry). */
  beginning(jobMarker: string): void;
  /** The run suspended the guest (--pause) or froze its filesystems, or undid that: a guard whose run dies undoes it. */
  guestHeld(hold: 'paused' | 'frozen', held: boolean): void;
  /** The run has ended the job, or never began it: the guard exits and does nothing. Only the first call counts. */
  release(): Promise<void>;
}

/** The guard's descriptor for its auth.conf: virsh opens it again as /dev/fd/3 (libvirt reads no pipe there). */
const AUTH_FD = 3;

/** How long a guard whose run died while libvirt began the job waits for that job: 60 looks, a quarter second apart. */
const BEGIN_LOOKS = 60;

/**
 * The guard of the run's jobs. With the run's `login` (--user/--password), which virsh takes on no command line, the
 * guard's virsh reads it from an auth.conf the guard holds open as descriptor 3, whose name is removed once the
 * guard has it.
 */
export function guardJob(uri: string, domain: string, socket: string | undefined, login?: LibvirtLogin): JobGuard {
  const authFd = login ? openAuthFile(login) : undefined;
  const virsh = `${authFd === undefined ? '' : `LIBVIRT_AUTH_FILE=/dev/fd/${AUTH_FD} `}virsh -q -c ${shellQuote(uri)}`;
  const end = `${virsh} domjobabort ${shellQuote(domain)} >/dev/null 2>&1`;
  // The first backup job definition libvirt shows decides: this run's job (its marker) is ended, another's (another
  // tool's, or a migration's, which domjobabort would end too) is left alone. Died while the job began, the guard
  // waits for libvirt to show one.
  const endOurs = `i=0; while [ $i -lt ${BEGIN_LOOKS} ]; do if xml=$(${virsh} backup-dumpxml ${shellQuote(domain)} 2>/dev/null); then ` +
    `case "$xml" in *"$marker"*) ${end} ;; esac; break; fi; sleep 0.25; i=$((i+1)); done`;
  // A guest the run held is let go first (resumed, then thawed: a paused guest's agent does not answer), the job then
  // ended, and the socket removed whether the job was found or not (a domain -S started goes with the run).
  const letGo = `[ -z "$paused" ] || ${virsh} resume ${shellQuote(domain)} >/dev/null 2>&1; ` +
    `[ -z "$frozen" ] || ${virsh} domfsthaw ${shellQuote(domain)} >/dev/null 2>&1`;
  const script = `trap '' INT HUP TERM QUIT; marker=; paused=; frozen=; while read -r word arg; do case "$word" in ` +
    `"begin") marker=$arg ;; "paused") paused=$arg ;; "frozen") frozen=$arg ;; "done") exit 0 ;; esac; done; ${letGo}; ` +
    `[ -z "$marker" ] || { ${endOurs}; }${socket ? `; ${removeSocket(virsh, domain, socket)}` : ''}`;
  const stdio: Array<'pipe' | 'ignore' | number> = ['pipe', 'ignore', 'ignore'];
  if (authFd !== undefined) stdio[AUTH_FD] = authFd;
  let child: ReturnType<typeof spawn>;
  try {
    child = spawn('sh', ['-c', script], { detached: true, stdio });
  } finally {
    // The guard has its own copy now (or none: no sh); the run keeps no handle on the login.
    if (authFd !== undefined) fs.closeSync(authFd);
  }
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => resolve()); // no sh: nothing to guard with
  });
  const input = child.stdin!;
  input.on('error', () => undefined);
  // Neither the guard nor its pipe keeps the run's event loop alive while the run works...
  const pipe = input as unknown as { ref(): void; unref(): void };
  child.unref();
  pipe.unref();
  return {
    beginning: (jobMarker) => {
      input.write(`begin ${jobMarker}\n`);
    },
    guestHeld: (hold, held) => {
      input.write(`${hold} ${held ? '1' : ''}\n`);
    },
    release: () => {
      // ...but its exit does once the run waits for it.
      if (!input.writableEnded) {
        child.ref();
        pipe.ref();
        input.end('done\n');
      }
      return exited;
    },
  };
}

/**
 * Removes the run's socket unless the domain's backup job now is another run's and serves on it: a run with the same
 * -f, started while this guard waited up to 15 s for its own job, would lose its export. A job holding this run's
 * marker, or none, leaves the socket to be removed.
 */
function removeSocket(virsh: string, domain: string, socket: string): string {
  const quoted = shellQuote(socket);
  return `keep=; if xml=$(${virsh} backup-dumpxml ${shellQuote(domain)} 2>/dev/null); then case "$xml" in *${quoted}*) keep=1 ;; esac; ` +
    `[ -z "$marker" ] || case "$xml" in *"$marker"*) keep= ;; esac; fi; [ -n "$keep" ] || rm -f ${quoted}`;
}

/**
 * A libvirt auth.conf with `login` for any host, open for reading, its name already removed; undefined where a
 * line break would garble it. Written in a new directory of mode 0700, in memory (/dev/shm) unless TMPDIR says
 * where: a password should not reach a disk.
 */
function openAuthFile(login: LibvirtLogin): number | undefined {
  if (/[\r\n]/.test(login.user + login.password)) return undefined;
  const base = process.env.TMPDIR || !fs.existsSync(SHARED_MEMORY) ? os.tmpdir() : SHARED_MEMORY;
  const dir = fs.mkdtempSync(path.join(base, 'virtnbd-guard-'));
  try {
    const file = path.join(dir, 'auth.conf');
    const conf = `[credentials-virtnbd]\nauthname=${login.user}\npassword=${login.password}\n\n[auth-libvirt-default]\ncredentials=virtnbd\n`;
    fs.writeFileSync(file, conf, { mode: 0o600 });
    return fs.openSync(file, 'r');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
