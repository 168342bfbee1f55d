// Ships a VM's recovery points to its DR target, on whichever host is the VM's primary now.
//
// Every dr.interval_s: a point-in-time view of the disk (dr/qmp.ts), then only what the DR host
// lacks crosses the link, under a bandwidth cap:
//   delta  — the blocks the frozen dirty bitmap marks, when the DR host's newest point is the
//            one this QEMU shipped last (same process: the bitmap has recorded since then);
//   digest — otherwise (a new primary after a COLO failover, an agent restart, a failed point
//            whose base is unsure): both sides digest the disk in chunks, the differing chunks
//            cross (reads the whole disk on both sides; ships only what differs);
//   full   — the DR host has no point of this size: every chunk that is not zero.
// The DR host makes the point visible only once its commit is answered (dr/store.ts).
// A re-protection takes precedence: protect() calls yieldTo(), which aborts a point in flight
// (QEMU allows one NBD server, and the resync's block jobs must not meet the fleece's).
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import type { DrSettings } from '../config/schema.ts';
import type { VmCore } from '../colo/vm/core.ts';
import { NbdClient, STATE_DIRTY } from '../nbd/client.ts';
import { chunkDigests, differingChunks, zeroChunks } from '../nbd/checksums.ts';
import { readSecret } from '../util/secret.ts';
import { errorMessage } from '../util/errors.ts';
import { sleep } from '../util/clock.ts';
import { DR_EXPORT, drCleanup, drExport, drFinish, drFleeceStart, type FleeceStarted } from './qmp.ts';
import { DrTargetClient, type RecoveryPoint } from './protocol.ts';
import { RateLimiter } from './limiter.ts';

/** Digest chunk for the digest mode, and the largest piece sent in one PUT. */
export const DR_CHUNK_BYTES = 1024 * 1024;
const ELIGIBLE = new Set(['protected', 'standalone']);

export interface DrShipment { id: string; mode: RecoveryPoint['mode']; bytesPlanned: number; bytesShipped: number; durationMs: number; finishedAt: number }

export interface DrStatus {
  target: string;
  intervalS: number;
  rpoTargetS: number;
  /** This node ships (it is the VM's primary); the other node of the pair reports false. */
  shipping: boolean;
  phase: 'idle' | 'capturing' | 'comparing' | 'sending' | 'committing';
  /** The newest recovery point this node knows of at the DR host. */
  newest: Pick<RecoveryPoint, 'id' | 'capturedAt' | 'mode' | 'from'> | null;
  /** Achieved RPO: age of the newest point's data (s), null when none is known. */
  rpoS: number | null;
  current: { mode: RecoveryPoint['mode']; bytesPlanned: number | null; bytesDone: number; startedAt: number } | null;
  lastShipment: DrShipment | null;
  lastError: { at: number; message: string } | null;
  bytesShippedTotal: number;
}

export interface DrEvents { shipped(vm: string, s: DrShipment): void; failed(vm: string): void }

export class DrShipper {
  private readonly client: DrTargetClient;
  private readonly limiter: RateLimiter;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private abort: AbortController | null = null;
  private nextAtMono = 0;
  private newestFetchedMono = -Infinity;
  /** The point this QEMU process shipped last: the base a delta may build on. */
  private base: { id: string; qemuPid: number; sizeBytes: number } | null = null;
  private st: Omit<DrStatus, 'rpoS' | 'shipping'>;
  /** The QEMU process already checked for leftovers of an interrupted point. */
  private cleanedPid: number | null = null;

  constructor(private readonly c: VmCore, private readonly dr: DrSettings, apiTokenFile: string, private readonly events: DrEvents) {
    const tokenFile = dr.token_file ?? apiTokenFile;
    this.client = new DrTargetClient(dr.target, () => readSecret(tokenFile), dr.ca_file);
    this.limiter = new RateLimiter(dr.bandwidth_mbit * 1e6, c.d.clock, sleep);
    this.st = { target: dr.target, intervalS: dr.interval_s, rpoTargetS: dr.rpo_target_s, phase: 'idle', newest: null, current: null, lastShipment: null, lastError: null, bytesShippedTotal: 0 };
    // A re-protection waits for (and cuts short) a point in flight.
    c.drYield = () => this.yieldTo();
    c.drStatus = () => this.status();
  }

  start(): void {
    this.timer = setInterval(() => this.step(), 1000);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.yieldTo();
    await this.client.close();
  }

  private eligible(): boolean {
    const c = this.c;
    return ELIGIBLE.has(c.state) && !!c.qemu?.alive() && !c.busy && !c.durable().fenced;
  }

  status(): DrStatus {
    const newest = this.st.newest;
    return {
      ...this.st,
      shipping: this.eligible() || this.running !== null,
      rpoS: newest ? Math.max(0, Math.round((this.c.d.clock.now() - newest.capturedAt) / 1000)) : null,
    };
  }

  /**
   * Aborts a point in flight and waits until its cleanup is done (QMP objects gone, bitmap
   * merged back). Once per QEMU process also removes what a point cut short by an agent restart
   * left in it (a fleece job under colo-disk0 must not meet the resync's block jobs).
   */
  async yieldTo(): Promise<void> {
    this.abort?.abort(new Error('a re-protection needs the disk'));
    await this.running?.catch(() => undefined);
    const q = this.c.qemu?.qmp, pid = this.c.qemu?.pid;
    if (q && pid !== undefined && this.cleanedPid !== pid) {
      await drCleanup(q).then(() => { this.cleanedPid = pid; }, (e) => this.c.log.warn('DR: could not check for leftovers of an interrupted point', { error: errorMessage(e) }));
    }
  }

  private step(): void {
    if (this.running) return;
    const mono = this.c.d.clock.mono();
    if (!this.eligible()) { this.nextAtMono = Math.min(this.nextAtMono, mono); return; }
    // The RPO shown before this node has shipped anything: ask the DR host (once per interval).
    if (!this.st.newest && mono - this.newestFetchedMono > this.dr.interval_s * 1000) {
      this.newestFetchedMono = mono;
      void this.client.points(this.c.name).then((p) => { const n = p.points.at(-1); if (n && !this.st.newest) this.st.newest = { id: n.id, capturedAt: n.capturedAt, mode: n.mode, from: n.from }; }, () => undefined);
    }
    if (mono < this.nextAtMono) return;
    this.nextAtMono = mono + this.dr.interval_s * 1000;
    this.running = this.point().finally(() => { this.running = null; this.abort = null; this.st.phase = 'idle'; this.st.current = null; });
  }

  /** One recovery point: capture, compare, send, commit; always cleans up. */
  private async point(): Promise<void> {
    const c = this.c, q = c.qemu?.qmp, pid = c.qemu?.pid;
    if (!q || pid === undefined) return;
    const abort = this.abort = new AbortController();
    const t0 = c.d.clock.mono();
    const fleece = join(c.paths.dir, 'dr-fleece.qcow2'), sock = join(c.paths.dir, 'dr-nbd.sock');
    let started: FleeceStarted | null = null, pendingId: string | null = null, shipped = false, nbd: NbdClient | null = null;
    const check = () => { if (abort.signal.aborted) throw abort.signal.reason; };
    try {
      this.st.phase = 'capturing';
      await drCleanup(q); // what an interrupted point (an agent restart) left
      this.cleanedPid = pid;
      const blk = await q.execute<{ device: string; inserted?: { image: { 'virtual-size': number } } }[]>('query-block');
      const size = blk.find((b) => b.device === 'colo-disk0')?.inserted?.image['virtual-size'];
      if (!size) throw new Error('colo-disk0 not found in query-block');
      // The DR host first: an unreachable one costs this QEMU nothing. capturedAt is taken before
      // the view (the point's data is at least that fresh: its age is never understated).
      const capturedAt = c.d.clock.now();
      const begin = await this.client.begin(c.name, abort.signal, { sizeBytes: size, capturedAt, from: c.d.config.node.name, epoch: Math.max(1, c.durable().primaryEpoch), keep: this.dr.keep });
      pendingId = begin.id;
      check();
      rmSync(fleece, { force: true }); rmSync(sock, { force: true });
      await c.d.exec(c.d.config.qemu.img_binary, ['create', '-q', '-f', 'qcow2', fleece, String(size)]);
      check();
      started = await drFleeceStart(q, fleece);
      const b = this.base;
      const delta = !!(b && started.frozen && b.qemuPid === pid && b.sizeBytes === size && b.id === begin.newest);
      const mode: RecoveryPoint['mode'] = delta ? 'delta' : begin.newest ? 'digest' : 'full';
      if (!delta && b) c.log.info(`DR: ${mode} point: no delta base`, { why: !started.frozen ? 'no dirty bitmap in this QEMU' : b.qemuPid !== pid ? 'another QEMU process' : b.id !== begin.newest ? `the DR host's newest point is ${begin.newest ?? 'none'}, not ${b.id}` : 'disk size changed' });
      const bitmapCtx = `qemu:dirty-bitmap:${started.frozen}`;
      await drExport(q, sock, delta ? started.frozen : null);
      nbd = await NbdClient.connect({ path: sock }, DR_EXPORT, 10_000, undefined, delta ? [bitmapCtx] : []);
      this.st.current = { mode, bytesPlanned: null, bytesDone: 0, startedAt: c.d.clock.now() };
      this.st.phase = 'comparing';
      const ranges = delta ? await dirtyRanges(nbd, bitmapCtx)
        : mode === 'full' ? chunkRanges(await zeroChunks(nbd, DR_CHUNK_BYTES), 0, size)
          : await this.differing(nbd, begin.id, size, check, abort.signal);
      const planned = ranges.reduce((s, r) => s + r[1], 0);
      this.st.current.bytesPlanned = planned;
      this.st.phase = 'sending';
      let done = 0;
      for (const [off, len] of splitRanges(ranges, DR_CHUNK_BYTES)) {
        check();
        await this.limiter.take(len);
        await this.client.put(c.name, begin.id, off, await nbd.read(off, len), abort.signal);
        done += len;
        this.st.current.bytesDone = done;
      }
      check();
      this.st.phase = 'committing';
      const point = await this.client.commit(c.name, begin.id, { mode, bytesShipped: done }, abort.signal);
      shipped = true;
      pendingId = null;
      this.base = { id: point.id, qemuPid: pid, sizeBytes: size };
      this.st.newest = { id: point.id, capturedAt: point.capturedAt, mode, from: point.from };
      const s: DrShipment = { id: point.id, mode, bytesPlanned: planned, bytesShipped: done, durationMs: Math.round(c.d.clock.mono() - t0), finishedAt: c.d.clock.now() };
      this.st.lastShipment = s;
      this.st.bytesShippedTotal += done;
      this.st.lastError = null;
      this.events.shipped(c.name, s);
      c.log.info('DR: recovery point shipped', { id: point.id, mode, bytes: done, planned, diskBytes: size, durationMs: s.durationMs, dataAgeS: Math.round((c.d.clock.now() - capturedAt) / 1000) });
    } catch (e) {
      this.st.lastError = { at: c.d.clock.now(), message: errorMessage(e) };
      this.events.failed(c.name);
      c.log.warn('DR: recovery point not shipped; the next one covers its writes', { error: errorMessage(e), aborted: abort.signal.aborted });
      // Retry sooner than a whole interval (not in a tight loop), unless cut short on purpose.
      if (!abort.signal.aborted) this.nextAtMono = Math.min(this.nextAtMono, c.d.clock.mono() + Math.min(this.dr.interval_s * 1000, 30_000));
      if (pendingId) await this.client.abort(c.name, pendingId).catch(() => undefined);
    } finally {
      nbd?.close();
      try { if (c.qemu?.qmp === q) await drFinish(q, started, shipped); } catch (e) {
        this.cleanedPid = null; // a re-protection checks again before its own block jobs
        c.log.warn('DR: cleanup of the point-in-time view failed (retried before a re-protection and at the next point)', { error: errorMessage(e) });
      }
      rmSync(fleece, { force: true }); rmSync(sock, { force: true });
    }
  }

  /** The chunks whose digests differ from the DR host's newest point. */
  private async differing(nbd: NbdClient, id: string, size: number, check: () => void, signal: AbortSignal): Promise<[number, number][]> {
    const [remote, local] = await Promise.all([
      this.client.digests(this.c.name, id, DR_CHUNK_BYTES, signal),
      chunkDigests(nbd, DR_CHUNK_BYTES, () => check()),
    ]);
    const diff = differingChunks(local, remote);
    return diff.map((i) => [i * DR_CHUNK_BYTES, Math.min(DR_CHUNK_BYTES, size - i * DR_CHUNK_BYTES)]);
  }
}

/** The dirty extents of an exported bitmap, as [offset, length] ranges. */
async function dirtyRanges(nbd: NbdClient, ctx: string): Promise<[number, number][]> {
  const out: [number, number][] = [];
  for (let off = 0; off < nbd.size;) {
    const ext = await nbd.contextStatus(ctx, off, Math.min(nbd.size - off, 1 << 30));
    let end = off;
    for (const e of ext) {
      const a = Math.max(e.offset, off), b = Math.min(e.offset + e.length, nbd.size);
      if (b > a && (e.flags & STATE_DIRTY)) {
        const last = out.at(-1);
        if (last && last[0] + last[1] === a) last[1] += b - a; else out.push([a, b - a]);
      }
      end = Math.max(end, b);
    }
    if (end <= off) throw new Error(`dirty bitmap status made no progress at ${off}`);
    off = end;
  }
  return out;
}

/** Ranges of the chunks that are not all zeroes. */
function chunkRanges(zero: Uint8Array, _from: number, size: number): [number, number][] {
  const out: [number, number][] = [];
  for (let i = 0; i < zero.length; i++) if (!zero[i]) out.push([i * DR_CHUNK_BYTES, Math.min(DR_CHUNK_BYTES, size - i * DR_CHUNK_BYTES)]);
  return out;
}

/** Ranges cut into pieces of at most `max` bytes. */
export function splitRanges(ranges: [number, number][], max: number): [number, number][] {
  const out: [number, number][] = [];
  for (const [off, len] of ranges) for (let o = 0; o < len; o += max) out.push([off + o, Math.min(max, len - o)]);
  return out;
}
