// Clean-up at a test's end that a failing test cannot cut short: last registered first, every one run whatever the
// others do, failures reported once the test's other hooks have run.
import type { TestContext } from 'node:test';

/** The clean-ups of each running test, in the order they were registered. */
const registered = new WeakMap<TestContext, Array<() => unknown>>();

/**
 * Runs `fn` when the test ends, as t.after does, but last registered first (a map holding its overlay on a tmpfs
 * stops before the tmpfs is unmounted, a domain goes before the directory of its disks) and each one whatever the
 * others do. t.after runs its hooks first in, first out, and skips the rest once one throws: an unmount that
 * failed (busy) kept the map and its client from being stopped, and the test file hung until its timeout.
 */
export function cleanup(t: TestContext, fn: () => unknown): void {
  const fns = registered.get(t);
  if (fns) {
    fns.push(fn);
    return;
  }
  const all = [fn];
  registered.set(t, all);
  t.after(async () => {
    const failures: unknown[] = [];
    for (const each of [...all].reverse()) {
      try {
        await each();
      } catch (err) {
        failures.push(err);
      }
    }
    // From a hook added now, which runs last: the test's own t.after hooks, after this one, still run.
    if (failures.length > 0) {
      t.after(() => {
        throw failures.length === 1 ? failures[0] : new AggregateError(failures, `${failures.length} clean-ups failed`);
      });
    }
  });
}
