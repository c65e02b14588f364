// The domain's run state around a backup. -S/--start-domain: a shut-off domain is started paused (its CPUs never
// run, but QEMU is there to create checkpoints and serve the backup job) and destroyed afterwards; it is started
// with AUTODESTROY, so it also goes away if this process dies. --pause: a running domain is suspended while the
// job starts (checkpoint and export are then taken with the guest stopped) and resumed right after.
// Guarantees: finish() returns the domain to the state it was found in, also after errors and signals.
import { VIR_DOMAIN_RUNNING, VIR_DOMAIN_START_AUTODESTROY, VIR_DOMAIN_START_PAUSED, type LibvirtDomain } from '../native/addon.js';
import type { Logger } from '../util/log.js';
import { UserError, oneLine } from '../util/errors.js';

export class DomainPower {
  private constructor(
    private readonly domain: LibvirtDomain,
    /** The domain is shut off and stays so: disks are read from the images. */
    readonly offline: boolean,
    /** We started it (-S) and stop it in finish(). */
    readonly started: boolean,
    private readonly log: Logger,
  ) {}

  static async prepare(domain: LibvirtDomain, startDomain: boolean, log: Logger): Promise<DomainPower> {
    if (await domain.isActive()) return new DomainPower(domain, false, false, log);
    if (!startDomain) return new DomainPower(domain, true, false, log);
    try {
      await domain.create(VIR_DOMAIN_START_PAUSED | VIR_DOMAIN_START_AUTODESTROY);
    } catch (err) {
      throw new UserError(`cannot start domain '${domain.name()}' paused for the backup (-S): ${oneLine(err)}`);
    }
    log.info(`started shut-off domain '${domain.name()}' paused for the backup; it is stopped again afterwards`);
    return new DomainPower(domain, false, true, log);
  }

  /** Runs `step` with the guest suspended when `pause` asks for it and it is running. */
  async whilePaused<T>(pause: boolean, step: () => Promise<T>): Promise<T> {
    if (!pause || (await this.domain.getState())[0] !== VIR_DOMAIN_RUNNING) return step();
    await this.domain.suspend();
    this.log.info(`suspended domain '${this.domain.name()}' while the backup job starts`);
    try {
      return await step();
    } finally {
      await this.domain.resume().then(
        () => this.log.info(`resumed domain '${this.domain.name()}'`),
        (err: unknown) => this.log.warn(`could not resume domain '${this.domain.name()}': ${oneLine(err)}; resume it with 'virsh resume ${this.domain.name()}'`),
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
