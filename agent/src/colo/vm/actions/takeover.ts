// Action: the secondary becomes primary (lease first, at the epoch after the one its replica
// copies), or — the replica not trusted, or its takeover failed halfway — a degraded failover
// that restarts the guest from the replicated disk.
import { errorMessage } from '../../../util/errors.ts';
import * as seq from '../../sequences.ts';
import { coldStart } from './start.ts';
import type { VmCore } from '../core.ts';
import { killQemu, recordProcessRole } from '../lifecycle.ts';

export async function takeover(c: VmCore, why: string, opts: { fromDisk?: boolean } = {}): Promise<void> {
  const q = c.qemu?.qmp;
  if (!q) return;
  const t0 = c.d.clock.mono();
  const lastHeard = c.d.peerView().lastHeardMs;
  const requested = c.takeoverRequested;
  // The epoch right after the one this replica copies, never after one merely heard of: a
  // primary that left this replica behind moved to a new epoch (dropSecondary), and the
  // witness refuses that epoch to anyone else. Asking (highest epoch known + 1) instead let a
  // stale replica that had just heard the new epoch in a heartbeat be granted the next one
  // (seen in the 'replica left behind' test: B took over at epoch 3 from its old copy).
  const dur = c.durable();
  const epoch = (dur.replicaEpoch ?? dur.epoch) + 1;
  // Ask the gate BEFORE changing anything: a refusal (the old primary's lease is still valid)
  // is retried on the next control step. From here a release must be refused: this node may be
  // granted the lease any moment.
  c.takingOver = true;
  let g;
  try { g = await c.d.gate.acquire(c.name, epoch, why); } finally { c.takingOver = false; }
  if (!g.granted) {
    if (c.lastRefusal !== g.reason) c.log.warn('takeover not allowed (yet)', { why, refused: g.reason });
    c.lastRefusal = g.reason;
    c.lastWhy = `takeover refused: ${g.reason}`;
    return;
  }
  c.lastRefusal = null;
  c.takeoverRequested = null;
  c.setState('taking-over', why);
  c.persist({ epoch: g.epoch, primaryEpoch: g.epoch, role: 'primary', fenced: false });
  if (opts.fromDisk) {
    await restartFromDisk(c, why, t0, lastHeard);
    return;
  }
  try {
    await seq.secondaryTakeover(q);
  } catch (e) {
    // Half a takeover leaves a QEMU in an unknown state, and 'taking-over' has no way out (no
    // lease renewal, no fence watchdog): never stay there. This node holds the lease at the
    // new epoch and the replicated disk: boot from it.
    await restartFromDisk(c, `${why}; the replica's takeover failed halfway (${errorMessage(e)})`, t0, lastHeard);
    return;
  }
  recordProcessRole(c, 'primary');
  const seqMs = c.d.clock.mono() - t0;
  await seq.announce(q).catch((e) => c.log.warn('announce-self failed', { error: errorMessage(e) }));
  c.d.metrics.failover(c.name, requested ? 'requested' : /QEMU is gone/.test(why) ? 'primary-qemu-gone' : 'primary-lost');
  const detection = requested ? null : lastHeard;
  c.recordFailover({ at: c.d.clock.now(), kind: 'takeover', reason: why, sequenceMs: seqMs, detectionMs: detection, durationMs: seqMs + (detection ?? 0) });
  const settle = c.d.config.colo.reprotect_delay_ms;
  c.log.info('took over as primary', { epoch: g.epoch, sequenceMs: seqMs, detectionMs: detection, reprotectInMs: settle, why });
  // Clients first: re-protection's first checkpoint pauses the guest (colo.reprotect_delay_ms).
  c.nextProtectAt = c.d.clock.mono() + settle;
  c.setState('standalone', `took over at epoch ${g.epoch}: ${why}`);
}

/**
 * The degraded failover: the replica must not run (known corrupt, or its takeover failed
 * halfway), but this node holds the lease and the replicated disk — the secondary's base image
 * receives every write of the primary, so it holds all acknowledged work up to the loss, as a
 * crash would leave it. Kill the replica and boot the guest from that disk (restart-HA's
 * outcome: a reboot, clients reconnect), and say so everywhere.
 */
export async function restartFromDisk(c: VmCore, why: string, t0: number, lastHeard: number | null): Promise<void> {
  c.log.error('DEGRADED FAILOVER: not resuming the replica; restarting the guest from the replicated disk', { why });
  await killQemu(c, `replica not resumed: ${why}`);
  c.sick = null;
  c.brokenDevices = [];
  await coldStart(c, `degraded failover, guest restarted from the replicated disk: ${why}`);
  const seqMs = c.d.clock.mono() - t0;
  c.d.metrics.failover(c.name, 'degraded-restart');
  c.recordFailover({ at: c.d.clock.now(), kind: 'restart-from-disk', reason: why, sequenceMs: seqMs, detectionMs: lastHeard, durationMs: seqMs + (lastHeard ?? 0) });
}
