// Actions of an isolated primary: fence (cut the network, pause), unfence with a renewed lease,
// reclaim without the witness once the peer released its replica.
import { errorMessage } from '../../../util/errors.ts';
import { vmPorts } from '../../ports.ts';
import { destroyConnections, replicationSocketFilter } from '../../connections.ts';
import * as seq from '../../sequences.ts';
import { moveToNewEpoch } from './drop.ts';
import type { VmCore } from '../core.ts';

/**
 * Isolated without a lease: stop the guest's outputs NOW. Order matters:
 *  1. end the replication connections — in-flight NBD writes to the unreachable secondary
 *     would otherwise block QMP (a `stop` drains the disks first);
 *  2. set_link hn0 off — from here on every packet towards the tap is dropped (also packets
 *     colo-compare would release later);
 *  3. stop the vCPUs.
 * COLO is NOT left here: when the primary leaves COLO, QEMU calls vm_start() on its own
 * (migration_iteration_finish), which would resume a fenced guest. The COLO thread stays
 * parked after its failed checkpoint until we unfence.
 */
export async function fence(c: VmCore, why: string): Promise<void> {
  const q = c.qemu?.qmp;
  // One fence at a time: the watchdog and a drop that finds no lease can both get here.
  if (!q || c.state === 'fenced' || c.fencing) return;
  c.fencing = true;
  try {
    await cutAndPause(c, q, why);
  } finally {
    c.fencing = false;
  }
}

export async function cutAndPause(c: VmCore, q: seq.QmpLike, why: string): Promise<void> {
  const t0 = c.d.clock.mono();
  try {
    c.d.store.update(c.name, { fenced: true });
  } catch (e) {
    // Pause anyway: the guest must stop serving whatever the disk says. The flag is kept in
    // memory (nothing resumes it) and written as soon as the disk takes it (fenceWatch).
    c.log.error('could not persist the fence; pausing anyway, will retry writing', { file: c.d.store.file, error: errorMessage(e) });
  }
  // Sockets first: QMP commands are answered in order, and one stuck draining an NBD write to
  // the unreachable secondary would hold set_link/stop back.
  await destroyConnections(c.d.exec, replicationSocketFilter(c.d.config.peer.replication_address, vmPorts(c.d.vm.base_port)))
    .catch((e) => c.log.warn('closing replication connections failed', { error: errorMessage(e) }));
  await q.execute('set_link', { name: 'hn0', up: false }, { timeoutMs: 2000 }).catch((e) => c.log.error('set_link off failed while fencing', { error: errorMessage(e) }));
  await q.execute('stop', undefined, { timeoutMs: 5000 }).catch((e) => c.log.error('stop failed while fencing', { error: errorMessage(e) }));
  c.log.error('FENCED: guest network cut and vCPUs paused', { why, ms: c.d.clock.mono() - t0 });
  c.setState('fenced', `paused: ${why}`);
}

/** This node still owns the current epoch: leave COLO (if still in it), resume, reconnect. */
export async function unfence(c: VmCore, why: string): Promise<void> {
  const q = c.qemu?.qmp;
  if (!q) return;
  await whileUnfencing(c, () => liftFence(c, q, why));
}

/** unfence() and reclaim() resume the guest on purpose: the RESUME guard must not pause it again. */
async function whileUnfencing(c: VmCore, f: () => Promise<void>): Promise<void> {
  c.unfencing = true;
  try {
    await f();
  } finally {
    c.unfencing = false;
  }
}

/** The end of every way out of a fence: the guest runs, its network is back, it is primary unprotected. */
async function resumeFenced(c: VmCore, q: seq.QmpLike, why: string, msg: string): Promise<void> {
  const st = await q.execute<{ running: boolean }>('query-status');
  if (!st.running) await q.execute('cont');
  await q.execute('set_link', { name: 'hn0', up: true });
  c.persist({ fenced: false });
  c.log.warn(msg, { why, epoch: c.durable().primaryEpoch });
  c.nextProtectAt = 0;
  c.setState('standalone', `resumed: ${why}`);
}

export async function liftFence(c: VmCore, q: seq.QmpLike, why: string): Promise<void> {
  const mig = await q.execute<{ status?: string }>('query-migrate').catch(() => ({ status: 'unknown' }));
  if (mig.status === 'unknown' && c.d.gate.mode === 'witness') {
    // Maybe still in COLO (QEMU leaves it by itself later): move past the replica's epoch anyway.
    const refused = await moveToNewEpoch(c, `unfencing: ${why}`);
    if (refused) { c.log.warn('staying fenced: could not move to a new epoch', { refused }); return; }
  }
  if (mig.status === 'colo') {
    // Leaving COLO abandons a replica that never confirmed letting go (it may still be cut off
    // from us, asking the witness): move past its epoch first, or stay fenced.
    if (c.d.gate.mode === 'witness') {
      const refused = await moveToNewEpoch(c, `unfencing: ${why}`);
      if (refused) { c.log.warn('staying fenced: could not move to a new epoch before leaving COLO', { refused }); return; }
    }
    await seq.primaryDropSecondary(q, { inColo: true }).catch((e) => c.log.error('leaving COLO while unfencing failed', { error: errorMessage(e) }));
  }
  await resumeFenced(c, q, why, 'fence lifted: guest resumed');
}

/**
 * Fenced, no lease from the witness, the peer heard again and not running the VM: resume
 * without the lease once the peer has released its replica. Its release is the promise that
 * it will not take over: it refuses while it asks the witness for the lease or runs the VM, and
 * with its replica gone there is no copy it could promote. Should a takeover request it sent
 * earlier still be granted (its answer lost), this node's next renewal is refused and it demotes;
 * no copy missing acknowledged work runs, since the peer has none.
 */
export async function reclaim(c: VmCore, why: string): Promise<void> {
  const q = c.qemu?.qmp;
  if (!q || c.state !== 'fenced') return;
  try {
    await c.d.peer.call('POST', `/v1/peer/vms/${c.name}/release`, { reason: `fenced primary resuming without the witness: ${why}`, epoch: c.durable().primaryEpoch }, 2000);
  } catch (e) {
    c.lastWhy = `staying fenced: the peer did not release its replica (${errorMessage(e)})`;
    return;
  }
  if (c.state !== 'fenced' || c.d.gate.lease(c.name).state === 'lost') return;
  await whileUnfencing(c, async () => {
    const mig = await q.execute<{ status?: string }>('query-migrate').catch(() => ({ status: 'unknown' }));
    // Leaving COLO resumes the guest (QEMU's vm_start): unfencing is set, the RESUME guard lets it.
    if (mig.status === 'colo' || mig.status === 'unknown') {
      await seq.primaryDropSecondary(q, { inColo: true }).catch((e) => c.log.error('leaving COLO while reclaiming failed', { error: errorMessage(e) }));
    }
    await resumeFenced(c, q, why, 'fence lifted without the witness: the peer released its replica');
  });
}
