// Whether QEMU's user may create files in a directory, judged by owner, group and mode as the kernel does; who QEMU
// runs as, from libvirt's DAC label or qemu.conf.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { firstRefusal, fromQemuConf, fromSeclabel, modeAllows, type QemuUser } from '../../src/backup/qemuAccess.js';

const QEMU: QemuUser = { uid: 64055, gid: 64055, groups: [107, 64055], source: 'test' };
const dir = (p: string, uid: number, gid: number, mode: number) => ({ path: p, uid, gid, mode });

test('mode bits: the owner\'s class alone when QEMU owns it, else the group\'s (primary or supplementary), else others\'', () => {
  assert.equal(modeAllows(dir('/d', 64055, 0, 0o077), QEMU, 3), false, 'the owner class refuses even where others may');
  assert.equal(modeAllows(dir('/d', 64055, 0, 0o700), QEMU, 3), true);
  assert.equal(modeAllows(dir('/d', 0, 107, 0o770), QEMU, 3), true, 'a supplementary group (kvm)');
  assert.equal(modeAllows(dir('/d', 0, 107, 0o750), QEMU, 3), false, 'the group may not write');
  assert.equal(modeAllows(dir('/d', 0, 0, 0o1777), QEMU, 3), true, 'sticky /tmp');
  assert.equal(modeAllows(dir('/d', 0, 0, 0o755), QEMU, 1), true);
  assert.equal(modeAllows(dir('/d', 0, 0, 0o700), { ...QEMU, uid: 0 }, 3), true, 'root');
});

test('the first directory that refuses: a parent QEMU may not enter, or the directory itself it may not write', () => {
  const open = [dir('/', 0, 0, 0o755), dir('/var', 0, 0, 0o755), dir('/var/tmp', 0, 0, 0o1777)];
  assert.equal(firstRefusal(open, QEMU), undefined);
  assert.deepEqual(firstRefusal([dir('/', 0, 0, 0o755), dir('/srv', 0, 0, 0o755)], QEMU), { dir: dir('/srv', 0, 0, 0o755), lacks: 'write' });
  assert.deepEqual(firstRefusal([dir('/', 0, 0, 0o755), dir('/srv', 0, 0, 0o700), dir('/srv/x', 0, 0, 0o777)], QEMU), { dir: dir('/srv', 0, 0, 0o700), lacks: 'search' });
  assert.deepEqual(firstRefusal([dir('/', 0, 0, 0o755), dir('/x', 0, 0, 0o700)], QEMU), { dir: dir('/x', 0, 0, 0o700), lacks: 'write' });
});

test('QEMU\'s user from the live XML\'s DAC label, or qemu.conf (numeric values taken as they are)', () => {
  const xml = `<domain><seclabel type='dynamic' model='dac' relabel='yes'>\n    <label>+4242:+4343</label>\n    <imagelabel>+4242:+4343</imagelabel>\n  </seclabel></domain>`;
  const label = fromSeclabel(xml);
  assert.equal(label?.uid, 4242);
  assert.equal(label?.gid, 4343);
  assert.equal(fromSeclabel('<domain><seclabel type=\'none\' model=\'apparmor\'/></domain>'), undefined);
  const conf = fromQemuConf('#user = "nobody"\nuser = "+4242"\ngroup = "+4343"\n');
  assert.equal(conf?.uid, 4242);
  assert.equal(conf?.gid, 4343);
});
