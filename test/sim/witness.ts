// The witness in the simulation: the production lease table (witness/table.ts: the rules of
// lease.ts, renewals in memory, a new holder or epoch stored before it is answered, a restart
// counting every lease as just renewed) over a store that survives a crash, with the server's
// input checks. Its clock is the (fake) monotonic time.
import { isValidEpoch } from '../../agent/src/witness/lease.ts';
import { LeaseTable, type LeaseAnswer, type StoredLease } from '../../agent/src/witness/table.ts';
import { FtkvmError } from '../../agent/src/util/errors.ts';

export class SimWitness {
  private up_ = true;
  /** Extra answer delay (a slow disk or an overloaded witness). */
  slowMs = 0;
  private stored: Record<string, StoredLease> | null = null;
  private table = this.open();
  /** Every change of holder or epoch, for the invariants: epochs per VM never go back. */
  readonly grants: { vm: string; holder: string; epoch: number; at: number }[] = [];

  private open(): LeaseTable { return new LeaseTable({ load: () => this.stored, save: (all) => { this.stored = structuredClone(all); } }, () => performance.now()); }

  get up(): boolean { return this.up_; }
  /** Crash (false) or restart (true): a restarted witness reloads what it stored. */
  set up(v: boolean) {
    if (v && !this.up_) this.table = this.open();
    this.up_ = v;
  }

  async acquire(vm: string, req: { node: string; epoch: number; leaseMs: number }): Promise<{ status: number; body: LeaseAnswer }> {
    if (this.slowMs) await new Promise((r) => setTimeout(r, this.slowMs));
    if (!this.up_) throw new FtkvmError('WITNESS_DOWN', 'witness process gone');
    if (!isValidEpoch(req.epoch)) return { status: 400, body: { granted: false, holder: '', epoch: 0, expiresInMs: 0, reason: 'bad epoch' } };
    const r = this.table.acquire(vm, req);
    if (r.changed) this.grants.push({ vm, holder: req.node, epoch: req.epoch, at: Date.now() });
    return { status: r.status, body: r.body };
  }

  async release(vm: string, req: { node: string; epoch: number }): Promise<{ status: number }> {
    if (this.slowMs) await new Promise((r) => setTimeout(r, this.slowMs));
    if (!this.up_) throw new FtkvmError('WITNESS_DOWN', 'witness process gone');
    return { status: this.table.release(vm, req).status };
  }
}
