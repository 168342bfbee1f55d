// Recovery points of the VMs shipped to this DR host: a qcow2 chain per VM and a manifest.
//
//   DATA/vms/VM/manifest.json     the points, oldest first (each: its top file + metadata)
//   DATA/vms/VM/p-ID.qcow2        one file per point, backed by the previous point's file
//   DATA/vms/VM/pending-ID.qcow2  the point being received (never listed, never booted)
//
// A pending point is an empty overlay on the newest point (or a new chain when there is none of
// the same size), written through a local qemu-nbd; it is fsynced, renamed and added to the
// manifest (atomic rename) only when its commit arrives. A crash at any moment leaves the
// manifest's points intact and at most a pending file, deleted at start.
// `keep`: the oldest point beyond it is dropped by committing the next point's overlay into it
// (qemu-img commit), after the manifest stopped listing it; never while a boot reads the chain.
import type { ChildProcess } from 'node:child_process';
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import type { Logger } from '../log/logger.ts';
import type { Exec } from '../util/exec.ts';
import { FtkvmError, errorMessage } from '../util/errors.ts';
import { readJsonFile, writeFileAtomic } from '../state/atomic.ts';
import type { NbdClient } from '../nbd/client.ts';
import { serveOverNbd, stopProcess } from './qemu-nbd.ts';
import { chunkDigests } from '../nbd/checksums.ts';
import type { RecoveryPoint, VmPoints } from './protocol.ts';

interface StoredPoint extends RecoveryPoint { file: string }
interface Manifest { vm: string; points: StoredPoint[]; activated: VmPoints['activated'] }

interface Pending {
  id: string; file: string; sock: string; proc: ChildProcess; nbd: NbdClient;
  sizeBytes: number; capturedAt: number; from: string; epoch: number; keep: number; base: string | null;
  written: number; touchedMono: number;
  /** Requests on it in progress (a long digest must not let it expire). */
  inUse: number;
}

export class DrStoreError extends FtkvmError {
  readonly status: number;
  constructor(status: number, code: string, message: string) { super(code, message); this.status = status; }
}

/** A pending point nobody wrote to for this long is dropped (its shipper died or gave up). */
export const PENDING_IDLE_MS = 15 * 60_000;

export interface StoreDeps { dataDir: string; imgBinary: string; nbdBinary: string; exec: Exec; log: Logger }

export class DrStore {
  private readonly pending = new Map<string, Pending>();
  /** Per VM: operations run one at a time (begin, commit, prune, boot) in arrival order. */
  private readonly queues = new Map<string, Promise<unknown>>();
  /** Per VM: boots reading the chain now; no prune meanwhile. */
  private readonly pins = new Map<string, number>();
  readonly shippedBytes = new Map<string, Record<RecoveryPoint['mode'], number>>();

  constructor(private readonly d: StoreDeps) {}

  dir(vm: string): string { return join(this.d.dataDir, 'vms', vm); }
  private manifestFile(vm: string): string { return join(this.dir(vm), 'manifest.json'); }

  manifest(vm: string): Manifest {
    return readJsonFile<Manifest>(this.manifestFile(vm)) ?? { vm, points: [], activated: null };
  }
  private save(m: Manifest): void { writeFileAtomic(this.manifestFile(m.vm), JSON.stringify(m, null, 2) + '\n'); }

  /** What the API shows: the points without their file names. */
  points(vm: string): VmPoints {
    const m = this.manifest(vm);
    return { vm, points: m.points.map(({ file: _f, ...p }) => p), activated: m.activated };
  }

  /** The file a point's chain is read from (newest when `id` is not given). */
  pointFile(vm: string, id?: string): { point: RecoveryPoint; path: string } {
    const m = this.manifest(vm);
    const p = id ? m.points.find((x) => x.id === id) : m.points.at(-1);
    if (!p) throw new DrStoreError(404, 'NO_RECOVERY_POINT', id ? `${vm}: no recovery point ${id}` : `${vm}: no recovery point yet`);
    const { file, ...point } = p;
    return { point, path: join(this.dir(vm), file) };
  }

  /** Runs f after every earlier operation on this VM (serialized per VM). */
  serial<T>(vm: string, f: () => Promise<T>): Promise<T> {
    const prev = this.queues.get(vm) ?? Promise.resolve();
    const next = prev.then(f, f);
    this.queues.set(vm, next.catch(() => undefined));
    return next;
  }

  /** After a fail-back: the activated chain is no longer read. */
  unpinAll(vm: string): void { this.pins.delete(vm); }

  pin(vm: string): () => void {
    this.pins.set(vm, (this.pins.get(vm) ?? 0) + 1);
    let done = false;
    return () => { if (!done) { done = true; this.pins.set(vm, Math.max(0, (this.pins.get(vm) ?? 0) - 1)); } };
  }

  /** At start: pending files of a previous life are deleted (they were never points). */
  sweep(vm: string): void {
    const dir = this.dir(vm);
    if (!existsSync(dir)) return;
    for (const f of readdirSync(dir)) if (/^pending-.*\.(qcow2|sock)$/.test(f)) { rmSync(join(dir, f), { force: true }); this.d.log.info('DR: removed an unfinished point of a previous run', { vm, file: f }); }
  }

  begin(vm: string, b: { sizeBytes: number; capturedAt: number; from: string; epoch: number; keep: number }): Promise<{ id: string; newest: string | null }> {
    return this.serial(vm, async () => {
      const m = this.manifest(vm);
      if (m.activated) throw new DrStoreError(409, 'DR_ACTIVATED', `${vm} was activated at this DR site (${new Date(m.activated.at).toISOString()}): no more recovery points are taken in; fail back first`);
      const newest = m.points.at(-1);
      if (newest && b.epoch < newest.epoch) throw new DrStoreError(409, 'STALE_EPOCH', `${vm}: epoch ${b.epoch} is older than the newest point's (${newest.epoch}, from ${newest.from}): a stale primary`);
      for (const p of [...this.pending.values()].filter((x) => x.id.startsWith(`${vm}/`))) {
        // A point from an older primary must not cut short the newer primary's.
        if (p.epoch > b.epoch) throw new DrStoreError(409, 'STALE_EPOCH', `${vm}: a point from epoch ${p.epoch} (${p.from}) is being received; epoch ${b.epoch} is older`);
        await this.drop(p, 'a newer point began');
      }
      const id = randomUUID();
      const dir = this.dir(vm);
      mkdirSync(dir, { recursive: true });
      const file = join(dir, `pending-${id}.qcow2`), sock = join(dir, `pending-${id}.sock`);
      const base = newest && newest.sizeBytes === b.sizeBytes ? newest : null;
      await this.d.exec(this.d.imgBinary, ['create', '-q', '-f', 'qcow2', ...(base ? ['-b', base.file, '-F', 'qcow2'] : []), file, String(b.sizeBytes)], { timeoutMs: 60_000 });
      // Zeroes written become zero clusters (sparse, and correct over a backing file).
      const served = await serveOverNbd(this.d.nbdBinary, sock, ['--format', 'qcow2', '--cache', 'writeback', '--discard', 'unmap', '--detect-zeroes', 'unmap', '--persistent', file])
        .catch((e: Error) => { rmSync(file, { force: true }); throw new DrStoreError(500, 'DR_STORE_FAILED', `qemu-nbd did not serve ${file}: ${e.message}`); });
      const { proc, nbd } = served;
      const key = `${vm}/${id}`;
      this.pending.set(key, { id: key, file, sock, proc, nbd, sizeBytes: b.sizeBytes, capturedAt: b.capturedAt, from: b.from, epoch: b.epoch, keep: b.keep, base: base?.id ?? null, written: 0, touchedMono: performance.now(), inUse: 0 });
      this.d.log.info('DR: receiving a recovery point', { vm, id, from: b.from, epoch: b.epoch, on: base?.id ?? 'nothing (a new chain)' });
      return { id, newest: base?.id ?? null };
    });
  }

  private pendingOf(vm: string, id: string): Pending {
    const p = this.pending.get(`${vm}/${id}`);
    if (!p) throw new DrStoreError(404, 'NO_PENDING_POINT', `${vm}: no recovery point ${id} being received (dropped, committed or never begun)`);
    p.touchedMono = performance.now();
    return p;
  }

  private async using<T>(p: Pending, f: () => Promise<T>): Promise<T> {
    p.inUse++;
    try { return await f(); } finally { p.inUse--; p.touchedMono = performance.now(); }
  }

  async digests(vm: string, id: string, chunkBytes: number): Promise<Buffer> {
    const p = this.pendingOf(vm, id);
    return this.using(p, () => chunkDigests(p.nbd, chunkBytes));
  }

  async write(vm: string, id: string, offset: number, data: Buffer): Promise<void> {
    const p = this.pendingOf(vm, id);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + data.length > p.sizeBytes) throw new DrStoreError(400, 'BAD_RANGE', `${offset}+${data.length} is outside the ${p.sizeBytes}-byte disk`);
    await this.using(p, () => p.nbd.write(offset, data));
    p.written += data.length;
  }

  commit(vm: string, id: string, b: { mode: RecoveryPoint['mode']; bytesShipped: number }): Promise<RecoveryPoint> {
    return this.serial(vm, async () => {
      const p = this.pendingOf(vm, id);
      this.pending.delete(p.id);
      const now = this.manifest(vm);
      const refuse = now.activated ? `${vm} was activated at this DR site meanwhile` : (now.points.at(-1)?.epoch ?? 0) > p.epoch ? `a point of a newer epoch (${now.points.at(-1)!.epoch}) landed meanwhile` : null;
      if (refuse) { await this.discard(p); throw new DrStoreError(409, now.activated ? 'DR_ACTIVATED' : 'STALE_EPOCH', `${vm}: point ${id} not taken: ${refuse}`); }
      try {
        await p.nbd.flush();
        p.nbd.close();
        await stopProcess(p.proc);
        fsyncFile(p.file);
      } catch (e) {
        await this.discard(p);
        throw new DrStoreError(500, 'DR_STORE_FAILED', `${vm}: point ${id} could not be made durable: ${errorMessage(e)}`);
      }
      const m = this.manifest(vm);
      const file = `p-${id}.qcow2`;
      renameSync(p.file, join(this.dir(vm), file));
      rmSync(p.sock, { force: true });
      const point: StoredPoint = { id, capturedAt: p.capturedAt, committedAt: Date.now(), from: p.from, epoch: p.epoch, sizeBytes: p.sizeBytes, mode: b.mode, bytesShipped: b.bytesShipped, file };
      m.points.push(point);
      this.save(m); // the point exists from here on
      const sb = this.shippedBytes.get(vm) ?? { delta: 0, digest: 0, full: 0 };
      sb[b.mode] += p.written;
      this.shippedBytes.set(vm, sb);
      this.d.log.info('DR: recovery point committed', { vm, id, mode: b.mode, bytes: p.written, from: p.from, epoch: p.epoch, dataAgeS: Math.round((Date.now() - p.capturedAt) / 1000), points: m.points.length });
      await this.prune(vm, p.keep).catch((e) => this.d.log.warn('DR: dropping old recovery points failed (retried at the next commit)', { vm, error: errorMessage(e) }));
      const { file: _f, ...shown } = point;
      return shown;
    });
  }

  abort(vm: string, id: string): Promise<void> {
    return this.serial(vm, async () => {
      const p = this.pending.get(`${vm}/${id}`);
      if (p) await this.drop(p, 'aborted by the shipper');
    });
  }

  /** Drops pending points nobody wrote to for PENDING_IDLE_MS. */
  async expireIdle(): Promise<void> {
    for (const p of [...this.pending.values()]) {
      if (p.inUse === 0 && performance.now() - p.touchedMono > PENDING_IDLE_MS) await this.serial(p.id.split('/')[0]!, () => this.drop(p, 'idle'));
    }
  }

  private async drop(p: Pending, why: string): Promise<void> {
    this.pending.delete(p.id);
    await this.discard(p);
    this.d.log.info('DR: unfinished recovery point dropped', { point: p.id, why, bytesWritten: p.written });
  }

  private async discard(p: Pending): Promise<void> {
    p.nbd.close();
    await stopProcess(p.proc).catch(() => undefined);
    rmSync(p.file, { force: true });
    rmSync(p.sock, { force: true });
  }

  /** Drops the oldest points beyond `keep` (see the header). Caller holds the VM's queue. */
  private async prune(vm: string, keep: number): Promise<void> {
    for (;;) {
      const m = this.manifest(vm);
      if (m.points.length <= keep || (this.pins.get(vm) ?? 0) > 0 || m.activated) return;
      const [oldest, next, after] = m.points;
      if (!oldest || !next) return;
      const dir = this.dir(vm);
      m.points.shift();
      this.save(m); // no longer listed: nothing may boot it from now on
      if (next.sizeBytes !== oldest.sizeBytes) { rmSync(join(dir, oldest.file), { force: true }); continue; } // a new chain began at `next`
      // next's overlay into oldest's file: that file then holds exactly `next` (the overlay is emptied).
      await this.d.exec(this.d.imgBinary, ['commit', '-q', join(dir, next.file)], { timeoutMs: 6 * 3600_000 });
      if (after && after.sizeBytes === next.sizeBytes) await this.d.exec(this.d.imgBinary, ['rebase', '-u', '-F', 'qcow2', '-b', oldest.file, join(dir, after.file)], { timeoutMs: 60_000 });
      const emptied = next.file;
      const fresh = this.manifest(vm); // re-read: only this point's file changes here
      const kept = fresh.points.find((x) => x.id === next.id);
      if (kept) kept.file = oldest.file;
      this.save(fresh);
      rmSync(join(dir, emptied), { force: true });
      this.d.log.info('DR: oldest recovery point dropped', { vm, id: oldest.id, keep });
    }
  }

  /** Marks the VM as running at this site (no more points taken in; the chain stays pinned), or not (null). */
  markActivated(vm: string, a: VmPoints['activated']): void {
    const m = this.manifest(vm);
    m.activated = a;
    this.save(m);
  }

  async close(): Promise<void> {
    for (const p of [...this.pending.values()]) await this.drop(p, 'DR target stopping');
  }
}

function fsyncFile(path: string): void {
  const fd = openSync(path, 'r+');
  try { fsyncSync(fd); } finally { closeSync(fd); }
}
