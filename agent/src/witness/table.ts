// The witness's lease table: the rules of lease.ts over a store. Renewals (the holder at its
// epoch) cost O(1) and touch nothing durable; a new holder or epoch is written before it is
// answered; a restart counts every lease as just renewed (lease.ts afterRestart). Used by the
// witness server and, with a memory store, by the simulator.
import { afterRestart, decideAcquire, decideRelease, isRenewal, type AcquireRequest, type Lease } from './lease.ts';

/** What must survive a restart: who holds which epoch, with which lease length. */
export interface StoredLease { holder: string; epoch: number; leaseMs: number; grantedAt: number }

export interface LeaseMedium {
  load(): Record<string, StoredLease> | null;
  /** Durable before returning; throws when it could not be written (the change is then not answered). */
  save(all: Record<string, StoredLease>): void;
}

export interface LeaseAnswer { granted: boolean; holder: string; epoch: number; expiresInMs: number; reason?: string; retryAfterMs?: number | null }

export class LeaseTable {
  private readonly leases = new Map<string, Lease>();
  /** Durable writes made (a bench and the tests count them). */
  writes = 0;

  constructor(private readonly medium: LeaseMedium, private readonly now: () => number) {
    const stored = medium.load() ?? {};
    for (const [vm, l] of Object.entries(afterRestart(stored as never, now()))) this.leases.set(vm, l);
  }

  get size(): number { return this.leases.size; }

  private stored(): Record<string, StoredLease> {
    const out: Record<string, StoredLease> = {};
    for (const [vm, l] of this.leases) out[vm] = { holder: l.holder, epoch: l.epoch, leaseMs: l.leaseMs, grantedAt: l.grantedAt };
    return out;
  }

  acquire(vm: string, req: AcquireRequest): { status: 200 | 409; body: LeaseAnswer; changed: boolean; previous: Lease | null } {
    const cur = this.leases.get(vm);
    const now = this.now();
    const r = decideAcquire(cur, req, now);
    if (!r.granted) {
      return { status: 409, changed: false, previous: cur ?? null, body: { granted: false, holder: r.current.holder, epoch: r.current.epoch, expiresInMs: Math.max(0, Math.round(r.current.expiresAt - now)), reason: r.reason, retryAfterMs: r.retryAfterMs } };
    }
    const changed = !isRenewal(cur, req);
    if (changed) {
      // Durable before it is answered: a restarted witness must never grant an epoch twice.
      const next = this.stored();
      next[vm] = { holder: r.lease.holder, epoch: r.lease.epoch, leaseMs: r.lease.leaseMs, grantedAt: r.lease.grantedAt };
      this.medium.save(next);
      this.writes++;
    }
    this.leases.set(vm, changed ? r.lease : { ...r.lease, grantedAt: cur!.grantedAt });
    return { status: 200, changed, previous: cur ?? null, body: { granted: true, holder: r.lease.holder, epoch: r.lease.epoch, expiresInMs: Math.round(r.lease.expiresAt - now) } };
  }

  release(vm: string, req: { node: string; epoch: number }): { status: 200 | 409; body: { released: boolean; reason?: string } } {
    const r = decideRelease(this.leases.get(vm), req, this.now());
    if (!r.released) return { status: 409, body: { released: false, reason: r.reason } };
    this.leases.set(vm, r.lease); // nothing durable: a restart makes it valid again, which only delays
    return { status: 200, body: { released: true } };
  }

  /** `req` would only extend a lease its holder holds now, at its epoch and length (nothing changes hands, nothing shortens). */
  extendsValidLease(key: string, req: AcquireRequest): boolean {
    const cur = this.leases.get(key);
    return isRenewal(cur, req) && cur!.expiresAt > this.now() && req.leaseMs === cur!.leaseMs;
  }

  /** Keys of every lease (the server scopes them by pair). */
  keys(): string[] { return [...this.leases.keys()]; }

  /**
   * Moves a lease to another key, durably, keeping its holder, epoch and expiry: a witness that
   * changes how it keys leases (shared token <-> per-node credentials) must not forget a lease
   * that is still running, or it could grant the VM to the other host while the holder runs it.
   */
  rekey(moves: [from: string, to: string][]): number {
    const ok = moves.filter(([from, to]) => this.leases.has(from) && !this.leases.has(to) && from !== to);
    if (ok.length === 0) return 0;
    const next = this.stored();
    for (const [from, to] of ok) { next[to] = next[from]!; delete next[from]; }
    this.medium.save(next); // all moves in one durable write, or none (throws)
    this.writes++;
    for (const [from, to] of ok) { this.leases.set(to, this.leases.get(from)!); this.leases.delete(from); }
    return ok.length;
  }

  view(vm: string): { vm: string; holder: string; epoch: number; expiresInMs: number; leaseMs: number } | null {
    const l = this.leases.get(vm);
    return l ? { vm, holder: l.holder, epoch: l.epoch, expiresInMs: Math.max(0, Math.round(l.expiresAt - this.now())), leaseMs: l.leaseMs } : null;
  }

  list(): NonNullable<ReturnType<LeaseTable['view']>>[] { return [...this.leases.keys()].map((vm) => this.view(vm)!); }
}
