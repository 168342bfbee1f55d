// Failover drills and planned switchovers. Both fail the current primary's QEMU the way a real
// crash would (SIGKILL; this node's agent then tells the secondary to take over at once), let
// the secondary take over, and wait until protection is rebuilt onto the old primary. A drill
// also watches the guest through a TCP probe and ends with a pass/fail report.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/schema.ts';
import type { Logger } from '../log/logger.ts';
import type { Metrics } from '../api/metrics.ts';
import type { PeerView } from '../peer/heartbeat.ts';
import type { PeerClient } from '../peer/client.ts';
import type { VmController, VmStatus } from '../colo/vm.ts';
import { isPrimaryState } from '../colo/states.ts';
import { checkpointDelay } from '../config/load.ts';
import { writeFileAtomic } from '../state/atomic.ts';
import { FtkvmError, errorMessage } from '../util/errors.ts';
import { GuestProbe, judgeProbe, type ProbeVerdict } from './probe.ts';

export type OperationKind = 'drill' | 'switchover';
export type OperationState = 'running' | 'passed' | 'failed';
export type Phase = 'preflight' | 'probe-baseline' | 'failing-over' | 're-protecting' | 'verifying' | 'done';

export interface OperationReport {
  id: string;
  kind: OperationKind;
  vm: string;
  node: string;                  // the node that ran it (the old primary)
  state: OperationState;
  phase: Phase;
  startedAt: number;
  finishedAt: number | null;
  oldPrimary: string;
  newPrimary: string | null;
  failover: {
    killedPid: number | null;
    ms: number | null;             // SIGKILL → the guest serves again (first probe reply) or the peer runs it
    takeoverSeenMs: number | null; // SIGKILL → peer reports itself primary
    detectionMs: number | null;    // from the peer's record
    sequenceMs: number | null;     // the peer's takeover QMP sequence
  };
  reprotect: { done: boolean; ms: number | null };
  checkpoints: { before: { primary: number | null; secondary: number | null }; after: { primary: number | null; secondary: number | null } };
  probe: ProbeVerdict | { configured: false };
  verdict: 'pass' | 'fail' | null;
  reasons: string[];
  progress: { at: number; msg: string }[];
}

export class OperationRefused extends FtkvmError {
  readonly status: number;
  constructor(status: number, code: string, message: string) { super(code, message); this.status = status; }
}

export interface OperationDeps {
  config: Config;
  log: Logger;
  metrics: Metrics;
  peer: PeerClient;
  peerView: () => PeerView;
  vm: (name: string) => VmController | undefined;
  now: () => number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class OperationRegistry {
  private readonly d: OperationDeps;
  private readonly ops = new Map<string, OperationReport>();
  private seq = 0;

  constructor(d: OperationDeps) {
    this.d = d;
    this.restoreDrillTimes();
  }

  /** The time of the last drill per VM and result, from the reports saved by earlier runs (metrics). */
  private restoreDrillTimes(): void {
    const dir = join(this.d.config.state_dir, 'drills');
    let names: string[];
    try { names = readdirSync(dir).filter((n) => n.endsWith('.json')); } catch { return; } // none yet
    let unreadable = 0;
    for (const n of names) {
      try {
        const r = JSON.parse(readFileSync(join(dir, n), 'utf8')) as Partial<OperationReport>;
        if (r.kind === 'drill' && typeof r.vm === 'string' && (r.verdict === 'pass' || r.verdict === 'fail') && typeof r.finishedAt === 'number') this.d.metrics.drillSeen(r.vm, r.verdict, r.finishedAt);
      } catch { unreadable++; }
    }
    if (unreadable) this.d.log.warn('some saved drill reports could not be read; the last-drill metric ignores them', { dir, unreadable });
  }

  get(id: string): OperationReport | undefined { return this.ops.get(id); }
  list(kind?: OperationKind): OperationReport[] { return [...this.ops.values()].filter((o) => !kind || o.kind === kind).reverse(); }
  private running(): OperationReport[] { return [...this.ops.values()].filter((o) => o.state === 'running'); }

  /** Starts a drill or switchover on this node (which must be the VM's protected primary). */
  async start(kind: OperationKind, vmName: string): Promise<OperationReport> {
    const v = this.d.vm(vmName);
    if (!v) throw new OperationRefused(404, 'NO_SUCH_VM', `no protected VM named "${vmName}"`);
    const busy = this.running().find((o) => o.vm === vmName);
    if (busy) throw new OperationRefused(409, 'OPERATION_RUNNING', `${busy.kind} ${busy.id} is already running for ${vmName}`);
    if (kind === 'drill' && this.running().filter((o) => o.kind === 'drill').length >= this.d.config.api.max_concurrent_drills) {
      throw new OperationRefused(429, 'TOO_MANY_DRILLS', `at most ${this.d.config.api.max_concurrent_drills} drill(s) at a time (api.max_concurrent_drills)`);
    }
    const st = v.status();
    const pv = this.d.peerView().vms[vmName];
    const node = this.d.config.node.name, peer = this.d.config.peer.name;
    if (st.state !== 'protected' || !pv || pv.state !== 'secondary' || !pv.qemu || !this.d.peerView().alive) {
      const why = st.state !== 'protected'
        ? `on ${node} it is ${st.state}${st.role === 'secondary' ? ' (run it where the VM is primary)' : ''}: ${st.reason}`
        : `its replica on ${peer} is ${pv ? (pv.qemu ? pv.state : 'gone') : 'unknown'}${this.d.peerView().alive ? '' : ' (peer silent)'}`;
      throw new OperationRefused(409, 'NOT_PROTECTED', `${vmName} is not fully protected, refusing the ${kind}: ${why}`);
    }
    // The summaries above may be 100 ms old: before failing the primary on purpose, check live
    // (locally and on the peer at once; each check bounded, so the caller hears back in ~3 s).
    const t0 = this.d.now();
    this.d.log.info(`${kind} requested: checking live that the replica is healthy`, { vm: vmName });
    const [local, remote] = await Promise.all([v.replicaProblemNow(), this.remoteReplicaProblem(vmName)]);
    this.d.log.info(`${kind} preflight done in ${this.d.now() - t0} ms`, { vm: vmName, local, remote });
    if (local || remote) {
      throw new OperationRefused(409, 'NOT_PROTECTED', `${vmName} is not fully protected, refusing the ${kind}: ${[local, remote].filter(Boolean).join('; ')}`);
    }
    if (this.running().find((o) => o.vm === vmName)) throw new OperationRefused(409, 'OPERATION_RUNNING', `an operation is already running for ${vmName}`);
    const id = `${kind}-${vmName}-${new Date(this.d.now()).toISOString().replace(/[-:]/g, '').replace(/\..*/, '')}-${++this.seq}`;
    const r: OperationReport = {
      id, kind, vm: vmName, node, state: 'running', phase: 'preflight', startedAt: this.d.now(), finishedAt: null,
      oldPrimary: node, newPrimary: null,
      failover: { killedPid: null, ms: null, takeoverSeenMs: null, detectionMs: null, sequenceMs: null },
      reprotect: { done: false, ms: null },
      checkpoints: { before: { primary: st.checkpoints.count, secondary: pv.checkpoints ?? null }, after: { primary: null, secondary: null } },
      probe: { configured: false }, verdict: null, reasons: [], progress: [],
    };
    this.ops.set(id, r);
    while (this.ops.size > 50) this.ops.delete(this.ops.keys().next().value!);
    void this.run(r, v).catch((e) => this.finish(r, [`internal error: ${errorMessage(e)}`]));
    return r;
  }

  /** The peer's own live view of its replica: null when it is a healthy secondary. */
  private async remoteReplicaProblem(vmName: string): Promise<string | null> {
    const peer = this.d.config.peer.name;
    try {
      const ps = await this.d.peer.call<{ vms: VmStatus[] }>('GET', '/v1/status', undefined, 1500);
      const rv = ps.vms.find((x) => x.name === vmName);
      return !rv || rv.state !== 'secondary' || !rv.qemu ? `${peer} reports its replica as ${rv ? rv.state : 'unknown'}` : null;
    } catch (e) {
      return `${peer} does not answer: ${errorMessage(e)}`;
    }
  }

  private note(r: OperationReport, msg: string, phase?: Phase): void {
    if (phase) r.phase = phase;
    r.progress.push({ at: this.d.now(), msg });
    this.d.log.info(`${r.kind} ${r.id}: ${msg}`, { vm: r.vm });
  }

  private async run(r: OperationReport, v: VmController): Promise<void> {
    const c = this.d.config;
    const vmCfg = c.vms.find((x) => x.name === r.vm)!;
    const deadline = r.startedAt + c.api.drill_timeout_s * 1000;
    const reasons: string[] = [];
    let probe: GuestProbe | undefined;
    if (r.kind === 'drill' && vmCfg.probe) {
      r.phase = 'probe-baseline';
      probe = new GuestProbe(vmCfg.probe, this.d.now);
      try {
        await probe.open();
      } catch (e) {
        this.finish(r, [`${errorMessage(e)}; the primary was NOT failed (nothing to verify against)`]);
        return;
      }
      probe.start();
      const t0 = this.d.now();
      while (vmCfg.probe.request && probe.replies.length < 5 && this.d.now() - t0 < 10_000 && probe.errors.length === 0) await sleep(20);
      this.note(r, `probe ${vmCfg.probe.address}:${vmCfg.probe.port} connected${vmCfg.probe.request ? `, ${probe.replies.length} replies before the failover` : ''}`);
      if (vmCfg.probe.request && probe.replies.length === 0) {
        await probe.stop(0);
        this.finish(r, ['the guest did not answer the probe before the failover; the primary was NOT failed']);
        return;
      }
      // A guest kernel derives each TCP connection's timestamp offset from a secret it creates
      // on first use. If the probe is the guest's first connection since boot, the replica made
      // its own secret: until a checkpoint copies the primary's memory over it, the replica's
      // timestamps differ and the client's PAWS check drops its segments after a takeover
      // (README, Limits). Fail the primary in the state production runs in: after a checkpoint.
      const ckWaitMs = checkpointDelay(c, vmCfg) + 5000;
      const ck0 = v.status().checkpoints.count, waitUntil = this.d.now() + ckWaitMs;
      while (v.status().checkpoints.count === ck0 && this.d.now() < waitUntil && probe.errors.length === 0) await sleep(20);
      this.note(r, v.status().checkpoints.count > ck0 ? 'a checkpoint has taken the probe connection into the replica'
        : `no checkpoint within ${ckWaitMs} ms of the probe connecting; failing the primary anyway`);
    }
    const oldEpoch = v.status().epoch;
    if (r.kind === 'switchover') this.note(r, `handover: ${await v.quiesceForHandover()}`);
    this.note(r, `killing the primary QEMU of ${r.vm} on ${r.node} (SIGKILL, as a crash would)`, 'failing-over');
    const killedAt = this.d.now();
    r.failover.killedPid = await v.crashPrimary(`${r.kind} ${r.id}`);

    // Takeover: the peer reports a primary state with a newer epoch.
    while (this.d.now() < deadline) {
      const pv = this.d.peerView().vms[r.vm];
      if (pv && isPrimaryState(pv.state) && pv.epoch > oldEpoch) break;
      await sleep(10);
    }
    const pvNow = this.d.peerView().vms[r.vm];
    if (!pvNow || !isPrimaryState(pvNow.state) || pvNow.epoch <= oldEpoch) {
      reasons.push(`the secondary on ${c.peer.name} did not take over (peer state ${pvNow?.state ?? 'unknown'})`);
    } else {
      r.newPrimary = c.peer.name;
      r.failover.takeoverSeenMs = this.d.now() - killedAt;
      this.note(r, `${c.peer.name} took over (epoch ${pvNow.epoch}) ${r.failover.takeoverSeenMs} ms after the kill`, 're-protecting');
    }

    // Re-protection onto this node (the old primary becomes the secondary).
    if (r.newPrimary) {
      while (this.d.now() < deadline) {
        const pv = this.d.peerView().vms[r.vm];
        if (pv?.state === 'protected' && v.state === 'secondary') break;
        await sleep(100);
      }
      if (v.state === 'secondary' && this.d.peerView().vms[r.vm]?.state === 'protected') {
        r.reprotect = { done: true, ms: this.d.now() - killedAt };
        this.note(r, `protected again: ${c.peer.name} primary, ${r.node} secondary, ${r.reprotect.ms} ms after the kill`, 'verifying');
      } else {
        reasons.push(`not re-protected within ${c.api.drill_timeout_s} s (api.drill_timeout_s): here ${v.state}, peer ${this.d.peerView().vms[r.vm]?.state ?? 'unknown'}`);
      }
    }
    r.phase = 'verifying';
    if (probe) {
      await sleep(1000); // the probe also spans the first checkpoint of the new replica
      await probe.stop();
      const verdict = judgeProbe(vmCfg.probe!, probe.replies, probe.errors, killedAt);
      r.probe = verdict;
      reasons.push(...verdict.problems);
      if (verdict.firstReplyAfterMs !== null) r.failover.ms = verdict.firstReplyAfterMs;
    }
    if (r.failover.ms === null) r.failover.ms = r.failover.takeoverSeenMs;
    try {
      const ps = await this.d.peer.call<{ vms: VmStatus[] }>('GET', '/v1/status', undefined, 3000);
      const pvs = ps.vms.find((x) => x.name === r.vm);
      // The peer's takeover, not whatever it did after (a replica dropped since would hide it).
      const tk = pvs?.lastTakeover;
      if (tk) { r.failover.detectionMs = tk.detectionMs; r.failover.sequenceMs = tk.sequenceMs; }
      if (tk?.kind === 'restart-from-disk' && tk.at >= killedAt) {
        reasons.push(`degraded failover on ${c.peer.name}: the replica was not resumed (${tk.reason}); the guest was restarted from the replicated disk`);
      }
      r.checkpoints.after = { primary: pvs?.checkpoints.count ?? null, secondary: v.status().checkpoints.count };
    } catch (e) {
      this.note(r, `could not read the peer's status for the report: ${errorMessage(e)}`);
    }
    this.finish(r, reasons);
  }

  private finish(r: OperationReport, reasons: string[]): void {
    if (r.state !== 'running') return;
    r.reasons = reasons;
    r.verdict = reasons.length === 0 ? 'pass' : 'fail';
    r.state = reasons.length === 0 ? 'passed' : 'failed';
    r.finishedAt = this.d.now();
    r.phase = 'done';
    this.note(r, `${r.verdict.toUpperCase()}${reasons.length ? ': ' + reasons.join('; ') : ''}${r.failover.ms !== null ? ` (failover ${r.failover.ms} ms)` : ''}`);
    if (r.kind === 'drill') this.d.metrics.drill(r.vm, r.verdict, r.failover.ms, r.finishedAt);
    try {
      writeFileAtomic(join(this.d.config.state_dir, 'drills', `${r.id}.json`), JSON.stringify(r, null, 2) + '\n', 0o644);
    } catch (e) {
      this.d.log.warn('could not save the report', { id: r.id, error: errorMessage(e) });
    }
  }
}
