// One protected VM on this node: the wiring of its controller. The work is done in colo/vm/:
//   core.ts       the VM's state (one setState that logs `from -> to`) and its views
//   lifecycle.ts  the QEMU process: launch, QMP events, exit, kill, re-attach after a restart
//   sense.ts      what is observed before deciding (liveness, channel, stalls, replica health)
//   control.ts    the fence watchdog and the control step: sense → decide() → one action
//   actions/      start, protect, drop (and hand-over, demote), takeover, fence (and reclaim)
//   secondary.ts  the secondary's side of the peer RPC (prepare, release, takeover request)
//   handover.ts   hooks for drills and switchover
// Every I/O goes through the ports in VmControllerDeps (QEMU processes, QMP, store, gate, peer,
// exec, clock), so the simulator (test/sim) runs this same code in virtual time.
import type { VmSummary } from '../peer/heartbeat.ts';
import type { VmPaths } from '../qemu/paths.ts';
import type { VmState } from './states.ts';
import { VmCore } from './vm/core.ts';
import { fenceWatch, tick } from './vm/control.ts';
import { init } from './vm/lifecycle.ts';
import { prepareSecondary, release, requestTakeover } from './vm/secondary.ts';
import { crashPrimary, quiesceForHandover, replicaProblemNow } from './vm/handover.ts';
import type { PrepareAnswer, PrepareRequest, VmControllerDeps, VmStatus } from './vm/types.ts';

export { VmBusyError, type FailoverRecord, type LogReader, type PrepareAnswer, type PrepareRequest, type ResyncProgress, type VmControllerDeps, type VmStatus } from './vm/types.ts';

export class VmController {
  /** The VM's state, shared by the controller's modules (exposed for tests and the simulator). */
  readonly c: VmCore;

  constructor(d: VmControllerDeps) {
    this.c = new VmCore(d);
    this.c.kick = () => void tick(this.c);
  }

  get name(): string { return this.c.name; }
  get paths(): VmPaths { return this.c.paths; }
  get state(): VmState { return this.c.state; }

  /** Resolves when pred(state) holds (checked now and on every change) or rejects after timeoutMs. */
  waitFor(pred: (s: VmState) => boolean, timeoutMs: number, what: string): Promise<VmState> { return this.c.waitFor(pred, timeoutMs, what); }
  summary(): VmSummary { return this.c.summary(); }
  fencerEntry(): { epoch: number; qemuPid: number; qemuStartTicks: number } | null { return this.c.fencerEntry(); }
  fencedByAgent(): boolean { return this.c.fencedByAgent(); }
  isProtected(): boolean { return this.c.isProtected(); }
  status(): VmStatus { return this.c.status(); }

  /** Finds a QEMU a previous agent left running and carries on with it, without touching the guest. */
  init(): Promise<void> { return init(this.c); }
  /** Agent shutdown: leave QEMU running (it outlives the agent), just detach. */
  detach(): void { this.c.stopped = true; this.c.qemu?.dispose(); }

  fenceWatch(): void { fenceWatch(this.c); }
  tick(): Promise<void> { return tick(this.c); }

  prepareSecondary(req: PrepareRequest): Promise<PrepareAnswer> { return prepareSecondary(this.c, req); }
  release(reason: string, epoch?: number): Promise<void> { return release(this.c, reason, epoch); }
  requestTakeover(reason: string, epoch?: number): void { requestTakeover(this.c, reason, epoch); }

  replicaProblemNow(): Promise<string | null> { return replicaProblemNow(this.c); }
  quiesceForHandover(timeoutMs?: number): Promise<string> { return quiesceForHandover(this.c, timeoutMs); }
  crashPrimary(why: string): Promise<number> { return crashPrimary(this.c, why); }
}
