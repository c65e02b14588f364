// Logging for the commands: level-filtered lines to stderr (never stdout, which may carry a zip; above the progress
// bars while they are drawn, as the commands' own console lines) and optionally to a log file in the backup set and
// to syslog; counts warnings for --strict.
import fs from 'node:fs';
import { SyslogSink } from './syslog.js';
import { describeFailure } from './errors.js';

export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 0, info: 1, warn: 2, error: 3 };
const COLOR: Record<Level, string> = { debug: '\x1b[2m', info: '', warn: '\x1b[33m', error: '\x1b[31m' };

export interface LoggerOptions {
  verbose?: boolean;
  quiet?: boolean;
  color?: boolean;
}

export class Logger {
  warnings = 0;
  errors = 0;
  private file: fs.WriteStream | undefined;
  private syslog: SyslogSink | undefined;
  private readonly threshold: number;
  private readonly color: boolean;

  constructor(private readonly options: LoggerOptions = {}) {
    this.threshold = ORDER[options.verbose ? 'debug' : options.quiet ? 'warn' : 'info'];
    this.color = options.color ?? Boolean(process.stderr.isTTY);
  }

  /** Also write every line (all levels, no colour) to `path`; the file is appended to. */
  attachFile(path: string): void {
    const file = fs.createWriteStream(path, { flags: 'a' });
    this.file = file;
    file.on('error', (err) => {
      if (this.file === file) this.file = undefined;
      this.warn(`cannot write the log file ${path}: ${describeFailure(err)}; the log goes on the console only`);
    });
  }

  async detachFile(): Promise<void> {
    const file = this.file;
    this.file = undefined;
    if (file) await new Promise<void>((resolve) => file.end(resolve));
  }

  /** Also send every line to syslog (through `logger`); a syslog that cannot be reached is one warning. */
  attachSyslog(tag: string, socket?: string): void {
    this.syslog = new SyslogSink(tag, socket, (problem) => this.warn(`syslog: ${problem}`));
  }

  /** Waits until syslog has taken every line sent so far. */
  async detachSyslog(): Promise<void> {
    const syslog = this.syslog;
    this.syslog = undefined;
    await syslog?.close();
  }

  /** A line for syslog alone: what the command itself reports on the console, such as the error it exits with. */
  toSyslog(level: Level, msg: string): void {
    this.syslog?.send(level, printable(msg));
  }

  /** A line for the log file alone: what the command itself reports on the console, such as the error it exits with. */
  toFile(level: Level, msg: string): void {
    this.file?.write(`${new Date().toISOString()} ${level.toUpperCase()} ${printable(msg)}\n`);
  }

  /** A text of several lines (XML, a hexdump), a log line each; single messages have their newlines escaped. */
  block(level: 'debug' | 'info', text: string): void {
    for (const line of text.replace(/\n$/, '').split('\n')) this.log(level, line);
  }

  debug(msg: string): void { this.log('debug', msg); }
  info(msg: string): void { this.log('info', msg); }
  warn(msg: string): void { this.warnings++; this.log('warn', msg); }
  error(msg: string): void { this.errors++; this.log('error', msg); }

  private log(level: Level, raw: string): void {
    this.toFile(level, raw);
    const msg = printable(raw);
    if (ORDER[level] < this.threshold) return;
    this.syslog?.send(level, msg);
    const prefix = level === 'info' || level === 'debug' ? '' : `${level === 'warn' ? 'warning' : 'error'}: `;
    const line = `${prefix}${msg}`;
    const out = this.color && COLOR[level] ? `${COLOR[level]}${line}\x1b[0m\n` : `${line}\n`;
    writeConsole(out);
  }
}

/** Where the console's lines go instead of stderr: above the progress bars while they are drawn. */
let consoleDiversion: ((line: string) => void) | undefined;

/** The console's lines (the loggers' and the command's own) go to `write` (each ends with a newline) from now. */
export function divertConsole(write: (line: string) => void): void {
  consoleDiversion = write;
}

/** The console's lines go to stderr again, unless another diversion than `write` has replaced it since. */
export function endDiversion(write: (line: string) => void): void {
  if (consoleDiversion === write) consoleDiversion = undefined;
}

/** Whether the console's lines go elsewhere than stderr now. */
export function consoleDiverted(): boolean {
  return consoleDiversion !== undefined;
}

/** Writes a line (ending with a newline) to the console: stderr, or where divertConsole sends it. */
export function writeConsole(line: string): void {
  if (consoleDiversion) consoleDiversion(line);
  else process.stderr.write(line);
}

/** `msg` with control characters escaped (`\\n`, `\\u001b`): a name holding a newline keeps its message on one line. */
export function printable(msg: string): string {
  return msg.replace(/[\x00-\x08\x0a-\x1f\x7f]/g, (c) => JSON.stringify(c).slice(1, -1));
}

/** A logger that drops everything: the default for library callers that pass none. */
export const silentLogger = new Logger({ quiet: true, color: false });
