// The deterministic simulation (test/sim): the real controller, heartbeats, witness client,
// lease rules and fencer, in virtual time against simulated QEMU, network and witness. Runs
// the named regression scenarios of issue 11 and a fixed block of random fault schedules;
// every invariant (README "Safety invariants") is checked after every event. A failure prints
// the seed, the shrunk fault list and the replay command. `npm run sim -- --seeds N` runs more.
import test from 'ava';
import { execFile } from 'node:child_process';

const SEEDS = Number(process.env.FTKVM_SIM_SEEDS ?? 300);

function sim(args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import=tsx', 'test/sim/run.ts', ...args], { maxBuffer: 64 * 1024 * 1024, timeout: 280_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, out: stdout + stderr });
    });
  });
}

test('simulation: the issue 11 regression scenarios hold every invariant', async (t) => {
  const r = await sim(['--scenarios', '--json']);
  const res = JSON.parse(r.out.trim().split('\n').pop()!) as { scenarios: { path: number; name: string; seed: number; ok: boolean; problems: string[] }[] };
  t.true(res.scenarios.length >= 30);
  for (const s of res.scenarios) t.true(s.ok, `path ${s.path} seed ${s.seed} (${s.name}): ${s.problems.join('; ')}`);
  const paths = new Set(res.scenarios.map((s) => s.path));
  for (let p = 1; p <= 10; p++) t.true(paths.has(p), `path ${p} of issue 11 has a scenario`);
});

for (const [from, n] of [[1, Math.ceil(SEEDS / 2)], [1 + Math.ceil(SEEDS / 2), Math.floor(SEEDS / 2)]] as const) {
  test(`simulation: random fault schedules, seeds ${from}..${from + n - 1}, no invariant violated`, async (t) => {
    const r = await sim(['--seeds', String(n), '--from', String(from), '--json']);
    const res = JSON.parse(r.out.trim().split('\n').pop()!) as { schedules: number; faults: number; events: number; acked: number; violations: number; failed: { seed: number; violation: { invariant: string; detail: string }; faults: unknown }[] };
    t.log(`${res.schedules} schedules, ${res.faults} faults, ${res.events} events, ${res.acked} acknowledged units of work`);
    t.true(res.acked > res.schedules * 100, 'the client got work acknowledged');
    for (const f of res.failed) t.fail(`seed ${f.seed}: ${f.violation.invariant} ${f.violation.detail}; replay: npm run sim -- --seed ${f.seed} --faults '${JSON.stringify(f.faults)}' --trace`);
    t.is(res.violations, 0);
  });
}
