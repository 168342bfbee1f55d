// The fencer's renewals, coalesced: every renewal asked for in one turn of the event loop (one
// fencer step asks for all its due leases at once) goes to the witness in one request
// (POST /v1/renewals), as the agent's do, so the witness's load follows the hosts, not the VMs.
// A transport that cannot batch (etcd; a witness older than the fencer: 404) renews one by one.
import type { WitnessTransport } from '../witness/client.ts';
import { renewEveryMs, type FencerWitness, type RenewAnswer } from './fencer.ts';

type Renew = (w: FencerWitness, token: string, vm: string, epoch: number) => Promise<RenewAnswer>;

export function coalescedRenewals(transport: (w: FencerWitness, token: string) => WitnessTransport, defer: (f: () => void) => void = setImmediate): Renew {
  let pending: { w: FencerWitness; t: WitnessTransport; vm: string; epoch: number; resolve: (a: RenewAnswer) => void; reject: (e: unknown) => void }[] = [];
  const answer = (status: number, b: { granted?: boolean; holder?: string; epoch?: number; reason?: string }): RenewAnswer =>
    ({ granted: status === 200 && !!b.granted, holder: b.holder ?? '', epoch: b.epoch ?? 0, reason: b.reason });
  const flush = async (): Promise<void> => {
    const batch = pending;
    pending = [];
    const { w, t } = batch[batch.length - 1]!;
    const timeoutMs = Math.max(200, renewEveryMs(w.leaseMs) * 2);
    try {
      const answers = t.renew ? await t.renew(batch.map((b) => ({ vm: b.vm, epoch: b.epoch })), { node: w.node, leaseMs: w.leaseMs }, timeoutMs) : null;
      if (answers) { answers.forEach((a, i) => batch[i]!.resolve(answer(a.status, a.body))); return; }
    } catch (e) {
      for (const b of batch) b.reject(e);
      return;
    }
    await Promise.all(batch.map((b) => t.acquire(b.vm, { node: w.node, epoch: b.epoch, leaseMs: w.leaseMs }, timeoutMs)
      .then((r) => b.resolve(answer(r.status, r.body)), b.reject)));
  };
  return (w, token, vm, epoch) => new Promise((resolve, reject) => {
    if (pending.length === 0) defer(() => void flush());
    pending.push({ w, t: transport(w, token), vm, epoch, resolve, reject });
  });
}
