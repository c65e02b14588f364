// Extent planning: full from allocation, inc/diff as dirty ranges split by allocation (zeroed -> zero frames).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ExtentList, planDirty, planFull, chunks, type PlannedExtent } from '../../src/extents/plan.js';
import type { Endpoint, StatusExtent } from '../../src/endpoint/endpoint.js';

/** An endpoint that only answers block status, from fixed extent tables. */
function statusOnly(size: number, contexts: Record<string, Array<[number, number]>>): Endpoint {
  return {
    size, maxRequestSize: 1 << 25, parallelism: 1,
    read: async () => undefined, write: async () => undefined, zero: async () => undefined, flush: async () => undefined,
    close: async () => undefined,
    async *extents(context: string, offset: number, length: number): AsyncIterable<StatusExtent> {
      let at = 0;
      for (const [len, flags] of contexts[context] ?? []) {
        const s = Math.max(at, offset);
        const e = Math.min(at + len, offset + length);
        if (s < e) yield { offset: s, length: e - s, flags };
        at += len;
      }
    },
  };
}

test('full: zero-flagged ranges become zero extents, holes without ZERO stay data, neighbours merge', async () => {
  const ep = statusOnly(100, { 'base:allocation': [[10, 0], [10, 0], [20, 3], [10, 2], [10, 1], [40, 0]] });
  const plan = await planFull(ep);
  assert.deepEqual([...plan.extents], [
    { offset: 0, length: 20, kind: 'data' },
    { offset: 20, length: 30, kind: 'zero' },
    { offset: 50, length: 50, kind: 'data' },
  ]);
  assert.equal(plan.dataSize, 70);
});

const dirtyCases: Array<{ name: string; dirty: Array<[number, number]>; alloc: Array<[number, number]>; want: PlannedExtent[] }> = [
  {
    name: 'clean disk gives nothing',
    dirty: [[100, 0]], alloc: [[100, 0]], want: [],
  },
  {
    name: 'dirty data range is data',
    dirty: [[10, 0], [20, 1], [70, 0]], alloc: [[100, 0]], want: [{ offset: 10, length: 20, kind: 'data' }],
  },
  {
    name: 'dirty range that was zeroed or trimmed becomes a zero extent',
    dirty: [[10, 0], [30, 1], [60, 0]], alloc: [[20, 0], [10, 3], [70, 0]],
    want: [{ offset: 10, length: 10, kind: 'data' }, { offset: 20, length: 10, kind: 'zero' }, { offset: 30, length: 10, kind: 'data' }],
  },
  {
    name: 'adjacent dirty extents merge',
    dirty: [[10, 1], [10, 1], [80, 0]], alloc: [[100, 0]], want: [{ offset: 0, length: 20, kind: 'data' }],
  },
];
for (const c of dirtyCases) {
  test(`inc/diff: ${c.name}`, async () => {
    const plan = await planDirty(statusOnly(100, { dirty: c.dirty, 'base:allocation': c.alloc }), 'dirty');
    assert.deepEqual([...plan.extents], c.want);
    assert.equal(plan.dataSize, c.want.filter((e) => e.kind === 'data').reduce((a, e) => a + e.length, 0));
  });
}

test('chunks split a range at the maximum and cover it exactly', () => {
  assert.deepEqual([...chunks(5, 25, 10)], [{ offset: 5, length: 10 }, { offset: 15, length: 10 }, { offset: 25, length: 5 }]);
});

test('ExtentList merges adjacent extents of a kind, keeps kinds and gaps apart, and grows past its first capacity', () => {
  const out = new ExtentList();
  out.append(0, 1, 'data');
  out.append(1, 1, 'zero');
  out.append(2, 1, 'zero');
  out.append(5, 1, 'zero');
  assert.deepEqual([...out], [{ offset: 0, length: 1, kind: 'data' }, { offset: 1, length: 2, kind: 'zero' }, { offset: 5, length: 1, kind: 'zero' }]);
  assert.equal(out.length, 3);
  assert.equal(out.dataSize, 1);
  const many = new ExtentList();
  for (let i = 0; i < 100_000; i++) many.append(i * 2 * 4096, 4096, i % 3 === 0 ? 'zero' : 'data');
  assert.equal(many.length, 100_000);
  const all = [...many];
  assert.deepEqual(all[99_999], { offset: 99_999 * 2 * 4096, length: 4096, kind: 'zero' });
  assert.equal(many.dataSize, all.filter((e) => e.kind === 'data').length * 4096);
});
