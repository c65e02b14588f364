// Throwaway system users for tests that run the commands as someone other than root: each is removed when its test
// ends, or by a later sweep once the process that made it is gone. Guarantees: only users named by this module.
import type { TestContext } from 'node:test';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { cleanup } from './cleanup.js';

/** vnbdt-p<owner pid>-<random>: a sweep tells leftovers of dead processes from users in use. */
const USER_NAME = /^vnbdt-p(\d+)-[0-9a-f]+$/;

function removeUser(name: string): void {
  // userdel removes the user's own group too; its home is a test dir, removed by its owner.
  spawnSync('userdel', [name], { stdio: 'ignore' });
}

/** A system user with no login shell, home `home` (made by the caller), in `groups` besides its own; removed at the test's end. */
export function withSystemUser(t: TestContext, home: string, groups: string[]): string {
  const name = `vnbdt-p${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
  const made = spawnSync('useradd', ['--system', '--user-group', '--no-create-home', '--home-dir', home, '--shell', '/usr/sbin/nologin',
    ...(groups.length > 0 ? ['--groups', groups.join(',')] : []), name], { encoding: 'utf8' });
  if (made.status !== 0) throw new Error(`useradd ${name} failed: ${made.stderr.trim()}`);
  cleanup(t, () => removeUser(name));
  return name;
}

/** Removes users of this module whose owner process is gone; returns their names. */
export function sweepStaleTestUsers(): string[] {
  let passwd: string;
  try {
    passwd = fs.readFileSync('/etc/passwd', 'utf8');
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const line of passwd.split('\n')) {
    const name = line.split(':')[0] ?? '';
    const owner = USER_NAME.exec(name)?.[1];
    if (owner === undefined || fs.existsSync(`/proc/${owner}`)) continue;
    removeUser(name);
    removed.push(`user ${name}`);
  }
  return removed;
}
