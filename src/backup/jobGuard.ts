// Ends a backup job whose run dies without ending it (kill -9, a crash, the OOM killer, a second Ctrl-C): left
// running, such a job would keep guest writes' old data in its scratch files until someone ran -k, filling them.
// A small shell, in a session of its own so that no terminal signal reaches it, reads a pipe from the run: "armed"
// once the job has begun, then "done" when the run has ended the job itself; the pipe's end after "armed" without
// "done" means the run died, and the shell then ends the job with `virsh domjobabort` and removes its socket. It is
// spawned before the job begins, while libvirt works (a spawn holds the event loop 8 to 15 ms), and armed the moment
// the job runs. Guarantees: a run that ends its job itself (whether it succeeded or failed), or dies before its job
// began, leaves the domain's jobs alone; one sh process per run, no cost on the copy's path.
import { spawn } from 'node:child_process';
import { shellQuote } from '../libvirt/domainHost.js';

export interface JobGuard {
  /** The job has begun: from now on, the run's death ends it. */
  arm(): void;
  /** The run has ended the job, or never began it: the guard exits and does nothing. */
  release(): Promise<void>;
}

export function guardJob(uri: string, domain: string, socket: string | undefined): JobGuard {
  const end = `virsh -q -c ${shellQuote(uri)} domjobabort ${shellQuote(domain)}${socket ? `; rm -f ${shellQuote(socket)}` : ''}`;
  const script = `trap '' INT HUP TERM QUIT; read -r word; [ "$word" = armed ] || exit 0; read -r word; [ "$word" = done ] || { ${end}; } >/dev/null 2>&1`;
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
      return exited;
    },
  };
}
