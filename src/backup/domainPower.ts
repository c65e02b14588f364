// The domain's run state around a backup. -S/--start-domain: a shut-off domain is started paused (its CPUs never
// run, but QEMU is there to create checkpoints and serve the backup job) and destroyed afterwards; it is started
// with AUTODESTROY, so it also goes away if this process dies. --pause: a running domain is suspended while the
// job starts (checkpoint and export are then taken with the guest stopped) and resumed right after. With a QEMU
// guest agent, the guest's filesystems are frozen while the job starts (-F: only those mount points), as
// virtnbdbackup does, so the backup holds them in a consistent state; without one it is crash-consistent.
// A domain whose RAM libvirt saved (virsh managedsave, libvirt-guests at host shutdown) is not started by -S: a
// start would resume the saved guest, and the stop after the backup would lose what it held in memory; it is
// backed up shut off, from its images, which stay untouched for its resume.
// Guarantees: finish() returns the domain to the state it was found in, also after errors and signals; what was
// frozen is thawed once the job has started or failed to.
import { VIR_DOMAIN_RUNNING, VIR_DOMAIN_START_AUTODESTROY, VIR_DOMAIN_START_PAUSED, type LibvirtDomain } from '../native/addon.js';
import type { Logger } from '../util/log.js';
import { UserError, oneLine } from '../util/errors.js';
import { IMAGE_HELD, lockedImage } from './offline.js';

export class DomainPower {
  private constructor(
    private readonly domain: LibvirtDomain,
    /** The domain is shut off and stays so: disks are read from the images. */
    readonly offline: boolean,
    /** We started it (-S) and stop it in finish(). */
    readonly started: boolean,
    private readonly log: Logger,
    /** Shut off with its RAM saved (managed save image): -S leaves it so. */
    readonly saved = false,
  ) {}

  /** Where a run that creates checkpoints can be had, for messages: -S, or for a saved guest its resume. */
  get runningAdvice(): string {
    return this.saved
      ? 'while the domain runs (virsh start resumes its saved state; -S does not start a saved domain)'
      : 'with -S/--start-domain or while the domain runs';
  }

  static async prepare(domain: LibvirtDomain, startDomain: boolean, log: Logger): Promise<DomainPower> {
    if (await domain.isActive()) return new DomainPower(domain, false, false, log);
    if (!startDomain) return new DomainPower(domain, true, false, log, await domain.hasManagedSaveImage());
    if (await domain.hasManagedSaveImage()) {
      log.warn(`domain '${domain.name()}' is shut off with its memory saved (virsh managedsave, or libvirt-guests at host shutdown): -S would resume the saved guest and stop it after the backup, losing what it held in memory, so it is backed up shut off, from its images, which stay as they are`);
      return new DomainPower(domain, true, false, log, true);
    }
    try {
      await domain.create(VIR_DOMAIN_START_PAUSED | VIR_DOMAIN_START_AUTODESTROY);
    } catch (err) {
      // libvirt cannot start QEMU without virtlogd, which takes its output; its message names only a socket.
      const hint = /virtlogd/.test(oneLine(err)) ? '; virtlogd, which keeps QEMU\'s log, is not running: start it (systemctl start virtlogd)' : '';
      // QEMU's lock refusal comes inside a long monitor line, its command line included: the image and the way out.
      const held = /Failed to get "write" lock/.test(oneLine(err)) ? lockedImage(oneLine(err)) : undefined;
      if (held) throw new UserError(`cannot start domain '${domain.name()}' paused for the backup (-S): its image ${held} ${IMAGE_HELD}`);
      throw new UserError(`cannot start domain '${domain.name()}' paused for the backup (-S): ${oneLine(err)}${hint}`);
    }
    log.info(`started shut-off domain '${domain.name()}' paused for the backup; it is stopped again afterwards`);
    return new DomainPower(domain, false, true, log);
  }

  /**
   * Runs `step` with the guest suspended when `pause` asks for it and it is running; `held` hears when it is, and
   * when it runs again.
   */
  async whilePaused<T>(pause: boolean, step: () => Promise<T>, held: (on: boolean) => void = () => undefined): Promise<T> {
    if (!pause || (await this.domain.getState())[0] !== VIR_DOMAIN_RUNNING) return step();
    // Told before the suspend: a run killed while it is under way must still be undone.
    held(true);
    await this.domain.suspend().catch((err: unknown) => {
      held(false);
      throw err;
    });
    this.log.info(`suspended domain '${this.domain.name()}' while the backup job starts`);
    try {
      return await step();
    } finally {
      await this.domain.resume().then(
        () => {
          held(false);
          this.log.info(`resumed domain '${this.domain.name()}'`);
        },
        (err: unknown) => this.log.warn(`could not resume domain '${this.domain.name()}': ${oneLine(err)}; resume it with 'virsh resume ${this.domain.name()}'`),
      );
    }
  }

  /**
   * Runs `step` with the guest's filesystems frozen through its agent (`mountpoints`, or all). A domain without an
   * agent channel, or whose CPUs do not run, is not frozen; an agent that does not answer is a warning.
   */
  async whileFrozen<T>(agent: boolean, mountpoints: string[] | undefined, step: () => Promise<T>, held: (on: boolean) => void = () => undefined): Promise<T> {
    const name = this.domain.name();
    const crashConsistent = 'the backup holds the disks as a power cut would leave them (crash-consistent)';
    if (this.offline || this.started) return step();
    if (!agent) {
      const say = mountpoints ? this.log.warn.bind(this.log) : this.log.debug.bind(this.log);
      say(`domain '${name}' has no QEMU guest agent channel: filesystems not frozen; ${crashConsistent}`);
      return step();
    }
    if ((await this.domain.getState())[0] !== VIR_DOMAIN_RUNNING) {
      this.log.info(`domain '${name}' is not running: filesystems not frozen; ${crashConsistent}`);
      return step();
    }
    try {
      held(true);
      const frozen = await this.domain.fsFreeze(mountpoints ?? []);
      this.log.info(`froze ${frozen} filesystem(s) of domain '${name}' through its guest agent while the backup job starts`);
    } catch (err) {
      held(false);
      this.log.warn(`could not freeze the filesystems of domain '${name}' through its guest agent (${oneLine(err)}); ${crashConsistent}`);
      return step();
    }
    try {
      return await step();
    } finally {
      await this.domain.fsThaw().then(
        (thawed) => {
          held(false);
          this.log.info(`thawed ${thawed} filesystem(s) of domain '${name}'`);
        },
        (err: unknown) => this.log.warn(`could not thaw the filesystems of domain '${name}' (${oneLine(err)}); its writes wait until 'virsh domfsthaw ${name}' succeeds`),
      );
    }
  }

  /** Stops the domain again if we started it. */
  async finish(): Promise<void> {
    if (!this.started) return;
    try {
      await this.domain.destroy();
      this.log.info(`stopped domain '${this.domain.name()}' again`);
    } catch (err) {
      this.log.warn(`could not stop domain '${this.domain.name()}' that was started for the backup: ${oneLine(err)}`);
    }
  }
}
