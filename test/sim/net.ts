// The simulated network: hosts A, B (the pair) and W (the witness) on a management network,
// A and B also on a replication network. Every datagram and request crosses a directed link
// that can be cut (any subset, one direction only too), lose, delay, reorder and duplicate
// datagrams; captured heartbeats can be replayed. Everything runs on the (fake) timers, so
// a seed reproduces it exactly.
import type { Prng } from './prng.ts';
import { currentProcess, ioTimeout, outside } from './process.ts';

export type HostId = 'A' | 'B' | 'W';
export type NetId = 'mgmt' | 'repl';

export const ADDR: Record<HostId, Partial<Record<NetId, string>>> = {
  A: { mgmt: '10.0.0.1', repl: '10.1.0.1' },
  B: { mgmt: '10.0.0.2', repl: '10.1.0.2' },
  W: { mgmt: '10.0.0.3' },
};

export function whereIs(addr: string): { host: HostId; net: NetId } | null {
  for (const [host, nets] of Object.entries(ADDR)) {
    for (const [net, a] of Object.entries(nets)) if (a === addr) return { host: host as HostId, net: net as NetId };
  }
  return null;
}

/** Runs f in the context of the process current now (the sender), whoever calls it later. */
function sender<A extends unknown[], R>(f: (...a: A) => R): (...a: A) => R {
  const p = currentProcess();
  return p ? (...a: A) => p.run(() => f(...a)) : f;
}

/** No answer: the request timed out (a cut link, a dead host). */
export class NetTimeout extends Error { constructor(what: string) { super(`${what}: timed out`); } }
/** The host answered with RST: it is up, nothing listens (the agent or witness process is down). */
export class NetRefused extends Error { constructor(what: string) { super(`${what}: ECONNREFUSED`); } }

type Receiver = (buf: Buffer, from: { address: string; port: number }) => void;

export class Net {
  private readonly cuts = new Set<string>();
  readonly hostUp: Record<HostId, boolean> = { A: true, B: true, W: true };
  /** Datagram loss probability, extra jitter (reordering), duplication probability. */
  loss = 0;
  jitterMs = 0;
  dupProb = 0;
  private readonly sockets = new Map<string, Receiver>();
  /** Recent heartbeat datagrams per receiving host, for replay faults. */
  private readonly captured: { to: HostId; addr: string; port: number; buf: Buffer; from: { address: string; port: number } }[] = [];
  datagrams = 0;

  constructor(private readonly rng: Prng) {}

  private key(from: HostId, to: HostId, net: NetId): string { return `${from}>${to}@${net}`; }
  cut(from: HostId, to: HostId, net: NetId, oneWay = false): void {
    this.cuts.add(this.key(from, to, net));
    if (!oneWay) this.cuts.add(this.key(to, from, net));
  }
  heal(from: HostId, to: HostId, net: NetId, oneWay = false): void {
    this.cuts.delete(this.key(from, to, net));
    if (!oneWay) this.cuts.delete(this.key(to, from, net));
  }
  healAll(): void { this.cuts.clear(); this.loss = 0; this.jitterMs = 0; this.dupProb = 0; }
  cutsNow(): string[] { return [...this.cuts].sort(); }

  /** Can a packet go from → to on net right now? */
  up(from: HostId, to: HostId, net: NetId): boolean {
    return this.hostUp[from] && this.hostUp[to] && !!ADDR[from][net] && !!ADDR[to][net] && !this.cuts.has(this.key(from, to, net));
  }
  /** Both directions (a TCP exchange). */
  both(a: HostId, b: HostId, net: NetId): boolean { return this.up(a, b, net) && this.up(b, a, net); }

  latency(): number { return 0.2 + this.rng.next() * 0.8 + (this.jitterMs ? this.rng.next() * this.jitterMs : 0); }

  bind(host: HostId, port: number, rx: Receiver): { close(): void } {
    const keys = Object.values(ADDR[host]).map((a) => `${a}:${port}`);
    for (const k of keys) this.sockets.set(k, rx);
    return { close: () => { for (const k of keys) if (this.sockets.get(k) === rx) this.sockets.delete(k); } };
  }

  /** A UDP datagram from `from` to addr:port (sent from from's address on the same network). */
  datagram(from: HostId, addr: string, port: number, buf: Buffer): void {
    const dst = whereIs(addr);
    if (!dst) return;
    const src = { address: ADDR[from][dst.net] ?? '0.0.0.0', port };
    const copies = this.dupProb && this.rng.chance(this.dupProb) ? 2 : 1;
    for (let i = 0; i < copies; i++) {
      if (!this.up(from, dst.host, dst.net) || (this.loss && this.rng.chance(this.loss))) continue;
      this.datagrams++;
      outside(() => setTimeout(() => { // in flight: no longer the sender's
        if (!this.up(from, dst.host, dst.net)) return;
        const rx = this.sockets.get(`${addr}:${port}`);
        if (!rx) return;
        this.captured.push({ to: dst.host, addr, port, buf, from: src });
        if (this.captured.length > 400) this.captured.splice(0, 100);
        rx(buf, src);
      }, this.latency()));
    }
  }

  /** The nemesis replays n captured datagrams (old heartbeats) to their receivers. */
  replay(n: number): void {
    for (let i = 0; i < n && this.captured.length; i++) {
      const c = this.captured[this.rng.int(0, this.captured.length - 1)]!;
      setTimeout(() => { const rx = this.sockets.get(`${c.addr}:${c.port}`); if (rx && this.hostUp[c.to]) rx(c.buf, c.from); }, this.latency());
    }
  }

  /**
   * A request/answer exchange (HTTP) from → to on net: `serve` runs on the receiver when the
   * request arrives; its answer comes back if the way back is up. Refused when `listening()`
   * is false on a live host; a timeout otherwise.
   */
  exchange<T>(what: string, from: HostId, to: HostId, net: NetId, listening: () => boolean, serve: () => Promise<T>, timeoutMs: number, connectTimeoutMs = timeoutMs): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      // The answer arrives at the sender as I/O (parked while its process is stopped).
      const back = sender((f: () => void) => ioTimeout(f, this.latency()));
      const finish = (f: () => void) => { if (!done) { done = true; clearTimeout(timer); f(); } };
      const timer = setTimeout(() => finish(() => reject(new NetTimeout(what))), this.both(from, to, net) ? timeoutMs : Math.min(connectTimeoutMs, timeoutMs));
      if (!this.both(from, to, net)) return;
      outside(() => setTimeout(() => { // in flight: no longer the sender's
        if (!this.up(from, to, net)) return;
        if (!listening()) { back(() => finish(() => reject(new NetRefused(what)))); return; }
        // The receiver's code is not the sender's: it runs as nobody's (a SimAgent enters its own).
        outside(serve).then(
          (v) => back(() => { if (this.up(to, from, net)) finish(() => resolve(v)); }),
          (e) => back(() => { if (this.up(to, from, net)) finish(() => reject(e)); }));
      }, this.latency()));
    });
  }
}
