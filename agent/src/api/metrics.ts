// Prometheus metrics (prom-client). Counters/histograms are fed by events as they happen;
// gauges are filled at scrape time from the agent's in-memory state (no QMP round-trip).
import { Counter, Gauge, Histogram, Registry } from 'prom-client';

export type FailoverReason =
  | 'primary-lost' | 'primary-qemu-gone' | 'requested'
  | 'secondary-lost' | 'secondary-sick' | 'checkpoint-stall' | 'checkpoint-storm' | 'degraded-restart' | 'other';

export interface GaugeSnapshot {
  peerUp: boolean;
  heartbeatRejected: number;
  heartbeatStale: number;
  paths: { index: number; address: string; up: boolean; rttMs: number | null }[];
  witnessUp: boolean | null;
  vms: { name: string; state: string; protected: boolean; epoch: number; resyncRemaining: number | null; resyncMode?: string | null; resyncPlanned?: number | null; drRpoS?: number | null; drRpoTargetS?: number | null }[];
}

export class Metrics {
  readonly registry = new Registry();
  private readonly checkpoints: Counter<'vm'>;
  private readonly pause: Histogram<'vm'>;
  private readonly failovers: Counter<'vm' | 'reason'>;
  private readonly resyncBytes: Counter<'vm'>;
  private readonly drills: Counter<'vm' | 'result'>;
  private readonly drillFailover: Gauge<'vm'>;
  private readonly drillLast: Gauge<'vm' | 'result'>;
  private readonly drillLastAt = new Map<string, number>();
  private readonly drBytes: Counter<'vm' | 'mode'>;
  private readonly drPoints: Counter<'vm' | 'result'>;
  readonly heartbeatRejected: Counter;
  private snapshot: () => GaugeSnapshot = () => ({ peerUp: false, heartbeatRejected: 0, heartbeatStale: 0, paths: [], witnessUp: null, vms: [] });

  constructor() {
    const r = [this.registry];
    this.checkpoints = new Counter({ name: 'ftkvm_checkpoints_total', help: 'COLO checkpoints completed (counted on this node\'s QEMU)', labelNames: ['vm'], registers: r });
    this.pause = new Histogram({ name: 'ftkvm_checkpoint_pause_seconds', help: 'Guest pause per COLO checkpoint', labelNames: ['vm'],
      buckets: [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5], registers: r });
    this.failovers = new Counter({ name: 'ftkvm_failovers_total', help: 'Failovers handled by this node, by reason', labelNames: ['vm', 'reason'], registers: r });
    this.resyncBytes = new Counter({ name: 'ftkvm_resync_bytes_total', help: 'Disk bytes copied to a new secondary', labelNames: ['vm'], registers: r });
    this.drills = new Counter({ name: 'ftkvm_drills_total', help: 'Failover drills run through this node, by result', labelNames: ['vm', 'result'], registers: r });
    this.drillFailover = new Gauge({ name: 'ftkvm_drill_last_failover_seconds', help: 'Failover time measured by the last drill', labelNames: ['vm'], registers: r });
    // A time, not a counter: "no passing drill for N days" must survive agent restarts (it is
    // restored from the saved reports at start) and is alerted on across both nodes of a pair.
    this.drillLast = new Gauge({ name: 'ftkvm_drill_last_timestamp_seconds', help: 'Unix time at which the last drill run through this node finished, by result (restored from the saved reports at start)', labelNames: ['vm', 'result'], registers: r });
    this.drBytes = new Counter({ name: 'ftkvm_dr_shipped_bytes_total', help: 'Disk bytes shipped to the DR site by this node, by mode (delta: dirty bitmap; digest: chunks that differed; full: first copy)', labelNames: ['vm', 'mode'], registers: r });
    this.drPoints = new Counter({ name: 'ftkvm_dr_points_total', help: 'Recovery points this node tried to ship, by result', labelNames: ['vm', 'result'], registers: r });
    const self = this;
    // Counted by the heartbeat service; read at scrape time.
    this.heartbeatRejected = new Counter({ name: 'ftkvm_heartbeat_rejected_total', help: 'Heartbeat datagrams rejected (bad HMAC, wrong sender or protocol version, garbage)', registers: r,
      collect() { this.reset(); this.inc(self.snapshot().heartbeatRejected); } });
    new Counter({ name: 'ftkvm_heartbeat_stale_total', help: 'Authentic heartbeat datagrams ignored as proof of nothing recent (replayed, queued while the agent was stopped, from a past life)', registers: r,
      collect() { this.reset(); this.inc(self.snapshot().heartbeatStale); } });
    new Gauge({ name: 'ftkvm_peer_up', help: '1 when the peer agent is heard on at least one path', registers: r,
      collect() { this.set(self.snapshot().peerUp ? 1 : 0); } });
    new Gauge({ name: 'ftkvm_heartbeat_path_up', help: '1 when the heartbeat path answers', labelNames: ['path', 'address'], registers: r,
      collect() { this.reset(); for (const p of self.snapshot().paths) this.set({ path: String(p.index), address: p.address }, p.up ? 1 : 0); } });
    new Gauge({ name: 'ftkvm_heartbeat_rtt_seconds', help: 'Last heartbeat round-trip time per path', labelNames: ['path', 'address'], registers: r,
      collect() { this.reset(); for (const p of self.snapshot().paths) if (p.rttMs !== null) this.set({ path: String(p.index), address: p.address }, p.rttMs / 1000); } });
    new Gauge({ name: 'ftkvm_witness_up', help: '1 when the witness answers (absent in two-node mode)', registers: r,
      collect() { const w = self.snapshot().witnessUp; this.reset(); if (w !== null) this.set(w ? 1 : 0); } });
    new Gauge({ name: 'ftkvm_protected_vms', help: 'VMs on this node that are protected (primary with healthy replica, or healthy secondary)', registers: r,
      collect() { this.set(self.snapshot().vms.filter((v) => v.protected).length); } });
    new Gauge({ name: 'ftkvm_vm_protected', help: '1 when the VM is protected', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of self.snapshot().vms) this.set({ vm: v.name }, v.protected ? 1 : 0); } });
    new Gauge({ name: 'ftkvm_vm_state', help: 'Current state of the VM on this node (1 for the current state)', labelNames: ['vm', 'state'], registers: r,
      collect() { this.reset(); for (const v of self.snapshot().vms) this.set({ vm: v.name, state: v.state }, 1); } });
    new Gauge({ name: 'ftkvm_vm_epoch', help: 'Highest epoch (primary generation) this node knows for the VM', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of self.snapshot().vms) this.set({ vm: v.name }, v.epoch); } });
    new Gauge({ name: 'ftkvm_resync_remaining_bytes', help: 'Disk bytes left to copy to the secondary (during resync)', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of self.snapshot().vms) if (v.resyncRemaining !== null) this.set({ vm: v.name }, v.resyncRemaining); } });
    // What a resync must move (checksum: the differing chunks and the writes since; full: the disk).
    new Gauge({ name: 'ftkvm_resync_planned_bytes', help: 'Bytes the running resync must copy to the secondary, by mode (checksum: chunks that differ plus writes since; full: the whole disk)', labelNames: ['vm', 'mode'], registers: r,
      collect() { this.reset(); for (const v of self.snapshot().vms) if (v.resyncMode && v.resyncPlanned !== null && v.resyncPlanned !== undefined) this.set({ vm: v.name, mode: v.resyncMode }, v.resyncPlanned); } });
    // Only on the node that ships (the VM's primary): the age of the newest point's data.
    new Gauge({ name: 'ftkvm_dr_rpo_seconds', help: 'Age of the newest recovery point at the DR site (the achieved RPO), on the node that ships it', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of self.snapshot().vms) if (v.drRpoS !== null && v.drRpoS !== undefined) this.set({ vm: v.name }, v.drRpoS); } });
    new Gauge({ name: 'ftkvm_dr_rpo_target_seconds', help: 'The VM\'s dr.rpo_target_s, on the node that ships its recovery points (alert when ftkvm_dr_rpo_seconds exceeds it)', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of self.snapshot().vms) if (v.drRpoTargetS !== null && v.drRpoTargetS !== undefined) this.set({ vm: v.name }, v.drRpoTargetS); } });
  }

  setSnapshot(f: () => GaugeSnapshot): void { this.snapshot = f; }
  checkpoint(vm: string, pauseMs: number): void { this.checkpoints.inc({ vm }); this.pause.observe({ vm }, pauseMs / 1000); }
  failover(vm: string, reason: FailoverReason): void { this.failovers.inc({ vm, reason }); }
  resync(vm: string, bytes: number): void { if (bytes > 0) this.resyncBytes.inc({ vm }, bytes); }
  drill(vm: string, result: 'pass' | 'fail', failoverMs: number | null, finishedAtMs: number): void {
    this.drills.inc({ vm, result });
    if (failoverMs !== null) this.drillFailover.set({ vm }, failoverMs / 1000);
    this.drillSeen(vm, result, finishedAtMs);
  }
  /** A drill that finished at this time (a saved report read at start, or one just run): the newest counts. */
  drillSeen(vm: string, result: 'pass' | 'fail', finishedAtMs: number): void {
    const key = `${vm}\0${result}`;
    if ((this.drillLastAt.get(key) ?? -Infinity) >= finishedAtMs) return;
    this.drillLastAt.set(key, finishedAtMs);
    this.drillLast.set({ vm, result }, Math.round(finishedAtMs / 1000));
  }
  drShipped(vm: string, mode: string, bytes: number): void { this.drBytes.inc({ vm, mode }, bytes); this.drPoints.inc({ vm, result: 'shipped' }); }
  drFailed(vm: string): void { this.drPoints.inc({ vm, result: 'failed' }); }
  text(): Promise<string> { return this.registry.metrics(); }
  get contentType(): string { return this.registry.contentType; }
}
