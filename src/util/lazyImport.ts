// Loads a package only when a run first needs it (archiver for zip output, cli-progress for bars). Guarantees: the
// same module whether the command runs from its compiled modules, its bundle, or its bundle compiled from a code cache.

type Importer = (specifier: string) => Promise<unknown>;

/**
 * `direct` is the plain `import()`, which keeps the package's types and lets the bundler leave it outside. The
 * launchers lend an importer of their own (bin/launch.cjs): a bundle they compile with its V8 code cache runs as a
 * script, where `import()` has no module loader to turn to.
 */
export function importLazily<T>(specifier: string, direct: () => Promise<T>): Promise<T> {
  const lent = (globalThis as { virtnbdImport?: Importer }).virtnbdImport;
  return lent ? (lent(specifier) as Promise<T>) : direct();
}
