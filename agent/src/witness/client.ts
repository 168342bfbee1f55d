// The agent's side of the witness: leases for promotions, and background renewal of every
// lease this node holds as primary. A lease counts as valid until (time the renewal was SENT
// + lease length − margin): never later than the witness's own expiry, so a primary that
// pauses itself when its lease runs out has always paused before the witness could grant the
// VM to the other host.
import { readFileSync } from 'node:fs';
import { Agent, request } from 'undici';
import type { Clock } from '../util/clock.ts';
import type { Logger } from '../log/logger.ts';
import { errorMessage } from '../util/errors.ts';
import type { GateDecision, LeaseView, PromotionGate, WitnessStatus } from '../colo/gate.ts';

export interface WitnessClientOptions {
  url: string; node: string; leaseMs: number; token: () => string; clock: Clock; log: Logger;
  /** CA file trusted for an https:// witness (default: the system's CAs). */
  caFile?: string;
  /** How requests reach the witness (default: HTTP with undici). The simulator passes its network. */
  transport?: WitnessTransport;
}

/** The witness protocol's calls (witness/server.ts). Rejects when the witness cannot be reached. */
export interface WitnessTransport {
  acquire(vm: string, req: { node: string; epoch: number; leaseMs: number }, timeoutMs: number): Promise<{ status: number; body: AcquireAnswer }>;
  health(timeoutMs: number): Promise<void>;
  release(vm: string, req: { node: string; epoch: number }, timeoutMs: number): Promise<{ status: number }>;
  /**
   * Many acquires in one request (POST /v1/renewals), answered per lease in the order asked.
   * Absent, or resolving null (a witness older than this agent: 404), the caller renews one by one.
   */
  renew?(leases: { vm: string; epoch: number }[], req: { node: string; leaseMs: number }, timeoutMs: number): Promise<RenewalAnswer[] | null>;
  close(): void;
}

/** One lease's answer in a batch: the single acquire's status and body. */
export interface RenewalAnswer { vm: string; status: number; body: AcquireAnswer }

export function httpTransport(url: string, token: () => string, caFile?: string): WitnessTransport {
  const dispatcher = new Agent({ connectTimeout: 500, keepAliveTimeout: 10_000, connect: caFile ? { ca: readFileSync(caFile) } : undefined });
  const base = url.replace(/\/$/, '');
  // A witness older than this agent has no /v1/renewals: then one request per lease, asking
  // again a minute later (the witness may have been upgraded meanwhile).
  let batchUnsupported: number | null = null;
  return {
    async acquire(vm, req, timeoutMs) {
      const res = await request(`${base}/v1/leases/${encodeURIComponent(vm)}/acquire`, {
        method: 'POST', dispatcher,
        headers: { authorization: `Bearer ${token()}`, 'content-type': 'application/json' },
        body: JSON.stringify(req), headersTimeout: timeoutMs, bodyTimeout: timeoutMs,
      });
      return { status: res.statusCode, body: (await res.body.json()) as AcquireAnswer };
    },
    async renew(leases, req, timeoutMs) {
      if (batchUnsupported !== null && performance.now() - batchUnsupported < 60_000) return null;
      const res = await request(`${base}/v1/renewals`, {
        method: 'POST', dispatcher,
        headers: { authorization: `Bearer ${token()}`, 'content-type': 'application/json' },
        body: JSON.stringify({ ...req, leases }), headersTimeout: timeoutMs, bodyTimeout: timeoutMs,
      });
      if (res.statusCode === 404 || res.statusCode === 405) { await res.body.dump(); batchUnsupported = performance.now(); return null; }
      batchUnsupported = null;
      const body = (await res.body.json()) as { results?: (AcquireAnswer & { vm: string; status: number })[]; message?: string };
      if (res.statusCode !== 200 || !Array.isArray(body.results) || body.results.length !== leases.length) {
        throw new Error(`renewals: HTTP ${res.statusCode}${body.message ? `: ${body.message}` : ''}`);
      }
      return body.results.map(({ vm, status, ...answer }, i) => {
        if (vm !== leases[i]!.vm) throw new Error(`renewals: answer ${i} is for ${String(vm)}, not ${leases[i]!.vm}`);
        return { vm, status, body: answer };
      });
    },
    async release(vm, req, timeoutMs) {
      const res = await request(`${base}/v1/leases/${encodeURIComponent(vm)}/release`, {
        method: 'POST', dispatcher,
        headers: { authorization: `Bearer ${token()}`, 'content-type': 'application/json' },
        body: JSON.stringify(req), headersTimeout: timeoutMs, bodyTimeout: timeoutMs,
      });
      await res.body.dump();
      return { status: res.statusCode };
    },
    async health(timeoutMs) {
      const res = await request(`${base}/health`, { dispatcher, headersTimeout: timeoutMs, bodyTimeout: timeoutMs });
      await res.body.dump();
      if (res.statusCode !== 200) throw new Error(`HTTP ${res.statusCode}`);
    },
    close() { void dispatcher.close(); },
  };
}

export interface AcquireAnswer { granted: boolean; holder: string; epoch: number; expiresInMs: number; reason?: string; retryAfterMs?: number | null }

export class WitnessGate implements PromotionGate {
  readonly mode = 'witness' as const;
  private readonly o: WitnessClientOptions;
  private readonly transport: WitnessTransport;
  private readonly kept = new Map<string, number>();
  private readonly validUntil = new Map<string, number>();
  private readonly lostWhy = new Map<string, string>();
  /** The epoch the witness named when it refused us (another node's), per VM. */
  private readonly lostEpoch = new Map<string, number>();
  /** Kept, but no renewal has been answered or has failed yet since (see LeaseState 'unknown'). */
  private readonly firstRenewal = new Set<string>();
  private lastOk: number | null = null;
  private lastError: string | null = null;
  private timer: NodeJS.Timeout;
  private readonly renewMs: number;
  private readonly marginMs: number;
  private renewing = false;
  /** Renewal requests on their way, per VM: a release waits for them (one arriving after it would renew). */
  private readonly inflight = new Map<string, Promise<void>>();

  constructor(o: WitnessClientOptions) {
    this.o = o;
    this.transport = o.transport ?? httpTransport(o.url, o.token, o.caFile);
    this.renewMs = Math.max(50, Math.floor(o.leaseMs / 5));
    // The control loop notices an expired lease up to one step (100 ms) late, and pausing takes
    // a few ms: stop trusting the lease well before the witness could give it away.
    this.marginMs = Math.max(300, Math.floor(o.leaseMs / 4));
    this.timer = setInterval(() => void this.renewAll(), this.renewMs);
    this.timer.unref();
  }

  private async post(vm: string, epoch: number): Promise<{ status: number; body: AcquireAnswer; sentAt: number }> {
    const sentAt = this.o.clock.mono();
    const { status, body } = await this.transport.acquire(vm, { node: this.o.node, epoch, leaseMs: this.o.leaseMs }, Math.max(200, this.renewMs * 2));
    this.lastOk = this.o.clock.mono();
    this.lastError = null;
    return { status, body, sentAt };
  }

  private record(vm: string, epoch: number, r: { status: number; body: AcquireAnswer; sentAt: number }): GateDecision {
    if (r.status === 200 && r.body.granted) {
      this.validUntil.set(vm, r.sentAt + this.o.leaseMs - this.marginMs);
      this.lostWhy.delete(vm);
      return { granted: true, epoch, reason: `lease for epoch ${epoch} granted by the witness` };
    }
    const reason = r.body.reason ?? `HTTP ${r.status}`;
    if (r.status === 409 && (r.body.epoch > epoch || (r.body.epoch === epoch && r.body.holder !== this.o.node))) {
      if (this.lostWhy.get(vm) !== `witness: ${reason}`) this.o.log.error('lease lost', { vm, epoch, why: `witness: ${reason}` });
      this.lostWhy.set(vm, `witness: ${reason}`);
      this.lostEpoch.set(vm, r.body.epoch);
      this.validUntil.delete(vm);
    }
    return { granted: false, epoch, reason: `witness refused: ${reason}`, retryAfterMs: r.body.retryAfterMs ?? null };
  }

  async acquire(vm: string, epoch: number, _reason: string): Promise<GateDecision> {
    try {
      return this.record(vm, epoch, await this.post(vm, epoch));
    } catch (e) {
      this.lastError = errorMessage(e);
      return { granted: false, epoch, reason: `witness ${this.o.url} unreachable: ${this.lastError}` };
    }
  }

  keep(vm: string, epoch: number | null): void {
    if (epoch === null) {
      if (this.kept.delete(vm)) { this.validUntil.delete(vm); this.lostWhy.delete(vm); this.lostEpoch.delete(vm); this.firstRenewal.delete(vm); }
      return;
    }
    if (this.kept.get(vm) !== epoch) {
      // Starting to keep a lease we have no news of (an agent restart re-attaching a running
      // primary): until the witness answers, 'unknown', not 'expired' — calling it expired made
      // a healthy primary fence itself ~100 ms after an agent restart.
      if (!this.kept.has(vm) && !this.validUntil.has(vm)) this.firstRenewal.add(vm);
      this.kept.set(vm, epoch);
      void this.renewTracked(vm, epoch);
    }
  }

  private renewTracked(vm: string, epoch: number): Promise<void> {
    const prev = this.inflight.get(vm);
    const p = this.renewOne(vm, epoch);
    const both = prev ? Promise.all([prev, p]).then(() => undefined) : p;
    this.inflight.set(vm, both);
    return p.finally(() => { if (this.inflight.get(vm) === both) this.inflight.delete(vm); });
  }

  async release(vm: string, epoch: number): Promise<boolean> {
    this.keep(vm, null);
    await this.inflight.get(vm);
    try {
      const r = await this.transport.release(vm, { node: this.o.node, epoch }, Math.max(200, this.renewMs * 2));
      return r.status === 200;
    } catch (e) {
      this.o.log.warn('could not release the lease at the witness; the successor waits for its expiry', { vm, epoch, error: errorMessage(e) });
      return false;
    }
  }

  private async renewOne(vm: string, epoch: number): Promise<void> {
    try {
      const r = await this.post(vm, epoch);
      if (this.kept.get(vm) !== epoch) return;
      const d = this.record(vm, epoch, r);
      void d; // a loss is logged once, when it is recorded
    } catch (e) {
      const msg = errorMessage(e);
      if (msg !== this.lastError) this.o.log.warn('witness unreachable', { url: this.o.url, error: msg });
      this.lastError = msg;
    } finally {
      if (this.kept.get(vm) === epoch) this.firstRenewal.delete(vm);
    }
  }

  /**
   * Every kept lease in one request (the witness's cost then grows with the hosts, not the VMs).
   * False when the transport cannot batch: the caller renews one by one.
   */
  private async renewBatch(): Promise<boolean> {
    if (!this.transport.renew) return false;
    const leases = [...this.kept].map(([vm, epoch]) => ({ vm, epoch }));
    const sentAt = this.o.clock.mono();
    let answers: RenewalAnswer[] | null = null;
    const p = (async () => {
      try {
        answers = await this.transport.renew!(leases, { node: this.o.node, leaseMs: this.o.leaseMs }, Math.max(200, this.renewMs * 2));
        if (!answers) return;
        this.lastOk = this.o.clock.mono();
        this.lastError = null;
        answers.forEach((a, i) => {
          const { vm, epoch } = leases[i]!;
          if (this.kept.get(vm) === epoch) this.record(vm, epoch, { status: a.status, body: a.body, sentAt });
        });
      } catch (e) {
        const msg = errorMessage(e);
        if (msg !== this.lastError) this.o.log.warn('witness unreachable', { url: this.o.url, error: msg });
        this.lastError = msg;
        answers = [];
      } finally {
        for (const { vm, epoch } of leases) if (this.kept.get(vm) === epoch && answers !== null) this.firstRenewal.delete(vm);
      }
    })();
    // A release waits for renewals on their way (one arriving after it would renew the lease):
    // this batch and any single renewal still on its way (keep() sends one at once).
    const tracked = leases.map(({ vm }) => {
      const prev = this.inflight.get(vm);
      const both = prev ? Promise.all([prev, p]).then(() => undefined) : p;
      this.inflight.set(vm, both);
      return [vm, both] as const;
    });
    await p;
    for (const [vm, both] of tracked) if (this.inflight.get(vm) === both) this.inflight.delete(vm);
    return answers !== null;
  }

  /** Nothing to renew: still find out whether the witness is there (health reports it). */
  private async ping(): Promise<void> {
    try {
      await this.transport.health(1000);
      this.lastOk = this.o.clock.mono();
      this.lastError = null;
    } catch (e) {
      this.lastError = errorMessage(e);
    }
  }

  private async renewAll(): Promise<void> {
    if (this.renewing) return;
    this.renewing = true;
    try {
      if (this.kept.size === 0) await this.ping();
      else if (!(await this.renewBatch())) await Promise.all([...this.kept].map(([vm, epoch]) => this.renewTracked(vm, epoch)));
    } finally {
      this.renewing = false;
    }
  }

  lease(vm: string): LeaseView {
    const lost = this.lostWhy.get(vm);
    if (lost) return { state: 'lost', reason: lost, validForMs: null, heldEpoch: this.lostEpoch.get(vm) };
    const until = this.validUntil.get(vm);
    const now = this.o.clock.mono();
    if (until !== undefined && until > now) return { state: 'held', reason: null, validForMs: Math.round(until - now) };
    if (this.firstRenewal.has(vm)) return { state: 'unknown', reason: 'waiting for the witness to answer the first renewal', validForMs: null };
    if (this.kept.has(vm)) return { state: 'expired', reason: `lease not renewed in time (witness: ${this.lastError ?? 'no answer'})`, validForMs: 0 };
    return { state: 'none', reason: null, validForMs: null };
  }

  status(): WitnessStatus {
    const now = this.o.clock.mono();
    const reachable = this.lastOk !== null && now - this.lastOk < Math.max(3 * this.renewMs, 1000) && this.lastError === null;
    return { mode: 'witness', url: this.o.url, reachable, lastContactMs: this.lastOk === null ? null : Math.round(now - this.lastOk), error: this.lastError, leaseMs: this.o.leaseMs };
  }

  stop(): void {
    clearInterval(this.timer);
    this.transport.close();
  }
}
