// The QMP side of a DR recovery point on the primary: a point-in-time view of the guest's disk
// (image fleecing) and the dirty bitmaps that say what changed since the previous point.
//
// One transaction starts the point: the bitmap that recorded writes since the last point is
// frozen (disabled), a fresh one starts recording, and `blockdev-backup sync=none` puts a
// copy-before-write filter over colo-disk0 that saves the old content of every block the guest
// overwrites into a LOCAL temporary qcow2 whose backing is colo-disk0. Reading that image gives
// the disk as it was at the transaction: crash-consistent, while the guest keeps running. The
// image is exported read-only over NBD on a unix socket with the frozen bitmap, and the agent
// reads and ships from it. Why not `blockdev-backup` straight to the DR host: its
// copy-before-write would fail the GUEST's writes whenever the DR link breaks (QEMU < 10.1 has no
// on-cbw-error); a local fleece only fails them if this host's own disk is full.
//
// Two bitmap names alternate (ftkvm-dr-a/-b): QMP cannot rename a bitmap. Between points
// exactly one exists and records; after a failed point the frozen one is merged back into the
// recording one, so the next point still covers every write.
import { hasNode, ignoreMissing, step, type QmpLike } from '../colo/sequences.ts';

export const DR_BITMAPS = ['ftkvm-dr-a', 'ftkvm-dr-b'] as const;
export const DR_FLEECE_NODE = 'ftkvm-dr-fleece';
export const DR_FLEECE_JOB = 'ftkvm-dr-fleece';
export const DR_EXPORT = 'ftkvm-dr';
const DISK = 'colo-disk0';
const GRANULARITY = 65536;

interface BitmapInfo { name: string; count: number; recording?: boolean; status?: string; granularity: number }

/** The DR bitmaps on colo-disk0, with whether each is recording. */
export async function drBitmaps(q: QmpLike): Promise<BitmapInfo[]> {
  const blk = await q.execute<{ device: string; inserted?: { 'dirty-bitmaps'?: BitmapInfo[] }; 'dirty-bitmaps'?: BitmapInfo[] }[]>('query-block');
  const d = blk.find((b) => b.device === DISK);
  return [...(d?.inserted?.['dirty-bitmaps'] ?? []), ...(d?.['dirty-bitmaps'] ?? [])].filter((b) => (DR_BITMAPS as readonly string[]).includes(b.name));
}

const recording = (b: BitmapInfo) => b.recording ?? b.status === 'active';

export interface FleeceStarted {
  /** The frozen bitmap: every block written since the previous point (null: none recorded). */
  frozen: string | null;
  /** The bitmap recording from this point on. */
  next: string;
}

/** The point's QMP objects go: export, NBD server, fleece job and node (idempotent). */
async function removePointObjects(q: QmpLike): Promise<void> {
  await step('dr block-export-del', () => ignoreMissing(() => q.execute('block-export-del', { id: DR_EXPORT, mode: 'hard' })));
  await step('dr nbd-server-stop', () => ignoreMissing(() => q.execute('nbd-server-stop')));
  const jobs = await q.execute<{ device: string }[]>('query-block-jobs');
  if (jobs.some((j) => j.device === DR_FLEECE_JOB)) {
    await step('dr block-job-cancel', () => ignoreMissing(() => q.execute('block-job-cancel', { device: DR_FLEECE_JOB, force: true })));
    for (let i = 0; i < 100 && (await q.execute<{ device: string }[]>('query-block-jobs')).some((j) => j.device === DR_FLEECE_JOB); i++) await new Promise((r) => setTimeout(r, 20));
  }
  if (await hasNode(q, DR_FLEECE_NODE)) await step('dr blockdev-del fleece', () => q.execute('blockdev-del', { 'node-name': DR_FLEECE_NODE }));
}

/**
 * Removes what an interrupted point left (export, job, fleece node) and settles the bitmaps to
 * at most one recording one (a frozen leftover is merged into it: nothing written is forgotten).
 */
export async function drCleanup(q: QmpLike): Promise<void> {
  await removePointObjects(q);
  const bms = await drBitmaps(q);
  const live = bms.find(recording);
  for (const b of bms.filter((x) => !recording(x))) {
    if (live) await step('dr bitmap merge', () => q.execute('block-dirty-bitmap-merge', { node: DISK, target: live.name, bitmaps: [b.name] }));
    else { await step('dr bitmap enable', () => q.execute('block-dirty-bitmap-enable', { node: DISK, name: b.name })); continue; }
    await step('dr bitmap remove', () => q.execute('block-dirty-bitmap-remove', { node: DISK, name: b.name }));
  }
}

/**
 * Starts a recovery point (see the header): `fleecePath` is an empty qcow2 of the disk's size
 * made by the caller. Atomic: the view, the frozen bitmap and the new recording one all date
 * from the same instant.
 */
export async function drFleeceStart(q: QmpLike, fleecePath: string): Promise<FleeceStarted> {
  const bms = await drBitmaps(q);
  const cur = bms.find(recording)?.name ?? null;
  const next = cur === DR_BITMAPS[0] ? DR_BITMAPS[1] : DR_BITMAPS[0];
  await step('dr blockdev-add fleece', () => q.execute('blockdev-add', {
    driver: 'qcow2', 'node-name': DR_FLEECE_NODE, file: { driver: 'file', filename: fleecePath }, backing: DISK,
  }));
  const actions: unknown[] = [
    { type: 'block-dirty-bitmap-add', data: { node: DISK, name: next, granularity: GRANULARITY } },
    ...(cur ? [{ type: 'block-dirty-bitmap-disable', data: { node: DISK, name: cur } }] : []),
    { type: 'blockdev-backup', data: { 'job-id': DR_FLEECE_JOB, device: DISK, target: DR_FLEECE_NODE, sync: 'none' } },
  ];
  await step('dr transaction (freeze bitmap, start fleece)', () => q.execute('transaction', { actions }));
  return { frozen: cur, next };
}

/** Exports the fleece read-only on a unix socket, with the frozen bitmap as qemu:dirty-bitmap:NAME. */
export async function drExport(q: QmpLike, socketPath: string, bitmap: string | null): Promise<void> {
  await step('dr nbd-server-start', () => q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } }));
  await step('dr block-export-add', () => q.execute('block-export-add', {
    type: 'nbd', id: DR_EXPORT, 'node-name': DR_FLEECE_NODE, name: DR_EXPORT, writable: false, ...(bitmap ? { bitmaps: [bitmap] } : {}),
  }));
}

/**
 * Ends the point: export, job and fleece go first (an exported bitmap is busy and cannot be
 * removed). Shipped: the frozen bitmap is dropped (the DR host has everything it recorded). Not
 * shipped: it is merged into the recording one. A bitmap left frozen here would be merged into
 * the next point's (drCleanup): that point would then ship everything since the last but one.
 */
export async function drFinish(q: QmpLike, started: FleeceStarted | null, shipped: boolean): Promise<void> {
  await removePointObjects(q);
  if (started?.frozen) {
    if (!shipped) await step('dr bitmap merge back', () => ignoreMissing(() => q.execute('block-dirty-bitmap-merge', { node: DISK, target: started.next, bitmaps: [started.frozen!] })));
    await step('dr bitmap remove', () => ignoreMissing(() => q.execute('block-dirty-bitmap-remove', { node: DISK, name: started.frozen! })));
  }
  await drCleanup(q);
}
