// A real etcd cluster on loopback (Debian's etcd-server) for the etcd lease store's tests and
// bench: 1 or 3 members, each its own process and data directory; members can be killed and
// started again; auth set up through the JSON gateway as the ftkvm_etcd role does with etcdctl.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';

export const ETCD_BIN = '/usr/bin/etcd';

export interface EtcdClusterOptions {
  /** Address every member listens on (default 127.0.0.1). */
  host?: string;
  /** Data and logs (default: a new temporary directory). */
  dir?: string;
  /** How a member is started (default: here; the lab starts them in the witness's namespace). */
  spawn?: (cmd: string, args: string[], opts: SpawnOptions) => ChildProcess;
}

export class EtcdCluster {
  readonly dir: string;
  readonly endpoints: string[];
  private readonly peers: string[];
  private readonly procs: (ChildProcess | undefined)[];
  private readonly spawn: NonNullable<EtcdClusterOptions['spawn']>;

  /** Ports basePort + 2i (client) and basePort + 2i + 1 (peer). */
  constructor(readonly size: 1 | 3, readonly basePort: number, o: EtcdClusterOptions = {}) {
    const host = o.host ?? '127.0.0.1';
    this.dir = o.dir ?? mkdtempSync(join(tmpdir(), 'ftkvm-etcd-'));
    this.spawn = o.spawn ?? spawn;
    this.endpoints = Array.from({ length: size }, (_, i) => `http://${host}:${basePort + 2 * i}`);
    this.peers = Array.from({ length: size }, (_, i) => `http://${host}:${basePort + 2 * i + 1}`);
    this.procs = Array.from({ length: size }, () => undefined);
  }

  static available(): boolean { return existsSync(ETCD_BIN); }

  startMember(i: number): void {
    const name = `m${i}`;
    mkdirSync(this.dir, { recursive: true });
    const out = openSync(join(this.dir, `${name}.log`), 'a');
    this.procs[i] = this.spawn(ETCD_BIN, [
      '--name', name, '--data-dir', join(this.dir, name),
      '--listen-client-urls', this.endpoints[i]!, '--advertise-client-urls', this.endpoints[i]!,
      '--listen-peer-urls', this.peers[i]!, '--initial-advertise-peer-urls', this.peers[i]!,
      '--initial-cluster', this.peers.map((p, j) => `m${j}=${p}`).join(','), '--initial-cluster-state', 'new',
      '--initial-cluster-token', `ftkvm-test-${this.basePort}`,
    ], { stdio: ['ignore', out, out] });
    closeSync(out);
  }

  async start(): Promise<void> {
    for (let i = 0; i < this.size; i++) this.startMember(i);
    await this.waitHealthy();
  }

  async waitHealthy(timeoutMs = 20_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      try {
        const r = await request(`${this.endpoints.find((_, i) => this.procs[i])}/health`, { headersTimeout: 1000, bodyTimeout: 1000 });
        const j = (await r.body.json()) as { health?: string };
        if (j.health === 'true') return;
      } catch { /* not yet */ }
      if (Date.now() > end) throw new Error(`etcd not healthy within ${timeoutMs} ms (logs in ${this.dir})`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** PIDs of the running members. */
  pids(): number[] { return this.procs.flatMap((p) => (p?.pid ? [p.pid] : [])); }

  kill(i: number): void { this.procs[i]?.kill('SIGKILL'); this.procs[i] = undefined; }

  /** A gateway call as root (before auth is enabled, or with a root token). */
  async call(path: string, body: unknown, token?: string): Promise<any> {
    const r = await request(`${this.endpoints[0]}${path}`, { method: 'POST', body: JSON.stringify(body), headers: token ? { authorization: token } : {} });
    const j = await r.body.json() as any;
    if (j.error) throw new Error(`${path}: ${j.error}`);
    return j;
  }

  /** Root, and one user per node whose role reads and writes only PREFIX/PAIR/. Then auth on. */
  async enableAuth(prefix: string, nodes: { user: string; password: string; pair: string }[]): Promise<void> {
    const b64 = (s: string) => Buffer.from(s).toString('base64');
    await this.call('/v3/auth/user/add', { name: 'root', password: 'root-password' });
    await this.call('/v3/auth/role/add', { name: 'root' });
    await this.call('/v3/auth/user/grant', { user: 'root', role: 'root' });
    for (const pair of new Set(nodes.map((n) => n.pair))) {
      const key = `${prefix}/${pair}/`;
      await this.call('/v3/auth/role/add', { name: `pair-${pair}` });
      await this.call('/v3/auth/role/grant', { name: `pair-${pair}`, perm: { permType: 'READWRITE', key: b64(key), range_end: b64(key.slice(0, -1) + '0') } });
    }
    for (const n of nodes) {
      await this.call('/v3/auth/user/add', { name: n.user, password: n.password });
      await this.call('/v3/auth/user/grant', { user: n.user, role: `pair-${n.pair}` });
    }
    await this.call('/v3/auth/enable', {});
  }

  stop(): void {
    for (let i = 0; i < this.size; i++) this.kill(i);
    rmSync(this.dir, { recursive: true, force: true });
  }
}
