// The lease fencer: one small process per host, started by the agent and outliving it as QEMU
// does. It exists for the one case the agent cannot handle itself: the agent dead or hung
// (SIGSTOP, stuck I/O) while the host is cut off. Only the agent could pause the guest, so the
// old QEMU went on serving after the peer had been granted the lease (issue 11 path 8, measured:
// both ran as primaries for 23-24 s).
//
// It applies the agent's own fence rule (decide.ts mustFence) with what it can know without
// the agent: the lease, which it renews itself at the witness like the agent does (so an
// ordinary agent restart or upgrade never lets it lapse), and the agent's latest word on the
// peer, which the agent publishes every control step. When the lease cannot be proven valid and
// the agent has not vouched for a live peer within two heartbeat intervals, it freezes the
// primary's QEMU with SIGSTOP (every thread: no vCPU runs, no frame leaves), before the witness
// could grant the lease away (validity ends a margin before the witness's expiry). A later
// successful renewal proves the VM is still ours: SIGCONT. A refusal naming another holder
// leaves it frozen; the agent, once back, demotes it.
//
// Pure core with injected I/O (clock, files, HTTP, signals): unit-tested with fakes.

import type { EtcdSettings } from '../witness/etcd.ts';

export interface FencerWitness {
  url: string; tokenFile: string; leaseMs: number; node: string;
  /** CA of an https:// witness. */
  caFile?: string;
  /** The lease store is etcd (witness/etcd.ts), not the embedded witness at `url`. */
  etcd?: EtcdSettings;
}

/** Written by the agent (fence/control.ts) whenever what it keeps changes. */
export interface FencerControl {
  witness: FencerWitness | null;
  heartbeatIntervalMs: number;
  /** Primaries whose lease this host keeps: epoch and the QEMU to freeze. */
  vms: Record<string, { epoch: number; qemuPid: number; qemuStartTicks: number }>;
}

/** Written by the agent every control step (cheap: no fsync). Times are CLOCK_MONOTONIC ms. */
export interface AgentPulse {
  at: number;
  /** When the agent last had fresh proof that the peer is alive (heartbeats.ts freshness). */
  peerHeardAt: number | null;
  /** Until when the agent's own witness client counts each lease valid (it renews too). */
  leaseValidUntil: Record<string, number | null>;
  /** VMs the agent has fenced (or is fencing) itself: nothing for the fencer to add. */
  fenced: string[];
}

export interface RenewAnswer { granted: boolean; holder: string; epoch: number; reason?: string }

export interface FencerDeps {
  mono(): number;                      // CLOCK_MONOTONIC ms, the same clock as the agent's pulse
  readControl(): FencerControl | null;
  readPulse(): AgentPulse | null;
  readToken(file: string): string;
  renew(w: FencerWitness, token: string, vm: string, epoch: number): Promise<RenewAnswer>; // throws when unreachable
  /** The very process (pid + kernel start time: a reused pid is not it) still exists. */
  alive(pid: number, startTicks: number): boolean;
  /** Stopped by a signal (/proc state T): a fencer that restarted finds what it had frozen. */
  isStopped(pid: number): boolean;
  signal(pid: number, sig: 'SIGSTOP' | 'SIGCONT'): void;
  log(level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
}

interface Kept {
  epoch: number;
  pid: number;
  startTicks: number;
  validUntil: number | null;  // mono ms; null: no renewal answered yet
  /** The latest validity the agent's pulses proved (mono ms): a lapse counts from its real end. */
  agentValidUntil: number | null;
  lost: string | null;        // another node holds a newer epoch
  frozen: boolean;            // we sent SIGSTOP
  renewing: boolean;
  lastRenewAt: number;
}

/** Same margin as the agent's witness client: never trust the lease up to the witness's own expiry. */
export const marginMs = (leaseMs: number): number => Math.max(300, Math.floor(leaseMs / 4));
export const renewEveryMs = (leaseMs: number): number => Math.max(50, Math.floor(leaseMs / 5));

/**
 * The agent is renewing this lease itself: its latest pulse (written every heartbeat interval)
 * is not older than 1.5 intervals and counts the lease valid for more than two renewal periods
 * yet. Then the fencer's own renewal would only double the witness's load. It renews as soon
 * as the agent stops (dead, hung, restarting: its pulse goes stale within ~2 intervals, while
 * its lease, renewed every period, stays valid for lease − margin − 1 period at least: 500 ms
 * at lease_ms 1000) or falls behind (less than two periods of validity left).
 */
export function agentRenews(pulse: AgentPulse | null, vm: string, now: number, heartbeatIntervalMs: number, everyMs: number): boolean {
  if (pulse === null || now - pulse.at > 1.5 * heartbeatIntervalMs) return false;
  const until = pulse.leaseValidUntil[vm];
  return until !== null && until !== undefined && until - now > 2 * everyMs;
}

export class Fencer {
  private readonly kept = new Map<string, Kept>();
  private control: FencerControl | null = null;
  constructor(private readonly d: FencerDeps) {}

  /** One pass: called every ~50 ms. */
  step(): void {
    this.control = this.d.readControl();
    const c = this.control;
    const want = c?.witness ? c.vms : {};
    for (const [vm, k] of this.kept) {
      const w = want[vm];
      if (w && w.qemuPid === k.pid) continue;
      // No longer kept (demoted, stopped, replaced, or a restarted agent that found it frozen):
      // forgotten. A QEMU we froze stays frozen; thawing it is for an agent that manages it
      // (it does so once its own renewal succeeds): a thawed guest nobody manages would serve
      // unrenewed next to a peer that takes over.
      this.kept.delete(vm);
    }
    if (!c?.witness) return;
    const now = this.d.mono();
    for (const [vm, w] of Object.entries(want)) {
      let k = this.kept.get(vm);
      if (!k || k.pid !== w.qemuPid) {
        k = { epoch: w.epoch, pid: w.qemuPid, startTicks: w.qemuStartTicks, validUntil: null, agentValidUntil: null, lost: null, frozen: this.d.isStopped(w.qemuPid), renewing: false, lastRenewAt: -Infinity };
        if (k.frozen) this.d.log('warn', 'found the primary QEMU stopped (frozen by an earlier fencer?): it stays so until the witness renews its lease', { vm, pid: k.pid });
        this.kept.set(vm, k);
      }
      // Epochs only grow: one adopted from the witness (below) is not undone by an older control.
      if (w.epoch > k.epoch) { k.epoch = w.epoch; k.lost = null; k.lastRenewAt = -Infinity; }
    }
    const pulse = this.d.readPulse();
    const every = renewEveryMs(c.witness.leaseMs);
    for (const [vm, k] of this.kept) {
      if (!this.d.alive(k.pid, k.startTicks)) continue; // QEMU gone: nothing to renew or freeze
      if (!k.renewing && now - k.lastRenewAt >= every && !agentRenews(pulse, vm, now, c.heartbeatIntervalMs, every)) void this.renew(vm, k, c.witness);
      this.enforce(vm, k, now, c, pulse);
    }
  }

  private enforce(vm: string, k: Kept, now: number, c: FencerControl, pulse: AgentPulse | null): void {
    // The agent's renewals prove the lease as ours do. Remembered: once its lease runs out the
    // pulse says null, and the margin before anyone else can be granted counts from the real end
    // (without it, a lapse right after the agent's own fence froze the guest before its next
    // pulse could say "fenced", simulation seed 187).
    const agentNow = pulse?.leaseValidUntil[vm] ?? null;
    if (agentNow !== null) k.agentValidUntil = Math.max(k.agentValidUntil ?? agentNow, agentNow);
    if (k.frozen) {
      // The agent renewed the lease: the VM is this node's, and the agent manages it again (a
      // hung agent continued, or it fenced and the witness came back). Thaw, or its QMP commands
      // to the stopped QEMU hang and nobody thaws it while the agent does the renewing (seed 187:
      // guest paused for good after the witness returned).
      if (!k.lost && agentNow !== null && now < agentNow) this.thaw(vm, k, 'the agent renewed its lease');
      return;
    }
    // The agent's word, if recent: it heard the peer within about two intervals of writing it (a
    // heartbeat proves the peer alive as of OUR ping's send time, up to an interval before).
    const pulseFresh = pulse !== null && now - pulse.at <= 3 * c.heartbeatIntervalMs;
    const peerVouched = pulseFresh && pulse.peerHeardAt !== null && pulse.at - pulse.peerHeardAt <= 3 * c.heartbeatIntervalMs;
    // Valid as long as either renewer (this process or the agent) proved it.
    const agentValid = k.agentValidUntil;
    const valid = k.validUntil === null ? agentValid : agentValid === null ? k.validUntil : Math.max(k.validUntil, agentValid);
    const why = k.lost ? `lease lost: ${k.lost}`
      : valid === null ? (k.renewing || k.lastRenewAt === -Infinity ? null : 'no renewal of the lease answered')
        : now > valid ? `lease not renewed for ${Math.round(now - valid + marginMs(c.witness!.leaseMs))} ms` : null;
    if (!why) return;
    if (!k.lost && peerVouched) return; // the agent hears the peer: it will not take over (mustFence)
    // A live agent fences by itself (QMP: network cut, vCPUs paused), and a SIGSTOP under it would
    // only make its QMP commands hang. The fencer is the backstop for an agent that is dead or
    // hung, or alive but failing to fence: it waits for the agent up to (nearly) the margin the
    // witness leaves (validity ends that long before anyone can be granted the lease).
    if (pulseFresh && pulse.fenced.includes(vm)) return;
    // Waiting up to the margin less two of our steps still freezes before the witness could grant
    // the lease away (its expiry is never earlier than validity + margin); half the margin was too
    // eager: CI saw a SIGSTOP 54 ms after the agent's own fence, before its next pulse said so.
    if (pulseFresh && !k.lost && valid !== null && now <= valid + marginMs(c.witness!.leaseMs) - 100) return;
    this.d.signal(k.pid, 'SIGSTOP');
    k.frozen = true;
    const agentAge = pulse ? Math.round(now - pulse.at) : null;
    this.d.log('error', 'FROZE the primary QEMU (SIGSTOP): the lease cannot be proven and the agent vouches for no live peer', { vm, pid: k.pid, epoch: k.epoch, why, agentLastPulseMsAgo: agentAge });
  }

  /** A renewal (ours or the agent's) proved the lease ours: SIGCONT what we froze, if it still runs. */
  private thaw(vm: string, k: Kept, why: string): void {
    if (!this.d.alive(k.pid, k.startTicks)) return;
    this.d.signal(k.pid, 'SIGCONT');
    k.frozen = false;
    this.d.log('warn', `thawed the primary QEMU (SIGCONT): ${why}`, { vm, pid: k.pid, epoch: k.epoch });
  }

  private async renew(vm: string, k: Kept, w: FencerWitness): Promise<void> {
    k.renewing = true;
    const sentAt = this.d.mono();
    k.lastRenewAt = sentAt;
    const epoch = k.epoch;
    try {
      const a = await this.d.renew(w, this.d.readToken(w.tokenFile), vm, epoch);
      if (this.kept.get(vm) !== k || k.epoch !== epoch) return;
      if (a.granted) {
        k.validUntil = sentAt + w.leaseMs - marginMs(w.leaseMs);
        k.lost = null;
        if (k.frozen) this.thaw(vm, k, 'the witness renewed its lease');
      } else if (a.holder !== w.node && a.epoch >= epoch) {
        k.lost = `${a.holder} holds epoch ${a.epoch}`;
      } else if (a.holder === w.node && a.epoch > epoch) {
        // The agent moved this node to a newer epoch (and may have died before telling us): keep that.
        k.epoch = a.epoch;
        k.lastRenewAt = -Infinity;
      }
    } catch {
      // Unreachable: validity simply runs out.
    } finally {
      k.renewing = false;
    }
  }

  /** For status and tests. */
  view(): Record<string, { epoch: number; pid: number; frozen: boolean; validForMs: number | null; lost: string | null }> {
    const now = this.d.mono();
    return Object.fromEntries([...this.kept].map(([vm, k]) => [vm, { epoch: k.epoch, pid: k.pid, frozen: k.frozen, validForMs: k.validUntil === null ? null : Math.round(k.validUntil - now), lost: k.lost }]));
  }
}
