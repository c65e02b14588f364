// The holders of an existing restore target (holders.ts): the probe's lines parsed, the refusal's one line naming
// each holder and what to do, and a probe that cannot run (no perl there: none known; any other failure: an error).
// The probe itself runs against real loop devices, swap and processes in test/integration/restore-holders.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { holdersRefusal, parseHolders, targetHolders } from '../../src/restore/holders.js';
import type { DomainHost } from '../../src/libvirt/domainHost.js';

test('the refusal names each holder and what to do about it, in one line', () => {
  const holders = parseHolders([
    `loop ${Buffer.from('/dev/loop3').toString('hex')}`,
    `swap ${Buffer.from('/var/swap file').toString('hex')}`,
    `writer 42 ${Buffer.from('qemu-nbd').toString('hex')} `,
    `writer 43 ${Buffer.from('qemu-system-x86_64').toString('hex')} ${Buffer.from('web').toString('hex')}`,
    'noise',
  ].join('\n'));
  assert.deepEqual(holders, [
    { kind: 'loop', device: '/dev/loop3' }, { kind: 'swap', file: '/var/swap file' },
    { kind: 'writer', pid: 42, program: 'qemu-nbd' }, { kind: 'writer', pid: 43, program: 'qemu-system-x86_64', domain: 'web' },
  ]);
  assert.equal(holdersRefusal('/t.raw', ' on root@kvm2', holders), "/t.raw on root@kvm2 is in use: it backs the loop device /dev/loop3, and it is active swap (/proc/swaps), and qemu-nbd (pid 42) and qemu-system-x86_64 (pid 43, domain 'web') hold it open for writing, so it was left untouched; detach it (losetup -d /dev/loop3), turn that swap off (swapoff '/var/swap file'), shut down the domain 'web', stop that process, or restore to another file or into a directory");
  assert.equal(holdersRefusal('/t.raw', '', holders.slice(2, 3)), '/t.raw is in use: qemu-nbd (pid 42) holds it open for writing, so it was left untouched; stop that process, or restore to another file or into a directory');
});

/** A host whose every command fails with `message`. */
const failingHost = (message: string): DomainHost => ({ remote: true, label: 'root@kvm2', run: () => Promise.reject(new Error(message)) }) as unknown as DomainHost;

test('a host without perl holds nothing known; any other failure of the probe is an error, never "no holder"', async () => {
  assert.deepEqual(await targetHolders('/t.raw', failingHost('on root@kvm2: sh: 1: perl: not found; perl is not installed on that host')), []);
  assert.deepEqual(await targetHolders('/t.raw', failingHost('perl is not installed (not found on PATH)')), []);
  await assert.rejects(targetHolders('/t.raw', failingHost('perl failed: syntax error at -e line 3')), /^Error: cannot tell what holds \/t\.raw on root@kvm2: perl failed: syntax error at -e line 3$/);
});
