// A QEMU model answering the QMP commands the controller and colo/sequences.ts send, in virtual
// time, with the behaviour that matters for safety (QEMU 7.2, migration/colo.c):
//  - `counter` is the guest's state: the units of client work it holds. A COLO secondary gets
//    every input the primary gets (filter-mirror) and the primary's state at each checkpoint.
//  - checkpoints run every x-checkpoint-delay; each stops the primary (STOP) and resumes it
//    (RESUME) — also a guest that `stop` paused (colo_do_checkpoint_transaction → vm_start).
//  - a broken replication connection is noticed at the next checkpoint: the primary stays
//    paused, emits COLO_EXIT reason=error and waits for x-colo-lost-heartbeat, which makes it
//    leave COLO and resume the guest (migration_iteration_finish → vm_start). A silently cut
//    link stalls the checkpoint until the link returns or the sockets are destroyed.
//  - x-colo-lost-heartbeat on a secondary resumes its copy as of the last checkpoint.
import type { ExitInfo, ProcessRecord, QemuProcess } from '../../agent/src/qemu/process.ts';
import type { LaunchRole } from '../../agent/src/qemu/argv.ts';
import type { QmpEvent } from '../../agent/src/qmp/client.ts';
import type { QmpLike } from '../../agent/src/colo/sequences.ts';
import { QmpCommandError, QmpDisconnectedError, QmpTimeoutError } from '../../agent/src/qmp/errors.ts';
import type { HostId } from './net.ts';
import { bindIo, currentProcess, ioTimeout, outside } from './process.ts';

/** QEMU's own timers: a process of its own, not the agent's that sent the command. */
const later = (fn: () => void, ms: number): ReturnType<typeof setTimeout> => outside(() => setTimeout(fn, ms));

export const DISK_BYTES = 64 * 1024 * 1024;

/** What a QEMU model needs of the world around it. */
export interface QemuEnv {
  /** The other host's current QEMU for the VM (the COLO partner candidate). */
  peerQemu(host: HostId): SimQemu | null;
  /** Replication network usable both ways between the two hosts. */
  replUp(): boolean;
  /** The host's disk: the units of work written to it. */
  disk: Record<'A' | 'B', { counter: number }>;
  rate(): number; // bytes per ms a drive-mirror copies
  latency(): number;
  note(what: string): void;
}

type Fn = (e: QmpEvent) => void;

/** The process's exit, seen by the agent that holds it (SIGCHLD is I/O too). */
function deliveredTo<T>(p: ReturnType<typeof currentProcess>, v: Promise<T>): Promise<T> {
  if (!p) return v;
  return v.then((x) => new Promise<T>((r) => p.fire({}, 'io', () => r(x))));
}
let nextPid = 40_000;

export class SimQemu {
  readonly pid = nextPid++;
  readonly record: ProcessRecord;
  readonly exited: Promise<ExitInfo>;
  reattached = false;
  private resolveExit!: (i: ExitInfo) => void;
  isAlive = true;
  /** QMP never answers (a wedged main loop); the guest stops making progress. */
  wedged = false;
  /** SIGSTOP (the lease fencer): nothing runs, QMP is not answered. */
  frozen = false;
  get stuck(): boolean { return this.wedged || this.frozen; }
  run: 'running' | 'paused' | 'inmigrate';
  hn0 = true;
  tapUp = true;
  mig: string | undefined;
  colo: 'none' | 'primary' | 'secondary' = 'none';
  counter: number;
  partner: SimQemu | null = null;
  /** The replication sockets were destroyed (ss -K) or the partner is gone: the session is over. */
  severed = false;
  private objects = new Set<string>();
  private chardevs = new Set<string>();
  private replChild = false;
  nbd = false;
  incoming = false;
  job: { offset: number; len: number; ready: boolean } | null = null;
  private ckptDelay = 2000;
  private ckptTimer: ReturnType<typeof setTimeout> | null = null;
  /** Primary: a checkpoint is in progress (guest stopped) and cannot complete yet. */
  stalled = false;
  /** Primary after a COLO error: parked until x-colo-lost-heartbeat. */
  parked = false;
  checkpoints = 0;
  /** The nemesis corrupted this replica (its console shows it): it must never serve. */
  corrupt = false;
  /** The nemesis makes x-colo-lost-heartbeat fail on this secondary (a takeover failing halfway). */
  failTakeover = false;
  private readonly listeners = new Set<Fn>();
  /** QMP connection generation: an agent that died loses its connection. */
  private gen = 0;

  constructor(readonly host: 'A' | 'B', readonly role: LaunchRole, paused: boolean, private readonly env: QemuEnv, now: number) {
    this.record = { pid: this.pid, startTicks: this.pid, role, startedAt: now, binary: 'sim-qemu' };
    this.exited = new Promise((r) => { this.resolveExit = r; });
    this.run = role === 'secondary' ? 'inmigrate' : paused ? 'paused' : 'running';
    this.everRan = this.run === 'running';
    this.counter = role === 'secondary' ? 0 : env.disk[host].counter;
  }

  // ------------------------------------------------------------ process
  /** A new QMP connection to this process (an agent launching or re-attaching). */
  connect(reattached: boolean): QemuProcess {
    const self = this;
    const gen = this.gen;
    return {
      pid: this.pid, record: this.record, exited: deliveredTo(currentProcess(), this.exited), reattached, qmp: this.handle(this.gen),
      alive: () => self.isAlive,
      // Through a connection of a dead agent nothing happens: the process that held it is gone.
      kill: () => { if (self.gen === gen) self.die('SIGKILL'); },
      killAndWait: async () => { if (self.gen === gen) self.die('SIGKILL'); await new Promise((r) => setTimeout(r, 1)); },
      dispose: () => undefined,
    };
  }

  /** The agent holding the connections died. */
  closeConnections(): void { this.gen++; this.listeners.clear(); }

  /** ss -K: the replication sockets of this host are destroyed. */
  sever(): void {
    this.severed = true;
    this.job = null;
    if (this.partner) this.partner.severed = true;
  }

  die(signal: NodeJS.Signals | null = 'SIGKILL'): void {
    if (!this.isAlive) return;
    this.isAlive = false;
    this.clearCkpt();
    this.job = null;
    const p = this.partner;
    this.partner = null;
    if (p) p.onPartnerGone();
    this.env.note(`${this.host} QEMU ${this.pid} (${this.role}) died`);
    later(() => this.resolveExit({ code: null, signal }), 0);
  }

  /** The other end's process is gone (its sockets got RST). */
  onPartnerGone(): void { this.severed = true; }

  /** Serving, or a primary in an ordinary checkpoint (paused for a few ms, by COLO itself). */
  inService(): boolean {
    return this.serving() || (this.isAlive && this.colo === 'primary' && this.stalled && !this.parked && this.hn0 && this.tapUp && this.env.replUp());
  }

  /** Guest outputs reach the network: the copy serves clients. */
  serving(): boolean {
    return this.isAlive && !this.frozen && this.run === 'running' && this.hn0 && this.tapUp && this.colo !== 'secondary' && !this.incoming && !this.parked;
  }

  // ------------------------------------------------------------ events
  private emit(event: string, data?: Record<string, unknown>): void {
    const now = Date.now();
    const e: QmpEvent = { event, data, timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 } } as QmpEvent;
    later(() => { if (this.isAlive) for (const l of [...this.listeners]) l(e); }, 0);
  }
  /** The guest has run at least once (a cold start held paused before its first instruction has not). */
  everRan = false;
  private setRun(r: 'running' | 'paused'): void {
    if (r === 'running') this.everRan = true;
    if (this.run === r) return;
    const was = this.run;
    this.run = r;
    if (r === 'paused' && was === 'running') this.emit('STOP');
    if (r === 'running') this.emit('RESUME');
  }

  // ------------------------------------------------------------ COLO
  /** The secondary's redirectors are connected to this primary's proxy sockets. */
  private proxyConnected(sec: SimQemu | null): boolean {
    return !!sec && sec.isAlive && sec.incoming && this.chardevs.has('mirror0') && this.env.replUp() && !this.severed && !sec.severed;
  }
  /** Inputs mirrored and outputs compared right now (a healthy COLO session). */
  sessionUp(): boolean {
    const p = this.partner;
    return this.colo === 'primary' && !!p && p.isAlive && !p.stuck && p.colo === 'secondary' && !this.severed && !p.severed && this.env.replUp() && !this.stalled && !this.parked;
  }

  private clearCkpt(): void { if (this.ckptTimer) clearTimeout(this.ckptTimer); this.ckptTimer = null; }
  private scheduleCkpt(ms = this.ckptDelay): void {
    this.clearCkpt();
    this.ckptTimer = later(() => this.checkpoint(), ms);
  }

  private checkpoint(): void {
    this.ckptTimer = null;
    if (!this.isAlive || this.colo !== 'primary' || this.parked) return;
    if (this.stuck) { this.scheduleCkpt(100); return; }
    if (!this.stalled) { this.setRun('paused'); this.stalled = true; }
    const p = this.partner;
    if (this.severed || !p || !p.isAlive || p.severed) {
      // The send fails: COLO ends with an error; the guest stays stopped until failover.
      this.stalled = false;
      this.parked = true;
      this.emit('COLO_EXIT', { mode: 'primary', reason: 'error' });
      if (p) { p.severed = true; p.emit('COLO_EXIT', { mode: 'secondary', reason: 'error' }); }
      return;
    }
    if (!this.env.replUp() || p.stuck) { this.scheduleCkpt(50); return; } // stalled: a cut link, a secondary that does not run
    const pause = 5 + Math.floor(this.env.latency() * 10);
    p.setRun('paused');
    this.ckptTimer = later(() => {
      this.ckptTimer = null;
      if (!this.isAlive || this.colo !== 'primary') return;
      if (!p.isAlive || p.severed || this.severed || !this.env.replUp() || p.stuck) { this.scheduleCkpt(50); return; }
      p.counter = this.counter;
      this.env.disk[p.host].counter = this.counter;
      this.checkpoints++;
      this.stalled = false;
      p.setRun('running');
      this.setRun('running'); // vm_start, also after a `stop`
      this.scheduleCkpt();
    }, pause);
  }

  /** x-colo-lost-heartbeat. */
  private lostHeartbeat(): void {
    if (this.colo === 'primary') {
      const p = this.partner;
      this.clearCkpt();
      this.colo = 'none';
      this.mig = 'completed';
      this.partner = null;
      this.stalled = false;
      const wasParked = this.parked;
      this.parked = false;
      if (!wasParked) this.emit('COLO_EXIT', { mode: 'primary', reason: 'request' });
      if (p) p.severed = true;
      this.setRun('running'); // migration_iteration_finish → vm_start
    } else if (this.colo === 'secondary') {
      if (this.failTakeover) throw new QmpCommandError('x-colo-lost-heartbeat', 'GenericError', 'simulated: failover failed halfway');
      const p = this.partner;
      this.colo = 'none';
      this.incoming = false;
      this.partner = null;
      this.emit('COLO_EXIT', { mode: 'secondary', reason: 'request' });
      if (p) p.severed = true;
      this.setRun('running');
      this.env.note(`${this.host} secondary ${this.pid} resumed its copy (counter ${this.counter})`);
    } else {
      throw new QmpCommandError('x-colo-lost-heartbeat', 'GenericError', 'VM is not in COLO mode');
    }
  }

  private startMigrate(): void {
    const sec = this.env.peerQemu(this.host);
    if (!sec || !sec.incoming || sec.run !== 'inmigrate' || !this.env.replUp()) {
      this.mig = 'failed';
      return;
    }
    this.mig = 'active';
    const ms = 20 + Math.floor(this.env.latency() * 100);
    later(() => {
      if (!this.isAlive || this.mig !== 'active') return;
      if (!sec.isAlive || !this.env.replUp() || sec.run !== 'inmigrate') { this.mig = 'failed'; return; }
      this.mig = 'colo';
      this.colo = 'primary';
      this.partner = sec;
      sec.partner = this;
      sec.colo = 'secondary';
      sec.counter = this.counter;
      this.env.disk[sec.host].counter = this.counter;
      sec.setRun('running');
      this.setRun('running');
      this.scheduleCkpt();
    }, ms);
  }

  private mirror(): void {
    const sec = this.env.peerQemu(this.host);
    if (!sec || !sec.nbd || !this.env.replUp()) throw new QmpCommandError('drive-mirror', 'GenericError', 'Failed to connect to NBD server');
    this.severed = false;
    this.job = { offset: 0, len: DISK_BYTES, ready: false };
    const step = () => {
      const j = this.job;
      if (!j || !this.isAlive) return;
      if (!sec.isAlive || !this.env.replUp() || !sec.nbd) { this.job = null; return; } // job fails and goes away
      j.offset = Math.min(j.len, j.offset + this.env.rate() * 50);
      if (j.offset >= j.len && !j.ready) { j.ready = true; this.env.disk[sec.host].counter = this.counter; }
      later(step, 50);
    };
    later(step, 50);
  }

  /** One unit of client work reaches this (serving) copy; true when its answer is released. */
  apply(): boolean {
    this.counter++;
    this.env.disk[this.host].counter = this.counter;
    if (this.job?.ready) { const s = this.env.peerQemu(this.host); if (s) this.env.disk[s.host].counter = this.counter; }
    if (this.colo !== 'primary') return true;
    if (!this.sessionUp()) return false; // colo-compare holds the output: not acknowledged
    const p = this.partner!;
    p.counter++;
    this.env.disk[p.host].counter = p.counter;
    return true;
  }

  // ------------------------------------------------------------ QMP
  private handle(gen: number): QmpLike {
    const self = this;
    const bound = new Map<Fn, Fn>();
    return {
      execute<T>(command: string, args?: Record<string, unknown>, opts?: { timeoutMs?: number }): Promise<T> {
        return new Promise<T>((resolve, reject) => {
          if (!self.isAlive || self.gen !== gen) { reject(new QmpDisconnectedError(command)); return; }
          const timeout = opts?.timeoutMs ?? 10_000;
          const t = setTimeout(() => reject(new QmpTimeoutError(command, timeout)), timeout);
          // A stuck QEMU answers queued commands once it runs again (the client may have timed out).
          const answer = () => {
            if (!self.isAlive || self.gen !== gen) { clearTimeout(t); reject(new QmpDisconnectedError(command)); return; }
            if (self.stuck) { ioTimeout(answer, 20); return; }
            clearTimeout(t);
            try { resolve(self.command(command, args ?? {}) as T); } catch (e) { reject(e); }
          };
          ioTimeout(answer, self.env.latency());
        });
      },
      hmp(line: string, opts?: { timeoutMs?: number }): Promise<string> {
        return this.execute<string>('human-monitor-command', { 'command-line': line }, opts);
      },
      // Events reach the agent as I/O on its QMP socket (parked while it is stopped).
      on(_ev: 'event', fn: Fn) { if (self.gen === gen) { const b = bindIo(fn); bound.set(fn, b); self.listeners.add(b); } return this; },
      off(_ev: 'event', fn: Fn) { self.listeners.delete(bound.get(fn) ?? fn); bound.delete(fn); return this; },
    };
  }

  private missing(cmd: string, id: string): never { throw new QmpCommandError(cmd, 'DeviceNotFound', `object '${id}' not found`); }

  command(cmd: string, a: Record<string, unknown>): unknown {
    switch (cmd) {
      case 'query-status': {
        const status = this.run === 'inmigrate' ? 'inmigrate' : this.run === 'running' ? 'running' : this.colo !== 'none' || this.parked ? 'colo' : 'paused';
        return { status, running: this.run === 'running' };
      }
      case 'stop': this.setRun('paused'); return {};
      case 'cont':
        if (this.run === 'inmigrate') throw new QmpCommandError(cmd, 'GenericError', 'Migration is not finalized yet');
        this.setRun('running'); return {};
      case 'set_link': this.hn0 = !!a['up']; return {};
      case 'query-migrate': return this.mig ? { status: this.mig } : {};
      case 'query-colo-status': return { mode: this.colo, reason: 'none' };
      case 'migrate-set-capabilities': return {};
      case 'migrate-set-parameters':
        if (typeof a['x-checkpoint-delay'] === 'number') {
          this.ckptDelay = a['x-checkpoint-delay'] as number;
          if (this.colo === 'primary' && !this.stalled && !this.parked) this.scheduleCkpt(1); // wakes the COLO thread
        }
        return {};
      case 'migrate-incoming': this.incoming = true; return {};
      case 'nbd-server-start': this.nbd = true; return {};
      case 'nbd-server-add': return {};
      case 'nbd-server-stop': if (!this.nbd) throw new QmpCommandError(cmd, 'GenericError', 'NBD server not running'); this.nbd = false; return {};
      case 'x-colo-lost-heartbeat': this.lostHeartbeat(); return {};
      case 'migrate': this.startMigrate(); return {};
      case 'migrate_cancel': if (this.mig === 'active') this.mig = 'cancelled'; return {};
      case 'drive-mirror': this.mirror(); return {};
      case 'query-block-jobs': return this.job ? [{ device: 'resync', ...this.job }] : [];
      case 'block-job-cancel': this.job = null; return {};
      case 'query-block': return [{ device: 'colo-disk0', inserted: { image: { 'virtual-size': DISK_BYTES } } }];
      case 'query-chardev': {
        const sec = this.incoming || this.colo === 'secondary' ? null : this.env.peerQemu(this.host);
        const out = [...this.chardevs].map((label) => ({ label, filename: (label === 'mirror0' || label === 'compare1') && this.proxyConnected(sec) ? `tcp:x<->y` : 'disconnected' }));
        if (this.incoming || this.colo === 'secondary') {
          const prim = this.env.peerQemu(this.host);
          const up = !!prim && prim.proxyConnected(this);
          out.push({ label: 'red0', filename: up ? 'tcp:x<->y' : 'disconnected' }, { label: 'red1', filename: up ? 'tcp:x<->y' : 'disconnected' });
        }
        return out;
      }
      case 'chardev-add': if (a['id'] === 'mirror0') this.severed = false; this.chardevs.add(String(a['id'])); return {}; // new sockets: a new session
      case 'chardev-remove': if (!this.chardevs.delete(String(a['id']))) this.missing(cmd, String(a['id'])); return {};
      case 'qom-list': return [...this.objects].map((name) => ({ name, type: 'child<object>' }));
      case 'object-add': this.objects.add(String(a['id'])); return {};
      case 'object-del': if (!this.objects.delete(String(a['id'])) && !['f1', 'f2', 'rew0'].includes(String(a['id']))) this.missing(cmd, String(a['id'])); return {};
      case 'human-monitor-command': {
        const line = String(a['command-line']);
        if (line.startsWith('drive_add')) this.replChild = true;
        else if (line.startsWith('drive_del')) this.replChild = false;
        return '';
      }
      case 'x-blockdev-change': return {};
      case 'query-named-block-nodes': return this.replChild ? [{ 'node-name': 'replication0' }] : [];
      case 'x-debug-query-block-graph':
        return this.replChild
          ? { nodes: [{ id: 1, name: 'colo-disk0' }, { id: 2, name: 'replication0' }], edges: [{ parent: 1, child: 2, name: 'children.1' }] }
          : { nodes: [], edges: [] };
      case 'qom-get': return false; // virtio 'broken'
      default: return {};
    }
  }
}
