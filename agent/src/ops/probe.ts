// The drill's view of the guest: ONE persistent TCP connection to the guest's service. It
// records each reply (and its time) and any reset: a failover that loses the connection or an
// acknowledged transaction fails the drill.
import { connect, type Socket } from 'node:net';

export interface ProbeSpec { address: string; port: number; request?: string; counter: boolean; interval_ms: number }
export interface ProbeReply { at: number; line: string }

export class GuestProbe {
  readonly replies: ProbeReply[] = [];
  readonly errors: { at: number; error: string }[] = [];
  private sock: Socket | undefined;
  private running = false;
  private buf = '';
  private waiter: ((line: string | null) => void) | undefined;
  connectedAt: number | null = null;

  constructor(readonly spec: ProbeSpec, private readonly now: () => number = Date.now) {}

  /** Connects, retrying (ARP, a guest service restarting) until `timeoutMs`. */
  async open(timeoutMs = 10_000): Promise<void> {
    const t0 = this.now();
    for (;;) {
      try {
        await this.connectOnce(Math.max(500, timeoutMs - (this.now() - t0)));
        break;
      } catch (e) {
        if (this.now() - t0 >= timeoutMs) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    this.attachHandlers();
  }

  private connectOnce(timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const s = connect({ host: this.spec.address, port: this.spec.port });
      const t = setTimeout(() => { s.destroy(); reject(new Error(`probe: no TCP connection to ${this.spec.address}:${this.spec.port} within ${timeoutMs} ms`)); }, timeoutMs);
      s.once('connect', () => { clearTimeout(t); this.sock = s; resolve(); });
      s.once('error', (e) => { clearTimeout(t); reject(new Error(`probe: cannot connect to ${this.spec.address}:${this.spec.port}: ${e.message}`)); });
    });
  }

  private attachHandlers(): void {
    this.connectedAt = this.now();
    const s = this.sock!;
    s.setNoDelay(true);
    s.setEncoding('utf8');
    s.on('data', (d: string) => {
      this.buf += d;
      let i;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        const w = this.waiter; this.waiter = undefined;
        w?.(line);
      }
    });
    const fail = (why: string) => { this.errors.push({ at: this.now(), error: why }); const w = this.waiter; this.waiter = undefined; w?.(null); };
    s.on('error', (e) => fail(`connection error: ${e.message}`));
    s.on('close', () => { if (this.running) fail('connection closed by the far end'); });
  }

  /** Sends `request` in a loop (one outstanding at a time) until stop(). */
  start(): void {
    if (!this.spec.request) return;
    this.running = true;
    void (async () => {
      while (this.running && this.sock && !this.sock.destroyed) {
        const line = await new Promise<string | null>((resolve) => { this.waiter = resolve; this.sock!.write(this.spec.request + '\n'); });
        if (line === null) break;
        this.replies.push({ at: this.now(), line });
        await new Promise((r) => setTimeout(r, this.spec.interval_ms));
      }
    })();
  }

  async stop(graceMs = 10_000): Promise<void> {
    this.running = false;
    const t0 = this.now();
    while (this.waiter && this.now() - t0 < graceMs) await new Promise((r) => setTimeout(r, 20));
    this.sock?.destroy();
  }
}

export interface ProbeVerdict {
  configured: boolean;
  replies: number;
  connectionKept: boolean;
  errors: string[];
  lastBefore: string | null;
  firstAfter: string | null;
  firstReplyAfterMs: number | null;   // failure → first reply from the survivor
  gapMs: number | null;               // last reply before → first reply after
  counterOk: boolean | null;          // replies consecutive integers (spec.counter)
  problems: string[];
}

/** Judges the probe's record around the moment `failedAt` (pure). */
export function judgeProbe(spec: ProbeSpec, replies: ProbeReply[], errors: { error: string }[], failedAt: number): ProbeVerdict {
  const before = replies.filter((r) => r.at <= failedAt), after = replies.filter((r) => r.at > failedAt);
  const lb = before.at(-1) ?? null, fa = after[0] ?? null;
  const problems: string[] = [];
  if (errors.length) problems.push(`probe connection broke: ${errors.map((e) => e.error).join('; ')}`);
  if (spec.request && !fa) problems.push('no reply from the guest after the failover');
  let counterOk: boolean | null = null;
  if (spec.counter && replies.length) {
    counterOk = true;
    for (let i = 0; i < replies.length; i++) {
      const v = Number(replies[i]!.line);
      if (!Number.isInteger(v)) { counterOk = false; problems.push(`reply ${JSON.stringify(replies[i]!.line)} is not an integer`); break; }
      if (i > 0 && v !== Number(replies[i - 1]!.line) + 1) {
        counterOk = false;
        problems.push(`transaction counter jumped from ${replies[i - 1]!.line} to ${replies[i]!.line} (${v <= Number(replies[i - 1]!.line) ? 'acknowledged transaction lost or repeated' : 'unacknowledged values in between'})`);
        break;
      }
    }
  }
  return {
    configured: true, replies: replies.length, connectionKept: errors.length === 0, errors: errors.map((e) => e.error),
    lastBefore: lb?.line ?? null, firstAfter: fa?.line ?? null,
    firstReplyAfterMs: fa ? fa.at - failedAt : null, gapMs: lb && fa ? fa.at - lb.at : null,
    counterOk, problems,
  };
}
