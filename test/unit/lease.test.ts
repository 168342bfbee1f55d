import test from 'ava';
import { afterRestart, decideAcquire, decideRelease, isRenewal, isValidEpoch, MAX_EPOCH, type Lease } from '../../agent/src/witness/lease.ts';

const L = (holder: string, epoch: number, expiresAt: number): Lease => ({ holder, epoch, expiresAt, grantedAt: expiresAt - 1000, leaseMs: 1000 });

test('first acquisition is granted at any epoch', (t) => {
  const r = decideAcquire(undefined, { node: 'A', epoch: 1, leaseMs: 1000 }, 5000);
  t.true(r.granted);
  if (r.granted) t.deepEqual(r.lease, { holder: 'A', epoch: 1, expiresAt: 6000, grantedAt: 5000, leaseMs: 1000 });
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

test('epochs must be safe integers within bounds (1e308 would block every later takeover)', (t) => {
  for (const bad of [0, -1, 1.5, 1e308, Number.MAX_SAFE_INTEGER, MAX_EPOCH + 1, NaN, Infinity, '3', null]) t.false(isValidEpoch(bad), String(bad));
  for (const good of [1, 2, 1000, MAX_EPOCH]) t.true(isValidEpoch(good), String(good));
});

test('a renewal is recognised (it needs no durable write); a promotion or a new holder is not', (t) => {
  t.true(isRenewal(L('A', 3, 0), { node: 'A', epoch: 3, leaseMs: 1000 }));
  t.false(isRenewal(L('A', 3, 0), { node: 'A', epoch: 4, leaseMs: 1000 }));
  t.false(isRenewal(L('A', 3, 0), { node: 'B', epoch: 4, leaseMs: 1000 }));
  t.false(isRenewal(undefined, { node: 'A', epoch: 1, leaseMs: 1000 }));
});

test('the holder releases its lease: the successor takes the next epoch at once; nobody else can release it', (t) => {
  const cur = L('A', 3, 6000);
  t.false(decideRelease(cur, { node: 'B', epoch: 3 }, 5000).released);
  t.false(decideRelease(cur, { node: 'A', epoch: 2 }, 5000).released);
  const r = decideRelease(cur, { node: 'A', epoch: 3 }, 5000);
  t.true(r.released);
  if (!r.released) return;
  t.is(r.lease.expiresAt, 5000);
  t.true(decideAcquire(r.lease, { node: 'B', epoch: 4, leaseMs: 1000 }, 5001).granted, 'successor at once');
  t.false(decideAcquire(r.lease, { node: 'B', epoch: 3, leaseMs: 1000 }, 5001).granted, 'still needs a newer epoch');
});

test('after a witness restart every lease counts as just renewed, for its own length', (t) => {
  const r = afterRestart({ vm1: { holder: 'A', epoch: 3, grantedAt: 0, leaseMs: 2000, expiresAt: 10 }, vm2: { holder: 'B', epoch: 1, grantedAt: 0 } as never }, 50_000);
  t.is(r.vm1!.expiresAt, 52_000);
  t.is(r.vm2!.expiresAt, 50_000 + 60_000, 'a file from before leaseMs was stored: the longest lease');
  t.false(decideAcquire(r.vm1, { node: 'B', epoch: 4, leaseMs: 1000 }, 51_999).granted);
  t.true(decideAcquire(r.vm1, { node: 'B', epoch: 4, leaseMs: 1000 }, 52_000).granted);
});
