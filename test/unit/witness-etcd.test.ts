// The witness protocol on a real etcd (lab/etcd.ts): the lease rules of lease.ts, races
// decided by etcd transactions, per-pair scope enforced by etcd users, and a 3-member cluster
// that loses its leader (no lease lapses) or its quorum (leases lapse, nobody is granted one).
import test from 'ava';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { EtcdCluster } from '../../lab/etcd.ts';
import { etcdLeader, etcdTransport, type EtcdSettings } from '../../agent/src/witness/etcd.ts';
import { WitnessGate } from '../../agent/src/witness/client.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';
import { systemClock, sleep } from '../../agent/src/util/clock.ts';

// Below 32768 (ephemeral ports can be taken by any outgoing connection); 5 clusters of 8 ports per run.
let nextPort = 22100 + (process.pid % 100) * 48;
const T = 2000; // request timeout

async function cluster(t: import('ava').ExecutionContext, size: 1 | 3 = 1): Promise<EtcdCluster> {
  if (!EtcdCluster.available()) throw new Error('etcd missing: scripts/install-deps installs etcd-server');
  const c = new EtcdCluster(size, nextPort);
  nextPort += 8;
  t.teardown(() => c.stop());
  await c.start();
  return c;
}

const settings = (c: EtcdCluster, pair = 'p1', extra: Partial<EtcdSettings> = {}): EtcdSettings => ({ endpoints: c.endpoints, prefix: '/ftkvm', pair, ...extra });
const req = (node: string, epoch: number, leaseMs = 2000) => ({ node, epoch, leaseMs });

test('the lease rules on etcd: grant, renew, refuse while valid, grant after expiry, stale epochs refused, release', async (t) => {
  const c = await cluster(t);
  const w = etcdTransport(settings(c));
  t.teardown(() => w.close());
  t.is((await w.acquire('vm', req('hostA', 1), T)).status, 200);
  const same = await w.acquire('vm', req('hostB', 1), T);
  t.is(same.status, 409);
  t.regex(same.body.reason!, /epoch 1 belongs to hostA/);
  const valid = await w.acquire('vm', req('hostB', 2), T);
  t.is(valid.status, 409, 'A holds a valid lease');
  t.true(valid.body.retryAfterMs! > 0);
  const renewed = await w.acquire('vm', req('hostA', 1), T);
  t.is(renewed.status, 200, 'renewal');
  t.is(renewed.body.expiresInMs, 2000);
  await sleep(3200); // A stops renewing: its 2 s lease runs out
  t.is((await w.acquire('vm', req('hostB', 2), T)).status, 200, 'takeover after the expiry');
  const stale = await w.acquire('vm', req('hostA', 1), T);
  t.is(stale.status, 409);
  t.is(stale.body.epoch, 2);
  t.regex(stale.body.reason!, /stale epoch 1/);
  // Release: B gives its lease up; A may take epoch 3 at once, without waiting for the expiry.
  t.is((await w.release('vm', { node: 'hostA', epoch: 2 }, T)).status, 409, 'only the holder releases');
  t.is((await w.release('vm', { node: 'hostB', epoch: 2 }, T)).status, 200);
  t.is((await w.acquire('vm', req('hostA', 3), T)).status, 200);
});

test('a lease in its last second (etcd reads its TTL as 0) still refuses a takeover', async (t) => {
  const c = await cluster(t);
  const a = etcdTransport(settings(c)), b = etcdTransport(settings(c));
  t.teardown(() => { a.close(); b.close(); });
  const sentA = performance.now();
  t.is((await a.acquire('vm', req('hostA', 1, 2000), T)).status, 200);
  let grantedAt: number | null = null;
  while (grantedAt === null && performance.now() - sentA < 6000) {
    const r = await b.acquire('vm', req('hostB', 2, 2000), T);
    if (r.status === 200) grantedAt = performance.now();
    else await sleep(20);
  }
  t.truthy(grantedAt, 'B granted once A\'s lease expired');
  t.true(grantedAt! - sentA >= 2000, `B granted ${Math.round(grantedAt! - sentA)} ms after A's grant was asked for: never before A's 2 s lease ran out`);
});

test('racing takeovers of one epoch: etcd\'s transactions let exactly one node win', async (t) => {
  const c = await cluster(t);
  const ws = Array.from({ length: 8 }, () => etcdTransport(settings(c)));
  t.teardown(() => ws.forEach((w) => w.close()));
  for (let round = 1; round <= 5; round++) {
    const rs = await Promise.all(ws.map((w, i) => w.acquire('vm', req(`node${i}`, round, 2000), T)));
    const winners = rs.filter((r) => r.status === 200);
    if (round === 1) t.is(winners.length, 1, `round ${round}: ${rs.map((r) => r.status).join(',')}`);
    else t.true(winners.length <= 1, `round ${round}: ${rs.map((r) => r.status).join(',')}`);
    if (winners.length) await ws[0]!.release('vm', { node: winners[0]!.body.holder, epoch: round }, T);
  }
});

test('etcd users scoped to their pair: another pair\'s VM is refused, the same VM name in two pairs is two leases', async (t) => {
  const c = await cluster(t);
  for (const n of ['hostA', 'hostC']) writeFileSync(join(c.dir, `${n}.pw`), `${n}-password-0123456789`, { mode: 0o600 });
  await c.enableAuth('/ftkvm', [{ user: 'hostA', password: 'hostA-password-0123456789', pair: 'p1' }, { user: 'hostC', password: 'hostC-password-0123456789', pair: 'p2' }]);
  const a = etcdTransport(settings(c, 'p1', { user: 'hostA', passwordFile: join(c.dir, 'hostA.pw') }));
  const cOwn = etcdTransport(settings(c, 'p2', { user: 'hostC', passwordFile: join(c.dir, 'hostC.pw') }));
  const cIntoP1 = etcdTransport(settings(c, 'p1', { user: 'hostC', passwordFile: join(c.dir, 'hostC.pw') }));
  t.teardown(() => { a.close(); cOwn.close(); cIntoP1.close(); });
  t.is((await a.acquire('web1', req('hostA', 1, 5000), T)).status, 200);
  await t.throwsAsync(() => cIntoP1.acquire('web1', req('hostA', 1_000_000, 5000), T), { message: /permission denied/ });
  t.is((await cOwn.acquire('web1', req('hostC', 1, 5000), T)).status, 200, 'p2/web1 is its own lease');
  t.is((await a.acquire('web1', req('hostA', 1, 5000), T)).status, 200, 'p1/web1 still hostA\'s at epoch 1');
});

test('3 members: killing the leader lapses no lease; losing the quorum lapses it and grants nothing', async (t) => {
  t.timeout(90_000);
  const c = await cluster(t, 3);
  const log = memoryLogger();
  const gate = new WitnessGate({ url: 'etcd', node: 'hostA', leaseMs: 5000, token: () => '', clock: systemClock, log, transport: etcdTransport(settings(c)) });
  t.teardown(() => gate.stop());
  t.true((await gate.acquire('vm', 1, 'test')).granted);
  gate.keep('vm', 1);
  await sleep(1000);
  const leader = await etcdLeader(c.endpoints);
  t.truthy(leader);
  c.kill(c.endpoints.indexOf(leader!.endpoint));
  const states: string[] = [];
  for (let i = 0; i < 120; i++) { states.push(gate.lease('vm').state); await sleep(50); } // 6 s
  t.deepEqual([...new Set(states)], ['held'], 'the lease stayed held through the election');
  const b = etcdTransport(settings(c));
  t.teardown(() => b.close());
  t.is((await b.acquire('vm', req('hostB', 2, 5000), T)).status, 409, 'no takeover');
  // Quorum lost: the holder's lease lapses (it would fence) and nobody is granted the VM. When
  // the member killed is the follower, the remaining leader answers keep-alives (served by the
  // leader alone, no raft round) until CheckQuorum makes it step down, up to two election
  // timeouts (measured: ~1 s; CI once more than 1.75 s): the lease then lapses up to ~2 s after
  // its 3.75 s of validity, not 5.5 s after the loss as this test assumed.
  const lost = Date.now();
  c.kill(c.endpoints.findIndex((_, i) => i !== c.endpoints.indexOf(leader!.endpoint)));
  while (gate.lease('vm').state === 'held' && Date.now() - lost < 9000) await sleep(50);
  t.log(`quorum lost: the lease lapsed after ${Date.now() - lost} ms`);
  t.not(gate.lease('vm').state, 'held', 'the holder no longer counts its lease valid');
  await t.throwsAsync(() => b.acquire('vm', req('hostB', 2, 5000), 1000));
});
