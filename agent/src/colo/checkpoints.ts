// Checkpoint accounting from QMP events. During COLO every checkpoint stops the VM (STOP) and
// restarts it (RESUME); the pause between the two is the guest-visible cost of a checkpoint.
// `query-migrate` shows no checkpoint count during COLO, so the events are the source.
// Two clocks: the events' timestamps (QEMU's wall clock: exact pauses, reported times) and the
// agent's monotonic clock at receipt (ages and rates: a wall clock stepped by NTP must not make
// a healthy replica look stalled — 15 min forward dropped protection, simulation clock-step).
// Callers that have no monotonic time pass the event time for both.
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
  /** Monotonic ms when the last checkpoint ended (for its age; never reported). */
  lastMono: number | null = null;
  lastPauseMs: number | null = null;
  private stoppedAt: number | null = null;
  private stoppedMono: number | null = null;
  private recent: number[] = [];
  private pauses: number[] = [];
  private readonly windowMs: number;
  private readonly onCheckpoint: (pauseMs: number) => void;

  constructor(windowMs: number, onCheckpoint: (pauseMs: number) => void = () => undefined) {
    this.windowMs = windowMs;
    this.onCheckpoint = onCheckpoint;
  }

  stop(atMs: number, monoMs = atMs): void { this.stoppedAt = atMs; this.stoppedMono = monoMs; }

  resume(atMs: number, monoMs = atMs): void {
    if (this.stoppedAt === null || this.stoppedMono === null) return;
    // The event times are exact unless the wall clock stepped in between (they then disagree
    // with the monotonic interval by far more than the event delivery jitter).
    const byEvents = atMs - this.stoppedAt, byMono = monoMs - this.stoppedMono;
    const pause = Math.abs(byEvents - byMono) > 1000 ? byMono : byEvents;
    this.stoppedAt = null;
    this.stoppedMono = null;
    this.count++;
    this.lastAt = atMs;
    this.lastMono = monoMs;
    this.lastPauseMs = Math.round(pause * 10) / 10;
    this.recent.push(monoMs);
    this.pauses.push(pause);
    if (this.pauses.length > 500) this.pauses.shift();
    this.prune(monoMs);
    this.onCheckpoint(pause);
  }

  /** A STOP that is not a checkpoint (our own stop, shutdown) must not be paired later. */
  reset(): void { this.stoppedAt = null; this.stoppedMono = null; }

  private prune(now: number): void {
    while (this.recent.length && this.recent[0]! < now - this.windowMs) this.recent.shift();
  }

  /** nowMono: the monotonic clock the rate window is measured on. */
  snapshot(nowMono: number): CheckpointSnapshot {
    this.prune(nowMono);
    const sorted = [...this.pauses].sort((a, b) => a - b);
    return {
      count: this.count, lastAt: this.lastAt, lastPauseMs: this.lastPauseMs, ratePerS: (this.recent.length * 1000) / this.windowMs,
      pauseP50Ms: quantile(sorted, 0.5), pauseP99Ms: quantile(sorted, 0.99),
    };
  }
}
