// A real ftkvm pair on the network-namespace testbed: two agent processes (the built single
// executable) with generated configs, real QEMU under TCG, the real test guest.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { execFile, execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { request } from 'undici';
import { stringify } from 'yaml';
import { sha256 } from '../agent/src/witness/credentials.ts';
import { EtcdCluster } from './etcd.ts';
import { NetnsTestbed } from './netns.ts';
import { AGENT_BIN, parseSerial, testGuest } from './guest.ts';
import { TxnClient } from './traffic.ts';
import type { StatusReport, HealthReport } from '../agent/src/agent.ts';
import type { VmStatus } from '../agent/src/colo/vm.ts';
import { QmpClient } from '../agent/src/qmp/client.ts';
import { unixSocketConnector } from '../agent/src/qmp/transport.ts';

export type H = 'A' | 'B';
/** QEMU arguments that make the TCG shim see each dirty-bitmap sync and RAM-cache flush. */
export const other = (h: H): H => (h === 'A' ? 'B' : 'A');
export const TOKEN = 'test-token-0123456789abcdef';
export const HEARTBEAT_KEY = 'lab-pair-heartbeat-key-0123456789';
export const LAB_PAIR = 'lab';
/** Each host's own token at the witness. */
export const witnessToken = (h: 'A' | 'B' | 'D' | 'X') => `witness-token-of-host${h}-0123456789`;
/** hostX: a node of another pair at the same witness (the tests use its credentials as an intruder's). */
export const OTHER_PAIR = 'otherpair';

export interface VmSpec { name: string; vcpus?: number; memoryMib?: number; guestIp: number; basePort: number; mac?: string; preferred?: H; extraAppend?: string; probe?: { request?: string; counter?: boolean } }
export interface CliResult { code: number; stdout: string; stderr: string }
export interface PairOptions {
  vms: VmSpec[];
  checkpointDelayMs?: number;
  witness?: boolean;          // run `ftkvm-agent witness` in the witness namespace
  /** With `witness`: the lease store is a 3-member etcd cluster in the witness namespace instead. */
  witnessBackend?: 'embedded' | 'etcd';
  /** witness.lease_ms (default 2000 in the lab). */
  leaseMs?: number;
  heartbeat?: { interval_ms?: number; timeout_ms?: number };
  colo?: Record<string, unknown>;
  startupPeerWaitMs?: number;
  diskMib?: number;
  /** Host A only, with a peer that does not exist (addresses that never answer). */
  peerless?: boolean;
  /** Raw disk images filled with this many MiB of random data (a resync then has real work). */
  randomDiskMib?: number;
  /** Raw sparse disk images of sizeMib whose first filledMib hold random data (bench/reprotect). */
  sparseDisk?: { sizeMib: number; filledMib: number };
  /** Disaster recovery: every VM ships recovery points to `ftkvm-agent dr-target` on the DR host (startDrTarget). */
  dr?: { intervalS: number; keep?: number; bandwidthMbit?: number };
}

export class AgentPair {
  readonly tb: NetnsTestbed;
  readonly dir: string;
  readonly o: PairOptions;
  private agents: Partial<Record<H, ChildProcess>> = {};
  private witnessProc: ChildProcess | undefined;
  private etcd: EtcdCluster | undefined;
  private drProc: ChildProcess | undefined;

  constructor(index: number, o: PairOptions) {
    this.tb = new NetnsTestbed(index);
    this.dir = `/tmp/ftkvm-e2e-${index}`;
    this.o = o;
  }

  hostDir(h: H): string { return join(this.dir, h); }
  configPath(h: H): string { return join(this.hostDir(h), 'agent.yaml'); }
  stateDir(h: H): string { return join(this.hostDir(h), 'state'); }
  agentLog(h: H): string { return join(this.hostDir(h), 'agent.log'); }
  serialLog(h: H, vm: string): string { return join(this.stateDir(h), 'vms', vm, 'serial.log'); }
  apiBase(h: H): string { return `http://${this.tb.addr[h].mgmt}:7480`; }
  guestIp(vm: string): string { return this.tb.guestIp(this.o.vms.find((v) => v.name === vm)!.guestIp); }

  async setup(): Promise<void> {
    const g = testGuest();
    await this.tb.up();
    rmSync(this.dir, { recursive: true, force: true });
    for (const h of ['A', 'B'] as H[]) {
      const d = this.hostDir(h);
      mkdirSync(join(d, 'images'), { recursive: true });
      writeFileSync(join(d, 'token'), TOKEN + '\n', { mode: 0o600 });
      // Separate secrets, as the roles provision them: the pair's heartbeat key, each node's witness token.
      writeFileSync(join(d, 'heartbeat.key'), HEARTBEAT_KEY + '\n', { mode: 0o600 });
      writeFileSync(join(d, 'witness-token'), witnessToken(h) + '\n', { mode: 0o600 });
      for (const vm of this.o.vms) {
        if (this.o.sparseDisk) {
          const img = join(d, 'images', `${vm.name}.img`);
          execFileSync('truncate', ['-s', `${this.o.sparseDisk.sizeMib}M`, img]);
          if (this.o.sparseDisk.filledMib > 0) execFileSync('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', `count=${this.o.sparseDisk.filledMib}`, 'conv=notrunc', 'status=none']);
          execFileSync('dd', ['if=/dev/zero', `of=${img}`, 'bs=4096', 'count=2', 'conv=notrunc', 'status=none']);
        } else if (this.o.randomDiskMib) {
          execFileSync('dd', ['if=/dev/urandom', `of=${join(d, 'images', `${vm.name}.img`)}`, 'bs=1M', `count=${this.o.randomDiskMib}`, 'status=none']);
          // the guest's counters live in the first sectors: start them at zero
          execFileSync('dd', ['if=/dev/zero', `of=${join(d, 'images', `${vm.name}.img`)}`, 'bs=4096', 'count=2', 'conv=notrunc', 'status=none']);
        } else {
          execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(d, 'images', `${vm.name}.qcow2`), `${this.o.diskMib ?? 64}M`]);
        }
      }
      const o = other(h);
      const peer = this.o.peerless
        ? { name: `host${o}`, addresses: ['192.0.2.1', '192.0.2.2'], replication_address: '192.0.2.1' } // TEST-NET-1: nobody there
        : { name: `host${o}`, addresses: [this.tb.addr[o].repl, this.tb.addr[o].mgmt], replication_address: this.tb.addr[o].repl };
      const cfg = {
        node: { name: `host${h}`, replication_address: this.tb.addr[h].repl },
        peer,
        heartbeat: { key_file: join(d, 'heartbeat.key'), ...this.o.heartbeat },
        api: { listen: `${this.tb.addr[h].mgmt}:7480`, token_file: join(d, 'token') },
        qemu: {
          // test-only lab mode: the TCG COLO shim and the trace events it hooks (agent/src/qemu/lab.ts)
          accelerator: 'tcg', tcg_lab_shim: g.tcgShim,
        },
        state_dir: this.stateDir(h),
        colo: { checkpoint_delay_ms: this.o.checkpointDelayMs ?? 2000, startup_peer_wait_ms: this.o.startupPeerWaitMs ?? 3000, resync_retry_min_ms: 1000, ...this.o.colo },
        witness: !this.o.witness ? { two_node_mode: true }
          : this.o.witnessBackend === 'etcd' ? { etcd: { endpoints: this.etcdCluster().endpoints, pair: LAB_PAIR }, lease_ms: this.o.leaseMs ?? 2000 }
            : { url: `http://${this.tb.addr.W.mgmt}:7490`, lease_ms: this.o.leaseMs ?? 2000, token_file: join(d, 'witness-token') },
        log_level: 'debug',
        vms: this.o.vms.map((v) => ({
          name: v.name, memory_mib: v.memoryMib ?? 256, vcpus: v.vcpus ?? 1,
          disk: this.o.randomDiskMib || this.o.sparseDisk ? { path: join(d, 'images', `${v.name}.img`), format: 'raw' } : { path: join(d, 'images', `${v.name}.qcow2`) },
          boot: { kernel: g.kernel, initrd: g.initrd, append: `${g.append} ftkvm.ip=${this.tb.guestIp(v.guestIp)}/24${v.extraAppend ? ' ' + v.extraAppend : ''}` },
          nic: { bridge: this.tb.guestBridge, mac: v.mac ?? `52:54:00:77:${(v.guestIp & 0xff).toString(16).padStart(2, '0')}:10` },
          base_port: v.basePort,
          preferred_primary: `host${v.preferred ?? 'A'}`,
          probe: { address: this.tb.guestIp(v.guestIp), port: 7000, request: 'inc', counter: true, ...v.probe },
          ...(this.o.dr ? { dr: { target: this.drUrl(), token_file: join(d, 'token'), interval_s: this.o.dr.intervalS, keep: this.o.dr.keep ?? 4, ...(this.o.dr.bandwidthMbit ? { bandwidth_mbit: this.o.dr.bandwidthMbit } : {}) } } : {}),
        })),
      };
      writeFileSync(this.configPath(h), stringify(cfg));
    }
  }

  drDir(): string { return join(this.dir, 'D'); }
  drUrl(): string { return `http://${this.tb.addr.D.mgmt}:7610`; }
  drLog(): string { return join(this.drDir(), 'dr-target.log'); }

  /** `ftkvm-agent dr-target` on the DR host (netns D): the pair's VMs, booted there on its br0 (the same LAN). */
  startDrTarget(): ChildProcess {
    const d = this.drDir(), g = testGuest();
    mkdirSync(d, { recursive: true });
    writeFileSync(join(d, 'token'), TOKEN + '\n', { mode: 0o600 });
    writeFileSync(join(d, 'witness-token'), witnessToken('D') + '\n', { mode: 0o600 });
    const cfg = {
      node: { name: 'hostD' },
      listen: `${this.tb.addr.D.mgmt}:7610`,
      token_file: join(d, 'token'),
      data_dir: join(d, 'data'),
      qemu: { accelerator: 'tcg' },
      ...(this.o.witness && this.o.witnessBackend !== 'etcd' ? { witness: { url: `http://${this.tb.addr.W.mgmt}:7490`, token_file: join(d, 'witness-token'), lease_ms: this.o.leaseMs ?? 2000 } } : {}),
      log_level: 'debug',
      vms: this.o.vms.map((v) => ({
        name: v.name, memory_mib: v.memoryMib ?? 256, vcpus: v.vcpus ?? 1,
        boot: { kernel: g.kernel, initrd: g.initrd, append: `${g.append} ftkvm.ip=${this.tb.guestIp(v.guestIp)}/24${v.extraAppend ? ' ' + v.extraAppend : ''}` },
        nic: { bridge: this.tb.guestBridge, mac: v.mac ?? `52:54:00:77:${(v.guestIp & 0xff).toString(16).padStart(2, '0')}:10` },
        // 'get' reads the durable counter: a probe changes nothing in the copy it checks
        probe: { address: this.tb.guestIp(v.guestIp), port: 7000, request: 'get' },
      })),
    };
    writeFileSync(join(d, 'dr-target.yaml'), stringify(cfg));
    const out = openSync(this.drLog(), 'a');
    this.drProc = this.tb.spawnIn('D', AGENT_BIN, ['dr-target', '--config', join(d, 'dr-target.yaml')], { stdio: ['ignore', out, out] });
    closeSync(out);
    return this.drProc;
  }

  killDrTarget(): void { this.drProc?.kill('SIGKILL'); this.drProc = undefined; }

  /** A call to the DR target's API with the lab token. */
  async drCall<T = any>(method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs = 10_000): Promise<{ status: number; json: T }> {
    const r = await request(`${this.drUrl()}${path}`, {
      method, headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body), headersTimeout: timeoutMs, bodyTimeout: timeoutMs,
    });
    const text = await r.body.text();
    return { status: r.statusCode, json: (text ? JSON.parse(text) : undefined) as T };
  }

  /** The lab's etcd (witnessBackend 'etcd'): 3 members on the witness's management address. */
  etcdCluster(): EtcdCluster {
    this.etcd ??= new EtcdCluster(3, 2379, { host: this.tb.addr.W.mgmt, dir: join(this.dir, 'W', 'etcd'), spawn: (cmd, args, opts) => this.tb.spawnIn('W', cmd, args, opts) });
    return this.etcd;
  }

  startWitness(): void {
    const d = join(this.dir, 'W');
    mkdirSync(d, { recursive: true });
    if (this.o.witnessBackend === 'etcd') {
      for (let i = 0; i < 3; i++) this.etcdCluster().startMember(i);
      return;
    }
    const out = openSync(join(d, 'witness.log'), 'a');
    // Per-node identity, as the roles set it up: the witness knows each host's token by its digest.
    writeFileSync(join(d, 'credentials.yml'), 'nodes:\n' + (['A', 'B', 'D', 'X'] as const).map((h) => `  host${h}: {pair: ${h === 'X' ? OTHER_PAIR : LAB_PAIR}, token_sha256: ${sha256(witnessToken(h))}}\n`).join(''));
    this.witnessProc = this.tb.spawnIn('W', AGENT_BIN, ['witness', '--listen', `${this.tb.addr.W.mgmt}:7490`, '--data-dir', d, '--credentials', join(d, 'credentials.yml'), '--token-file', join(this.hostDir('A'), 'token')], { stdio: ['ignore', out, out] });
    closeSync(out);
  }

  /** A call to the lab's witness with a bearer token. */
  async witnessCall(method: 'GET' | 'POST', path: string, token: string, body?: unknown): Promise<{ status: number; json: any }> {
    const r = await request(`http://${this.tb.addr.W.mgmt}:7490${path}`, {
      method, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body), headersTimeout: 5000, bodyTimeout: 5000,
    });
    return { status: r.statusCode, json: await r.body.json() };
  }

  killWitness(): void {
    this.witnessProc?.kill('SIGKILL'); this.witnessProc = undefined;
    if (this.etcd) for (let i = 0; i < 3; i++) this.etcd.kill(i);
  }

  startAgent(h: H): ChildProcess {
    const out = openSync(this.agentLog(h), 'a');
    const p = this.tb.spawnIn(h, AGENT_BIN, ['run', '--config', this.configPath(h)], { stdio: ['ignore', out, out] });
    closeSync(out);
    this.agents[h] = p;
    return p;
  }

  agentPid(h: H): number | undefined { return this.agents[h]?.pid; }

  /** SIGKILL the agent process only (its QEMU processes keep running). */
  killAgent(h: H): void {
    const p = this.agents[h];
    if (p?.pid) { try { process.kill(p.pid, 'SIGKILL'); } catch { /* gone */ } }
    this.agents[h] = undefined;
  }

  /** PID of the QEMU for a VM on a host, from the agent's process record. */
  qemuPid(h: H, vm: string): number | null {
    try {
      return (JSON.parse(readFileSync(join(this.stateDir(h), 'vms', vm, 'qemu.json'), 'utf8')) as { pid: number }).pid;
    } catch { return null; }
  }

  killQemu(h: H, vm: string): number | null {
    const pid = this.qemuPid(h, vm);
    if (pid) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
    return pid;
  }

  /** SIGKILL a whole "host": its agent first (so it cannot report anything), then every QEMU and its lease fencer. */
  killHost(h: H): void {
    this.killAgent(h);
    for (const vm of this.o.vms) this.killQemu(h, vm.name);
    const fencer = this.fencerPid(h);
    if (fencer) { try { process.kill(fencer, 'SIGKILL'); } catch { /* gone */ } }
  }

  /** PID of the host's lease fencer (witness mode), from its pid file. */
  fencerPid(h: H): number | null {
    try { return Number(readFileSync(join(this.stateDir(h), 'fencer.pid'), 'utf8').trim()) || null; } catch { return null; }
  }

  async api<T>(h: H, method: 'GET' | 'POST', path: string, body?: unknown, auth = true): Promise<{ status: number; json: T }> {
    const res = await request(`${this.apiBase(h)}${path}`, {
      method, body: body === undefined ? undefined : JSON.stringify(body),
      headers: { 'content-type': 'application/json', ...(auth ? { authorization: `Bearer ${TOKEN}` } : {}) },
      headersTimeout: 5000, bodyTimeout: 5000,
    });
    const text = await res.body.text();
    return { status: res.statusCode, json: (text ? JSON.parse(text) : undefined) as T };
  }

  async status(h: H): Promise<StatusReport | null> {
    try { return (await this.api<StatusReport>(h, 'GET', '/v1/status')).json; } catch { return null; }
  }

  async vmStatus(h: H, vm: string): Promise<VmStatus | null> {
    return (await this.status(h))?.vms.find((v) => v.name === vm) ?? null;
  }

  async health(h: H): Promise<{ status: number; json: HealthReport } | null> {
    try { return await this.api<HealthReport>(h, 'GET', '/health'); } catch { return null; }
  }

  /** Waits until the VM is protected: one host primary+protected, the other secondary. Returns the primary host. */
  async waitProtected(vm: string, timeoutMs = 120_000): Promise<H> {
    let last = '';
    return waitUntil(async () => {
      const [a, b] = await Promise.all([this.vmStatus('A', vm), this.vmStatus('B', vm)]);
      last = `A=${a?.state ?? '?'} B=${b?.state ?? '?'}`;
      if (a?.state === 'protected' && b?.state === 'secondary' && (b.checkpoints.count ?? 0) > 0) return 'A' as H;
      if (b?.state === 'protected' && a?.state === 'secondary' && (a.checkpoints.count ?? 0) > 0) return 'B' as H;
      return undefined;
    }, timeoutMs, () => `VM ${vm} protected (${last})`);
  }

  serial(h: H, vm: string) { return parseSerial(this.serialLog(h, vm)); }

  /** What a VM's QEMU says about itself (run state, COLO, migration, network filters, in order), for failure reports. */
  async inspect(h: H, vm: string): Promise<string> {
    let c: QmpClient | undefined;
    try {
      c = await QmpClient.connect(unixSocketConnector(join(this.stateDir(h), 'vms', vm, 'qmp-observer.sock'), 1000), { handshakeTimeoutMs: 2000, commandTimeoutMs: 3000 });
      const q = c;
      const [st, colo, mig, net] = await Promise.all([
        q.execute('query-status').catch((e) => String(e)), q.execute('query-colo-status').catch((e) => String(e)),
        q.execute<{ status?: string }>('query-migrate').then((m) => m.status).catch((e) => String(e)), q.hmp('info network').catch((e) => String(e)),
      ]);
      return `${h}/${vm}: status ${JSON.stringify(st)} colo ${JSON.stringify(colo)} migrate ${mig}\n${String(net).trim()}\nserial: ${readFileSync(this.serialLog(h, vm), 'utf8').trim().split('\n').slice(-3).join(' | ')}`;
    } catch (e) {
      return `${h}/${vm}: cannot inspect: ${(e as Error).message}`;
    } finally {
      c?.close();
    }
  }

  /**
   * Waits until the guest's TCP service answers (the guest has booted) and, when the VM is
   * protected, for the next checkpoint: the guest kernel creates its TCP timestamp secret on
   * the first connection, and connections opened before a checkpoint has copied it to the
   * replica may not survive a takeover (README, Limits). Tests model a guest that has been
   * up for a while.
   */
  async waitGuestService(vm: string, timeoutMs = 60_000): Promise<void> {
    const c = new TxnClient(this.guestIp(vm));
    const t0 = Date.now();
    try { await c.open(timeoutMs); await c.get(); } finally { c.close(); }
    // Protected again if the replica was rebuilt meanwhile: under TCG a replica that diverged
    // while the guest booted is dropped and rebuilt (README, Limits; seen in CI: "virtio: zero
    // sized buffers" 6 s after a cold start). Then a checkpoint after the first connection.
    await this.waitProtected(vm, 120_000);
    await this.waitCheckpointAfter(vm, t0);
  }

  /**
   * Waits for a checkpoint of the protected VM that completed after `t` (epoch ms). A TCP
   * connection opened before that checkpoint is in both guests' memory with the same
   * numbering; one opened after the last checkpoint before a failover survives that failover
   * but not a second one (README, Limits: QEMU keeps its sequence translation only on the host
   * that took over). Tests and benches that fail a pair twice under one connection model a
   * connection that is older than a checkpoint at the first failover.
   */
  async waitCheckpointAfter(vm: string, t: number, timeoutMs = 30_000): Promise<void> {
    await waitUntil(async () => {
      for (const h of ['A', 'B'] as H[]) {
        const s = await this.vmStatus(h, vm).catch(() => null);
        if (s?.state === 'protected' && (s.checkpoints.lastAt ?? 0) > t) return true;
      }
      return undefined;
    }, timeoutMs, `a checkpoint of ${vm} after ${new Date(t).toISOString()}`, 50);
  }

  /** Runs the agent binary's CLI inside a host namespace against that host's config. */
  cli(h: H, args: string[], timeoutMs = 600_000): Promise<CliResult> {
    return new Promise((resolve) => {
      execFile('ip', ['netns', 'exec', this.tb.ns[h], AGENT_BIN, ...args, '--config', this.configPath(h)],
        { timeout: timeoutMs, env: { ...process.env, NO_COLOR: '1' }, maxBuffer: 16 << 20 },
        (err, stdout, stderr) => resolve({ code: err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0, stdout, stderr }));
    });
  }

  async teardown(): Promise<void> {
    for (const h of ['A', 'B'] as H[]) this.killHost(h);
    this.killWitness();
    this.killDrTarget();
    // QEMUs spawned by killed agents: find them by their state dir on the command line.
    try { execFileSync('pkill', ['-9', '-f', `${this.dir}/`]); } catch { /* none */ }
    await new Promise((r) => setTimeout(r, 300));
    await this.tb.down();
  }
}

export async function waitUntil<T>(f: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs: number, what: string | (() => string), pollMs = 100): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await f();
    if (v !== undefined && v !== false) return v as T;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof what === 'string' ? what : what()}`);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
