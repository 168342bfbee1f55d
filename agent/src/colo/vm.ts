// One protected VM on this node: owns its QEMU, its state (one setState that logs
// `from -> to` with the reason), and runs the actions decide() picks.
import { randomUUID } from 'node:crypto';
import { mkdirSync, rmSync } from 'node:fs';
import type { Config, VmConfig } from '../config/schema.ts';
import { checkpointDelay, checkpointStallMs, tapName } from '../config/load.ts';
import type { Logger } from '../log/logger.ts';
import type { Metrics, FailoverReason } from '../api/metrics.ts';
import type { PeerView, VmSummary } from '../peer/heartbeat.ts';
import type { PeerClient } from '../peer/client.ts';
import type { Reachability } from '../peer/reachability.ts';
import { buildQemuArgv, type LaunchRole, type QemuFeatures } from '../qemu/argv.ts';
import { vmPaths, type VmPaths } from '../qemu/paths.ts';
import { systemQemuProcesses, type ExitInfo, type QemuProcess, type QemuProcesses } from '../qemu/process.ts';
import { createQcow2, ensureImageSize } from '../qemu/images.ts';
import { pinBridgeMac, plugTap, tapPacketsFromGuest } from '../qemu/tap.ts';
import { eventTimeMs, type QmpEvent } from '../qmp/client.ts';
import type { StateStore } from '../state/store.ts';
import type { Clock } from '../util/clock.ts';
import { FtkvmError, errorMessage } from '../util/errors.ts';
import type { Exec } from '../util/exec.ts';
import { CheckpointTracker, type CheckpointSnapshot } from './checkpoints.ts';
import { decide, mustFence, type Action, type PeerLiveness } from './decide.ts';
import type { PromotionGate } from './gate.ts';
import { vmPorts } from './ports.ts';
import { destroyConnections, replicationSocketFilter } from './connections.ts';
import * as seq from './sequences.ts';
import { roleOf, isPrimaryState, type Role, type VmState } from './states.ts';
import { DEVICE_ERROR, GUEST_KERNEL_ERROR, LogTail, SilentReplicaDetector, brokenVirtioDevices, type ReceivedBytes } from './replica-health.ts';

/** How often QEMU is asked whether a virtio device is broken, and a primary counts the replica's output. */
const DEVICE_CHECK_MS = 1000;

export interface VmControllerDeps {
  config: Config;
  vm: VmConfig;
  store: StateStore;
  gate: PromotionGate;
  peer: Pick<PeerClient, 'call'>;
  peerView: () => PeerView;
  heardPeerSinceStart: () => boolean;
  hostProbe: () => Promise<Reachability>;
  features: QemuFeatures;
  exec: Exec;
  /** Bytes received per local TCP port (shared by all VMs of the host). */
  receivedBytes: ReceivedBytes;
  clock: Clock;
  log: Logger;
  metrics: Metrics;
  agentStartMono: number;
  /** QEMU process lifecycle (default: real processes). The simulator passes its QEMU model. */
  qemuProcesses?: QemuProcesses;
  /** Reader of what a log file gained (default: LogTail on the file). */
  logTail?: (path: string) => LogReader;
}

/** The part of LogTail the controller uses. */
export interface LogReader { skipToEnd(): void; firstNewMatch(re: RegExp): string | null }

export interface FailoverRecord {
  at: number;                     // epoch ms when it completed
  /** restart-from-disk: a DEGRADED failover: the replica could not be resumed (known corrupt, or
   *  its takeover failed halfway); the guest was rebooted from the replicated disk. */
  kind: 'takeover' | 'secondary-dropped' | 'restart-from-disk';
  reason: string;
  /** From the last sign of life of the lost side to the end of the sequence (when known). */
  durationMs: number;
  detectionMs: number | null;
  sequenceMs: number;
}

export interface ResyncProgress {
  phase: 'preparing-secondary' | 'mirroring' | 'connecting' | 'first-checkpoint';
  bytesDone: number;
  bytesTotal: number;
  rateBytesPerS: number;
  etaS: number | null;
  startedAt: number;
  attempt: number;
}

export interface VmStatus {
  name: string;
  state: VmState;
  role: Role;
  since: number;
  reason: string;
  decision: string;
  epoch: number;
  primaryEpoch: number;
  protected: boolean;
  qemu: { pid: number; runState: string; uptimeS: number; reattached: boolean } | null;
  checkpoints: CheckpointSnapshot;
  resync: ResyncProgress | null;
  lastFailover: FailoverRecord | null;
  lastProtectError: string | null;
  sick: string | null;
  /** virtio devices QEMU reports broken here (a primary: the guest cannot use them until it resets them). */
  brokenDevices: string[];
}

/** `protection`: id of the primary's protection attempt; its heartbeat summaries carry it (see preparedFor). */
export interface PrepareRequest { epoch: number; sizeBytes: number; primary: string; protection?: string }

/**
 * How long a secondary disregards the primary's summaries that do not name the protection
 * attempt it was prepared for. Such a summary was sent before the attempt began (the prepare RPC
 * and the next heartbeat race); a summary of the attempt follows within a heartbeat interval.
 * The bound only matters for a primary that never sends one (an older agent, a restart).
 */
const PRE_ATTEMPT_SUMMARY_GRACE_MS = 10_000;

/** How long the primary's own QEMU may take to answer query-status before a stall is blamed on it. */
const OWN_QEMU_ANSWER_MS = 3000;

/** States that describe a running QEMU ('starting' and 'preparing' are set just before it starts). */
const NEEDS_QEMU: readonly VmState[] = ['standalone', 'syncing', 'protected', 'dropping', 'fenced', 'secondary', 'taking-over'];

export class VmBusyError extends FtkvmError {
  constructor(vm: string, what: string) { super('VM_BUSY', `${vm}: ${what}`); }
}

export class VmController {
  readonly name: string;
  private readonly d: VmControllerDeps;
  private readonly log: Logger;
  readonly paths: VmPaths;
  state: VmState = 'stopped';
  private stateSince: number;
  private stateReason = 'agent started';
  private lastWhy = '';
  private qemu: QemuProcess | undefined;
  private readonly procs: QemuProcesses;
  private runState = 'absent';
  private readonly ckpt: CheckpointTracker;
  private lastFailover: FailoverRecord | null = null;
  private resync: ResyncProgress | null = null;
  private busy = false;
  private ticking = false;
  private takeoverRequested: string | null = null;
  /** Secondary: a takeover is asking the witness for the lease. */
  private takingOver = false;
  /** Primary: id of the current (or last) protection attempt, sent in heartbeats. */
  private protection: string | null = null;
  /** Secondary: the primary's protection attempt this replica belongs to, and since when (mono ms). */
  private preparedFor: { protection: string; atMono: number } | null = null;
  private nextProtectAt = 0;
  private protectFailures = 0;
  private lastProtectError: string | null = null;
  private nextStartAt = 0;
  private quickExits = 0;
  private sick: string | null = null;
  /** The secondary's console and QEMU log, read for signs of a diverged replica (replica-health.ts). */
  private readonly consoleTail: LogReader;
  private readonly qemuLogTail: LogReader;
  private deviceCheckAt = 0;
  private deviceCheckRunning = false;
  /** Devices QEMU reports broken on this node's QEMU (a primary's: the guest cannot serve through them). */
  private brokenDevices: string[] = [];
  /** Primary: does the secondary send colo-compare anything while the guest talks? */
  private readonly silent: SilentReplicaDetector;
  private protectedSince = 0;
  /** Set while this node deliberately kills its own QEMU (drill/switchover), for the exit handler. */
  private expectedExit: string | null = null;
  private stopped = false;
  /** Listeners for state changes (drills wait on them). */
  private readonly watchers = new Set<(s: VmState, reason: string) => void>();

  constructor(d: VmControllerDeps) {
    this.d = d;
    this.name = d.vm.name;
    this.log = d.log.child('vm', { vm: d.vm.name });
    this.paths = vmPaths(d.config.state_dir, d.vm.name);
    this.stateSince = d.clock.now();
    this.ckpt = new CheckpointTracker(d.config.colo.storm_window_s * 1000, (pause) => this.d.metrics.checkpoint(this.name, pause));
    this.procs = d.qemuProcesses ?? systemQemuProcesses;
    const tail = d.logTail ?? ((path: string) => new LogTail(path));
    this.consoleTail = tail(this.paths.serialLog);
    this.qemuLogTail = tail(this.paths.qemuLog);
    // A healthy secondary answers within a checkpoint or two; give it at least 6 s.
    this.silent = new SilentReplicaDetector(Math.max(6000, 2 * checkpointDelay(d.config, d.vm)));
  }

  // ------------------------------------------------------------------ state

  private setState(to: VmState, reason: string): void {
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
    this.state = to;
    this.stateSince = this.d.clock.now();
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

  private durable() { return this.d.store.vm(this.name); }

  /**
   * Secondary: the primary's summary was sent before the protection attempt this replica belongs
   * to (it names another attempt or none): it says nothing about this replica. CI saw a secondary
   * prepared in 86 ms decide on the primary's last heartbeat from before the attempt
   * ('standalone') and kill the new replica, which failed the primary's drive-mirror.
   */
  private peerVmPredatesReplica(pv: VmSummary | undefined): boolean {
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
  fencerEntry(): { epoch: number; qemuPid: number; qemuStartTicks: number } | null {
    const kept = this.state === 'standalone' || this.state === 'syncing' || this.state === 'protected' || this.state === 'dropping' || this.state === 'fenced';
    if (!kept || !this.qemu?.alive()) return null;
    return { epoch: this.durable().primaryEpoch, qemuPid: this.qemu.pid, qemuStartTicks: this.qemu.record.startTicks };
  }

  /** The agent has fenced this VM (or is fencing it) itself. */
  fencedByAgent(): boolean { return (this.state === 'fenced' || !!this.durable().fenced) && this.runState === 'paused'; }

  isProtected(): boolean { return this.state === 'protected' || this.state === 'secondary'; }

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
      checkpoints: this.ckpt.snapshot(now),
      resync: this.resync,
      lastFailover: this.lastFailover,
      lastProtectError: this.lastProtectError,
      sick: this.sick,
      brokenDevices: this.brokenDevices,
    };
  }

  // ------------------------------------------------------------------ QEMU

  private attach(h: QemuProcess, runState: string): void {
    this.qemu = h;
    this.runState = runState;
    h.qmp.on('event', (e) => this.onEvent(e));
    void h.exited.then((info) => this.onQemuExit(h, info));
  }

  private onEvent(e: QmpEvent): void {
    const t = eventTimeMs(e);
    switch (e.event) {
      case 'STOP':
        this.runState = 'paused';
        if (this.state === 'protected' || this.state === 'secondary') {
          this.ckpt.stop(t);
          // A checkpoint normally takes well under a second; say so when one does not.
          const stoppedAt = this.ckpt.count;
          setTimeout(() => {
            if (this.runState === 'paused' && this.ckpt.count === stoppedAt && (this.state === 'protected' || this.state === 'secondary')) {
              this.log.warn('checkpoint has kept the guest paused for 3 s', { state: this.state, checkpoints: this.ckpt.count });
            }
          }, 3000).unref();
        }
        break;
      case 'RESUME':
        this.runState = 'running';
        this.bootHeldSince = null;
        if (this.durable().fenced && !this.unfencing && this.qemu) {
          // A primary that leaves COLO (a drop that began before the fence) is restarted by QEMU
          // itself (migration_iteration_finish → vm_start), whatever `stop` came before. Its
          // network stays cut (set_link off); pause it again at once.
          const q = this.qemu.qmp;
          void q.execute('stop', undefined, { timeoutMs: 5000 }).then(
            () => this.log.error('QEMU resumed the fenced guest on its own (it left COLO); paused it again, network still cut', { msAfterResume: this.d.clock.now() - t }),
            (err) => this.log.error('could not pause the fenced guest again after QEMU resumed it', { error: errorMessage(err) }));
        }
        if (this.state === 'protected' || this.state === 'secondary') this.ckpt.resume(t);
        else if (this.state === 'preparing') this.setState('secondary', 'COLO running: first checkpoint received from the primary');
        break;
      case 'COLO_EXIT':
        this.log.info('COLO_EXIT', { ...(e.data ?? {}) });
        if (this.state === 'protected') this.coloExited = `COLO ended in QEMU (${JSON.stringify(e.data ?? {})})`;
        break;
      case 'SHUTDOWN':
        this.log.warn('guest shutdown', { ...(e.data ?? {}) });
        break;
      default:
        break;
    }
  }

  private coloExited: string | null = null;
  /** Cold-started paused (-S) to be protected before the first instruction: since when (mono ms). */
  private bootHeldSince: number | null = null;
  private lastRefusal: string | null = null;
  private fencing = false;
  /** unfence() resumes the guest on purpose: the RESUME guard must not pause it again. */
  private unfencing = false;
  private lastLoggedDecision = '';

  private onQemuExit(h: QemuProcess, info: ExitInfo): void {
    if (this.qemu !== h) return;
    this.qemu = undefined;
    this.runState = 'absent';
    this.bootHeldSince = null;
    h.dispose();
    this.procs.forget(this.paths);
    const how = 'unknown' in info ? 'exited' : info.signal ? `killed by ${info.signal}` : `exited with code ${info.code}`;
    const was = this.state;
    const expected = this.expectedExit;
    this.expectedExit = null;
    if (this.stopped) return;
    if (isPrimaryState(was)) {
      const lived = this.d.clock.now() - h.record.startedAt;
      if (lived < 30_000) this.quickExits++; else this.quickExits = 0;
      const backoff = this.quickExits > 0 ? Math.min(1000 * 2 ** this.quickExits, 60_000) : 0;
      this.nextStartAt = this.d.clock.mono() + backoff;
      if (expected) this.log.info(`primary QEMU ${how}`, { why: expected });
      else this.log.error(`primary QEMU ${how}`, { state: was, restartBackoffMs: backoff });
      if (was === 'protected' || was === 'syncing' || was === 'dropping') {
        // The secondary sees this in our next heartbeat; telling it directly saves a few ms.
        void this.d.peer.call('POST', `/v1/peer/vms/${this.name}/takeover`, { reason: `primary QEMU on ${this.d.config.node.name} ${how}`, epoch: this.durable().primaryEpoch }, 2000)
          .catch((err) => this.log.warn('could not notify peer of primary QEMU exit', { error: errorMessage(err) }));
      }
      this.setState('stopped', expected ?? `primary QEMU ${how} (was ${was})`);
    } else {
      this.log.warn(`secondary QEMU ${how}`, { state: was });
      this.setState('stopped', expected ?? `secondary QEMU ${how} (was ${was})`);
    }
  }

  private async launch(role: LaunchRole, paused: boolean): Promise<QemuProcess> {
    const argv = buildQemuArgv(this.d.config, this.d.vm, this.paths, { role, paused }, this.d.features);
    const h = await this.procs.launch({
      binary: this.d.config.qemu.binary, argv, env: this.d.config.qemu.env, role, paths: this.paths, log: this.log,
    });
    this.attach(h, paused || role === 'secondary' ? 'paused' : 'running');
    try {
      const pinned = await pinBridgeMac(this.d.exec, this.d.vm.nic.bridge)
        .catch((e) => { this.log.warn('could not pin the guest bridge MAC; it may change as taps come and go', { bridge: this.d.vm.nic.bridge, error: errorMessage(e) }); return null; });
      if (pinned) this.log.info('pinned the guest bridge MAC (a tap joining or leaving would otherwise change it)', { bridge: this.d.vm.nic.bridge, mac: pinned });
      await plugTap(this.d.exec, tapName(this.d.vm), this.d.vm.nic.bridge);
    } catch (e) {
      await h.killAndWait();
      throw new FtkvmError('TAP_FAILED', `cannot plug tap ${tapName(this.d.vm)} into bridge ${this.d.vm.nic.bridge}: ${errorMessage(e)}`, { cause: e });
    }
    return h;
  }

  /** Stops this node's QEMU (if any); the VM always ends in 'stopped'. */
  private async killQemu(why: string): Promise<void> {
    const h = this.qemu;
    if (!h) {
      if (this.state !== 'stopped') this.setState('stopped', why);
      return;
    }
    this.expectedExit = why;
    await h.killAndWait();
    // the exit handler runs from the exit promise; make sure state is consistent right away
    if (this.qemu === h) this.onQemuExit(h, { code: null, signal: 'SIGKILL' });
  }

  private recordProcessRole(role: LaunchRole): void {
    if (!this.qemu) return;
    try {
      this.procs.recordRole(this.paths, this.qemu, role);
    } catch (e) {
      // Never abort a takeover for it: only a re-attach after an agent restart reads the role.
      this.log.error('could not update the QEMU process record', { file: this.paths.processRecord, error: errorMessage(e) });
    }
  }

  // ------------------------------------------------------------------ start / re-attach

  /** Finds a QEMU a previous agent left running and carries on with it, without touching the guest. */
  async init(): Promise<void> {
    // Frozen by the lease fencer while no agent ran (fence/fencer.ts): it cannot answer QMP. Thaw
    // it only with the lease renewed (the witness serializes that with any takeover), discard it
    // if another node holds a newer epoch, else wait.
    const rec = this.procs.frozen(this.paths);
    if (rec) {
      const verdict = await this.thawVerdict();
      if (verdict === 'wait') {
        this.setState('stopped', 'QEMU frozen by the lease fencer; waiting for the witness to renew the lease');
        this.busy = true; // never start a second QEMU next to it
        setTimeout(() => { this.busy = false; void this.init(); }, 1000).unref();
        return;
      }
      if (verdict === 'discard') {
        this.log.error('QEMU frozen by the lease fencer and the lease went to the other node: discarding this copy', { pid: rec.pid });
        this.procs.signal(rec.pid, 'SIGKILL');
        this.procs.forget(this.paths);
        this.setState('stopped', 'frozen stale copy discarded: the other node holds a newer epoch');
        return;
      }
      this.log.warn('QEMU frozen by the lease fencer; the witness renewed its lease: thawing it', { pid: rec.pid });
      this.procs.signal(rec.pid, 'SIGCONT');
    }
    let h: QemuProcess | null = null;
    try {
      h = await this.procs.reattach(this.paths, this.log);
    } catch (e) {
      this.log.error('a QEMU for this VM runs but does not answer QMP; leaving it alone', { error: errorMessage(e) });
      this.setState('stopped', `unreachable QEMU left running: ${errorMessage(e)}`);
      this.busy = true; // never start a second QEMU next to one we cannot control
      return;
    }
    if (!h) {
      this.setState('stopped', 'no QEMU running for this VM on this node');
      return;
    }
    const q = h.qmp;
    const st = await q.execute<{ status: string; running: boolean }>('query-status');
    this.attach(h, st.running ? 'running' : 'paused');
    if (h.record.role === 'primary') {
      const mig = await q.execute<{ status?: string }>('query-migrate');
      if (mig.status === 'colo') {
        this.setState('protected', 're-attached: COLO running');
        return;
      }
      // Anything else: make sure no half-built replica is left and the guest runs.
      this.busy = true;
      try {
        if (mig.status && ['setup', 'active', 'device', 'pre-switchover', 'postcopy-active'].includes(mig.status)) {
          this.log.warn('re-attached during an unfinished protection; cancelling it', { migration: mig.status });
          await q.execute('migrate_cancel').catch(() => undefined);
        }
        await seq.primaryDropSecondary(q, { inColo: false });
        const now = await q.execute<{ status: string; running: boolean }>('query-status');
        if (!now.running && !this.durable().fenced) {
          await q.execute('cont');
          this.log.warn('guest was left paused by an interrupted operation; resumed', { runState: now.status });
        }
        this.setState(this.durable().fenced ? 'fenced' : 'standalone', 're-attached: running without a replica');
      } finally {
        this.busy = false;
      }
    } else {
      const colo = await q.execute<{ mode: string }>('query-colo-status');
      // A state file from an agent before replicaEpoch: the replica copies the epoch known then.
      if (this.durable().replicaEpoch === undefined) this.persist({ replicaEpoch: this.durable().epoch });
      if (colo.mode === 'secondary') this.setState('secondary', 're-attached: COLO secondary');
      else if (st.status === 'inmigrate') this.setState('preparing', 're-attached: secondary waiting for the primary');
      else if (st.running) {
        this.recordProcessRole('primary');
        this.setState('standalone', 're-attached: former secondary that took over');
      } else {
        this.setState('preparing', `re-attached: secondary in state ${st.status}`);
      }
    }
  }

  /** Agent shutdown: leave QEMU running (it outlives the agent), just detach. */
  detach(): void {
    this.stopped = true;
    this.qemu?.dispose();
  }

  // ------------------------------------------------------------------ control loop

  private async liveness(): Promise<PeerLiveness> {
    const v = this.d.peerView();
    if (v.alive) return 'alive';
    if (this.d.clock.mono() - this.d.agentStartMono < this.d.config.heartbeat.timeout_ms) return 'unknown';
    if ((await this.d.hostProbe()) === 'silent') return 'dead';
    // The peer host answers but its agent is silent: is its QEMU still talking to ours?
    if (this.qemu && ['protected', 'secondary', 'preparing', 'syncing'].includes(this.state)) {
      return (await this.coloChannelUp()) ? 'agent-down' : 'dead';
    }
    return 'agent-down';
  }

  /** The proxy sockets between the two QEMUs: connected while the peer's QEMU lives. */
  private async coloChannelUp(): Promise<boolean> {
    const ids = roleOf(this.state) === 'secondary' ? ['red0', 'red1'] : ['mirror0', 'compare1'];
    try {
      const devs = await this.qemu!.qmp.execute<{ label: string; filename: string }[]>('query-chardev', undefined, { timeoutMs: 1000 });
      return ids.every((id) => devs.find((d) => d.label === id)?.filename.includes('<->'));
    } catch {
      return true; // QEMU busy (checkpoint): assume alive rather than fail over on a slow answer
    }
  }

  private stormReason(): string | null {
    const limit = this.d.config.colo.storm_checkpoints_per_s;
    if (limit <= 0 || this.state !== 'protected') return null;
    const window = this.d.config.colo.storm_window_s * 1000;
    if (this.d.clock.mono() - this.protectedSince < window) return null;
    const rate = this.ckpt.snapshot(this.d.clock.now()).ratePerS;
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
  private checkReplica(): void {
    if (this.state === 'secondary' && !this.sick) {
      const oops = this.consoleTail.firstNewMatch(GUEST_KERNEL_ERROR);
      const dev = oops ? null : this.qemuLogTail.firstNewMatch(DEVICE_ERROR);
      if (oops) this.markSick(`guest kernel error on the secondary console: ${oops.slice(0, 160)}`);
      else if (dev) this.markSick(`device error in the secondary's QEMU (its copy of the guest diverged): ${dev.slice(0, 200)}`);
    }
    const now = this.d.clock.mono();
    const q = this.qemu?.qmp;
    if (!q || this.deviceCheckRunning || now - this.deviceCheckAt < DEVICE_CHECK_MS) return;
    if (!['secondary', 'protected', 'standalone'].includes(this.state)) return;
    this.deviceCheckAt = now;
    this.deviceCheckRunning = true;
    // Not awaited: a QEMU busy with a checkpoint must not hold up the control step.
    if (this.state === 'protected') void this.sampleReplicaOutput(now);
    void brokenVirtioDevices(q).then((broken) => {
      if (broken === null) return;
      if (broken.length && this.state === 'secondary' && !this.sick) {
        this.markSick(`virtio device broken in the secondary's QEMU: ${broken.join(', ')} (its copy of the guest diverged; only a device reset would clear it)`);
      } else if (isPrimaryState(this.state) && broken.join() !== this.brokenDevices.join()) {
        if (broken.length) this.log.error('virtio device broken in this QEMU: the guest cannot use it until it resets the device', { devices: broken });
        else this.log.info('no virtio device broken any more', { was: this.brokenDevices });
      }
      this.brokenDevices = broken;
    }, () => undefined).finally(() => { this.deviceCheckRunning = false; });
  }

  /** Primary: the guest's packets released to the tap vs. the bytes the secondary sent to colo-compare. */
  private async sampleReplicaOutput(atMs: number): Promise<void> {
    const secondaryBytes = await this.d.receivedBytes.onLocalPort(vmPorts(this.d.vm.base_port).compare1);
    if (this.state !== 'protected') return;
    this.silent.sample({ atMs, guestPackets: tapPacketsFromGuest(tapName(this.d.vm)), secondaryBytes });
  }

  private markSick(why: string): void {
    this.sick = why;
    this.log.warn('secondary marked sick', { why });
  }

  /**
   * The fence watchdog: synchronous, no I/O before deciding, independent of tick() (which can
   * be held up by a running action or a probe). Called every heartbeat interval.
   */
  fenceWatch(): void {
    if (this.d.store.unsaved) {
      try { this.d.store.flush(); this.log.info('node state written after an earlier failure', { file: this.d.store.file }); } catch { /* logged when it first failed */ }
    }
    if (this.fencing || this.stopped || !this.qemu) return;
    const view = this.d.peerView();
    const lease = this.d.gate.lease(this.name);
    const a = mustFence({
      state: this.state, lease: lease.state, leaseReason: lease.reason,
      peerSilentMs: view.lastHeardMs,
      heartbeatIntervalMs: this.d.config.heartbeat.interval_ms,
      heartbeatTimeoutMs: this.d.config.heartbeat.timeout_ms,
      msSinceAgentStart: this.d.clock.mono() - this.d.agentStartMono,
    });
    if (!a) return;
    this.fence(a.why).catch((e) => this.log.error('fencing failed', { error: errorMessage(e) }));
  }

  /** One control step: evaluate, decide, act. Called periodically and on events. */
  async tick(): Promise<void> {
    if (this.ticking || this.stopped) return;
    this.ticking = true;
    try {
      this.checkReplica();
      if (this.coloExited && this.state === 'protected') {
        const why = this.coloExited;
        this.coloExited = null;
        await this.run({ kind: 'drop-secondary', why }, 'alive');
        return;
      }
      this.coloExited = null;
      const peer = await this.liveness();
      if (this.state === 'fenced' && this.busy) return;
      const dur = this.durable();
      const pv = this.d.peerView().vms[this.name];
      if (pv && pv.epoch > dur.epoch) this.d.store.update(this.name, { epoch: pv.epoch });
      const view = this.d.peerView();
      const lease = this.d.gate.lease(this.name);
      const replPath = view.paths.find((x) => x.address === this.d.config.peer.replication_address);
      const msSinceLastCheckpoint = this.state === 'protected' ? this.d.clock.now() - Math.max(this.ckpt.lastAt ?? 0, this.stateSince) : null;
      const stallMs = checkpointStallMs(this.d.config, this.d.vm);
      // A stall is blamed on the secondary only if our own QEMU still answers: a wedged primary
      // must not make the secondary discard the one healthy copy.
      const ownQemuWedged = msSinceLastCheckpoint !== null && msSinceLastCheckpoint > stallMs ? await this.ownQemuWedged() : null;
      const action = decide({
        node: this.d.config.node.name,
        preferredPrimary: this.d.vm.preferred_primary,
        state: this.state,
        busy: this.busy,
        durable: { epoch: this.durable().epoch, primaryEpoch: dur.primaryEpoch, fenced: !!dur.fenced },
        peer,
        peerVm: pv,
        // "Replication network down" needs proof that the peer is up: ANOTHER path answering.
        // (When the whole peer goes silent, the paths time out a few ms apart.)
        replPathUp: !replPath || replPath.up || !view.paths.some((x) => x !== replPath && x.up),
        lease: lease.state,
        leaseReason: lease.reason,
        msSinceAgentStart: this.d.clock.mono() - this.d.agentStartMono,
        startupPeerWaitMs: this.d.config.colo.startup_peer_wait_ms,
        heardPeerSinceStart: this.d.heardPeerSinceStart(),
        nowMono: this.d.clock.mono(),
        nextProtectAt: this.nextProtectAt,
        nextStartAt: this.nextStartAt,
        // since the last checkpoint OF THIS protection period (lastAt may be from an earlier one)
        msSinceLastCheckpoint,
        checkpointStallMs: stallMs,
        ownQemuWedged,
        stormReason: this.stormReason(),
        silentReplicaReason: this.state === 'protected' ? this.silent.verdict() : null,
        takeoverRequested: this.takeoverRequested,
        selfSick: this.state === 'secondary' ? this.sick : null,
        replicaEpoch: this.durable().replicaEpoch ?? null,
        bootHeldMs: this.state === 'standalone' && this.bootHeldSince !== null ? this.d.clock.mono() - this.bootHeldSince : null,
        peerVmPredatesReplica: this.peerVmPredatesReplica(pv),
        peerSilentMs: view.lastHeardMs,
        heartbeatIntervalMs: this.d.config.heartbeat.interval_ms,
        heartbeatTimeoutMs: this.d.config.heartbeat.timeout_ms,
      });
      this.lastWhy = action.why;
      if (action.kind === 'fence') {
        this.fenceWatch(); // same rule, same single path
      } else if (action.kind !== 'none') {
        await this.run(action, peer);
      }
    } catch (e) {
      this.log.error('control step failed', { error: errorMessage(e) });
    } finally {
      this.ticking = false;
    }
  }

  private async run(a: Action, peerLiveness: PeerLiveness): Promise<void> {
    this.busy = true;
    const key = `${a.kind}:${a.why}`;
    if (key !== this.lastLoggedDecision) this.log.info(`decision: ${a.kind}`, { why: a.why });
    this.lastLoggedDecision = key;
    try {
      switch (a.kind) {
        case 'cold-start': await this.coldStart(a.why); break;
        case 'protect': await this.protect(a.why); break;
        case 'drop-secondary': await this.dropSecondary(a.why, peerLiveness === 'dead'); break;
        case 'takeover': await this.takeover(a.why); break;
        case 'restart-from-disk': await this.takeover(a.why, { fromDisk: true }); break;
        case 'discard-secondary': await this.killQemu(`secondary discarded: ${a.why}`); this.sick = null; break;
        case 'demote': await this.demote(a.why); break;
        case 'boot': await this.bootUnprotected(a.why); break;
        case 'hand-over': await this.handOver(a.why); break;
        case 'fence': await this.fence(a.why); break;
        case 'unfence': await this.unfence(a.why); break;
        case 'reclaim': await this.reclaim(a.why); break;
        case 'none': break;
      }
    } catch (e) {
      this.log.error(`${a.kind} failed`, { error: errorMessage(e) });
    } finally {
      this.busy = false;
    }
  }

  // ------------------------------------------------------------------ actions

  private async coldStart(why: string): Promise<void> {
    const dur = this.durable();
    const epoch = dur.epoch + 1;
    const g = await this.d.gate.acquire(this.name, epoch, why);
    if (!g.granted) {
      this.nextStartAt = this.d.clock.mono() + 2000;
      if (this.lastRefusal !== g.reason) this.log.warn('not starting the VM', { why, refused: g.reason });
      this.lastRefusal = g.reason;
      this.lastWhy = `not starting: ${g.reason}`;
      return;
    }
    this.lastRefusal = null;
    this.setState('starting', why);
    this.persist({ epoch: g.epoch, primaryEpoch: g.epoch, role: 'primary', fenced: false });
    // With the peer up, boot paused: the replica is built before the first instruction runs.
    const peerUp = this.d.peerView().alive;
    try {
      await this.launch('primary', peerUp);
    } catch (e) {
      this.nextStartAt = this.d.clock.mono() + 5000;
      this.setState('stopped', `start failed: ${errorMessage(e)}`);
      return;
    }
    this.nextProtectAt = 0;
    this.bootHeldSince = peerUp ? this.d.clock.mono() : null;
    this.setState('standalone', peerUp ? `started paused at epoch ${g.epoch}; protecting before first boot` : `started at epoch ${g.epoch} (${why})`);
  }

  /** Why this node's QEMU is wedged (QMP unanswered for OWN_QEMU_ANSWER_MS), or null when it answers. */
  private async ownQemuWedged(): Promise<string | null> {
    const q = this.qemu?.qmp;
    if (!q) return null;
    try {
      await q.execute('query-status', undefined, { timeoutMs: OWN_QEMU_ANSWER_MS });
      return null;
    } catch { /* asked again below */ }
    // A stuck secondary can hold our main loop too (a write to it that never completes): end the
    // replication connections (COLO is over anyway after such a stall) and ask once more.
    await destroyConnections(this.d.exec, replicationSocketFilter(this.d.config.peer.replication_address, vmPorts(this.d.vm.base_port))).catch(() => undefined);
    try {
      await q.execute('query-status', undefined, { timeoutMs: OWN_QEMU_ANSWER_MS });
      return null;
    } catch (e) {
      return `QMP query-status unanswered, also after closing the replication connections: ${errorMessage(e)}`;
    }
  }

  /** This primary's QEMU is wedged and the replica healthy: fail over to it as a crash would. */
  private async handOver(why: string): Promise<void> {
    if (this.state !== 'protected' || !this.qemu) return;
    this.log.error('handing over to the replica: killing this node\'s wedged QEMU', { why });
    // onQemuExit tells the secondary to take over (was 'protected').
    await this.killQemu(`handed over: ${why}`);
  }

  /** A guest held paused for a protection that cannot begin: boot it unprotected. */
  private async bootUnprotected(why: string): Promise<void> {
    const q = this.qemu?.qmp;
    if (!q || this.durable().fenced) return;
    const st = await q.execute<{ running: boolean }>('query-status');
    if (!st.running) await q.execute('cont');
    this.bootHeldSince = null;
    this.log.warn('guest booted unprotected', { why });
    this.setState('standalone', `booted unprotected: ${why}`);
  }

  private primaryAddrs(): seq.PrimaryAddrs {
    return { local: this.d.config.node.replication_address, peer: this.d.config.peer.replication_address, ports: vmPorts(this.d.vm.base_port) };
  }

  private async protect(why: string): Promise<void> {
    const q = this.qemu?.qmp;
    if (!q) return;
    const attempt = this.protectFailures + 1;
    const t0 = this.d.clock.now();
    const protection = randomUUID();
    this.protection = protection;
    this.setState('syncing', `building a replica on ${this.d.config.peer.name} (attempt ${attempt}): ${why}`);
    this.resync = { phase: 'preparing-secondary', bytesDone: 0, bytesTotal: 0, rateBytesPerS: 0, etaS: null, startedAt: t0, attempt };
    const a = this.primaryAddrs();
    let stoppedByUs = false;
    try {
      const blk = await q.execute<{ device: string; inserted?: { image: { 'virtual-size': number } } }[]>('query-block');
      const size = blk.find((b) => b.device === 'colo-disk0')?.inserted?.image['virtual-size'];
      if (!size) throw new FtkvmError('NO_DISK', 'colo-disk0 not found in query-block');
      const dur = this.durable();
      // Our CLAIM (promotion epoch): a stale primary that merely heard a newer epoch is refused.
      await this.d.peer.call('POST', `/v1/peer/vms/${this.name}/prepare`, { epoch: dur.primaryEpoch, sizeBytes: size, primary: this.d.config.node.name, protection } satisfies PrepareRequest, 60_000);
      this.resync = { ...this.resync, phase: 'mirroring', bytesTotal: size };
      let lastDone = 0, lastLog = 0;
      await seq.primaryMirror(q, a, (p) => {
        const now = this.d.clock.now();
        const elapsed = Math.max(1, now - t0) / 1000;
        this.d.metrics.resync(this.name, p.offset - lastDone);
        lastDone = p.offset;
        const rate = p.offset / elapsed;
        this.resync = { ...this.resync!, bytesDone: p.offset, bytesTotal: p.len, rateBytesPerS: Math.round(rate), etaS: rate > 0 ? Math.round((p.len - p.offset) / rate) : null };
        if (now - lastLog > 5000 || p.ready) {
          lastLog = now;
          this.log.info('resync progress', { copied: p.offset, total: p.len, rateMBps: (rate / 1e6).toFixed(1), etaS: this.resync.etaS, ready: p.ready });
        }
      }, { timeoutMs: 6 * 3600_000 });
      this.resync = { ...this.resync, phase: 'connecting' };
      await seq.primaryAddProxyChardevs(q, a);
      await seq.primaryWaitSecondaryConnected(q, 15_000);
      this.resync = { ...this.resync, phase: 'first-checkpoint' };
      const st = await q.execute<{ running: boolean }>('query-status');
      const tStop = this.d.clock.now();
      if (st.running) { await q.execute('stop'); stoppedByUs = true; }
      await seq.cancelMirror(q);
      await seq.primaryAttachReplication(q, a);
      await seq.primaryAddProxyObjects(q);
      await seq.primaryStartColo(q, a, checkpointDelay(this.d.config, this.d.vm), 120_000);
      this.ckpt.reset();
      this.protectFailures = 0;
      this.lastProtectError = null;
      this.resync = null;
      this.d.store.update(this.name, { role: 'primary' });
      this.setState('protected', `replica on ${this.d.config.peer.name} in sync after ${((this.d.clock.now() - t0) / 1000).toFixed(1)} s (guest paused ${stoppedByUs ? this.d.clock.now() - tStop : 0} ms for the first checkpoint)`);
    } catch (e) {
      const msg = errorMessage(e);
      this.protectFailures++;
      const backoff = Math.min(this.d.config.colo.resync_retry_min_ms * 2 ** (this.protectFailures - 1), this.d.config.colo.resync_retry_max_ms);
      this.nextProtectAt = this.d.clock.mono() + backoff;
      this.log.warn('protection failed; guest continues unprotected', { error: msg, retryInMs: backoff });
      this.resync = null;
      await this.cleanupAfterFailedProtect(stoppedByUs);
      // Published together with the state: /v1/status never shows the error while still 'syncing'.
      this.lastProtectError = msg;
      this.setState('standalone', `protection failed (${msg}); retry in ${Math.round(backoff / 1000)} s`);
    }
  }

  /** Whatever happened, the guest must not stay paused and no half-built replica may stay attached. */
  private async cleanupAfterFailedProtect(_stoppedByUs: boolean): Promise<void> {
    const q = this.qemu?.qmp;
    void this.d.peer.call('POST', `/v1/peer/vms/${this.name}/release`, { reason: 'protection attempt failed', epoch: this.durable().primaryEpoch }, 3000).catch(() => undefined);
    if (!q) return;
    try {
      const mig = await q.execute<{ status?: string }>('query-migrate');
      if (mig.status && ['setup', 'active', 'device'].includes(mig.status)) await q.execute('migrate_cancel');
      await seq.primaryDropSecondary(q, { inColo: mig.status === 'colo' });
    } catch (e) {
      this.log.error('cleanup after failed protection incomplete', { error: errorMessage(e) });
    }
    try {
      const st = await q.execute<{ running: boolean; status: string }>('query-status');
      if (!st.running && !this.durable().fenced) {
        await q.execute('cont');
        this.log.info('guest resumed after failed protection', { was: st.status });
      }
    } catch (e) {
      this.log.error('could not resume guest after failed protection', { error: errorMessage(e) });
    }
  }

  private async dropSecondary(why: string, peerDead: boolean): Promise<void> {
    const q = this.qemu?.qmp;
    if (!q) return;
    const t0 = this.d.clock.now();
    const lastHeard = this.d.peerView().lastHeardMs;
    this.setState('dropping', why);
    // A live secondary is told first, so it never takes over with a stale copy. A dead one
    // cannot answer: do not make the guest wait for connect timeouts.
    const release = this.d.peer.call('POST', `/v1/peer/vms/${this.name}/release`, { reason: why, epoch: this.durable().primaryEpoch }, 1000).then(() => true, () => false);
    const released = peerDead ? false : await release;
    if (!released && this.d.gate.mode === 'witness') {
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
      const refused = await this.moveToNewEpoch(why);
      if (refused) { await this.fence(`${why}; the secondary did not confirm the release and ${refused}`); return; }
    }
    if (this.durable().fenced) {
      // The fence watchdog got here first (peer silent, lease expired): stay in COLO, paused.
      this.log.warn('not dropping the secondary: fenced meanwhile; staying in COLO, paused', { why });
      return;
    }
    // In-flight replication I/O to a vanished host never completes on its own: end it.
    try {
      const filter = replicationSocketFilter(this.d.config.peer.replication_address, vmPorts(this.d.vm.base_port));
      const r = await destroyConnections(this.d.exec, filter);
      if (r.before > 0) this.log.info('replication connections closed', { closed: r.before - r.after, left: r.after });
      if (r.after > 0) this.log.warn('could not close replication connections (kernel without CONFIG_INET_DIAG_DESTROY?); detaching may block until TCP gives up', { left: r.after });
    } catch (e) {
      this.log.warn('closing replication connections failed', { error: errorMessage(e) });
    }
    try {
      await seq.primaryDropSecondary(q, { inColo: true });
    } catch (e) {
      this.log.error('dropping the secondary failed halfway', { error: errorMessage(e) });
    }
    const st = await q.execute<{ running: boolean }>('query-status').catch(() => ({ running: true }));
    if (!st.running && !this.durable().fenced) await q.execute('cont').catch((e) => this.log.error('cont failed', { error: errorMessage(e) }));
    const seqMs = this.d.clock.now() - t0;
    const reason: FailoverReason = /stall/.test(why) ? 'checkpoint-stall' : /storm/.test(why) ? 'checkpoint-storm' : /sick|not trusted/.test(why) ? 'secondary-sick' : 'secondary-lost';
    this.d.metrics.failover(this.name, reason);
    this.lastFailover = { at: this.d.clock.now(), kind: 'secondary-dropped', reason: why, sequenceMs: seqMs, detectionMs: lastHeard, durationMs: seqMs + (lastHeard ?? 0) };
    this.nextProtectAt = this.d.clock.mono() + this.d.config.colo.resync_retry_min_ms;
    this.setState('standalone', `running unprotected: ${why}`);
  }

  /**
   * Witness mode, leaving COLO without the secondary's confirmed release: take a new epoch first.
   * The replica left behind holds a copy of this moment and keeps asking the witness for (our
   * epoch + 1) while it cannot hear us; the witness never grants an epoch another node holds, so
   * that copy can never be promoted, whatever later happens to our lease (issue 11 path 1,
   * measured before: 691 acknowledged increments lost). Returns why not, or null when done.
   */
  private async moveToNewEpoch(why: string): Promise<string | null> {
    const dur = this.durable();
    const next = Math.max(dur.epoch, dur.primaryEpoch) + 1;
    const g = await this.d.gate.acquire(this.name, next, `${why} (replica not released: move past its epoch)`);
    if (!g.granted) return g.reason;
    // keep() first: renewals of the old epoch are refused from now on and must not count as 'lost'.
    this.d.gate.keep(this.name, next);
    this.persist({ epoch: next, primaryEpoch: next });
    this.log.info('moved to a new epoch: the replica left behind can no longer be promoted', { epoch: next, was: dur.primaryEpoch });
    return null;
  }

  /** A state write that must not stop the action: kept in memory, written later (store.unsaved). */
  private persist(patch: Parameters<StateStore['update']>[1]): void {
    try { this.d.store.update(this.name, patch); } catch (e) {
      this.log.error('could not write the node state; kept in memory and retried', { file: this.d.store.file, error: errorMessage(e) });
    }
  }

  private async takeover(why: string, opts: { fromDisk?: boolean } = {}): Promise<void> {
    const q = this.qemu?.qmp;
    if (!q) return;
    const t0 = this.d.clock.now();
    const lastHeard = this.d.peerView().lastHeardMs;
    const requested = this.takeoverRequested;
    // The epoch right after the one this replica copies, never after one merely heard of: a
    // primary that left this replica behind moved to a new epoch (dropSecondary), and the
    // witness refuses that epoch to anyone else. Asking (highest epoch known + 1) instead let a
    // stale replica that had just heard the new epoch in a heartbeat be granted the next one
    // (seen in the 'replica left behind' test: B took over at epoch 3 from its old copy).
    const dur = this.durable();
    const epoch = (dur.replicaEpoch ?? dur.epoch) + 1;
    // Ask the gate BEFORE changing anything: a refusal (the old primary's lease is still valid)
    // is retried on the next control step. From here a release must be refused: this node may be
    // granted the lease any moment.
    this.takingOver = true;
    let g;
    try { g = await this.d.gate.acquire(this.name, epoch, why); } finally { this.takingOver = false; }
    if (!g.granted) {
      if (this.lastRefusal !== g.reason) this.log.warn('takeover not allowed (yet)', { why, refused: g.reason });
      this.lastRefusal = g.reason;
      this.lastWhy = `takeover refused: ${g.reason}`;
      return;
    }
    this.lastRefusal = null;
    this.takeoverRequested = null;
    this.setState('taking-over', why);
    this.persist({ epoch: g.epoch, primaryEpoch: g.epoch, role: 'primary', fenced: false });
    if (opts.fromDisk) {
      await this.restartFromDisk(why, t0, lastHeard);
      return;
    }
    try {
      await seq.secondaryTakeover(q);
    } catch (e) {
      // Half a takeover leaves a QEMU in an unknown state, and 'taking-over' has no way out (no
      // lease renewal, no fence watchdog): never stay there. This node holds the lease at the
      // new epoch and the replicated disk: boot from it.
      await this.restartFromDisk(`${why}; the replica's takeover failed halfway (${errorMessage(e)})`, t0, lastHeard);
      return;
    }
    this.recordProcessRole('primary');
    const seqMs = this.d.clock.now() - t0;
    await seq.announce(q).catch((e) => this.log.warn('announce-self failed', { error: errorMessage(e) }));
    this.d.metrics.failover(this.name, requested ? 'requested' : /QEMU is gone/.test(why) ? 'primary-qemu-gone' : 'primary-lost');
    const detection = requested ? null : lastHeard;
    this.lastFailover = { at: this.d.clock.now(), kind: 'takeover', reason: why, sequenceMs: seqMs, detectionMs: detection, durationMs: seqMs + (detection ?? 0) };
    this.log.info('took over as primary', { epoch: g.epoch, sequenceMs: seqMs, detectionMs: detection, why });
    this.nextProtectAt = 0;
    this.setState('standalone', `took over at epoch ${g.epoch}: ${why}`);
  }

  /** For a QEMU found frozen at start: may it run (lease renewed), must it go (lost), or wait? */
  private async thawVerdict(): Promise<'thaw' | 'discard' | 'wait'> {
    if (this.d.gate.mode !== 'witness') return 'thaw';
    const epoch = this.durable().primaryEpoch;
    const g = await this.d.gate.acquire(this.name, epoch, 're-attaching a QEMU the lease fencer froze');
    if (g.granted) return 'thaw';
    return this.d.gate.lease(this.name).state === 'lost' ? 'discard' : 'wait';
  }

  /**
   * The degraded failover: the replica must not run (known corrupt, or its takeover failed
   * halfway), but this node holds the lease and the replicated disk — the secondary's base image
   * receives every write of the primary, so it holds all acknowledged work up to the loss, as a
   * crash would leave it. Kill the replica and boot the guest from that disk (restart-HA's
   * outcome: a reboot, clients reconnect), and say so everywhere.
   */
  private async restartFromDisk(why: string, t0: number, lastHeard: number | null): Promise<void> {
    this.log.error('DEGRADED FAILOVER: not resuming the replica; restarting the guest from the replicated disk', { why });
    await this.killQemu(`replica not resumed: ${why}`);
    this.sick = null;
    this.brokenDevices = [];
    await this.coldStart(`degraded failover, guest restarted from the replicated disk: ${why}`);
    const seqMs = this.d.clock.now() - t0;
    this.d.metrics.failover(this.name, 'degraded-restart');
    this.lastFailover = { at: this.d.clock.now(), kind: 'restart-from-disk', reason: why, sequenceMs: seqMs, detectionMs: lastHeard, durationMs: seqMs + (lastHeard ?? 0) };
  }

  private async demote(why: string): Promise<void> {
    this.log.error('split brain resolved against this node: discarding its copy of the VM', { why });
    this.d.store.update(this.name, { role: 'none', fenced: false });
    await this.killQemu(`stale primary discarded: ${why}`);
  }

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
  private async fence(why: string): Promise<void> {
    const q = this.qemu?.qmp;
    // One fence at a time: the watchdog and a drop that finds no lease can both get here.
    if (!q || this.state === 'fenced' || this.fencing) return;
    this.fencing = true;
    try {
      await this.cutAndPause(q, why);
    } finally {
      this.fencing = false;
    }
  }

  private async cutAndPause(q: seq.QmpLike, why: string): Promise<void> {
    const t0 = this.d.clock.now();
    try {
      this.d.store.update(this.name, { fenced: true });
    } catch (e) {
      // Pause anyway: the guest must stop serving whatever the disk says. The flag is kept in
      // memory (nothing resumes it) and written as soon as the disk takes it (fenceWatch).
      this.log.error('could not persist the fence; pausing anyway, will retry writing', { file: this.d.store.file, error: errorMessage(e) });
    }
    // Sockets first: QMP commands are answered in order, and one stuck draining an NBD write to
    // the unreachable secondary would hold set_link/stop back.
    await destroyConnections(this.d.exec, replicationSocketFilter(this.d.config.peer.replication_address, vmPorts(this.d.vm.base_port)))
      .catch((e) => this.log.warn('closing replication connections failed', { error: errorMessage(e) }));
    await q.execute('set_link', { name: 'hn0', up: false }, { timeoutMs: 2000 }).catch((e) => this.log.error('set_link off failed while fencing', { error: errorMessage(e) }));
    await q.execute('stop', undefined, { timeoutMs: 5000 }).catch((e) => this.log.error('stop failed while fencing', { error: errorMessage(e) }));
    this.log.error('FENCED: guest network cut and vCPUs paused', { why, ms: this.d.clock.now() - t0 });
    this.setState('fenced', `paused: ${why}`);
  }

  /** This node still owns the current epoch: leave COLO (if still in it), resume, reconnect. */
  private async unfence(why: string): Promise<void> {
    const q = this.qemu?.qmp;
    if (!q) return;
    this.unfencing = true;
    try {
      await this.liftFence(q, why);
    } finally {
      this.unfencing = false;
    }
  }

  private async liftFence(q: seq.QmpLike, why: string): Promise<void> {
    const mig = await q.execute<{ status?: string }>('query-migrate').catch(() => ({ status: 'unknown' }));
    if (mig.status === 'unknown' && this.d.gate.mode === 'witness') {
      // Maybe still in COLO (QEMU leaves it by itself later): move past the replica's epoch anyway.
      const refused = await this.moveToNewEpoch(`unfencing: ${why}`);
      if (refused) { this.log.warn('staying fenced: could not move to a new epoch', { refused }); return; }
    }
    if (mig.status === 'colo') {
      // Leaving COLO abandons a replica that never confirmed letting go (it may still be cut off
      // from us, asking the witness): move past its epoch first, or stay fenced.
      if (this.d.gate.mode === 'witness') {
        const refused = await this.moveToNewEpoch(`unfencing: ${why}`);
        if (refused) { this.log.warn('staying fenced: could not move to a new epoch before leaving COLO', { refused }); return; }
      }
      await seq.primaryDropSecondary(q, { inColo: true }).catch((e) => this.log.error('leaving COLO while unfencing failed', { error: errorMessage(e) }));
    }
    const st = await q.execute<{ running: boolean }>('query-status');
    if (!st.running) await q.execute('cont');
    await q.execute('set_link', { name: 'hn0', up: true });
    this.persist({ fenced: false });
    this.log.warn('fence lifted: guest resumed', { why });
    this.nextProtectAt = 0;
    this.setState('standalone', `resumed: ${why}`);
  }

  /**
   * Fenced, no lease from the witness, the peer heard again and not running the VM: resume
   * without the lease once the peer has released its replica. Its release is the promise that
   * it will not take over: it refuses while it asks the witness for the lease or runs the VM, and
   * with its replica gone there is no copy it could promote. Should a takeover request it sent
   * earlier still be granted (its answer lost), this node's next renewal is refused and it demotes;
   * no copy missing acknowledged work runs, since the peer has none.
   */
  private async reclaim(why: string): Promise<void> {
    const q = this.qemu?.qmp;
    if (!q || this.state !== 'fenced') return;
    try {
      await this.d.peer.call('POST', `/v1/peer/vms/${this.name}/release`, { reason: `fenced primary resuming without the witness: ${why}`, epoch: this.durable().primaryEpoch }, 2000);
    } catch (e) {
      this.lastWhy = `staying fenced: the peer did not release its replica (${errorMessage(e)})`;
      return;
    }
    if (this.state !== 'fenced' || this.d.gate.lease(this.name).state === 'lost') return;
    this.unfencing = true;
    try {
      const mig = await q.execute<{ status?: string }>('query-migrate').catch(() => ({ status: 'unknown' }));
      // Leaving COLO resumes the guest (QEMU's vm_start): unfencing is set, the RESUME guard lets it.
      if (mig.status === 'colo' || mig.status === 'unknown') {
        await seq.primaryDropSecondary(q, { inColo: true }).catch((e) => this.log.error('leaving COLO while reclaiming failed', { error: errorMessage(e) }));
      }
      const st = await q.execute<{ running: boolean }>('query-status');
      if (!st.running) await q.execute('cont');
      await q.execute('set_link', { name: 'hn0', up: true });
      this.persist({ fenced: false });
      this.log.warn('fence lifted without the witness: the peer released its replica', { why, epoch: this.durable().primaryEpoch });
      this.nextProtectAt = 0;
      this.setState('standalone', `resumed: ${why}`);
    } finally {
      this.unfencing = false;
    }
  }

  // ------------------------------------------------------------------ peer RPC handlers

  /** Peer (primary) asks this node to become its secondary. Resolves when ready for the stream. */
  async prepareSecondary(req: PrepareRequest): Promise<void> {
    if (isPrimaryState(this.state)) throw new VmBusyError(this.name, `this node runs the VM as ${this.state}; refusing to become a secondary`);
    if (this.busy) throw new VmBusyError(this.name, 'an operation is in progress');
    const dur = this.durable();
    if (req.epoch < dur.epoch) throw new FtkvmError('STALE_EPOCH', `${req.primary} was promoted at epoch ${req.epoch}, older than epoch ${dur.epoch} known here: it is not the current primary`);
    this.busy = true;
    try {
      if (this.qemu) await this.killQemu('replaced by a fresh secondary');
      this.sick = null;
      this.brokenDevices = [];
      this.d.store.update(this.name, { epoch: req.epoch, role: 'secondary', fenced: false, replicaEpoch: req.epoch });
      this.preparedFor = req.protection ? { protection: req.protection, atMono: this.d.clock.mono() } : null;
      this.setState('preparing', `becoming the secondary of ${req.primary} (epoch ${req.epoch})`);
      const vm = this.d.vm;
      const img = this.d.config.qemu.img_binary;
      mkdirSync(this.paths.dir, { recursive: true, mode: 0o700 });
      const r = await ensureImageSize(this.d.exec, img, vm.disk.path, vm.disk.format, req.sizeBytes);
      if (r !== 'ok') this.log.info(`local disk image ${r} to ${req.sizeBytes} bytes`, { path: vm.disk.path });
      for (const f of [this.paths.secondaryActive, this.paths.secondaryHidden]) {
        rmSync(f, { force: true });
        await createQcow2(this.d.exec, img, f, req.sizeBytes);
      }
      // Skip our own history so only the secondary's new output is scanned.
      this.consoleTail.skipToEnd();
      this.qemuLogTail.skipToEnd();
      const h = await this.launch('secondary', false);
      await seq.secondaryPrepare(h.qmp, { listen: this.d.config.node.replication_address, ports: vmPorts(vm.base_port) });
      this.log.info('secondary ready for the COLO stream', { primary: req.primary });
    } catch (e) {
      await this.killQemu(`secondary preparation failed: ${errorMessage(e)}`);
      throw e;
    } finally {
      this.busy = false;
    }
  }

  /** A peer RPC from a primary promoted at `epoch`: refused when a newer promotion is known here. */
  private checkSenderEpoch(epoch: number | undefined, what: string): void {
    const known = this.durable().epoch;
    if (epoch !== undefined && epoch < known) throw new FtkvmError('STALE_EPOCH', `${what} from a primary promoted at epoch ${epoch}, older than epoch ${known} known here: it is not the current primary`);
  }

  /**
   * Peer (primary) no longer wants this node's replica. Answered only when it is true that this
   * node will not take over: the replica is gone, or there was none. A node that runs the VM or
   * is taking over refuses (the primary relies on the answer to resume its guest).
   */
  async release(reason: string, epoch?: number): Promise<void> {
    this.checkSenderEpoch(epoch, 'release');
    if (isPrimaryState(this.state)) throw new VmBusyError(this.name, `this node runs the VM as ${this.state}: it holds no replica to release`);
    if (this.takingOver) throw new VmBusyError(this.name, 'this node is asking the witness for the lease to take over: it cannot promise not to');
    if (roleOf(this.state) === 'secondary') await this.killQemu(`released by the primary: ${reason}`);
  }

  /** Peer (primary) tells us its QEMU is gone or hands over (switchover): take over now. */
  requestTakeover(reason: string, epoch?: number): void {
    this.checkSenderEpoch(epoch, 'takeover request');
    if (this.state !== 'secondary') throw new VmBusyError(this.name, `cannot take over from state ${this.state}`);
    this.takeoverRequested = `requested by the primary: ${reason}`;
    void this.tick();
  }

  /**
   * Is the replica usable right now? Heartbeat summaries can be 100 ms old; before deliberately
   * killing the primary, ask QEMU itself. Returns null when fine, else why not.
   */
  async replicaProblemNow(): Promise<string | null> {
    if (this.state !== 'protected' || !this.qemu?.alive()) return `state ${this.state}`;
    if (!(await this.coloChannelUp())) return 'the secondary QEMU is not connected to the primary';
    const m = await this.qemu.qmp.execute<{ status?: string }>('query-migrate', undefined, { timeoutMs: 2000 }).catch(() => ({ status: 'unknown' }));
    if (m.status !== 'colo') return `migration status is ${m.status}, not colo`;
    const since = this.d.clock.now() - Math.max(this.ckpt.lastAt ?? 0, this.stateSince);
    const limit = 2 * checkpointDelay(this.d.config, this.d.vm) + 3000;
    if (since > limit) return `no checkpoint for ${Math.round(since)} ms`;
    return null;
  }

  /**
   * Planned switchover, before the crash: make the replica this guest exactly. colo-compare
   * releases a primary's pure ACK without checking that the replica received the data (README
   * Limits; seen twice in full-suite switchovers: the client's request ACKed, the replica never
   * got it, the takeover 0.2-0.3 s later left the connection waiting forever). So: take the
   * guest's tap down on this host (nothing more enters, nothing more reaches a client; TCP
   * retransmits to the new primary), force a checkpoint (setting x-checkpoint-delay wakes the
   * COLO thread at once) and wait for it. Returns what it did, for the report.
   */
  async quiesceForHandover(timeoutMs = 5000): Promise<string> {
    const q = this.qemu?.qmp;
    if (this.state !== 'protected' || !q) return `not quiesced (state ${this.state})`;
    const tap = tapName(this.d.vm);
    const t0 = this.d.clock.now();
    try {
      await this.d.exec('ip', ['link', 'set', 'dev', tap, 'down']);
    } catch (e) {
      return `not quiesced: could not take ${tap} down (${errorMessage(e)})`;
    }
    const c0 = this.ckpt.count;
    await q.execute('migrate-set-parameters', { 'x-checkpoint-delay': checkpointDelay(this.d.config, this.d.vm) }).catch(() => undefined);
    while (this.ckpt.count === c0 && this.d.clock.now() - t0 < timeoutMs && this.state === 'protected') await new Promise((r) => setTimeout(r, 10));
    const ms = Math.round(this.d.clock.now() - t0);
    return this.ckpt.count > c0 ? `guest tap down and a checkpoint taken in ${ms} ms: the replica is this guest exactly` : `guest tap down, but no checkpoint within ${ms} ms`;
  }

  /** Drill/switchover on the primary: kill this node's QEMU as a crash would. */
  async crashPrimary(why: string): Promise<number> {
    if (this.state !== 'protected') throw new VmBusyError(this.name, `not protected (state ${this.state})`);
    const pid = this.qemu!.pid;
    this.expectedExit = why;
    this.qemu!.kill('SIGKILL');
    return pid;
  }
}
