// The witness protocol on etcd v3 (a 3-member cluster across three sites survives the loss of
// any one machine, which the embedded witness cannot). Spoken through etcd's JSON gateway
// (/v3/...) with undici: no gRPC dependency. Per VM two keys under PREFIX/PAIR/VM/:
//   epoch  {holder, epoch}   durable: the newest epoch ever granted and its holder
//   live   {holder, epoch}   attached to an etcd lease (TTL = lease_ms): exists <=> the lease is valid
// The rules are lease.ts's (decideAcquire) on what was read; every change is one transaction that
// compares the revisions it read, so two nodes racing for the same epoch can never both win: the
// loser's transaction fails, it reads again and is refused. A renewal is a lease keep-alive (no
// raft write). Expiry runs on the etcd leader's clock; a leader election extends leases (etcd
// "promotes" them), so it never expires one early — but keep-alives wait for the new leader:
// lease_ms must outlast an election (README: etcd backend).
import { readFileSync } from 'node:fs';
import { Agent, request, type Dispatcher } from 'undici';
import { decideAcquire, type Lease } from './lease.ts';
import type { AcquireAnswer, WitnessTransport } from './client.ts';
import { FtkvmError } from '../util/errors.ts';
import type { Config } from '../config/schema.ts';

export interface EtcdSettings {
  endpoints: string[];
  /** Key prefix of this site's leases (default /ftkvm). */
  prefix: string;
  /** This node's pair: its leases live under PREFIX/PAIR/ (the etcd role limits the node's user to it). */
  pair: string;
  user?: string;
  passwordFile?: string;
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

/** gRPC codes that are answers, not failures: invalid argument, not found, permission denied. */
const DEFINITIVE = new Set([3, 5, 7]);

const b64 = (s: string) => Buffer.from(s).toString('base64');
const unb64 = (s: string) => Buffer.from(s, 'base64').toString('utf8');
/** An int64 count of seconds from the gateway, which leaves out zeros: never NaN. */
const seconds = (v: string | undefined): number => { const n = Number(v ?? 0); return Number.isFinite(n) ? n : 0; };
/** The key just after every key starting with `p` (etcd range_end of a prefix). */
const prefixEnd = (p: string) => b64(p.slice(0, -1) + String.fromCharCode(p.charCodeAt(p.length - 1) + 1));

interface Kv { key: string; value: string; mod_revision: string; create_revision: string; lease?: string }
interface Held { holder: string; epoch: number }
interface Read { epoch: (Held & { rev: string }) | null; live: (Held & { rev: string; lease: string }) | null }

/** An etcd error answer (gRPC status code: 7 permission denied, 16 unauthenticated, 14 unavailable). */
export class EtcdError extends FtkvmError {
  constructor(readonly grpcCode: number, message: string) { super(grpcCode === 7 ? 'ETCD_PERMISSION_DENIED' : 'ETCD_ERROR', message); }
}

/** The agent configuration's witness.etcd as transport settings. */
export function etcdSettings(e: NonNullable<Config['witness']['etcd']>): EtcdSettings {
  return { endpoints: e.endpoints, prefix: e.prefix, pair: e.pair, user: e.user, passwordFile: e.password_file, caFile: e.ca_file, certFile: e.cert_file, keyFile: e.key_file };
}

/** `dispatcher`: share one connection pool between transports (the bench's thousands of nodes). */
export function etcdTransport(s: EtcdSettings, opts: { dispatcher?: Dispatcher } = {}): WitnessTransport & { describe(): string } {
  const tls = s.caFile || s.certFile ? {
    ca: s.caFile ? readFileSync(s.caFile) : undefined,
    cert: s.certFile ? readFileSync(s.certFile) : undefined,
    key: s.keyFile ? readFileSync(s.keyFile) : undefined,
  } : undefined;
  const own = opts.dispatcher ? null : new Agent({ connectTimeout: 500, keepAliveTimeout: 10_000, connect: tls });
  const dispatcher = opts.dispatcher ?? own!;
  // The etcd lease behind each lease this transport was granted: a renewal is then one
  // keep-alive. Sound because "live" is attached to that etcd lease: while the lease lives, so
  // does "live", and nobody else can be granted the VM (they need "live" gone).
  const mine = new Map<string, { node: string; epoch: number; lease: string }>();
  let current = 0;                 // endpoint in use; the next one after a failure
  let token: string | null = null; // etcd auth token (simple token), fetched lazily
  const base = (key: string) => `${s.prefix.replace(/\/$/, '')}/${s.pair}/${key}`;

  async function post<T>(path: string, body: unknown, timeoutMs: number, authed = true): Promise<T> {
    let lastError: unknown;
    for (let tries = 0; tries < s.endpoints.length; tries++) {
      const url = s.endpoints[current]!.replace(/\/$/, '') + path;
      try {
        if (authed && s.user && token === null) token = await authenticate(timeoutMs);
        const res = await request(url, {
          method: 'POST', dispatcher, headersTimeout: timeoutMs, bodyTimeout: timeoutMs,
          headers: { 'content-type': 'application/json', ...(authed && token ? { authorization: token } : {}) },
          body: JSON.stringify(body),
        });
        const json = (await res.body.json()) as Record<string, unknown>;
        // Unary calls answer {error, code, message}; streaming ones (keep-alive) {error: {grpc_code, message}}.
        const e = json.error as string | { grpc_code?: number; message?: string } | undefined;
        const err = typeof e === 'object' && e !== null ? (e.message ?? 'etcd error') : (e ?? (res.statusCode >= 400 ? String(json.message ?? `HTTP ${res.statusCode}`) : undefined));
        if (err !== undefined) {
          const code = Number((typeof e === 'object' && e !== null ? e.grpc_code : json.code) ?? 2);
          if (code === 16 && authed && s.user) token = null; // expired auth token: authenticate again (next try)
          throw new EtcdError(code, err);
        }
        return ('result' in json ? json.result : json) as T;
      } catch (e) {
        if (e instanceof EtcdError && DEFINITIVE.has(e.grpcCode)) throw e; // another member would answer the same
        lastError = e;
        current = (current + 1) % s.endpoints.length;
      }
    }
    throw lastError instanceof Error ? lastError : new Error(String(lastError));
  }

  async function authenticate(timeoutMs: number): Promise<string> {
    const password = s.passwordFile ? readFileSync(s.passwordFile, 'utf8').trim() : '';
    const r = await post<{ token: string }>('/v3/auth/authenticate', { name: s.user, password }, timeoutMs, false);
    return r.token;
  }

  async function read(vm: string, t: number): Promise<Read> {
    const p = base(`${vm}/`);
    const r = await post<{ kvs?: Kv[] }>('/v3/kv/range', { key: b64(p), range_end: prefixEnd(p) }, t);
    const out: Read = { epoch: null, live: null };
    for (const kv of r.kvs ?? []) {
      const v = JSON.parse(unb64(kv.value)) as Held;
      if (unb64(kv.key) === p + 'epoch') out.epoch = { ...v, rev: kv.mod_revision };
      if (unb64(kv.key) === p + 'live') out.live = { ...v, rev: kv.mod_revision, lease: kv.lease ?? '0' };
    }
    return out;
  }

  /** Remaining seconds after renewing; 0 when the lease is gone. */
  const keepAlive = (lease: string, t: number) => post<{ TTL?: string }>('/v3/lease/keepalive', { ID: lease }, t)
    .then((r) => seconds(r.TTL), (e) => { if (e instanceof EtcdError && e.grpcCode === 5) return 0; throw e; });
  const ttlOf = async (lease: string, t: number) => seconds((await post<{ TTL?: string }>('/v3/lease/timetolive', { ID: lease }, t)).TTL);
  const revoke = (lease: string, t: number) => post('/v3/lease/revoke', { ID: lease }, t).catch(() => undefined);

  /**
   * One transaction: it applies only if both keys are as read (else someone else changed them
   * first). The etcd lease of the grant, or null when the keys had changed.
   */
  async function grant(vm: string, seen: Read, h: Held, leaseMs: number, t: number): Promise<string | null> {
    const lease = (await post<{ ID: string }>('/v3/lease/grant', { TTL: Math.ceil(leaseMs / 1000) }, t)).ID;
    const same = (key: string, rev: string | undefined) => ({ key: b64(base(`${vm}/${key}`)), target: 'MOD', result: 'EQUAL', mod_revision: rev ?? '0' });
    const r = await post<{ succeeded?: boolean }>('/v3/kv/txn', {
      compare: [same('epoch', seen.epoch?.rev), same('live', seen.live?.rev)],
      success: [
        { request_put: { key: b64(base(`${vm}/epoch`)), value: b64(JSON.stringify({ holder: h.holder, epoch: h.epoch })) } },
        { request_put: { key: b64(base(`${vm}/live`)), value: b64(JSON.stringify({ holder: h.holder, epoch: h.epoch })), lease } },
      ],
    }, t);
    if (!r.succeeded) { void revoke(lease, t); return null; }
    if (seen.live && seen.live.lease !== '0') void revoke(seen.live.lease, t); // the old lease holds nothing now
    return lease;
  }

  return {
    describe: () => `etcd ${s.endpoints.join(',')} ${base('')}`,
    async acquire(vm, req, timeoutMs) {
      const granted = (lease: string, ms: number) => {
        mine.set(vm, { node: req.node, epoch: req.epoch, lease });
        return { status: 200, body: { granted: true, holder: req.node, epoch: req.epoch, expiresInMs: ms } };
      };
      const m = mine.get(vm);
      if (m && m.node === req.node && m.epoch === req.epoch) {
        const ttl = await keepAlive(m.lease, timeoutMs);
        if (ttl > 0) return granted(m.lease, ttl * 1000);
      }
      mine.delete(vm);
      for (let attempt = 0; attempt < 3; attempt++) {
        const seen = await read(vm, timeoutMs);
        // Renewal: the holder at its epoch with its lease alive: a keep-alive, nothing written.
        if (seen.live && seen.live.holder === req.node && seen.live.epoch === req.epoch && seen.epoch?.epoch === req.epoch) {
          const ttl = await keepAlive(seen.live.lease, timeoutMs);
          if (ttl > 0) return granted(seen.live.lease, ttl * 1000);
          continue; // expired between the read and the keep-alive: read again
        }
        const now = 0; // lease.ts times: "live" present = valid for its TTL, absent = expired
        const cur: Lease | undefined = seen.epoch ? {
          holder: seen.epoch.holder, epoch: seen.epoch.epoch, grantedAt: now, leaseMs: req.leaseMs,
          // "live" still there is a valid lease, whatever its TTL reads (< 1 s reads 0; at <= 0 etcd
          // is deleting it): refused, ask again shortly. Only its absence lets another node in.
          expiresAt: seen.live ? now + Math.max(100, 1000 * await ttlOf(seen.live.lease, timeoutMs)) : now - 1,
        } : undefined;
        const d = decideAcquire(cur, req, now);
        if (!d.granted) {
          const body: AcquireAnswer = { granted: false, holder: d.current.holder, epoch: d.current.epoch, expiresInMs: Math.max(0, d.current.expiresAt - now), reason: d.reason, retryAfterMs: d.retryAfterMs };
          return { status: 409, body };
        }
        const lease = await grant(vm, seen, { holder: req.node, epoch: req.epoch }, req.leaseMs, timeoutMs);
        if (lease !== null) return granted(lease, Math.ceil(req.leaseMs / 1000) * 1000);
      }
      const seen = await read(vm, timeoutMs);
      return { status: 409, body: { granted: false, holder: seen.epoch?.holder ?? '', epoch: seen.epoch?.epoch ?? 0, expiresInMs: 0, reason: 'contended: the lease changed while it was being taken', retryAfterMs: 100 } };
    },
    async release(vm, req, timeoutMs) {
      mine.delete(vm);
      const seen = await read(vm, timeoutMs);
      // As lease.ts decideRelease: only the holder at its epoch; an already expired lease is released.
      if (!seen.epoch || seen.epoch.holder !== req.node || seen.epoch.epoch !== req.epoch) return { status: 409 };
      if (!seen.live) return { status: 200 };
      // Revoking the lease deletes "live" at once; "epoch" stays (the successor needs a newer one).
      // NotFound: it expired meanwhile, which is released too.
      await post('/v3/lease/revoke', { ID: seen.live.lease }, timeoutMs).catch((e) => { if (!(e instanceof EtcdError && e.grpcCode === 5)) throw e; });
      return { status: 200 };
    },
    async health(timeoutMs) {
      // A read that needs the cluster's quorum (linearizable): a member cut off from it fails.
      await post('/v3/kv/range', { key: b64(base('health')), count_only: true }, timeoutMs);
    },
    close() { void own?.close(); },
  };
}

/** Which etcd member leads (bench and tests kill it). */
export async function etcdLeader(endpoints: string[]): Promise<{ endpoint: string; memberId: string } | null> {
  for (const e of endpoints) {
    try {
      const res = await request(`${e.replace(/\/$/, '')}/v3/maintenance/status`, { method: 'POST', body: '{}', headersTimeout: 1000, bodyTimeout: 1000 });
      const j = (await res.body.json()) as { header?: { member_id: string }; leader?: string };
      if (j.header && j.leader === j.header.member_id) return { endpoint: e, memberId: j.leader };
    } catch { /* down or unreachable: ask the next member */ }
  }
  return null;
}
