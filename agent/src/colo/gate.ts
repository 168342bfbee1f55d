// The promotion gate: asked before a node becomes primary (takeover, cold start) and, while a
// primary is isolated from its peer, before it may keep running. The witness implementation
// (witness/client.ts) grants only to the holder of the VM's lease; two-node mode always grants
// and is documented as unsafe against partitions.
export interface GateDecision {
  granted: boolean;
  /** Epoch the lease is held at (witness) or the requested epoch (two-node). */
  epoch: number;
  reason: string;
}

export interface WitnessStatus {
  mode: 'witness' | 'two-node';
  url: string | null;
  reachable: boolean | null;   // null: not applicable (two-node)
  lastContactMs: number | null;
  error: string | null;
}

export interface PromotionGate {
  readonly mode: 'witness' | 'two-node';
  /** Take the VM's lease at `epoch` (a new, higher epoch when promoting). */
  acquire(vm: string, epoch: number, reason: string): Promise<GateDecision>;
  /** Keep the lease at `epoch`; false when another node holds a newer epoch or the witness is unreachable. */
  renew(vm: string, epoch: number): Promise<GateDecision>;
  /** Latest known epoch for the VM at the witness (null when unknown). */
  currentEpoch(vm: string): Promise<number | null>;
  status(): WitnessStatus;
}

export class TwoNodeGate implements PromotionGate {
  readonly mode = 'two-node' as const;
  async acquire(_vm: string, epoch: number): Promise<GateDecision> {
    return { granted: true, epoch, reason: 'two-node mode: no witness configured (unsafe against partitions)' };
  }
  async renew(_vm: string, epoch: number): Promise<GateDecision> {
    return { granted: true, epoch, reason: 'two-node mode' };
  }
  async currentEpoch(): Promise<number | null> { return null; }
  status(): WitnessStatus { return { mode: 'two-node', url: null, reachable: null, lastContactMs: null, error: null }; }
}
