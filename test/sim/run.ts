// `npm run sim -- [--seeds N] [--from S] [--seed S [--faults JSON]] [--scenarios] [--json] [--trace]`
// Runs N seeded schedules (or one), prints a progress line, the fault mix and a final table;
// on a violation: the seed, the smallest fault list that still shows it (shrunk), the trace
// and the one-line replay command. Exit code 1 on any violation.
import { FAULT_KINDS, runSchedule, scheduleFor, type Fault, type RunResult } from './world.ts';
import { SCENARIOS } from './scenarios.ts';

const args = process.argv.slice(2);
const opt = (name: string): string | undefined => { const i = args.indexOf(`--${name}`); return i >= 0 ? args[i + 1] : undefined; };
const flag = (name: string) => args.includes(`--${name}`);

async function shrink(r: RunResult): Promise<RunResult> {
  let best = r;
  for (let changed = true; changed;) {
    changed = false;
    for (let i = 0; i < best.faults.length; i++) {
      const fewer = best.faults.filter((_, j) => j !== i);
      const t = await runSchedule(best.seed, fewer);
      if (t.violation?.invariant === r.violation!.invariant) { best = t; changed = true; break; }
    }
  }
  return best;
}

function replayCmd(r: RunResult): string {
  return `npm run sim -- --seed ${r.seed} --faults '${JSON.stringify(r.faults)}' --trace`;
}

/** The named regression scenarios (scenarios.ts), each with seeds 1..3. */
async function scenarios(json: boolean): Promise<number> {
  let bad = 0;
  const out: unknown[] = [];
  for (const sc of SCENARIOS) {
    for (const seed of sc.seeds ?? [1, 2, 3]) {
      const watch = new RegExp([sc.mustLog?.source, sc.mustNotLog?.source].filter(Boolean).join('|') || '$^');
      const r = await runSchedule(seed, sc.faults, { watch });
      const problems: string[] = [];
      if (r.violation) problems.push(`${r.violation.invariant} at ${r.violation.atMs} ms: ${r.violation.detail}`);
      if (sc.mustLog && !r.hits.some((l) => sc.mustLog!.test(l))) problems.push(`never logged ${sc.mustLog}`);
      const forbidden = sc.mustNotLog ? r.hits.find((l) => sc.mustNotLog!.test(l)) : undefined;
      if (forbidden) problems.push(`logged ${forbidden}`);
      if (problems.length) bad++;
      out.push({ path: sc.path, name: sc.name, seed, ok: problems.length === 0, problems });
      if (!json) {
        console.log(`${problems.length ? 'FAIL' : 'ok  '} path ${sc.path} seed ${seed}: ${sc.name}${problems.length ? '\n     ' + problems.join('\n     ') : ''}`);
        if (problems.length) console.log(r.trace.slice(-30).join('\n') + `\n     replay: npm run sim -- --seed ${seed} --faults '${JSON.stringify(sc.faults)}' --trace`);
      }
    }
  }
  if (json) console.log(JSON.stringify({ scenarios: out }));
  return bad;
}

async function main(): Promise<void> {
  const single = opt('seed');
  const json = flag('json');
  if (flag('scenarios')) process.exit((await scenarios(json)) ? 1 : 0);
  if (single !== undefined) {
    const seed = Number(single);
    const faults = opt('faults') ? JSON.parse(opt('faults')!) as Fault[] : scheduleFor(seed);
    const r = await runSchedule(seed, faults, { traceLines: flag('trace') ? 400 : 60 });
    console.log(`seed ${seed}: faults ${JSON.stringify(r.faults)}`);
    console.log(`${r.events} events, ${r.acked} units of work acknowledged`);
    if (flag('trace') || r.violation) console.log(r.trace.join('\n'));
    console.log(r.violation ? `VIOLATION ${r.violation.invariant} at ${r.violation.atMs} ms: ${r.violation.detail}` : 'no violation');
    process.exit(r.violation ? 1 : 0);
  }
  const n = Number(opt('seeds') ?? 100);
  const from = Number(opt('from') ?? 1);
  const mix = new Map<string, number>(FAULT_KINDS.map((k) => [k, 0]));
  const t0 = Date.now();
  let events = 0, acked = 0, faults = 0;
  const failed: RunResult[] = [];
  for (let s = from; s < from + n; s++) {
    const r = await runSchedule(s);
    events += r.events; acked += r.acked; faults += r.faults.length;
    for (const f of r.faults) mix.set(f.kind, (mix.get(f.kind) ?? 0) + 1);
    if (r.violation) {
      failed.push(r);
      if (!json) process.stderr.write(`\nVIOLATION ${r.violation.invariant} seed ${s} at ${r.violation.atMs} ms: ${r.violation.detail}\n  replay: ${replayCmd(r)}\n`);
    }
    if (!json && ((s - from + 1) % 25 === 0 || s === from + n - 1)) {
      process.stderr.write(`\r${s - from + 1}/${n} schedules, ${failed.length} violations, ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    }
    if (failed.length >= 3) break;
  }
  if (!json) process.stderr.write('\n');
  const ran = failed.length >= 3 ? 'stopped early' : `${n}`;
  const summary = { schedules: n, ran, seeds: `${from}..${from + n - 1}`, faults, events, acked, violations: failed.length, seconds: Math.round((Date.now() - t0) / 1000), mix: Object.fromEntries(mix) };
  if (json) { console.log(JSON.stringify({ ...summary, failed: failed.map((r) => ({ seed: r.seed, violation: r.violation, faults: r.faults })) })); process.exit(failed.length ? 1 : 0); }
  console.log(`\nsimulated ${ran} schedules (seeds ${summary.seeds}) with ${faults} faults, ${events} events, ${acked} acknowledged units of work in ${summary.seconds} s`);
  console.log('fault mix: ' + [...mix].map(([k, v]) => `${k} ${v}`).join(', '));
  for (const r of failed) {
    const s = await shrink(r);
    console.log(`\nVIOLATION ${s.violation!.invariant} seed ${s.seed} at ${s.violation!.atMs} ms: ${s.violation!.detail}`);
    console.log(`smallest fault list: ${JSON.stringify(s.faults)}`);
    console.log(s.trace.slice(-40).join('\n'));
    console.log(`replay: ${replayCmd(s)}`);
  }
  console.log('\n| schedules | faults | events | violations |\n|---|---|---|---|');
  console.log(`| ${n} | ${faults} | ${events} | ${failed.length} |`);
  process.exit(failed.length ? 1 : 0);
}

void main();
