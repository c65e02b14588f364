// Ends a backup job whose run dies without ending it (kill -9, a crash, the OOM killer, a second Ctrl-C): left
// running, such a job would keep guest writes' old data in its scratch files until someone ran -k, filling them.
// A small shell, in a session of its own so that no terminal signal reaches it, reads a pipe from the run: "armed"
// once the job has begun, then "done" when the run has ended the job itself; the pipe's end after "armed" without
// "done" means the run died, and the shell then ends the job with `virsh domjobabort` and removes its socket. It is
// spawned while libvirt begins the job (a spawn holds the event loop 8 to 15 ms, which then delays nothing), and
// armed the moment the job runs. Guarantees: a run that ends its job itself (whether it succeeded or failed), or
// dies before its job began, leaves the domain's jobs alone; one sh process per run, no cost on the copy's path; a
// login given to the run is the guard's too, and on disk only while the guard runs.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { LibvirtLogin } from '../libvirt/connection.js';
import { shellQuote } from '../libvirt/domainHost.js';

/** A tmpfs every Linux system mounts, where the guard's auth.conf stays off the disks. */
const SHARED_MEMORY = '/dev/shm';

export interface JobGuard {
  /** The job has begun: from now on, the run's death ends it. */
  arm(): void;
  /** The run has ended the job, or never began it: the guard exits and does nothing. */
  release(): Promise<void>;
}

/**
 * The job's guard. With the run's `login` (--user/--password), which virsh takes on no command line, the guard's
 * virsh reads it from an auth.conf of its own in a directory only this user can enter, removed as the guard exits.
 */
export function guardJob(uri: string, domain: string, socket: string | undefined, login?: LibvirtLogin): JobGuard {
  const authDir = login ? writeAuthFile(login) : undefined;
  const auth = authDir ? `LIBVIRT_AUTH_FILE=${shellQuote(path.join(authDir, 'auth.conf'))} ` : '';
  const end = `${auth}virsh -q -c ${shellQuote(uri)} domjobabort ${shellQuote(domain)}${socket ? `; rm -f ${shellQuote(socket)}` : ''}`;
  const forget = authDir ? `; rm -rf ${shellQuote(authDir)}` : '';
  const script = `trap '' INT HUP TERM QUIT; read -r word; if [ "$word" = armed ]; then read -r word; [ "$word" = done ] || { ${end}; } >/dev/null 2>&1; fi${forget}`;
  const child = spawn('sh', ['-c', script], { detached: true, stdio: ['pipe', 'ignore', 'ignore'] });
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => resolve()); // no sh: nothing to guard with
  });
  child.stdin.on('error', () => undefined);
  // Neither the guard nor its pipe keeps the run's event loop alive while the run works...
  const pipe = child.stdin as unknown as { ref(): void; unref(): void };
  child.unref();
  pipe.unref();
  return {
    arm: () => {
      child.stdin.write('armed\n');
    },
    release: () => {
      // ...but its exit does once the run waits for it.
      child.ref();
      pipe.ref();
      child.stdin.end('done\n');
      // The guard removes its auth.conf; so does the run, where the guard never started.
      return exited.then(() => { if (authDir) fs.rmSync(authDir, { recursive: true, force: true }); });
    },
  };
}

/**
 * A libvirt auth.conf with `login` for any host, in a new directory of mode 0700; undefined where a line break would
 * garble it. In memory (/dev/shm) unless TMPDIR says where: a password should not reach a disk.
 */
function writeAuthFile(login: LibvirtLogin): string | undefined {
  if (/[\r\n]/.test(login.user + login.password)) return undefined;
  const base = process.env.TMPDIR || !fs.existsSync(SHARED_MEMORY) ? os.tmpdir() : SHARED_MEMORY;
  const dir = fs.mkdtempSync(path.join(base, 'virtnbd-guard-'));
  const conf = `[credentials-virtnbd]\nauthname=${login.user}\npassword=${login.password}\n\n[auth-libvirt-default]\ncredentials=virtnbd\n`;
  fs.writeFileSync(path.join(dir, 'auth.conf'), conf, { mode: 0o600 });
  return dir;
}
