// Action: build a replica on the peer (disk resync, proxies, first COLO checkpoint), and clean
// up after an attempt that failed so the guest never stays paused or half-attached.
import { randomUUID } from 'node:crypto';
import { checkpointDelay } from '../../../config/load.ts';
import { FtkvmError, errorMessage } from '../../../util/errors.ts';
import { vmPorts } from '../../ports.ts';
import * as seq from '../../sequences.ts';
import type { VmCore } from '../core.ts';
import type { PrepareRequest } from '../types.ts';

export function primaryAddrs(c: VmCore): seq.PrimaryAddrs {
  return { local: c.d.config.node.replication_address, peer: c.d.config.peer.replication_address, ports: vmPorts(c.d.vm.base_port) };
}

export async function protect(c: VmCore, why: string): Promise<void> {
  const q = c.qemu?.qmp;
  if (!q) return;
  const attempt = c.protectFailures + 1;
  const t0 = c.d.clock.mono();
  const protection = randomUUID();
  c.protection = protection;
  c.setState('syncing', `building a replica on ${c.d.config.peer.name} (attempt ${attempt}): ${why}`);
  c.resync = { phase: 'preparing-secondary', bytesDone: 0, bytesTotal: 0, rateBytesPerS: 0, etaS: null, startedAt: t0, attempt };
  const a = primaryAddrs(c);
  let stoppedByUs = false;
  try {
    const blk = await q.execute<{ device: string; inserted?: { image: { 'virtual-size': number } } }[]>('query-block');
    const size = blk.find((b) => b.device === 'colo-disk0')?.inserted?.image['virtual-size'];
    if (!size) throw new FtkvmError('NO_DISK', 'colo-disk0 not found in query-block');
    const dur = c.durable();
    // Our CLAIM (promotion epoch): a stale primary that merely heard a newer epoch is refused.
    await c.d.peer.call('POST', `/v1/peer/vms/${c.name}/prepare`, { epoch: dur.primaryEpoch, sizeBytes: size, primary: c.d.config.node.name, protection } satisfies PrepareRequest, 60_000);
    c.resync = { ...c.resync, phase: 'mirroring', bytesTotal: size };
    let lastDone = 0, lastLog = -Infinity;
    await seq.primaryMirror(q, a, (p) => {
      const now = c.d.clock.mono();
      const elapsed = Math.max(1, now - t0) / 1000;
      c.d.metrics.resync(c.name, p.offset - lastDone);
      lastDone = p.offset;
      const rate = p.offset / elapsed;
      c.resync = { ...c.resync!, bytesDone: p.offset, bytesTotal: p.len, rateBytesPerS: Math.round(rate), etaS: rate > 0 ? Math.round((p.len - p.offset) / rate) : null };
      if (now - lastLog > 5000 || p.ready) {
        lastLog = now;
        c.log.info('resync progress', { copied: p.offset, total: p.len, rateMBps: (rate / 1e6).toFixed(1), etaS: c.resync.etaS, ready: p.ready });
      }
    }, { timeoutMs: 6 * 3600_000 });
    c.resync = { ...c.resync, phase: 'connecting' };
    await seq.primaryAddProxyChardevs(q, a);
    await seq.primaryWaitSecondaryConnected(q, 15_000);
    c.resync = { ...c.resync, phase: 'first-checkpoint' };
    const st = await q.execute<{ running: boolean }>('query-status');
    const tStop = c.d.clock.mono();
    if (st.running) { await q.execute('stop'); stoppedByUs = true; }
    await seq.cancelMirror(q);
    await seq.primaryAttachReplication(q, a);
    await seq.primaryAddProxyObjects(q);
    await seq.primaryStartColo(q, a, checkpointDelay(c.d.config, c.d.vm), 120_000);
    c.ckpt.reset();
    c.protectFailures = 0;
    c.lastProtectError = null;
    c.resync = null;
    c.persist({ role: 'primary' });
    c.setState('protected', `replica on ${c.d.config.peer.name} in sync after ${((c.d.clock.mono() - t0) / 1000).toFixed(1)} s (guest paused ${stoppedByUs ? c.d.clock.mono() - tStop : 0} ms for the first checkpoint)`);
  } catch (e) {
    const msg = errorMessage(e);
    c.protectFailures++;
    const backoff = Math.min(c.d.config.colo.resync_retry_min_ms * 2 ** (c.protectFailures - 1), c.d.config.colo.resync_retry_max_ms);
    c.nextProtectAt = c.d.clock.mono() + backoff;
    c.log.warn('protection failed; guest continues unprotected', { error: msg, retryInMs: backoff });
    c.resync = null;
    await cleanupAfterFailedProtect(c, stoppedByUs);
    // Published together with the state: /v1/status never shows the error while still 'syncing'.
    c.lastProtectError = msg;
    c.setState('standalone', `protection failed (${msg}); retry in ${Math.round(backoff / 1000)} s`);
  }
}

/** Whatever happened, the guest must not stay paused and no half-built replica may stay attached. */
export async function cleanupAfterFailedProtect(c: VmCore, _stoppedByUs: boolean): Promise<void> {
  const q = c.qemu?.qmp;
  void c.d.peer.call('POST', `/v1/peer/vms/${c.name}/release`, { reason: 'protection attempt failed', epoch: c.durable().primaryEpoch }, 3000).catch(() => undefined);
  if (!q) return;
  try {
    const mig = await q.execute<{ status?: string }>('query-migrate');
    if (mig.status && ['setup', 'active', 'device'].includes(mig.status)) await q.execute('migrate_cancel');
    await seq.primaryDropSecondary(q, { inColo: mig.status === 'colo' });
  } catch (e) {
    c.log.error('cleanup after failed protection incomplete', { error: errorMessage(e) });
  }
  try {
    const st = await q.execute<{ running: boolean; status: string }>('query-status');
    if (!st.running && !c.durable().fenced) {
      await q.execute('cont');
      c.log.info('guest resumed after failed protection', { was: st.status });
    }
  } catch (e) {
    c.log.error('could not resume guest after failed protection', { error: errorMessage(e) });
  }
}
