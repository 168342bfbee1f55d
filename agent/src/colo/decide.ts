// What should this node do next for one VM? A pure function of what the node knows, so every
// rule is unit-tested with fabricated inputs. The controller runs the chosen action.
import type { VmSummary } from '../peer/heartbeat.ts';
import { isPrimaryState, type VmState } from './states.ts';
import type { LeaseState } from './gate.ts';

/**
 * alive: heartbeats arrive. agent-down: heartbeats silent but the peer host answers and its
 * QEMU is still connected to ours (an agent restart: hold on). dead: host silent, or its QEMU
 * is gone. unknown: never heard since start.
 */
export type PeerLiveness = 'alive' | 'agent-down' | 'dead' | 'unknown';

export interface DecideInput {
  node: string;
  preferredPrimary: string;
  state: VmState;
  busy: boolean;
  durable: { epoch: number; primaryEpoch: number; fenced: boolean };
  peer: PeerLiveness;
  peerVm: VmSummary | undefined;      // last summary the peer sent for this VM
  replPathUp: boolean;                 // heartbeats answer on the replication network
  lease: LeaseState;                   // this node's lease for the VM ('held' in two-node mode)
  leaseReason: string | null;
  msSinceAgentStart: number;
  startupPeerWaitMs: number;
  heardPeerSinceStart: boolean;
  nowMono: number;
  nextProtectAt: number;               // mono ms; protection attempts back off after failures
  nextStartAt: number;                 // mono ms; restarts back off after QEMU crash loops
  msSinceLastCheckpoint: number | null;
  checkpointStallMs: number;
  ownQemuWedged: string | null;        // primary, checkpoints stalled: why this node's own QEMU does not answer (null: it answers)
  stormReason: string | null;          // primary: checkpoint storm detected
  silentReplicaReason: string | null;     // primary: the secondary sends colo-compare nothing while the guest talks (replica-health.ts)
  takeoverRequested: string | null;    // primary asked us (RPC) to take over now
  selfSick: string | null;             // secondary: why this node's own replica is not trusted
  replicaEpoch: number | null;         // secondary: the promotion epoch of the primary its replica copies
  bootHeldMs: number | null;           // standalone: the cold-started guest waits paused (-S) for its first protection since
  peerVmPredatesReplica: boolean;      // secondary: peerVm was sent before the protection attempt this replica belongs to
  peerSilentMs: number | null;         // since the last heartbeat from the peer (null: never heard)
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
}

export type Action =
  | { kind: 'none'; why: string }
  | { kind: 'cold-start'; why: string }
  | { kind: 'protect'; why: string }
  | { kind: 'drop-secondary'; why: string }
  | { kind: 'takeover'; why: string }
  | { kind: 'restart-from-disk'; why: string }
  | { kind: 'discard-secondary'; why: string }
  | { kind: 'demote'; why: string }
  | { kind: 'boot'; why: string }
  | { kind: 'hand-over'; why: string }
  | { kind: 'fence'; why: string }
  | { kind: 'unfence'; why: string }
  | { kind: 'reclaim'; why: string };

const none = (why: string): Action => ({ kind: 'none', why });

/** How long a cold-started guest may wait paused for its first protection to begin. */
export const BOOT_HOLD_MAX_MS = 30_000;

/**
 * Both nodes run the VM as primary (split brain after a partition): who yields? The node that
 * was promoted LATER (higher promotion epoch) is the legitimate one. Compare promotion epochs,
 * never "highest epoch heard of": a stale node learns the peer's epoch from its heartbeats.
 */
function yieldsTo(i: DecideInput): boolean {
  const theirs = i.peerVm!.primaryEpoch ?? 0, mine = i.durable.primaryEpoch;
  if (theirs !== mine) return theirs > mine;
  return i.preferredPrimary !== i.node; // equal promotion epochs cannot both be legitimate: the preferred node keeps it
}

/**
 * Safety first, and before anything else (even while another operation runs): a primary whose
 * lease expired and that no longer hears its peer must stop its outputs now. Two silent
 * heartbeat intervals are enough here — long before the other host could decide the primary
 * is dead (heartbeat timeout + host probe) and be granted the lease.
 */
export function mustFence(i: Pick<DecideInput, 'state' | 'lease' | 'leaseReason' | 'peerSilentMs' | 'heartbeatIntervalMs' | 'heartbeatTimeoutMs' | 'msSinceAgentStart'>): Action | null {
  const primaryRunning = i.state === 'standalone' || i.state === 'protected' || i.state === 'syncing' || i.state === 'dropping';
  if (!primaryRunning || i.lease !== 'expired') return null;
  // Never heard since this agent started counts as silent only once a heartbeat timeout has
  // passed: right after a restart, not having heard the peer YET proves nothing.
  const silent = i.peerSilentMs === null ? i.msSinceAgentStart > i.heartbeatTimeoutMs : i.peerSilentMs > 2 * i.heartbeatIntervalMs;
  if (!silent) return null;
  return { kind: 'fence', why: `isolated: peer silent for ${i.peerSilentMs ?? 'ever'} ms and no valid lease (${i.leaseReason})` };
}

/** A primary whose lease went to another node (newer epoch) stops being primary (decide() and the watchdog). */
export function mustDemote(i: Pick<DecideInput, 'state' | 'lease' | 'leaseReason'>): Action | null {
  if (!isPrimaryState(i.state) || i.state === 'starting' || i.state === 'taking-over' || i.lease !== 'lost') return null;
  return { kind: 'demote', why: `lost the lease: ${i.leaseReason}` };
}

export function decide(i: DecideInput): Action {
  const fence = mustFence(i);
  if (fence) return fence;
  // A primary whose lease went to another node (newer epoch) must stop being primary at once,
  // even while an operation runs: the lease fencer freezes its QEMU meanwhile, and a protection
  // waiting on that frozen QEMU would otherwise hold the VM down (found by the simulator, seed
  // 4375: a takeover request granted after its client timed out, the guest frozen for good).
  const demote = mustDemote(i);
  if (demote) return demote;
  if (i.busy) return none('an operation is in progress');
  const pv = i.peerVm;
  const peerRuns = i.peer === 'alive' && pv !== undefined && pv.qemu && isPrimaryState(pv.state);

  switch (i.state) {
    case 'stopped': {
      if (peerRuns) return none(`peer runs the VM (${pv!.state}, epoch ${pv!.epoch}); waiting to become its secondary`);
      if (i.peer === 'alive' && pv?.qemu && (pv.state === 'secondary' || pv.state === 'taking-over')) {
        return none('peer holds the replica and takes over; waiting to become its secondary');
      }
      if (i.nowMono < i.nextStartAt) return none('restart backoff after QEMU exits');
      if (i.peer === 'alive' && pv) {
        // Neither node runs it: the node that was primary most recently has the newest disk.
        const mine = i.durable.primaryEpoch, theirs = pv.primaryEpoch ?? 0;
        if (mine > theirs) return { kind: 'cold-start', why: `neither node runs the VM; this node was primary at epoch ${mine} > peer's ${theirs}` };
        if (mine === theirs && i.preferredPrimary === i.node) return { kind: 'cold-start', why: `neither node runs the VM; equal primary epochs (${mine}) and this node is the preferred primary` };
        return none(`peer was primary more recently (epoch ${theirs}) or is preferred; it starts the VM`);
      }
      if (i.peer === 'agent-down') return none('peer agent is restarting; waiting for it');
      if (!i.heardPeerSinceStart && i.msSinceAgentStart < i.startupPeerWaitMs) {
        return none(`waiting up to ${Math.round(i.startupPeerWaitMs / 1000)} s for the peer before deciding alone`);
      }
      const d = i.durable;
      if (d.primaryEpoch >= d.epoch && (d.epoch > 0 || i.preferredPrimary === i.node)) {
        return { kind: 'cold-start', why: d.epoch > 0 ? `peer unreachable; this node was the last primary (epoch ${d.epoch})` : 'peer unreachable; first start and this node is the preferred primary' };
      }
      return none(`peer unreachable and it holds a newer copy (epoch ${d.epoch} > this node's primary epoch ${d.primaryEpoch}); waiting for it`);
    }
    case 'standalone': {
      if (i.peer === 'alive' && pv && pv.qemu && isPrimaryState(pv.state) && yieldsTo(i)) {
        return { kind: 'demote', why: `peer also runs the VM as primary, promoted at epoch ${pv.primaryEpoch} (this node at ${i.durable.primaryEpoch}); this copy is stale` };
      }
      if (i.bootHeldMs !== null) {
        // Cold-started paused so the replica is built before the first instruction. A protection
        // that cannot begin must not keep the guest from ever booting.
        if (i.peer !== 'alive' || !pv) return { kind: 'boot', why: 'the peer went away before protection could begin' };
        if (!i.replPathUp) return { kind: 'boot', why: 'the replication network to the peer is down' };
        if (i.bootHeldMs > BOOT_HOLD_MAX_MS) return { kind: 'boot', why: `protection did not begin within ${BOOT_HOLD_MAX_MS / 1000} s of the start` };
      }
      if (i.peer !== 'alive' || !pv) return none('unprotected: peer not available');
      if (isPrimaryState(pv.state) && pv.qemu) return none('peer also claims the VM; waiting for it to yield');
      if (!i.replPathUp) return none('unprotected: replication network to the peer is down');
      if (i.nowMono < i.nextProtectAt) return none(`unprotected: next protection attempt in ${Math.ceil(i.nextProtectAt - i.nowMono)} ms (settling after a takeover, or backing off after a failed attempt)`);
      return { kind: 'protect', why: `peer is up and has no replica (peer state ${pv.state})` };
    }
    case 'protected': {
      if (i.peer === 'dead') return { kind: 'drop-secondary', why: 'peer host lost (no heartbeat on any path, host or its QEMU gone)' };
      if (i.peer === 'alive' && pv) {
        if (!pv.qemu || !['secondary', 'preparing'].includes(pv.state)) return { kind: 'drop-secondary', why: `peer reports its replica as ${pv.qemu ? pv.state : 'QEMU gone'}` };
        if (pv.sick) return { kind: 'drop-secondary', why: `secondary is sick: ${pv.sick}` };
      }
      if (i.peer === 'alive' && !i.replPathUp) {
        // The peer is visible on another network: it will not take over; COLO cannot go on.
        return { kind: 'drop-secondary', why: 'replication network to the peer is down (peer still heard on another path)' };
      }
      if (i.msSinceLastCheckpoint !== null && i.msSinceLastCheckpoint > i.checkpointStallMs) {
        if (i.ownQemuWedged) {
          // The stall is ours: telling the secondary to discard its copy would destroy the only
          // healthy one. Hand over to it when it is there and trusted.
          if (i.peer === 'alive' && pv && pv.qemu && pv.state === 'secondary' && !pv.sick) {
            return { kind: 'hand-over', why: `no checkpoint for ${Math.round(i.msSinceLastCheckpoint)} ms and this node's QEMU does not answer (${i.ownQemuWedged}): the replica is the healthy copy` };
          }
          return none(`no checkpoint for ${Math.round(i.msSinceLastCheckpoint)} ms, but this node's QEMU does not answer (${i.ownQemuWedged}) and the replica cannot take over: keeping it`);
        }
        return { kind: 'drop-secondary', why: `no checkpoint for ${Math.round(i.msSinceLastCheckpoint)} ms (limit ${i.checkpointStallMs}): secondary stuck` };
      }
      if (i.stormReason) return { kind: 'drop-secondary', why: i.stormReason };
      if (i.silentReplicaReason) return { kind: 'drop-secondary', why: `secondary not trusted: ${i.silentReplicaReason}` };
      return none('protected');
    }
    case 'secondary': {
      if (i.replicaEpoch !== null && i.durable.epoch > i.replicaEpoch) {
        // The primary moved to a new epoch without this replica (it dropped it while it could not
        // reach us): whatever this copy holds is older than what it acknowledged since.
        return { kind: 'discard-secondary', why: `epoch ${i.durable.epoch} is known, newer than the epoch ${i.replicaEpoch} this replica copies: it was left behind` };
      }
      // Never resume a copy known to be corrupt: the guest would run on diverged memory (seen:
      // a kernel BUG on the replica's console 0.07 s before the primary's host was lost, a takeover
      // 0.5 s later, the guest panicked). Boot from the replicated disk instead.
      const takeover = (why: string): Action => i.selfSick
        ? { kind: 'restart-from-disk', why: `${why}; this replica is not trusted (${i.selfSick}): restarting the guest from the replicated disk` }
        : { kind: 'takeover', why };
      if (i.takeoverRequested) return takeover(i.takeoverRequested);
      if (i.peer === 'dead') return takeover('primary host lost (no heartbeat on any path, host or its QEMU gone)');
      if (i.peer === 'alive' && pv) {
        if (!pv.qemu) return takeover(`primary's QEMU is gone (peer state ${pv.state})`);
        if (!['protected', 'syncing'].includes(pv.state) && !i.peerVmPredatesReplica) return { kind: 'discard-secondary', why: `primary no longer replicates to this node (peer state ${pv.state})` };
      }
      return none('replicating');
    }
    case 'preparing': {
      if (i.peer === 'dead') return { kind: 'discard-secondary', why: 'primary lost before the replica was complete: this copy is not consistent' };
      // 'protected' too: the primary counts itself protected once its migration entered COLO,
      // which can be heard here before this QEMU has loaded the first checkpoint and resumed
      // (its RESUME moves us to 'secondary'). Discarding then killed a good replica and made
      // the primary's COLO exit with reason=error right after it reported 'protected'.
      if (i.peer === 'alive' && pv && pv.state !== 'syncing' && pv.state !== 'protected') {
        if (i.peerVmPredatesReplica) return none(`the primary's last summary (${pv.state}) predates this replica; waiting for one about it`);
        return { kind: 'discard-secondary', why: `primary is no longer building this replica (peer state ${pv.state})` };
      }
      return none('waiting for the primary\'s COLO stream');
    }
    case 'fenced': {
      if (i.peer === 'alive' && pv && pv.qemu && isPrimaryState(pv.state) && yieldsTo(i)) {
        return { kind: 'demote', why: `peer runs the VM as primary, promoted at epoch ${pv.primaryEpoch}; this paused copy is stale` };
      }
      if (i.peer === 'alive' && pv && pv.epoch > i.durable.primaryEpoch) {
        return { kind: 'demote', why: `peer knows of a promotion after this node's (epoch ${pv.epoch} > ${i.durable.primaryEpoch}); this paused copy is stale` };
      }
      // Only the witness can say this node still owns the epoch. "The peer is back and is not
      // primary" is not enough: a takeover the peer decided while this node was silent may still
      // be on its way to the witness, which grants it as soon as it arrives (this lease expired).
      // CI saw exactly that: resumed by the peer rule, then the peer was granted the stale request
      // 55-100 ms later, and both ran as primaries. A renewal, by contrast, is serialized by the
      // witness with any such request: once renewed, a late takeover request is refused.
      if (i.lease === 'held') return { kind: 'unfence', why: 'the witness renewed this node\'s lease: it still owns the current epoch' };
      // Without the witness (down, or out of reach), only the peer can say it will not take over:
      // it does so by releasing its replica, which it refuses while it is asking the witness for
      // the lease (a request on its way) or runs the VM. With no replica left to promote, this
      // node resumes at its epoch, unprotected, and builds a new replica. Waiting for the witness
      // instead kept the guest paused for as long as the witness was down after one heartbeat
      // gap of 215 ms (CI, witness stopped, both hosts up).
      if (i.peer === 'alive' && pv && !isPrimaryState(pv.state)) {
        return { kind: 'reclaim', why: `no lease from the witness (${i.leaseReason}), but the peer is back and does not run the VM (${pv.qemu ? pv.state : 'no QEMU'}): resuming once it has released any replica` };
      }
      return none('fenced: paused until the witness renews this node\'s lease, the peer is back to release its replica, or the peer shows a newer promotion');
    }
    default:
      return none(`in transition (${i.state})`);
  }
}
