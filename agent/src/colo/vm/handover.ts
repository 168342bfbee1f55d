// Hooks for drills and planned switchover on the primary: is the replica usable right now,
// quiesce before the crash, crash the primary's QEMU as a failure would.
import { checkpointDelay, tapName } from '../../config/load.ts';
import { errorMessage } from '../../util/errors.ts';
import type { VmCore } from './core.ts';
import { coloChannelUp } from './sense.ts';
import { VmBusyError } from './types.ts';

/**
 * Is the replica usable right now? Heartbeat summaries can be 100 ms old; before deliberately
 * killing the primary, ask QEMU itself. Returns null when fine, else why not.
 */
export async function replicaProblemNow(c: VmCore): Promise<string | null> {
  if (c.state !== 'protected' || !c.qemu?.alive()) return `state ${c.state}`;
  if (!(await coloChannelUp(c))) return 'the secondary QEMU is not connected to the primary';
  const m = await c.qemu.qmp.execute<{ status?: string }>('query-migrate', undefined, { timeoutMs: 2000 }).catch(() => ({ status: 'unknown' }));
  if (m.status !== 'colo') return `migration status is ${m.status}, not colo`;
  const since = c.msSinceCheckpoint();
  const limit = 2 * checkpointDelay(c.d.config, c.d.vm) + 3000;
  if (since > limit) return `no checkpoint for ${Math.round(since)} ms`;
  return null;
}

/**
 * Planned switchover, before the crash: make the replica this guest exactly. colo-compare
 * releases a primary's pure ACK without checking that the replica received the data (README
 * Limits; seen twice in full-suite switchovers: the client's request ACKed, the replica never
 * got it, the takeover 0.2-0.3 s later left the connection waiting forever). So: take the
 * guest's tap down on this host (nothing more enters, nothing more reaches a client; TCP
 * retransmits to the new primary), force a checkpoint (setting x-checkpoint-delay wakes the
 * COLO thread at once) and wait for it. Returns what it did, for the report.
 */
export async function quiesceForHandover(c: VmCore, timeoutMs = 5000): Promise<string> {
  const q = c.qemu?.qmp;
  if (c.state !== 'protected' || !q) return `not quiesced (state ${c.state})`;
  const tap = tapName(c.d.vm);
  const t0 = c.d.clock.mono();
  try {
    await c.d.exec('ip', ['link', 'set', 'dev', tap, 'down']);
  } catch (e) {
    return `not quiesced: could not take ${tap} down (${errorMessage(e)})`;
  }
  const c0 = c.ckpt.count;
  await q.execute('migrate-set-parameters', { 'x-checkpoint-delay': checkpointDelay(c.d.config, c.d.vm) }).catch(() => undefined);
  while (c.ckpt.count === c0 && c.d.clock.mono() - t0 < timeoutMs && c.state === 'protected') await new Promise((r) => setTimeout(r, 10));
  const ms = Math.round(c.d.clock.mono() - t0);
  return c.ckpt.count > c0 ? `guest tap down and a checkpoint taken in ${ms} ms: the replica is this guest exactly` : `guest tap down, but no checkpoint within ${ms} ms`;
}

/** Drill/switchover on the primary: kill this node's QEMU as a crash would. */
export async function crashPrimary(c: VmCore, why: string): Promise<number> {
  if (c.state !== 'protected') throw new VmBusyError(c.name, `not protected (state ${c.state})`);
  const pid = c.qemu!.pid;
  c.expectedExit = why;
  c.qemu!.kill('SIGKILL');
  return pid;
}
