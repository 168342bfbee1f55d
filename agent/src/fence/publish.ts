// What the agent tells its lease fencer (fencer.ts), computed from the agent's own view: which
// primaries to keep (control) and, every control step, its word on the peer and the leases
// (pulse). Pure: the agent writes the result to files (files.ts); the simulator hands it over.
import type { Config } from '../config/schema.ts';
import { etcdSettings } from '../witness/etcd.ts';
import type { PeerView } from '../peer/heartbeat.ts';
import type { PromotionGate } from '../colo/gate.ts';
import type { AgentPulse, FencerControl } from './fencer.ts';

export interface FencedVm {
  fencerEntry(): FencerControl['vms'][string] | null;
  fencedByAgent(): boolean;
}

export function fencerControl(c: Config, vms: Map<string, FencedVm>): FencerControl {
  const keep: FencerControl['vms'] = {};
  for (const [n, v] of vms) { const e = v.fencerEntry(); if (e) keep[n] = e; }
  return {
    witness: { url: c.witness.url ?? '', etcd: c.witness.etcd ? etcdSettings(c.witness.etcd) : undefined, tokenFile: c.witness.token_file ?? c.api.token_file, caFile: c.witness.ca_file, leaseMs: c.witness.lease_ms, node: c.node.name },
    heartbeatIntervalMs: c.heartbeat.interval_ms, vms: keep,
  };
}

/** `now`: the fencer's clock (CLOCK_MONOTONIC ms); ages in the view are turned into times on it. */
export function agentPulse(control: FencerControl, vms: Map<string, FencedVm>, view: PeerView, gate: PromotionGate, now: number): AgentPulse {
  const leaseValidUntil: AgentPulse['leaseValidUntil'] = {};
  for (const n of Object.keys(control.vms)) {
    const l = gate.lease(n);
    leaseValidUntil[n] = l.state === 'held' && l.validForMs !== null ? now + l.validForMs : null;
  }
  const fenced = [...vms].filter(([, v]) => v.fencedByAgent()).map(([n]) => n);
  return { at: now, peerHeardAt: view.lastHeardMs === null ? null : now - view.lastHeardMs, leaseValidUntil, fenced };
}
