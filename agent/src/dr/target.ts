// `ftkvm-agent dr-target`: the DR site's agent. Takes in recovery points (dr/store.ts), boots
// test copies isolated from every network (dr/boot.ts), and on a DR failover starts a VM from
// its newest point on the DR site's network after taking its lease at the witness at a new
// epoch (renewed while the VM runs here), so a primary-site host that comes back cannot run
// its older copy. Protocol: dr/protocol.ts.
import { readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { join } from 'node:path';
import { Counter, Gauge, Registry } from 'prom-client';
import { z } from 'zod/v4';
import { bodyField, createRouter, HttpError, parseBody, type Ctx, type Route } from '../api/http.ts';
import { parseHostPort } from '../config/schema.ts';
import type { Logger } from '../log/logger.ts';
import type { Exec } from '../util/exec.ts';
import { errorMessage } from '../util/errors.ts';
import { readSecret } from '../util/secret.ts';
import { httpTransport, type WitnessTransport } from '../witness/client.ts';
import { MAX_EPOCH } from '../witness/lease.ts';
import type { DrTargetConfig, DrVm } from './config.ts';
import { DrStore, DrStoreError } from './store.ts';
import { MAX_PUT_BYTES, type RecoveryPoint } from './protocol.ts';
import { bootPoint, waitGuestAnswers } from './boot.ts';
import { activePid, FailbackSources, type FailbackStage } from './failback.ts';
import { chunkDigests } from '../nbd/checksums.ts';
import type { NbdClient } from '../nbd/client.ts';

const BeginBody = z.object({
  sizeBytes: bodyField.int(1, Number.MAX_SAFE_INTEGER), capturedAt: bodyField.int(0, Number.MAX_SAFE_INTEGER),
  from: bodyField.string(), epoch: bodyField.int(1, MAX_EPOCH), keep: bodyField.int(1, 1000),
});
const CommitBody = z.object({ mode: z.enum(['delta', 'digest', 'full']), bytesShipped: bodyField.int(0, Number.MAX_SAFE_INTEGER) });
const BootBody = z.object({ point: bodyField.string().optional(), timeoutS: bodyField.int(5, 3600).optional(), confirmSiteLost: bodyField.boolean().optional() });
const POINT_ID = /^[0-9a-f-]{36}$/;
const FailbackDigestsBody = z.object({ stage: z.enum(['seed', 'final']), chunkBytes: bodyField.int(65536, 16 * 1024 * 1024) });

/** The witness says another node holds the VM's lease and renews it: that node runs the VM. */
class LeaseHeldError extends Error {}

export interface TestReport { vm: string; point: RecoveryPoint; dataAgeS: number; answeredAfterMs: number; reply: string | null; discarded: true }
export interface ActivateReport {
  vm: string; point: RecoveryPoint; pid: number;
  /** Age of the data the VM restarted from, at activation (the RPO achieved). */
  rpoS: number;
  /** From the request to the guest's first answer. */
  rtoMs: number;
  witness: { epoch: number; holder: string } | null;
  guarantee: string;
}

export class DrTarget {
  readonly store: DrStore;
  private server: Server | undefined;
  private readonly witness: WitnessTransport | null;
  private readonly leaseTimers = new Map<string, NodeJS.Timeout>();
  private readonly registry = new Registry();
  private readonly testsRun: Counter<'vm' | 'result'>;
  private readonly busy = new Set<string>();
  private sweepTimer: NodeJS.Timeout | undefined;
  private readonly sources: FailbackSources;

  constructor(private readonly c: DrTargetConfig, private readonly log: Logger, private readonly exec: Exec) {
    this.sources = new FailbackSources(c.qemu.nbd_binary);
    this.store = new DrStore({ dataDir: c.data_dir, imgBinary: c.qemu.img_binary, nbdBinary: c.qemu.nbd_binary, exec, log });
    const w = c.witness;
    this.witness = w ? httpTransport(w.url, () => readSecret(w.token_file ?? c.token_file), w.ca_file) : null;
    const r = [this.registry], self = this;
    this.testsRun = new Counter({ name: 'ftkvm_dr_tests_total', help: 'DR tests (isolated boots of a recovery point) by result', labelNames: ['vm', 'result'], registers: r });
    new Gauge({ name: 'ftkvm_dr_recovery_points', help: 'Recovery points kept at this DR site', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of c.vms) this.set({ vm: v.name }, self.store.points(v.name).points.length); } });
    new Gauge({ name: 'ftkvm_dr_newest_point_timestamp_seconds', help: 'Capture time of the newest recovery point (its data age is the achieved RPO)', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of c.vms) { const n = self.store.points(v.name).points.at(-1); if (n) this.set({ vm: v.name }, Math.round(n.capturedAt / 1000)); } } });
    new Counter({ name: 'ftkvm_dr_received_bytes_total', help: 'Disk bytes received for recovery points, by how the shipper chose them', labelNames: ['vm', 'mode'], registers: r,
      collect() { this.reset(); for (const [vm, m] of self.store.shippedBytes) for (const [mode, n] of Object.entries(m)) this.inc({ vm, mode }, n); } });
    new Gauge({ name: 'ftkvm_dr_activated', help: '1 when the VM was failed over to this DR site and runs here', labelNames: ['vm'], registers: r,
      collect() { this.reset(); for (const v of c.vms) this.set({ vm: v.name }, self.store.points(v.name).activated ? 1 : 0); } });
  }

  private vmOf(name: string | undefined): DrVm {
    const v = this.c.vms.find((x) => x.name === name);
    if (!v) throw new HttpError(404, 'NO_SUCH_VM', `no VM named "${name ?? ''}" in this DR target's configuration (known: ${this.c.vms.map((x) => x.name).join(', ') || 'none'})`);
    return v;
  }

  private routes(): Route[] {
    const vm = (ctx: Ctx) => this.vmOf(ctx.params.vm).name;
    const id = (ctx: Ctx) => { const i = ctx.params.id!; if (!POINT_ID.test(i)) throw new HttpError(400, 'BAD_POINT', 'not a recovery point id'); return i; };
    const mapErr = async <T>(f: () => Promise<T>): Promise<T> => {
      try { return await f(); } catch (e) {
        if (e instanceof DrStoreError) throw new HttpError(e.status, e.code, e.message);
        throw e;
      }
    };
    return [
      { method: 'GET', path: '/health', access: 'public', handler: () => ({ json: this.health() }) },
      { method: 'GET', path: '/metrics', access: 'read', handler: async () => ({ text: await this.registry.metrics(), contentType: this.registry.contentType }) },
      { method: 'GET', path: '/v1/dr/vms', access: 'read', handler: () => ({ json: this.c.vms.map((v) => this.store.points(v.name)) }) },
      { method: 'GET', path: '/v1/dr/vms/:vm', access: 'read', handler: (ctx) => ({ json: this.store.points(vm(ctx)) }) },
      { method: 'POST', path: '/v1/dr/vms/:vm/points', access: 'write', handler: async (ctx) => {
        const b = parseBody(BeginBody, await ctx.body());
        return { status: 201, json: await mapErr(() => this.store.begin(vm(ctx), b)) };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/points/:id/digests', access: 'write', handler: async (ctx) => {
        const chunk = parseBody(z.object({ chunkBytes: bodyField.int(65536, 16 * 1024 * 1024) }), await ctx.body()).chunkBytes;
        return { bytes: await mapErr(() => this.store.digests(vm(ctx), id(ctx), chunk)) };
      } },
      { method: 'PUT', path: '/v1/dr/vms/:vm/points/:id/data', access: 'write', rawBodyMax: MAX_PUT_BYTES, handler: async (ctx) => {
        const offset = ctx.query.get('offset') === null ? NaN : Number(ctx.query.get('offset'));
        await mapErr(async () => this.store.write(vm(ctx), id(ctx), offset, await ctx.raw()));
        return { json: { ok: true } };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/points/:id/commit', access: 'write', handler: async (ctx) => {
        const b = parseBody(CommitBody, await ctx.body());
        return { json: { point: await mapErr(() => this.store.commit(vm(ctx), id(ctx), b)) } };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/points/:id/abort', access: 'write', handler: async (ctx) => {
        await mapErr(() => this.store.abort(vm(ctx), id(ctx)));
        return { json: { aborted: true } };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/test', access: 'write', handler: async (ctx) => {
        const b = parseBody(BootBody, await ctx.body());
        return { json: await mapErr(() => this.test(this.vmOf(ctx.params.vm), b.point, (b.timeoutS ?? 300) * 1000)) };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/failback/digests', access: 'write', handler: async (ctx) => {
        const b = parseBody(FailbackDigestsBody, await ctx.body());
        return { bytes: await mapErr(async () => chunkDigests(await this.failbackSource(vm(ctx), b.stage), b.chunkBytes)) };
      } },
      { method: 'GET', path: '/v1/dr/vms/:vm/failback/data', access: 'write', handler: async (ctx) => {
        const q = (k: string) => (ctx.query.get(k) === null ? NaN : Number(ctx.query.get(k)));
        const stage = ctx.query.get('stage'), offset = q('offset'), length = q('length');
        if (stage !== 'seed' && stage !== 'final') throw new HttpError(400, 'BAD_STAGE', 'stage must be seed or final');
        if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 1 || length > MAX_PUT_BYTES) throw new HttpError(400, 'BAD_RANGE', `offset and length (1..${MAX_PUT_BYTES}) must be integers`);
        return { bytes: await mapErr(async () => {
          const src = await this.failbackSource(vm(ctx), stage);
          if (offset + length > src.size) throw new DrStoreError(400, 'BAD_RANGE', `${offset}+${length} is outside the ${src.size}-byte disk`);
          return src.read(offset, length);
        }) };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/stop', access: 'write', handler: async (ctx) => {
        const b = parseBody(BootBody, await ctx.body());
        return { json: await mapErr(() => this.stopActive(vm(ctx), (b.timeoutS ?? 60) * 1000)) };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/deactivate', access: 'write', handler: async (ctx) => {
        const b = parseBody(z.object({ to: bodyField.string() }), await ctx.body());
        return { json: await mapErr(() => this.deactivate(vm(ctx), b.to)) };
      } },
      { method: 'POST', path: '/v1/dr/vms/:vm/activate', access: 'write', handler: async (ctx) => {
        const b = parseBody(BootBody, await ctx.body());
        return { json: await mapErr(() => this.activate(this.vmOf(ctx.params.vm), { point: b.point, confirmSiteLost: !!b.confirmSiteLost, timeoutMs: (b.timeoutS ?? 300) * 1000 })) };
      } },
    ];
  }

  health(): { ok: boolean; node: string; vms: { vm: string; points: number; newestAgeS: number | null; activated: boolean }[] } {
    const now = Date.now();
    return {
      ok: true, node: this.c.node.name,
      vms: this.c.vms.map((v) => {
        const p = this.store.points(v.name);
        const n = p.points.at(-1);
        return { vm: v.name, points: p.points.length, newestAgeS: n ? Math.round((now - n.capturedAt) / 1000) : null, activated: !!p.activated };
      }),
    };
  }

  /** One at a time per VM: a test copy and an activation must not meet. */
  private async exclusive<T>(vm: string, what: string, f: () => Promise<T>): Promise<T> {
    if (this.busy.has(vm)) throw new HttpError(409, 'VM_BUSY', `${vm}: a DR test or activation is running`);
    this.busy.add(vm);
    try { return await f(); } finally { this.busy.delete(vm); }
  }

  /** dr-test: boot a copy of a point isolated from every network, wait for the guest's answer, discard the copy. */
  test(vm: DrVm, pointId: string | undefined, timeoutMs: number): Promise<TestReport> {
    return this.exclusive(vm.name, 'test', async () => {
      const tag = `test-${Date.now()}`;
      const dir = this.store.dir(vm.name);
      let booted: Awaited<ReturnType<typeof bootPoint>> | null = null;
      let unpin = () => undefined as void;
      try {
        // Pinned under the store's per-VM queue: no prune commits into this chain while it boots.
        const { point, path } = await this.store.serial(vm.name, async () => { const f = this.store.pointFile(vm.name, pointId); unpin = this.store.pin(vm.name); return f; });
        this.log.info('DR test: booting a copy of a recovery point, isolated', { vm: vm.name, point: point.id, capturedAt: new Date(point.capturedAt).toISOString() });
        booted = await bootPoint({ config: this.c, vm, pointFile: path, dir, tag, network: 'isolated', exec: this.exec, detached: false });
        const a = await waitGuestAnswers(booted.probeAt, vm.probe.request, timeoutMs);
        this.testsRun.inc({ vm: vm.name, result: 'pass' });
        this.log.info('DR test: the copy answered; discarding it', { vm: vm.name, point: point.id, answeredAfterMs: a.afterMs, reply: a.reply });
        return { vm: vm.name, point, dataAgeS: Math.round((Date.now() - point.capturedAt) / 1000), answeredAfterMs: a.afterMs, reply: a.reply, discarded: true };
      } catch (e) {
        this.testsRun.inc({ vm: vm.name, result: 'fail' });
        throw new HttpError(e instanceof HttpError ? e.status : e instanceof DrStoreError ? e.status : 500, 'DR_TEST_FAILED', `${vm.name}: DR test failed: ${errorMessage(e)}`);
      } finally {
        if (booted) await kill(booted.proc);
        rmSync(join(dir, `${tag}.qcow2`), { force: true });
        unpin();
      }
    });
  }

  /** dr-failover: take the lease (or the operator's confirmation), then run the VM here from a point. */
  activate(vm: DrVm, o: { point?: string; confirmSiteLost: boolean; timeoutMs: number }): Promise<ActivateReport> {
    return this.exclusive(vm.name, 'activate', async () => {
      const t0 = performance.now();
      const before = this.store.points(vm.name);
      if (before.activated) throw new HttpError(409, 'DR_ACTIVATED', `${vm.name} already runs at this DR site (since ${new Date(before.activated.at).toISOString()})`);
      // Under the store's per-VM queue: a prune running now finishes first, none starts on this chain after.
      const { point, path } = await this.store.serial(vm.name, async () => this.store.pointFile(vm.name, o.point));
      let lease: { epoch: number; holder: string } | null = null;
      let guarantee: string;
      if (this.witness) {
        try {
          lease = await this.takeLease(vm.name, Math.max(...before.points.map((p) => p.epoch), 0) + 1, Math.min(o.timeoutMs, 120_000));
          guarantee = `the witness granted ${this.c.node.name} the lease at epoch ${lease.epoch}; renewed while the VM runs here, so a primary-site host that restarts cannot start its copy. Not covered: a primary site still running but cut off from the witness (its two hosts keep running the VM while they hear each other): run a DR failover only for a site known lost`;
        } catch (e) {
          // A holder the witness says is alive is never overridden, confirmation or not.
          if (e instanceof LeaseHeldError) throw new HttpError(409, 'LEASE_HELD', `${vm.name}: ${e.message}; nothing was started: the primary site is not lost for this VM`);
          if (!o.confirmSiteLost) throw new HttpError(409, 'CONFIRMATION_REQUIRED', `${vm.name}: the witness did not grant the lease (${errorMessage(e)}); nothing was started. If both primary-site hosts are known down (powered off or fenced), repeat with confirmSiteLost: true`);
          guarantee = `NOT GUARANTEED: the witness was unreachable (${errorMessage(e)}); the operator confirmed the primary site is lost — a primary-site host that comes back with its agent running could start its own copy`;
        }
      } else {
        if (!o.confirmSiteLost) throw new HttpError(409, 'CONFIRMATION_REQUIRED', `${vm.name}: this DR target has no witness configured, so it cannot stop the primary site from running the VM again; nothing was started. If both primary-site hosts are known down (powered off or fenced), repeat with confirmSiteLost: true`);
        guarantee = 'NOT GUARANTEED: no witness; the operator confirmed the primary site is lost — keep its hosts off (or their ftkvm agents stopped) until fail-back';
      }
      const activatedAt = Date.now();
      const unpin = await this.store.serial(vm.name, async () => {
        if (!this.store.manifest(vm.name).points.some((x) => x.id === point.id)) throw new DrStoreError(409, 'NO_RECOVERY_POINT', `${vm.name}: recovery point ${point.id} was dropped meanwhile (keep): ask again`);
        const u = this.store.pin(vm.name); // for as long as the VM runs on this chain
        this.store.markActivated(vm.name, { at: activatedAt, point: point.id, epoch: lease?.epoch ?? null });
        return u;
      });
      this.log.warn('DR FAILOVER: starting the VM at the DR site from a recovery point', { vm: vm.name, point: point.id, dataAgeS: Math.round((activatedAt - point.capturedAt) / 1000), guarantee });
      let booted;
      try {
        booted = await bootPoint({ config: this.c, vm, pointFile: path, dir: this.store.dir(vm.name), tag: 'active', network: 'site', exec: this.exec, detached: true });
      } catch (e) {
        // Nothing runs here: the activation can be asked again (the lease is let lapse).
        this.store.markActivated(vm.name, null);
        clearInterval(this.leaseTimers.get(vm.name));
        this.leaseTimers.delete(vm.name);
        unpin();
        rmSync(join(this.store.dir(vm.name), 'active.qcow2'), { force: true });
        throw new HttpError(500, 'DR_BOOT_FAILED', `${vm.name}: the VM did not start at the DR site: ${errorMessage(e)}`);
      }
      const a = await waitGuestAnswers(booted.probeAt, vm.probe.request, o.timeoutMs);
      const rtoMs = Math.round(performance.now() - t0);
      this.log.info('DR failover: the guest answers at the DR site', { vm: vm.name, pid: booted.pid, rtoMs });
      return { vm: vm.name, point, pid: booted.pid, rpoS: Math.round((activatedAt - point.capturedAt) / 1000), rtoMs, witness: lease, guarantee };
    });
  }

  /** Fail-back: the disk the primary site reads (failback.ts), only for a VM activated here. */
  private failbackSource(vm: string, stage: FailbackStage): Promise<NbdClient> {
    const a = this.store.points(vm).activated;
    if (!a) throw new DrStoreError(409, 'DR_NOT_ACTIVATED', `${vm} was not failed over to this DR site: nothing to fail back`);
    const dir = this.store.dir(vm);
    const file = stage === 'seed' ? this.store.pointFile(vm, a.point).path : join(dir, 'active.qcow2');
    return this.sources.get(vm, stage, file, dir);
  }

  /** Fail-back's planned stop: the VM's QEMU here ends (SIGTERM: QEMU flushes its disk and exits; SIGKILL after the timeout). */
  async stopActive(vm: string, timeoutMs: number): Promise<{ stopped: boolean; pid: number | null; ms: number }> {
    if (!this.store.points(vm).activated) throw new DrStoreError(409, 'DR_NOT_ACTIVATED', `${vm} does not run at this DR site`);
    const dir = this.store.dir(vm), pid = activePid(dir), t0 = performance.now();
    if (pid === null) return { stopped: true, pid: null, ms: 0 };
    this.log.warn('DR fail-back: stopping the VM at the DR site', { vm, pid });
    process.kill(pid, 'SIGTERM');
    while (activePid(dir) !== null && performance.now() - t0 < timeoutMs) await new Promise((r) => setTimeout(r, 100));
    if (activePid(dir) !== null) { process.kill(pid, 'SIGKILL'); await new Promise((r) => setTimeout(r, 500)); }
    rmSync(join(dir, 'active.pid'), { force: true });
    return { stopped: true, pid, ms: Math.round(performance.now() - t0) };
  }

  /** The VM is back at the primary site: the lease is released for it, the DR copy discarded, points are taken in again. */
  async deactivate(vm: string, to: string): Promise<{ released: boolean; epoch: number | null }> {
    const a = this.store.points(vm).activated;
    if (!a) throw new DrStoreError(409, 'DR_NOT_ACTIVATED', `${vm} does not run at this DR site`);
    const dir = this.store.dir(vm);
    if (activePid(dir) !== null) throw new DrStoreError(409, 'DR_VM_RUNNING', `${vm} still runs at the DR site: stop it first`);
    this.sources.close(vm);
    clearInterval(this.leaseTimers.get(vm));
    this.leaseTimers.delete(vm);
    let released = false;
    if (this.witness && a.epoch !== null) {
      released = (await this.witness.release(vm, { node: this.c.node.name, epoch: a.epoch }, 5000).catch(() => ({ status: 0 }))).status === 200;
    }
    this.store.markActivated(vm, null);
    this.store.unpinAll(vm);
    rmSync(join(dir, 'active.qcow2'), { force: true });
    this.log.warn('DR fail-back: the VM went back to the primary site', { vm, to, epoch: a.epoch, leaseReleased: released });
    return { released, epoch: a.epoch };
  }

  /** The VM's lease at an epoch above any the pair used, then kept renewed. */
  private async takeLease(vm: string, minEpoch: number, timeoutMs: number): Promise<{ epoch: number; holder: string }> {
    const w = this.witness!, leaseMs = this.c.witness!.lease_ms, node = this.c.node.name;
    let epoch = minEpoch;
    const t0 = performance.now();
    for (;;) {
      const r = await w.acquire(vm, { node, epoch, leaseMs }, 5000);
      if (r.status === 200 && r.body.granted) break;
      if (r.status !== 409) throw new Error(`witness answered HTTP ${r.status}${r.body.reason ? ': ' + r.body.reason : ''}`);
      if (r.body.epoch >= epoch) epoch = r.body.epoch + 1;
      if (performance.now() - t0 > timeoutMs) {
        if (r.body.expiresInMs > 0) throw new LeaseHeldError(`${r.body.holder} still holds a valid lease at epoch ${r.body.epoch} after ${timeoutMs} ms`);
        throw new Error(`lease not granted within ${timeoutMs} ms: ${r.body.reason ?? 'refused'}`);
      }
      await new Promise((res) => setTimeout(res, Math.min(Math.max(50, r.body.retryAfterMs ?? 100), 2000)));
    }
    this.keepLease(vm, epoch);
    return { epoch, holder: node };
  }

  private keepLease(vm: string, epoch: number): void {
    const w = this.witness!, leaseMs = this.c.witness!.lease_ms, node = this.c.node.name;
    clearInterval(this.leaseTimers.get(vm));
    this.leaseTimers.set(vm, setInterval(() => {
      w.acquire(vm, { node, epoch, leaseMs }, Math.max(200, leaseMs / 3)).then((r) => {
        if (!r.body.granted) this.log.error('DR: the witness refused to renew the lease of a VM running here', { vm, epoch, reason: r.body.reason });
      }, (e) => this.log.warn('DR: lease renewal failed', { vm, error: errorMessage(e) }));
    }, Math.max(100, Math.floor(leaseMs / 4))));
  }

  async start(): Promise<void> {
    for (const v of this.c.vms) {
      this.store.sweep(v.name);
      const a = this.store.points(v.name).activated;
      if (a) { this.store.pin(v.name); if (a.epoch !== null && this.witness) this.keepLease(v.name, a.epoch); }
    }
    const token = readSecret(this.c.token_file);
    const handler = createRouter(this.routes(), {
      token: () => token, maxBodyBytes: 64 * 1024, tokenHint: this.c.token_file,
      onError: (e, req) => this.log.error('DR API handler error', { path: req.url, error: errorMessage(e) }),
    });
    const { host, port } = parseHostPort(this.c.listen)!;
    const server = this.c.tls
      ? createHttpsServer({ cert: readFileSync(this.c.tls.cert_file), key: readFileSync(this.c.tls.key_file) }, (q, s) => void handler(q, s))
      : createServer((q, s) => void handler(q, s));
    server.requestTimeout = 0; // digests of a large disk and test boots take minutes
    await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(port, host, () => resolve()); });
    this.server = server;
    this.sweepTimer = setInterval(() => void this.store.expireIdle(), 60_000);
    this.sweepTimer.unref();
    this.log.info('DR target started', { node: this.c.node.name, listen: this.c.listen, vms: this.c.vms.map((v) => v.name), witness: this.c.witness?.url ?? null });
  }

  async stop(): Promise<void> {
    clearInterval(this.sweepTimer);
    for (const t of this.leaseTimers.values()) clearInterval(t);
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
    this.server?.closeAllConnections?.();
    this.sources.close();
    await this.store.close();
    this.witness?.close();
  }
}

function kill(p: import('node:child_process').ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => { p.once('exit', () => resolve()); p.kill('SIGKILL'); });
}
