// Checkpoint accounting from QMP events. During COLO every checkpoint stops the VM (STOP) and
// restarts it (RESUME); the pause between the two is the guest-visible cost of a checkpoint.
// `query-migrate` shows no checkpoint count during COLO, so the events are the source.
export interface CheckpointSnapshot {
  count: number;
  lastAt: number | null;       // epoch ms of the last completed checkpoint
  lastPauseMs: number | null;
  /** Checkpoints per second over the recent window (mismatch storms show up here). */
  ratePerS: number;
  /** Guest pause per checkpoint over the last (up to) 500 checkpoints. */
  pauseP50Ms: number | null;
  pauseP99Ms: number | null;
}

function quantile(sorted: number[], q: number): number | null {
  if (sorted.length === 0) return null;
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]! * 10) / 10;
}

export class CheckpointTracker {
  count = 0;
  lastAt: number | null = null;
  lastPauseMs: number | null = null;
  private stoppedAt: number | null = null;
  private recent: number[] = [];
  private pauses: number[] = [];
  private readonly windowMs: number;
  private readonly onCheckpoint: (pauseMs: number) => void;

  constructor(windowMs: number, onCheckpoint: (pauseMs: number) => void = () => undefined) {
    this.windowMs = windowMs;
    this.onCheckpoint = onCheckpoint;
  }

  stop(atMs: number): void { this.stoppedAt = atMs; }

  resume(atMs: number): void {
    if (this.stoppedAt === null) return;
    const pause = atMs - this.stoppedAt;
    this.stoppedAt = null;
    this.count++;
    this.lastAt = atMs;
    this.lastPauseMs = Math.round(pause * 10) / 10;
    this.recent.push(atMs);
    this.pauses.push(pause);
    if (this.pauses.length > 500) this.pauses.shift();
    this.prune(atMs);
    this.onCheckpoint(pause);
  }

  /** A STOP that is not a checkpoint (our own stop, shutdown) must not be paired later. */
  reset(): void { this.stoppedAt = null; }

  private prune(now: number): void {
    while (this.recent.length && this.recent[0]! < now - this.windowMs) this.recent.shift();
  }

  snapshot(now: number): CheckpointSnapshot {
    this.prune(now);
    const sorted = [...this.pauses].sort((a, b) => a - b);
    return {
      count: this.count, lastAt: this.lastAt, lastPauseMs: this.lastPauseMs, ratePerS: (this.recent.length * 1000) / this.windowMs,
      pauseP50Ms: quantile(sorted, 0.5), pauseP99Ms: quantile(sorted, 0.99),
    };
  }
}
