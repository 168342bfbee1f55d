// `ftkvm-agent witness`: the tiny lease service on a third machine. It decides who may run a
// VM as primary when the two hosts cannot see each other. Protocol (JSON over HTTP, bearer
// token on every call but /health). With a credentials file (credentials.ts) each host's token
// names its node and pair: `node` must be that node (or left out), and {vm} is a VM of that
// pair; without one, a single shared token may act for any node and leases are keyed by VM.
//   POST /v1/leases/{vm}/acquire {node, epoch, leaseMs}
//        200 {granted: true, holder, epoch, expiresInMs}
//        409 {granted: false, holder, epoch, expiresInMs, reason, retryAfterMs}
//   POST /v1/renewals {node, leaseMs, leases: [{vm, epoch}, ...]}   many acquires in one request
//        200 {results: [{vm, status, granted, holder, epoch, expiresInMs, reason?, code?}, ...]}
//   POST /v1/leases/{vm}/release {node, epoch}   the holder gives it up now (its QEMU is gone)
//        200 {released: true}   409 {released: false, reason}
// The --token-file token next to credentials reads every lease and may only extend a lease its
// holder holds now at its epoch (agents not yet given their own token keep running).
//   GET  /v1/leases            the caller's pair's leases (the reader token: all, with `pair`)
//   GET  /v1/leases/{vm}[?pair=P]   one lease (404 if none)
//   GET  /health               200 {ok: true, leases: N, auth: per-node|shared-token}
// A new holder or epoch is written to disk (temp file, fsync, rename) before it is answered; a
// renewal is not (table.ts). Expiries run on the monotonic clock.
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { join } from 'node:path';
import type { Logger } from '../log/logger.ts';
import { createRouter, field, HttpError, intField, tokenOk, type Ctx, type Route } from '../api/http.ts';
import { readSecret } from '../util/secret.ts';
import { parseHostPort } from '../config/schema.ts';
import { readJsonFile, writeFileAtomic } from '../state/atomic.ts';
import { MAX_EPOCH, MAX_LEASE_MS, MIN_LEASE_MS } from './lease.ts';
import { LeaseTable, type StoredLease } from './table.ts';
import { Credentials, type Principal } from './credentials.ts';

export interface WitnessOptions {
  listen: string; dataDir: string; log: Logger; now?: () => number;
  /** Per-node credentials (credentials.ts); reloaded on reload(). */
  credentialsFile?: string;
  /** Without credentialsFile: the one token of every node. With it: a read-only token (optional). */
  tokenFile?: string;
  /** HTTPS (the roles provision it): certificate chain and key, PEM. */
  tls?: { certFile: string; keyFile: string };
}

const VM_NAME = /^[a-z][a-z0-9-]{0,30}$/;
const PAIR_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

const epochOf = (b: unknown): number => intField(b, 'epoch', 1, MAX_EPOCH, true)!;
/** Leases per renewal request: a host's VMs, with room to spare; bounds the body (maxBodyBytes). */
export const MAX_BATCH = 1000;

export class WitnessServer {
  private readonly o: WitnessOptions;
  private readonly file: string;
  readonly table: LeaseTable;
  private server: Server | undefined;
  private identify: (bearer: string) => Principal | null = () => null;
  private auth: 'per-node' | 'shared-token' = 'shared-token';
  private pairOf: (node: string) => string | null = () => null;
  /** Nodes that have renewed with their own token since this witness started: the site token no longer speaks for them. */
  private readonly ownToken = new Set<string>();

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
    const who = (ctx: Ctx) => ctx.principal as Principal;
    // The lease a mutating call may touch: its own pair's VM, acting for its own node.
    const readOnly = () => new HttpError(403, 'READ_ONLY', 'this token reads leases; taking or releasing one needs the node\'s own token (witness.token_file)');
    const scope = (ctx: Ctx, vm: string, b: unknown, op: 'acquire' | 'release'): { key: string; node: string } => {
      const p = who(ctx);
      if (p.kind === 'reader' && op === 'release') throw readOnly();
      const node = field<string>(b, 'node', 'string', p.kind !== 'node');
      if (p.kind === 'shared') return { key: vm, node: node! };
      if (p.kind === 'reader') {
        // Agents not yet given their own token (a site switching to per-node identity, between
        // the witness's restart and the agents') keep their leases: the site token may extend a
        // lease its holder holds now, at its epoch, and nothing else (checked in acquire).
        const pair = this.pairOf(node!);
        if (!pair) throw readOnly();
        return { key: `${pair}/${vm}`, node: node! };
      }
      if (node !== undefined && node !== p.node) throw new HttpError(403, 'NOT_YOUR_NODE', `this token is ${p.node}'s (pair ${p.pair}); it cannot act for ${node}`);
      return { key: `${p.pair}/${vm}`, node: p.node };
    };
    const shown = (v: NonNullable<ReturnType<LeaseTable['view']>>) => {
      const i = v.vm.indexOf('/');
      return i < 0 ? v : { ...v, pair: v.vm.slice(0, i), vm: v.vm.slice(i + 1) };
    };
    // One acquire or renewal: scope (its own pair and node), then the lease rules.
    const acquire = (ctx: Ctx, vm: string, b: unknown, epoch: number, leaseMs: number) => {
      const { key, node } = scope(ctx, vm, b, 'acquire');
      // The site token stands in for a node only until that node uses its own token.
      const p = who(ctx);
      if (p.kind === 'reader' && (this.ownToken.has(node) || !this.table.extendsValidLease(key, { node, epoch, leaseMs }))) throw readOnly();
      if (p.kind === 'node') this.ownToken.add(p.node);
      const r = this.table.acquire(key, { node, epoch, leaseMs });
      if (r.changed) this.o.log.info('lease granted', { lease: key, holder: node, epoch, previous: r.previous ? `${r.previous.holder}@${r.previous.epoch}` : 'none' });
      return r;
    };
    return [
      { method: 'GET', path: '/health', access: 'public', handler: () => ({ json: { ok: true, leases: this.table.size, auth: this.auth } }) },
      {
        method: 'GET', path: '/v1/leases', access: 'write',
        handler: (ctx) => {
          const p = who(ctx);
          const all = this.table.list();
          return { json: (p.kind === 'node' ? all.filter((l) => l.vm.startsWith(`${p.pair}/`)) : all).map(shown) };
        },
      },
      {
        method: 'GET', path: '/v1/leases/:vm', access: 'write',
        handler: (ctx) => {
          const p = who(ctx);
          const vm = vmOf(ctx.params.vm);
          const pair = p.kind === 'node' ? p.pair : ctx.query.get('pair');
          if (pair !== null && !PAIR_NAME.test(pair)) throw new HttpError(400, 'BAD_PAIR', 'invalid pair name');
          const l = this.table.view(pair === null ? vm : `${pair}/${vm}`);
          if (!l) throw new HttpError(404, 'NO_LEASE', `no lease for ${vm}${pair === null ? '' : ` of pair ${pair}`}`);
          return { json: shown(l) };
        },
      },
      {
        method: 'POST', path: '/v1/leases/:vm/acquire', access: 'write',
        handler: async (ctx) => {
          const b = await ctx.body();
          const r = acquire(ctx, vmOf(ctx.params.vm), b, epochOf(b), intField(b, 'leaseMs', MIN_LEASE_MS, MAX_LEASE_MS, true)!);
          return { status: r.status, json: r.body };
        },
      },
      {
        // Every lease a host keeps in one request (its agent's and its fencer's renewals): the
        // witness's cost grows with the hosts, not the VMs. Each item is decided as the
        // single acquire is, and answered apart: one refused or malformed item changes
        // nothing for the others.
        method: 'POST', path: '/v1/renewals', access: 'write',
        handler: async (ctx) => {
          const b = await ctx.body();
          const leaseMs = intField(b, 'leaseMs', MIN_LEASE_MS, MAX_LEASE_MS, true)!;
          const items = (b as { leases?: unknown }).leases;
          if (!Array.isArray(items) || items.length === 0 || items.length > MAX_BATCH) throw new HttpError(400, 'BAD_BODY', `leases must be an array of 1 to ${MAX_BATCH} {vm, epoch}`);
          const node = (b as { node?: unknown }).node;
          const results = items.map((it: unknown) => {
            const vm = (it as { vm?: unknown } | null)?.vm;
            try {
              if (it === null || typeof it !== 'object' || Array.isArray(it)) throw new HttpError(400, 'BAD_BODY', 'each lease must be an object {vm, epoch}');
              const r = acquire(ctx, vmOf(typeof vm === 'string' ? vm : undefined), node === undefined ? { ...it } : { ...it, node }, epochOf(it), leaseMs);
              return { vm, status: r.status, ...r.body };
            } catch (e) {
              // One lease's failure (a durable write that failed: nothing was granted) is that
              // lease's answer; the others are decided as usual.
              if (!(e instanceof HttpError)) this.o.log.error('renewal failed', { vm: String(vm), error: String(e) });
              const h = e instanceof HttpError ? e : new HttpError(500, 'INTERNAL', String(e));
              return { vm: typeof vm === 'string' ? vm : null, status: h.status, granted: false, code: h.code, reason: h.message };
            }
          });
          return { json: { results } };
        },
      },
      {
        method: 'POST', path: '/v1/leases/:vm/release', access: 'write',
        handler: async (ctx) => {
          const vm = vmOf(ctx.params.vm);
          const b = await ctx.body();
          const { key, node } = scope(ctx, vm, b, 'release');
          const epoch = epochOf(b);
          const r = this.table.release(key, { node, epoch });
          if (r.body.released) this.o.log.info('lease released by its holder', { lease: key, holder: node, epoch });
          return { status: r.status, json: r.body };
        },
      },
    ];
  }

  /** (Re)reads the credentials and token; on any error keeps what it had and throws (nothing half-applied). */
  reload(): void {
    const token = this.o.tokenFile ? readSecret(this.o.tokenFile) : null;
    if (this.o.credentialsFile) {
      const creds = Credentials.load(this.o.credentialsFile);
      if (token !== null) creds.withReader(token);
      // Leases stored by an earlier shared-token witness: filed under their holder's pair (one
      // durable write) before the new identities take effect.
      const moves: [string, string][] = [];
      for (const key of this.table.keys().filter((k) => !k.includes('/'))) {
        const holder = this.table.view(key)!.holder;
        const pair = creds.pairOf(holder);
        if (pair) moves.push([key, `${pair}/${key}`]);
        else this.o.log.error('a stored lease names a node the credentials do not know: it stays under the VM name, where no node can renew it', { vm: key, holder });
      }
      const moved = this.table.rekey(moves);
      if (moved) this.o.log.info('leases filed under their holder\'s pair', { moved });
      this.identify = (bearer) => creds.identify(bearer);
      this.pairOf = (node) => creds.pairOf(node);
      this.auth = 'per-node';
      this.o.log.info('credentials loaded', { file: this.o.credentialsFile, nodes: creds.nodes, pairs: creds.pairs, readerToken: token !== null });
      return;
    }
    if (token === null) throw new HttpError(400, 'NO_CREDENTIALS', 'give --credentials FILE (one token per node) or --token-file FILE (one shared token)');
    // Leases stored by a per-node witness: back under the VM name, where that name is unique.
    const keys = this.table.keys();
    const moves: [string, string][] = [];
    for (const key of keys.filter((k) => k.includes('/'))) {
      const vm = key.slice(key.indexOf('/') + 1);
      if (keys.filter((k) => k === vm || k.endsWith(`/${vm}`)).length === 1) moves.push([key, vm]);
      else this.o.log.error('two pairs hold leases for this VM name: shared-token mode cannot tell them apart; the leases stay per pair, where no node can renew them', { vm });
    }
    const moved = this.table.rekey(moves);
    if (moved) this.o.log.info('leases filed under their VM names (shared-token mode)', { moved });
    const shared: Principal = { kind: 'shared' };
    this.identify = (bearer) => (tokenOk(bearer, token) ? shared : null);
    this.auth = 'shared-token';
    this.o.log.warn('shared-token mode: whoever holds the token can take any VM\'s lease for any node; give --credentials for per-node identity');
  }

  async start(): Promise<void> {
    this.reload();
    const handler = createRouter(this.routes(), { identify: (b) => this.identify(b), tokenHint: 'witness.token_file', maxBodyBytes: 96 * 1024, onError: (e) => this.o.log.error('witness error', { error: String(e) }) });
    const hp = parseHostPort(this.o.listen);
    if (!hp) throw new HttpError(400, 'BAD_LISTEN', `--listen must be ADDRESS:PORT with an IP address, got "${this.o.listen}"`);
    this.server = this.o.tls
      ? createHttpsServer({ cert: readFileSync(this.o.tls.certFile), key: readFileSync(this.o.tls.keyFile) }, (q, s) => void handler(q, s))
      : createServer((q, s) => void handler(q, s));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(hp.port, hp.host, () => resolve());
    });
    this.o.log.info('witness listening', { listen: this.o.listen, tls: !!this.o.tls, leases: this.table.size, dataDir: this.o.dataDir, auth: this.auth });
    if (!this.o.tls) this.o.log.warn('plain HTTP: tokens and leases cross the network in clear; give --tls-cert and --tls-key');
  }

  async stop(): Promise<void> {
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }
}
