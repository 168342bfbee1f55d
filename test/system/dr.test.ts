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

test('DR: points ship across a COLO failover; a DR test leaves production untouched; after the loss of both primary-site hosts the VM runs at the DR site from a point the guest wrote; the old site cannot start it again; fail-back returns it to the pair, protected, nothing lost', async (t) => {
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

    // Fail-back (what playbooks/dr-failback.yml runs): the guest writes at the DR site; host A,
    // agent stopped, pulls the activated point's chunks that differ while the VM still runs
    // there; the planned stop; the final pull copies what the VM wrote at the DR site; the DR
    // site releases the lease; both agents start and the VM is protected again on the pair.
    const drc = new TxnClient(p.guestIp('db'));
    await drc.open(60_000);
    drc.start();
    await waitUntil(() => drc.txns.length >= 10 || undefined, 60_000, 'transactions at the DR site');
    p.killAgent('A');
    const pull = async (final: boolean) => {
      const r = await p.cli('A', ['dr-pull', 'db', '--json', ...(final ? ['--final'] : [])]);
      t.is(r.code, 0, `dr-pull${final ? ' --final' : ''}: ${r.stderr}`);
      return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { copiedBytes: number; diskBytes: number; epoch: number | null; ms: number };
    };
    const seed = await pull(false);
    t.log(`fail-back seed: ${seed.copiedBytes} of ${seed.diskBytes} bytes copied in ${seed.ms} ms`);
    await drc.stop();
    drc.close();
    t.deepEqual(drc.errors, [], 'the client at the DR site was served until the planned stop');
    const drLast = drc.txns.at(-1)!.value;
    const stopAt = Date.now();
    t.is((await p.drCall('POST', '/v1/dr/vms/db/stop', { timeoutS: 30 }, 60_000)).status, 200);
    const fin = await pull(true);
    t.log(`fail-back final: ${fin.copiedBytes} of ${fin.diskBytes} bytes copied in ${fin.ms} ms, epoch ${fin.epoch}`);
    t.true(fin.copiedBytes < fin.diskBytes / 4, 'the final pull copies only what changed at the DR site since the seed');
    const de = await p.drCall<{ released: boolean }>('POST', '/v1/dr/vms/db/deactivate', { to: 'hostA' });
    t.is(de.status, 200, JSON.stringify(de.json));
    t.true(de.json.released, 'the DR site released the lease');
    p.startAgent('A'); p.startAgent('B');
    const home = await p.waitProtected('db', 300_000);
    t.is(home, 'A', 'host A (the pulled disk) runs the VM');
    const c2 = new TxnClient(p.guestIp('db'));
    await c2.open(60_000);
    const v2 = await c2.get();
    c2.close();
    t.log(`back on the pair and protected ${Date.now() - stopAt} ms after the planned stop; counter ${v2}, last acknowledged at the DR site ${drLast}`);
    t.true(v2 >= drLast && v2 <= drLast + 1, 'every transaction acknowledged at the DR site is there after the fail-back');
    const resumed = await pointAfter(Date.now(), 'hostA');
    t.true(resumed.epoch > (a.witness?.epoch ?? 0), `shipping resumed from the pair at a newer epoch (${resumed.epoch})`);
  });
});
