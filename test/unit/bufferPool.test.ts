// BufferPool: slabs and small size classes are reused after release and never handed out twice; Node's shared
// small-allocation slab and oversized buffers are never pooled; leases of one shared pool reuse each other's slabs.
// SizeClassPool: any length of a class reuses a released buffer of it, within the bytes it may keep.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BufferPool, SizeClassPool, leasePool } from '../../src/util/bufferPool.js';

const SLAB = 4 * 1024 * 1024;

test('a released slab is lent out again, and only once', () => {
  const pool = new BufferPool(SLAB, 2);
  const first = pool.acquire(SLAB - 100);
  assert.equal(first.length, SLAB - 100);
  pool.release(first);
  const again = pool.acquire(SLAB);
  assert.equal(again.buffer, first.buffer);
  assert.notEqual(pool.acquire(SLAB).buffer, first.buffer);
});

test('small pieces share buffers of their size class, not a slab, and each is handed out once', () => {
  const pool = new BufferPool(SLAB, 2);
  const a = pool.acquire(4096);
  const b = pool.acquire(3000);
  assert.equal(a.buffer.byteLength, 4096);
  assert.equal(b.buffer.byteLength, 4096);
  assert.notEqual(a.buffer, b.buffer);
  pool.release(a);
  const c = pool.acquire(2500);
  assert.equal(c.length, 2500);
  assert.equal(c.buffer, a.buffer);
  assert.notEqual(pool.acquire(4096).buffer, a.buffer);
  const mid = pool.acquire(40_000);
  assert.equal(mid.buffer.byteLength, 65536);
  pool.release(mid);
  assert.equal(pool.acquire(65536).buffer, mid.buffer);
});

test('buffers the pool did not size are never kept', () => {
  const pool = new BufferPool(SLAB, 2);
  const huge = pool.acquire(SLAB + 1);
  pool.release(huge);
  assert.notEqual(pool.acquire(SLAB + 1).buffer, huge.buffer);
  const shared = Buffer.allocUnsafe(100); // from Node's shared slab
  pool.release(shared);
  assert.notEqual(pool.acquire(100).buffer, shared.buffer);
});

test('what the pool keeps is bounded', () => {
  const pool = new BufferPool(SLAB, 1);
  const slabs = [pool.acquire(SLAB), pool.acquire(SLAB)];
  for (const s of slabs) pool.release(s);
  assert.equal(pool.acquire(SLAB).buffer, slabs[0].buffer);
  assert.notEqual(pool.acquire(SLAB).buffer, slabs[1].buffer);
  const small = Array.from({ length: 600 }, () => pool.acquire(4096));
  for (const s of small) pool.release(s);
  const reused = new Set(small.map((s) => s.buffer));
  let kept = 0;
  for (let i = 0; i < 600; i++) if (reused.has(pool.acquire(4096).buffer)) kept++;
  assert.equal(kept, 512); // 2 MiB of 4 KiB buffers
});

test('leases of a shared pool: the next user gets the slabs the last one released; it keeps the sum of running leases, then the largest', () => {
  const size = 3 * 1024 * 1024 + 4096; // a slab size no other test or module leases
  const first = leasePool(size, 2);
  const slabs = [first.pool.acquire(size), first.pool.acquire(size), first.pool.acquire(size)];
  for (const slab of slabs) first.pool.release(slab);
  first.end();
  const next = leasePool(size, 2);
  assert.equal(next.pool, first.pool);
  const again = [next.pool.acquire(size), next.pool.acquire(size)];
  // The first lease kept two of its three; the last one kept comes back first.
  assert.ok(again[0]!.buffer === slabs[1]!.buffer && again[1]!.buffer === slabs[0]!.buffer, 'the next lease got new slabs');
  const beside = leasePool(size, 3);
  const more = [...again, ...[0, 1, 2].map(() => beside.pool.acquire(size))];
  for (const slab of more) beside.pool.release(slab);
  // Both leases run: 2 + 3 kept.
  assert.equal(new Set([0, 1, 2, 3, 4, 5].map(() => beside.pool.acquire(size).buffer)).size, 6);
  next.end();
  beside.end();
  beside.end(); // ending twice changes nothing
  const alone = leasePool(size, 1);
  for (const slab of more) alone.pool.release(slab);
  alone.end();
  // No lease runs: the largest lease's 3 are kept.
  const kept = new Set(more.map((b) => b.buffer));
  assert.deepEqual([0, 1, 2, 3].map(() => kept.has(alone.pool.acquire(size).buffer)), [true, true, true, false]);
});

test('a shared pool with no lease running gives its free slabs back after a while', async () => {
  const size = 3 * 1024 * 1024 + 8192; // a slab size no other test or module leases
  const lease = leasePool(size, 2, 200);
  const slabs = [lease.pool.acquire(size), lease.pool.acquire(size)];
  for (const slab of slabs) lease.pool.release(slab);
  lease.end();
  // At once, the next lease still finds them...
  const soon = leasePool(size, 2, 200);
  const again = soon.pool.acquire(size);
  assert.ok(slabs.some((slab) => slab.buffer === again.buffer), 'the slabs were dropped at once');
  soon.pool.release(again);
  soon.end();
  // ...once the idle time has passed, nothing is kept.
  await new Promise((resolve) => setTimeout(resolve, 400));
  const later = leasePool(size, 2, 200);
  assert.ok(slabs.every((slab) => slab.buffer !== later.pool.acquire(size).buffer), 'slabs kept while no lease ran');
  later.end();
});

test('size-class pool: a released buffer serves any length of its class, once, and no more than keepBytes are kept', () => {
  const pool = new SizeClassPool(3 * 1024 * 1024);
  const a = pool.acquire(1_500_000);
  assert.equal(a.length, 1_500_000);
  assert.equal(a.buffer.byteLength, 2 * 1024 * 1024);
  assert.equal(pool.acquire(10).buffer.byteLength, 64 * 1024);
  pool.release(a);
  const b = pool.acquire(2 * 1024 * 1024);
  assert.equal(b.buffer, a.buffer);
  assert.notEqual(pool.acquire(1_100_000).buffer, a.buffer);
  // Two 2 MiB buffers pass the 3 MiB kept: the second is left to the GC.
  const c = pool.acquire(2 * 1024 * 1024);
  pool.release(b);
  pool.release(c);
  assert.equal(pool.acquire(2 * 1024 * 1024).buffer, b.buffer);
  assert.notEqual(pool.acquire(2 * 1024 * 1024).buffer, c.buffer);
  // Node's shared slab (small allocUnsafe) is never taken in.
  const shared = Buffer.allocUnsafe(100);
  pool.release(shared);
  assert.notEqual(pool.acquire(100).buffer, shared.buffer);
});
