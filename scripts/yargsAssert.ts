// Stands in for node:assert in the bundles, for yargs, which checks its own state with two of its functions at
// every start: loading node:assert (and the colour and stream modules its messages pull in) cost 3 to 7 ms of each.
// Guarantees: node:assert's behaviour, which is loaded only to fail as it would.
import { createRequire } from 'node:module';

type Check = (actual: unknown, expected: unknown, message?: string | Error) => void;
const realCheck = (name: 'strictEqual' | 'notStrictEqual'): Check => (createRequire(import.meta.url)('node:assert') as Record<typeof name, Check>)[name];

export function strictEqual(actual: unknown, expected: unknown, message?: string | Error): void {
  if (!Object.is(actual, expected)) realCheck('strictEqual')(actual, expected, message);
}

export function notStrictEqual(actual: unknown, expected: unknown, message?: string | Error): void {
  if (Object.is(actual, expected)) realCheck('notStrictEqual')(actual, expected, message);
}
