import test from 'ava';
import { CheckpointTracker } from '../../agent/src/colo/checkpoints.ts';

test('a checkpoint is a STOP followed by a RESUME; the pause is the time between them', (t) => {
  const seen: number[] = [];
  const c = new CheckpointTracker(10_000, (p) => seen.push(p));
  c.stop(1000); c.resume(1045);
  c.stop(3000); c.resume(3060);
  c.resume(3100); // a RESUME without STOP is not a checkpoint
  const s = c.snapshot(3100);
  t.is(s.count, 2);
  t.is(s.lastAt, 3060);
  t.is(s.lastPauseMs, 60);
  t.deepEqual(seen, [45, 60]);
  t.is(s.ratePerS, 0.2);
  t.is(s.pauseP50Ms, 60);
});

test('reset forgets an unmatched STOP; the rate only counts the recent window', (t) => {
  const c = new CheckpointTracker(1000);
  c.stop(0); c.reset(); c.resume(50);
  t.is(c.snapshot(50).count, 0);
  for (let i = 0; i < 10; i++) { c.stop(i * 100); c.resume(i * 100 + 10); }
  t.is(c.snapshot(950).ratePerS, 10);
  t.is(c.snapshot(5000).ratePerS, 0);
  t.is(c.snapshot(5000).count, 10);
});

test('pause percentiles over recent checkpoints', (t) => {
  const c = new CheckpointTracker(60_000);
  for (let i = 1; i <= 100; i++) { c.stop(i * 1000); c.resume(i * 1000 + i); } // pauses 1..100 ms
  const s = c.snapshot(200_000);
  t.is(s.pauseP50Ms, 51);
  t.is(s.pauseP99Ms, 100);
});

test('a wall clock stepped during a checkpoint: the pause and the rate come from the monotonic clock', (t) => {
  const c = new CheckpointTracker(10_000);
  c.stop(1000, 50); c.resume(1040, 90); // event times and monotonic agree: the event pause (40 ms)
  c.stop(2000, 1050); c.resume(2000 + 900_000 + 30, 1080); // NTP stepped 15 min forward between them
  const s = c.snapshot(1100);
  t.is(s.lastPauseMs, 30, 'not 15 minutes');
  t.is(s.lastAt, 902_030, 'reported on the wall clock (what the operator reads)');
  t.is(c.lastMono, 1080);
  t.is(s.ratePerS, 0.2, 'both checkpoints are in the monotonic window');
});
