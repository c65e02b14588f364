// The launchers in bin/: they run each command's bundle, which answers as the compiled modules do, and fall back
// to the compiled modules when the bundle is older than them.
import { spawn, spawnSync } from 'node:child_process';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { repoRoot, runCli } from '../support/cli.js';

const COMMANDS = ['virtnbdbackup', 'virtnbdrestore', 'virtnbdmap'] as const;

/** virtnbdmap's default socket names its pid. */
const withoutPids = (text: string): string => text.replace(/\.\d+\.sock/g, '.PID.sock');

/** A tree of its own (removed after the test) with `binFiles` of bin/ and an empty dist/src/cli for probe commands. */
async function launcherTree(t: TestContext, binFiles: string[]): Promise<string> {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'vnbdtest-launch-'));
  t.after(() => fs.rm(root, { recursive: true, force: true }));
  await fs.mkdir(path.join(root, 'bin'));
  await fs.mkdir(path.join(root, 'dist', 'src', 'cli'), { recursive: true });
  for (const file of binFiles) await fs.copyFile(path.join(repoRoot, 'bin', file), path.join(root, 'bin', file));
  return root;
}

test('each launcher runs its bundle, which answers --help, --version and bad flags as the compiled command', async () => {
  for (const command of COMMANDS) {
    const compiled = path.join(repoRoot, 'dist', 'src', 'cli', `${command}.js`);
    const bundle = path.join(repoRoot, 'dist', 'src', 'cli', `${command}.bundle.cjs`);
    const [bundleStat, compiledStat] = await Promise.all([fs.stat(bundle), fs.stat(compiled)]);
    assert.ok(bundleStat.mtimeMs >= compiledStat.mtimeMs, `${bundle} is older than ${compiled}: run npm run build`);
    for (const args of [['--help'], ['--version'], ['--no-such-flag']]) {
      const viaLauncher = await runCli(path.join(repoRoot, 'bin', command), args);
      const direct = await runCli(process.execPath, [compiled, ...args]);
      assert.equal(viaLauncher.code, direct.code, `${command} ${args.join(' ')}`);
      assert.equal(withoutPids(viaLauncher.stdout), withoutPids(direct.stdout), `${command} ${args.join(' ')}`);
      assert.equal(withoutPids(viaLauncher.stderr), withoutPids(direct.stderr), `${command} ${args.join(' ')}`);
    }
  }
});

test('the launchers start Node without NODE_EXTRA_CA_CERTS, whose parsing would slow every start, and give it back to the processes the command starts', async (t) => {
  // A file Node cannot load makes it warn as it starts: no warning, so Node never read the variable.
  const env = { ...process.env, NODE_EXTRA_CA_CERTS: '/nonexistent/vnbdtest-ca.pem' };
  for (const command of COMMANDS) {
    const run = spawnSync(path.join(repoRoot, 'bin', command), ['--version'], { env, encoding: 'utf8' });
    assert.equal(run.status, 0, command);
    assert.equal(run.stderr, '', command);
  }
  // A probe in place of each command prints what a child of it (ssh, qemu-img) would get.
  const root = await launcherTree(t, ['launch.cjs', 'package.json', ...COMMANDS]);
  const probe = "process.stdout.write(JSON.stringify([process.env.NODE_EXTRA_CA_CERTS, process.env.VIRTNBD_NODE_EXTRA_CA_CERTS]));\n";
  for (const command of COMMANDS) await fs.writeFile(path.join(root, 'dist', 'src', 'cli', `${command}.bundle.cjs`), probe);
  const without: NodeJS.ProcessEnv = { ...process.env };
  delete without.NODE_EXTRA_CA_CERTS;
  for (const command of COMMANDS) {
    const given = spawnSync(path.join(root, 'bin', command), [], { env, encoding: 'utf8' });
    assert.deepEqual(JSON.parse(given.stdout), ['/nonexistent/vnbdtest-ca.pem', null], command);
    const none = spawnSync(path.join(root, 'bin', command), [], { env: without, encoding: 'utf8' });
    assert.deepEqual(JSON.parse(none.stdout), [null, null], command);
  }
});

test("each command's bundle runs from the V8 code cache the build made for it", () => {
  for (const command of COMMANDS) {
    // V8 takes a cache made under the same flags only: NODE_OPTIONS of the test's own would change them.
    const run = spawnSync(path.join(repoRoot, 'bin', command), ['--version'], { env: { ...process.env, VIRTNBD_CODE_CACHE: 'check', NODE_OPTIONS: '' }, encoding: 'utf8' });
    assert.equal(run.status, 0, command);
    assert.equal(run.stderr, 'code cache: used\n', `${command}: run npm run build`);
  }
});

test('a code cache made for another bundle of the same length is passed over, and import() works from a cache', async (t) => {
  const root = await launcherTree(t, ['launch.cjs']);
  const bundle = path.join(root, 'dist', 'src', 'cli', 'probe.bundle.cjs');
  const probe = (word: string): string => `globalThis.virtnbdImport('node:os').then((os) => process.stdout.write('${word} ' + typeof os.cpus));\n`;
  const launch = (mode: string): { stdout: string; stderr: string } => {
    const run = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(path.join(root, 'bin', 'launch.cjs'))}).launch('probe')`], { env: { ...process.env, VIRTNBD_CODE_CACHE: mode }, encoding: 'utf8' });
    return { stdout: run.stdout, stderr: run.stderr };
  };
  await fs.writeFile(bundle, probe('one'));
  assert.equal(launch('write').stdout, 'one function');
  assert.deepEqual(launch('check'), { stdout: 'one function', stderr: 'code cache: used\n' });
  // V8 itself checks only the source's length: the same length, written a second later, must not run the old code.
  await fs.writeFile(bundle, probe('two'));
  const later = new Date(Date.now() + 1000);
  await fs.utimes(bundle, later, later);
  assert.deepEqual(launch('check'), { stdout: 'two function', stderr: 'code cache: none\n' });
});

test("each bundle has yargs look for its version from the package's root, not from the working directory up", async () => {
  // A working directory of 20 000 files cost 15 ms of every start, read folder by folder up to / (scripts/bundle.ts).
  for (const command of COMMANDS) {
    const bundle = await fs.readFile(path.join(repoRoot, 'dist', 'src', 'cli', `${command}.bundle.cjs`), 'utf8');
    assert.doesNotMatch(bundle, /mainFilename: mainFilename \|\| process\.cwd\(\)/, command);
    assert.match(bundle, /mainFilename: mainFilename \|\| \(0, \w+\.fileURLToPath\)\(new URL\("\.\.\/\.\.\/\.\.\/", importMetaUrl\)\)/, command);
  }
});

test("the bundle finds yargs' translations", async () => {
  const german = { ...process.env, LANG: 'de_DE.UTF-8', LC_ALL: 'de_DE.UTF-8' };
  const run = spawnSync(path.join(repoRoot, 'bin', 'virtnbdbackup'), ['-l', 'full'], { env: german, encoding: 'utf8' });
  assert.equal(run.status, 2);
  assert.match(run.stderr, /Fehlendes Argument: domain/);
});

test('a bundle older than the compiled command is passed over for the compiled modules', async (t) => {
  const root = await launcherTree(t, ['launch.cjs']);
  const compiled = path.join(root, 'dist', 'src', 'cli', 'probe.js');
  const bundle = path.join(root, 'dist', 'src', 'cli', 'probe.bundle.cjs');
  await fs.writeFile(compiled, "process.stdout.write('compiled');\n");
  await fs.writeFile(bundle, "process.stdout.write('bundle');\n");
  const launch = ['-e', `require(${JSON.stringify(path.join(root, 'bin', 'launch.cjs'))}).launch('probe')`];

  const older = new Date(Date.now() - 60_000);
  await fs.utimes(compiled, older, older);
  assert.equal((await runCli(process.execPath, launch)).stdout, 'bundle');

  await fs.utimes(bundle, new Date(Date.now() - 120_000), new Date(Date.now() - 120_000));
  assert.equal((await runCli(process.execPath, launch)).stdout, 'compiled');

  await fs.rm(bundle);
  assert.equal((await runCli(process.execPath, launch)).stdout, 'compiled');

  // Neither there (an install without its build): one line saying how to build, no stack.
  await fs.rm(compiled);
  const unbuilt = await runCli(process.execPath, launch);
  assert.equal(unbuilt.code, 1);
  assert.match(unbuilt.stderr, new RegExp(`^probe: error: cannot load ${compiled.replace(/[.]/g, '\\.')}: .*; build it with npm run build\n$`));
});

test('the launchers start the command with 8 libuv threads, or the UV_THREADPOOL_SIZE given', async (t) => {
  // A probe in place of each command's bundle counts the process's threads once the pool has started (libuv starts
  // all of its threads at the first request). The ES module launchers had set the count too late, unnoticed.
  const root = await launcherTree(t, ['launch.cjs', 'package.json', ...COMMANDS]);
  const probe = "require('node:fs').stat('/', () => process.stdout.write(String(require('node:fs').readdirSync('/proc/self/task').length)));\n";
  for (const command of COMMANDS) await fs.writeFile(path.join(root, 'dist', 'src', 'cli', `${command}.bundle.cjs`), probe);
  const threads = async (command: string, size?: string): Promise<number> => {
    const env: NodeJS.ProcessEnv = { ...process.env };
    delete env.UV_THREADPOOL_SIZE;
    if (size) env.UV_THREADPOOL_SIZE = size;
    const run = spawnSync(path.join(root, 'bin', command), [], { env, encoding: 'utf8' });
    assert.equal(run.status, 0, run.stderr);
    return Number(run.stdout);
  };
  for (const command of COMMANDS) {
    assert.equal((await threads(command)) - (await threads(command, '1')), 7, `${command}: 8 threads by default`);
    assert.equal((await threads(command, '3')) - (await threads(command, '1')), 2, `${command}: the caller's count wins`);
  }
});

test('the launcher holds the stop signals as its file loads, before its own requires (SIGHUP not under nohup)', () => {
  const launcher = JSON.stringify(path.join(repoRoot, 'bin', 'launch.cjs'));
  const count = "['SIGINT', 'SIGTERM', 'SIGHUP'].map((s) => process.listenerCount(s)).join(' ')";
  const loaded = spawnSync(process.execPath, ['-e', `require(${launcher}); process.stdout.write(${count})`], { encoding: 'utf8' });
  assert.equal(loaded.stdout, '1 1 1', loaded.stderr);
  const nohup = spawnSync(process.execPath, ['-e', `require(${launcher}); process.stdout.write(${count})`], { encoding: 'utf8', env: { ...process.env, VIRTNBD_SIGHUP_IGNORED: '1' } });
  assert.equal(nohup.stdout, '1 1 0', nohup.stderr);
  // First of all: the file's first statement after 'use strict', before any require.
  const source = spawnSync('grep', ['-v', '^//', path.join(repoRoot, 'bin', 'launch.cjs')], { encoding: 'utf8' }).stdout.split('\n');
  assert.deepEqual(source.slice(0, 2), ["'use strict';", 'holdEarlySignals();']);
});

test('a stop signal while the command loads is held for it: one line and exit 130, not a silent 128 + signal', async (t) => {
  const root = await launcherTree(t, ['launch.cjs']);
  // A command that takes a second to load, then runs as the commands do.
  const common = path.join(repoRoot, 'dist', 'src', 'cli', 'common.js');
  await fs.writeFile(path.join(root, 'dist', 'src', 'cli', 'probe.bundle.cjs'), `process.stdout.write('loading\\n');
    setTimeout(() => import(${JSON.stringify(common)}).then((m) => m.runCommand('probe', false, async () => 0)), 1000);\n`);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const child = spawn(process.execPath, ['-e', `require(${JSON.stringify(path.join(root, 'bin', 'launch.cjs'))}).launch('probe')`], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (text: string) => { stderr += text; });
    await new Promise((resolve) => child.stdout.once('data', resolve));
    child.kill(signal);
    const code = await new Promise((resolve) => child.once('exit', (c) => resolve(c)));
    assert.equal(code, 130, `${signal}: ${stderr}`);
    assert.equal(stderr, `probe: error: interrupted by ${signal} before it began; nothing was done\n`);
  }
  // A signal not yet handed to JavaScript when the command takes over (it came during the command's last synchronous
  // steps) reaches the command's own handler: the hand-over leaves no moment without a listener, in which Node
  // would stop watching the signal and lose it (the run went on and exited 0).
  await fs.writeFile(path.join(root, 'dist', 'src', 'cli', 'probe.bundle.cjs'), `import(${JSON.stringify(common)}).then((m) => {
      process.kill(process.pid, 'SIGTERM');
      m.runCommand('probe', false, async (signal) => {
        await new Promise((resolve) => setTimeout(resolve, 300));
        if (signal.aborted) throw signal.reason;
        return 0;
      });
    });\n`);
  const pending = await runCli(process.execPath, ['-e', `require(${JSON.stringify(path.join(root, 'bin', 'launch.cjs'))}).launch('probe')`]);
  assert.equal(pending.code, 130, pending.stderr);
  assert.equal(pending.stderr, 'probe: error: interrupted by SIGTERM; cleaned up\n');
});
