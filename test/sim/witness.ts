// The witness in the simulation: the production lease rules (witness/lease.ts decideAcquire)
// over an in-memory table that survives a crash (the server writes every grant before it
// answers), with the server's input checks. Its wall clock can be stepped (NTP) like a real
// host's: the server reads Date.now().
import { decideAcquire, type Lease } from '../../agent/src/witness/lease.ts';
import { FtkvmError } from '../../agent/src/util/errors.ts';

export class SimWitness {
  up = true;
  /** Extra answer delay (a slow disk or an overloaded witness). */
  slowMs = 0;
  /** Wall-clock step of the witness host. */
  clockOffsetMs = 0;
  readonly leases = new Map<string, Lease>();
  /** Every grant, for the invariants: epochs per VM never go back. */
  readonly grants: { vm: string; holder: string; epoch: number; at: number }[] = [];

  now(): number { return Date.now() + this.clockOffsetMs; }

  async acquire(vm: string, req: { node: string; epoch: number; leaseMs: number }): Promise<{ status: number; body: { granted: boolean; holder: string; epoch: number; expiresInMs: number; reason?: string; retryAfterMs?: number | null } }> {
    if (this.slowMs) await new Promise((r) => setTimeout(r, this.slowMs));
    if (!this.up) throw new FtkvmError('WITNESS_DOWN', 'witness process gone');
    if (!Number.isInteger(req.epoch) || req.epoch < 1) return { status: 400, body: { granted: false, holder: '', epoch: 0, expiresInMs: 0, reason: 'bad epoch' } };
    const cur = this.leases.get(vm);
    const now = this.now();
    const r = decideAcquire(cur, req, now);
    if (!r.granted) return { status: 409, body: { granted: false, holder: r.current.holder, epoch: r.current.epoch, expiresInMs: Math.max(0, r.current.expiresAt - now), reason: r.reason, retryAfterMs: r.retryAfterMs } };
    this.leases.set(vm, r.lease);
    if (!cur || cur.holder !== req.node || cur.epoch !== req.epoch) this.grants.push({ vm, holder: req.node, epoch: req.epoch, at: Date.now() });
    return { status: 200, body: { granted: true, holder: r.lease.holder, epoch: r.lease.epoch, expiresInMs: r.lease.expiresAt - now } };
  }
}
