// Staying protected through the life of a pair: repeated failover + re-protection, planned
// switchover, agent restarts that never touch the guest, and a resync failing midway.
import test from 'ava';
import { withPair, sleep, firstGap } from '../helpers/system.ts';
import { other, waitUntil, type AgentPair, type H } from '../../lab/pair.ts';
import { SerialWatcher, TxnClient } from '../../lab/traffic.ts';
import type { OperationReport } from '../../agent/src/ops/operations.ts';
import { vmPorts } from '../../agent/src/colo/ports.ts';
import { execFile } from 'node:child_process';
import { appendFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';

function maxGap(ticks: { at: number }[]): number {
  return Math.max(0, ...ticks.slice(1).map((x, i) => x.at - ticks[i]!.at));
}

/** A client with one long-lived connection, older than a checkpoint (see AgentPair.waitCheckpointAfter). */
async function startClient(p: AgentPair, vm: string): Promise<TxnClient> {
  const c = new TxnClient(p.guestIp(vm), 7000, 20);
  const openedAt = Date.now();
  await c.open();
  c.start();
  await waitUntil(() => c.txns.length >= 10 || undefined, 60_000, 'transactions flowing');
  await p.waitCheckpointAfter(vm, openedAt);
  return c;
}

/** What to print when a client stops hearing from the guest after a failover: its view, and each QEMU's. */
async function silentClientReport(p: AgentPair, c: TxnClient, killedAt: number, hosts: H[]): Promise<string> {
  const lines = [`client: ${c.txns.length} transactions, ${c.txns.filter((x) => x.ackAt > killedAt).length} after the kill, ` +
    `errors ${JSON.stringify(c.errors)}, last ${JSON.stringify(c.txns.at(-1))}, kill at ${killedAt}`];
  // The client's own TCP view: retransmissions, backoff, what is unacknowledged.
  const ss = await promisify(execFile)('ss', ['-tnio', 'dst', `${p.guestIp('vm')}:7000`]).then((r) => r.stdout.trim(), (e) => String(e));
  lines.push(`client socket (ss -tnio):\n${ss}`);
  for (const h of hosts) {
    lines.push(await p.inspect(h, 'vm'));
    const fdb = await p.tb.exec(h, 'bridge', ['fdb', 'show', 'br', p.tb.guestBridge])
      .then((out) => out.split('\n').filter((l) => l && !/permanent/.test(l)).join('; '), (e) => String(e));
    lines.push(`${h} bridge FDB (learned): ${fdb}`);
  }
  return lines.join('\n');
}

function assertTransactions(t: import('ava').ExecutionContext, c: TxnClient): void {
  t.deepEqual(c.errors, [], 'the TCP connection was never reset');
  t.is(c.connects, 1, 'one connection for the whole test');
  const gap = firstGap(c.txns.map((x) => x.value));
  t.is(gap, null, `every acknowledged transaction kept, in order: ${JSON.stringify(gap)}`);
}

test('five rounds: fail A, re-protect on A, fail B, re-protect on B, …: no acknowledged value lost, counters never go back', async (t) => {
  t.timeout(900_000);
  await withPair(t, 61, { vms: [{ name: 'vm', guestIp: 10, basePort: 19000 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    let primary: H = await p.waitProtected('vm');
    await p.waitGuestService('vm');
    const client = await startClient(p, 'vm');
    const serial: Record<H, SerialWatcher> = { A: new SerialWatcher(p.serialLog('A', 'vm')), B: new SerialWatcher(p.serialLog('B', 'vm')) };
    const rounds: string[] = [];
    for (let r = 1; r <= 5; r++) {
      await sleep(2500);
      const st = (await p.vmStatus(primary, 'vm'))!;
      const ckptAt = st.checkpoints.lastAt!;
      const checkpointedTick = [...serial[primary].ticks()].reverse().find((x) => x.at <= ckptAt)?.n ?? 0;
      const killedAt = Date.now();
      p.killHost(primary);
      const survivor = other(primary);
      await waitUntil(async () => (await p.vmStatus(survivor, 'vm'))?.state === 'standalone' || undefined, 30_000, `round ${r}: ${survivor} takes over`);
      const firstAfter = await waitUntil(() => client.firstAckAfter(killedAt), 30_000, 'a transaction after the failover').catch(async (e) => {
        t.log(`round ${r}: ${await silentClientReport(p, client, killedAt, [survivor])}`);
        throw e;
      });
      const resumed = await waitUntil(() => serial[survivor].ticks().find((x) => x.at > killedAt), 10_000, 'a tick on the survivor');
      t.true(resumed.n > checkpointedTick, `round ${r}: survivor resumed at tick ${resumed.n} > last checkpointed tick ${checkpointedTick}`);
      p.startAgent(primary); // the failed host comes back
      const t0 = Date.now();
      const newPrimary = await p.waitProtected('vm', 180_000);
      t.is(newPrimary, survivor, `round ${r}: protection rebuilt onto the old primary`);
      const s2 = (await p.vmStatus(survivor, 'vm'))!;
      rounds.push(`round ${r}: ${primary} killed, ${survivor} served after ${firstAfter.ackAt - killedAt} ms, re-protected in ${Date.now() - t0} ms (epoch ${s2.epoch})`);
      primary = survivor;
    }
    await client.stop();
    for (const h of ['A', 'B'] as const) serial[h].stop();
    assertTransactions(t, client);
    t.true((await client.get()) >= client.txns.at(-1)!.value, 'durable counter >= last acknowledged');
    t.is((await p.vmStatus(primary, 'vm'))!.epoch, 6, 'five promotions after the first start');
    t.log(rounds.join('\n'));
    t.log(`${client.txns.length} transactions over one connection`);
    client.close();
  });
});

test('planned switchover: the primary role moves and protection returns, with no transaction lost or connection reset', async (t) => {
  t.timeout(300_000);
  await withPair(t, 62, { vms: [{ name: 'vm', guestIp: 10, basePort: 19000 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('vm'), 'A');
    await p.waitGuestService('vm');
    const client = await startClient(p, 'vm');
    const t0 = Date.now();
    const r = await p.cli('A', ['switchover', 'vm', '--wait', '--json']);
    t.is(r.code, 0, r.stderr + r.stdout.slice(-1500));
    const rep = JSON.parse(r.stdout) as OperationReport;
    t.is(rep.kind, 'switchover');
    t.is(rep.verdict, 'pass', rep.reasons.join('; '));
    t.is(rep.newPrimary, 'hostB');
    t.true(rep.progress.some((x) => /handover: guest tap down and a checkpoint taken/.test(x.msg)), 'the replica was made this guest exactly before the crash');
    const killed = rep.progress.find((x) => /killing the primary QEMU/.test(x.msg))!.at;
    // a request in flight at the switchover is retransmitted by the client's TCP (backoff)
    await waitUntil(() => client.txns.filter((x) => x.ackAt > killed).length >= 10 || undefined, 60_000, 'transactions after the switchover').catch(async (e) => {
      t.log(await silentClientReport(p, client, killed, ['B', 'A']));
      throw e;
    });
    await client.stop();
    assertTransactions(t, client);
    t.is((await p.vmStatus('B', 'vm'))!.state, 'protected');
    t.is((await p.vmStatus('A', 'vm'))!.state, 'secondary');
    t.log(`switchover A→B: ${rep.failover.takeoverSeenMs} ms to takeover, first transaction on B ${client.firstAckAfter(killed)!.ackAt - killed} ms after, re-protected onto A after ${rep.reprotect.ms} ms; whole command ${Date.now() - t0} ms`);
    // refused when not fully protected: ask again at once on B while A is... protected now; kill A's replica first
    p.killQemu('A', 'vm');
    await waitUntil(async () => (await p.vmStatus('A', 'vm'))?.state === 'stopped' || undefined, 10_000, 'replica gone');
    const refused = await p.cli('B', ['switchover', 'vm']);
    t.is(refused.code, 5);
    t.regex(refused.stderr, /switchover refused \(409 NOT_PROTECTED\): vm is not fully protected/);
    client.close();
  });
});

test('agent SIGKILL + restart on the primary, then on the secondary: same QEMUs, no failover, no resync, guest never paused beyond a checkpoint', async (t) => {
  t.timeout(300_000);
  await withPair(t, 63, { vms: [{ name: 'vm', guestIp: 10, basePort: 19000 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('vm'), 'A');
    await p.waitGuestService('vm');
    const pids = { A: p.qemuPid('A', 'vm'), B: p.qemuPid('B', 'vm') };
    const serial = new SerialWatcher(p.serialLog('A', 'vm'));
    const client = await startClient(p, 'vm');
    for (const h of ['A', 'B'] as const) {
      const before = (await p.vmStatus('A', 'vm'))!.checkpoints.count;
      p.killAgent(h);
      await sleep(3000); // six heartbeat timeouts without that agent
      const other_ = (await p.vmStatus(other(h), 'vm'))!;
      t.is(other_.state, other(h) === 'A' ? 'protected' : 'secondary', `${other(h)} kept its role while ${h}'s agent was dead`);
      p.startAgent(h);
      const back = await waitUntil(async () => { const s = await p.vmStatus(h, 'vm'); return s?.qemu?.reattached ? s : undefined; }, 30_000, `${h} re-attached`);
      t.is(back.state, h === 'A' ? 'protected' : 'secondary');
      await sleep(3000);
      t.true((await p.vmStatus('A', 'vm'))!.checkpoints.count > (h === 'A' ? 0 : before), 'checkpoints continue');
    }
    await client.stop();
    serial.stop();
    t.deepEqual({ A: p.qemuPid('A', 'vm'), B: p.qemuPid('B', 'vm') }, pids, 'the same QEMU processes throughout');
    for (const h of ['A', 'B'] as const) t.is((await p.vmStatus(h, 'vm'))!.lastFailover, null, `${h}: no failover`);
    assertTransactions(t, client);
    const ticks = serial.ticks();
    t.is(firstGap(ticks.map((x) => x.n)), null);
    const gap = maxGap(ticks);
    t.true(gap < 2000, `longest pause of the guest ${gap} ms (checkpoint period 2000 ms)`);
    t.log(`agents of A then B killed and restarted: longest guest pause ${gap} ms, ${ticks.length} ticks, ${client.txns.length} transactions, QEMU pids kept ${JSON.stringify(pids)}`);
    client.close();
  });
});

test('a resync that fails midway leaves the primary running, unprotected, and is retried until protected', async (t) => {
  t.timeout(600_000);
  await withPair(t, 64, { randomDiskMib: 48, vms: [{ name: 'vm', guestIp: 10, basePort: 19000 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('vm'), 'A');
    await p.waitGuestService('vm');
    const serial = new SerialWatcher(p.serialLog('A', 'vm'));
    // B's host dies; while it is away the replication link gets slow
    p.killHost('B');
    await waitUntil(async () => (await p.vmStatus('A', 'vm'))?.state === 'standalone' || undefined, 30_000, 'A alone');
    await p.tb.rateLimitRepl('16mbit');
    p.startAgent('B');
    const mid = await waitUntil(async () => { const s = await p.vmStatus('A', 'vm'); return s?.resync?.phase === 'mirroring' && s.resync.bytesDone > 4 << 20 ? s : undefined; }, 120_000, 'resync under way');
    const rs = mid.resync!;
    // the mirror job's total is the disk plus blocks the guest rewrote after they were copied
    t.true(rs.bytesTotal >= 48 << 20 && rs.bytesTotal < 56 << 20, `resync total ${rs.bytesTotal} bytes for a 48 MiB disk`);
    t.true(rs.rateBytesPerS > 0 && rs.etaS !== null, JSON.stringify(rs));
    const metrics = await (await fetch(`${p.apiBase('A')}/metrics`)).text();
    t.regex(metrics, /ftkvm_resync_remaining_bytes\{vm="vm"\} [1-9]/);
    // An earlier attempt may have failed already (CI: B, just restarted, discarded its new replica
    // on a stale heartbeat of A): wait for the failure this kill causes, not that one.
    const errBefore = mid.lastProtectError;
    p.killQemu('B', 'vm'); // the new secondary dies in the middle of the copy
    const failed = await waitUntil(async () => { const s = await p.vmStatus('A', 'vm'); return s?.lastProtectError && s.lastProtectError !== errBefore ? s : undefined; }, 60_000, 'protection attempt failed');
    t.is(failed.state, 'standalone');
    t.is(failed.qemu?.runState, 'running', 'never left paused');
    t.log(`resync at ${(rs.bytesDone / (1 << 20)).toFixed(1)}/${rs.bytesTotal >> 20} MiB, ${(rs.rateBytesPerS / 1e6).toFixed(2)} MB/s, eta ${rs.etaS} s when the secondary died; error: ${failed.lastProtectError}`);
    await p.tb.rateLimitRepl(null);
    await p.waitProtected('vm', 180_000);
    await sleep(1000);
    serial.stop();
    const ticks = serial.ticks();
    t.is(firstGap(ticks.map((x) => x.n)), null);
    const gap = maxGap(ticks);
    t.true(gap < 3000, `longest guest pause ${gap} ms (includes the final protection's first checkpoint)`);
    t.log(`guest ticked ${ticks.length} times, longest pause ${gap} ms`);
  });
});

test('a replica whose QEMU logs a device error is not trusted: dropped and rebuilt while the guest keeps serving', async (t) => {
  t.timeout(300_000);
  await withPair(t, 65, { vms: [{ name: 'vm', guestIp: 10, basePort: 19000 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('vm'), 'A');
    await p.waitGuestService('vm');
    const c = await startClient(p, 'vm');
    const oldPid = p.qemuPid('B', 'vm');
    // What QEMU's virtio_error() prints when the replica's copy of a ring is garbage; the device
    // is then broken for good (README: replica health). Written where B's QEMU logs.
    const injectedAt = Date.now();
    appendFileSync(join(p.stateDir('B'), 'vms', 'vm', 'qemu.log'), `${new Date().toISOString()} qemu-system-x86_64: virtio: zero sized buffers are not allowed\n`);
    const dropped = await waitUntil(async () => { const s = await p.vmStatus('A', 'vm'); return s?.lastFailover?.kind === 'secondary-dropped' && s.lastFailover.at > injectedAt ? s : undefined; }, 30_000, 'A drops the sick replica');
    t.regex(dropped.lastFailover!.reason, /sick: device error in the secondary's QEMU .*zero sized buffers/);
    t.is(await p.waitProtected('vm', 120_000), 'A', 'protection rebuilt, A still primary');
    t.not(p.qemuPid('B', 'vm'), oldPid, 'a new replica QEMU');
    const b = (await p.vmStatus('B', 'vm'))!;
    t.is(b.sick, null, 'the new replica is trusted');
    t.deepEqual(b.brokenDevices, [], 'and QEMU reports no broken device');
    const n = c.txns.length;
    await waitUntil(() => c.txns.length >= n + 10 || undefined, 30_000, 'transactions after the rebuild');
    await c.stop();
    assertTransactions(t, c);
    c.close();
  });
});

test('a replica whose output never reaches colo-compare is found by replies leaving only at checkpoints, dropped and rebuilt', async (t) => {
  t.timeout(300_000);
  await withPair(t, 66, { vms: [{ name: 'vm', guestIp: 10, basePort: 19000 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('vm'), 'A');
    await p.waitGuestService('vm');
    const c = await startClient(p, 'vm');
    const healthyFrom = Date.now();
    await sleep(6000); // healthy: several checkpoints with output matched between them
    t.false(((await p.vmStatus('A', 'vm'))!.lastFailover?.at ?? 0) > healthyFrom, 'a healthy replica is never distrusted');
    const oldPid = p.qemuPid('B', 'vm');
    // The replica's guest output (B's redirector → A's compare1 socket) is lost on the way, as
    // from a replica whose NIC is dead: colo-compare holds each reply of the primary until the
    // next periodic checkpoint, and checkpoints stay periodic (no storm, no stall).
    const cutAt = Date.now();
    await p.tb.dropReplTcp('B', vmPorts(19000).compare1);
    const dropped = await waitUntil(async () => { const s = await p.vmStatus('A', 'vm'); return s?.lastFailover?.kind === 'secondary-dropped' && s.lastFailover.at > cutAt ? s : undefined; }, 60_000, 'A drops the silent replica');
    t.regex(dropped.lastFailover!.reason, /secondary not trusted: the secondary sent no output to colo-compare for [0-9.]+ s while the guest sent [0-9]+ packets/);
    const slow = c.txns.filter((x) => x.sentAt > cutAt && x.ackAt < dropped.lastFailover!.at);
    t.true(slow.every((x) => x.ackAt - x.sentAt > 300), `replies were held meanwhile: ${JSON.stringify(slow.map((x) => x.ackAt - x.sentAt))}`);
    t.log(`silent-replica verdict ${dropped.lastFailover!.at - cutAt} ms after the replica went silent; ${slow.length} transactions held meanwhile`);
    await p.tb.restoreAll();
    t.is(await p.waitProtected('vm', 120_000), 'A');
    t.not(p.qemuPid('B', 'vm'), oldPid, 'a new replica QEMU');
    const n = c.txns.length;
    await waitUntil(() => c.txns.length >= n + 20 || undefined, 30_000, 'transactions after the rebuild');
    const fast = c.txns.slice(n);
    t.true(fast.filter((x) => x.ackAt - x.sentAt < 300).length >= fast.length / 2, 'replies matched again, not held until checkpoints');
    await c.stop();
    assertTransactions(t, c);
    c.close();
  });
});

// Issue 11 path 9: a node must never resume a copy it knows is corrupt. Seen with a database
// guest under TCG: the replica's console showed a kernel BUG 0.07 s after the primary's host was
// cut; it took over anyway 0.5 s later, the guest panicked, and status reported a plain takeover.
test('a replica known to be corrupt is never resumed: the primary lost, the guest restarts from the replicated disk with every acknowledged transaction (a degraded failover, reported)', async (t) => {
  t.timeout(300_000);
  await withPair(t, 67, { vms: [{ name: 'vm', guestIp: 10, basePort: 19000 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('vm'), 'A');
    await p.waitGuestService('vm');
    const c = await startClient(p, 'vm');
    const replicaPid = p.qemuPid('B', 'vm');
    // The primary's host dies first (so nobody drops the replica), then the replica's guest
    // kernel shows what a diverged copy shows: sick long before the loss is even detected.
    p.killHost('A');
    await p.tb.isolate('A');
    const lostAt = Date.now();
    appendFileSync(p.serialLog('B', 'vm'), 'BUG: unable to handle page fault for address: ffff888000000000\n');
    const b = await waitUntil(async () => { const s = await p.vmStatus('B', 'vm'); return s?.lastFailover?.kind === 'restart-from-disk' ? s : undefined; }, 60_000, 'B restarts the guest from its disk');
    t.regex(b.lastFailover!.reason, /not trusted \(guest kernel error.*BUG: unable to handle/);
    await c.stop();
    c.close();
    const lastAcked = c.txns.at(-1)!.value;
    t.not(p.qemuPid('B', 'vm'), replicaPid, 'the replica QEMU was not resumed: a new one booted');
    t.is((await p.vmStatus('B', 'vm'))!.state, 'standalone');
    // The guest rebooted from B's disk, which received every write of the primary.
    const after = new TxnClient(p.guestIp('vm'));
    await after.open(120_000);
    const counter = await after.get();
    after.close();
    t.true(counter >= lastAcked, `the durable counter (${counter}) holds every acknowledged transaction (last ${lastAcked})`);
    const metrics = await (await fetch(`${p.apiBase('B')}/metrics`)).text();
    t.regex(metrics, /ftkvm_failovers_total\{vm="vm",reason="degraded-restart"\} 1/);
    t.log(`degraded failover: guest serving again ${Date.now() - lostAt} ms after the loss; counter ${counter} >= last acknowledged ${lastAcked}`);
  });
});
