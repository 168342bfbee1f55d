import test from 'ava';
import { decideAcquire, type Lease } from '../../agent/src/witness/lease.ts';

const L = (holder: string, epoch: number, expiresAt: number): Lease => ({ holder, epoch, expiresAt, grantedAt: expiresAt - 1000 });

test('first acquisition is granted at any epoch', (t) => {
  const r = decideAcquire(undefined, { node: 'A', epoch: 1, leaseMs: 1000 }, 5000);
  t.true(r.granted);
  if (r.granted) t.deepEqual(r.lease, { holder: 'A', epoch: 1, expiresAt: 6000, grantedAt: 5000 });
});

test('the holder renews its epoch, even after expiry (nobody took it meanwhile)', (t) => {
  t.true(decideAcquire(L('A', 3, 6000), { node: 'A', epoch: 3, leaseMs: 1000 }, 5500).granted);
  t.true(decideAcquire(L('A', 3, 6000), { node: 'A', epoch: 3, leaseMs: 1000 }, 9000).granted);
});

test('another node cannot take over while the lease is valid; it is told how long to wait', (t) => {
  const r = decideAcquire(L('A', 3, 6000), { node: 'B', epoch: 4, leaseMs: 1000 }, 5600);
  t.false(r.granted);
  if (!r.granted) { t.is(r.retryAfterMs, 400); t.regex(r.reason, /A holds a valid lease for epoch 3 \(400 ms left\)/); }
});

test('after expiry another node takes over with a newer epoch only', (t) => {
  t.true(decideAcquire(L('A', 3, 6000), { node: 'B', epoch: 4, leaseMs: 1000 }, 6000).granted);
  const same = decideAcquire(L('A', 3, 6000), { node: 'B', epoch: 3, leaseMs: 1000 }, 7000);
  t.false(same.granted);
});

test('a stale epoch is refused for good (the old primary learns it lost)', (t) => {
  const r = decideAcquire(L('B', 4, 9000), { node: 'A', epoch: 3, leaseMs: 1000 }, 20_000);
  t.false(r.granted);
  if (!r.granted) { t.is(r.retryAfterMs, null); t.regex(r.reason, /stale epoch 3: B holds epoch 4/); }
});

test('lease length is bounded', (t) => {
  const r = decideAcquire(undefined, { node: 'A', epoch: 1, leaseMs: 10_000_000 }, 0);
  t.true(r.granted && r.lease.expiresAt === 60_000);
});
