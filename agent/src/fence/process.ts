// The fencer's process: `ftkvm-agent fencer --state-dir DIR`, started by the agent (detached, its
// own session, like QEMU: an agent restart or stop leaves it running) and found again by its pid
// file. Real I/O for the pure core in fencer.ts.
import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import type { Logger } from '../log/logger.ts';
import { errorMessage } from '../util/errors.ts';
import { Fencer, type FencerWitness } from './fencer.ts';
import { coalescedRenewals } from './renewals.ts';
import { fencerPaths, hrMono, readControl, readPulse } from './files.ts';
import { procStartTicks, procStateLetter } from '../qemu/process.ts';
import { etcdTransport } from '../witness/etcd.ts';
import { httpTransport, type WitnessTransport } from '../witness/client.ts';

const STEP_MS = 50;

function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
}



function isFencer(pid: number): boolean {
  try { return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes('fencer'); } catch { return false; }
}

/** Runs until SIGTERM/SIGINT. */
export async function runFencer(stateDir: string, log: Logger): Promise<void> {
  const paths = fencerPaths(stateDir);
  writeFileSync(paths.pid, `${process.pid}\n`);
  // The agent's own witness transport (HTTP(S) or etcd), one per configuration: it keeps its
  // connections (and etcd's auth token) across renewals.
  let cached = null as { key: string; t: WitnessTransport } | null;
  let token = '';
  const transport = (w: FencerWitness, tok: string): WitnessTransport => {
    const key = JSON.stringify([w.url, w.caFile ?? null, w.etcd ?? null]);
    if (cached?.key !== key) { cached?.t.close(); cached = { key, t: w.etcd ? etcdTransport(w.etcd) : httpTransport(w.url, () => token, w.caFile) }; }
    token = tok;
    return cached.t;
  };
  // The renewals one fencer step asks for go to the witness in one request, as the agent's do.
  const renew = coalescedRenewals(transport);
  const f = new Fencer({
    mono: hrMono,
    readControl: () => readControl(stateDir),
    readPulse: () => readPulse(stateDir),
    readToken: (file) => readFileSync(file, 'utf8').trim(),
    renew,
    alive: (pid, startTicks) => procStartTicks(pid) === startTicks,
    isStopped: (pid) => procStateLetter(pid) === 'T',
    signal: (pid, sig) => { try { process.kill(pid, sig); } catch (e) { log.error(`${sig} failed`, { pid, error: errorMessage(e) }); } },
    log: (level, msg, fields) => log[level](msg, fields),
  });
  log.info('fencer started', { stateDir, pid: process.pid });
  const timer = setInterval(() => f.step(), STEP_MS);
  await new Promise<void>((resolve) => {
    process.once('SIGTERM', resolve);
    process.once('SIGINT', resolve);
  });
  clearInterval(timer);
  cached?.t.close();
  log.info('fencer stopped');
}

/** The agent's side: make sure this host's fencer runs (started once, reused across agent restarts). */
export function ensureFencer(stateDir: string, log: Logger): number {
  const paths = fencerPaths(stateDir);
  try {
    const pid = Number(readFileSync(paths.pid, 'utf8').trim());
    if (pid > 0 && alive(pid) && isFencer(pid)) return pid;
  } catch { /* none yet */ }
  // The same executable: the SEA binary itself, or node + this script in development.
  const self = process.argv[1] && !process.argv[1].startsWith('-') && process.execPath !== process.argv[1] && /\.(ts|js|mjs)$/.test(process.argv[1]) ? [process.argv[1]] : [];
  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const out = openSync(paths.log, 'a');
  try {
    const child = spawn(process.execPath, [...process.execArgv, ...self, 'fencer', '--state-dir', stateDir], { detached: true, stdio: ['ignore', out, out] });
    child.unref();
    log.info('lease fencer started', { pid: child.pid, log: paths.log });
    return child.pid ?? 0;
  } finally {
    closeSync(out);
  }
}
