// The lease fencer of one host in the simulation: the production Fencer (fence/fencer.ts) with
// its files replaced by what the agent last published, its witness calls on the simulated
// network, and SIGSTOP/SIGCONT acting on the QEMU model. It outlives the agent; a host crash
// ends it, and the next agent start starts a new one.
import { Fencer } from '../../agent/src/fence/fencer.ts';
import type { SimHost, SimWorldPorts } from './agent.ts';

export class SimFencer {
  private readonly f: Fencer;
  private timer: ReturnType<typeof setInterval>;
  alive = true;

  constructor(host: SimHost, w: SimWorldPorts) {
    const h = host.id;
    this.f = new Fencer({
      mono: () => performance.now(),
      readControl: () => host.fencerControl,
      readPulse: () => host.fencerPulse,
      readToken: () => 'sim',
      renew: async (_w, _token, vm, epoch) => {
        const r = await w.net.exchange('fencer renew', h, 'W', 'mgmt', () => w.witness.up, () => w.witness.acquire(vm, { node: host.fencerControl!.witness!.node, epoch, leaseMs: host.fencerControl!.witness!.leaseMs }), 400, 400);
        return { granted: r.body.granted, holder: r.body.holder, epoch: r.body.epoch, reason: r.body.reason };
      },
      alive: (pid) => !!host.qemu && host.qemu.pid === pid && host.qemu.isAlive,
      isStopped: (pid) => !!host.qemu && host.qemu.pid === pid && host.qemu.frozen,
      signal: (pid, sig) => { const q = host.qemu; if (q && q.pid === pid) q.frozen = sig === 'SIGSTOP'; },
      log: (level, msg, fields) => w.log(`${h} fencer ${level}: ${msg} ${JSON.stringify(fields ?? {})}`),
    });
    this.timer = setInterval(() => { if (this.alive) this.f.step(); }, 50);
  }

  stop(): void { this.alive = false; clearInterval(this.timer); }
}
