// Sensing: what the controller observes before deciding — the peer's liveness, the COLO
// channel, checkpoint storms and stalls, signs that the replica diverged, a wedged own QEMU.
import { checkpointStallMs, tapName } from '../../config/load.ts';
import { tapPacketsFromGuest } from '../../qemu/tap.ts';
import { errorMessage } from '../../util/errors.ts';
import type { DecideInput, PeerLiveness } from '../decide.ts';
import { vmPorts } from '../ports.ts';
import { destroyConnections, replicationSocketFilter } from '../connections.ts';
import { roleOf, isPrimaryState } from '../states.ts';
import { DEVICE_ERROR, GUEST_KERNEL_ERROR, brokenVirtioDevices } from '../replica-health.ts';
import type { VmCore } from './core.ts';
import { DEVICE_CHECK_MS, OWN_QEMU_ANSWER_MS } from './types.ts';


export async function liveness(c: VmCore): Promise<PeerLiveness> {
  const v = c.d.peerView();
  if (v.alive) return 'alive';
  if (c.d.clock.mono() - c.d.agentStartMono < c.d.config.heartbeat.timeout_ms) return 'unknown';
  if ((await c.d.hostProbe()) === 'silent') return 'dead';
  // The peer host answers but its agent is silent: is its QEMU still talking to ours?
  if (c.qemu && ['protected', 'secondary', 'preparing', 'syncing'].includes(c.state)) {
    return (await coloChannelUp(c)) ? 'agent-down' : 'dead';
  }
  return 'agent-down';
}

/** The proxy sockets between the two QEMUs: connected while the peer's QEMU lives. */
export async function coloChannelUp(c: VmCore): Promise<boolean> {
  const ids = roleOf(c.state) === 'secondary' ? ['red0', 'red1'] : ['mirror0', 'compare1'];
  try {
    const devs = await c.qemu!.qmp.execute<{ label: string; filename: string }[]>('query-chardev', undefined, { timeoutMs: 1000 });
    return ids.every((id) => devs.find((d) => d.label === id)?.filename.includes('<->'));
  } catch {
    return true; // QEMU busy (checkpoint): assume alive rather than fail over on a slow answer
  }
}

export function stormReason(c: VmCore): string | null {
  const limit = c.d.config.colo.storm_checkpoints_per_s;
  if (limit <= 0 || c.state !== 'protected') return null;
  const window = c.d.config.colo.storm_window_s * 1000;
  if (c.d.clock.mono() - c.protectedSince < window) return null;
  const rate = c.ckpt.snapshot(c.d.clock.mono()).ratePerS;
  return rate > limit ? `checkpoint storm: ${rate.toFixed(1)}/s over ${window / 1000} s (limit ${limit}/s): outputs keep diverging, secondary not trusted` : null;
}

/**
 * Signs that the replica diverged (replica-health.ts): a guest kernel error on its console,
 * a device-model error in its QEMU's log (read every step: cheap), and, every
 * DEVICE_CHECK_MS, QEMU's own `broken` flag of each virtio device. A sick replica is dropped
 * and rebuilt by the primary (decide: peer summary `sick`) within a heartbeat. (Should the
 * primary die first, this copy is never resumed: the guest restarts from the replicated disk,
 * see restartFromDisk.) On a primary the same flag
 * is reported: a broken device cannot serve the guest's clients. The primary also samples
 * the replica's output here (SilentReplicaDetector).
 */
export function checkReplica(c: VmCore): void {
  if (c.state === 'secondary' && !c.sick) {
    const oops = c.consoleTail.firstNewMatch(GUEST_KERNEL_ERROR);
    const dev = oops ? null : c.qemuLogTail.firstNewMatch(DEVICE_ERROR);
    if (oops) markSick(c, `guest kernel error on the secondary console: ${oops.slice(0, 160)}`);
    else if (dev) markSick(c, `device error in the secondary's QEMU (its copy of the guest diverged): ${dev.slice(0, 200)}`);
  }
  const now = c.d.clock.mono();
  const q = c.qemu?.qmp;
  if (!q || c.deviceCheckRunning || now - c.deviceCheckAt < DEVICE_CHECK_MS) return;
  if (!['secondary', 'protected', 'standalone'].includes(c.state)) return;
  c.deviceCheckAt = now;
  c.deviceCheckRunning = true;
  // Not awaited: a QEMU busy with a checkpoint must not hold up the control step.
  if (c.state === 'protected') void sampleReplicaOutput(c, now);
  void brokenVirtioDevices(q).then((broken) => {
    if (broken === null) return;
    if (broken.length && c.state === 'secondary' && !c.sick) {
      markSick(c, `virtio device broken in the secondary's QEMU: ${broken.join(', ')} (its copy of the guest diverged; only a device reset would clear it)`);
    } else if (isPrimaryState(c.state) && broken.join() !== c.brokenDevices.join()) {
      if (broken.length) c.log.error('virtio device broken in this QEMU: the guest cannot use it until it resets the device', { devices: broken });
      else c.log.info('no virtio device broken any more', { was: c.brokenDevices });
    }
    c.brokenDevices = broken;
  }, () => undefined).finally(() => { c.deviceCheckRunning = false; });
}

/** Primary: the guest's packets released to the tap vs. the bytes the secondary sent to colo-compare. */
export async function sampleReplicaOutput(c: VmCore, atMs: number): Promise<void> {
  const secondaryBytes = await c.d.receivedBytes.onLocalPort(vmPorts(c.d.vm.base_port).compare1);
  if (c.state !== 'protected') return;
  c.silent.sample({ atMs, guestPackets: tapPacketsFromGuest(tapName(c.d.vm)), secondaryBytes });
}

export function markSick(c: VmCore, why: string): void {
  c.sick = why;
  c.log.warn('secondary marked sick', { why });
}

/** Why this node's QEMU is wedged (QMP unanswered for OWN_QEMU_ANSWER_MS), or null when it answers. */
export async function ownQemuWedged(c: VmCore): Promise<string | null> {
  const q = c.qemu?.qmp;
  if (!q) return null;
  try {
    await q.execute('query-status', undefined, { timeoutMs: OWN_QEMU_ANSWER_MS });
    return null;
  } catch { /* asked again below */ }
  // A stuck secondary can hold our main loop too (a write to it that never completes): end the
  // replication connections (COLO is over anyway after such a stall) and ask once more.
  await destroyConnections(c.d.exec, replicationSocketFilter(c.d.config.peer.replication_address, vmPorts(c.d.vm.base_port))).catch(() => undefined);
  try {
    await q.execute('query-status', undefined, { timeoutMs: OWN_QEMU_ANSWER_MS });
    return null;
  } catch (e) {
    return `QMP query-status unanswered, also after closing the replication connections: ${errorMessage(e)}`;
  }
}

/**
 * Everything decide() needs, read now: the peer's liveness (probing the host when heartbeats are
 * silent), the lease, the paths, checkpoints, replica health, durable epochs. Returns null when
 * a fenced VM is busy (an unfence or reclaim runs). Learns a newer epoch from the peer's summary.
 */
export async function sense(c: VmCore): Promise<DecideInput | null> {
  const peer = await liveness(c);
  if (c.state === 'fenced' && c.busy) return null;
  const dur = c.durable();
  const pv = c.d.peerView().vms[c.name];
  // A refused write must not fail the whole step (the disk full, the controller stuck: seed 6970).
  if (pv && pv.epoch > dur.epoch) c.persist({ epoch: pv.epoch });
  const view = c.d.peerView();
  const lease = c.d.gate.lease(c.name);
  // The witness named a newer epoch another node holds: known from now on (a cold start asks the next one).
  if (lease.heldEpoch !== undefined && lease.heldEpoch > c.durable().epoch) c.persist({ epoch: lease.heldEpoch });
  const replPath = view.paths.find((x) => x.address === c.d.config.peer.replication_address);
  const msSinceLastCheckpoint = c.state === 'protected' ? c.msSinceCheckpoint() : null;
  const stallMs = checkpointStallMs(c.d.config, c.d.vm);
  // A stall is blamed on the secondary only if our own QEMU still answers: a wedged primary
  // must not make the secondary discard the one healthy copy.
  const wedged = msSinceLastCheckpoint !== null && msSinceLastCheckpoint > stallMs ? await ownQemuWedged(c) : null;
  return {
    node: c.d.config.node.name,
    preferredPrimary: c.d.vm.preferred_primary,
    state: c.state,
    busy: c.busy,
    durable: { epoch: c.durable().epoch, primaryEpoch: dur.primaryEpoch, fenced: !!dur.fenced },
    peer,
    peerVm: pv,
    // "Replication network down" needs proof that the peer is up: ANOTHER path answering.
    // (When the whole peer goes silent, the paths time out a few ms apart.)
    replPathUp: !replPath || replPath.up || !view.paths.some((x) => x !== replPath && x.up),
    lease: lease.state,
    leaseReason: lease.reason,
    msSinceAgentStart: c.d.clock.mono() - c.d.agentStartMono,
    startupPeerWaitMs: c.d.config.colo.startup_peer_wait_ms,
    heardPeerSinceStart: c.d.heardPeerSinceStart(),
    nowMono: c.d.clock.mono(),
    nextProtectAt: c.nextProtectAt,
    nextStartAt: c.nextStartAt,
    // since the last checkpoint OF THIS protection period (lastAt may be from an earlier one)
    msSinceLastCheckpoint,
    checkpointStallMs: stallMs,
    ownQemuWedged: wedged,
    stormReason: stormReason(c),
    silentReplicaReason: c.state === 'protected' ? c.silent.verdict() : null,
    takeoverRequested: c.takeoverRequested,
    selfSick: c.state === 'secondary' ? c.sick : null,
    replicaEpoch: c.durable().replicaEpoch ?? null,
    bootHeldMs: c.state === 'standalone' && c.bootHeldSince !== null ? c.d.clock.mono() - c.bootHeldSince : null,
    peerVmPredatesReplica: c.peerVmPredatesReplica(pv),
    peerSilentMs: view.lastHeardMs,
    heartbeatIntervalMs: c.d.config.heartbeat.interval_ms,
    heartbeatTimeoutMs: c.d.config.heartbeat.timeout_ms,
  };
}
