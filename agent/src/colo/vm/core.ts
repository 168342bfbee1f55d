// The state of one VM on this node: every field the controller's modules share, and the one
// place the state changes (setState logs `from -> to` with the reason), with its views.
import { checkpointDelay } from '../../config/load.ts';
import type { Logger } from '../../log/logger.ts';
import type { VmSummary } from '../../peer/heartbeat.ts';
import { vmPaths, type VmPaths } from '../../qemu/paths.ts';
import { systemQemuProcesses, type QemuProcess, type QemuProcesses } from '../../qemu/process.ts';
import type { StateStore } from '../../state/store.ts';
import { FtkvmError, errorMessage } from '../../util/errors.ts';
import { CheckpointTracker } from '../checkpoints.ts';
import type { DrStatus } from '../../dr/shipper.ts';
import { isTransition, roleOf, type VmState } from '../states.ts';
import { LogTail, SilentReplicaDetector } from '../replica-health.ts';
import { PRE_ATTEMPT_SUMMARY_GRACE_MS, NEEDS_QEMU, type VmControllerDeps, type LogReader, type FailoverRecord, type ResyncProgress, type VmStatus } from './types.ts';

export class VmCore {
  readonly name: string;
  readonly d: VmControllerDeps;
  readonly log: Logger;
  readonly paths: VmPaths;
  state: VmState = 'stopped';
  /** Wall time of the last state change (reported); stateSinceMono measures how long ago. */
  stateSince: number;
  stateSinceMono: number;
  stateReason = 'agent started';
  lastWhy = '';
  qemu: QemuProcess | undefined;
  readonly procs: QemuProcesses;
  runState = 'absent';
  readonly ckpt: CheckpointTracker;
  lastFailover: FailoverRecord | null = null;
  lastTakeover: FailoverRecord | null = null;
  resync: ResyncProgress | null = null;
  busy = false;
  /** Actions running (normally 0 or 1; a demote may overlap the action it interrupts). */
  actions = 0;
  /** A demote started by the watchdog runs. */
  demoting = false;
  ticking = false;
  takeoverRequested: string | null = null;
  /** Secondary: a takeover is asking the witness for the lease. */
  takingOver = false;
  /** Primary: id of the current (or last) protection attempt, sent in heartbeats. */
  protection: string | null = null;
  /** Secondary: the primary's protection attempt this replica belongs to, and since when (mono ms). */
  preparedFor: { protection: string; atMono: number } | null = null;
  nextProtectAt = 0;
  protectFailures = 0;
  /** Why the last checksum resync failed: the next attempt copies the whole disk (then cleared). */
  resyncFallback: string | null = null;
  lastProtectError: string | null = null;
  nextStartAt = 0;
  quickExits = 0;
  sick: string | null = null;
  /** The secondary's console and QEMU log, read for signs of a diverged replica (replica-health.ts). */
  readonly consoleTail: LogReader;
  readonly qemuLogTail: LogReader;
  deviceCheckAt = 0;
  deviceCheckRunning = false;
  /** Devices QEMU reports broken on this node's QEMU (a primary's: the guest cannot serve through them). */
  brokenDevices: string[] = [];
  /** Primary: does the secondary send colo-compare anything while the guest talks? */
  readonly silent: SilentReplicaDetector;
  protectedSince = 0;
  /** Set while this node deliberately kills its own QEMU (drill/switchover), for the exit handler. */
  expectedExit: string | null = null;
  stopped = false;
  /** Listeners for state changes (drills wait on them). */
  readonly watchers = new Set<(s: VmState, reason: string) => void>();
  durable() { return this.d.store.vm(this.name); }
  /** The agent has fenced this VM (or is fencing it) itself. */
  fencedByAgent(): boolean { return (this.state === 'fenced' || !!this.durable().fenced) && this.runState === 'paused'; }
  isProtected(): boolean { return this.state === 'protected' || this.state === 'secondary'; }
  coloExited: string | null = null;
  /** Cold-started paused (-S) to be protected before the first instruction: since when (mono ms). */
  bootHeldSince: number | null = null;
  lastRefusal: string | null = null;
  fencing = false;
  /** unfence() resumes the guest on purpose: the RESUME guard must not pause it again. */
  unfencing = false;
  lastLoggedDecision = '';
  /** A re-protection calls this first: a DR recovery point in flight is cut short (dr/shipper.ts). */
  drYield: () => Promise<void> = async () => undefined;
  /** The DR shipper's view (vms[].dr), null without DR. */
  drStatus: () => DrStatus | null = () => null;
  /** Runs a control step soon (set by the controller). */
  kick: () => void = () => undefined;

  constructor(d: VmControllerDeps) {
    this.d = d;
    this.name = d.vm.name;
    this.log = d.log.child('vm', { vm: d.vm.name });
    this.paths = vmPaths(d.config.state_dir, d.vm.name);
    this.stateSince = d.clock.now();
    this.stateSinceMono = d.clock.mono();
    this.ckpt = new CheckpointTracker(d.config.colo.storm_window_s * 1000, (pause) => this.d.metrics.checkpoint(this.name, pause));
    this.procs = d.qemuProcesses ?? systemQemuProcesses;
    const tail = d.logTail ?? ((path: string) => new LogTail(path));
    this.consoleTail = tail(this.paths.serialLog);
    this.qemuLogTail = tail(this.paths.qemuLog);
    // A healthy secondary answers within a checkpoint or two; give it at least 6 s.
    this.silent = new SilentReplicaDetector(Math.max(6000, 2 * checkpointDelay(d.config, d.vm)));
  }


  setState(to: VmState, reason: string): void {
    if (this.durable().fenced && (to === 'standalone' || to === 'protected' || to === 'syncing' || to === 'dropping')) {
      // An action that started before the fence must not make the VM look (or be) running.
      this.log.warn(`not switching to ${to} while fenced`, { reason });
      to = 'fenced';
    }
    if (!this.qemu && NEEDS_QEMU.includes(to)) {
      // An action that outlived its QEMU (it died during a resync, say) must not leave a state
      // that claims a running guest: nothing would ever start it again (found by the simulator:
      // 'standalone' without a QEMU after a crash during protect, the VM down for good).
      this.log.warn(`not switching to ${to}: this node's QEMU is gone`, { reason });
      to = 'stopped';
      reason = `${reason}; QEMU gone meanwhile`;
    }
    const from = this.state;
    if (from === to && reason === this.stateReason) return;
    if (!isTransition(from, to)) this.log.error(`state transition outside the table: ${from} -> ${to}`, { reason });
    this.state = to;
    this.stateSince = this.d.clock.now();
    this.stateSinceMono = this.d.clock.mono();
    this.stateReason = reason;
    if (from !== to) {
      this.log.info(`${from} -> ${to}`, { reason });
      const keep = to === 'standalone' || to === 'syncing' || to === 'protected' || to === 'dropping' || to === 'fenced';
      this.d.gate.keep(this.name, keep ? this.durable().primaryEpoch : null);
      if (to === 'protected') this.protectedSince = this.d.clock.mono();
      if (to !== 'protected' && to !== 'secondary') this.ckpt.reset();
      // A takeover asked of one replica must not fire on the next one.
      if (to !== 'secondary' && to !== 'taking-over') this.takeoverRequested = null;
      this.silent.reset();
    }
    for (const w of this.watchers) w(to, reason);
  }

  /** Resolves when pred(state) holds (checked now and on every change) or rejects after timeoutMs. */
  waitFor(pred: (s: VmState) => boolean, timeoutMs: number, what: string): Promise<VmState> {
    if (pred(this.state)) return Promise.resolve(this.state);
    return new Promise((resolve, reject) => {
      const w = (s: VmState) => { if (pred(s)) { done(); resolve(s); } };
      const t = setTimeout(() => { done(); reject(new FtkvmError('TIMEOUT', `${this.name}: ${what} did not happen within ${timeoutMs} ms (state ${this.state}: ${this.stateReason})`)); }, timeoutMs);
      const done = () => { clearTimeout(t); this.watchers.delete(w); };
      this.watchers.add(w);
    });
  }

  /**
   * Secondary: the primary's summary was sent before the protection attempt this replica belongs
   * to (it names another attempt or none): it says nothing about this replica. CI saw a secondary
   * prepared in 86 ms decide on the primary's last heartbeat from before the attempt
   * ('standalone') and kill the new replica, which failed the primary's drive-mirror.
   */
  peerVmPredatesReplica(pv: VmSummary | undefined): boolean {
    const p = this.preparedFor;
    if (!p || !pv || (this.state !== 'preparing' && this.state !== 'secondary')) return false;
    return pv.protection !== p.protection && this.d.clock.mono() - p.atMono < PRE_ATTEMPT_SUMMARY_GRACE_MS;
  }

  summary(): VmSummary {
    const dur = this.durable();
    return {
      state: this.state,
      epoch: dur.epoch,
      primaryEpoch: dur.primaryEpoch,
      qemu: !!this.qemu && this.qemu.alive(),
      ...(this.sick ? { sick: this.sick } : {}),
      ...(this.protection ? { protection: this.protection } : {}),
      checkpoints: this.ckpt.count,
    };
  }

  /** What the lease fencer must keep for this VM: a primary's epoch and its QEMU (fence/fencer.ts). */
  /** A failover happened: the latest of any kind, and the latest takeover kept apart. */
  recordFailover(r: FailoverRecord): void {
    this.lastFailover = r;
    if (r.kind !== 'secondary-dropped') this.lastTakeover = r;
  }

  /** Since the last checkpoint of this protection period (or since it began), monotonic. */
  msSinceCheckpoint(): number {
    return this.d.clock.mono() - Math.max(this.ckpt.lastMono ?? -Infinity, this.stateSinceMono);
  }

  fencerEntry(): { epoch: number; qemuPid: number; qemuStartTicks: number } | null {
    const kept = this.state === 'standalone' || this.state === 'syncing' || this.state === 'protected' || this.state === 'dropping' || this.state === 'fenced';
    if (!kept || !this.qemu?.alive()) return null;
    return { epoch: this.durable().primaryEpoch, qemuPid: this.qemu.pid, qemuStartTicks: this.qemu.record.startTicks };
  }

  status(): VmStatus {
    const dur = this.durable();
    const now = this.d.clock.now();
    return {
      name: this.name,
      state: this.state,
      role: roleOf(this.state),
      since: this.stateSince,
      reason: this.stateReason,
      decision: this.lastWhy,
      epoch: dur.epoch,
      primaryEpoch: dur.primaryEpoch,
      protected: this.isProtected(),
      qemu: this.qemu ? {
        pid: this.qemu.pid, runState: this.runState,
        uptimeS: Math.round((now - this.qemu.record.startedAt) / 1000), reattached: this.qemu.reattached,
      } : null,
      checkpoints: this.ckpt.snapshot(this.d.clock.mono()),
      resync: this.resync,
      lastFailover: this.lastFailover,
      lastTakeover: this.lastTakeover,
      lastProtectError: this.lastProtectError,
      sick: this.sick,
      brokenDevices: this.brokenDevices,
      dr: this.drStatus(),
    };
  }

  /** A state write that must not stop the action: kept in memory, written later (store.unsaved). */
  persist(patch: Parameters<StateStore['update']>[1]): void {
    try { this.d.store.update(this.name, patch); } catch (e) {
      this.log.error('could not write the node state; kept in memory and retried', { file: this.d.store.file, error: errorMessage(e) });
    }
  }
}
