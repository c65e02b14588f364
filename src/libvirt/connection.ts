// Opens libvirt and looks up a domain, turning libvirt's failures into one-line errors that say what to do. The ssh
// libvirt starts for a qemu+ssh:// URI is ours (libexec/libvirt-ssh): out of reach of a terminal's Ctrl-C.
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { native, VIR_ERR_AUTH_CANCELLED, VIR_ERR_AUTH_FAILED, VIR_ERR_AUTH_UNAVAILABLE, VIR_ERR_NO_DOMAIN, type LibvirtConnection, type LibvirtDomain, type NativeError } from '../native/addon.js';
import { UserError, oneLine } from '../util/errors.js';
import { DEFAULT_NBD_TIMEOUT } from '../endpoint/nbd.js';
import { LOCAL_HOST, domainHostOf, keepalivesFor } from './domainHost.js';

/** The libvirt URI every command uses without -U, as virtnbdbackup does: this host's system daemon. */
export const DEFAULT_LIBVIRT_URI = 'qemu:///system';

/** A libvirt login (--user/--password), for a daemon that asks for one (SASL on qemu+tcp://). */
export interface LibvirtLogin {
  user: string;
  password: string;
}

/** libvirt's answers when a daemon refused or wanted a login. */
const AUTH_ERRORS = new Set([VIR_ERR_AUTH_FAILED, VIR_ERR_AUTH_CANCELLED, VIR_ERR_AUTH_UNAVAILABLE]);

/**
 * Opens libvirt at `uri`, logging in with `login` when given; one line saying what to do when it cannot. The open
 * gives up once the daemon (or its host) answered nothing for `silentSeconds` (--nbd-timeout; 0 waits for ever),
 * and libvirt's keepalives then close the connection after as long a silence, so that the calls waiting on it fail
 * (lostConnectionError) in place of waiting for ever.
 */
export async function openLibvirt(uri: string, login?: LibvirtLogin, silentSeconds = DEFAULT_NBD_TIMEOUT): Promise<LibvirtConnection> {
  try {
    return await openConnection(uri, login, silentSeconds);
  } catch (err) {
    if (err instanceof NoAnswerError) throw new UserError(`${err.message}: check it with 'virsh -c ${uri} version', or raise --nbd-timeout (0 waits forever)`);
    throw new UserError(`cannot connect to libvirt at ${uri}: ${oneLine(err)}; ${connectAdvice(err, login, uri)}`);
  }
}

/** The open of a daemon that accepted the connection but did not answer within the time given. */
export class NoAnswerError extends Error {}

/**
 * libvirt's open at `uri`, with keepalives for `silentSeconds` (keepalivesFor) and bounded by it: libvirt's own open
 * waits for ever on a daemon that accepts and never answers (a hung libvirtd). Its thread stays blocked then, but
 * keeps the process alive no longer; a connection that opens after all is closed.
 */
export async function openConnection(uri: string, login?: LibvirtLogin, silentSeconds = DEFAULT_NBD_TIMEOUT): Promise<LibvirtConnection> {
  const keepalives = keepalivesFor(silentSeconds);
  const opening = native().libvirtOpen(withOurSsh(uri), login?.user, login?.password, keepalives?.interval, keepalives?.count);
  if (!keepalives) return opening;
  let timer: NodeJS.Timeout | undefined;
  const silence = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new NoAnswerError(`libvirtd at ${uri} answered nothing for ${silentSeconds} s (hung, or its host unreachable?)`)), silentSeconds * 1000);
  });
  try {
    return await Promise.race([opening, silence]);
  } catch (err) {
    if (err instanceof NoAnswerError) {
      // A program that goes on closes a late connection; one that is done exits without waiting for it.
      opening.then((late) => late.close(), () => undefined).catch(() => undefined);
      opening.abandon();
    }
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

/** libexec/libvirt-ssh: dist/src/libvirt, or the bundle's dist/src/cli, are three folders below the package's root. */
const LIBVIRT_SSH = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'libexec', 'libvirt-ssh');

/** Whether libvirt reaches `uri` through the system's ssh (qemu+ssh://), which it starts itself. */
function viaSsh(uri: string): boolean {
  return /^[a-z0-9.-]+\+ssh:\/\//i.test(uri);
}

/**
 * `uri` as libvirt is to open it: an ssh transport (qemu+ssh://) runs libexec/libvirt-ssh as its ssh, unless the URI
 * names its own (`command=`). libvirt starts its ssh in the run's process group, so a terminal's Ctrl-C killed it
 * with the connection: the run failed as if libvirtd were gone, its job left running on that host.
 */
export function withOurSsh(uri: string): string {
  if (!viaSsh(uri)) return uri;
  const query = uri.indexOf('?');
  if (query >= 0 && /(^|[&;])command=/.test(uri.slice(query + 1))) return uri;
  return `${uri}${query >= 0 ? '&' : '?'}command=${encodeURIComponent(LIBVIRT_SSH)}`;
}

/** The open failed on the login: libvirtd wanted one, or refused the one given. */
export function loginRefused(err: unknown): boolean {
  return AUTH_ERRORS.has((err as NativeError).code ?? -1);
}

/**
 * The failures of libvirt's own ssh (qemu+ssh://) in its words, and what to do: it takes the user, port and key from
 * the URI alone (--ssh-user is ours, for qemu-img and the boot files).
 */
const LIBVIRT_SSH_ADVICE: Array<[RegExp, string]> = [
  [/Identity file .* not accessible/, 'the key file keyfile= names in the URI cannot be read'],
  [/Host key verification failed/, 'connect once with ssh to accept the host\'s key, or add no_verify=1 to the URI'],
  [/Permission denied \((publickey|password)/, 'the host refused the ssh login: give its user in the URI (qemu+ssh://user@host/system) and its key with keyfile='],
  [/Could not resolve hostname/, 'check the host name in the URI'],
  [/Connection refused|No route to host|Connection timed out/, 'check that sshd runs on that host and the port in the URI'],
];

/**
 * A user other than root refused by this host's libvirtd, in libvirt's words: its socket's permissions, or polkit
 * (Debian's default), which fails without the system's D-Bus. The line asked whether libvirtd was running.
 */
function notLetIn(err: unknown): boolean {
  return process.getuid?.() !== 0 && /system bus|polkit|Permission denied|not authorized|authentication unavailable/i.test((err as Error).message ?? '');
}

/** What to do about a failed open: a login to give or check, an ssh failure's cure, else the host to reach or the daemon to start. */
export function connectAdvice(err: unknown, login?: LibvirtLogin, uri?: string): string {
  if (!loginRefused(err)) {
    const host = uri ? domainHostOf(uri) : LOCAL_HOST;
    const sshAdvice = uri && viaSsh(uri) ? LIBVIRT_SSH_ADVICE.find(([pattern]) => pattern.test((err as Error).message ?? ''))?.[1] : undefined;
    if (sshAdvice) return sshAdvice;
    if (!host.remote && notLetIn(err)) return `libvirtd does not let user ${os.userInfo().username} in: run as root, or let the user in (libvirtd.conf: unix_sock_group = "libvirt" and auth_unix_rw = "none", the user in group libvirt; or a polkit rule)`;
    return host.remote ? `is ${host.hostname} reachable, and libvirtd running there?` : 'is libvirtd running?';
  }
  if (login) return `check the login --user ${login.user} and its --password`;
  return 'libvirtd asks for a login: give --user and --password (or a libvirt auth.conf)';
}

export async function lookupDomain(conn: LibvirtConnection, name: string, uri: string): Promise<LibvirtDomain> {
  try {
    return await conn.lookupDomainByName(name);
  } catch (err) {
    if ((err as NativeError).code === VIR_ERR_NO_DOMAIN) {
      throw new UserError(`domain '${name}' not found at ${uri}; check the name with 'virsh -c ${uri} list --all'`);
    }
    throw new UserError(`cannot look up domain '${name}' at ${uri}: ${(err as Error).message}`);
  }
}

/**
 * `err` restated when the daemon connection is gone (libvirtd stopped or crashed in mid-run): libvirt's own words
 * ("client socket is closed", "Broken pipe") name neither the daemon nor what to do. Undefined while it is alive.
 */
export async function lostConnectionError(conn: LibvirtConnection, uri: string, err: unknown, then: string): Promise<UserError | undefined> {
  const alive = await conn.isAlive().catch(() => true);
  if (alive) return undefined;
  return new UserError(`lost the connection to libvirtd at ${uri} (${oneLine(err)}): once libvirtd runs and answers ('virsh -c ${uri} version'), ${then}`);
}
