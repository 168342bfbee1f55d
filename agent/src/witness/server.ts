// `ftkvm-agent witness`: the tiny lease service on a third machine. It decides who may run a
// VM as primary when the two hosts cannot see each other. Protocol (JSON over HTTP, bearer
// token on every call but /health):
//   POST /v1/leases/{vm}/acquire {node, epoch, leaseMs}
//        200 {granted: true, holder, epoch, expiresInMs, previous}
//        409 {granted: false, holder, epoch, expiresInMs, reason, retryAfterMs}
//   GET  /v1/leases            all leases;   GET /v1/leases/{vm}   one lease (404 if none)
//   GET  /health               200 {ok: true, leases: N}
// A grant is written to disk (temp file, fsync, rename) before it is answered.
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { join } from 'node:path';
import type { Logger } from '../log/logger.ts';
import { createRouter, field, HttpError, type Route } from '../api/http.ts';
import { parseHostPort } from '../config/schema.ts';
import { readJsonFile, writeFileAtomic } from '../state/atomic.ts';
import { decideAcquire, type Lease } from './lease.ts';

export interface WitnessOptions { listen: string; dataDir: string; tokenFile: string; log: Logger; now?: () => number }

export class WitnessServer {
  private readonly o: WitnessOptions;
  private readonly file: string;
  private leases: Record<string, Lease>;
  private server: Server | undefined;
  private token = '';
  private readonly now: () => number;

  constructor(o: WitnessOptions) {
    this.o = o;
    this.now = o.now ?? Date.now;
    this.file = join(o.dataDir, 'leases.json');
    this.leases = readJsonFile<Record<string, Lease>>(this.file) ?? {};
  }

  private view(vm: string, l: Lease) {
    return { vm, holder: l.holder, epoch: l.epoch, expiresInMs: Math.max(0, l.expiresAt - this.now()), grantedAt: l.grantedAt };
  }

  private routes(): Route[] {
    return [
      { method: 'GET', path: '/health', access: 'public', handler: () => ({ json: { ok: true, leases: Object.keys(this.leases).length } }) },
      { method: 'GET', path: '/v1/leases', access: 'write', handler: () => ({ json: Object.entries(this.leases).map(([vm, l]) => this.view(vm, l)) }) },
      {
        method: 'GET', path: '/v1/leases/:vm', access: 'write',
        handler: (ctx) => {
          const l = this.leases[ctx.params.vm!];
          if (!l) throw new HttpError(404, 'NO_LEASE', `no lease for ${ctx.params.vm}`);
          return { json: this.view(ctx.params.vm!, l) };
        },
      },
      {
        method: 'POST', path: '/v1/leases/:vm/acquire', access: 'write',
        handler: async (ctx) => {
          const vm = ctx.params.vm!;
          if (!/^[a-z][a-z0-9-]{0,30}$/.test(vm)) throw new HttpError(400, 'BAD_VM', 'invalid VM name');
          const b = await ctx.body();
          const node = field<string>(b, 'node', 'string', true)!;
          const epoch = field<number>(b, 'epoch', 'number', true)!;
          const leaseMs = field<number>(b, 'leaseMs', 'number', true)!;
          if (!Number.isInteger(epoch) || epoch < 1) throw new HttpError(400, 'BAD_BODY', 'epoch must be a positive integer');
          const cur = this.leases[vm];
          const r = decideAcquire(cur, { node, epoch, leaseMs }, this.now());
          if (!r.granted) {
            return { status: 409, json: { granted: false, ...this.view(vm, r.current), reason: r.reason, retryAfterMs: r.retryAfterMs } };
          }
          const changed = !cur || cur.holder !== node || cur.epoch !== epoch;
          this.leases = { ...this.leases, [vm]: r.lease };
          writeFileAtomic(this.file, JSON.stringify(this.leases, null, 2) + '\n');
          if (changed) this.o.log.info('lease granted', { vm, holder: node, epoch, previous: cur ? `${cur.holder}@${cur.epoch}` : 'none' });
          return { json: { granted: true, ...this.view(vm, r.lease), previous: r.previous ? this.view(vm, r.previous) : null } };
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
    this.o.log.info('witness listening', { listen: this.o.listen, leases: Object.keys(this.leases).length, dataDir: this.o.dataDir });
  }

  async stop(): Promise<void> {
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }
}
