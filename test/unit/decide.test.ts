import test from 'ava';
import { decide, type DecideInput } from '../../agent/src/colo/decide.ts';
import type { VmSummary } from '../../agent/src/peer/heartbeat.ts';

const base: DecideInput = {
  node: 'hostA', preferredPrimary: 'hostA', state: 'stopped', busy: false,
  durable: { epoch: 0, primaryEpoch: 0, fenced: false },
  peer: 'alive', peerVm: undefined, replPathUp: true, lease: 'held', leaseReason: null, peerSilentMs: 30, heartbeatIntervalMs: 100, heartbeatTimeoutMs: 500,
  msSinceAgentStart: 60_000, startupPeerWaitMs: 15_000, heardPeerSinceStart: true,
  nowMono: 100_000, nextProtectAt: 0, nextStartAt: 0,
  msSinceLastCheckpoint: null, checkpointStallMs: 10_000, ownQemuWedged: null, stormReason: null, silentReplicaReason: null, takeoverRequested: null, selfSick: null, replicaEpoch: null, bootHeldMs: null, peerVmPredatesReplica: false,
};
const pv = (state: string, extra: Partial<VmSummary> = {}): VmSummary => ({ state, epoch: 1, primaryEpoch: 0, qemu: state !== 'stopped', ...extra });
const d = (o: Partial<DecideInput>) => decide({ ...base, ...o });

test('nothing happens while an operation is running', (t) => {
  t.is(d({ busy: true, state: 'secondary', peer: 'dead' }).kind, 'none');
});

// ---------------------------------------------------------------- cold start / election
test('first start, both up: the preferred primary starts the VM', (t) => {
  t.is(d({ peerVm: pv('stopped', { epoch: 0 }) }).kind, 'cold-start');
  t.is(d({ node: 'hostB', peerVm: pv('stopped', { epoch: 0 }) }).kind, 'none');
});

test('cold start, both up: the node that was primary most recently wins over the preferred one', (t) => {
  const a = d({ durable: { epoch: 5, primaryEpoch: 3, fenced: false }, peerVm: pv('stopped', { epoch: 5, primaryEpoch: 5 }) });
  t.is(a.kind, 'none');
  t.regex(a.why, /peer was primary more recently/);
  t.is(d({ node: 'hostB', durable: { epoch: 5, primaryEpoch: 5, fenced: false }, peerVm: pv('stopped', { epoch: 5, primaryEpoch: 3 }) }).kind, 'cold-start');
});

test('a stopped node never starts a second copy while the peer runs the VM', (t) => {
  for (const s of ['standalone', 'protected', 'syncing', 'starting', 'fenced']) {
    t.is(d({ durable: { epoch: 9, primaryEpoch: 9, fenced: false }, peerVm: pv(s, { epoch: 2 }) }).kind, 'none', s);
  }
});

test('a stopped node waits while the peer holds a replica that is about to take over', (t) => {
  // our primary QEMU just died; peer is still "secondary" for a moment
  const r = d({ durable: { epoch: 1, primaryEpoch: 1, fenced: false }, peerVm: pv('secondary', { epoch: 1 }) });
  t.is(r.kind, 'none');
  t.regex(r.why, /takes over/);
});

test('peer unreachable at start: wait for it first, then start alone only as the last primary', (t) => {
  t.is(d({ peer: 'unknown', heardPeerSinceStart: false, msSinceAgentStart: 1000 }).kind, 'none');
  t.is(d({ peer: 'dead', heardPeerSinceStart: false, msSinceAgentStart: 16_000 }).kind, 'cold-start'); // first ever start, preferred
  t.is(d({ node: 'hostB', peer: 'dead', heardPeerSinceStart: false, msSinceAgentStart: 16_000 }).kind, 'none'); // not preferred
  t.is(d({ peer: 'dead', durable: { epoch: 4, primaryEpoch: 4, fenced: false } }).kind, 'cold-start');
  const stale = d({ peer: 'dead', durable: { epoch: 4, primaryEpoch: 3, fenced: false } });
  t.is(stale.kind, 'none');
  t.regex(stale.why, /holds a newer copy \(epoch 4/);
});

test('peer host up but its agent restarting: never start alone', (t) => {
  t.is(d({ peer: 'agent-down', durable: { epoch: 4, primaryEpoch: 4, fenced: false } }).kind, 'none');
});

test('restart backoff after QEMU crash loops is honoured', (t) => {
  t.is(d({ peerVm: pv('stopped', { epoch: 0 }), nextStartAt: base.nowMono + 1000 }).kind, 'none');
});

// ---------------------------------------------------------------- primary
test('standalone primary protects when the peer is up and has no replica', (t) => {
  t.is(d({ state: 'standalone', peerVm: pv('stopped') }).kind, 'protect');
  t.is(d({ state: 'standalone', peerVm: pv('preparing') }).kind, 'protect');
  t.is(d({ state: 'standalone', peerVm: pv('stopped'), nextProtectAt: base.nowMono + 5 }).kind, 'none');
  t.is(d({ state: 'standalone', peer: 'dead' }).kind, 'none');
});

test('split brain after a partition: the primary promoted earlier yields', (t) => {
  const older = d({ state: 'standalone', durable: { epoch: 3, primaryEpoch: 3, fenced: false }, peerVm: pv('standalone', { epoch: 4, primaryEpoch: 4 }) });
  t.is(older.kind, 'demote');
  const newer = d({ state: 'standalone', durable: { epoch: 4, primaryEpoch: 4, fenced: false }, peerVm: pv('standalone', { epoch: 3, primaryEpoch: 3 }) });
  t.is(newer.kind, 'none');
  // equal promotion epochs cannot both be legitimate: the preferred primary keeps it
  t.is(d({ state: 'standalone', durable: { epoch: 4, primaryEpoch: 4, fenced: false }, peerVm: pv('standalone', { epoch: 4, primaryEpoch: 4 }) }).kind, 'none');
  t.is(d({ node: 'hostB', state: 'standalone', durable: { epoch: 4, primaryEpoch: 4, fenced: false }, peerVm: pv('standalone', { epoch: 4, primaryEpoch: 4 }) }).kind, 'demote');
});

test('a stale primary that merely HEARD the newer epoch still yields (regression)', (t) => {
  // A was primary at 1, B took over at 2 during a partition; A's heartbeats taught it epoch 2.
  const a = d({ node: 'hostA', preferredPrimary: 'hostA', state: 'standalone', durable: { epoch: 2, primaryEpoch: 1, fenced: false }, peerVm: pv('standalone', { epoch: 2, primaryEpoch: 2 }) });
  t.is(a.kind, 'demote');
  // and B, seeing A at primary epoch 1, keeps running
  const b = d({ node: 'hostB', preferredPrimary: 'hostA', state: 'standalone', durable: { epoch: 2, primaryEpoch: 2, fenced: false }, peerVm: pv('fenced', { epoch: 2, primaryEpoch: 1 }) });
  t.is(b.kind, 'none');
  const fenced = d({ node: 'hostA', state: 'fenced', lease: 'expired', durable: { epoch: 2, primaryEpoch: 1, fenced: true }, peerVm: pv('stopped', { epoch: 2, primaryEpoch: 2, qemu: false }) });
  t.is(fenced.kind, 'demote', 'the peer promoted after us even though it is not running now');
});

test('protected primary drops a dead, vanished, sick, stuck or storming secondary', (t) => {
  const P = (o: Partial<DecideInput>) => d({ state: 'protected', peerVm: pv('secondary'), ...o });
  t.is(P({}).kind, 'none');
  t.is(P({ peer: 'dead' }).kind, 'drop-secondary');
  t.is(P({ peerVm: pv('stopped') }).kind, 'drop-secondary');
  t.is(P({ peerVm: pv('secondary', { qemu: false }) }).kind, 'drop-secondary');
  t.regex(P({ peerVm: pv('secondary', { sick: 'guest oops' }) }).why, /sick: guest oops/);
  t.regex(P({ msSinceLastCheckpoint: 10_001 }).why, /no checkpoint for 10001 ms/);
  t.is(P({ msSinceLastCheckpoint: 9_999 }).kind, 'none');
  t.is(P({ stormReason: 'checkpoint storm' }).kind, 'drop-secondary');
  t.regex(P({ silentReplicaReason: 'output left only at checkpoints' }).why, /secondary not trusted: output left only at checkpoints/);
});

test('replication network down while the peer is heard elsewhere: drop at once, do not re-protect', (t) => {
  const r = d({ state: 'protected', peerVm: pv('secondary'), replPathUp: false });
  t.is(r.kind, 'drop-secondary');
  t.regex(r.why, /replication network to the peer is down/);
  t.is(d({ state: 'standalone', peerVm: pv('stopped'), replPathUp: false }).kind, 'none');
  // the secondary does not take over: its primary is alive (heard on the management path)
  t.is(d({ state: 'secondary', peerVm: pv('protected'), replPathUp: false }).kind, 'none');
});

test('a protected primary keeps its replica while the peer agent merely restarts', (t) => {
  t.is(d({ state: 'protected', peer: 'agent-down', peerVm: pv('secondary') }).kind, 'none');
});

// ---------------------------------------------------------------- secondary
test('secondary takes over when the primary host is lost or its QEMU is gone', (t) => {
  const S = (o: Partial<DecideInput>) => d({ state: 'secondary', peerVm: pv('protected'), ...o });
  t.is(S({}).kind, 'none');
  t.is(S({ peer: 'dead' }).kind, 'takeover');
  t.is(S({ peerVm: pv('protected', { qemu: false }) }).kind, 'takeover');
  t.is(S({ takeoverRequested: 'switchover' }).kind, 'takeover');
});

test('a replica known to be corrupt is never resumed: the guest restarts from the replicated disk (issue 11 path 9)', (t) => {
  const S = (o: Partial<DecideInput>) => d({ state: 'secondary', peerVm: pv('protected'), selfSick: 'guest kernel error on the replica console: BUG', ...o });
  t.is(S({}).kind, 'none', 'while the primary runs, the primary drops and rebuilds it');
  for (const o of [{ peer: 'dead' as const }, { peerVm: pv('protected', { qemu: false }) }, { takeoverRequested: 'switchover' }]) {
    const r = S(o);
    t.is(r.kind, 'restart-from-disk', JSON.stringify(o));
    t.regex(r.why, /not trusted \(guest kernel error.*restarting the guest from the replicated disk/);
  }
});

test('a guest cold-started paused for protection boots unprotected when protection cannot begin (issue 11 path 2)', (t) => {
  const H = (o: Partial<DecideInput>) => d({ state: 'standalone', bootHeldMs: 1000, peerVm: pv('stopped'), ...o });
  t.is(H({}).kind, 'protect', 'the normal case: protect first');
  t.is(H({ peer: 'dead' }).kind, 'boot');
  t.is(H({ peer: 'agent-down' }).kind, 'boot');
  t.is(H({ replPathUp: false }).kind, 'boot');
  t.is(H({ nextProtectAt: 200_000 }).kind, 'none', 'a short backoff after a failed attempt (which resumed the guest anyway)');
  t.is(H({ nextProtectAt: 200_000, bootHeldMs: 31_000 }).kind, 'boot');
  t.is(d({ state: 'standalone', bootHeldMs: null, peer: 'dead' }).kind, 'none', 'a running guest is left alone');
});

test('a checkpoint stall is blamed on the secondary only when this node\'s own QEMU answers (issue 11 path 3)', (t) => {
  const P = (o: Partial<DecideInput>) => d({ state: 'protected', peerVm: pv('secondary'), msSinceLastCheckpoint: 12_000, ...o });
  t.is(P({}).kind, 'drop-secondary', 'own QEMU answers: the secondary is stuck');
  const h = P({ ownQemuWedged: 'QMP query-status unanswered: timeout' });
  t.is(h.kind, 'hand-over');
  t.regex(h.why, /the replica is the healthy copy/);
  t.is(P({ ownQemuWedged: 'timeout', peerVm: pv('secondary', { sick: 'BUG' }) }).kind, 'drop-secondary', 'never hand over to a sick replica: it is dropped as always');
  t.is(P({ ownQemuWedged: 'timeout', peer: 'dead' }).kind, 'drop-secondary', 'no replica to hand over to: the peer is gone anyway');
});

test('a replica left behind by a primary that moved to a new epoch is discarded, never promoted (issue 11 path 1)', (t) => {
  // B copies epoch 1; A dropped it during a partition and moved to epoch 2; B just heard of it
  const r = d({ state: 'secondary', replicaEpoch: 1, durable: { epoch: 2, primaryEpoch: 0, fenced: false }, peer: 'dead', peerVm: pv('standalone', { epoch: 2 }) });
  t.is(r.kind, 'discard-secondary');
  t.regex(r.why, /left behind/);
  t.is(d({ state: 'secondary', replicaEpoch: 2, durable: { epoch: 2, primaryEpoch: 0, fenced: false }, peer: 'dead' }).kind, 'takeover');
});

test('secondary never takes over while the primary is alive or only its agent restarts', (t) => {
  t.is(d({ state: 'secondary', peer: 'agent-down', peerVm: pv('protected') }).kind, 'none');
  t.is(d({ state: 'secondary', peer: 'unknown', peerVm: pv('protected') }).kind, 'none');
});

test('a secondary the primary stopped using is discarded, never promoted', (t) => {
  const r = d({ state: 'secondary', peerVm: pv('standalone') });
  t.is(r.kind, 'discard-secondary');
  t.is(d({ state: 'preparing', peerVm: pv('standalone') }).kind, 'discard-secondary');
  t.is(d({ state: 'preparing', peerVm: pv('syncing') }).kind, 'none');
  // the primary is in COLO before this replica's QEMU resumed from the first checkpoint
  t.is(d({ state: 'preparing', peerVm: pv('protected') }).kind, 'none');
});

test('a replica is not discarded on a primary summary sent before the attempt it belongs to', (t) => {
  // CI: prepared in 86 ms, the last heartbeat heard was still from before the primary's attempt
  const r = d({ state: 'preparing', peerVm: pv('standalone'), peerVmPredatesReplica: true });
  t.is(r.kind, 'none');
  t.regex(r.why, /predates this replica/);
  t.is(d({ state: 'secondary', peerVm: pv('standalone'), peerVmPredatesReplica: true }).kind, 'none');
  // but a primary that is gone is gone, whatever the summary's age
  t.is(d({ state: 'preparing', peer: 'dead', peerVm: pv('standalone'), peerVmPredatesReplica: true }).kind, 'discard-secondary');
  t.is(d({ state: 'secondary', peer: 'dead', peerVm: pv('standalone'), peerVmPredatesReplica: true }).kind, 'takeover');
});

test('a replica whose primary died before the first checkpoint is discarded, not promoted', (t) => {
  const r = d({ state: 'preparing', peer: 'dead', peerVm: pv('syncing') });
  t.is(r.kind, 'discard-secondary');
  t.regex(r.why, /not consistent/);
});

// ---------------------------------------------------------------- witness leases
test('an agent restart does not fence a healthy primary before it could hear anyone (issue 11 path 5)', (t) => {
  // just restarted: the witness has not answered the first renewal, the peer not been heard yet
  t.is(d({ state: 'protected', peer: 'unknown', lease: 'unknown', peerSilentMs: null, msSinceAgentStart: 100, peerVm: undefined }).kind, 'none');
  t.is(d({ state: 'standalone', peer: 'unknown', lease: 'unknown', peerSilentMs: null, msSinceAgentStart: 5000 }).kind, 'none', 'no news of the lease is not an expired lease');
  // the witness refused or did not answer and the peer was never heard for a full timeout: isolated
  t.is(d({ state: 'standalone', peer: 'unknown', lease: 'expired', peerSilentMs: null, msSinceAgentStart: 100 }).kind, 'none', 'not yet: the peer could not have been heard');
  const f = d({ state: 'standalone', peer: 'unknown', lease: 'expired', peerSilentMs: null, msSinceAgentStart: 600 });
  t.is(f.kind, 'fence');
  t.regex(f.why, /peer silent for ever/);
});

test('an isolated primary without a valid lease fences itself, even while busy, after two silent intervals', (t) => {
  const f = d({ state: 'protected', peer: 'dead', lease: 'expired', leaseReason: 'witness unreachable', peerVm: pv('secondary'), peerSilentMs: 650 });
  t.is(f.kind, 'fence');
  t.regex(f.why, /isolated: peer silent for 650 ms and no valid lease \(witness unreachable\)/);
  t.is(d({ state: 'standalone', peer: 'dead', lease: 'expired', peerSilentMs: 650 }).kind, 'fence');
  t.is(d({ state: 'dropping', busy: true, peer: 'alive', lease: 'expired', peerSilentMs: 250 }).kind, 'fence', 'preempts a running operation, before the heartbeat timeout');
  t.is(d({ state: 'standalone', peer: 'alive', lease: 'expired', peerSilentMs: 150 }).kind, 'none', 'one lost heartbeat is not isolation');
  // with the lease it goes on (protected: drops the dead replica)
  t.is(d({ state: 'protected', peer: 'dead', lease: 'held' }).kind, 'drop-secondary');
  t.is(d({ state: 'standalone', peer: 'dead', lease: 'held' }).kind, 'none');
  // the witness being down while the peer is visible changes nothing
  t.is(d({ state: 'protected', peer: 'alive', lease: 'expired', peerVm: pv('secondary') }).kind, 'none');
  // with a valid lease, an agent restart on the peer (silent heartbeats) is not a reason to pause
  t.is(d({ state: 'standalone', peer: 'agent-down', lease: 'held', peerSilentMs: 5000 }).kind, 'none');
});

test('a primary whose lease went to the other node is demoted at once', (t) => {
  for (const state of ['standalone', 'protected', 'fenced', 'syncing'] as const) {
    const r = d({ state, lease: 'lost', leaseReason: 'witness: stale epoch 3: hostB holds epoch 4', peerVm: pv('secondary') });
    t.is(r.kind, 'demote', state);
  }
});

test('a fenced primary resumes only with a renewed lease, or once the peer that is back released its replica', (t) => {
  t.is(d({ state: 'fenced', peer: 'dead', lease: 'expired' }).kind, 'none');
  t.is(d({ state: 'fenced', peer: 'dead', lease: 'held' }).kind, 'unfence');
  // The peer being back is not enough by itself: a takeover it decided while this node was
  // silent may still reach the witness and be granted (CI: both primaries for ~55-100 ms). The
  // peer's release (refused while it asks the witness or runs the VM) is: 'reclaim' asks for it.
  for (const state of ['stopped', 'secondary', 'preparing'] as const) {
    const back = d({ state: 'fenced', peer: 'alive', lease: 'expired', durable: { epoch: 3, primaryEpoch: 3, fenced: true }, peerVm: pv(state, { epoch: 3 }) });
    t.is(back.kind, 'reclaim', state);
    t.regex(back.why, /once it has released any replica/);
  }
  // A peer that runs the VM (at our epoch: a split brain being resolved) is never asked.
  t.is(d({ state: 'fenced', peer: 'alive', lease: 'expired', preferredPrimary: 'hostA', durable: { epoch: 3, primaryEpoch: 3, fenced: true }, peerVm: pv('standalone', { epoch: 3, primaryEpoch: 3 }) }).kind, 'none');
  t.is(d({ state: 'fenced', peer: 'alive', lease: 'held', durable: { epoch: 3, primaryEpoch: 3, fenced: true }, peerVm: pv('secondary', { epoch: 3 }) }).kind, 'unfence');
  const newer = d({ state: 'fenced', peer: 'alive', lease: 'expired', durable: { epoch: 3, primaryEpoch: 3, fenced: true }, peerVm: pv('standalone', { epoch: 4, primaryEpoch: 4 }) });
  t.is(newer.kind, 'demote');
  t.is(d({ state: 'fenced', peer: 'alive', lease: 'expired', durable: { epoch: 3, primaryEpoch: 3, fenced: true }, peerVm: pv('stopped', { epoch: 4 }) }).kind, 'demote');
});
