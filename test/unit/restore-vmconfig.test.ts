// -c/--adjust-config: the saved domain XML made to describe the restored machine, everything else left as it was.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { adjustDomainConfig } from '../../src/restore/vmconfig.js';
import { parseDomainXml } from '../../src/libvirt/domainXml.js';

/** One <disk> element of the saved XML. */
const diskXml = (type: string, device: string, format: string, source: string, target: string, extra = ''): string => `
    <disk type='${type}' device='${device}'>
      <driver name='qemu' type='${format}'${format === 'qcow2' && target === 'vda' ? " discard='unmap'" : ''}/>
      <source ${source}/>${extra}
      <target dev='${target}' bus='${device === 'cdrom' ? 'sata' : 'virtio'}'/>
    </disk>`;

const SAVED = `<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web &amp; db</name>
  <uuid>8f0e2a9c-1f7e-4c55-9a53-0d1f6a2b3c4d</uuid>
  <!-- kept -->
  <description>a &lt;tag&gt;</description>
  <os><type arch='x86_64'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
  <devices>${[
    diskXml('file', 'disk', 'qcow2', "file='/vm/web.qcow2' index='2'", 'vda', `
      <backingStore type='file' index='3'><format type='qcow2'/><source file='/vm/base.qcow2'/></backingStore>`),
    diskXml('block', 'disk', 'raw', "dev='/dev/vg/data'", 'vdb'),
    diskXml('file', 'cdrom', 'raw', "file='/iso/install.iso'", 'sda', `
      <readonly/>`),
    diskXml('file', 'disk', 'qcow2', "file='/vm/excluded.qcow2'", 'vdc'),
  ].join('')}
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>
  </devices>
  <qemu:commandline><qemu:arg value='-no-shutdown'/></qemu:commandline>
</domain>
`;

test('adjusted XML: no uuid, new name, restored disks pointed at their images, the rest removed', () => {
  const { xml, name, changes } = adjustDomainConfig(SAVED, {
    disks: new Map([['vda', { path: '/restore/web.qcow2', format: 'qcow2' }]]),
    keepRawDevices: false,
  });
  assert.equal(name, 'restore_web & db');
  assert.doesNotMatch(xml, /<uuid>/);
  assert.doesNotMatch(xml, /backingStore|base\.qcow2|nvram/);
  const info = parseDomainXml(xml);
  assert.equal(info.name, 'restore_web & db');
  assert.deepEqual(info.disks.map((d) => [d.target, d.path, d.format, d.type]), [['vda', '/restore/web.qcow2', 'qcow2', 'file']]);
  // What -c does not touch comes out as it went in.
  assert.match(xml, /<!-- kept -->/);
  assert.match(xml, /<description>a &lt;tag&gt;<\/description>/);
  assert.match(xml, /<driver name="qemu" type="qcow2" discard="unmap"\/>/);
  assert.match(xml, /<mac address="52:54:00:00:00:01"\/>/);
  assert.match(xml, /<qemu:commandline><qemu:arg value="-no-shutdown"\/><\/qemu:commandline>/);
  assert.match(xml, /<loader readonly="yes" type="pflash">\/usr\/share\/OVMF\/OVMF_CODE.fd<\/loader>/);
  assert.ok(changes.some((c) => /cdrom sda removed/.test(c)) && changes.some((c) => /disk vdc removed: not restored/.test(c)), changes.join('\n'));
});

test('-N names the domain; -r keeps cdroms; raw disks and block targets; the NVRAM points at its restored copy', () => {
  const { xml } = adjustDomainConfig(SAVED, {
    name: 'web2',
    disks: new Map([['vda', { path: '/dev/vg/restored', format: 'raw', block: true }], ['vdb', { path: '/restore/data', format: 'raw' }]]),
    keepRawDevices: true,
    nvram: '/restore/web_VARS.fd',
  });
  const info = parseDomainXml(xml);
  assert.equal(info.name, 'web2');
  assert.equal(info.bootFiles.nvram, '/restore/web_VARS.fd');
  assert.deepEqual(info.disks.map((d) => [d.target, d.device, d.type, d.path, d.format]), [
    ['vda', 'disk', 'block', '/dev/vg/restored', 'raw'],
    ['vdb', 'disk', 'file', '/restore/data', 'raw'],
    ['sda', 'cdrom', 'file', '/iso/install.iso', 'raw'],
  ]);
  assert.doesNotMatch(xml, /index=/, 'source attributes of the old location are dropped');
});

test('an encrypted disk (LUKS, in its source or beside it) loses its <encryption>: the restored image holds the data decrypted', () => {
  const secret = "<encryption format='luks'><secret type='passphrase' uuid='0b6d4c2e-5c4a-4d0e-9d55-0f2b7c1e9a11'/></encryption>";
  const saved = `<domain type='kvm'><name>vault</name><devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/vm/vault.qcow2'>${secret}</source><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/vm/keys.qcow2'/>${secret}<target dev='vdb' bus='virtio'/></disk>
  </devices></domain>`;
  assert.deepEqual(parseDomainXml(saved).disks.map((d) => d.encrypted), [true, true]);
  const { xml, changes } = adjustDomainConfig(saved, {
    disks: new Map([['vda', { path: '/restore/vault.qcow2', format: 'qcow2' }], ['vdb', { path: '/restore/keys.qcow2', format: 'qcow2' }]]),
    keepRawDevices: false,
  });
  assert.doesNotMatch(xml, /encryption|secret/);
  assert.deepEqual(parseDomainXml(xml).disks.map((d) => [d.target, d.path, d.encrypted]), [['vda', '/restore/vault.qcow2', undefined], ['vdb', '/restore/keys.qcow2', undefined]]);
  assert.equal(changes.filter((c) => /its encryption removed: the backup holds the disk as the guest read it, and the restored image is not encrypted$/.test(c)).length, 2, changes.join('\n'));
});

test('not a domain XML is refused, and so is damaged XML (which the parser would take as it comes)', () => {
  const adjust = (xml: string): unknown => adjustDomainConfig(xml, { disks: new Map(), keepRawDevices: false });
  assert.throws(() => adjust('<network><name>x</name></network>'), /no <domain> element/);
  assert.throws(() => adjust('<domain><name>x'), /^Error: not well-formed XML \(line 1: elements left open: domain, name\)$/);
  assert.throws(() => adjust('<domain>\n<name>x</nam></domain>'), /^Error: not well-formed XML \(line 2: Expected closing tag 'name' .*\)$/);
});

test('a network disk (rbd with a login) becomes a file disk: its hosts, login and network settings go, its target and driver stay', () => {
  const saved = `<domain type='kvm'><name>web</name><devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <auth username='admin'><secret type='ceph' uuid='2d26efa8-890b-3aa3-8d4c-2496d2d86b6a'/></auth>
      <source protocol='rbd' name='vms/web-disk1' index='2'><host name='10.0.0.1' port='6789'/><host name='10.0.0.2'/><snapshot name='s'/></source>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices></domain>`;
  const { xml, changes } = adjustDomainConfig(saved, { disks: new Map([['vdb', { path: '/restore/web-disk1.raw', format: 'raw' }]]), keepRawDevices: true });
  assert.doesNotMatch(xml, /network|protocol|<host|<auth|<secret|<snapshot|index=/);
  assert.match(xml, /<disk type="file" device="disk">\s*<driver name="qemu" type="raw" cache="none"\/>\s*<source file="\/restore\/web-disk1.raw"\/>\s*<target dev="vdb" bus="virtio"\/>/);
  assert.deepEqual(parseDomainXml(xml).disks.map((d) => [d.target, d.type, d.path]), [['vdb', 'file', '/restore/web-disk1.raw']]);
  assert.ok(changes.some((c) => c.startsWith('disk vdb -> /restore/web-disk1.raw (raw)')), changes.join('\n'));
});

test('a disk that was a slice of its file (<slices>) loses the slice: the restored image is the slice alone, from its first byte', () => {
  const saved = `<domain type='kvm'><name>sliced</name><devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/vm/big.img'><slices><slice type='storage' offset='1048576' size='4194304'/></slices></source><target dev='vdb' bus='virtio'/></disk>
  </devices></domain>`;
  assert.deepEqual(parseDomainXml(saved).disks[0]?.slice, { offset: 1048576, size: 4194304 });
  const { xml } = adjustDomainConfig(saved, { disks: new Map([['vdb', { path: '/restore/big.img', format: 'raw' }]]), keepRawDevices: true });
  assert.doesNotMatch(xml, /<slice/);
  assert.deepEqual(parseDomainXml(xml).disks.map((d) => [d.target, d.path, d.slice]), [['vdb', '/restore/big.img', undefined]]);
});
