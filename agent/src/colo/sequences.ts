// The COLO sequences, as small functions over a QMP connection. They follow QEMU's
// docs/COLO-FT.txt as measured on QEMU 7.2 / 10.0.13 (see README "How COLO is driven").
// Object ids are fixed: hn0 netdev, colo-disk0 quorum, parent0 secondary's disk, replication0
// primary's NBD child; proxy chardevs mirror0/compare1/compare0/compare0-0/compare_out/compare_out0;
// filters m0/redire0/redire1 (primary), f1/f2/rew0 (secondary); iothread1; comp0.
import type { QmpEvent } from '../qmp/client.ts';
import { QmpCommandError } from '../qmp/errors.ts';
import { FtkvmError } from '../util/errors.ts';
import { sleep } from '../util/clock.ts';
import type { VmPortName } from './ports.ts';

/** The part of the QMP client the sequences use (lets unit tests script a fake QEMU). */
export interface QmpLike {
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: { timeoutMs?: number }): Promise<T>;
  hmp(commandLine: string, opts?: { timeoutMs?: number }): Promise<string>;
  on(ev: 'event', fn: (e: QmpEvent) => void): unknown;
  off(ev: 'event', fn: (e: QmpEvent) => void): unknown;
}

export class ColoSequenceError extends FtkvmError {
  readonly step: string;
  constructor(step: string, message: string, cause?: unknown) {
    super('COLO_STEP_FAILED', `${step}: ${message}`, { cause });
    this.step = step;
  }
}

const inet = (host: string, port: number) => ({ type: 'inet', data: { host, port: String(port) } });

export async function step<T>(name: string, f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    if (e instanceof ColoSequenceError) throw e;
    throw new ColoSequenceError(name, (e as Error).message, e);
  }
}

/** HMP reports errors as text; treat any output of these commands as a failure. */
async function hmpChecked(q: QmpLike, cmd: string): Promise<void> {
  const out = (await q.hmp(cmd)).trim();
  if (out) throw new Error(`HMP "${cmd.split(' ')[0]}": ${out}`);
}

export async function ignoreMissing(f: () => Promise<unknown>): Promise<void> {
  try { await f(); } catch (e) {
    // Cleanup is idempotent: an object that is already gone is fine.
    if (e instanceof QmpCommandError && /not found|No such|does not exist|Cannot find|not a child|not running/i.test(e.desc)) return;
    throw e;
  }
}

export async function runState(q: QmpLike): Promise<{ status: string; running: boolean }> {
  return q.execute('query-status');
}

export async function coloStatus(q: QmpLike): Promise<{ mode: string; 'last-mode'?: string; reason: string }> {
  return q.execute('query-colo-status');
}

// ---------------------------------------------------------------- secondary

export interface SecondaryAddrs { listen: string; ports: Record<VmPortName, number> }

/** Secondary, right after launch (-incoming defer): x-colo, NBD export of parent0, wait for the stream. */
export async function secondaryPrepare(q: QmpLike, a: SecondaryAddrs): Promise<void> {
  await step('secondary x-colo', () => q.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-colo', state: true }] }));
  await step('secondary nbd-server-start', () => q.execute('nbd-server-start', { addr: inet(a.listen, a.ports.nbd) }));
  await step('secondary nbd-server-add', () => q.execute('nbd-server-add', { device: 'parent0', writable: true }));
  await step('secondary migrate-incoming', () => q.execute('migrate-incoming', { uri: `tcp:${a.listen}:${a.ports.migration}` }));
}

/** Primary died: the secondary becomes a standalone primary from its current (checkpointed) state. */
export async function secondaryTakeover(q: QmpLike): Promise<void> {
  await step('takeover nbd-server-stop', () => ignoreMissing(() => q.execute('nbd-server-stop')));
  await step('takeover x-colo-lost-heartbeat', () => q.execute('x-colo-lost-heartbeat'));
  for (const id of ['f2', 'f1']) await step(`takeover object-del ${id}`, () => ignoreMissing(() => q.execute('object-del', { id })));
  for (const id of ['red1', 'red0']) await step(`takeover chardev-remove ${id}`, () => ignoreMissing(() => q.execute('chardev-remove', { id })));
}

/** Tell the LAN (switch FDBs) that the guest's MAC now lives on this host. */
export async function announce(q: QmpLike): Promise<void> {
  await step('announce-self', () => q.execute('announce-self', { initial: 50, max: 550, rounds: 5, step: 100 }));
}

// ---------------------------------------------------------------- primary

export interface PrimaryAddrs {
  local: string;       // this node's replication address (proxy sockets listen here)
  peer: string;        // the secondary's replication address (NBD, migration)
  ports: Record<VmPortName, number>;
}

export interface MirrorProgress { offset: number; len: number; ready: boolean }

interface BlockJob { device: string; len: number; offset: number; ready: boolean; status?: string; error?: string }

async function blockJob(q: QmpLike, id: string): Promise<BlockJob | undefined> {
  const jobs = await q.execute<BlockJob[]>('query-block-jobs');
  return jobs.find((j) => j.device === id);
}

/**
 * Full disk copy to the secondary's NBD export while the guest keeps running; resolves when
 * the mirror is ready (source and target in sync, writes mirrored). Polls for progress.
 */
export async function primaryMirror(q: QmpLike, a: PrimaryAddrs, onProgress: (p: MirrorProgress) => void, opts: { timeoutMs: number; pollMs?: number }): Promise<void> {
  await step('drive-mirror', () => q.execute('drive-mirror', {
    device: 'colo-disk0', 'job-id': 'resync', target: `nbd://${a.peer}:${a.ports.nbd}/parent0`,
    mode: 'existing', format: 'raw', sync: 'full',
  }));
  const t0 = performance.now();
  for (;;) {
    const job = await step('query-block-jobs', () => blockJob(q, 'resync'));
    if (!job) throw new ColoSequenceError('drive-mirror', 'resync job vanished before it was ready (secondary gone?)');
    onProgress({ offset: job.offset, len: job.len, ready: job.ready });
    if (job.ready) return;
    if (performance.now() - t0 > opts.timeoutMs) throw new ColoSequenceError('drive-mirror', `not ready after ${opts.timeoutMs} ms (${job.offset}/${job.len} bytes)`);
    await sleep(opts.pollMs ?? 100);
  }
}

/** Ends the resync job (a mirror, or a checksum resync's backup), whatever state it is in. */
export async function cancelMirror(q: QmpLike, timeoutMs = 10_000): Promise<void> {
  let job = await blockJob(q, 'resync');
  if (!job) return;
  if (job.status !== 'concluded') await ignoreMissing(() => q.execute('block-job-cancel', { device: 'resync' }));
  const t0 = performance.now();
  while (job) {
    // A job started with auto-dismiss false (the backup) stays 'concluded' until dismissed.
    if (job.status === 'concluded') await ignoreMissing(() => q.execute('block-job-dismiss', { id: 'resync' }));
    else if (performance.now() - t0 > timeoutMs) throw new ColoSequenceError('block-job-cancel', `resync job still present after ${timeoutMs} ms`);
    else await sleep(20);
    job = await blockJob(q, 'resync');
  }
}

const CHARDEVS = (a: PrimaryAddrs): [string, string, number, boolean][] => [
  ['mirror0', a.local, a.ports.mirror, true],
  ['compare1', a.local, a.ports.compare1, true],
  ['compare0', '127.0.0.1', a.ports.compare0, true],
  ['compare0-0', '127.0.0.1', a.ports.compare0, false],
  ['compare_out', '127.0.0.1', a.ports.compareOut, true],
  ['compare_out0', '127.0.0.1', a.ports.compareOut, false],
];

/** Proxy sockets; added while the guest still runs so the secondary's redirectors connect early. */
export async function primaryAddProxyChardevs(q: QmpLike, a: PrimaryAddrs): Promise<void> {
  const existing = new Set((await q.execute<{ label: string }[]>('query-chardev')).map((c) => c.label));
  for (const [id, host, port, server] of CHARDEVS(a)) {
    if (existing.has(id)) continue;
    await step(`chardev-add ${id}`, () => q.execute('chardev-add', {
      id, backend: { type: 'socket', data: { addr: inet(host, port), server, ...(server ? { wait: false } : {}) } },
    }));
  }
}

/** Resolves when the secondary's redirectors are connected to mirror0 and compare1. */
export async function primaryWaitSecondaryConnected(q: QmpLike, timeoutMs: number): Promise<void> {
  const t0 = performance.now();
  for (;;) {
    const devs = await q.execute<{ label: string; filename: string }[]>('query-chardev');
    const conn = (id: string) => devs.find((d) => d.label === id)?.filename.includes('<->') ?? false;
    if (conn('mirror0') && conn('compare1')) return;
    if (performance.now() - t0 > timeoutMs) {
      throw new ColoSequenceError('wait secondary proxy', `secondary redirectors not connected after ${timeoutMs} ms (mirror0=${conn('mirror0')}, compare1=${conn('compare1')})`);
    }
    await sleep(50);
  }
}

/** Adds the NBD replication child to the quorum: from now on every write also goes to the secondary. */
export async function primaryAttachReplication(q: QmpLike, a: PrimaryAddrs): Promise<void> {
  await step('drive_add replication0', () => hmpChecked(q,
    `drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,file.host=${a.peer},file.port=${a.ports.nbd},file.export=parent0,node-name=replication0`));
  await step('x-blockdev-change add', () => q.execute('x-blockdev-change', { parent: 'colo-disk0', node: 'replication0' }));
}

/** Is there a block node of this name (flat: QEMU >= 5.0 also lists implicit nodes)? */
export async function hasNode(q: QmpLike, name: string): Promise<boolean> {
  const nodes = await q.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true }).catch(() => q.execute<{ 'node-name': string }[]>('query-named-block-nodes'));
  return nodes.some((n) => n['node-name'] === name);
}

async function hasObject(q: QmpLike, id: string): Promise<boolean> {
  const list = await q.execute<{ name: string }[]>('qom-list', { path: '/objects' });
  return list.some((o) => o.name === id);
}

/**
 * Packet mirror, redirectors and colo-compare. On a former secondary they go BEHIND its rew0
 * (list order rew0, m0, redire0, redire1). rew0 still translates the TCP sequence numbers of
 * connections opened after that node's last checkpoint as a secondary: its guest numbered them
 * itself, the clients know the old primary's numbers. With rew0 first, packets from the network
 * are translated before m0 mirrors them (both guests see the same packets), and guest output
 * reaches colo-compare untranslated, as the new secondary's does (they match), and is
 * translated only when released to the network. With rew0 last, every packet of such a
 * connection mismatched and forced a checkpoint (replies took ~1.5 s instead of ~50 ms).
 */
export async function primaryAddProxyObjects(q: QmpLike): Promise<void> {
  const afterRewriter = await hasObject(q, 'rew0');
  const add = (id: string, qomType: string, props: Record<string, unknown>, behind?: string) =>
    step(`object-add ${id}`, async () => {
      if (await hasObject(q, id)) return;
      const pos = afterRewriter && behind ? { insert: 'behind', position: `id=${behind}` } : {};
      await q.execute('object-add', { 'qom-type': qomType, id, ...props, ...pos });
    });
  await add('m0', 'filter-mirror', { netdev: 'hn0', queue: 'tx', outdev: 'mirror0' }, 'rew0');
  await add('redire0', 'filter-redirector', { netdev: 'hn0', queue: 'rx', indev: 'compare_out' }, 'm0');
  await add('redire1', 'filter-redirector', { netdev: 'hn0', queue: 'rx', outdev: 'compare0' }, 'redire0');
  await add('iothread1', 'iothread', {});
  await add('comp0', 'colo-compare', { primary_in: 'compare0-0', secondary_in: 'compare1', outdev: 'compare_out0', iothread: 'iothread1' });
}

/** Starts COLO: the first full checkpoint, then both VMs run; resolves once migration status is "colo". */
export async function primaryStartColo(q: QmpLike, a: PrimaryAddrs, checkpointDelayMs: number, timeoutMs: number): Promise<void> {
  await step('primary x-colo', () => q.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-colo', state: true }] }));
  await step('x-checkpoint-delay', () => q.execute('migrate-set-parameters', { 'x-checkpoint-delay': checkpointDelayMs }));
  await step('migrate', () => q.execute('migrate', { uri: `tcp:${a.peer}:${a.ports.migration}` }));
  const t0 = performance.now();
  for (;;) {
    const m = await step('query-migrate', () => q.execute<{ status?: string; 'error-desc'?: string }>('query-migrate'));
    if (m.status === 'colo') return;
    if (m.status === 'failed' || m.status === 'cancelled' || m.status === 'completed') {
      throw new ColoSequenceError('migrate', `migration ended as "${m.status}" instead of entering COLO${m['error-desc'] ? ': ' + m['error-desc'] : ''}`);
    }
    if (performance.now() - t0 > timeoutMs) throw new ColoSequenceError('migrate', `not in COLO after ${timeoutMs} ms (status ${m.status})`);
    await sleep(50);
  }
}

/**
 * The quorum edge that holds replication0 ("children.1" normally; the index can grow on
 * re-adds) and the quorum's node name. Not `colo-disk0`: that names the BlockBackend, whose
 * root is the quorum only while no filter sits above it (a DR point's copy-before-write filter
 * does: dr/qmp.ts), and x-blockdev-change would then look for the child on the filter.
 */
export async function replicationChild(q: QmpLike): Promise<{ edge: string; parent: string } | undefined> {
  const g = await q.execute<{ nodes: { id: number; name: string }[]; edges: { parent: number; child: number; name: string }[] }>('x-debug-query-block-graph');
  const child = g.nodes.find((n) => n.name === 'replication0');
  if (!child) return undefined;
  const e = g.edges.find((x) => x.child === child.id && x.name.startsWith('children.'));
  if (!e) return undefined;
  return { edge: e.name, parent: g.nodes.find((n) => n.id === e.parent)?.name || 'colo-disk0' };
}

/**
 * Secondary lost (or being dropped): the primary removes the replication child and the COLO
 * proxy and leaves COLO; the guest keeps running unprotected. Idempotent, so it also cleans up
 * after a protect attempt that failed halfway.
 */
export async function primaryDropSecondary(q: QmpLike, opts: { inColo: boolean }): Promise<void> {
  await step('cancel resync', () => cancelMirror(q));
  const child = await step('find replication child', () => replicationChild(q));
  if (child) await step('x-blockdev-change del', () => q.execute('x-blockdev-change', { parent: child.parent, child: child.edge }));
  if (await hasNode(q, 'replication0')) await step('drive_del replication0', () => hmpChecked(q, 'drive_del replication0'));
  for (const id of ['comp0', 'iothread1', 'm0', 'redire0', 'redire1']) {
    await step(`object-del ${id}`, async () => { if (await hasObject(q, id)) await q.execute('object-del', { id }); });
  }
  if (opts.inColo) await step('primary x-colo-lost-heartbeat', () => ignoreMissing(() => q.execute('x-colo-lost-heartbeat')));
  const existing = new Set((await q.execute<{ label: string }[]>('query-chardev')).map((c) => c.label));
  for (const id of ['mirror0', 'compare1', 'compare0-0', 'compare0', 'compare_out0', 'compare_out']) {
    if (existing.has(id)) await step(`chardev-remove ${id}`, () => ignoreMissing(() => q.execute('chardev-remove', { id })));
  }
}

// ---------------------------------------------------------------- checksum resync (primary)
// Instead of drive-mirror sync=full: a dirty bitmap on colo-disk0 records every write from
// before the scan on; the agent digests the disk through a read-only NBD export of colo-disk0
// (unix socket) and copies the chunks whose digests differ from the secondary's; then
// blockdev-backup sync=bitmap copies what the guest wrote meanwhile (point in time, guest
// running), and once more with the guest paused right before COLO starts. QEMU 7.2's mirror
// has no bitmap mode (block/mirror.c rejects sync=bitmap); backup does.

export const RESYNC_BITMAP = 'ftkvm-resync';
export const RESYNC_TARGET = 'ftkvm-resync-tgt';
export const SCAN_EXPORT = 'ftkvm-scan';

/** Starts recording writes, then exports colo-disk0 read-only on a unix socket for the scan. */
export async function checksumScanStart(q: QmpLike, socketPath: string): Promise<void> {
  await checksumCleanup(q);
  await step('block-dirty-bitmap-add', () => q.execute('block-dirty-bitmap-add', { node: 'colo-disk0', name: RESYNC_BITMAP, granularity: 65536 }));
  await step('scan nbd-server-start', () => q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } }));
  await step('scan nbd-server-add', () => q.execute('nbd-server-add', { device: 'colo-disk0', name: SCAN_EXPORT, writable: false }));
}

/** The scan is over: its export and server go (the bitmap stays). */
export async function checksumScanStop(q: QmpLike): Promise<void> {
  await step('scan nbd-server-remove', () => ignoreMissing(() => q.execute('nbd-server-remove', { name: SCAN_EXPORT, mode: 'hard' })));
  await step('scan nbd-server-stop', () => ignoreMissing(() => q.execute('nbd-server-stop')));
}

async function dirtyBytes(q: QmpLike): Promise<number> {
  type Bm = { name?: string; count: number };
  const blk = await q.execute<{ device: string; 'dirty-bitmaps'?: Bm[]; inserted?: { 'dirty-bitmaps'?: Bm[] } }[]>('query-block');
  const d = blk.find((b) => b.device === 'colo-disk0');
  const bm = [...(d?.inserted?.['dirty-bitmaps'] ?? []), ...(d?.['dirty-bitmaps'] ?? [])].find((b) => b.name === RESYNC_BITMAP);
  if (!bm) throw new ColoSequenceError('query dirty bitmap', `bitmap ${RESYNC_BITMAP} not found on colo-disk0`);
  return bm.count;
}

/**
 * Copies every chunk the bitmap marks to the secondary's disk (blockdev-backup sync=bitmap,
 * bitmap-mode on-success: afterwards the bitmap holds exactly what was written during the
 * copy). Returns the bytes copied and the bytes dirty again after it.
 */
export async function backupDelta(q: QmpLike, a: PrimaryAddrs, timeoutMs: number): Promise<{ copiedBytes: number; dirtyAfter: number }> {
  const copied = await dirtyBytes(q);
  if (!(await hasNode(q, RESYNC_TARGET))) {
    await step('blockdev-add resync target', () => q.execute('blockdev-add', {
      driver: 'nbd', 'node-name': RESYNC_TARGET, server: { type: 'inet', host: a.peer, port: String(a.ports.nbd) }, export: 'parent0',
    }));
  }
  await step('blockdev-backup', () => q.execute('blockdev-backup', {
    'job-id': 'resync', device: 'colo-disk0', target: RESYNC_TARGET, sync: 'bitmap', bitmap: RESYNC_BITMAP, 'bitmap-mode': 'on-success', 'auto-dismiss': false,
  }));
  const t0 = performance.now();
  for (;;) {
    const job = await blockJob(q, 'resync');
    if (!job) throw new ColoSequenceError('blockdev-backup', 'the backup job vanished');
    if (job.status === 'concluded') {
      await step('block-job-dismiss', () => q.execute('block-job-dismiss', { id: 'resync' }));
      if (job.error) throw new ColoSequenceError('blockdev-backup', job.error);
      break;
    }
    if (performance.now() - t0 > timeoutMs) throw new ColoSequenceError('blockdev-backup', `not done after ${timeoutMs} ms`);
    await sleep(20);
  }
  return { copiedBytes: copied, dirtyAfter: await dirtyBytes(q) };
}

/** Removes whatever a checksum resync left: job, scan export, target node, bitmap. Idempotent. */
export async function checksumCleanup(q: QmpLike): Promise<void> {
  await cancelMirror(q);
  await checksumScanStop(q);
  if (await hasNode(q, RESYNC_TARGET)) await step('blockdev-del resync target', () => q.execute('blockdev-del', { 'node-name': RESYNC_TARGET }));
  await step('block-dirty-bitmap-remove', () => ignoreMissing(() => q.execute('block-dirty-bitmap-remove', { node: 'colo-disk0', name: RESYNC_BITMAP })));
}
