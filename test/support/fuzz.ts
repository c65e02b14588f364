// Seeded damage for fuzz tests: a reproducible random source, and the byte-level mutations the fuzz tests share
// (a flipped bit, a cut, inserted or filled bytes, a truncation), each described so a failure names it.

/** Park–Miller: `pick(n)` gives 0..n-1, the same sequence for the same seed, so a failure replays. */
export function seeded(seed: number): (n: number) => number {
  let state = seed % 0x7fffffff || 1;
  return (n) => {
    state = (state * 48271) % 0x7fffffff;
    return n > 0 ? state % n : 0;
  };
}

/** One mutation of `bytes` at byte `at` (any place when omitted); returns the damaged copy and what was done. */
export function damageOnce(bytes: Buffer, pick: (n: number) => number, at = pick(bytes.length)): [Buffer, string] {
  const length = 1 + pick(20);
  switch (pick(5)) {
    case 0: {
      const out = Buffer.from(bytes);
      if (at < out.length) out[at] = (out[at] as number) ^ (1 << pick(8));
      return [out, `bit flipped at ${at}`];
    }
    case 1:
      return [bytes.subarray(0, at), `truncated at ${at}`];
    case 2:
      return [Buffer.concat([bytes.subarray(0, at), Buffer.alloc(length, pick(256)), bytes.subarray(at)]), `${length} bytes inserted at ${at}`];
    case 3:
      return [Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + length)]), `${length} bytes cut at ${at}`];
    default: {
      const out = Buffer.from(bytes);
      const value = [0, 0xff, 0x7f, 0x80][pick(4)] as number;
      out.fill(value, at, Math.min(out.length, at + length));
      return [out, `${length} bytes at ${at} set to ${value}`];
    }
  }
}
