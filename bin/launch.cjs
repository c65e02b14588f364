// Shared by the launchers: runs a command's bundle (scripts/bundle.ts) when it is at least as new as the compiled
// command, else the compiled modules themselves, so a `tsc` run without bundling never leaves an older bundle in use.
// CommonJS, as the launchers and bundles are: Node then starts without its ES module loader, 10 to 20 ms sooner, and
// nothing has started libuv's thread pool before the count below is set.
'use strict';
const { statSync } = require('node:fs');
const path = require('node:path');
const { pathToFileURL } = require('node:url');

function modified(file) {
  try {
    return statSync(file).mtimeMs;
  } catch {
    return -1;
  }
}

/**
 * libuv threads, so NBD requests, lz4 and file I/O run side by side: 16 let a chain restore hold up to 200 MB for no
 * time, 4 made restores slower. A UV_THREADPOOL_SIZE of the caller's wins.
 */
const THREADS = '8';

/**
 * Stop signals that come while the command loads (100 to 200 ms), before it handles them itself: kept for it
 * (runCommand takes them over), where Node would end the process silently with 128 + the signal's number. SIGHUP
 * stays ignored where the shell found it so (nohup).
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
  holdEarlySignals();
  restoreExtraCaCerts();
  process.env.UV_THREADPOOL_SIZE = process.env.UV_THREADPOOL_SIZE || THREADS;
  const cli = path.join(__dirname, '..', 'dist', 'src', 'cli');
  const compiled = path.join(cli, `${command}.js`);
  const bundle = path.join(cli, `${command}.bundle.cjs`);
  const bundled = modified(bundle);
  if (bundled >= 0 && bundled >= modified(compiled)) {
    require(bundle);
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
