// The TCP port flags checked alike (-P of backup and restore, virtnbdmap's -p): one range, one line naming the flag.
import { UserError } from './errors.js';

export const HIGHEST_PORT = 65535;

/**
 * `port`, given with `flag`, if it is a TCP port from 1 to 65535. With `anyFree`, 0 too, which asks the system for a
 * free port: only for a server of ours, which says where it listens; a qemu-nbd on another host could not tell us.
 */
export function checkTcpPort(port: number, flag: string, { anyFree = false } = {}): number {
  if (Number.isInteger(port) && port >= (anyFree ? 0 : 1) && port <= HIGHEST_PORT) return port;
  throw new UserError(`${flag} ${port}: give a TCP port from 1 to ${HIGHEST_PORT}${anyFree ? ', or 0 for any free one' : ''}`);
}
