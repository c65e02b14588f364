// Log lines to syslog through one long-running `logger` process (util-linux), each line with its priority,
// so no native socket code is needed. Guarantees: never throws into the caller; a syslog that cannot be
// reached (no /dev/log, no `logger`) is reported once through `onProblem` and later lines are dropped.
import { spawn, type ChildProcess } from 'node:child_process';

/** Severity of each logger level (RFC 5424), facility user (1). */
const SEVERITY = { debug: 7, info: 6, warn: 4, error: 3 } as const;
const FACILITY_USER = 1;

export class SyslogSink {
  private child: ChildProcess | undefined;
  private readonly exited: Promise<void>;

  constructor(tag: string, socket: string | undefined, private readonly onProblem: (problem: string) => void) {
    const args = ['--socket-errors=on', '--prio-prefix', '-t', tag, `--id=${process.pid}`];
    if (socket) args.push('--socket', socket);
    const child = spawn('logger', args, { stdio: ['pipe', 'ignore', 'pipe'], detached: true });
    this.child = child;
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.stdin?.on('error', () => undefined); // reported through 'exit'
    this.exited = new Promise((resolve) => {
      const fail = (problem: string): void => {
        if (this.child === undefined) return resolve();
        this.child = undefined;
        this.onProblem(problem);
        resolve();
      };
      child.on('error', (err) => fail(`cannot run logger: ${err.message}`));
      child.on('close', (code) => {
        if (code === 0) {
          this.child = undefined;
          resolve();
        } else {
          fail(`${stderr.trim().split('\n').pop() || `logger exited with ${code}`}; log lines go to stderr and the log file only`);
        }
      });
    });
  }

  send(level: keyof typeof SEVERITY, message: string): void {
    const priority = FACILITY_USER * 8 + SEVERITY[level];
    const lines = message.split('\n').filter((l) => l.length > 0).map((l) => `<${priority}>${l}\n`);
    this.child?.stdin?.write(lines.join(''));
  }

  async close(): Promise<void> {
    this.child?.stdin?.end();
    await this.exited;
  }
}
