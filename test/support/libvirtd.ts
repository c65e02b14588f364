// The machine's libvirtd for tests that take it away: killed in mid-run, or run for a while with a login (SASL
// DIGEST-MD5 on a private socket and on TCP at 127.0.0.1, its user database and SASL config in a scratch dir) or
// for a group of users on a private socket, nothing of the machine's config touched. Guarantees: libvirtd is started again as scripts/setup.sh starts it, whatever the test did.
import assert from 'node:assert/strict';
import type { TestContext } from 'node:test';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { withTempDir } from './testbed.js';
import { freePort } from './sshd.js';

const PID_FILE = '/run/libvirtd.pid';

/** Whether `uri` answers without a login (virsh's prompts get no input). */
export function libvirtdAnswers(uri = 'qemu:///system', env?: NodeJS.ProcessEnv): boolean {
  return spawnSync('virsh', ['-c', uri, 'version'], { stdio: 'ignore', env: env ?? process.env, timeout: 10_000 }).status === 0;
}

async function waitUntil(answers: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200 && !answers(); i++) await sleep(100);
  assert.ok(answers(), `${what} does not answer`);
}

/** Starts libvirtd again as scripts/setup.sh does (a killed one leaves its pid file) and waits until it answers. */
export async function restartLibvirtd(): Promise<void> {
  if (libvirtdAnswers()) return;
  await fs.rm(PID_FILE, { force: true });
  execFileSync('libvirtd', ['-d']);
  await waitUntil(() => libvirtdAnswers(), 'libvirtd after its restart');
}

/** Stops libvirtd (SIGTERM: its domains run on) and waits until it is gone. */
async function stopLibvirtd(): Promise<void> {
  spawnSync('pkill', ['-x', 'libvirtd']);
  for (let i = 0; i < 100 && spawnSync('pgrep', ['-x', 'libvirtd']).status === 0; i++) await sleep(100);
  assert.notEqual(spawnSync('pgrep', ['-x', 'libvirtd']).status, 0, 'libvirtd did not stop');
}

/** Kills libvirtd (-9), waits for `until`, and starts libvirtd again whatever happened. */
export async function withLibvirtdKilled<T>(until: () => Promise<T>): Promise<T> {
  try {
    execFileSync('pkill', ['-9', '-x', 'libvirtd']);
    return await until();
  } finally {
    await restartLibvirtd();
  }
}

export interface SaslLibvirtd {
  /** libvirt URI of the private socket, where only `user` with `password` gets in. */
  uri: string;
  /** The same daemon through qemu+tcp://127.0.0.1 (a remote URI to the commands: ssh is not set up for it). */
  tcpUri: string;
  user: string;
  password: string;
}

/**
 * Runs `body` while libvirtd asks for a login on a socket of its own: its usual socket (qemu:///system) is gone
 * meanwhile, so the testbed's virsh and monitor calls wait until `body` has returned. The domains run on.
 */
export async function withSaslLibvirtd<T>(t: TestContext, body: (daemon: SaslLibvirtd) => Promise<T>): Promise<T> {
  const dir = await withTempDir(t, 'sasl-');
  const socketDir = path.join(dir, 'run');
  await fs.mkdir(socketDir);
  const tcpPort = await freePort();
  const daemon: SaslLibvirtd = {
    uri: `qemu+unix:///system?socket=${socketDir}/libvirt-sock`,
    tcpUri: `qemu+tcp://127.0.0.1:${tcpPort}/system`,
    user: 'backup',
    password: 'pw-' + path.basename(dir),
  };
  // libvirt reads its SASL settings from <SASL_CONF_PATH>/libvirt.conf; DIGEST-MD5 against a private user database.
  const userDb = path.join(dir, 'passwd.db');
  await fs.writeFile(path.join(dir, 'libvirt.conf'), `mech_list: digest-md5\nsasldb_path: ${userDb}\n`);
  execFileSync('saslpasswd2', ['-p', '-c', '-a', 'libvirt', '-f', userDb, daemon.user], { input: daemon.password });
  const config = path.join(dir, 'libvirtd.conf');
  await fs.writeFile(config, [
    `unix_sock_dir = "${socketDir}"`, 'auth_unix_rw = "sasl"', 'auth_unix_ro = "sasl"',
    'listen_tls = 0', 'listen_tcp = 1', 'listen_addr = "127.0.0.1"', `tcp_port = "${tcpPort}"`, 'auth_tcp = "sasl"', '',
  ].join('\n'));
  // virsh logs in from an auth file, to see the daemon is up.
  const authFile = path.join(dir, 'auth.conf');
  await fs.writeFile(authFile, `[credentials-test]\nauthname=${daemon.user}\npassword=${daemon.password}\n[auth-libvirt-default]\ncredentials=test\n`);

  return withDaemonSwapped(['-d', '--listen', '-f', config], { ...process.env, SASL_CONF_PATH: dir },
    () => libvirtdAnswers(daemon.uri, { ...process.env, LIBVIRT_AUTH_FILE: authFile }), 'libvirtd with a login', () => body(daemon));
}

/**
 * Stops the system libvirtd, starts it with `args` and `env`, runs `body` once `answers`, and whatever happens
 * stops that daemon and starts the system one again. The domains run on.
 */
async function withDaemonSwapped<T>(args: string[], env: NodeJS.ProcessEnv, answers: () => boolean, what: string, body: () => Promise<T>): Promise<T> {
  await stopLibvirtd();
  try {
    await fs.rm(PID_FILE, { force: true });
    execFileSync('libvirtd', args, { env });
    await waitUntil(answers, what);
    return await body();
  } finally {
    await stopLibvirtd();
    await restartLibvirtd();
  }
}

/**
 * Runs `body` while libvirtd serves its usual socket (qemu:///system) read-write without a login to the members of
 * `group` (mode 0770), as a host lets a group of users drive libvirt without polkit. Make domains inside `body`: the
 * testbed's monitor connections of domains made before do not survive the daemon's restart.
 */
export async function withGroupLibvirtd<T>(t: TestContext, group: string, body: () => Promise<T>): Promise<T> {
  const dir = await withTempDir(t, 'groupd-');
  const config = path.join(dir, 'libvirtd.conf');
  await fs.writeFile(config, [
    `unix_sock_group = "${group}"`, 'unix_sock_rw_perms = "0770"', 'auth_unix_rw = "none"', 'auth_unix_ro = "none"', '',
  ].join('\n'));
  return withDaemonSwapped(['-d', '-f', config], process.env, () => libvirtdAnswers(), `libvirtd for group ${group}`, body);
}
