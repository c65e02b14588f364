// TLS certificates for the remote-domain tests: a throwaway CA, a server certificate for 127.0.0.1 installed where
// libvirt's QEMU looks by default (/etc/pki/qemu), and a client certificate in a scratch dir; for virtnbdmap's, the
// same set in scratch dirs only, plus a client certificate of another CA. Guarantees: an
// /etc/pki/qemu these tests did not write is never touched (the caller skips), and what this creates is removed at
// the end, or by the next run when a killed one left it (marked as ours).
import type { TestContext } from 'node:test';
import fs from 'node:fs/promises';
import path from 'node:path';
import { run, withTempDir } from './testbed.js';
import { cleanup } from './cleanup.js';

export const HOST_TLS_DIR = '/etc/pki/qemu';
/** Marks an /etc/pki/qemu these tests wrote. */
const OURS = '.vnbdtest-certificates';

const exists = (file: string): Promise<boolean> => fs.access(file).then(() => true, () => false);

async function issue(dir: string, name: string, subject: string, usage: 'serverAuth' | 'clientAuth'): Promise<void> {
  const key = path.join(dir, `${name}-key.pem`);
  const csr = path.join(dir, `${name}.csr`);
  const ext = path.join(dir, `${name}.ext`);
  await run('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${subject}`]);
  await fs.writeFile(ext, `subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=${usage}\nkeyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n`);
  await run('openssl', ['x509', '-req', '-in', csr, '-CA', path.join(dir, 'ca-cert.pem'), '-CAkey', path.join(dir, 'ca-key.pem'),
    '-CAcreateserial', '-out', path.join(dir, `${name}-cert.pem`), '-days', '2', '-extfile', ext]);
}

export interface ScratchCertificates {
  /** ca-cert.pem, server-cert.pem, server-key.pem (a server for 127.0.0.1 and localhost). */
  server: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem, as libnbd's tls-certificates= reads them. */
  client: string;
  /** A client's files as `client`, its certificate signed by another CA (which the server does not trust). */
  stranger: string;
  /** Everything: the CA's key too. */
  work: string;
}

async function makeCa(dir: string, name: string): Promise<void> {
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', path.join(dir, 'ca-key.pem'), '-out', path.join(dir, 'ca-cert.pem'), '-days', '2', '-subj', `/CN=${name}`]);
}

async function gather(from: string, to: string, files: string[]): Promise<string> {
  await fs.mkdir(to);
  for (const file of files) await fs.copyFile(path.join(from, file), path.join(to, file));
  return to;
}

/** A throwaway CA with a server and a client certificate, in a scratch dir removed when the test ends. */
export async function withScratchCertificates(t: TestContext): Promise<ScratchCertificates> {
  const work = await withTempDir(t, 'tls-');
  await makeCa(work, 'vnbdtest CA');
  await issue(work, 'server', 'localhost', 'serverAuth');
  await issue(work, 'client', 'vnbdtest client', 'clientAuth');
  const otherCa = await gather(work, path.join(work, 'other-ca'), []);
  await makeCa(otherCa, 'vnbdtest other CA');
  await issue(otherCa, 'client', 'vnbdtest stranger', 'clientAuth');
  const stranger = await gather(otherCa, path.join(work, 'stranger'), ['client-cert.pem', 'client-key.pem']);
  // It trusts the server (our CA), the server does not trust it.
  await fs.copyFile(path.join(work, 'ca-cert.pem'), path.join(stranger, 'ca-cert.pem'));
  return {
    server: await gather(work, path.join(work, 'server'), ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']),
    client: await gather(work, path.join(work, 'client'), ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']),
    stranger,
    work,
  };
}

/**
 * Sets up TLS for this host's libvirt backup jobs and returns the client's certificate dir; undefined when
 * /etc/pki/qemu already exists (someone's real set-up: the test is then skipped).
 */
export async function withHostTlsCertificates(t: TestContext): Promise<string | undefined> {
  // A leftover of an earlier run that was killed is ours to replace; anything else is left alone.
  if (await exists(path.join(HOST_TLS_DIR, OURS))) await fs.rm(HOST_TLS_DIR, { recursive: true, force: true });
  if (await exists(HOST_TLS_DIR)) return undefined;
  const { work, client } = await withScratchCertificates(t);

  const pkiCreated = !(await exists(path.dirname(HOST_TLS_DIR)));
  cleanup(t, () => fs.rm(pkiCreated ? path.dirname(HOST_TLS_DIR) : HOST_TLS_DIR, { recursive: true, force: true }));
  await fs.mkdir(HOST_TLS_DIR, { recursive: true, mode: 0o755 });
  await fs.writeFile(path.join(HOST_TLS_DIR, OURS), 'throwaway certificates of the virtnbd tests\n');
  for (const file of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) {
    await fs.copyFile(path.join(work, file), path.join(HOST_TLS_DIR, file));
  }
  // QEMU runs as libvirt-qemu and reads the key itself.
  await run('chgrp', ['libvirt-qemu', path.join(HOST_TLS_DIR, 'server-key.pem')]);
  await fs.chmod(path.join(HOST_TLS_DIR, 'server-key.pem'), 0o640);
  return client;
}
