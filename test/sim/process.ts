// Processes in the simulation: which code belongs to which agent process, so that a process
// can be stopped (SIGSTOP: a hung agent) and its wall clock stepped (NTP), while QEMU, the
// fencer, the witness and the peer go on. Every fake timer is tagged with the process whose
// code armed it (AsyncLocalStorage follows timers and promise continuations); a stopped
// process runs none of its callbacks until it is continued. As in Node after SIGCONT, timers
// that expired meanwhile run first, then the I/O that queued up (datagrams in the socket
// buffer, answers on open connections) in arrival order; an interval fires once, not once per
// missed period.
import { AsyncLocalStorage } from 'node:async_hooks';

const als = new AsyncLocalStorage<SimProcess>();

type Kind = 'timer' | 'io';

export class SimProcess {
  private stopped_ = false;
  private dead = false;
  private readonly parked = new Map<object, { kind: Kind; fn: () => void }>();
  private waiters: (() => void)[] = [];

  /** offsetMs: the host's wall clock offset (NTP steps); Date.now() in this process's code sees it. */
  constructor(readonly name: string, readonly offsetMs: () => number = () => 0) {}

  get stopped(): boolean { return this.stopped_; }

  /** Runs fn as this process's code (what it arms or awaits stays this process's). */
  run<T>(fn: () => T): T { return als.run(this, fn); }

  /** A callback of this process is due: run it now, or when the process is continued. */
  fire(key: object, kind: Kind, fn: () => void): void {
    if (this.dead) { this.run(fn); return; } // a dead process's ports refuse by themselves
    if (this.stopped_) { if (!this.parked.has(key)) this.parked.set(key, { kind, fn }); return; }
    this.run(fn);
  }

  /** Resolves once the process runs (at once if it does). */
  running(): Promise<void> {
    if (!this.stopped_ || this.dead) return Promise.resolve();
    return new Promise((r) => this.waiters.push(r));
  }

  stop(): void { if (!this.dead) this.stopped_ = true; }

  cont(): void {
    if (!this.stopped_) return;
    this.stopped_ = false;
    const due = [...this.parked.values()];
    this.parked.clear();
    for (const k of ['timer', 'io'] as const) for (const p of due) if (p.kind === k) this.run(p.fn);
    const w = this.waiters;
    this.waiters = [];
    for (const r of w) this.run(r);
  }

  /** SIGKILL (also of a stopped process): nothing parked ever runs. */
  kill(): void { this.dead = true; this.stopped_ = false; this.parked.clear(); this.waiters = []; }
}

export function currentProcess(): SimProcess | undefined { return als.getStore(); }

/** Runs fn as nobody's code (QEMU, the fencer, the witness, the world). */
export function outside<T>(fn: () => T): T { return als.exit(fn); }

/** fn, delivered to the process current at the time of binding as I/O (or run as is outside any). */
export function bindIo<A extends unknown[]>(fn: (...a: A) => void): (...a: A) => void {
  const p = als.getStore();
  if (!p) return fn;
  return (...a: A) => { const key = {}; p.fire(key, 'io', () => fn(...a)); };
}

const ioCallbacks = new WeakSet<object>();
/** A setTimeout whose callback is I/O arriving at the current process (an answer, a datagram). */
export function ioTimeout(fn: () => void, ms: number): ReturnType<typeof setTimeout> {
  ioCallbacks.add(fn);
  return setTimeout(fn, ms);
}

/**
 * After FakeTimers.install: tag every timer with the current process and make Date.now()
 * see its clock offset. Returns the undo (call it before clock.uninstall()).
 */
export function installProcesses(): () => void {
  const g = globalThis as unknown as Record<string, unknown>;
  const st = g.setTimeout as (fn: (...a: unknown[]) => void, ms?: number, ...a: unknown[]) => unknown;
  const si = g.setInterval as typeof st;
  const dateNow = Date.now;
  const wrap = (fn: (...a: unknown[]) => void, args: unknown[], once: boolean) => {
    const p = als.getStore();
    if (!p) return () => fn(...args);
    const kind: Kind = ioCallbacks.has(fn) ? 'io' : 'timer';
    const key = once ? null : {}; // an interval parks once however many periods it misses
    return () => p.fire(key ?? {}, kind, () => fn(...args));
  };
  g.setTimeout = (fn: (...a: unknown[]) => void, ms?: number, ...args: unknown[]) => st(wrap(fn, args, true), ms);
  g.setInterval = (fn: (...a: unknown[]) => void, ms?: number, ...args: unknown[]) => si(wrap(fn, args, false), ms);
  Date.now = () => dateNow() + (als.getStore()?.offsetMs() ?? 0);
  return () => { g.setTimeout = st; g.setInterval = si; Date.now = dateNow; };
}
