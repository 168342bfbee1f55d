// Launching and re-attaching QEMU. QEMU runs in its own session/process group with its output
// going to a file, so it survives the agent being killed or restarted (with systemd
// KillMode=process). A process record (pid + kernel start time) lets a restarted agent find
// the same QEMU again without ever mistaking a recycled pid for it.
import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, rmSync } from 'node:fs';
import type { Logger } from '../log/logger.ts';
import { QmpClient } from '../qmp/client.ts';
import { QmpConnectError } from '../qmp/errors.ts';
import { unixSocketConnector } from '../qmp/transport.ts';
import { readJsonFile, writeFileAtomic } from '../state/atomic.ts';
import { FtkvmError } from '../util/errors.ts';
import { sleep } from '../util/clock.ts';
import type { LaunchRole } from './argv.ts';
import type { VmPaths } from './paths.ts';
import type { QmpLike } from '../colo/sequences.ts';

export interface ProcessRecord {
  pid: number;
  startTicks: number;   // /proc/<pid>/stat field 22: guards against pid reuse
  role: LaunchRole;
  startedAt: number;    // epoch ms
  binary: string;
}

export class QemuLaunchError extends FtkvmError {
  constructor(message: string, cause?: unknown) { super('QEMU_LAUNCH_FAILED', message, { cause }); }
}

/** Kernel start time of a process, or null when it does not exist. */
export function procStartTicks(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // rest[0] is field 3 (state); field 22 is rest[19]. A zombie has exited already.
    if (rest[0] === 'Z') return null;
    return Number(rest[19]);
  } catch {
    return null;
  }
}

/** The process's /proc state letter ('T': stopped by a signal), or null when it is gone. */
export function procStateLetter(pid: number): string | null {
  try { return readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').charAt(0); } catch { return null; }
}

export function isSameProcessAlive(rec: Pick<ProcessRecord, 'pid' | 'startTicks'>): boolean {
  return procStartTicks(rec.pid) === rec.startTicks;
}

export type ExitInfo = { code: number | null; signal: NodeJS.Signals | null } | { code: null; signal: null; unknown: true };

/** A QEMU process this agent launched or re-attached to, with its QMP connection. */
export class QemuHandle {
  readonly record: ProcessRecord;
  readonly qmp: QmpClient;
  readonly exited: Promise<ExitInfo>;
  readonly reattached: boolean;
  private stopWatch: (() => void) | undefined;

  constructor(record: ProcessRecord, qmp: QmpClient, exited: Promise<ExitInfo>, reattached: boolean) {
    this.record = record;
    this.qmp = qmp;
    this.exited = exited;
    this.reattached = reattached;
  }

  get pid(): number { return this.record.pid; }
  alive(): boolean { return isSameProcessAlive(this.record); }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    if (!this.alive()) return;
    try { process.kill(this.record.pid, signal); } catch { /* already gone */ }
  }

  /** SIGKILL and wait until the process is really gone (ports and tap freed). */
  async killAndWait(timeoutMs = 5000): Promise<void> {
    this.kill('SIGKILL');
    const t0 = performance.now();
    while (this.alive() && performance.now() - t0 < timeoutMs) await sleep(20);
    this.qmp.close();
  }

  /** @internal */ setWatchStopper(f: () => void): void { this.stopWatch = f; }
  dispose(): void { this.stopWatch?.(); this.qmp.close(); }
}

async function connectQmp(paths: VmPaths, log: Logger, deadlineMs: number, isAlive: () => boolean): Promise<QmpClient> {
  const t0 = performance.now();
  let last: unknown;
  while (performance.now() - t0 < deadlineMs) {
    if (!isAlive()) break;
    try {
      return await QmpClient.connect(unixSocketConnector(paths.qmpSocket, 2000), { logger: log.child('qmp') });
    } catch (e) {
      last = e;
      await sleep(50);
    }
  }
  throw new QmpConnectError(`QEMU did not open its QMP socket ${paths.qmpSocket} within ${deadlineMs} ms` +
    (isAlive() ? '' : ' (QEMU exited; see ' + paths.qemuLog + ')'), last);
}

/** Exit promise for a process we did not spawn: poll /proc (cheap) until the start time changes. */
function watchForeignExit(rec: ProcessRecord, qmp: QmpClient): { exited: Promise<ExitInfo>; stop: () => void } {
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const exited = new Promise<ExitInfo>((resolve) => {
    const check = () => {
      if (stopped) return;
      if (!isSameProcessAlive(rec)) { resolve({ code: null, signal: null, unknown: true }); return; }
      timer = setTimeout(check, 250);
      timer.unref();
    };
    // QMP closing is the fast signal; the poll is the backstop.
    qmp.once('close', () => setTimeout(check, 20));
    check();
  });
  return { exited, stop: () => { stopped = true; if (timer) clearTimeout(timer); } };
}

export interface LaunchOptions {
  binary: string;
  argv: string[];
  env: Record<string, string>;
  role: LaunchRole;
  paths: VmPaths;
  log: Logger;
  qmpDeadlineMs?: number;
}

export async function launchQemu(o: LaunchOptions): Promise<QemuHandle> {
  mkdirSync(o.paths.dir, { recursive: true, mode: 0o700 });
  rmSync(o.paths.qmpSocket, { force: true });
  const out = openSync(o.paths.qemuLog, 'a', 0o600);
  let child;
  try {
    child = spawn(o.binary, o.argv, {
      detached: true,                        // setsid: own session + process group
      stdio: ['ignore', out, out],
      env: { ...process.env, ...o.env },
      cwd: o.paths.dir,
    });
  } finally {
    closeSync(out);
  }
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  const exited = new Promise<ExitInfo>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  child.unref();
  const pid = child.pid;
  if (pid === undefined) throw new QemuLaunchError(`cannot start ${o.binary}: ${(await spawnError).message}`, await spawnError);
  const startTicks = procStartTicks(pid) ?? 0;
  const record: ProcessRecord = { pid, startTicks, role: o.role, startedAt: Date.now(), binary: o.binary };
  writeFileAtomic(o.paths.processRecord, JSON.stringify(record));
  o.log.info('QEMU started', { pid, role: o.role });
  let dead = false;
  void exited.then(() => { dead = true; });
  let qmp: QmpClient;
  try {
    qmp = await connectQmp(o.paths, o.log, o.qmpDeadlineMs ?? 15_000, () => !dead);
  } catch (e) {
    try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
    throw new QemuLaunchError(`QEMU for role ${o.role} failed to start: ${(e as Error).message}. Last lines of ${o.paths.qemuLog}: ${tail(o.paths.qemuLog)}`, e);
  }
  return new QemuHandle(record, qmp, exited, false);
}

/** Finds the QEMU a previous agent left running for this VM; null when there is none. */
export async function reattachQemu(paths: VmPaths, log: Logger): Promise<QemuHandle | null> {
  const rec = readJsonFile<ProcessRecord>(paths.processRecord);
  if (!rec) return null;
  if (!isSameProcessAlive(rec)) {
    log.info('process record points at a QEMU that is gone', { pid: rec.pid });
    rmSync(paths.processRecord, { force: true });
    return null;
  }
  const qmp = await connectQmp(paths, log, 5000, () => isSameProcessAlive(rec));
  const w = watchForeignExit(rec, qmp);
  const h = new QemuHandle(rec, qmp, w.exited, true);
  h.setWatchStopper(w.stop);
  log.info('re-attached to running QEMU', { pid: rec.pid, role: rec.role });
  return h;
}

export function forgetProcess(paths: VmPaths): void {
  rmSync(paths.processRecord, { force: true });
}

function tail(file: string, lines = 5): string {
  try {
    return readFileSync(file, 'utf8').trim().split('\n').slice(-lines).join(' | ');
  } catch {
    return '(no log)';
  }
}

// ---------------------------------------------------------------- the port the controller uses

/** What the VM controller needs of a running QEMU (QemuHandle; the simulator's QEMU model). */
export interface QemuProcess {
  readonly pid: number;
  readonly record: ProcessRecord;
  readonly qmp: QmpLike;
  readonly exited: Promise<ExitInfo>;
  readonly reattached: boolean;
  alive(): boolean;
  kill(signal?: NodeJS.Signals): void;
  killAndWait(timeoutMs?: number): Promise<void>;
  dispose(): void;
}

/**
 * QEMU process lifecycle for one VM, as a port: production launches real processes
 * (systemQemuProcesses); the simulator (test/sim) models them in virtual time.
 */
export interface QemuProcesses {
  launch(o: LaunchOptions): Promise<QemuProcess>;
  /** The QEMU a previous agent left running, or null. */
  reattach(paths: VmPaths, log: Logger): Promise<QemuProcess | null>;
  /** Forget the process record (the QEMU is gone). */
  forget(paths: VmPaths): void;
  /** Record the role the running QEMU now has (a re-attach after an agent restart reads it). */
  recordRole(paths: VmPaths, p: QemuProcess, role: LaunchRole): void;
  /** The recorded QEMU if it is alive but stopped by a signal (frozen by the lease fencer). */
  frozen(paths: VmPaths): { pid: number } | null;
  /** Signal a process found by frozen() (SIGCONT to thaw, SIGKILL to discard). */
  signal(pid: number, sig: NodeJS.Signals): void;
}

export const systemQemuProcesses: QemuProcesses = {
  launch: (o) => launchQemu(o),
  reattach: (paths, log) => reattachQemu(paths, log),
  forget: (paths) => forgetProcess(paths),
  recordRole: (paths, p, role) => writeFileAtomic(paths.processRecord, JSON.stringify({ ...p.record, role })),
  frozen(paths) {
    const rec = readJsonFile<ProcessRecord>(paths.processRecord);
    return rec && isSameProcessAlive(rec) && procStateLetter(rec.pid) === 'T' ? { pid: rec.pid } : null;
  },
  signal(pid, sig) { try { process.kill(pid, sig); } catch { /* gone */ } },
};
