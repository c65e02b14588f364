// Bundles each compiled command (dist/src/cli/<command>.js) into one CommonJS file beside it, <command>.bundle.cjs,
// which the launchers in bin/ run: one file in place of about 160 module and package files starts 0.05 to 0.1 s
// sooner, and CommonJS spares Node its ES module loader (10 to 20 ms more).
// Then each bundle's V8 code cache (<command>.bundle.cjs.cache), made by the command's own launcher so that V8's flags
// match, from a --help run: that compiles the bundle's top level and yargs, most of what a start compiles.
// Guarantees: a bundle is only replaced once esbuild has written it complete, and its old cache goes first; what
// yargs reads from its own folder comes along.
// Run by `npm run build` and scripts/setup.sh after tsc: `node dist/scripts/bundle.js`.
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { promisify } from 'node:util';
import { build, type Plugin } from 'esbuild';
import { repoRoot } from '../test/support/cli.js';

const COMMANDS = ['virtnbdbackup', 'virtnbdrestore', 'virtnbdmap'] as const;
const CLI_DIR = path.join(repoRoot, 'dist', 'src', 'cli');

/**
 * yargs and its help layout bring three copies of string-width (7.x twice, 8.x once), which build an `Intl.Segmenter`
 * and Unicode-property regular expressions when loaded: about 0.03 s of every start, for measuring help text. All
 * three are served by the 4.x copy cli-progress already uses, which builds nothing until called; the launcher tests
 * check that every command's help reads the same as without the bundle.
 */
function stringWidthOfCliProgress(): string {
  const fromRoot = createRequire(path.join(repoRoot, 'package.json'));
  return createRequire(fromRoot.resolve('cli-progress')).resolve('string-width');
}

/**
 * yargs guesses a version at every start from the package.json nearest its `mainFilename`: the folder above its
 * node_modules, which a bundle has not, so it looked from the working directory up, reading every folder on the
 * way (a working directory of 20 000 files cost 15 ms a start) and whatever package.json it met. In the bundle the
 * repository's root is three folders above it (dist/src/cli), where the package's own package.json is.
 */
const YARGS_SHIM = /yargs[\\/]lib[\\/]platform-shims[\\/]esm\.mjs$/;
const YARGS_MAIN = 'mainFilename: mainFilename || process.cwd(),';
const fromBundleRoot: Plugin = {
  name: 'yargs-main-from-bundle',
  setup(build) {
    build.onLoad({ filter: YARGS_SHIM }, async (args) => {
      const source = await fs.readFile(args.path, 'utf8');
      if (!source.includes(YARGS_MAIN)) {
        process.stderr.write(`bundle: warning: yargs' ${path.basename(args.path)} has no "${YARGS_MAIN}": it guesses its version from the working directory\n`);
        return { contents: source, loader: 'js' };
      }
      return { contents: source.replace(YARGS_MAIN, "mainFilename: mainFilename || fileURLToPath(new URL('../../../', import.meta.url)),"), loader: 'js' };
    });
  },
};

async function bundle(command: string, stringWidth: string): Promise<void> {
  const final = path.join(CLI_DIR, `${command}.bundle.cjs`);
  const partial = `${final}.partial`;
  await build({
    entryPoints: [path.join(CLI_DIR, `${command}.js`)],
    outfile: partial,
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    // The sources are ES modules: import.meta.url becomes the bundle's own URL (it sits where the compiled command does).
    banner: { js: "const importMetaUrl = require('node:url').pathToFileURL(__filename).href;" },
    define: { 'import.meta.url': 'importMetaUrl' },
    logLevel: 'warning',
    // Loaded only for zip output and progress bars, so left out: in the bundle they would be parsed on every run.
    external: ['archiver', 'cli-progress'],
    alias: { 'string-width': stringWidth, assert: path.join(repoRoot, 'dist', 'scripts', 'yargsAssert.js') },
    plugins: [fromBundleRoot],
  });
  await fs.rm(`${final}.cache`, { force: true });
  await fs.rename(partial, final);
  await makeCodeCache(command);
}

/**
 * The launcher writes the cache (bin/launch.cjs); NODE_OPTIONS of the build's own would make V8 refuse it later.
 * Without a cache the command only starts slower: a failure here is a warning.
 */
async function makeCodeCache(command: string): Promise<void> {
  const env: NodeJS.ProcessEnv = { ...process.env, VIRTNBD_CODE_CACHE: 'write' };
  delete env.NODE_OPTIONS;
  try {
    await promisify(execFile)(path.join(repoRoot, 'bin', command), ['--help'], { env });
  } catch (err) {
    process.stderr.write(`bundle: warning: no code cache for ${command} (it starts about 15 ms slower): ${(err as Error).message.split('\n')[0]}\n`);
  }
}

/**
 * yargs finds its message translations at `../../../locales` from its own module file; in a bundle that file is
 * the bundle in dist/src/cli, so the translations go to dist/locales.
 */
async function copyYargsLocales(): Promise<void> {
  const from = path.join(repoRoot, 'node_modules', 'yargs', 'locales');
  const to = path.join(repoRoot, 'dist', 'locales');
  await fs.rm(to, { recursive: true, force: true });
  await fs.cp(from, to, { recursive: true });
}

async function main(): Promise<void> {
  const stringWidth = stringWidthOfCliProgress();
  // The translations first: the runs that make the code caches read them.
  await copyYargsLocales();
  await Promise.all(COMMANDS.map((command) => bundle(command, stringWidth)));
}

main().catch((err: unknown) => {
  process.stderr.write(`bundle: ${(err as Error).message}\n`);
  process.exit(1);
});
