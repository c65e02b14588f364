// The job guard's word on a run's death, with a fake virsh on PATH that records what it was asked: a run that dies
// once it asked for its job, whether the job began or libvirt was still beginning it, has it ended if the domain's
// job is this run's (its definition names the run's scratch files), and left alone if it is another tool's (or there
// is none); one that ended its job itself leaves the domain's jobs alone. A run's login reaches the guard's virsh from
// a file whose name is gone as soon as the guard has started, so that nothing is left however the guard ends.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const jobGuard = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/backup/jobGuard.js');
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

interface Guarded {
  /** The fake virsh's arguments, and " (socket removed)" when the socket went too; '' when it was not run. */
  asked: string;
  /** The auth.conf the fake virsh was given, lines joined by spaces. */
  auth: string;
  /** Files in the temporary directory just after the guard started, while it runs. */
  whileGuarding: string[];
  /** Files the guard left in its temporary directory, once it is gone. */
  left: string[];
  /** Whether the run's socket was there once the guard was done. */
  socketKept: boolean;
}

/** Stands for the run's socket in a job definition given to runGuarded. */
const SOCKET = '@SOCKET@';
/** This run's scratch file names start so: the guard's marker of its job. */
const MARKER = 'backup.a1b2c3.';

/**
 * Runs a program that guards a job on domain 'dom' (`login` as a guardJob argument), does `steps` (`guard` in
 * them; `marker` is MARKER), then exits. The
 * fake virsh shows `jobXml` as the domain's backup job from its third look on (libvirt still beginning it before),
 * or no job at all.
 */
async function runGuarded(steps: string, login = 'undefined', jobXml?: string): Promise<Guarded> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-guard-'));
  try {
    const record = path.join(dir, 'asked');
    const authCopy = path.join(dir, 'auth');
    const socket = path.join(dir, 'socket');
    const tmp = path.join(dir, 'tmp');
    await fs.mkdir(tmp);
    await fs.writeFile(socket, '');
    const looks = path.join(dir, 'looks');
    await fs.writeFile(path.join(dir, 'virsh'), [
      '#!/bin/sh',
      `[ -z "$LIBVIRT_AUTH_FILE" ] || tr '\\n' ' ' < "$LIBVIRT_AUTH_FILE" > ${JSON.stringify(authCopy)}`,
      `if [ "$4" = backup-dumpxml ]; then echo look >> ${JSON.stringify(looks)}; [ $(wc -l < ${JSON.stringify(looks)}) -ge 3 ] || exit 1;`,
      jobXml === undefined ? '  exit 1; fi' : `  echo ${JSON.stringify(jobXml.replace(SOCKET, socket))}; exit 0; fi`,
      `echo "$@" >> ${JSON.stringify(record)}`, '',
    ].join('\n'), { mode: 0o755 });
    const whileGuarding = path.join(dir, 'while-guarding');
    const script = `import { guardJob } from ${JSON.stringify(jobGuard)};
      import fs from 'node:fs';
      const marker = ${JSON.stringify(MARKER)};
      const guard = guardJob('qemu:///system', 'dom', ${JSON.stringify(socket)}, ${login});
      fs.writeFileSync(${JSON.stringify(whileGuarding)}, JSON.stringify(fs.readdirSync(${JSON.stringify(tmp)})));
      ${steps}
      process.exit(0);`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      stdio: 'inherit', env: { ...process.env, PATH: `${dir}:${process.env.PATH}`, TMPDIR: tmp },
    });
    assert.equal(await new Promise((resolve) => child.once('exit', resolve)), 0);
    // The guard acts once the pipe closes, in a session of its own; removing the socket is its last step on a run's
    // death (the pipe closed without "done"): give it a moment, then as long to clean up.
    const socketThere = (): Promise<boolean> => fs.access(socket).then(() => true, () => false);
    for (let waited = 0; waited < 2000 && (await socketThere()); waited += 100) await sleep(100);
    const asked = await fs.readFile(record, 'utf8').catch(() => '');
    let left = await fs.readdir(tmp);
    for (let waited = 0; waited < 1500 && left.length > 0; waited += 100) {
      await sleep(100);
      left = await fs.readdir(tmp);
    }
    const socketGone = await fs.access(socket).then(() => '', () => ' (socket removed)');
    return {
      asked: asked ? `${asked.trim()}${socketGone}` : '', auth: (await fs.readFile(authCopy, 'utf8').catch(() => '')).trim(),
      whileGuarding: JSON.parse(await fs.readFile(whileGuarding, 'utf8')) as string[], left, socketKept: !socketGone,
    };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

const OURS = `<domainbackup mode='pull'><disks><disk name='vda'><scratch file='/var/tmp/${MARKER}vda'/></disk></disks></domainbackup>`;
const ANOTHER = `<domainbackup mode='pull'><disks><disk name='vda'><scratch file='/var/tmp/backup.ffffff.vda'/></disk></disks></domainbackup>`;

test('a run that dies once it asked for its job has the job ended, and its socket removed, once libvirt shows it', async () => {
  const { asked, auth } = await runGuarded('guard.beginning(marker);', 'undefined', OURS);
  assert.equal(asked, '-q -c qemu:///system domjobabort dom (socket removed)');
  assert.equal(auth, '');
  // A retry asks for a job of another marker: the last one counts.
  assert.equal((await runGuarded('guard.beginning("backup.000000."); guard.beginning(marker);', 'undefined', OURS)).asked, '-q -c qemu:///system domjobabort dom (socket removed)');
});

test('another tool\'s job (or a migration), or none, is left alone; so are the domain\'s jobs when the run dies before it asked for one', async () => {
  assert.equal((await runGuarded('guard.beginning(marker);', 'undefined', ANOTHER)).asked, '');
  assert.equal((await runGuarded('guard.beginning(marker);')).asked, '');
  assert.equal((await runGuarded('', 'undefined', OURS)).asked, '');
});

test('a run that dies while another run\'s job serves on its socket (the same -f, begun while the guard waited) leaves that socket; a job on another socket does not keep it', async () => {
  const anotherOnSocket = `<domainbackup mode='pull'><server transport='unix' socket='${SOCKET}'/><disks><disk name='vda'><scratch file='/var/tmp/backup.ffffff.vda'/></disk></disks></domainbackup>`;
  const guarded = await runGuarded('guard.beginning(marker);', 'undefined', anotherOnSocket);
  assert.equal(guarded.asked, '', 'the other run\'s job is not ended');
  assert.equal(guarded.socketKept, true);
  assert.equal((await runGuarded('guard.beginning(marker);', 'undefined', ANOTHER)).socketKept, false, 'a job on another socket');
});

test('a run that ended its job itself leaves the domain\'s jobs alone', async () => {
  assert.equal((await runGuarded('guard.beginning(marker); await guard.release();', 'undefined', OURS)).asked, '');
  assert.equal((await runGuarded('guard.beginning(marker); await guard.release(); await guard.release();', 'undefined', OURS)).asked, '', 'a second release');
});

test('the run\'s login reaches the guard\'s virsh in an auth.conf whose name is gone while the guard runs, whichever way it ends', async () => {
  const login = `{ user: 'backup', password: 'secret pw' }`;
  const died = await runGuarded('guard.beginning(marker);', login, OURS);
  assert.equal(died.asked, '-q -c qemu:///system domjobabort dom (socket removed)');
  assert.equal(died.auth, '[credentials-virtnbd] authname=backup password=secret pw  [auth-libvirt-default] credentials=virtnbd');
  // Nothing to leave behind even should the guard be killed: the file has no name from its start.
  assert.deepEqual(died.whileGuarding, []);
  assert.deepEqual(died.left, []);
  for (const steps of ['guard.beginning(marker); await guard.release();', '', 'await guard.release();']) {
    const ended = await runGuarded(steps, login, OURS);
    assert.equal(ended.asked, '');
    assert.deepEqual(ended.whileGuarding, [], steps);
    assert.deepEqual(ended.left, [], steps);
  }
});

test('a run that dies with the guest paused (--pause) or frozen has it resumed, then thawed, before its job is ended; one it let go is left as it is', async () => {
  const both = await runGuarded('guard.guestHeld("frozen", true); guard.guestHeld("paused", true); guard.beginning(marker);', 'undefined', OURS);
  assert.equal(both.asked, '-q -c qemu:///system resume dom\n-q -c qemu:///system domfsthaw dom\n-q -c qemu:///system domjobabort dom (socket removed)');
  // Killed before it asked for its job: the guest is let go all the same, and there is no job to end.
  assert.equal((await runGuarded('guard.guestHeld("paused", true);')).asked, '-q -c qemu:///system resume dom (socket removed)');
  const letGo = await runGuarded('guard.guestHeld("frozen", true); guard.guestHeld("paused", true); guard.beginning(marker); guard.guestHeld("paused", false); guard.guestHeld("frozen", false);', 'undefined', OURS);
  assert.equal(letGo.asked, '-q -c qemu:///system domjobabort dom (socket removed)');
});
