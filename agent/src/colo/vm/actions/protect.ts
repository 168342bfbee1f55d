// Action: build a replica on the peer (disk resync, proxies, first COLO checkpoint), and clean
// up after an attempt that failed so the guest never stays paused or half-attached.
import { randomUUID } from 'node:crypto';
import { checkpointDelay } from '../../../config/load.ts';
import { FtkvmError, errorMessage } from '../../../util/errors.ts';
import { PeerRpcError } from '../../../peer/client.ts';
import { vmPorts } from '../../ports.ts';
import * as seq from '../../sequences.ts';
import type { VmCore } from '../core.ts';
import type { PrepareAnswer, PrepareRequest } from '../types.ts';
import { join } from 'node:path';
import { NbdClient } from '../../../nbd/client.ts';
import { chunkBytesOf, chunkDigests, copyChunks, differingChunks } from '../../../nbd/checksums.ts';

export function primaryAddrs(c: VmCore): seq.PrimaryAddrs {
  return { local: c.d.config.node.replication_address, peer: c.d.config.peer.replication_address, ports: vmPorts(c.d.vm.base_port) };
}

export async function protect(c: VmCore, why: string): Promise<void> {
  const q = c.qemu?.qmp;
  if (!q) return;
  await c.drYield();
  const attempt = c.protectFailures + 1;
  const t0 = c.d.clock.mono();
  const protection = randomUUID();
  c.protection = protection;
  // A checksum resync that failed is retried as a full copy (and says so); the next protection
  // tries checksums again.
  const mode = c.d.config.colo.resync === 'checksum' && !c.resyncFallback ? 'checksum' : 'full';
  if (c.d.config.colo.resync === 'checksum' && mode === 'full') c.log.warn('full disk copy this time: the last checksum resync failed', { why: c.resyncFallback });
  c.setState('syncing', `building a replica on ${c.d.config.peer.name} (attempt ${attempt}, ${mode} resync): ${why}`);
  c.resync = { mode, phase: 'preparing-secondary', plannedBytes: null, bytesDone: 0, bytesTotal: 0, rateBytesPerS: 0, etaS: null, startedAt: c.d.clock.now(), attempt };
  const a = primaryAddrs(c);
  let stoppedByUs = false;
  try {
    const blk = await q.execute<{ device: string; inserted?: { image: { 'virtual-size': number } } }[]>('query-block');
    const size = blk.find((b) => b.device === 'colo-disk0')?.inserted?.image['virtual-size'];
    if (!size) throw new FtkvmError('NO_DISK', 'colo-disk0 not found in query-block');
    const dur = c.durable();
    // Our CLAIM (promotion epoch): a stale primary that merely heard a newer epoch is refused.
    const prepare = (extra: Partial<PrepareRequest>, timeoutMs: number) => c.d.peer.call<PrepareAnswer>('POST', `/v1/peer/vms/${c.name}/prepare`,
      { epoch: dur.primaryEpoch, sizeBytes: size, primary: c.d.config.node.name, protection, ...extra } satisfies PrepareRequest, timeoutMs);
    if (mode === 'checksum') {
      await checksumSync(c, q, a, size, prepare, t0);
    } else {
      await prepare({}, 60_000);
      c.resync = { ...c.resync, phase: 'mirroring', bytesTotal: size, plannedBytes: size };
      const progress = progressReporter(c, t0);
      await seq.primaryMirror(q, a, (p) => progress(p.offset, p.len, p.ready), { timeoutMs: 6 * 3600_000 });
    }
    c.resync = { ...c.resync, phase: 'connecting' };
    await seq.primaryAddProxyChardevs(q, a);
    await seq.primaryWaitSecondaryConnected(q, 15_000);
    c.resync = { ...c.resync, phase: 'first-checkpoint' };
    const st = await q.execute<{ running: boolean }>('query-status');
    const tStop = c.d.clock.mono();
    if (st.running) { await q.execute('stop'); stoppedByUs = true; }
    if (mode === 'checksum') {
      // Paused: the last writes since the catching-up passes, then the disks are identical.
      const last = await seq.backupDelta(q, a, 600_000);
      c.d.metrics.resync(c.name, last.copiedBytes);
      c.log.info('checksum resync: final delta copied with the guest paused', { bytes: last.copiedBytes, ms: Math.round(c.d.clock.mono() - tStop) });
      await seq.checksumCleanup(q);
    } else {
      await seq.cancelMirror(q);
    }
    await seq.primaryAttachReplication(q, a);
    await seq.primaryAddProxyObjects(q);
    await seq.primaryStartColo(q, a, checkpointDelay(c.d.config, c.d.vm), 120_000);
    c.ckpt.reset();
    c.protectFailures = 0;
    c.lastProtectError = null;
    c.resyncFallback = null;
    const done = c.resync;
    c.resync = null;
    c.persist({ role: 'primary' });
    c.setState('protected', `replica on ${c.d.config.peer.name} in sync after ${((c.d.clock.mono() - t0) / 1000).toFixed(1)} s (${mode} resync${mode === 'checksum' ? `: ${done.plannedBytes ?? 0} of ${size} bytes differed` : ''}; guest paused ${stoppedByUs ? Math.round(c.d.clock.mono() - tStop) : 0} ms for the first checkpoint)`);
  } catch (e) {
    const msg = errorMessage(e);
    c.protectFailures++;
    // The next attempt copies the whole disk if the checksum resync itself failed; not when the
    // peer was busy, stale or unreachable (a full copy would not have fared better).
    if (mode === 'checksum' && !(e instanceof PeerRpcError && (e.status === null || e.status === 409))) c.resyncFallback = msg;
    const backoff = Math.min(c.d.config.colo.resync_retry_min_ms * 2 ** (c.protectFailures - 1), c.d.config.colo.resync_retry_max_ms);
    c.nextProtectAt = c.d.clock.mono() + backoff;
    c.log.warn('protection failed; guest continues unprotected', { error: msg, retryInMs: backoff, resync: mode });
    c.resync = null;
    await cleanupAfterFailedProtect(c, stoppedByUs);
    // Published together with the state: /v1/status never shows the error while still 'syncing'.
    c.lastProtectError = msg;
    c.setState('standalone', `protection failed (${msg}); retry in ${Math.round(backoff / 1000)} s`);
  }
}

/** Progress of a copy (bytes done of total) into status, metrics and a log line every 5 s. */
function progressReporter(c: VmCore, t0: number): (done: number, total: number, ready: boolean) => void {
  let lastDone = 0, lastLog = -Infinity;
  return (done, total, ready) => {
    const now = c.d.clock.mono();
    const elapsed = Math.max(1, now - t0) / 1000;
    c.d.metrics.resync(c.name, done - lastDone);
    lastDone = done;
    const rate = done / elapsed;
    c.resync = { ...c.resync!, bytesDone: done, bytesTotal: total, rateBytesPerS: Math.round(rate), etaS: rate > 0 ? Math.round((total - done) / rate) : null };
    if (now - lastLog > 5000 || ready) {
      lastLog = now;
      c.log.info('resync progress', { mode: c.resync.mode, phase: c.resync.phase, copied: done, total, rateMBps: (rate / 1e6).toFixed(1), etaS: c.resync.etaS, ready });
    }
  };
}

/**
 * Checksum resync (nbd/checksums.ts): record writes from now on, digest both copies (ours
 * through a read-only export of colo-disk0, the secondary's while it prepares), copy the chunks
 * that differ, then what the guest wrote meanwhile (blockdev-backup of the bitmap) until little
 * is left; the last of it is copied with the guest paused, right before COLO starts.
 */
async function checksumSync(c: VmCore, q: seq.QmpLike, a: seq.PrimaryAddrs, size: number,
  prepare: (extra: Partial<PrepareRequest>, timeoutMs: number) => Promise<PrepareAnswer>, t0: number): Promise<void> {
  const chunk = c.d.config.colo.resync_chunk_kib * 1024;
  const sock = join(c.paths.dir, 'resync-scan.sock');
  await seq.checksumScanStart(q, sock);
  const local = await NbdClient.connect({ path: sock }, seq.SCAN_EXPORT);
  let dst: NbdClient | null = null;
  try {
    c.resync = { ...c.resync!, phase: 'digesting', bytesTotal: size };
    const tDigest = c.d.clock.mono();
    // The secondary digests its disk before answering: allow for a slow disk (20 MB/s).
    const [mine, answer] = await Promise.all([
      chunkDigests(local, chunk, (p) => { c.resync = { ...c.resync!, bytesDone: p.doneBytes }; }),
      prepare({ checksumChunkBytes: chunk }, 60_000 + Math.ceil(size / 20_000)),
    ]);
    if (!answer.digests) throw new FtkvmError('RESYNC_NO_DIGESTS', `${c.d.config.peer.name} did not digest its disk (an older agent?)`);
    const diff = differingChunks(mine, Buffer.from(answer.digests, 'base64'));
    const planned = chunkBytesOf(diff, chunk, size);
    c.log.info('checksum resync: digests compared', { chunks: Math.ceil(size / chunk), differing: diff.length, plannedBytes: planned, diskBytes: size, digestMs: Math.round(c.d.clock.mono() - tDigest) });
    c.resync = { ...c.resync!, phase: 'copying', plannedBytes: planned, bytesDone: 0, bytesTotal: planned };
    dst = await NbdClient.connect({ host: a.peer, port: a.ports.nbd }, 'parent0');
    const progress = progressReporter(c, c.d.clock.mono());
    await copyChunks(local, dst, diff, chunk, (p) => progress(p.doneBytes, p.totalBytes, false));
  } finally {
    local.close();
    dst?.close();
  }
  await seq.checksumScanStop(q);
  c.resync = { ...c.resync!, phase: 'catching-up' };
  // The guest kept writing: copy what it wrote, passes while it runs, as long as each leaves
  // less behind; the rest is copied with the guest paused, so it must be small.
  let dirty = Infinity;
  for (let pass = 1; pass <= 10; pass++) {
    const r = await seq.backupDelta(q, a, 6 * 3600_000);
    c.d.metrics.resync(c.name, r.copiedBytes);
    c.resync = { ...c.resync!, plannedBytes: (c.resync!.plannedBytes ?? 0) + r.copiedBytes };
    c.log.info('checksum resync: writes since the scan copied', { pass, bytes: r.copiedBytes, dirtyAfter: r.dirtyAfter, sinceStartS: ((c.d.clock.mono() - t0) / 1000).toFixed(1) });
    const shrinking = r.dirtyAfter < dirty;
    dirty = r.dirtyAfter;
    if (dirty <= 4 * chunk || !shrinking) break;
  }
  if (dirty > MAX_PAUSED_DELTA_BYTES) {
    throw new FtkvmError('RESYNC_NOT_CONVERGING', `the guest writes faster than the checksum resync catches up (${dirty} bytes dirty after the last pass, more than ${MAX_PAUSED_DELTA_BYTES} to copy with the guest paused)`);
  }
}

/** The most a checksum resync copies with the guest paused before COLO starts (~0.5 s at 1 Gbit/s). */
const MAX_PAUSED_DELTA_BYTES = 64 * 1024 * 1024;

/** Whatever happened, the guest must not stay paused and no half-built replica may stay attached. */
export async function cleanupAfterFailedProtect(c: VmCore, _stoppedByUs: boolean): Promise<void> {
  const q = c.qemu?.qmp;
  if (q && c.d.config.colo.resync === 'checksum') {
    // Before the peer is told to release: a backup job still writing to its export must end first.
    await seq.checksumCleanup(q).catch((e) => c.log.error('cleanup of the checksum resync incomplete', { error: errorMessage(e) }));
  }
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
