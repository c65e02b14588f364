// What the three commands share: logging setup, progress bars on stderr, SIGINT/SIGTERM/SIGHUP as an abort signal
// (SIGHUP not under nohup), and the one rule for ending: a UserError prints one line and exits with its code;
// anything else is a bug.
import type { Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { Logger, consoleDiverted, divertConsole, endDiversion, printable, writeConsole } from '../util/log.js';
import { UserError, describeFailure, oneLine } from '../util/errors.js';
import type { LibvirtLogin } from '../libvirt/connection.js';
import { OUTLIVES_TERMINAL } from '../util/process.js';
import { DEFAULT_NBD_TIMEOUT } from '../endpoint/nbd.js';
import { importLazily } from '../util/lazyImport.js';
import { loadedNative } from '../native/addon.js';

export const VERSION = '2.0.0-ts';

export interface CommonFlags {
  verbose?: boolean;
  noprogress?: boolean;
  nocolor?: boolean;
  quiet?: boolean;
}

/**
 * Parses a command's flags strictly. Wrong flags get one line naming the problem and where help is, and exit 2
 * (argparse's usage error code, which virtnbdbackup's users script against), in place of the whole help text.
 */
export interface FlagExceptions {
  /** Flags (any one of each flag's names) whose empty value means something. */
  emptyAllowed?: string[];
  /** Flags that may stand without a value (virtnbdbackup's -z alone: level 2). */
  valueOptional?: string[];
  /** Flags required unless another is given (virtnbdbackup's -o, which -k needs not): flag -> the other flag. */
  requiredUnless?: Record<string, string>;
  /**
   * Long flags Python's command (Debian's 1.9.15) has not: an abbreviation that also names one of its flags means
   * that one, as it does there (`--no` is --noprogress, though --nocolor begins so too).
   */
  extensions?: string[];
}

/**
 * The working directory for yargs, which reads it as it starts: '/' where the directory was removed under the shell,
 * which crashed every command with a stack trace; a run with absolute paths then works, as Python's does.
 */
export function flagsCwd(): string {
  try {
    return process.cwd();
  } catch {
    return '/';
  }
}

/** A wrong command line: one line naming the problem and where help is, exit 2 (argparse's usage error code). */
export function usageError(name: string, what: string): never {
  process.stderr.write(`${name}: error: ${what.replace(/\s*\n\s*/g, ' ').trim()}; see ${name} --help\n`);
  process.exit(2);
}

export function parseFlags<T>(name: string, flags: Argv<T>, options: FlagExceptions = {}): ReturnType<Argv<T>['parseSync']> {
  // getOptions() is yargs' own, missing from its types; its lists hold every name of each flag, its alias map the rest.
  const kinds = (flags as unknown as { getOptions(): YargsOptions }).getOptions();
  const withAliases = (names: string[] | undefined): Set<string> => new Set((names ?? []).flatMap((flag) => [flag, ...(kinds.alias[flag] ?? [])]));
  const optional = withAliases(options.valueOptional);
  try {
    const longNames = Object.keys(kinds.key).flatMap((key) => [key, ...(kinds.alias[key] ?? [])]).filter((n) => n.length > 1 && !/[A-Z]/.test(n));
    const longValued = new Set(longNames.filter((n) => !kinds.boolean.includes(n) && !optional.has(n)));
    const switches = new Set(longNames.filter((n) => kinds.boolean.includes(n)));
    givenArgs = splitShortValues(expandLongPrefixes(hideBin(process.argv), new Set(longNames), longValued, switches, new Set(options.extensions)), { ...shortFlags(kinds), optional });
  } catch (err) {
    usageError(name, (err as Error).message);
  }
  const wrong = firstWrongFlag(givenArgs, kinds, optional);
  if (wrong) usageError(name, wrong);
  // A flag that takes a value must get one (`-o` last, `-o -l full` must not mean "no -o"; `-l` last, a level).
  const valued = [...kinds.string, ...kinds.number, ...Object.keys(kinds.choices)].filter((flag) => !optional.has(flag) && !(flag.length > 1 && /[A-Z]/.test(flag)));
  const argv = flags
    // A repeated flag takes its last value, as argparse does, instead of becoming a list.
    // ... and knows no --no-<flag> it was not given (yargs took --no-raw as -r off); --no-sparse-detection is a flag.
    .parserConfiguration({ 'duplicate-arguments-array': false, 'boolean-negation': false })
    .requiresArg(valued)
    .strict()
    .fail((message: string | null, err: Error | undefined) => usageError(name, asArgparseSays(withoutCamelTwins(message ?? err?.message ?? 'invalid arguments'), kinds, givenArgs, options.requiredUnless)))
    .wrap(Math.min(110, process.stdout.columns || 110))
    .parseSync(givenArgs);
  // Words after `--` are no flags, and the commands take no others: argparse refuses them, yargs let them pass.
  const extra = (argv as { _?: Array<string | number> })._ ?? [];
  if (extra.length > 0) usageError(name, `unrecognized arguments: ${extra.join(' ')}`);
  // An empty string flag (-o "$DIR") would mean the working directory, or libvirt's default URI (an empty number,
  // which yargs reads as 0, firstWrongFlag refused).
  const allowed = withAliases(options.emptyAllowed);
  const blank = blankFlag(givenArgs, new Set(kinds.number), new Set(kinds.string.filter((flag) => !allowed.has(flag))));
  if (blank) usageError(name, `${blank.flag} takes ${blank.number ? 'a number' : 'a value'}, not an empty one`);
  const missing = missingRequired(kinds, givenArgs, options.requiredUnless);
  if (missing) usageError(name, missing);
  return argv;
}

/** yargs' "Unknown arguments: no-raw, noRaw" as argparse would say it: each unknown flag once, as given. */
export function withoutCamelTwins(message: string): string {
  const listed = /^Unknown arguments?: (.*)$/s.exec(message);
  if (!listed) return message;
  const names = (listed[1] ?? '').split(', ');
  const camel = (n: string): string => n.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
  const given = names.filter((n) => !names.some((other) => other !== n && camel(other) === n));
  return `Unknown argument${given.length > 1 ? 's' : ''}: ${given.join(', ')}`;
}

/** What yargs' getOptions() tells of the flags (it is missing from its types). */
interface YargsOptions {
  number: string[];
  string: string[];
  boolean: string[];
  alias: Record<string, string[]>;
  key: Record<string, boolean>;
  choices: Record<string, unknown[]>;
  demandedOptions: Record<string, unknown>;
}

/** What the argparse checks below read of yargs' getOptions(): each flag's names and choices, which are required. */
export type FlagNames = Pick<YargsOptions, 'alias' | 'key' | 'demandedOptions' | 'choices'>;

/** A flag's names as argparse prints them, its letter first: `-d/--domain`, `--tls`; camelCase twins left out. */
export function argparseNames(kinds: Pick<YargsOptions, 'alias'>, flag: string): string {
  const entry = Object.entries(kinds.alias).find(([key, aliases]) => key === flag || aliases.includes(flag));
  const names = (entry ? [entry[0], ...entry[1]] : [flag]).filter((n) => n.length === 1 || !/[A-Z]/.test(n));
  return [...names.filter((n) => n.length === 1), ...names.filter((n) => n.length > 1)].map((n) => (n.length === 1 ? `-${n}` : `--${n}`)).join('/');
}

/** Whether `args` (as parseFlags wrote them out) give `flag` under any of its names before `--`. */
function flagIn(kinds: Pick<YargsOptions, 'alias'>, args: readonly string[], flag: string): boolean {
  const names = argparseNames(kinds, flag).split('/');
  const end = args.indexOf('--');
  return args.slice(0, end < 0 ? undefined : end).some((arg) => names.some((n) => arg === n || arg.startsWith(`${n}=`)));
}

/**
 * argparse's line for the required flags `args` lack, all of them, in the order they were defined (`the following
 * arguments are required: -d/--domain, -o/--output`); undefined when none is missing. A flag of `unless` is
 * required only while the flag it names is not given.
 */
export function missingRequired(kinds: FlagNames, args: readonly string[], unless: Record<string, string> = {}): string | undefined {
  const required = new Set([...Object.keys(kinds.demandedOptions), ...Object.keys(unless)]);
  const missing = Object.keys(kinds.key).filter((flag) => required.has(flag) && !flagIn(kinds, args, flag)
    && !(unless[flag] !== undefined && flagIn(kinds, args, unless[flag] as string)));
  return missing.length > 0 ? `the following arguments are required: ${missing.map((flag) => argparseNames(kinds, flag)).join(', ')}` : undefined;
}

/**
 * The first wrong flag of `args` (as parseFlags wrote them out) as argparse reads them, left to right: a flag with
 * no value, a value none of its choices, a number flag's value that is no whole number (`10MB`, `1.5`, `1e3`, which
 * yargs read as NaN or as numbers) or empty (yargs read it as 0); undefined when there is none, or when -h/--help or
 * -V/--version comes first, which argparse then answers (yargs answered them whatever preceded them: `-o -h` exited
 * 0). argparse stops at such a flag before it names missing or unknown ones. `optional` holds the flags whose value
 * may be left out (-z).
 */
export function firstWrongFlag(args: readonly string[], kinds: FlagNames & Pick<YargsOptions, 'boolean' | 'number'>, optional: ReadonlySet<string>): string | undefined {
  const keyOf = (name: string): string | undefined => (name in kinds.key ? name : Object.entries(kinds.alias).find(([, aliases]) => aliases.includes(name))?.[0]);
  // argparse takes `-`, `-5` and anything not starting with `-` as a value.
  const isValue = (arg: string | undefined): arg is string => arg !== undefined && arg !== '--' && (!arg.startsWith('-') || arg === '-' || /^-\d+$|^-\d*\.\d+$/.test(arg));
  const end = args.indexOf('--');
  const flags = args.slice(0, end < 0 ? undefined : end);
  for (let i = 0; i < flags.length; i++) {
    const match = isValue(flags[i]) ? null : /^(--?([^=]+))(?:=(.*))?$/s.exec(flags[i] as string);
    const key = match ? keyOf(match[2] as string) : undefined;
    if (key === 'help' || key === 'version') return undefined;
    if (!match || key === undefined || kinds.boolean.includes(key)) continue;
    let value = match[3];
    if (value === undefined && isValue(flags[i + 1])) value = flags[++i];
    const names = argparseNames(kinds, key);
    const choices = kinds.choices[key]?.map(String);
    if (value === undefined) {
      if (!optional.has(key)) return `argument ${names}: expected one argument`;
    } else if (choices && !choices.includes(value)) {
      return invalidChoice(kinds, key, value, choices.map((c) => `'${c}'`).join(', '));
    } else if (kinds.number.includes(key) && value.trim() === '') {
      return `${match[1] as string} takes a number, not an empty one`;
    } else if (kinds.number.includes(key) && !/^\s*[+-]?\d+\s*$/.test(value)) {
      return `argument ${names}: invalid int value: '${value}'`;
    }
  }
  return undefined;
}

/** argparse's line for a value none of its flag's choices, `choices` as yargs lists them: `'copy', 'full'`. */
function invalidChoice(kinds: FlagNames, flag: string, value: string, choices: string): string {
  return `argument ${argparseNames(kinds, flag)}: invalid choice: '${value}' (choose from ${choices})`;
}

/**
 * A yargs failure in argparse's words, which virtnbdbackup's users know: every missing flag (also when yargs stopped
 * at an unknown one first: argparse names the missing ones first), a flag with no value, a value none of a flag's
 * choices, unknown arguments as written. Any other message as it is.
 */
export function asArgparseSays(message: string, kinds: FlagNames, args: readonly string[], unless?: Record<string, string>): string {
  if (/^(Missing required argument|Unknown argument)/.test(message)) {
    const missing = missingRequired(kinds, args, unless);
    if (missing) return missing;
  }
  const noValue = /^Not enough arguments following: (.+)$/.exec(message);
  if (noValue) return `argument ${argparseNames(kinds, noValue[1] as string)}: expected one argument`;
  const choice = /^Invalid values:\s*Argument: (.+?), Given: "(.*?)", Choices: (.+?)$/m.exec(message);
  if (choice) {
    // yargs writes the values as JSON strings.
    const unquoted = (text: string): string => {
      try {
        return String(JSON.parse(text));
      } catch {
        return text;
      }
    };
    return invalidChoice(kinds, choice[1] as string, unquoted(`"${choice[2] as string}"`), (choice[3] as string).replace(/"((?:[^"\\]|\\.)*)"/g, (quoted) => `'${unquoted(quoted)}'`));
  }
  const unknown = /^Unknown arguments?: (.*)$/s.exec(message);
  if (unknown) {
    const end = args.indexOf('--');
    const before = args.slice(0, end < 0 ? undefined : end);
    const asWritten = (n: string): string => before.find((a) => a === `--${n}` || a.startsWith(`--${n}=`) || a === `-${n}` || a.startsWith(`-${n}=`))
      ?? before.find((a) => a === n) ?? (n.length === 1 ? `-${n}` : `--${n}`);
    return `unrecognized arguments: ${(unknown[1] ?? '').split(', ').map(asWritten).join(' ')}`;
  }
  return message;
}

/** The command line as parseFlags read it, short flags split as argparse splits them. */
let givenArgs: string[] = [];

/**
 * The command line as parseFlags read it, for a log: `args` with --password's value hidden (long flags are written
 * out by then, so `--pass x` is `--password x` here).
 */
export function argumentsForLog(args: readonly string[] = givenArgs): string {
  const quoted = (arg: string): string => (/^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, "'\\''")}'`);
  return args.map((arg, i) => (args[i - 1] === '--password' ? '***' : arg.startsWith('--password=') ? '--password=***' : quoted(arg))).join(' ');
}

/** Whether any of `names` (-z, --compress) was given, with or without a value. */
export function flagGiven(...names: string[]): boolean {
  const end = givenArgs.indexOf('--');
  return givenArgs.slice(0, end < 0 ? undefined : end).some((arg) => names.some((name) => arg === name || arg.startsWith(`${name}=`)));
}

/**
 * `args` with long flags abbreviated as argparse takes them written out: `--lev inc` is `--level inc`, `--comp=2` is
 * `--compress=2`, where the prefix names one flag of `names` alone; one that could name several throws as argparse
 * refuses it (`ambiguous option: --t could match --type, --threshold, ...`). The value of a flag of `valued` written
 * apart, and everything after `--`, stay as they are. A switch of `switches` given a value (`--strict=false`) throws
 * as argparse refuses it: yargs took `--strict=false` as off and `--printonly=1` as not given. A prefix that names
 * one flag Python's has and flags of `extensions` (ours alone) is Python's flag, as there: `--no` is --noprogress,
 * not ambiguous with --nocolor, so every command line Python's takes means the same here.
 */
export function expandLongPrefixes(args: readonly string[], names: ReadonlySet<string>, valued: ReadonlySet<string>, switches: ReadonlySet<string> = new Set(), extensions: ReadonlySet<string> = new Set()): string[] {
  return rewriteFlags(args, (arg) => {
    const match = /^--([^=]+)(=.*)?$/s.exec(arg);
    if (!match) return undefined;
    const [, given = '', value = ''] = match;
    const matching = names.has(given) ? [given] : [...names].filter((n) => n.startsWith(given));
    const pythons = matching.filter((n) => !extensions.has(n));
    const candidates = matching.length > 1 && pythons.length === 1 ? pythons : matching;
    if (candidates.length > 1) throw new Error(`ambiguous option: --${given} could match ${candidates.map((n) => `--${n}`).join(', ')}`);
    const full = candidates[0] ?? given;
    if (value && switches.has(full)) throw new Error(`argument --${full}: ignored explicit argument '${value.slice(1)}'`);
    return { becomes: [`--${full}${value}`], valueNext: !value && valued.has(full) };
  });
}

/**
 * Walks `args` as argparse reads them: up to `--`, each argument that is not the value of the flag before it goes
 * to `flag`, which gives what it becomes and whether the next argument is its value (undefined: it stays as it is).
 */
function rewriteFlags(args: readonly string[], flag: (arg: string) => { becomes: string[]; valueNext: boolean } | undefined): string[] {
  const out: string[] = [];
  let valueNext = false;
  for (const [i, arg] of args.entries()) {
    if (arg === '--') return [...out, ...args.slice(i)];
    const rewritten: ReturnType<typeof flag> = valueNext ? undefined : flag(arg);
    out.push(...(rewritten?.becomes ?? [arg]));
    valueNext = rewritten?.valueNext ?? false;
  }
  return out;
}

/** The one-letter flags: those that take a value, and the switches. */
function shortFlags(kinds: YargsOptions): { valued: Set<string>; switches: Set<string> } {
  const valued = new Set<string>();
  const switches = new Set<string>();
  for (const key of Object.keys(kinds.key)) {
    const names = [key, ...(kinds.alias[key] ?? [])];
    const isSwitch = names.some((n) => kinds.boolean.includes(n));
    for (const n of names.filter((n) => n.length === 1)) (isSwitch ? switches : valued).add(n);
  }
  return { valued, switches };
}

/**
 * `args` with short flags written as argparse reads them split apart for yargs: `-lfull` is `-l=full`, `-cD` is
 * `-c -D`, `-nz5` is `-n -z=5`; `=` keeps a value as written (`-d-vm`), an empty one (`-d=`) is `-d ''`. An argument that is a flag's value,
 * or holds an unknown letter, stays as it is; after a flag whose value is `optional` (-z), the next argument is one
 * of its own. A switch given a value (`-e5`) throws, as argparse refuses it.
 */
export function splitShortValues(args: readonly string[], flags: { valued: ReadonlySet<string>; switches: ReadonlySet<string>; optional?: ReadonlySet<string> }): string[] {
  return rewriteFlags(args, (arg) => {
    if (!/^-[A-Za-z]/.test(arg)) return undefined;
    const split: string[] = [];
    for (let at = 1; at < arg.length; at++) {
      const letter = arg[at] as string;
      if (flags.switches.has(letter)) {
        split.push(`-${letter}`);
        const next = arg[at + 1];
        if (next !== undefined && !/[A-Za-z]/.test(next)) throw new Error(`${arg}: -${letter} takes no value`);
      } else if (flags.valued.has(letter)) {
        const rest = arg.slice(at + 1);
        const value = rest.replace(/^=/, '');
        // yargs reads `-d=` as d '' and a flag "=": an empty value goes as an argument of its own.
        split.push(...(!rest ? [`-${letter}`] : value ? [`-${letter}=${value}`] : [`-${letter}`, '']));
        return { becomes: split, valueNext: !rest && !flags.optional?.has(letter) };
      } else {
        return undefined;
      }
    }
    return { becomes: split, valueNext: false };
  });
}

/** A flag of `args` (up to `--`) with its value as written: after `=` (inline), else the next argument. */
interface GivenValue {
  /** The flag as written (`-T`, `--threshold`), its name (`T`, `threshold`). */
  flag: string;
  name: string;
  value: string | undefined;
  inline: boolean;
}

function* givenValues(args: readonly string[], names: ReadonlySet<string>): Generator<GivenValue> {
  for (let i = 0; i < args.length && args[i] !== '--'; i++) {
    const match = /^--?([^=]+)(=(.*))?$/s.exec(args[i] as string);
    if (!match || !names.has(match[1] as string)) continue;
    const inline = match[2] !== undefined;
    yield { flag: (args[i] as string).split('=')[0] as string, name: match[1] as string, value: inline ? match[3] : args[i + 1], inline };
  }
}

/**
 * The first number or string flag in `args` given an empty or blank value (`-T ''`, `--nbd-timeout=`, `-o ' '`),
 * named as written; nothing after `--`.
 */
export function blankFlag(args: readonly string[], numberFlags: ReadonlySet<string>, stringFlags: ReadonlySet<string>): { flag: string; number: boolean } | undefined {
  for (const given of givenValues(args, new Set([...numberFlags, ...stringFlags]))) {
    if (given.value !== undefined && given.value.trim() === '') return { flag: given.flag, number: numberFlags.has(given.name) };
  }
  return undefined;
}

/** lz4's highest level (liblz4 compresses above 12 as 12). */
const MAX_LZ4_LEVEL = 16;

/**
 * virtnbdbackup's -z as Python's takes it (`given`: the flag was there; `level`: its value, if any): alone it is
 * level 2; 0 is no compression (Python's tests the level for truth); a level above 16 is 16 and one below 0 is 1,
 * where Python hands both to liblz4, which takes them (as its highest level, and as its fast mode).
 */
export function compressLevel(given: boolean, level: number | undefined): number | false {
  if (!given) return false;
  if (level === undefined || Number.isNaN(level)) return 2;
  if (level === 0) return false;
  return Math.min(MAX_LZ4_LEVEL, Math.max(1, level));
}

/** virtnbdbackup's -w as Python's takes it: 0 or less is 1, one disk at a time. */
export function workerCount(worker: number | undefined): number | undefined {
  return worker === undefined ? undefined : Math.max(1, worker);
}

/** --nbd-timeout, for the commands that talk NBD. */
export interface NbdTimeoutFlags {
  'nbd-timeout': number;
}

/** Adds --nbd-timeout: how long NBD requests may wait for an answer before the run fails. */
export function withNbdTimeoutFlag<T>(flags: Argv<T>): Argv<T & NbdTimeoutFlags> {
  return flags
    .option('nbd-timeout', { type: 'number', default: DEFAULT_NBD_TIMEOUT, describe: 'Seconds NBD requests, the ssh of a remote host, or libvirtd may wait with no answer (a hung host, daemon, network or storage) before the run fails; 0 waits forever' })
    .check((a) => !((a as { 'nbd-timeout'?: number })['nbd-timeout']! < 0) || '--nbd-timeout takes a number of seconds, 0 or more') as Argv<T & NbdTimeoutFlags>;
}

/** virtnbdbackup's flags for a libvirt login. */
export interface LoginFlags {
  user?: string;
  password?: string;
}

/** Adds --user and --password, read by loginOf. */
export function withLoginFlags<T>(flags: Argv<T>): Argv<T & LoginFlags> {
  return flags
    .option('user', { type: 'string', describe: 'libvirt login user, for a libvirtd that asks for one (SASL, e.g. on qemu+tcp://)' })
    .option('password', { type: 'string', describe: 'Password of --user' }) as Argv<T & LoginFlags>;
}

/** The libvirt login the flags give; the two go together. */
export function loginOf(flags: LoginFlags): LibvirtLogin | undefined {
  if (flags.user === undefined && flags.password === undefined) return undefined;
  if (flags.user === undefined || flags.password === undefined) {
    throw new UserError(`--${flags.user === undefined ? 'password' : 'user'} without --${flags.user === undefined ? 'user' : 'password'}: a libvirt login takes both`);
  }
  return { user: flags.user, password: flags.password };
}

export function makeLogger(flags: CommonFlags): Logger {
  return new Logger({ verbose: flags.verbose, quiet: flags.quiet, color: flags.nocolor ? false : undefined });
}

/**
 * One bar per disk on stderr, or nothing when disabled or stderr is not a terminal. cli-progress is loaded only
 * when bars are drawn: its modules cost start-up time that runs without a terminal would pay for nothing. While
 * bars are drawn, the console's lines (writeConsole: the loggers' and the command's own) go above them: written in
 * between, a line was glued to a bar's, and the bars' last redraw wrote over the run's last line. A run that drew
 * none writes nothing at its stop (it wrote an empty line and cursor codes before the error line).
 */
export async function makeProgress(flags: CommonFlags, label: string, stream: NodeJS.WriteStream = process.stderr): Promise<{ factory?: (disk: string, total: number) => (bytes: number) => void; stop(): void }> {
  if (flags.noprogress || flags.quiet || !stream.isTTY) return { stop: () => undefined };
  const { default: cliProgress } = await importLazily('cli-progress', () => import('cli-progress'));
  const bars = new cliProgress.MultiBar({
    stream,
    format: `${label} {disk} [{bar}] {percentage}% | {value}/{total} MiB`,
    hideCursor: true,
    clearOnComplete: false,
    // Each redraw writes every bar (a log line may have covered one), and long log lines wrap, not cut at the edge.
    forceRedraw: true,
    linewrap: true,
  }, cliProgress.Presets.shades_classic);
  const MiB = 1024 * 1024;
  let drawing = false;
  let stopped = false;
  // Cleared to its end: a log line written over a bar's line left that bar's tail.
  const above = (line: string): void => bars.log(line.replace(/\n$/, '\x1b[K\n'));
  return {
    factory: (disk, total) => {
      // Whole MiB, rounded up: a disk with nothing to copy is done (0/0, 100%), where it stayed at 0% of 1 MiB.
      const totalMiB = Math.ceil(total / MiB);
      const bar = bars.create(totalMiB, 0, { disk });
      if (!drawing && !stopped) divertConsole(above);
      drawing = true;
      let done = 0;
      return (bytes) => {
        done += bytes;
        bar.update(Math.min(totalMiB, Math.ceil(done / MiB)));
      };
    },
    stop: () => {
      if (stopped) return;
      stopped = true;
      if (!drawing) return;
      // The lines logged since the last redraw, above the bars, then the bars' final state.
      bars.update();
      bars.stop();
      endDiversion(above);
    },
  };
}

export interface RunCommandOptions {
  /** What a run cut short (a stall, which is a bug, or a second stop signal) may leave, and how to end it. */
  leftover?: string;
  /** The command serves until a stop signal (virtnbdmap): that signal is its ordinary end, not news. */
  servesUntilStopped?: boolean;
}

/** What the launcher (bin/launch.cjs) held of the stop signals that came while the command loaded. */
interface EarlySignals {
  signal?: NodeJS.Signals;
  listeners: Map<NodeJS.Signals, () => void>;
}

/** The stop signal that came while the command loaded, if any; from now on the command handles them itself. */
function takeEarlySignal(): NodeJS.Signals | undefined {
  const held = (globalThis as { virtnbdEarlySignals?: EarlySignals }).virtnbdEarlySignals;
  if (!held) return undefined;
  for (const [name, listener] of held.listeners) process.off(name, listener);
  delete (globalThis as { virtnbdEarlySignals?: EarlySignals }).virtnbdEarlySignals;
  return held.signal;
}

/** Runs a command body with an abort signal wired to SIGINT/SIGTERM/SIGHUP; exits the process with its result. */
export async function runCommand(name: string, verbose: boolean, body: (signal: AbortSignal) => Promise<number>, options: RunCommandOptions = {}): Promise<never> {
  const controller = new AbortController();
  const cutShort = options.leftover ? `; ${options.leftover}` : '';
  let signalled = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    // A second signal (an impatient Ctrl-C) stops at once, clean-up or not; a person at a terminal is told so.
    if (signalled) {
      // Progress bars are not stopped: the cursor they hid is shown again, and the line begins below them.
      if (consoleDiverted()) process.stderr.write('\x1b[?25h\n');
      process.stderr.write(`${name}: error: stopped by a second ${sig} before its clean-up ended${cutShort}\n`);
      // A thread may be waiting in libvirt or libnbd for a QEMU that stopped answering: not for it. exitNow skips
      // Node's 'exit' listeners, which remove what a run must not leave (virtnbdmap's socket and overlay, lock
      // files; each synchronous and bounded): they run first.
      const now = loadedNative()?.exitNow;
      if (!now) process.exit(130);
      process.exitCode = 130;
      try {
        process.emit('exit', 130);
      } finally {
        now(130);
      }
    }
    // Above the bars: written in between, it was glued to a bar's line.
    if (process.stderr.isTTY) writeConsole(`${name}: cleaning up; ${sig === 'SIGINT' ? 'Ctrl-C' : sig} again stops at once\n`);
    signalled = true;
    controller.abort(new UserError(`interrupted by ${sig}; cleaned up`, 130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // A terminal that hangs up stops a run as Ctrl-C does, cleaning up (Node's default would kill it with the job
  // left); a run started to outlive its terminal (nohup) keeps ignoring it.
  process.on('SIGHUP', OUTLIVES_TERMINAL ? () => undefined : onSignal);
  // Only now, with these listening, the launcher's go: a signal still on its way then reaches onSignal (with no
  // listener in between, Node would stop watching it, and the signal would be lost).
  const early = takeEarlySignal();
  if (early) {
    process.stderr.write(`${name}: error: interrupted by ${early} before it began; nothing was done\n`);
    process.exit(130);
  }
  // A reader of standard error that goes away (`2>&1 | head`, a dropped ssh) takes only the messages: the run goes
  // on, and a backup's log file in its set still has them.
  process.stderr.on('error', () => undefined);
  // A reader of standard output that goes away (`-o verify | head -1`) chose to stop reading: no stack trace, the
  // run goes on. Whoever needs the output whole (the zip of -o -) fails on its own writes. Any other failure
  // (`> file` on a full disk) stops the run as a signal does, cleaning up, and fails it even if its work was done.
  let outputFailure: UserError | undefined;
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE' || outputFailure) return;
    outputFailure = new UserError(`cannot write to standard output: ${describeFailure(err)}`);
    controller.abort(outputFailure);
  });
  // The event loop ran dry with the run unsettled: it awaits an event that can no longer come. Node would exit 0,
  // as if the run had succeeded; this says what happened and fails.
  process.once('beforeExit', () => {
    process.stderr.write(`${name}: error: internal: the run stopped waiting for an event that never came, its work incomplete (a bug: please report it with the output of -v)${cutShort}\n`);
    process.exit(1);
  });
  let code: number;
  try {
    code = await body(controller.signal);
    // Node reports a failed write to standard output a tick later: the run's last lines have failed or not by then.
    await new Promise<void>((resolve) => process.stdout.write('', () => resolve()));
    if (outputFailure) throw outputFailure;
    // A signal that came after the last point where stopping was possible (data complete, side files being
    // written) does not undo a complete, consistent result: say so, and keep its exit code.
    if (controller.signal.aborted && !options.servesUntilStopped) process.stderr.write(`${name}: a stop signal arrived after the work was complete; it was finished and kept\n`);
  } catch (err) {
    if (err instanceof UserError) {
      process.stderr.write(`${name}: error: ${printable(oneLine(err))}\n`);
      code = err.exitCode;
    } else {
      // A relative path resolved in a working directory removed under the shell: Node says only "uv_cwd".
      const said = (err as NodeJS.ErrnoException | undefined)?.syscall === 'uv_cwd'
        ? 'the working directory no longer exists (removed after the shell entered it), and a relative path needs it: cd to an existing directory, or give absolute paths'
        : oneLine(err);
      process.stderr.write(`${name}: error: ${printable(said)}\n`);
      if (verbose && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
      code = 1;
    }
  }
  process.exit(code);
}

/**
 * Runs `body` with `log` also writing to `file` (when given): the file ends with the error a failed run exits
 * with, as the backup set's log does, and is closed (its lines on disk) however the run ends.
 */
export async function withLogFile<T>(log: Logger, file: string | undefined, body: () => Promise<T>): Promise<T> {
  if (file) log.attachFile(file);
  try {
    return await body();
  } catch (err) {
    log.toFile('error', oneLine(err));
    throw err;
  } finally {
    await log.detachFile();
  }
}

/**
 * Splits comma-separated option values (-i vda,vdb or repeated -i). A value that names nothing (`--sequence ,`) is a
 * wrong flag (exit 2), as an empty one is: taken as not given, it meant every disk or every file.
 */
export function listOption(value: unknown, flag: string): string[] | undefined {
  if (value === undefined) return undefined;
  const values = Array.isArray(value) ? value : [value];
  const out = values.flatMap((v) => String(v).split(',')).map((v) => v.trim()).filter(Boolean);
  if (out.length === 0) throw new UserError(`${flag} ${JSON.stringify(values.join(','))} names nothing: give comma-separated names`, 2);
  return out;
}
