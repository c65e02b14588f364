// Opens libvirt and looks up a domain, turning libvirt's failures into one-line errors that say what to do.
import { native, VIR_ERR_NO_DOMAIN, type LibvirtConnection, type LibvirtDomain, type NativeError } from '../native/addon.js';
import { UserError, oneLine } from '../util/errors.js';

export async function openLibvirt(uri: string): Promise<LibvirtConnection> {
  try {
    return await native().libvirtOpen(uri);
  } catch (err) {
    throw new UserError(`cannot connect to libvirt at ${uri}: ${(err as Error).message}; is libvirtd running?`);
  }
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
  return new UserError(`lost the connection to libvirtd at ${uri} (${oneLine(err)}): start libvirtd again, then ${then}`);
}
