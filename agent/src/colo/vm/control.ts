// The control loop of one VM: the fence watchdog (synchronous, independent of the loop), one
// control step (sense, decide(), act) and the dispatch of the chosen action to its module.
import { errorMessage } from '../../util/errors.ts';
import { decide, mustDemote, mustFence, type Action, type PeerLiveness } from '../decide.ts';
import { dropSecondary, handOver, demote } from './actions/drop.ts';
import { fence, unfence, reclaim } from './actions/fence.ts';
import { protect } from './actions/protect.ts';
import { coldStart, bootUnprotected } from './actions/start.ts';
import { takeover } from './actions/takeover.ts';
import type { VmCore } from './core.ts';
import { killQemu } from './lifecycle.ts';
import { checkReplica, sense } from './sense.ts';

/**
 * The fence watchdog: synchronous, no I/O before deciding, independent of tick() (which can
 * be held up by a running action or a probe). Called every heartbeat interval.
 */
export function fenceWatch(c: VmCore): void {
  if (c.d.store.unsaved) {
    try { c.d.store.flush(); c.log.info('node state written after an earlier failure', { file: c.d.store.file }); } catch { /* logged when it first failed */ }
  }
  if (c.fencing || c.stopped || !c.qemu) return;
  const view = c.d.peerView();
  const lease = c.d.gate.lease(c.name);
  // A lost lease ends the primary role even while a control step is busy with an action (which
  // may wait on a QEMU the lease fencer froze): the same rule as decide(), on this path too.
  const demote = c.demoting ? null : mustDemote({ state: c.state, lease: lease.state, leaseReason: lease.reason });
  if (demote) {
    c.demoting = true;
    void run(c, demote, 'alive').finally(() => { c.demoting = false; });
    return;
  }
  const a = mustFence({
    state: c.state, lease: lease.state, leaseReason: lease.reason,
    peerSilentMs: view.lastHeardMs,
    heartbeatIntervalMs: c.d.config.heartbeat.interval_ms,
    heartbeatTimeoutMs: c.d.config.heartbeat.timeout_ms,
    msSinceAgentStart: c.d.clock.mono() - c.d.agentStartMono,
  });
  if (!a) return;
  fence(c, a.why).catch((e) => c.log.error('fencing failed', { error: errorMessage(e) }));
}

/** One control step: evaluate, decide, act. Called periodically and on events. */
export async function tick(c: VmCore): Promise<void> {
  if (c.ticking || c.stopped) return;
  c.ticking = true;
  try {
    checkReplica(c);
    if (c.coloExited && c.state === 'protected') {
      const why = c.coloExited;
      c.coloExited = null;
      await run(c, { kind: 'drop-secondary', why }, 'alive');
      return;
    }
    c.coloExited = null;
    const input = await sense(c);
    if (!input) return;
    const action = decide(input);
    c.lastWhy = action.why;
    if (action.kind === 'fence') {
      fenceWatch(c); // same rule, same single path
    } else if (action.kind !== 'none') {
      await run(c, action, input.peer);
    }
  } catch (e) {
    c.log.error('control step failed', { error: errorMessage(e) });
  } finally {
    c.ticking = false;
  }
}

export async function run(c: VmCore, a: Action, peerLiveness: PeerLiveness): Promise<void> {
  // A demote can start while another action runs: busy lasts until the last one ended.
  c.actions++;
  c.busy = true;
  const key = `${a.kind}:${a.why}`;
  if (key !== c.lastLoggedDecision) c.log.info(`decision: ${a.kind}`, { why: a.why });
  c.lastLoggedDecision = key;
  try {
    switch (a.kind) {
      case 'cold-start': await coldStart(c, a.why); break;
      case 'protect': await protect(c, a.why); break;
      case 'drop-secondary': await dropSecondary(c, a.why, peerLiveness === 'dead'); break;
      case 'takeover': await takeover(c, a.why); break;
      case 'restart-from-disk': await takeover(c, a.why, { fromDisk: true }); break;
      case 'discard-secondary': await killQemu(c, `secondary discarded: ${a.why}`); c.sick = null; break;
      case 'demote': await demote(c, a.why); break;
      case 'boot': await bootUnprotected(c, a.why); break;
      case 'hand-over': await handOver(c, a.why); break;
      case 'fence': await fence(c, a.why); break;
      case 'unfence': await unfence(c, a.why); break;
      case 'reclaim': await reclaim(c, a.why); break;
      case 'none': break;
    }
  } catch (e) {
    c.log.error(`${a.kind} failed`, { error: errorMessage(e) });
  } finally {
    if (--c.actions === 0) c.busy = false;
  }
}
