// A bandwidth cap (token bucket): take(n) resolves when n more bytes may be sent. Burst of one
// second at the rate, so short deltas go out at once and long copies average the cap.
import type { Clock } from '../util/clock.ts';

export class RateLimiter {
  private readonly bytesPerMs: number;
  private readonly burst: number;
  private tokens: number;
  private last: number;

  constructor(bitsPerS: number, private readonly clock: Pick<Clock, 'mono'>, private readonly sleep: (ms: number) => Promise<void>) {
    this.bytesPerMs = bitsPerS / 8 / 1000;
    this.burst = bitsPerS / 8;
    this.tokens = this.burst;
    this.last = clock.mono();
  }

  /** Waits until `n` bytes fit under the cap, then spends them (n may exceed the burst: it then waits for the deficit). */
  async take(n: number): Promise<void> {
    const now = this.clock.mono();
    this.tokens = Math.min(this.burst, this.tokens + (now - this.last) * this.bytesPerMs);
    this.last = now;
    this.tokens -= n;
    if (this.tokens < 0) await this.sleep(-this.tokens / this.bytesPerMs);
  }
}
