// The VM's QEMU process on this node: launch, attach (QMP events), exit handling, kill, and
// re-attach to a QEMU a previous agent left running (agent restarts never touch the guest).
import { tapName } from '../../config/load.ts';
import { buildQemuArgv, type LaunchRole } from '../../qemu/argv.ts';
import type { ExitInfo, QemuProcess } from '../../qemu/process.ts';
import { pinBridgeMac, plugTap } from '../../qemu/tap.ts';
import { qemuEnv } from '../../qemu/lab.ts';
import { eventTimeMs, type QmpEvent } from '../../qmp/client.ts';
import { FtkvmError, errorMessage } from '../../util/errors.ts';
import * as seq from '../sequences.ts';
import { isPrimaryState } from '../states.ts';
import type { VmCore } from './core.ts';


export function attach(c: VmCore, h: QemuProcess, runState: string): void {
  c.qemu = h;
  c.runState = runState;
  h.qmp.on('event', (e) => onEvent(c, e));
  void h.exited.then((info) => onQemuExit(c, h, info));
}

export function onEvent(c: VmCore, e: QmpEvent): void {
  const t = eventTimeMs(e);
  switch (e.event) {
    case 'STOP':
      c.runState = 'paused';
      if (c.state === 'protected' || c.state === 'secondary') {
        c.ckpt.stop(t, c.d.clock.mono());
        // A checkpoint normally takes well under a second; say so when one does not.
        const stoppedAt = c.ckpt.count;
        setTimeout(() => {
          if (c.runState === 'paused' && c.ckpt.count === stoppedAt && (c.state === 'protected' || c.state === 'secondary')) {
            c.log.warn('checkpoint has kept the guest paused for 3 s', { state: c.state, checkpoints: c.ckpt.count });
          }
        }, 3000).unref();
      }
      break;
    case 'RESUME':
      c.runState = 'running';
      c.bootHeldSince = null;
      if (c.durable().fenced && !c.unfencing && c.qemu) {
        // A primary that leaves COLO (a drop that began before the fence) is restarted by QEMU
        // itself (migration_iteration_finish → vm_start), whatever `stop` came before. Its
        // network stays cut (set_link off); pause it again at once.
        const q = c.qemu.qmp;
        void q.execute('stop', undefined, { timeoutMs: 5000 }).then(
          () => c.log.error('QEMU resumed the fenced guest on its own (it left COLO); paused it again, network still cut', { msAfterResume: c.d.clock.now() - t }),
          (err) => c.log.error('could not pause the fenced guest again after QEMU resumed it', { error: errorMessage(err) }));
      }
      if (c.state === 'protected' || c.state === 'secondary') c.ckpt.resume(t, c.d.clock.mono());
      else if (c.state === 'preparing') c.setState('secondary', 'COLO running: first checkpoint received from the primary');
      break;
    case 'COLO_EXIT':
      c.log.info('COLO_EXIT', { ...(e.data ?? {}) });
      if (c.state === 'protected') c.coloExited = `COLO ended in QEMU (${JSON.stringify(e.data ?? {})})`;
      break;
    case 'SHUTDOWN':
      c.log.warn('guest shutdown', { ...(e.data ?? {}) });
      break;
    default:
      break;
  }
}

export function onQemuExit(c: VmCore, h: QemuProcess, info: ExitInfo): void {
  if (c.qemu !== h) return;
  c.qemu = undefined;
  c.runState = 'absent';
  c.bootHeldSince = null;
  h.dispose();
  c.procs.forget(c.paths);
  const how = 'unknown' in info ? 'exited' : info.signal ? `killed by ${info.signal}` : `exited with code ${info.code}`;
  const was = c.state;
  const expected = c.expectedExit;
  c.expectedExit = null;
  if (c.stopped) return;
  if (isPrimaryState(was)) {
    const lived = c.d.clock.now() - h.record.startedAt;
    if (lived < 30_000) c.quickExits++; else c.quickExits = 0;
    const backoff = c.quickExits > 0 ? Math.min(1000 * 2 ** c.quickExits, 60_000) : 0;
    c.nextStartAt = c.d.clock.mono() + backoff;
    if (expected) c.log.info(`primary QEMU ${how}`, { why: expected });
    else c.log.error(`primary QEMU ${how}`, { state: was, restartBackoffMs: backoff });
    c.setState('stopped', expected ?? `primary QEMU ${how} (was ${was})`); // stops renewing the lease
    if (was === 'protected' || was === 'syncing' || was === 'dropping') {
      const epoch = c.durable().primaryEpoch;
      const fenced = !!c.durable().fenced;
      void (async () => {
        // Lease handover: nothing of this guest runs here any more, so give the lease up at the
        // witness before telling the secondary; its takeover is then granted at once instead of
        // after the lease expired (~lease_ms). A host that dies cannot do this: then it waits.
        if (!fenced) {
          const t0 = c.d.clock.mono();
          if (await c.d.gate.release(c.name, epoch)) c.log.info('lease released for the successor', { epoch, ms: Math.round(c.d.clock.mono() - t0) });
        }
        // The secondary sees this in our next heartbeat; telling it directly saves a few ms.
        await c.d.peer.call('POST', `/v1/peer/vms/${c.name}/takeover`, { reason: `primary QEMU on ${c.d.config.node.name} ${how}`, epoch }, 2000)
          .catch((err) => c.log.warn('could not notify peer of primary QEMU exit', { error: errorMessage(err) }));
      })();
    }
  } else {
    c.log.warn(`secondary QEMU ${how}`, { state: was });
    c.setState('stopped', expected ?? `secondary QEMU ${how} (was ${was})`);
  }
}

export async function launch(c: VmCore, role: LaunchRole, paused: boolean): Promise<QemuProcess> {
  const argv = buildQemuArgv(c.d.config, c.d.vm, c.paths, { role, paused }, c.d.features);
  const h = await c.procs.launch({
    binary: c.d.config.qemu.binary, argv, env: qemuEnv(c.d.config.qemu), role, paths: c.paths, log: c.log,
  });
  attach(c, h, paused || role === 'secondary' ? 'paused' : 'running');
  try {
    const pinned = await pinBridgeMac(c.d.exec, c.d.vm.nic.bridge)
      .catch((e) => { c.log.warn('could not pin the guest bridge MAC; it may change as taps come and go', { bridge: c.d.vm.nic.bridge, error: errorMessage(e) }); return null; });
    if (pinned) c.log.info('pinned the guest bridge MAC (a tap joining or leaving would otherwise change it)', { bridge: c.d.vm.nic.bridge, mac: pinned });
    await plugTap(c.d.exec, tapName(c.d.vm), c.d.vm.nic.bridge);
  } catch (e) {
    await h.killAndWait();
    throw new FtkvmError('TAP_FAILED', `cannot plug tap ${tapName(c.d.vm)} into bridge ${c.d.vm.nic.bridge}: ${errorMessage(e)}`, { cause: e });
  }
  return h;
}

/** Stops this node's QEMU (if any); the VM always ends in 'stopped'. */
export async function killQemu(c: VmCore, why: string): Promise<void> {
  const h = c.qemu;
  if (!h) {
    if (c.state !== 'stopped') c.setState('stopped', why);
    return;
  }
  c.expectedExit = why;
  await h.killAndWait();
  // the exit handler runs from the exit promise; make sure state is consistent right away
  if (c.qemu === h) onQemuExit(c, h, { code: null, signal: 'SIGKILL' });
}

export function recordProcessRole(c: VmCore, role: LaunchRole): void {
  if (!c.qemu) return;
  try {
    c.procs.recordRole(c.paths, c.qemu, role);
  } catch (e) {
    // Never abort a takeover for it: only a re-attach after an agent restart reads the role.
    c.log.error('could not update the QEMU process record', { file: c.paths.processRecord, error: errorMessage(e) });
  }
}


/** Finds a QEMU a previous agent left running and carries on with it, without touching the guest. */
export async function init(c: VmCore): Promise<void> {
  // Frozen by the lease fencer while no agent ran (fence/fencer.ts): it cannot answer QMP. Thaw
  // it only with the lease renewed (the witness serializes that with any takeover), discard it
  // if another node holds a newer epoch, else wait.
  const rec = c.procs.frozen(c.paths);
  if (rec) {
    const verdict = await thawVerdict(c);
    if (verdict === 'wait') {
      c.setState('stopped', 'QEMU frozen by the lease fencer; waiting for the witness to renew the lease');
      c.busy = true; // never start a second QEMU next to it
      setTimeout(() => { c.busy = false; void init(c); }, 1000).unref();
      return;
    }
    if (verdict === 'discard') {
      c.log.error('QEMU frozen by the lease fencer and the lease went to the other node: discarding this copy', { pid: rec.pid });
      c.procs.signal(rec.pid, 'SIGKILL');
      c.procs.forget(c.paths);
      c.setState('stopped', 'frozen stale copy discarded: the other node holds a newer epoch');
      return;
    }
    c.log.warn('QEMU frozen by the lease fencer; the witness renewed its lease: thawing it', { pid: rec.pid });
    c.procs.signal(rec.pid, 'SIGCONT');
  }
  let h: QemuProcess | null = null;
  try {
    h = await c.procs.reattach(c.paths, c.log);
  } catch (e) {
    c.log.error('a QEMU for this VM runs but does not answer QMP; leaving it alone', { error: errorMessage(e) });
    c.setState('stopped', `unreachable QEMU left running: ${errorMessage(e)}`);
    c.busy = true; // never start a second QEMU next to one we cannot control
    return;
  }
  if (!h) {
    c.setState('stopped', 'no QEMU running for this VM on this node');
    return;
  }
  const q = h.qmp;
  const st = await q.execute<{ status: string; running: boolean }>('query-status');
  attach(c, h, st.running ? 'running' : 'paused');
  if (h.record.role === 'primary') {
    const mig = await q.execute<{ status?: string }>('query-migrate');
    if (mig.status === 'colo') {
      c.setState('protected', 're-attached: COLO running');
      return;
    }
    // Anything else: make sure no half-built replica is left and the guest runs.
    c.busy = true;
    try {
      if (mig.status && ['setup', 'active', 'device', 'pre-switchover', 'postcopy-active'].includes(mig.status)) {
        c.log.warn('re-attached during an unfinished protection; cancelling it', { migration: mig.status });
        await q.execute('migrate_cancel').catch(() => undefined);
      }
      await seq.primaryDropSecondary(q, { inColo: false });
      const now = await q.execute<{ status: string; running: boolean }>('query-status');
      if (!now.running && !c.durable().fenced) {
        await q.execute('cont');
        c.log.warn('guest was left paused by an interrupted operation; resumed', { runState: now.status });
      }
      c.setState(c.durable().fenced ? 'fenced' : 'standalone', 're-attached: running without a replica');
    } finally {
      c.busy = false;
    }
  } else {
    const colo = await q.execute<{ mode: string }>('query-colo-status');
    // A state file from an agent before replicaEpoch: the replica copies the epoch known then.
    if (c.durable().replicaEpoch === undefined) c.persist({ replicaEpoch: c.durable().epoch });
    if (colo.mode === 'secondary') c.setState('secondary', 're-attached: COLO secondary');
    else if (st.status === 'inmigrate') c.setState('preparing', 're-attached: secondary waiting for the primary');
    else if (st.running) {
      recordProcessRole(c, 'primary');
      c.setState('standalone', 're-attached: former secondary that took over');
    } else {
      c.setState('preparing', `re-attached: secondary in state ${st.status}`);
    }
  }
}

/** For a QEMU found frozen at start: may it run (lease renewed), must it go (lost), or wait? */
export async function thawVerdict(c: VmCore): Promise<'thaw' | 'discard' | 'wait'> {
  if (c.d.gate.mode !== 'witness') return 'thaw';
  const epoch = c.durable().primaryEpoch;
  const g = await c.d.gate.acquire(c.name, epoch, 're-attaching a QEMU the lease fencer froze');
  if (g.granted) return 'thaw';
  return c.d.gate.lease(c.name).state === 'lost' ? 'discard' : 'wait';
}
