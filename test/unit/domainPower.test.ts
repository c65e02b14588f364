// The guest agent freeze around the job's start, with a recording stand-in for the libvirt domain: what runs in
// which order (freeze, suspend, job, resume, thaw), thawed also when the job fails, and what is only a warning.
// The real libvirt paths: an agent channel nobody answers on in integration/switches.test.ts, a freeze that
// succeeds (libvirt's test driver) in integration/native.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DomainPower } from '../../src/backup/domainPower.js';
import { Logger } from '../../src/util/log.js';
import type { LibvirtDomain } from '../../src/native/addon.js';

class RecordingLog extends Logger {
  lines: string[] = [];
  override debug(msg: string): void { this.lines.push(`debug ${msg}`); }
  override info(msg: string): void { this.lines.push(`info ${msg}`); }
  override warn(msg: string): void { this.warnings++; this.lines.push(`warn ${msg}`); }
}

/** A running domain whose agent calls and suspend/resume are recorded in `calls`; `fail` makes one of them throw. */
function fakeDomain(calls: string[], fail: Partial<Record<'fsFreeze' | 'fsThaw', string>> = {}): LibvirtDomain {
  const step = async (name: 'fsFreeze' | 'fsThaw', result: number): Promise<number> => {
    calls.push(name);
    if (fail[name]) throw new Error(fail[name]);
    return result;
  };
  const fake: Partial<LibvirtDomain> = {
    name: () => 'guest',
    isActive: async () => true,
    getState: async () => [1, 0],
    fsFreeze: async (mountpoints: string[]) => { calls.push(`mountpoints ${mountpoints.join(',') || 'all'}`); return step('fsFreeze', 2); },
    fsThaw: async () => step('fsThaw', 2),
    suspend: async () => { calls.push('suspend'); },
    resume: async () => { calls.push('resume'); },
  };
  return fake as LibvirtDomain;
}

async function power(calls: string[], log: Logger, fail?: Partial<Record<'fsFreeze' | 'fsThaw', string>>): Promise<DomainPower> {
  return DomainPower.prepare(fakeDomain(calls, fail), false, log);
}

test('freeze, then suspend, the job, resume and thaw, in that order; -F mount points are passed on', async () => {
  const calls: string[] = [];
  const log = new RecordingLog();
  const p = await power(calls, log);
  const result = await p.whileFrozen(true, ['/', '/var'], () => p.whilePaused(true, async () => { calls.push('job'); return 7; }));
  assert.equal(result, 7);
  assert.deepEqual(calls, ['mountpoints /,/var', 'fsFreeze', 'suspend', 'job', 'resume', 'fsThaw']);
  assert.equal(log.warnings, 0);
  assert.ok(log.lines.some((l) => /^info froze 2 filesystem\(s\) of domain 'guest'/.test(l)), log.lines.join('\n'));
});

test('a job that fails to start still thaws, and its error is the one thrown', async () => {
  const calls: string[] = [];
  const p = await power(calls, new RecordingLog());
  await assert.rejects(p.whileFrozen(true, undefined, async () => { calls.push('job'); throw new Error('job refused'); }), /job refused/);
  assert.deepEqual(calls, ['mountpoints all', 'fsFreeze', 'job', 'fsThaw']);
});

test('a freeze that fails is a warning and the job starts unfrozen, with no thaw; a failed thaw is a warning naming the way out', async () => {
  const calls: string[] = [];
  const log = new RecordingLog();
  const p = await power(calls, log, { fsFreeze: 'agent not connected' });
  await p.whileFrozen(true, undefined, async () => { calls.push('job'); });
  assert.deepEqual(calls, ['mountpoints all', 'fsFreeze', 'job']);
  assert.match(log.lines.join('\n'), /warn could not freeze the filesystems of domain 'guest' through its guest agent \(agent not connected\); .*crash-consistent/);

  const thawCalls: string[] = [];
  const thawLog = new RecordingLog();
  const q = await power(thawCalls, thawLog, { fsThaw: 'timed out' });
  await q.whileFrozen(true, undefined, async () => { thawCalls.push('job'); });
  assert.deepEqual(thawCalls, ['mountpoints all', 'fsFreeze', 'job', 'fsThaw']);
  assert.match(thawLog.lines.join('\n'), /warn could not thaw the filesystems of domain 'guest' \(timed out\); its writes wait until 'virsh domfsthaw guest' succeeds/);
});

test('no agent channel: nothing frozen, a debug line, or a warning when -F asked for a freeze', async () => {
  const calls: string[] = [];
  const log = new RecordingLog();
  const p = await power(calls, log);
  await p.whileFrozen(false, undefined, async () => { calls.push('job'); });
  await p.whileFrozen(false, ['/'], async () => { calls.push('job'); });
  assert.deepEqual(calls, ['job', 'job']);
  assert.equal(log.warnings, 1);
  assert.match(log.lines[0] ?? '', /^debug domain 'guest' has no QEMU guest agent channel/);
  assert.match(log.lines[1] ?? '', /^warn domain 'guest' has no QEMU guest agent channel/);
});

test('-S on a host whose virtlogd is not running: one line saying to start it', async () => {
  const stopped: Partial<LibvirtDomain> = {
    name: () => 'guest',
    isActive: async () => false,
    hasManagedSaveImage: async () => false,
    create: async () => { throw new Error("Failed to connect socket to '/run/libvirt/virtlogd-sock': No such file or directory"); },
  };
  await assert.rejects(DomainPower.prepare(stopped as LibvirtDomain, true, new RecordingLog()),
    /^UserError: cannot start domain 'guest' paused for the backup \(-S\): Failed to connect socket to '\/run\/libvirt\/virtlogd-sock': No such file or directory; virtlogd, which keeps QEMU's log, is not running: start it \(systemctl start virtlogd\)$/);
});
