// Checks for the chain tests: restore a set (up to a checkpoint) and compare it bit for bit with a snapshot
// taken at that point; virsh as a synchronous one-liner for state checks; a shut-off domain given boot files.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { LIBVIRT_URI, TestDomain } from './testbed.js';
import { ourBin, runOk } from './cli.js';

export function virsh(...args: string[]): string {
  return execFileSync('virsh', ['-c', LIBVIRT_URI, ...args], { encoding: 'utf8' });
}

/** Restores disk vda of `set` (up to `until`) into a fresh dir under `work`; asserts it equals `reference`. */
export async function assertRestoresTo(work: string, set: string, reference: string, until?: string): Promise<void> {
  const out = await fs.mkdtemp(path.join(work, 'restore-'));
  await runOk(ourBin('virtnbdrestore'), ['-i', set, '-o', out, '-n', '-d', 'vda', ...(until ? ['--until', until] : [])]);
  const result = await TestDomain.compare(path.join(out, 'vda.qcow2'), reference);
  assert.ok(result.identical, `${set}${until ? ` until ${until}` : ''} does not restore to ${path.basename(reference)}: ${result.output}`);
}

/**
 * Redefines the shut-off `dom` with a loader, nvram, kernel and initrd: small files of distinct bytes in its dir
 * (the domain is never started with them). Returns their paths by kind.
 */
export async function defineWithBootFiles(dom: TestDomain, work: string): Promise<Record<string, string>> {
  const files: Record<string, string> = {};
  for (const [kind, size] of [['kernel', 8192], ['initrd', 4096], ['code.fd', 65536], ['vars.fd', 65536]] as const) {
    files[kind] = path.join(dom.dir, `boot-${kind}`);
    await fs.writeFile(files[kind] as string, Buffer.alloc(size, kind.length));
  }
  const xml = virsh('dumpxml', dom.name)
    .replace('</os>', `<loader readonly='yes' type='pflash'>${files['code.fd']}</loader><nvram>${files['vars.fd']}</nvram><kernel>${files.kernel}</kernel><initrd>${files.initrd}</initrd></os>`)
    .replace('<devices>', '<features><acpi/></features><devices>');
  await fs.writeFile(path.join(work, 'domain.xml'), xml);
  virsh('define', path.join(work, 'domain.xml'));
  return files;
}
