// Shared by the launchers: runs a command's bundle (scripts/bundle.ts) when it is at least as new as the compiled
// command, else the compiled modules themselves, so a `tsc` run without bundling never leaves an older bundle in use.
import { statSync } from 'node:fs';

function modified(url) {
  try {
    return statSync(url).mtimeMs;
  } catch {
    return -1;
  }
}

export function launch(command) {
  const compiled = new URL(`../dist/src/cli/${command}.js`, import.meta.url);
  const bundle = new URL(`../dist/src/cli/${command}.bundle.mjs`, import.meta.url);
  const entry = modified(bundle) >= modified(compiled) ? bundle : compiled;
  return import(entry.href).catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
