// The agent: wires configuration, QEMU probe, durable state, heartbeats, the promotion gate,
// one controller per VM and the HTTP API. All I/O comes in through `AgentDeps`.
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { createServer as createHttpServer, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { Config } from './config/schema.ts';
import { parseHostPort } from './config/schema.ts';
import { peerApiPort, peerHeartbeatPort } from './config/load.ts';
import type { Logger } from './log/logger.ts';
import { Metrics } from './api/metrics.ts';
import { createRouter } from './api/http.ts';
import { buildRoutes } from './api/routes.ts';
import { HeartbeatService, type PeerView } from './peer/heartbeat.ts';
import { PeerClient } from './peer/client.ts';
import { probeHost, type Reachability } from './peer/reachability.ts';
import { probeQemu, QemuNotColoCapableError, type ProbeResult } from './qemu/probe.ts';
import { StateStore } from './state/store.ts';
import type { Clock } from './util/clock.ts';
import type { Exec } from './util/exec.ts';
import { FtkvmError, errorMessage } from './util/errors.ts';
import { TCG_SHIM_TRACE_ARGS, qemuEnv } from './qemu/lab.ts';
import { TwoNodeGate, type PromotionGate, type WitnessStatus } from './colo/gate.ts';
import { WitnessGate } from './witness/client.ts';
import { etcdSettings, etcdTransport } from './witness/etcd.ts';
import { readSecret } from './util/secret.ts';
import { ReceivedBytes } from './colo/replica-health.ts';
import { VmController, type VmStatus } from './colo/vm.ts';
import { VERSION, COMMIT } from './version.ts';
import { OperationRegistry } from './ops/operations.ts';
import { agentPulse, fencerControl } from './fence/publish.ts';
import { fencerPaths, hrMono, writeControl, writePulse } from './fence/files.ts';
import { ensureFencer } from './fence/process.ts';
import { DrShipper } from './dr/shipper.ts';

export interface AgentDeps {
  config: Config;
  configPath: string;
  log: Logger;
  clock: Clock;
  exec: Exec;
  /** Builds the witness gate (witness/client.ts); undefined → two-node gate. */
  makeGate?: (c: Config, log: Logger) => PromotionGate;
}

export interface HealthReport {
  healthy: boolean;
  node: string;
  problems: { subject: string; reason: string }[];
  warnings: { subject: string; reason: string }[];
}

export interface StatusReport {
  node: string;
  agent: { version: string; commit: string; startedAt: number; uptimeS: number; configPath: string; qemu: { binary: string; version: string } | null };
  peer: { name: string } & PeerView;
  witness: WitnessStatus;
  vms: VmStatus[];
}

export class Agent {
  readonly d: AgentDeps;
  readonly c: Config;
  readonly log: Logger;
  readonly metrics = new Metrics();
  readonly controllers = new Map<string, VmController>();
  private readonly shippers: DrShipper[] = [];
  private token = '';
  private store!: StateStore;
  private heartbeat!: HeartbeatService;
  peer!: PeerClient;
  gate!: PromotionGate;
  ops!: OperationRegistry;
  private probe: ProbeResult | null = null;
  private server: Server | undefined;
  private loop: NodeJS.Timeout | undefined;
  private startedAt = 0;
  private startMono = 0;
  private heardPeer = false;
  private hostProbeCache: { at: number; p: Promise<Reachability> } | undefined;

  constructor(d: AgentDeps) {
    this.d = d;
    this.c = d.config;
    this.log = d.log;
  }

  readToken(): string { return this.token; }

  async start(): Promise<void> {
    const c = this.c;
    this.startedAt = this.d.clock.now();
    this.startMono = this.d.clock.mono();
    this.token = readSecret(c.api.token_file);
    // Separate secrets where configured: the pair's heartbeat key, this node's witness token.
    const heartbeatKey = c.heartbeat.key_file ? readSecret(c.heartbeat.key_file) : this.token;
    const witnessToken = c.witness.token_file ? readSecret(c.witness.token_file) : null;
    if (c.qemu.tcg_lab_shim) {
      if (!existsSync(c.qemu.tcg_lab_shim)) throw new FtkvmError('TCG_LAB_SHIM_MISSING', `qemu.tcg_lab_shim: ${c.qemu.tcg_lab_shim} does not exist (build it from test/tcg-shim, or remove the option)`);
      this.log.warn('TEST-ONLY lab mode: QEMU runs under TCG with the COLO shim preloaded and its trace events enabled (qemu.tcg_lab_shim); never use it in production', { shim: c.qemu.tcg_lab_shim, traceArgs: TCG_SHIM_TRACE_ARGS.join(' ') });
    }
    this.probe = await probeQemu(c.qemu.binary, c.qemu.accelerator, qemuEnv(c.qemu), this.log);
    if (this.probe.problems.length > 0) throw new QemuNotColoCapableError(this.probe);
    this.store = new StateStore(c.state_dir, c.node.name);
    this.gate = this.d.makeGate ? this.d.makeGate(c, this.log.child('witness'))
      : c.witness.etcd ? etcdGate(c, c.witness.etcd, this.d.clock, this.log.child('witness'))
      : c.witness.url ? new WitnessGate({ url: c.witness.url, node: c.node.name, leaseMs: c.witness.lease_ms, token: () => witnessToken ?? this.token, caFile: c.witness.ca_file, clock: this.d.clock, log: this.log.child('witness') })
        : new TwoNodeGate();
    if (this.gate.mode === 'two-node') this.log.warn('two-node mode: no witness; a network partition between the hosts can make both run a VM (split brain)');
    this.peer = new PeerClient({
      addresses: c.peer.addresses, port: peerApiPort(c), token: () => this.token,
      tls: c.api.tls ? { caFile: c.api.tls.ca_file } : undefined,
      preferred: () => this.preferredPaths(),
    });
    this.heartbeat = new HeartbeatService({
      node: c.node.name, peer: c.peer.name, peerAddresses: c.peer.addresses, peerPort: peerHeartbeatPort(c),
      listenAddress: c.heartbeat.listen_address, listenPort: c.heartbeat.port,
      intervalMs: c.heartbeat.interval_ms, timeoutMs: c.heartbeat.timeout_ms, key: heartbeatKey,
      previousKey: c.heartbeat.previous_key_file ? readSecret(c.heartbeat.previous_key_file) : undefined,
      clock: this.d.clock, log: this.log.child('heartbeat'),
      summaries: () => Object.fromEntries([...this.controllers].map(([n, v]) => [n, v.summary()])),
      onChange: (view) => { if (view.alive) this.heardPeer = true; this.kick(); },
    });
    const receivedBytes = new ReceivedBytes(this.d.exec, () => this.d.clock.mono());
    for (const vm of c.vms) {
      this.controllers.set(vm.name, new VmController({
        config: c, vm, store: this.store, gate: this.gate, peer: this.peer,
        peerView: () => this.heartbeat.view(), heardPeerSinceStart: () => this.heardPeer,
        hostProbe: () => this.hostProbe(), features: this.probe.features,
        exec: this.d.exec, receivedBytes, clock: this.d.clock, log: this.log, metrics: this.metrics, agentStartMono: this.startMono,
      }));
    }
    for (const vm of c.vms) {
      if (!vm.dr) continue;
      this.shippers.push(new DrShipper(this.controllers.get(vm.name)!.c, vm.dr, c.api.token_file, {
        shipped: (v, s) => this.metrics.drShipped(v, s.mode, s.bytesShipped),
        failed: (v) => this.metrics.drFailed(v),
      }));
    }
    this.metrics.setSnapshot(() => this.gaugeSnapshot());
    this.ops = new OperationRegistry({
      config: c, log: this.log.child('ops'), metrics: this.metrics, peer: this.peer,
      peerView: () => this.heartbeat.view(), vm: (n) => this.controllers.get(n), now: () => this.d.clock.now(),
    });
    // Re-attach before anything can decide to start a VM.
    for (const v of this.controllers.values()) await v.init();
    await this.listen();
    await this.heartbeat.start();
    if (this.gate instanceof WitnessGate) {
      // Outlives this agent: keeps renewing the leases through an agent restart, and freezes a
      // primary whose lease lapses while no agent vouches for the peer (fence/fencer.ts).
      this.fencer = { pid: 0, lastControl: '' };
      this.publishToFencer(); // starts it (and restarts it should it die)
    } else {
      // No witness (any more): a fencer left from a witness configuration must not keep renewing
      // against it, nor freeze a guest when that fails.
      rmSync(fencerPaths(c.state_dir).control, { force: true });
    }
    this.loop = setInterval(() => this.kick(), c.heartbeat.interval_ms);
    for (const s of this.shippers) s.start();
    this.log.info('agent started', { node: c.node.name, peer: c.peer.name, vms: c.vms.length, version: VERSION, commit: COMMIT, api: c.api.listen });
  }

  private probeTimeoutMs(): number {
    return Math.max(50, Math.min(300, Math.floor(this.c.heartbeat.timeout_ms / 2)));
  }

  private kick(): void {
    // Silence approaching the timeout: probe the peer host now, so the answer is ready when
    // the timeout expires (a dead host only answers with silence: the probe's full timeout).
    const silentMs = this.heartbeat?.view().lastHeardMs;
    if (silentMs !== null && silentMs !== undefined && silentMs > this.c.heartbeat.timeout_ms - this.probeTimeoutMs()) void this.hostProbe();
    for (const v of this.controllers.values()) {
      v.fenceWatch(); // never waits behind tick()
      void v.tick();
    }
    this.publishToFencer();
  }

  private fencer: { pid: number; lastControl: string; checkedAt?: number } | undefined;

  /** What the fencer needs: what to keep (when it changes), and every step the agent's word on peer and leases. */
  private publishToFencer(): void {
    if (!this.fencer) return;
    const c = this.c;
    try {
      // A fencer that died (or was killed to run a new binary) is started again within seconds.
      const mono = this.d.clock.mono();
      if (this.fencer.checkedAt === undefined || mono - this.fencer.checkedAt > 5000) { this.fencer.checkedAt = mono; this.fencer.pid = ensureFencer(c.state_dir, this.log.child('fence')); }
      const control = fencerControl(c, this.controllers);
      const text = JSON.stringify(control);
      if (text !== this.fencer.lastControl) { writeControl(c.state_dir, control); this.fencer.lastControl = text; }
      writePulse(c.state_dir, agentPulse(control, this.controllers, this.heartbeat.view(), this.gate, hrMono()));
    } catch (e) {
      this.log.error('lease fencer: could not start it or update its files', { error: errorMessage(e) });
    }
  }

  private preferredPaths(): number[] {
    const paths = this.heartbeat?.view().paths ?? [];
    return paths.map((p, i) => ({ i, age: p.lastHeardMs ?? Infinity })).sort((a, b) => a.age - b.age).map((x) => x.i);
  }

  /** Is the peer host up? Cached briefly: several VMs ask in the same control step. */
  private hostProbe(): Promise<Reachability> {
    const now = this.d.clock.mono();
    // A probe started up to (its timeout + one interval) ago is fresh enough: that is what lets
    // the prefetch in kick() be used when the heartbeat timeout expires.
    if (!this.hostProbeCache || now - this.hostProbeCache.at > this.probeTimeoutMs() + this.c.heartbeat.interval_ms) {
      this.hostProbeCache = { at: now, p: probeHost(this.c.peer.addresses, peerApiPort(this.c), this.probeTimeoutMs()) };
    }
    return this.hostProbeCache.p;
  }

  private async listen(): Promise<void> {
    const c = this.c;
    const handler = createRouter(buildRoutes(this), {
      token: () => this.token, readAllow: c.api.read_allow, maxBodyBytes: c.api.max_body_bytes,
      onError: (e, req) => this.log.error('API handler error', { path: req.url, error: errorMessage(e) }),
    });
    const { host, port } = parseHostPort(c.api.listen)!;
    const server = c.api.tls
      ? createHttpsServer({ cert: readFileSync(c.api.tls.cert_file), key: readFileSync(c.api.tls.key_file) }, (q, s) => void handler(q, s))
      : createHttpServer((q, s) => void handler(q, s));
    server.headersTimeout = 10_000;
    server.requestTimeout = 30_000;
    server.maxHeadersCount = 100;
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e) => reject(new FtkvmError('API_LISTEN_FAILED', `cannot listen on ${c.api.listen}: ${e.message}`, { cause: e })));
      server.listen(port, host, () => resolve());
    });
    server.on('error', (e) => this.log.error('API server error', { error: e.message }));
    this.server = server;
  }

  async stop(): Promise<void> {
    if (this.loop) clearInterval(this.loop);
    this.heartbeat?.stop();
    this.gate?.stop();
    await Promise.all(this.shippers.map((s) => s.stop().catch(() => undefined)));
    for (const v of this.controllers.values()) v.detach();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    this.server?.closeAllConnections?.();
    await this.peer?.close();
    this.log.info('agent stopped; QEMU processes keep running');
  }

  vm(name: string): VmController | undefined { return this.controllers.get(name); }

  health(): HealthReport {
    const problems: HealthReport['problems'] = [];
    const warnings: HealthReport['warnings'] = [];
    const view = this.heartbeat.view();
    if (!view.alive) {
      problems.push({ subject: 'peer', reason: view.lastHeardMs === null
        ? `peer ${this.c.peer.name} never heard since agent start`
        : `peer ${this.c.peer.name} silent on all ${view.paths.length} heartbeat paths for ${view.lastHeardMs} ms` });
    } else {
      for (const [i, p] of view.paths.entries()) if (!p.up) warnings.push({ subject: `path/${i}`, reason: `heartbeat path ${i} (${p.address}) silent${p.lastHeardMs !== null ? ` for ${p.lastHeardMs} ms` : ''}: redundancy reduced` });
    }
    const w = this.gate.status();
    if (w.mode === 'witness' && !w.reachable) problems.push({ subject: 'witness', reason: `witness ${w.url} unreachable${w.error ? ': ' + w.error : ''}` });
    if (w.mode === 'two-node') warnings.push({ subject: 'witness', reason: 'two-node mode: no witness, not protected against network partitions' });
    for (const v of this.controllers.values()) {
      const s = v.status();
      if (!v.isProtected()) problems.push({ subject: `vm/${s.name}`, reason: `${s.state} (${s.role}): ${s.reason}` });
      if (s.sick) problems.push({ subject: `vm/${s.name}`, reason: `replica not trusted: ${s.sick}` });
      if (s.dr?.shipping) {
        if (s.dr.rpoS === null || s.dr.rpoS > s.dr.rpoTargetS) warnings.push({ subject: `dr/${s.name}`, reason: `${s.dr.rpoS === null ? 'no recovery point at the DR site yet' : `newest recovery point is ${s.dr.rpoS} s old`} (rpo_target_s ${s.dr.rpoTargetS})${s.dr.lastError ? `; last error: ${s.dr.lastError.message}` : ''}` });
      }
      if (s.brokenDevices.length) problems.push({ subject: `vm/${s.name}`, reason: `virtio device broken in this node's QEMU: ${s.brokenDevices.join(', ')}` });
    }
    return { healthy: problems.length === 0, node: this.c.node.name, problems, warnings };
  }

  status(): StatusReport {
    const now = this.d.clock.now();
    return {
      node: this.c.node.name,
      agent: {
        version: VERSION, commit: COMMIT, startedAt: this.startedAt, uptimeS: Math.round((now - this.startedAt) / 1000), configPath: this.d.configPath,
        qemu: this.probe ? { binary: this.probe.binary, version: `${this.probe.version.major}.${this.probe.version.minor}.${this.probe.version.micro}` } : null,
      },
      peer: { name: this.c.peer.name, ...this.heartbeat.view() },
      witness: this.gate.status(),
      vms: [...this.controllers.values()].map((v) => v.status()),
    };
  }

  private gaugeSnapshot() {
    const view = this.heartbeat.view();
    const w = this.gate.status();
    return {
      peerUp: view.alive,
      heartbeatRejected: this.heartbeat.rejected,
      heartbeatStale: this.heartbeat.stale,
      paths: view.paths.map((p, index) => ({ index, address: p.address, up: p.up, rttMs: p.rttMs })),
      witnessUp: w.mode === 'witness' ? !!w.reachable : null,
      vms: [...this.controllers.values()].map((v) => {
        const s = v.status();
        return { name: s.name, state: s.state, protected: s.protected, epoch: s.epoch, resyncRemaining: s.resync ? s.resync.bytesTotal - s.resync.bytesDone : null,
          resyncMode: s.resync?.mode ?? null, resyncPlanned: s.resync?.plannedBytes ?? null,
          drRpoS: s.dr?.shipping ? s.dr.rpoS : null, drRpoTargetS: s.dr?.shipping ? s.dr.rpoTargetS : null };
      }),
    };
  }

  peerStateFile() { return this.store.snapshot(); }
}

/** The witness protocol on etcd (witness/etcd.ts): the same gate, another transport. */
function etcdGate(c: Config, e: NonNullable<Config['witness']['etcd']>, clock: Clock, log: Logger): WitnessGate {
  const transport = etcdTransport(etcdSettings(e));
  return new WitnessGate({ url: transport.describe(), node: c.node.name, leaseMs: c.witness.lease_ms, token: () => '', clock, log, transport });
}
