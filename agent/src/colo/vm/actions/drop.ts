// Actions that end protection or the primary role: drop a lost or sick replica (with the
// release-or-new-epoch rule), hand over from a wedged QEMU, demote a stale primary.
import type { FailoverReason } from '../../../api/metrics.ts';
import { errorMessage } from '../../../util/errors.ts';
import { vmPorts } from '../../ports.ts';
import { destroyConnections, replicationSocketFilter } from '../../connections.ts';
import * as seq from '../../sequences.ts';
import { fence } from './fence.ts';
import type { VmCore } from '../core.ts';
import { killQemu } from '../lifecycle.ts';

export async function dropSecondary(c: VmCore, why: string, peerDead: boolean): Promise<void> {
  const q = c.qemu?.qmp;
  if (!q) return;
  const t0 = c.d.clock.mono();
  const lastHeard = c.d.peerView().lastHeardMs;
  c.setState('dropping', why);
  // A live secondary is told first, so it never takes over with a stale copy. A dead one
  // cannot answer: do not make the guest wait for connect timeouts.
  const release = c.d.peer.call('POST', `/v1/peer/vms/${c.name}/release`, { reason: why, epoch: c.durable().primaryEpoch }, 1000).then(() => true, () => false);
  const released = peerDead ? false : await release;
  if (!released && c.d.gate.mode === 'witness') {
    // Leaving COLO makes QEMU resume the guest by itself, with its network live. Do that only
    // when the secondary has confirmed it let go of its replica, or with a freshly renewed
    // lease; otherwise the peer may be about to take over (a partition often cuts one path a
    // heartbeat before the other): fence instead, staying in COLO (see fence()).
    //
    // And at a NEW epoch: the unconfirmed secondary still holds a copy of this moment and asks
    // the witness for (our epoch + 1) as long as it cannot hear us. Left at our epoch, any later
    // lapse of our lease (a witness restart, a blip on our path to it) would grant it that
    // epoch, and it would resume from its stale copy: everything acknowledged since now lost
    // (issue 11 path 1, measured: 691 acknowledged increments gone). The witness refuses a
    // takeover at an epoch someone else already holds, so that copy can never be promoted.
    const refused = await moveToNewEpoch(c, why);
    if (refused) { await fence(c, `${why}; the secondary did not confirm the release and ${refused}`); return; }
  }
  if (c.durable().fenced) {
    // The fence watchdog got here first (peer silent, lease expired): stay in COLO, paused.
    c.log.warn('not dropping the secondary: fenced meanwhile; staying in COLO, paused', { why });
    return;
  }
  // In-flight replication I/O to a vanished host never completes on its own: end it.
  try {
    const filter = replicationSocketFilter(c.d.config.peer.replication_address, vmPorts(c.d.vm.base_port));
    const r = await destroyConnections(c.d.exec, filter);
    if (r.before > 0) c.log.info('replication connections closed', { closed: r.before - r.after, left: r.after });
    if (r.after > 0) c.log.warn('could not close replication connections (kernel without CONFIG_INET_DIAG_DESTROY?); detaching may block until TCP gives up', { left: r.after });
  } catch (e) {
    c.log.warn('closing replication connections failed', { error: errorMessage(e) });
  }
  try {
    await seq.primaryDropSecondary(q, { inColo: true });
  } catch (e) {
    c.log.error('dropping the secondary failed halfway', { error: errorMessage(e) });
  }
  const st = await q.execute<{ running: boolean }>('query-status').catch(() => ({ running: true }));
  if (!st.running && !c.durable().fenced) await q.execute('cont').catch((e) => c.log.error('cont failed', { error: errorMessage(e) }));
  const seqMs = c.d.clock.mono() - t0;
  const reason: FailoverReason = /stall/.test(why) ? 'checkpoint-stall' : /storm/.test(why) ? 'checkpoint-storm' : /sick|not trusted/.test(why) ? 'secondary-sick' : 'secondary-lost';
  c.d.metrics.failover(c.name, reason);
  c.recordFailover({ at: c.d.clock.now(), kind: 'secondary-dropped', reason: why, sequenceMs: seqMs, detectionMs: lastHeard, durationMs: seqMs + (lastHeard ?? 0) });
  c.nextProtectAt = c.d.clock.mono() + c.d.config.colo.resync_retry_min_ms;
  c.setState('standalone', `running unprotected: ${why}`);
}

/**
 * Witness mode, leaving COLO without the secondary's confirmed release: take a new epoch first.
 * The replica left behind holds a copy of this moment and keeps asking the witness for (our
 * epoch + 1) while it cannot hear us; the witness never grants an epoch another node holds, so
 * that copy can never be promoted, whatever later happens to our lease (issue 11 path 1,
 * measured before: 691 acknowledged increments lost). Returns why not, or null when done.
 */
export async function moveToNewEpoch(c: VmCore, why: string): Promise<string | null> {
  const dur = c.durable();
  const next = Math.max(dur.epoch, dur.primaryEpoch) + 1;
  const g = await c.d.gate.acquire(c.name, next, `${why} (replica not released: move past its epoch)`);
  if (!g.granted) return g.reason;
  // keep() first: renewals of the old epoch are refused from now on and must not count as 'lost'.
  c.d.gate.keep(c.name, next);
  c.persist({ epoch: next, primaryEpoch: next });
  c.log.info('moved to a new epoch: the replica left behind can no longer be promoted', { epoch: next, was: dur.primaryEpoch });
  return null;
}

/** This primary's QEMU is wedged and the replica healthy: fail over to it as a crash would. */
export async function handOver(c: VmCore, why: string): Promise<void> {
  if (c.state !== 'protected' || !c.qemu) return;
  c.log.error('handing over to the replica: killing this node\'s wedged QEMU', { why });
  // onQemuExit tells the secondary to take over (was 'protected').
  await killQemu(c, `handed over: ${why}`);
}

export async function demote(c: VmCore, why: string): Promise<void> {
  c.log.error('split brain resolved against this node: discarding its copy of the VM', { why });
  // Kept in memory when the disk refuses it: the stale copy must go whatever the disk says.
  c.persist({ role: 'none', fenced: false });
  await killQemu(c, `stale primary discarded: ${why}`);
}
