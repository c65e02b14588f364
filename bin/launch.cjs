// Shared by the launchers: runs a command's bundle (scripts/bundle.ts) when it is at least as new as the compiled
// command, else the compiled modules themselves, so a `tsc` run without bundling never leaves an older bundle in use.
// A bundle with its V8 code cache beside it, made by the build for that very file, is compiled from the cache.
// CommonJS, as the launchers and bundles are: Node then starts without its ES module loader, 10 to 20 ms sooner, and
// nothing has started libuv's thread pool before the count below is set.
'use strict';
// The stop signals are held first of all, before this file's requires, which take 1 to 2 ms of the start.
holdEarlySignals();
const { readFileSync, renameSync, statSync, writeFileSync } = require('node:fs');
const Module = require('node:module');
const path = require('node:path');
const { pathToFileURL } = require('node:url');
const vm = require('node:vm');

function statOf(file) {
  try {
    return statSync(file);
  } catch {
    return undefined;
  }
}

/**
 * `<bundle>.cache` opens with this, the bundle's size and its modification time: V8 checks a cache against its own
 * version, its flags and the source's length only, so a rebuilt bundle of the same length would run the old code.
 */
const CACHE_HEADER = 'virtnbd code cache 1';

function cacheHeader(stat) {
  return `${CACHE_HEADER} ${stat.size} ${stat.mtimeMs}`;
}

/** V8's data for `bundle`, or undefined when there is none made for this very file. */
function codeCacheOf(bundle, stat) {
  let data;
  try {
    data = readFileSync(`${bundle}.cache`);
  } catch {
    return undefined;
  }
  const end = data.indexOf(10);
  if (end < 0 || data.toString('latin1', 0, end) !== cacheHeader(stat)) return undefined;
  return data.subarray(end + 1);
}

/** Written whole or not at all: a run that reads a half-written cache would compile everything twice. */
function writeCodeCache(bundle, stat, data) {
  const partial = `${bundle}.cache.partial`;
  writeFileSync(partial, Buffer.concat([Buffer.from(`${cacheHeader(stat)}\n`, 'latin1'), data]));
  renameSync(partial, `${bundle}.cache`);
}

/**
 * Runs the bundle as Node's loader would, compiled from its code cache when there is one (compiling the bundle and
 * the functions a run calls costs 20 to 40 ms of every start). VIRTNBD_CODE_CACHE: `write` makes the cache at exit
 * from what the run compiled (the build does so with --help), `off` leaves it unused, `check` says on stderr
 * whether V8 took it.
 */
function runBundle(bundle, stat) {
  const mode = process.env.VIRTNBD_CODE_CACHE;
  delete process.env.VIRTNBD_CODE_CACHE;
  const cachedData = mode === 'off' || mode === 'write' ? undefined : codeCacheOf(bundle, stat);
  if (mode === 'check' && !cachedData) process.once('exit', () => process.stderr.write('code cache: none\n'));
  if (!cachedData && mode !== 'write') {
    require(bundle);
    return;
  }
  const script = new vm.Script(Module.wrap(readFileSync(bundle, 'utf8')), { filename: bundle, cachedData });
  if (mode === 'write') process.once('exit', () => writeCodeCache(bundle, stat, script.createCachedData()));
  if (mode === 'check' && cachedData) process.once('exit', () => process.stderr.write(`code cache: ${script.cachedDataRejected ? 'rejected' : 'used'}\n`));
  const bundleModule = new Module(bundle, module);
  bundleModule.filename = bundle;
  bundleModule.paths = Module._nodeModulePaths(path.dirname(bundle));
  const compiled = script.runInThisContext();
  compiled.call(bundleModule.exports, bundleModule.exports, Module.createRequire(bundle), bundleModule, bundle, path.dirname(bundle));
}

/**
 * libuv threads, so NBD requests, lz4 and file I/O run side by side: 16 let a chain restore hold up to 200 MB for no
 * time, 4 made restores slower. A UV_THREADPOOL_SIZE of the caller's wins.
 */
const THREADS = '8';

/**
 * Stop signals that come while the command loads (100 to 200 ms), before it handles them itself: kept for it
 * (runCommand takes them over), where Node would end the process silently with 128 + the signal's number. SIGHUP
 * stays ignored where the shell found it so (nohup). Called as this file loads, the earliest any JavaScript of ours
 * runs: Node's own start before that (20 to 60 ms) cannot be covered, as Node sets every signal back to its default
 * action, and unblocks it, before it runs any JavaScript (an ignored or blocked signal left by the shell would not
 * last), so a signal then still ends the process silently.
 */
function holdEarlySignals() {
  const held = { signal: undefined, listeners: new Map() };
  const signals = process.env.VIRTNBD_SIGHUP_IGNORED === '1' ? ['SIGINT', 'SIGTERM'] : ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const name of signals) {
    const listener = () => { held.signal = held.signal || name; };
    held.listeners.set(name, listener);
    process.on(name, listener);
  }
  globalThis.virtnbdEarlySignals = held;
}

/** The CA file the launcher kept from Node's start (see bin/virtnbdbackup): the processes the command starts get it. */
function restoreExtraCaCerts() {
  const kept = process.env.VIRTNBD_NODE_EXTRA_CA_CERTS;
  if (kept === undefined) return;
  process.env.NODE_EXTRA_CA_CERTS = kept;
  delete process.env.VIRTNBD_NODE_EXTRA_CA_CERTS;
}

exports.launch = function launch(command) {
  restoreExtraCaCerts();
  process.env.UV_THREADPOOL_SIZE = process.env.UV_THREADPOOL_SIZE || THREADS;
  const cli = path.join(__dirname, '..', 'dist', 'src', 'cli');
  const compiled = path.join(cli, `${command}.js`);
  const bundle = path.join(cli, `${command}.bundle.cjs`);
  // The bundle's import() has no module loader when it runs from its code cache: it imports through this file's.
  globalThis.virtnbdImport = (specifier) => import(specifier);
  const bundled = statOf(bundle);
  if (bundled && bundled.mtimeMs >= (statOf(compiled)?.mtimeMs ?? -1)) {
    runBundle(bundle, bundled);
    return;
  }
  import(pathToFileURL(compiled).href).catch((err) => {
    // Neither a bundle nor the compiled command loads: an install without its build. One line, as every error.
    const missing = err && err.code === 'ERR_MODULE_NOT_FOUND';
    const why = String((err && err.message) || err).split('\n')[0];
    console.error(`${command}: error: cannot load ${compiled}: ${why}${missing ? '; build it with npm run build' : ''}`);
    process.exit(1);
  });
};
