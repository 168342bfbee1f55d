// COLO protection across two hosts: real agents (the single executable), real QEMU 7.2 under
// TCG, the real guest, hosts as network namespaces, failures by SIGKILL and nft.
import test from 'ava';
import { withPair, sleep, firstGap } from '../helpers/system.ts';
import { waitUntil, type AgentPair, type H } from '../../lab/pair.ts';
import { SerialWatcher, TxnClient } from '../../lab/traffic.ts';

async function lastCheckpointAt(p: AgentPair, h: H, vm: string): Promise<number> {
  return (await p.vmStatus(h, vm))!.checkpoints.lastAt!;
}

test('primary host lost: the secondary takes over, the TCP connection and every acknowledged transaction survive (2 vCPUs)', async (t) => {
  t.timeout(300_000);
  // colo.resync full (the default), explicitly: this test covers the drive-mirror path.
  await withPair(t, 11, { vms: [{ name: 'web', vcpus: 2, guestIp: 10, basePort: 19000 }], colo: { resync: 'full' } }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    const prim = await p.waitProtected('web');
    t.is(prim, 'A', 'the preferred primary runs the VM');
    const client = new TxnClient(p.guestIp('web'));
    await client.open();
    client.start();
    const serialA = new SerialWatcher(p.serialLog('A', 'web'));
    const serialB = new SerialWatcher(p.serialLog('B', 'web'));
    await waitUntil(() => client.txns.length >= 30 || undefined, 60_000, '30 transactions');
    await sleep(1500);
    const ckptAt = await lastCheckpointAt(p, 'A', 'web');
    const killedAt = Date.now();
    p.killHost('A'); // SIGKILL QEMU and agent
    await waitUntil(async () => (await p.vmStatus('B', 'web'))?.state === 'standalone' || undefined, 30_000, 'B standalone');
    await waitUntil(() => client.txns.filter((x) => x.ackAt > killedAt).length >= 20 || undefined, 60_000, '20 transactions after failover');
    await sleep(1000);
    await client.stop();
    serialA.stop(); serialB.stop();

    // TCP: one connection, no reset, no reconnect, every value exactly once and in order.
    t.deepEqual(client.errors, []);
    t.is(client.connects, 1);
    const values = client.txns.map((x) => x.value);
    t.is(firstGap(values), null, `acknowledged values must be consecutive: ${JSON.stringify(firstGap(values))}`);
    const before = client.lastAckBefore(killedAt)!, after = client.firstAckAfter(killedAt)!;
    t.is(after.value, before.value + 1, 'first value after failover follows the last acknowledged one');
    const durable = await client.get();
    t.true(durable >= values.at(-1)!, `guest durable counter ${durable} >= last acknowledged ${values.at(-1)}`);
    client.close();

    // Guest console and disk on the survivor: progress, consistent, never behind the last checkpoint.
    const ticksA = serialA.ticks(), ticksB = serialB.ticks().filter((x) => x.at > killedAt);
    t.true(ticksB.length >= 10, `guest ticks on B after failover: ${ticksB.length}`);
    t.is(firstGap(ticksB.map((x) => x.n)), null, 'ticks on the survivor are consecutive');
    t.true(ticksB.every((x) => x.disk === x.n), 'each tick read its own value back from the disk');
    const atCheckpoint = [...ticksA].reverse().find((x) => x.at <= ckptAt)?.n ?? 0;
    t.true(ticksB[0]!.n > atCheckpoint, `survivor resumed at tick ${ticksB[0]!.n}, after the last checkpointed tick ${atCheckpoint}`);

    const st = (await p.vmStatus('B', 'web'))!;
    t.is(st.role, 'standalone');
    t.is(st.epoch, 2);
    t.is(st.lastFailover?.kind, 'takeover');
    t.deepEqual(st.lastTakeover, st.lastFailover, 'the takeover is also the last takeover');
    const failoverMs = ticksB[0]!.at - killedAt;
    const txnGapMs = after.ackAt - before.ackAt;
    t.log(`failover: first guest tick on B ${failoverMs} ms after SIGKILL; transaction gap ${txnGapMs} ms; ` +
      `detection ${st.lastFailover?.detectionMs} ms, takeover sequence ${st.lastFailover?.sequenceMs} ms; ` +
      `A printed up to tick ${ticksA.at(-1)?.n}, B resumed at ${ticksB[0]!.n}; ${values.length} transactions`);
  });
});

test('secondary host lost: the primary continues unprotected, health turns 503 with the reason', async (t) => {
  t.timeout(300_000);
  await withPair(t, 12, { vms: [{ name: 'db', guestIp: 20, basePort: 19100 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('db'), 'A');
    t.is((await p.health('A'))!.status, 200);
    const client = new TxnClient(p.guestIp('db'));
    await client.open();
    client.start();
    const serialA = new SerialWatcher(p.serialLog('A', 'db'));
    await waitUntil(() => client.txns.length >= 20 || undefined, 60_000, '20 transactions');
    const killedAt = Date.now();
    p.killHost('B');
    await waitUntil(async () => (await p.vmStatus('A', 'db'))?.state === 'standalone' || undefined, 30_000, 'A standalone');
    // COLO_EXIT can make A drop the secondary before the heartbeat timeout declares B silent.
    const h = await waitUntil(async () => { const x = await p.health('A'); return x?.json.problems.some((y) => y.subject === 'peer') ? x : undefined; }, 10_000, 'peer reported silent');
    t.is(h.status, 503);
    t.true(h.json.problems.some((x) => x.subject === 'peer' && /silent on all 2 heartbeat paths/.test(x.reason)), JSON.stringify(h.json));
    t.true(h.json.problems.some((x) => x.subject === 'vm/db' && /standalone/.test(x.reason)), JSON.stringify(h.json));
    await waitUntil(() => client.txns.filter((x) => x.ackAt > killedAt).length >= 20 || undefined, 60_000, 'transactions after the secondary died');
    // 20 transactions can take less than a second; the guest ticks about every 100 ms
    await waitUntil(() => serialA.ticks().filter((x) => x.at > killedAt).length >= 10 || undefined, 30_000, 'ten guest ticks after the secondary died');
    await client.stop();
    serialA.stop();
    t.deepEqual(client.errors, []);
    t.is(firstGap(client.txns.map((x) => x.value)), null);
    const ticks = serialA.ticks().filter((x) => x.at > killedAt);
    t.true(ticks.length >= 10, `${ticks.length} ticks after the loss`);
    t.is(firstGap(ticks.map((x) => x.n)), null);
    const st = (await p.vmStatus('A', 'db'))!;
    t.is(st.lastFailover?.kind, 'secondary-dropped');
    t.is(st.epoch, 1, 'dropping a secondary is not a promotion');
    t.log(`primary continued; transaction gap around the loss: ${client.firstAckAfter(killedAt)!.ackAt - client.lastAckBefore(killedAt)!.ackAt} ms; ` +
      `drop decided ${st.lastFailover?.detectionMs} ms after the last heartbeat, sequence ${st.lastFailover?.sequenceMs} ms`);
    client.close();
  });
});

test('one cut link: management → nothing happens; replication → primary drops the replica, no takeover, re-protects on repair; both cut → failover (two-node mode)', async (t) => {
  t.timeout(300_000);
  await withPair(t, 13, { vms: [{ name: 'app', guestIp: 30, basePort: 19200 }] }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('app'), 'A');
    const ck0 = (await p.vmStatus('A', 'app'))!.checkpoints.count;

    // 1. management link cut: heartbeats continue on the replication network.
    await p.tb.cut('mgmt');
    await sleep(5000); // ten heartbeat timeouts
    const [a, b] = [(await p.vmStatus('A', 'app'))!, (await p.vmStatus('B', 'app'))!];
    t.is(a.state, 'protected');
    t.is(b.state, 'secondary');
    t.true(a.checkpoints.count > ck0, 'checkpoints continue');
    t.is(a.lastFailover, null);
    const st = (await p.status('B'))!;
    t.true(st.peer.alive);
    t.true(st.peer.paths[0]!.up, 'replication path up');
    t.false(st.peer.paths[1]!.up, 'management path down');
    const h = (await p.health('A'))!;
    t.is(h.status, 200);
    t.true(h.json.warnings.some((w) => /heartbeat path 1 .* silent/.test(w.reason)), JSON.stringify(h.json.warnings));
    await p.tb.restore('mgmt');

    // 2. replication link cut: COLO cannot continue; the peer is still heard, so nobody takes over.
    const serial = new SerialWatcher(p.serialLog('A', 'app'));
    const replCutAt = Date.now();
    await p.tb.cut('repl');
    const dropped = await waitUntil(async () => { const x = await p.vmStatus('A', 'app'); return x?.state === 'standalone' ? x : undefined; }, 30_000, 'A drops its replica');
    const droppedSeenAt = Date.now();
    t.regex(dropped.lastFailover!.reason, /replication network to the peer is down/);
    await waitUntil(async () => (await p.vmStatus('B', 'app'))?.state === 'stopped' || undefined, 30_000, 'B discards its replica');
    t.is((await p.vmStatus('B', 'app'))!.epoch, 1, 'B did not promote itself');
    // Watch the guest for 3 s after the drop (not after the cut: the drop can take < 1 s).
    await sleep(Math.max(0, droppedSeenAt + 3000 - Date.now()));
    serial.stop();
    const ticks = serial.ticks();
    const longest = Math.max(...ticks.slice(1).map((x, i) => x.at - ticks[i]!.at));
    const ticksAfterDrop = ticks.filter((x) => x.at > droppedSeenAt + 500).length;
    t.true(ticksAfterDrop >= 5, `guest keeps running on A: ${ticksAfterDrop} ticks in the 2.5 s after the drop`);
    t.log(`replication link cut: replica dropped ${dropped.lastFailover!.at - replCutAt} ms after the cut; longest guest pause ${longest} ms`);
    await p.tb.restore('repl');
    t.is(await p.waitProtected('app', 60_000), 'A', 'protection rebuilt on the same primary after the repair');

    // 3. both links cut: without a witness, B cannot tell a dead A from a partition.
    const cutAt = Date.now();
    await p.tb.cut('mgmt');
    await p.tb.cut('repl');
    await waitUntil(async () => (await p.vmStatus('B', 'app'))?.state === 'standalone' || undefined, 30_000, 'B takes over');
    const sb = (await p.vmStatus('B', 'app'))!;
    t.is(sb.lastFailover?.kind, 'takeover');
    t.regex(sb.lastFailover!.reason, /primary host lost/);
    t.log(`both links cut: B took over ${sb.lastFailover!.at - cutAt} ms after the cut (two-node mode: A keeps running too: ${(await p.vmStatus('A', 'app'))?.state})`);
  });
});

// A connection opened after the last checkpoint was numbered differently by the two guests;
// the secondary's filter-rewriter translates. After the takeover that translation must stay in
// front of the new primary's COLO filters, or every packet of the connection mismatches and
// forces a checkpoint (measured before the fix: ~1.5 s per reply instead of ~50 ms).
test('a connection opened just before the primary is lost survives it, and runs without forced checkpoints once re-protected', async (t) => {
  t.timeout(300_000);
  await withPair(t, 14, { vms: [{ name: 'fresh', guestIp: 40, basePort: 19300 }], checkpointDelayMs: 4000 }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('fresh'), 'A');
    await p.waitGuestService('fresh');
    // Right after a periodic checkpoint: open the connection, two transactions, lose host A —
    // provided no checkpoint took the connection into the replica meanwhile (else this test
    // proves nothing). Under TCG the two guests sometimes answer the handshake differently
    // and colo-compare forces a checkpoint: then close, and try again with a new connection.
    let client: TxnClient;
    for (let attempt = 1; ; attempt++) {
      const c0 = (await p.vmStatus('A', 'fresh'))!.checkpoints.count;
      const c1 = await waitUntil(async () => { const n = (await p.vmStatus('A', 'fresh'))!.checkpoints.count; return n > c0 ? n : undefined; }, 30_000, 'a periodic checkpoint', 20);
      client = new TxnClient(p.guestIp('fresh'), 7000, 50);
      await client.open();
      client.start();
      await waitUntil(() => client.txns.length >= 2 || undefined, 10_000, 'two transactions');
      const c2 = (await p.vmStatus('A', 'fresh'))!.checkpoints.count; // A's own count: B counts its takeover too
      if (c2 === c1) break;
      t.log(`attempt ${attempt}: ${c2 - c1} checkpoint(s) while the connection opened; again with a new one`);
      if (attempt === 6) { t.fail('every attempt had a checkpoint between opening the connection and the loss'); return; }
      await client.stop();
      client.close();
    }
    const killedAt = Date.now();
    p.killHost('A');
    await waitUntil(async () => (await p.vmStatus('B', 'fresh'))?.state === 'standalone' || undefined, 30_000, 'B takes over');
    await waitUntil(() => client.txns.filter((x) => x.ackAt > killedAt).length >= 5 || undefined, 30_000, 'transactions on B');

    p.startAgent('A');
    t.is(await p.waitProtected('fresh'), 'B', 'protection rebuilt with B as the primary');
    const before = client.txns.length, ck = (await p.vmStatus('B', 'fresh'))!.checkpoints.count;
    await waitUntil(() => client.txns.length >= before + 20 || undefined, 60_000, '20 transactions while protected again');
    const forced = (await p.vmStatus('B', 'fresh'))!.checkpoints.count - ck;
    await client.stop();
    t.deepEqual(client.errors, []);
    t.is(client.connects, 1);
    t.is(firstGap(client.txns.map((x) => x.value)), null, 'acknowledged values consecutive across the failover and re-protection');
    t.true(forced <= 8, `20 transactions took ${forced} checkpoints (one per reply would mean the filters mistranslate)`);
    const last20 = client.txns.slice(before, before + 20);
    t.log(`fresh connection: ${client.txns.length} transactions, 20 after re-protection in ${last20.at(-1)!.ackAt - last20[0]!.sentAt} ms with ${forced} checkpoints`);
    client.close();
  });
});
