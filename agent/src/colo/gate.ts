// The promotion gate: asked before a node becomes primary (takeover, cold start), and —
// through the lease it keeps renewing — whether an isolated primary may go on running. The
// witness implementation (witness/client.ts) grants only to the holder of the VM's lease;
// two-node mode always grants and is documented as unsafe against partitions.
export interface GateDecision {
  granted: boolean;
  epoch: number;
  reason: string;
  retryAfterMs?: number | null;
}

/**
 * held: valid now · expired: we hold it but could not renew in time · lost: someone else has a
 * newer epoch · unknown: just started keeping it and the witness has not answered the first
 * renewal yet (after an agent restart: the lease may well still be valid) · none: not kept
 */
export type LeaseState = 'held' | 'expired' | 'lost' | 'unknown' | 'none';
export interface LeaseView {
  state: LeaseState; reason: string | null; validForMs: number | null;
  /** lost: the epoch the witness says another node holds (this node learns it). */
  heldEpoch?: number;
}

export interface WitnessStatus {
  mode: 'witness' | 'two-node';
  url: string | null;
  reachable: boolean | null;   // null: not applicable (two-node)
  lastContactMs: number | null;
  error: string | null;
  leaseMs: number | null;
}

export interface PromotionGate {
  readonly mode: 'witness' | 'two-node';
  /** Take (or renew) the VM's lease at `epoch` (a new, higher epoch when promoting). */
  acquire(vm: string, epoch: number, reason: string): Promise<GateDecision>;
  /** Keep renewing the lease of `vm` at `epoch` in the background; null stops. */
  keep(vm: string, epoch: number | null): void;
  /**
   * Give the lease up now: this node's QEMU for the VM is gone (crash, drill, switchover), so the
   * successor's takeover need not wait for the expiry. Stop keeping it first. Never throws.
   */
  release(vm: string, epoch: number): Promise<boolean>;
  lease(vm: string): LeaseView;
  status(): WitnessStatus;
  stop(): void;
}

export class TwoNodeGate implements PromotionGate {
  readonly mode = 'two-node' as const;
  async acquire(_vm: string, epoch: number): Promise<GateDecision> {
    return { granted: true, epoch, reason: 'two-node mode: no witness configured (unsafe against partitions)' };
  }
  keep(): void { /* nothing to renew */ }
  async release(): Promise<boolean> { return true; }
  lease(): LeaseView { return { state: 'held', reason: 'two-node mode', validForMs: null }; }
  status(): WitnessStatus { return { mode: 'two-node', url: null, reachable: null, lastContactMs: null, error: null, leaseMs: null }; }
  stop(): void { /* nothing */ }
}
