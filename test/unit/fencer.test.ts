// The lease fencer's rule, with fake time, files, witness and signals.
import test from 'ava';
import { Fencer, type AgentPulse, type FencerControl, type RenewAnswer } from '../../agent/src/fence/fencer.ts';

function rig(o: { witness?: 'up' | 'down' | 'lost' } = {}) {
  let now = 1_000_000;
  const signals: string[] = [];
  const logs: string[] = [];
  const state = { witness: o.witness ?? 'up', pulse: null as AgentPulse | null, alive: true, ticks: undefined as number | undefined, stoppedAtStart: [] as number[], renewals: 0 };
  const control: FencerControl = { witness: { url: 'http://w', tokenFile: '/t', leaseMs: 1000, node: 'hostA' }, heartbeatIntervalMs: 100, vms: { vm: { epoch: 3, qemuPid: 4242, qemuStartTicks: 77 } } };
  const f = new Fencer({
    mono: () => now,
    readControl: () => control,
    readPulse: () => state.pulse,
    readToken: () => 'tok',
    renew: async (): Promise<RenewAnswer> => {
      state.renewals++;
      if (state.witness === 'down') throw new Error('connect timeout');
      if (state.witness === 'lost') return { granted: false, holder: 'hostB', epoch: 4, reason: 'stale epoch' };
      return { granted: true, holder: 'hostA', epoch: 3 };
    },
    alive: (_pid, ticks) => state.alive && ticks === (state.ticks ?? ticks),
    isStopped: (pid) => state.stoppedAtStart.includes(pid),
    signal: (pid, sig) => signals.push(`${sig} ${pid}`),
    log: (_l, msg) => logs.push(msg),
  });
  /** Run for ms of fake time in 50 ms steps, letting renewals settle. */
  const run = async (ms: number) => {
    for (let t = 0; t < ms; t += 50) { f.step(); await new Promise((r) => setImmediate(r)); now += 50; }
  };
  const pulse = (peerHeardMsAgo: number | null) => { state.pulse = { at: now, peerHeardAt: peerHeardMsAgo === null ? null : now - peerHeardMsAgo, leaseValidUntil: {}, fenced: [] }; };
  return { f, run, signals, logs, state, pulse, control, now: () => now };
}

test('a primary whose lease is renewed is never touched, agent or no agent (an agent restart)', async (t) => {
  const r = rig();
  await r.run(5000); // no pulse at all: the agent is down
  t.deepEqual(r.signals, []);
  t.true(r.f.view().vm!.validForMs! > 0);
});

test('agent hung and host cut off: the QEMU is frozen once the lease can no longer be proven (issue 11 path 8)', async (t) => {
  const r = rig();
  await r.run(1000);
  r.pulse(30); // the agent's last word, then it hangs
  r.state.witness = 'down';
  await r.run(400);
  t.deepEqual(r.signals, [], 'still within the lease');
  await r.run(1000);
  t.deepEqual(r.signals, ['SIGSTOP 4242'], 'frozen once, before the witness could grant it away');
  t.true(r.f.view().vm!.frozen);
  t.regex(r.logs.join('\n'), /FROZE the primary QEMU/);
  // the witness is back and renews: the VM is still ours
  r.state.witness = 'up';
  await r.run(300);
  t.deepEqual(r.signals, ['SIGSTOP 4242', 'SIGCONT 4242']);
});

test('the witness down while the agent hears the peer changes nothing (the peer will not take over)', async (t) => {
  const r = rig({ witness: 'down' });
  for (let i = 0; i < 60; i++) { r.pulse(40); await r.run(50); }
  t.deepEqual(r.signals, []);
});

test('the agent stops vouching (dies or hangs): frozen once its last word is three heartbeat intervals old', async (t) => {
  const r = rig({ witness: 'down' });
  r.pulse(40);
  await r.run(300);
  t.deepEqual(r.signals, []);
  await r.run(100);
  t.deepEqual(r.signals, ['SIGSTOP 4242']);
});

test('a lease granted to the other node freezes at once and stays frozen', async (t) => {
  const r = rig({ witness: 'lost' });
  r.pulse(10);
  await r.run(200);
  t.deepEqual(r.signals, ['SIGSTOP 4242']);
  await r.run(2000);
  t.deepEqual(r.signals, ['SIGSTOP 4242'], 'never thawed');
  t.regex(r.f.view().vm!.lost!, /hostB holds epoch 4/);
});

test('the agent\'s own valid lease counts: a fencer started while the witness is unreachable does not freeze a lease the agent proved', async (t) => {
  const r = rig({ witness: 'down' });
  r.state.pulse = { at: r.now(), peerHeardAt: null, leaseValidUntil: { vm: r.now() + 500 }, fenced: [] };
  await r.run(400);
  t.deepEqual(r.signals, []);
  await r.run(300);
  t.deepEqual(r.signals, ['SIGSTOP 4242']);
});

test('a frozen QEMU the agent no longer lists is left frozen and forgotten: never thawed unmanaged (review: a thawed guest nobody renews serves next to the peer)', async (t) => {
  const r = rig({ witness: 'down' });
  await r.run(1500);
  t.deepEqual(r.signals, ['SIGSTOP 4242']);
  delete r.control.vms.vm; // a restarted agent found it frozen: it lists nothing until it has the lease
  r.state.witness = 'up';
  await r.run(2000);
  t.deepEqual(r.signals, ['SIGSTOP 4242'], 'not thawed by the fencer: the agent thaws what it manages');
  t.deepEqual(r.f.view(), {});
});

test('a refusal naming this node at a newer epoch (the agent moved on, then died before telling) is adopted', async (t) => {
  const r = rig();
  let calls = 0;
  (r.f as unknown as { d: { renew: () => Promise<unknown> } }).d.renew = async () => {
    calls++;
    const asked = r.f.view().vm!.epoch;
    return asked < 4 ? { granted: false, holder: 'hostA', epoch: 4, reason: 'stale epoch 3: hostA holds epoch 4' } : { granted: true, holder: 'hostA', epoch: 4 };
  };
  await r.run(2000);
  t.true(calls > 1);
  t.is(r.f.view().vm!.epoch, 4);
  t.deepEqual(r.signals, [], 'renewed at the newer epoch: never frozen');
});

test('a QEMU that is gone, or a reused pid, is neither renewed nor signalled', async (t) => {
  const r = rig({ witness: 'down' });
  r.state.ticks = 78; // the pid now belongs to another process
  await r.run(3000);
  t.deepEqual(r.signals, []);
});

test('a restarted fencer finds the QEMU it had frozen and thaws it only on a renewal', async (t) => {
  const r = rig({ witness: 'down' });
  r.state.stoppedAtStart = [4242];
  await r.run(1000);
  t.deepEqual(r.signals, [], 'no second SIGSTOP');
  t.true(r.f.view().vm!.frozen);
  r.state.witness = 'up';
  await r.run(300);
  t.deepEqual(r.signals, ['SIGCONT 4242']);
});

test('a live agent fences by itself: the fencer stays out of its way, and steps in only if the agent fails to', async (t) => {
  const r = rig();
  await r.run(1000);
  r.state.witness = 'down';
  // the agent is alive (fresh pulse) but hears no peer, and reports the VM fenced
  const live = (fenced: string[]) => { r.state.pulse = { at: r.now(), peerHeardAt: null, leaseValidUntil: {}, fenced }; };
  for (let i = 0; i < 60; i++) { live(['vm']); await r.run(50); }
  t.deepEqual(r.signals, [], 'the agent fenced it: no SIGSTOP under its QMP commands');
  // alive but not fencing (its QMP stuck): frozen within half the margin after the validity
  const r2 = rig();
  await r2.run(1000);
  r2.state.witness = 'down';
  let frozenAfterMs = 0;
  for (let i = 0; i < 60 && r2.signals.length === 0; i++) { r2.state.pulse = { at: r2.now(), peerHeardAt: null, leaseValidUntil: {}, fenced: [] }; await r2.run(50); frozenAfterMs += 50; }
  t.deepEqual(r2.signals, ['SIGSTOP 4242']);
  t.true(frozenAfterMs < 1000 + 150, `frozen ${frozenAfterMs} ms after the witness went away: before lease (1000) + nothing`);
});

test('the fencer\'s renewals of one step go to the witness in one request; one by one when the transport cannot batch', async (t) => {
  const { coalescedRenewals } = await import('../../agent/src/fence/renewals.ts');
  const w = { url: 'http://w', tokenFile: '/t', leaseMs: 1000, node: 'hostA' };
  const calls: string[] = [];
  const mk = (batch: 'yes' | 'old' | 'none' | 'down') => ({
    acquire: async (vm: string, req: { epoch: number }) => { calls.push(`acquire ${vm}@${req.epoch}`); return { status: vm === 'db' ? 409 : 200, body: { granted: vm !== 'db', holder: vm === 'db' ? 'hostB' : 'hostA', epoch: vm === 'db' ? 9 : req.epoch, expiresInMs: 1000 } }; },
    renew: batch === 'none' ? undefined : async (leases: { vm: string; epoch: number }[]) => {
      calls.push(`renew ${leases.map((l) => `${l.vm}@${l.epoch}`).join(',')}`);
      if (batch === 'down') throw new Error('ECONNREFUSED');
      if (batch === 'old') return null;
      return leases.map((l) => ({ vm: l.vm, status: l.vm === 'db' ? 409 : 200, body: { granted: l.vm !== 'db', holder: l.vm === 'db' ? 'hostB' : 'hostA', epoch: l.vm === 'db' ? 9 : l.epoch, expiresInMs: 1000 } }));
    },
    health: async () => undefined, release: async () => ({ status: 200 }), close: () => undefined,
  });
  for (const mode of ['yes', 'old', 'none', 'down'] as const) {
    calls.length = 0;
    const renew = coalescedRenewals(() => mk(mode) as never);
    const answers = await Promise.allSettled([renew(w, 'tok', 'web1', 3), renew(w, 'tok', 'web2', 4), renew(w, 'tok', 'db', 5)]);
    if (mode === 'down') {
      t.deepEqual(calls, ['renew web1@3,web2@4,db@5']);
      t.true(answers.every((a) => a.status === 'rejected'), 'unreachable: every renewal fails (validity simply runs out)');
      continue;
    }
    t.deepEqual(calls, mode === 'yes' ? ['renew web1@3,web2@4,db@5'] : [...(mode === 'old' ? ['renew web1@3,web2@4,db@5'] : []), 'acquire web1@3', 'acquire web2@4', 'acquire db@5'], mode);
    t.deepEqual(answers.map((a) => (a.status === 'fulfilled' ? `${a.value.granted}:${a.value.holder}@${a.value.epoch}` : 'rejected')), ['true:hostA@3', 'true:hostA@4', 'false:hostB@9'], mode);
  }
});

test('while the agent renews the lease itself the fencer sends nothing; it takes over the renewals when the agent stops, with time to spare', async (t) => {
  const r = rig();
  // The agent renews every 200 ms: its pulse (every 100 ms) counts the lease valid 500-700 ms ahead.
  const agentPulse = (sentAgo: number) => { r.state.pulse = { at: r.now(), peerHeardAt: r.now() - 20, leaseValidUntil: { vm: r.now() - sentAgo + 700 }, fenced: [] }; };
  for (let i = 0; i < 40; i++) { agentPulse((i * 50) % 200); await r.run(50); }
  t.is(r.state.renewals, 0, 'no renewal of the fencer\'s own while the agent keeps the lease');
  // The agent dies right after a renewal it sent 190 ms ago; its lease stays valid 510 ms more.
  agentPulse(190);
  r.state.pulse = { ...r.state.pulse!, peerHeardAt: null };
  await r.run(250);
  t.true(r.state.renewals >= 1, 'the fencer renews once the agent has gone quiet');
  await r.run(3000);
  t.deepEqual(r.signals, [], 'never frozen: the lease was renewed before the agent\'s validity ran out');
  t.true(r.f.view().vm!.validForMs! > 0);
  t.true(r.state.renewals >= 10, `renewing on its own since (${r.state.renewals})`);
});

test('a lapse counts from the end of the validity the agent proved: an agent fencing at that moment is not frozen before its next pulse says so (simulation seed 187)', async (t) => {
  const r = rig({ witness: 'down' });
  // The agent renewed (its pulse proves the lease valid 300 ms ahead) and hears no peer.
  const live = (validUntil: number | null, fenced: string[]) => { r.state.pulse = { at: r.now(), peerHeardAt: null, leaseValidUntil: validUntil === null ? {} : { vm: validUntil }, fenced }; };
  const end = r.now() + 300;
  for (let i = 0; i < 6; i++) { live(end, []); await r.run(50); }
  // Its lease ran out: the pulse now says null, the agent is about to fence (its pulse lags a step).
  live(null, []);
  await r.run(100);
  t.deepEqual(r.signals, [], 'within the margin after the proven validity: the agent fences by itself');
  for (let i = 0; i < 40; i++) { live(null, ['vm']); await r.run(50); }
  t.deepEqual(r.signals, [], 'the agent said it fenced: no SIGSTOP under its QMP commands');
  // Had the agent not fenced, the fencer freezes once the margin (less two steps) has passed.
  const r2 = rig({ witness: 'down' });
  const end2 = r2.now() + 300;
  r2.state.pulse = { at: r2.now(), peerHeardAt: null, leaseValidUntil: { vm: end2 }, fenced: [] };
  await r2.run(300);
  let ms = 0;
  for (; ms < 1000 && r2.signals.length === 0; ms += 50) { r2.state.pulse = { at: r2.now(), peerHeardAt: null, leaseValidUntil: {}, fenced: [] }; await r2.run(50); }
  t.deepEqual(r2.signals, ['SIGSTOP 4242']);
  t.true(ms >= 150 && ms <= 300, `frozen ${ms} ms after the validity ended (margin 300 ms less two steps)`);
});

test('a QEMU frozen under a live agent is thawed once the agent renews the lease (a hung agent continued, or the witness came back while the agent does the renewing)', async (t) => {
  const r = rig();
  await r.run(1000);
  r.pulse(30); // the agent's last word, then it hangs; the witness is unreachable
  r.state.witness = 'down';
  await r.run(1500);
  t.deepEqual(r.signals, ['SIGSTOP 4242']);
  // The agent continues and the witness answers it: its pulses prove the lease valid again, so the
  // fencer sends no renewal of its own (agentRenews) and only the agent's proof can thaw.
  r.state.witness = 'up';
  const renewalsBefore = r.state.renewals;
  r.state.pulse = { at: r.now(), peerHeardAt: null, leaseValidUntil: { vm: r.now() + 700 }, fenced: [] };
  await r.run(50);
  t.deepEqual(r.signals, ['SIGSTOP 4242', 'SIGCONT 4242']);
  t.is(r.state.renewals, renewalsBefore, 'thawed on the agent\'s proof, not the fencer\'s own renewal');
  t.regex(r.logs.join('\n'), /thawed the primary QEMU \(SIGCONT\): the agent renewed its lease/);
  // An old pulse whose validity has passed proves nothing; a lost lease is never thawed.
  const r2 = rig({ witness: 'lost' });
  r2.pulse(10);
  await r2.run(200);
  r2.state.pulse = { at: r2.now(), peerHeardAt: null, leaseValidUntil: { vm: r2.now() + 700 }, fenced: [] };
  await r2.run(500);
  t.deepEqual(r2.signals, ['SIGSTOP 4242'], 'lost to hostB: stays frozen whatever the agent says');
});
