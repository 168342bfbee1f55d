// `ftkvm-agent witness`: the tiny lease service on a third machine. It decides who may run a
// VM as primary when the two hosts cannot see each other. Protocol (JSON over HTTP, bearer
// token on every call but /health):
//   POST /v1/leases/{vm}/acquire {node, epoch, leaseMs}
//        200 {granted: true, holder, epoch, expiresInMs}
//        409 {granted: false, holder, epoch, expiresInMs, reason, retryAfterMs}
//   POST /v1/leases/{vm}/release {node, epoch}   the holder gives it up now (its QEMU is gone)
//        200 {released: true}   409 {released: false, reason}
//   GET  /v1/leases            all leases;   GET /v1/leases/{vm}   one lease (404 if none)
//   GET  /health               200 {ok: true, leases: N}
// A new holder or epoch is written to disk (temp file, fsync, rename) before it is answered; a
// renewal is not (table.ts). Expiries run on the monotonic clock.
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { join } from 'node:path';
import type { Logger } from '../log/logger.ts';
import { createRouter, field, HttpError, intField, type Route } from '../api/http.ts';
import { parseHostPort } from '../config/schema.ts';
import { readJsonFile, writeFileAtomic } from '../state/atomic.ts';
import { MAX_EPOCH, MAX_LEASE_MS, MIN_LEASE_MS } from './lease.ts';
import { LeaseTable, type StoredLease } from './table.ts';

export interface WitnessOptions { listen: string; dataDir: string; tokenFile: string; log: Logger; now?: () => number }

const VM_NAME = /^[a-z][a-z0-9-]{0,30}$/;

const epochOf = (b: unknown): number => intField(b, 'epoch', 1, MAX_EPOCH, true)!;

export class WitnessServer {
  private readonly o: WitnessOptions;
  private readonly file: string;
  readonly table: LeaseTable;
  private server: Server | undefined;
  private token = '';

  constructor(o: WitnessOptions) {
    this.o = o;
    this.file = join(o.dataDir, 'leases.json');
    this.table = new LeaseTable({
      load: () => readJsonFile<Record<string, StoredLease>>(this.file) ?? null,
      save: (all) => writeFileAtomic(this.file, JSON.stringify(all, null, 2) + '\n'),
    }, o.now ?? (() => performance.now()));
  }

  private routes(): Route[] {
    const vmOf = (name: string | undefined) => { if (!name || !VM_NAME.test(name)) throw new HttpError(400, 'BAD_VM', 'invalid VM name'); return name; };
    return [
      { method: 'GET', path: '/health', access: 'public', handler: () => ({ json: { ok: true, leases: this.table.size } }) },
      { method: 'GET', path: '/v1/leases', access: 'write', handler: () => ({ json: this.table.list() }) },
      {
        method: 'GET', path: '/v1/leases/:vm', access: 'write',
        handler: (ctx) => {
          const l = this.table.view(ctx.params.vm!);
          if (!l) throw new HttpError(404, 'NO_LEASE', `no lease for ${ctx.params.vm}`);
          return { json: l };
        },
      },
      {
        method: 'POST', path: '/v1/leases/:vm/acquire', access: 'write',
        handler: async (ctx) => {
          const vm = vmOf(ctx.params.vm);
          const b = await ctx.body();
          const node = field<string>(b, 'node', 'string', true)!;
          const epoch = epochOf(b);
          const leaseMs = intField(b, 'leaseMs', MIN_LEASE_MS, MAX_LEASE_MS, true)!;
          const r = this.table.acquire(vm, { node, epoch, leaseMs });
          if (r.changed) this.o.log.info('lease granted', { vm, holder: node, epoch, previous: r.previous ? `${r.previous.holder}@${r.previous.epoch}` : 'none' });
          return { status: r.status, json: r.body };
        },
      },
      {
        method: 'POST', path: '/v1/leases/:vm/release', access: 'write',
        handler: async (ctx) => {
          const vm = vmOf(ctx.params.vm);
          const b = await ctx.body();
          const node = field<string>(b, 'node', 'string', true)!;
          const epoch = epochOf(b);
          const r = this.table.release(vm, { node, epoch });
          if (r.body.released) this.o.log.info('lease released by its holder', { vm, holder: node, epoch });
          return { status: r.status, json: r.body };
        },
      },
    ];
  }

  async start(): Promise<void> {
    this.token = readFileSync(this.o.tokenFile, 'utf8').trim();
    const handler = createRouter(this.routes(), { token: () => this.token, maxBodyBytes: 4096, onError: (e) => this.o.log.error('witness error', { error: String(e) }) });
    const hp = parseHostPort(this.o.listen);
    if (!hp) throw new HttpError(400, 'BAD_LISTEN', `--listen must be ADDRESS:PORT with an IP address, got "${this.o.listen}"`);
    this.server = createServer((q, s) => void handler(q, s));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(hp.port, hp.host, () => resolve());
    });
    this.o.log.info('witness listening', { listen: this.o.listen, leases: this.table.size, dataDir: this.o.dataDir });
  }

  async stop(): Promise<void> {
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }
}
