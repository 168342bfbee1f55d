// Heartbeats: a UDP datagram to every configured peer address every interval; the peer
// answers each ping with a pong. Per path we know when we last heard back and the RTT. The
// peer's agent is "silent" only when NO path delivered anything for the timeout, so one cut
// link never looks like a dead peer. Datagrams carry the peer's VM summaries and are
// authenticated with an HMAC under the pair's heartbeat key (heartbeat.key_file; default the API token).
//
// Freshness: an authentic datagram can still be old (replayed by someone on the path, or queued
// in our socket while this agent was stopped: a primary whose agent slept 23 s once read the
// peer's heartbeats from before a partition on waking and took them as news). So every datagram
// echoes the newest ping its sender received from us (`echo`: our instance and ping seq), and it
// counts only as evidence that the peer was alive when we SENT that ping: a datagram echoing a
// ping of an earlier life of this agent, or one older than the timeout, says nothing. The price:
// a one-way link counts as down on both sides (liveness needs a round trip).
import { createHmac, randomUUID, timingSafeEqual } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { isIPv6 } from 'node:net';
import type { Clock } from '../util/clock.ts';
import type { Logger } from '../log/logger.ts';

export interface VmSummary {
  state: string;        // the VM's local state on the sender (see colo/states.ts VmState)
  epoch: number;
  primaryEpoch: number; // epoch of the sender's latest promotion for this VM (0 = never primary)
  qemu: boolean;        // a QEMU process for this VM is alive on the sender
  sick?: string;        // secondary: why it should not be trusted
  protection?: string;  // primary: id of its current (or last) protection attempt (PrepareRequest.protection)
  checkpoints?: number; // checkpoints seen by the sender's QEMU since it started
}

export interface HeartbeatMessage {
  v: 2;                 // 2: with `echo` (an agent speaking v1 is rejected and counted: upgrade both hosts)
  t: 'ping' | 'pong';
  from: string;
  inst: string;          // agent instance id: changes on every agent start
  seq: number;
  path: number;          // index in the sender's peer.addresses
  sent: number;          // sender's monotonic ms (echoed in the pong for RTT)
  /** The newest ping the sender received from the recipient (a pong: the ping it answers). */
  echo: { inst: string; seq: number } | null;
  vms: Record<string, VmSummary>;
}

export interface PathStatus {
  address: string;
  up: boolean;
  lastHeardMs: number | null; // ms since the last pong on this path
  rttMs: number | null;
}

export interface PeerView {
  alive: boolean;             // heard on some path within the timeout
  lastHeardMs: number | null;
  instance: string | null;
  vms: Record<string, VmSummary>;
  paths: PathStatus[];
}

export interface HeartbeatOptions {
  node: string;
  peer: string;
  peerAddresses: string[];
  peerPort: number;
  listenAddress: string;
  listenPort: number;
  intervalMs: number;
  timeoutMs: number;
  key: string;
  /**
   * A key being replaced (key rotation, or the API token of agents configured before
   * heartbeat.key_file): also accepted, and used to answer a peer that still signs with it, so
   * two hosts that change keys one after the other never take each other for dead.
   */
  previousKey?: string;
  clock: Clock;
  log: Logger;
  summaries: () => Record<string, VmSummary>;
  onChange: (view: PeerView, why: string) => void;
  /** The UDP socket (default: node:dgram). The simulator passes its network. */
  transport?: DatagramTransport;
}

/** A bound datagram socket, as the heartbeat service uses one. */
export interface DatagramSocket {
  send(buf: Buffer, port: number, address: string): void;
  close(): void;
}
export interface DatagramTransport {
  bind(address: string, port: number, onMessage: (buf: Buffer, from: { address: string; port: number }) => void, onError: (e: Error) => void): Promise<DatagramSocket>;
}

export const udpTransport: DatagramTransport = {
  async bind(address, port, onMessage, onError) {
    const sock = createSocket({ type: isIPv6(address) ? 'udp6' : 'udp4', reuseAddr: false });
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject);
      sock.bind(port, address, () => { sock.off('error', reject); resolve(); });
    });
    sock.on('message', (buf, rinfo) => onMessage(buf, { address: rinfo.address, port: rinfo.port }));
    sock.on('error', onError);
    return {
      // Errors (EHOSTUNREACH/ENETUNREACH on a dead path) are expected: the path just stays silent.
      send: (buf, p, a) => sock.send(buf, p, a, () => undefined),
      close: () => { try { sock.close(); } catch { /* already closed */ } },
    };
  },
};

interface PathState { lastHeard: number | null; rtt: number | null }

export class HeartbeatService {
  private readonly o: HeartbeatOptions;
  readonly instance = randomUUID();
  private sock: DatagramSocket | undefined;
  private timer: NodeJS.Timeout | undefined;
  private seq = 0;
  private paths: PathState[];
  private lastHeard: number | null = null;
  private peerInstance: string | null = null;
  private peerVms: Record<string, VmSummary> = {};
  /** Our pings' send times by seq (only as long as they can prove freshness). */
  private readonly pingSentAt = new Map<number, number>();
  /** Freshness (our send time of the echoed ping) of the datagram peerVms came from. */
  private peerVmsAsOf = -Infinity;
  /** The newest ping received from the peer, echoed in our pings. */
  private lastPeerPing: { inst: string; seq: number } | null = null;
  /** A fresh datagram of the peer was signed with our current key: the previous one is no longer sent. */
  private peerHasKey = false;
  /** Authentic datagrams ignored because they prove nothing recent (replayed, queued, a past life). */
  stale = 0;
  private wasAlive = false;
  private pathWasUp: boolean[];
  /** Datagrams rejected (bad HMAC, wrong sender, garbage): exposed as a metric. */
  rejected = 0;

  constructor(o: HeartbeatOptions) {
    this.o = o;
    this.paths = o.peerAddresses.map(() => ({ lastHeard: null, rtt: null }));
    this.pathWasUp = o.peerAddresses.map(() => false);
  }

  async start(): Promise<void> {
    this.sock = await (this.o.transport ?? udpTransport).bind(this.o.listenAddress, this.o.listenPort,
      (buf, from) => this.onMessage(buf, from.address, from.port),
      (e) => this.o.log.warn('heartbeat socket error', { error: e.message }));
    this.timer = setInterval(() => this.tick(), this.o.intervalMs);
    this.tick();
  }

  /** Idempotent. */
  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.sock?.close();
    this.sock = undefined;
  }

  private mac(body: string, key = this.o.key): string {
    return createHmac('sha256', key).update(body).digest('base64url');
  }

  /** The key that signed `mac`, or null (constant-time comparisons). */
  private keyOf(mac: string, body: string): string | null {
    for (const key of this.o.previousKey ? [this.o.key, this.o.previousKey] : [this.o.key]) {
      const want = this.mac(body, key);
      if (mac.length === want.length && timingSafeEqual(Buffer.from(mac), Buffer.from(want))) return key;
    }
    return null;
  }

  private send(msg: HeartbeatMessage, address: string, port: number): void {
    const body = JSON.stringify(msg);
    this.sock?.send(Buffer.from(`${this.mac(body)} ${body}`), port, address);
    // A peer that may still know only the previous key gets a copy signed with it.
    if (this.o.previousKey && !this.peerHasKey) this.sock?.send(Buffer.from(`${this.mac(body, this.o.previousKey)} ${body}`), port, address);
  }

  private tick(): void {
    const now = this.o.clock.mono();
    const vms = this.o.summaries();
    for (const [seq, at] of this.pingSentAt) if (now - at > this.o.timeoutMs) this.pingSentAt.delete(seq); else break;
    this.o.peerAddresses.forEach((addr, path) => {
      const seq = ++this.seq;
      this.pingSentAt.set(seq, now);
      this.send({ v: 2, t: 'ping', from: this.o.node, inst: this.instance, seq, path, sent: now, echo: this.lastPeerPing, vms }, addr, this.o.peerPort);
    });
    this.evaluate();
  }

  private onMessage(buf: Buffer, address: string, port: number): void {
    const s = buf.toString('utf8');
    const sp = s.indexOf(' ');
    if (sp < 0) { this.reject(address, port, 'not a heartbeat'); return; }
    const mac = s.slice(0, sp), body = s.slice(sp + 1);
    const key = this.keyOf(mac, body);
    if (key === null) { this.reject(address, port, 'bad HMAC (another heartbeat key?)'); return; }
    let msg: HeartbeatMessage;
    try { msg = JSON.parse(body) as HeartbeatMessage; } catch { this.reject(address, port, 'not JSON'); return; }
    if (msg.v !== 2) { this.reject(address, port, `heartbeat format v${String(msg.v)}, this agent speaks v2 (upgrade both hosts)`); return; }
    if (msg.from === this.o.node) { this.reject(address, port, 'our own datagram: a peer address points at this host (peer.addresses)'); return; }
    if (msg.from !== this.o.peer) { this.reject(address, port, `from "${String(msg.from)}", not the peer "${this.o.peer}"`); return; }
    // A peer signing with the previous key (it restarted on it: a rollback) gets copies signed
    // with it again; a replayed old datagram can only cause those harmless extra copies.
    if (key !== this.o.key && this.peerHasKey) { this.peerHasKey = false; this.o.log.warn('the peer signs with the previous heartbeat key again: sending copies signed with it', { peer: this.o.peer }); }
    if (msg.t === 'ping') {
      // Always answered: the pong proves to the peer only what its own ping's age says.
      this.lastPeerPing = { inst: msg.inst, seq: msg.seq };
      this.send({ v: 2, t: 'pong', from: this.o.node, inst: this.instance, seq: msg.seq, path: msg.path, sent: msg.sent, echo: { inst: msg.inst, seq: msg.seq }, vms: this.o.summaries() }, address, port);
    }
    const asOf = msg.echo && msg.echo.inst === this.instance ? this.pingSentAt.get(msg.echo.seq) : undefined;
    if (asOf === undefined) { this.stale++; return; }
    if (key === this.o.key && this.o.previousKey && !this.peerHasKey) {
      this.peerHasKey = true;
      this.o.log.info('the peer signs with the current heartbeat key: the previous key is no longer sent (remove heartbeat.previous_key_file once both hosts have it)', { peer: this.o.peer });
    }
    const now = this.o.clock.mono();
    this.lastHeard = Math.max(this.lastHeard ?? -Infinity, asOf);
    if (asOf >= this.peerVmsAsOf) { this.peerVms = msg.vms ?? {}; this.peerVmsAsOf = asOf; }
    if (this.peerInstance !== msg.inst) {
      if (this.peerInstance !== null) this.o.log.info('peer agent restarted', { peer: this.o.peer });
      this.peerInstance = msg.inst;
    }
    if (msg.t === 'pong') {
      const p = this.paths[msg.path];
      if (p) { p.lastHeard = Math.max(p.lastHeard ?? -Infinity, asOf); p.rtt = now - asOf; }
    }
    this.evaluate();
  }

  /** Counted, and logged the first time and then every 100th, so an operator sees why. */
  private reject(address: string, port: number, why: string): void {
    if (this.rejected++ % 100 === 0) this.o.log.warn('heartbeat datagram rejected', { from: `${address}:${port}`, why, rejectedSoFar: this.rejected });
  }

  private evaluate(): void {
    const view = this.view();
    view.paths.forEach((p, i) => {
      if (p.up !== this.pathWasUp[i]) {
        this.pathWasUp[i] = p.up;
        this.o.log.info(`heartbeat path ${p.up ? 'up' : 'down'}`, { path: i, address: p.address, lastHeardMs: p.lastHeardMs });
      }
    });
    if (view.alive !== this.wasAlive) {
      this.wasAlive = view.alive;
      const why = view.alive ? 'heartbeat received' : `no heartbeat on any of ${this.paths.length} paths for ${this.o.timeoutMs} ms`;
      this.o.log.info(view.alive ? 'peer agent heard' : 'peer agent silent', { peer: this.o.peer, why });
      this.o.onChange(view, why);
    }
  }

  view(): PeerView {
    const now = this.o.clock.mono();
    const age = (t: number | null) => (t === null ? null : Math.round(now - t));
    return {
      alive: this.lastHeard !== null && now - this.lastHeard <= this.o.timeoutMs,
      lastHeardMs: age(this.lastHeard),
      instance: this.peerInstance,
      vms: this.peerVms,
      paths: this.paths.map((p, i) => ({
        address: this.o.peerAddresses[i]!,
        up: p.lastHeard !== null && now - p.lastHeard <= this.o.timeoutMs,
        lastHeardMs: age(p.lastHeard),
        rttMs: p.rtt === null ? null : Math.round(p.rtt * 100) / 100,
      })),
    };
  }
}
