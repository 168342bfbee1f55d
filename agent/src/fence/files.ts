// Where the agent and its fencer meet: two small files in the agent's state_dir, and the clock
// both read. Times are CLOCK_MONOTONIC ms (libuv's hrtime), comparable across processes.
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { readJsonFile, writeFileAtomic } from '../state/atomic.ts';
import type { AgentPulse, FencerControl } from './fencer.ts';

export const hrMono = (): number => Number(process.hrtime.bigint() / 1_000_000n);

export const fencerPaths = (stateDir: string) => ({
  control: join(stateDir, 'fencer.json'),   // what to keep: written on change, durably
  pulse: join(stateDir, 'fencer-pulse.json'), // the agent's word on peer and lease: every step
  pid: join(stateDir, 'fencer.pid'),
  log: join(stateDir, 'fencer.log'),
});

export function writeControl(stateDir: string, c: FencerControl): void {
  writeFileAtomic(fencerPaths(stateDir).control, JSON.stringify(c) + '\n');
}

/** No fsync: it is rewritten every control step and only its freshness matters. */
export function writePulse(stateDir: string, p: AgentPulse): void {
  const path = fencerPaths(stateDir).pulse;
  writeFileSync(`${path}.tmp`, JSON.stringify(p));
  renameSync(`${path}.tmp`, path);
}

export function readControl(stateDir: string): FencerControl | null {
  try { return readJsonFile<FencerControl>(fencerPaths(stateDir).control) ?? null; } catch { return null; }
}

export function readPulse(stateDir: string): AgentPulse | null {
  try { return JSON.parse(readFileSync(fencerPaths(stateDir).pulse, 'utf8')) as AgentPulse; } catch { return null; }
}
