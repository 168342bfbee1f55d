// Action: cold start as primary (after the election in decide()), and booting a guest held
// paused for a protection that cannot begin.
import { errorMessage } from '../../../util/errors.ts';
import type { VmCore } from '../core.ts';
import { launch } from '../lifecycle.ts';


export async function coldStart(c: VmCore, why: string): Promise<void> {
  const dur = c.durable();
  const epoch = dur.epoch + 1;
  const g = await c.d.gate.acquire(c.name, epoch, why);
  if (!g.granted) {
    c.nextStartAt = c.d.clock.mono() + 2000;
    if (c.lastRefusal !== g.reason) c.log.warn('not starting the VM', { why, refused: g.reason });
    c.lastRefusal = g.reason;
    c.lastWhy = `not starting: ${g.reason}`;
    return;
  }
  c.lastRefusal = null;
  c.setState('starting', why);
  c.persist({ epoch: g.epoch, primaryEpoch: g.epoch, role: 'primary', fenced: false });
  // With the peer up, boot paused: the replica is built before the first instruction runs.
  const peerUp = c.d.peerView().alive;
  try {
    await launch(c, 'primary', peerUp);
  } catch (e) {
    c.nextStartAt = c.d.clock.mono() + 5000;
    c.setState('stopped', `start failed: ${errorMessage(e)}`);
    return;
  }
  c.nextProtectAt = 0;
  c.bootHeldSince = peerUp ? c.d.clock.mono() : null;
  c.setState('standalone', peerUp ? `started paused at epoch ${g.epoch}; protecting before first boot` : `started at epoch ${g.epoch} (${why})`);
}

/** A guest held paused for a protection that cannot begin: boot it unprotected. */
export async function bootUnprotected(c: VmCore, why: string): Promise<void> {
  const q = c.qemu?.qmp;
  if (!q || c.durable().fenced) return;
  const st = await q.execute<{ running: boolean }>('query-status');
  if (!st.running) await q.execute('cont');
  c.bootHeldSince = null;
  c.log.warn('guest booted unprotected', { why });
  c.setState('standalone', `booted unprotected: ${why}`);
}
