// One host's agent in the simulation: the production parts (StateStore, WitnessGate,
// HeartbeatService, VmController with decide()) wired to simulated ports, the way
// agent/src/agent.ts wires them to real ones. Only the HTTP server, the QEMU probe and the
// lease fencer process are left out (the fencer has its own real-process tests).
import { configSchema, type Config } from '../../agent/src/config/schema.ts';
import { createLogger, type Logger } from '../../agent/src/log/logger.ts';
import { Metrics } from '../../agent/src/api/metrics.ts';
import { HeartbeatService, type DatagramTransport } from '../../agent/src/peer/heartbeat.ts';
import { PeerRpcError } from '../../agent/src/peer/client.ts';
import { StateStore, type NodeStateFile, type StateMedium } from '../../agent/src/state/store.ts';
import { WitnessGate, type WitnessTransport } from '../../agent/src/witness/client.ts';
import { VmController, type LogReader } from '../../agent/src/colo/vm.ts';
import type { QemuProcess, QemuProcesses } from '../../agent/src/qemu/process.ts';
import type { Exec } from '../../agent/src/util/exec.ts';
import type { Clock } from '../../agent/src/util/clock.ts';
import { FtkvmError, errorMessage } from '../../agent/src/util/errors.ts';
import { ADDR, NetRefused, NetTimeout, type HostId, type Net } from './net.ts';
import { SimQemu, type QemuEnv } from './qemu.ts';
import { SimProcess } from './process.ts';
import type { SimWitness } from './witness.ts';
import { agentPulse, fencerControl } from '../../agent/src/fence/publish.ts';
import type { AgentPulse, FencerControl } from '../../agent/src/fence/fencer.ts';

export const VM = 'vm1';
export const NODE: Record<'A' | 'B', string> = { A: 'hosta', B: 'hostb' };
export const other = (h: 'A' | 'B'): 'A' | 'B' => (h === 'A' ? 'B' : 'A');

/** What survives an agent crash on a host: its files, its QEMU, its console. */
export interface SimHost {
  id: 'A' | 'B';
  files: Map<string, string>;
  /** Writes of the node state fail (ENOSPC/EIO) while set. */
  writeFails: boolean;
  qemu: SimQemu | null;
  console: string[];
  /** What the agent last told the lease fencer (fence/publish.ts); the fencer outlives the agent. */
  fencerControl: FencerControl | null;
  fencerPulse: AgentPulse | null;
  /** The host's wall clock minus true time (NTP steps it); monotonic clocks never move with it. */
  clockOffsetMs: number;
}

export interface SimWorldPorts {
  net: Net;
  witness: SimWitness;
  hosts: Record<'A' | 'B', SimHost>;
  agents: Record<'A' | 'B', SimAgent | null>;
  qemuEnv: QemuEnv;
  log: (line: string) => void;
}

export function simConfig(h: 'A' | 'B'): Config {
  const p = other(h);
  return configSchema.parse({
    node: { name: NODE[h], replication_address: ADDR[h].repl },
    peer: { name: NODE[p], addresses: [ADDR[p].repl, ADDR[p].mgmt], replication_address: ADDR[p].repl },
    heartbeat: { interval_ms: 100, timeout_ms: 500 },
    state_dir: `/sim/${h}`,
    // The disk model is a counter: a full copy (the checksum resync's QMP and NBD steps are not modelled).
    colo: { checkpoint_delay_ms: 1000, startup_peer_wait_ms: 3000, resync_retry_min_ms: 1000, resync_retry_max_ms: 8000, resync: 'full' },
    witness: { url: `http://${ADDR.W.mgmt}:7490`, lease_ms: 1000 },
    vms: [{
      name: VM, memory_mib: 128, vcpus: 1, disk: { path: `/sim/${h}/vm1.qcow2` }, boot: { firmware: 'bios' },
      nic: { bridge: 'br0', mac: '52:54:00:00:00:01' }, base_port: 9000, preferred_primary: NODE.A,
    }],
  });
}

export class SimAgent {
  readonly log: Logger;
  readonly store: StateStore;
  readonly gate: WitnessGate;
  readonly heartbeat: HeartbeatService;
  readonly vm: VmController;
  alive = true;
  /** This agent's process: stopped (SIGSTOP) by a hang fault, killed by a crash. */
  readonly proc: SimProcess;
  private loop: ReturnType<typeof setInterval> | undefined;
  private heardPeer = false;
  private readonly c: Config;

  constructor(readonly host: SimHost, private readonly w: SimWorldPorts, gen: number) {
    const h = host.id;
    this.proc = new SimProcess(`${h}#${gen}`, () => host.clockOffsetMs);
    this.c = simConfig(h);
    const startMono = performance.now();
    this.log = createLogger({ level: 'info', now: () => Date.now(), sink: (r) => { if (this.alive) w.log(`${h}#${gen} ${r.level} ${r.component}: ${r.msg} ${JSON.stringify(r.fields)}`); } }); // a dead process logs nothing
    // now(): this host's wall clock (stepped by clock faults); mono(): CLOCK_MONOTONIC.
    const clock: Clock = { now: () => Date.now(), mono: () => performance.now(), setTimeout: (fn, ms) => { const t = setTimeout(fn, ms); return { cancel: () => clearTimeout(t) }; } };
    const medium: StateMedium = {
      read: (path) => { const t = host.files.get(path); return t ? JSON.parse(t) as NodeStateFile : null; },
      write: (path, text) => {
        if (!this.alive) return; // a dead process writes nothing
        if (host.writeFails) throw new FtkvmError('EIO', `write ${path}: ENOSPC (simulated)`);
        host.files.set(path, text);
      },
    };
    this.store = new StateStore(this.c.state_dir, this.c.node.name, medium);
    // A dead process sends nothing: every port of this agent refuses once it crashed (its
    // promises may still resume in the simulation; in life the process is gone).
    const dead = () => Promise.reject(new Error('agent process is dead'));
    const witnessTransport: WitnessTransport = {
      acquire: (vm, req, timeoutMs) => !this.alive ? dead() : w.net.exchange('witness acquire', h, 'W', 'mgmt', () => w.witness.up, () => w.witness.acquire(vm, req), timeoutMs, 500),
      health: (timeoutMs) => w.net.exchange('witness health', h, 'W', 'mgmt', () => w.witness.up, async () => undefined, timeoutMs, 500),
      release: (vm, req, timeoutMs) => !this.alive ? dead() : w.net.exchange('witness release', h, 'W', 'mgmt', () => w.witness.up, () => w.witness.release(vm, req), timeoutMs, 500),
      close: () => undefined,
    };
    this.gate = new WitnessGate({ url: this.c.witness.url!, node: this.c.node.name, leaseMs: this.c.witness.lease_ms, token: () => 'sim', clock, log: this.log.child('witness'), transport: witnessTransport });
    const udp: DatagramTransport = {
      bind: async (_addr, port, onMessage) => {
        // A datagram waits in the socket buffer while the process is stopped.
        const s = w.net.bind(h, port, (buf, from) => this.proc.fire({}, 'io', () => { if (this.alive) onMessage(buf, from); }));
        return { send: (buf, p, a) => { if (this.alive) w.net.datagram(h, a, p, buf); }, close: () => s.close() };
      },
    };
    this.heartbeat = new HeartbeatService({
      node: this.c.node.name, peer: this.c.peer.name, peerAddresses: this.c.peer.addresses, peerPort: 7481,
      listenAddress: '0.0.0.0', listenPort: 7481, intervalMs: this.c.heartbeat.interval_ms, timeoutMs: this.c.heartbeat.timeout_ms,
      key: 'sim-token-0123456789', clock, log: this.log.child('heartbeat'), transport: udp,
      summaries: () => ({ [VM]: this.vm.summary() }),
      onChange: (view) => { if (view.alive) this.heardPeer = true; this.kick(); },
    });
    const procs: QemuProcesses = {
      launch: async (o) => {
        if (!this.alive) throw new Error('agent process is dead');
        const q = new SimQemu(h, o.role, o.argv.includes('-S'), w.qemuEnv, Date.now());
        host.qemu?.die();
        host.qemu = q;
        await new Promise((r) => setTimeout(r, 5 + w.qemuEnv.latency() * 20));
        if (!this.alive) throw new Error('agent died');
        return q.connect(false);
      },
      reattach: async () => (host.qemu?.isAlive ? host.qemu.connect(true) : null),
      forget: () => undefined,
      recordRole: (_paths, p: QemuProcess, role) => { if (host.qemu && host.qemu.pid === p.pid) host.qemu.record.role = role; },
      frozen: () => (host.qemu?.isAlive && host.qemu.frozen ? { pid: host.qemu.pid } : null),
      signal: (pid, sig) => { const q = host.qemu; if (!q || q.pid !== pid) return; if (sig === 'SIGKILL') q.die(); else if (sig === 'SIGCONT') q.frozen = false; },
    };
    const exec: Exec = async (cmd, args) => {
      await new Promise((r) => setTimeout(r, 1));
      if (!this.alive) throw new Error('agent process is dead');
      const q = host.qemu?.isAlive ? host.qemu : null;
      if (cmd === 'ss') {
        const connected = !!q && (q.partner !== null || q.job !== null || q.incoming) && !q.severed;
        if (args.includes('-K')) { if (q) q.sever(); return { stdout: '', stderr: '' }; }
        return { stdout: connected ? 'ESTAB 0 0 x y\n' : '', stderr: '' };
      }
      if (cmd === 'ip' && args[0] === 'link' && args[1] === 'set' && q) {
        if (args.includes('down')) q.tapUp = false;
        else if (args.includes('master')) q.tapUp = true;
        return { stdout: '', stderr: '' };
      }
      if (cmd.endsWith('qemu-img') && args[0] === 'info') return { stdout: JSON.stringify({ 'virtual-size': 64 * 1024 * 1024 }), stderr: '' };
      return { stdout: '', stderr: '' };
    };
    const logTail = (path: string): LogReader => {
      let off = host.console.length;
      const isConsole = path.endsWith('serial.log') || path.includes('serial');
      return {
        skipToEnd: () => { off = host.console.length; },
        firstNewMatch: (re) => {
          if (!isConsole) return null;
          const lines = host.console.slice(off);
          off = host.console.length;
          return lines.find((l) => re.test(l)) ?? null;
        },
      };
    };
    this.vm = new VmController({
      config: this.c, vm: this.c.vms[0]!, store: this.store, gate: this.gate,
      peer: { call: (method, path, body, timeoutMs) => this.rpc(method, path, body, timeoutMs) },
      peerView: () => this.heartbeat.view(), heardPeerSinceStart: () => this.heardPeer,
      hostProbe: () => this.hostProbe(), features: { coloCompareNotifyDev: false } as never,
      exec, receivedBytes: { onLocalPort: async () => null } as never, clock, log: this.log, metrics: new Metrics(), agentStartMono: startMono,
      qemuProcesses: procs, logTail,
    });
  }

  /** Starts the process (its code runs as this.proc's). */
  start(): Promise<void> { return this.proc.run(() => this.boot()); }

  private async boot(): Promise<void> {
    await this.vm.init();
    if (!this.alive) return;
    await this.heartbeat.start();
    this.loop = setInterval(() => this.kick(), this.c.heartbeat.interval_ms);
  }

  private kick(): void {
    if (!this.alive) return;
    this.vm.fenceWatch();
    void this.vm.tick();
    const vms = new Map([[VM, this.vm]]);
    this.host.fencerControl = fencerControl(this.c, vms);
    this.host.fencerPulse = agentPulse(this.host.fencerControl, vms, this.heartbeat.view(), this.gate, performance.now());
  }

  /** The process dies: nothing it started goes on touching the world. Its QEMU keeps running. */
  crash(): void {
    if (!this.alive) return;
    this.alive = false;
    this.proc.kill();
    if (this.loop) clearInterval(this.loop);
    this.heartbeat.stop();
    this.gate.stop();
    this.vm.detach();
    this.host.qemu?.closeConnections();
  }

  private hostProbe(): Promise<'answered' | 'silent'> {
    const h = this.host.id, p = other(h);
    const up = this.w.net.both(h, p, 'mgmt') || this.w.net.both(h, p, 'repl');
    return new Promise((r) => setTimeout(() => r(up ? 'answered' : 'silent'), up ? 1 : 250));
  }

  /** Peer RPC (peer/client.ts semantics): each address in turn; an answered error is final. */
  private async rpc<T>(method: string, path: string, body: unknown, timeoutMs: number): Promise<T> {
    if (!this.alive) throw new PeerRpcError('agent process is dead', null);
    const h = this.host.id, p = other(h);
    let last: unknown;
    for (const net of ['repl', 'mgmt'] as const) {
      try {
        return await this.w.net.exchange(`${method} ${path}`, h, p, net, () => !!this.w.agents[p]?.alive, () => this.w.agents[p]!.serve(path, body), timeoutMs, 1000) as T;
      } catch (e) {
        if (e instanceof NetTimeout || e instanceof NetRefused) { last = e; continue; }
        throw new PeerRpcError(`peer ${method} ${path} → 409: ${errorMessage(e)}`, 409, e);
      }
      if (!this.alive) break;
    }
    throw new PeerRpcError(`peer unreachable for ${method} ${path}: ${errorMessage(last)}`, null, last);
  }

  /** The peer-RPC routes of api/routes.ts. */
  async serve(path: string, body: unknown): Promise<unknown> {
    await this.proc.running(); // the request waits on the socket while the process is stopped
    if (!this.alive) throw new Error('agent process is dead');
    return this.proc.run(() => this.route(path, body));
  }

  private async route(path: string, body: unknown): Promise<unknown> {
    const b = (body ?? {}) as Record<string, unknown>;
    if (path.endsWith('/prepare')) {
      return this.vm.prepareSecondary({ epoch: b.epoch as number, sizeBytes: b.sizeBytes as number, primary: b.primary as string, protection: b.protection as string | undefined });
    }
    if (path.endsWith('/release')) { await this.vm.release(String(b.reason ?? ''), b.epoch as number | undefined); return { released: true }; }
    if (path.endsWith('/takeover')) { this.vm.requestTakeover(String(b.reason ?? ''), b.epoch as number | undefined); return { accepted: true }; }
    throw new FtkvmError('NOT_FOUND', path);
  }
}
