// Shared scaffolding for system tests: a fresh pair per test, logs attached on failure.
import type { ExecutionContext } from 'ava';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AgentPair, type PairOptions } from '../../lab/pair.ts';
import { sweepStaleTestbeds } from '../../lab/netns.ts';
import { openObservers } from '../../lab/traffic.ts';

let swept = false;

export async function withPair<T>(t: ExecutionContext, index: number, o: PairOptions, body: (p: AgentPair) => Promise<T>): Promise<T> {
  if (!swept) { await sweepStaleTestbeds(); swept = true; }
  const p = new AgentPair(index, o);
  await p.setup();
  try {
    return await body(p);
  } catch (e) {
    for (const h of ['A', 'B'] as const) {
      let text = '';
      try { text = readFileSync(p.agentLog(h), 'utf8'); } catch { /* none */ }
      t.log(`---- agent ${h} log (last 60 lines)\n` + text.split('\n').filter((l) => !/ debug /.test(l)).slice(-60).join('\n'));
      // The whole log (debug lines too) for a failure that is hard to reproduce.
      const keep = process.env.FTKVM_TEST_LOG_DIR;
      if (keep) { mkdirSync(keep, { recursive: true }); writeFileSync(join(keep, `${t.title.slice(0, 40).replace(/\W+/g, '-')}-${Date.now()}-agent${h}.log`), text); }
    }
    // The guests' consoles: was the guest alive (ticks) and serving (txn lines) when it failed?
    for (const h of ['A', 'B'] as const) for (const vm of p.o.vms) {
      let text = '';
      try { text = readFileSync(p.serialLog(h, vm.name), 'utf8'); } catch { continue; }
      t.log(`---- ${vm.name} console on ${h} (last 8 lines)\n` + text.replace(/\r/g, '').split('\n').filter(Boolean).slice(-8).join('\n'));
    }
    // For debugging by hand: keep the failed pair (agents, QEMUs, namespaces) up for a while.
    const holdS = Number(process.env.FTKVM_TEST_HOLD_S ?? 0);
    if (holdS > 0) { console.error(`# holding the failed pair ${p.dir} for ${holdS} s`); await sleep(holdS * 1000); }
    throw e;
  } finally {
    for (const o of [...openObservers]) o.close();
    await p.teardown();
  }
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Consecutive-value check: returns the first place where b != a + 1, or null. */
export function firstGap(values: number[]): { i: number; prev: number; next: number } | null {
  for (let i = 1; i < values.length; i++) if (values[i] !== values[i - 1]! + 1) return { i, prev: values[i - 1]!, next: values[i]! };
  return null;
}
