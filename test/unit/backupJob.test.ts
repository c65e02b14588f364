// BackupJob.start against a stand-in domain: a run whose job guard cannot start asks libvirt for no job.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BackupJob } from '../../src/libvirt/backupJob.js';
import type { LibvirtDomain } from '../../src/native/addon.js';
import { Logger } from '../../src/util/log.js';

test('a beginning hook that throws (the job guard could not start) asks libvirt for no job', async () => {
  const calls: string[] = [];
  let jobType = 0;
  const domain = {
    name: () => 'web',
    backupBegin: async () => { calls.push('backupBegin'); jobType = 9; },
    abortJob: async () => { calls.push('abortJob'); jobType = 0; },
    getJobType: async () => ({ type: jobType }),
    checkpointDelete: async (name: string) => { calls.push(`checkpointDelete ${name}`); },
  } as unknown as LibvirtDomain;
  const start = BackupJob.start(domain, {
    server: { socket: '/nonexistent/virtnbdbackup.sock' }, scratchDir: '/nonexistent', targets: ['vda'], checkpointTargets: ['vda'],
    allTargets: ['vda'], checkpoint: { name: 'virtnbdbackup.1', parent: 'virtnbdbackup.0', create: true }, log: new Logger({ quiet: true }),
    hooks: { beginning: () => { throw new Error('cannot start the job guard'); } },
  });
  await assert.rejects(start, /cannot start the job guard/);
  assert.deepEqual(calls, []);
});
