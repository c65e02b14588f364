// Bounded concurrency for unordered work (positional writes): at most `maxBytes` and `maxCount` in flight; the
// first failure is kept and rethrown by the next add() or by drain(), and later work is not started.
export class WorkWindow {
  private readonly inFlight = new Set<Promise<void>>();
  private bytes = 0;
  private failure: { error: unknown } | undefined;

  constructor(private readonly maxBytes: number, private readonly maxCount = 64) {}

  /**
   * Adds started work holding `bytes` of memory; waits while the window is full. The work is tracked (its failure
   * handled, settle() waits for it) before an earlier failure is rethrown, so callers need no guard of their own.
   */
  async add(work: Promise<void>, bytes: number): Promise<void> {
    this.bytes += bytes;
    const tracked: Promise<void> = work.then(
      () => undefined,
      (error: unknown) => { this.failure ??= { error }; },
    ).finally(() => {
      this.bytes -= bytes;
      this.inFlight.delete(tracked);
    });
    this.inFlight.add(tracked);
    this.throwIfFailed();
    while (this.inFlight.size > 0 && (this.bytes > this.maxBytes || this.inFlight.size > this.maxCount)) {
      await Promise.race(this.inFlight);
    }
    this.throwIfFailed();
  }

  /** Waits for everything in flight; throws the first failure. */
  async drain(): Promise<void> {
    await Promise.all(this.inFlight);
    this.throwIfFailed();
  }

  /** Waits for everything in flight, ignoring failures (cleanup paths). */
  async settle(): Promise<void> {
    await Promise.allSettled(this.inFlight);
  }

  private throwIfFailed(): void {
    if (this.failure) throw this.failure.error;
  }
}
