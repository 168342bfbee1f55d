// Guest-facing observers for end-to-end tests.
import { connect, type Socket } from 'node:net';
import { readFileSync } from 'node:fs';

/** Everything opened by a test, so withPair() can close it even when the test fails. */
export const openObservers = new Set<{ close(): void }>();

export interface Txn { sentAt: number; ackAt: number; value: number }

/**
 * Issues transactions to the guest's service over ONE persistent TCP connection: "inc\n" →
 * the guest increments its durable counter, fsyncs, then replies the value. Never reconnects:
 * a reset or a close is recorded as an error, which is what the tests assert against.
 */
export class TxnClient {
  readonly txns: Txn[] = [];
  readonly errors: { at: number; error: string }[] = [];
  private sock: Socket | undefined;
  private running = false;
  private buf = '';
  private pending: { sentAt: number; resolve: (v: number) => void; reject: (e: Error) => void } | undefined;
  localPort: number | undefined;
  connects = 0;

  constructor(readonly host: string, readonly port = 7000, readonly gapMs = 20) { openObservers.add(this); }

  async open(timeoutMs = 30_000): Promise<void> {
    const t0 = Date.now();
    for (;;) {
      try {
        await new Promise<void>((resolve, reject) => {
          const s = connect({ host: this.host, port: this.port });
          const timer = setTimeout(() => { s.destroy(); reject(new Error('connect timeout')); }, 2000);
          s.once('connect', () => { clearTimeout(timer); this.sock = s; resolve(); });
          s.once('error', (e) => { clearTimeout(timer); reject(e); });
        });
        break;
      } catch (e) {
        if (Date.now() - t0 > timeoutMs) throw new Error(`guest service ${this.host}:${this.port} not reachable: ${(e as Error).message}`);
        await new Promise((r) => setTimeout(r, 300));
      }
    }
    this.connects++;
    this.localPort = this.sock!.localPort;
    this.sock!.setNoDelay(true);
    this.sock!.setEncoding('utf8');
    this.sock!.on('data', (d: string) => {
      this.buf += d;
      let i;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i).trim(); this.buf = this.buf.slice(i + 1);
        const p = this.pending; this.pending = undefined;
        p?.resolve(Number(line));
      }
    });
    const fail = (why: string) => { const p = this.pending; this.pending = undefined; this.errors.push({ at: Date.now(), error: why }); p?.reject(new Error(why)); this.running = false; };
    this.sock!.on('error', (e) => fail(`socket error: ${e.message}`));
    this.sock!.on('close', () => { if (this.running) fail('connection closed'); });
  }

  private request(line: string): Promise<number> {
    return new Promise((resolve, reject) => {
      this.pending = { sentAt: Date.now(), resolve, reject };
      this.sock!.write(line + '\n');
    });
  }

  /** The guest's durable counter as read from its disk. */
  get(): Promise<number> { return this.request('get'); }

  /** Runs transactions back to back (with gapMs between) until stop(). */
  start(): void {
    this.running = true;
    void (async () => {
      while (this.running) {
        const sentAt = Date.now();
        try {
          const value = await this.request('inc');
          this.txns.push({ sentAt, ackAt: Date.now(), value });
        } catch { break; }
        await new Promise((r) => setTimeout(r, this.gapMs));
      }
    })();
  }

  async stop(): Promise<void> {
    this.running = false;
    const t0 = Date.now();
    while (this.pending && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 20));
  }

  close(): void { this.running = false; this.sock?.destroy(); openObservers.delete(this); }

  lastAckBefore(t: number): Txn | undefined { return [...this.txns].reverse().find((x) => x.ackAt <= t); }
  firstAckAfter(t: number): Txn | undefined { return this.txns.find((x) => x.ackAt > t); }
}

/** Timestamps each new serial line of a guest console log as it appears (polling). */
export class SerialWatcher {
  readonly lines: { at: number; line: string }[] = [];
  private offset = 0;
  private timer: NodeJS.Timeout;
  private partial = '';
  constructor(readonly path: string, pollMs = 20) {
    try { this.offset = readFileSync(path).length; } catch { this.offset = 0; }
    this.timer = setInterval(() => this.poll(), pollMs);
    this.timer.unref();
    openObservers.add(this);
  }
  private poll(): void {
    let buf: Buffer;
    try { buf = readFileSync(this.path); } catch { return; }
    if (buf.length < this.offset) this.offset = 0;
    if (buf.length === this.offset) return;
    const text = this.partial + buf.subarray(this.offset).toString('utf8');
    this.offset = buf.length;
    const parts = text.split('\n');
    this.partial = parts.pop() ?? '';
    const now = Date.now();
    for (const p of parts) this.lines.push({ at: now, line: p.replace(/\r/g, '') });
  }
  ticks(): { at: number; n: number; disk: number }[] {
    return this.lines.flatMap((l) => { const m = /^tick (\d+) disk=(\d+)$/.exec(l.line); return m ? [{ at: l.at, n: Number(m[1]), disk: Number(m[2]) }] : []; });
  }
  stop(): void { clearInterval(this.timer); this.poll(); openObservers.delete(this); }
  close(): void { this.stop(); }
}
