// Disaster recovery on the real pair plus a third host as the DR site (netns D running
// `ftkvm-agent dr-target`, its guest bridge on the same LAN): recovery points ship every few
// seconds across a COLO failover; a DR test boots a copy isolated and leaves production
// untouched; then both primary-site hosts die and a DR failover brings the VM up at the DR site
// from a point the guest really wrote, not older than an interval plus one shipping time; a
// primary-site host that comes back cannot start its own copy.
import test from 'ava';
import { withPair, sleep } from '../helpers/system.ts';
import { other, waitUntil, type H } from '../../lab/pair.ts';
import { TxnClient } from '../../lab/traffic.ts';
import type { RecoveryPoint, VmPoints } from '../../agent/src/dr/protocol.ts';
import type { ActivateReport, TestReport } from '../../agent/src/dr/target.ts';

const INTERVAL_S = 4;

test('DR: points ship across a COLO failover; a DR test leaves production untouched; after the loss of both primary-site hosts the VM runs at the DR site from a point the guest wrote; the old site cannot start it again', async (t) => {
  t.timeout(900_000);
  await withPair(t, 16, { vms: [{ name: 'db', guestIp: 16, basePort: 19500 }], witness: true, leaseMs: 2000, dr: { intervalS: INTERVAL_S, keep: 3 } }, async (p) => {
    p.startWitness();
    p.startDrTarget();
    p.startAgent('A'); p.startAgent('B');
    let prim: H = await p.waitProtected('db', 180_000);
    await p.waitGuestService('db');
    const client = new TxnClient(p.guestIp('db'));
    await client.open();
    client.start();
    const points = async () => (await p.drCall<VmPoints>('GET', '/v1/dr/vms/db')).json.points;
    const pointAfter = (t0: number, from?: string, mode?: RecoveryPoint['mode']) => waitUntil(async () => (await points()).find((x) => x.committedAt > t0 && (!from || x.from === from) && (!mode || x.mode === mode)),
      120_000, `a recovery point after ${new Date(t0).toISOString()}${from ? ` from ${from}` : ''}${mode ? ` (${mode})` : ''}`, 500);

    // Points arrive; the second from the same QEMU is a delta (only the dirty blocks).
    const first = await pointAfter(0, `host${prim}`);
    t.log(`first point: ${first.mode}, ${first.bytesShipped} bytes`);
    const delta = await pointAfter(first.committedAt, `host${prim}`, 'delta');
    t.log(`delta point: ${delta.bytesShipped} bytes of a ${delta.sizeBytes}-byte disk`);
    t.true(delta.bytesShipped < delta.sizeBytes / 4, 'a delta point ships a small part of the disk');
    const st = await p.vmStatus(prim, 'db');
    t.true(st?.dr?.shipping, 'the primary reports that it ships');
    t.true((st?.dr?.rpoS ?? Infinity) <= 3 * INTERVAL_S + 30, `status shows the achieved RPO (${st?.dr?.rpoS} s)`);

    // DR test: a copy boots isolated and answers; production keeps its epochs and protection.
    const before = { A: (await p.vmStatus('A', 'db'))!.epoch, B: (await p.vmStatus('B', 'db'))!.epoch };
    const txnsBefore = client.txns.length;
    const tr = await p.drCall<TestReport>('POST', '/v1/dr/vms/db/test', { timeoutS: 180 }, 240_000);
    t.is(tr.status, 200, JSON.stringify(tr.json));
    t.regex(String(tr.json.reply), /^\d+$/, 'the test copy answered with its durable counter');
    t.log(`DR test: point ${tr.json.point.id} (data ${tr.json.dataAgeS} s old) answered after ${tr.json.answeredAfterMs} ms: counter ${tr.json.reply}`);
    await sleep(2000);
    t.deepEqual({ A: (await p.vmStatus('A', 'db'))!.epoch, B: (await p.vmStatus('B', 'db'))!.epoch }, before, 'epochs unchanged by the DR test');
    t.true((await p.vmStatus(prim, 'db'))?.state === 'protected', 'still protected after the DR test');
    t.true(client.txns.length > txnsBefore, 'the client was served during the DR test');
    t.deepEqual(client.errors, [], 'no client error during the DR test');

    // A COLO failover: the new primary picks up shipping without a full copy.
    const sec = other(prim);
    const killedAt = Date.now();
    p.killQemu(prim, 'db');
    await waitUntil(async () => { const s = await p.vmStatus(sec, 'db'); return (s?.lastTakeover?.at ?? 0) > killedAt || undefined; }, 120_000, `${sec} took over`);
    prim = sec;
    const picked = await pointAfter(killedAt, `host${prim}`);
    t.log(`after the COLO failover: ${picked.mode} point from host${prim}, ${picked.bytesShipped} bytes`);
    t.not(picked.mode, 'full', 'the new primary did not copy the whole disk');
    await p.waitProtected('db', 240_000);
    await pointAfter(Date.now(), `host${prim}`);

    // The whole primary site is lost.
    const siteLostAt = Date.now();
    p.killHost('A'); p.killHost('B');
    client.close(); // its last request will never be answered: no waiting for it
    const acked = client.txns.map((x) => x.value);
    const newest = (await points()).at(-1)!;
    t.log(`site lost; newest point captured ${siteLostAt - newest.capturedAt} ms before, shipped in ${newest.committedAt - newest.capturedAt} ms`);

    const ar = await p.drCall<ActivateReport>('POST', '/v1/dr/vms/db/activate', { timeoutS: 240 }, 300_000);
    t.is(ar.status, 200, JSON.stringify(ar.json));
    const a = ar.json;
    t.is(a.point.id, newest.id, 'activated from the newest point');
    t.truthy(a.witness, `the witness recorded the move (${a.guarantee})`);
    t.log(`DR failover: RPO ${a.rpoS} s, RTO ${a.rtoMs} ms, witness epoch ${a.witness?.epoch}`);

    // The recovered counter: a value the guest wrote, never ahead, not older than the interval plus one shipping time.
    const g = new TxnClient(p.guestIp('db'));
    await g.open(60_000);
    const v = await g.get();
    g.close();
    const lastAcked = acked.at(-1)!;
    const ackedByCapture = client.lastAckBefore(a.point.capturedAt)?.value ?? 0;
    t.log(`recovered counter ${v}; last acknowledged ${lastAcked}; acknowledged before the point's capture ${ackedByCapture}`);
    t.true(v <= lastAcked + 1, 'never ahead of what the primary wrote (+1: a write whose reply was lost)');
    t.true(v >= ackedByCapture, 'everything acknowledged before the capture is there');
    // The scheduler looks every second: an interval, one shipping time and that second.
    const bound = INTERVAL_S * 1000 + (newest.committedAt - newest.capturedAt) + 1000;
    t.true(siteLostAt - a.point.capturedAt <= bound, `the point is not older than interval + shipping time (${siteLostAt - a.point.capturedAt} ms > ${bound} ms)`);

    // A primary-site host that comes back with its agent cannot start its own (older) copy.
    p.startAgent('A');
    await sleep(15_000);
    const back = await p.vmStatus('A', 'db');
    t.true(back !== null && !['starting', 'standalone', 'protected', 'syncing'].includes(back.state), `host A did not start db (state ${back?.state}: ${back?.reason})`);
    const again = await p.drCall('POST', '/v1/dr/vms/db/points', { sizeBytes: a.point.sizeBytes, capturedAt: Date.now(), from: 'hostA', epoch: a.point.epoch, keep: 3 });
    t.is(again.status, 409, 'the DR site takes in no more points once activated');
  });
});
