// The DR point's QMP sequence against a real QEMU (paused, no guest: the writes come from HMP
// qemu-io on the same colo-disk0 quorum the agent's primaries use): each point's frozen bitmap
// holds exactly the writes since the previous point, the view is the disk at the transaction,
// a point not shipped gives its writes to the next one, and nothing is left behind.
// Found by bench/dr: removing the frozen bitmap while the fleece's copy-before-write filter was
// still the device's root looked it up on the filter ("not found", taken for already gone):
// every later delta shipped everything since the first point.
import test from 'ava';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { QmpClient } from '../../agent/src/qmp/client.ts';
import { unixSocketConnector } from '../../agent/src/qmp/transport.ts';
import { NbdClient, STATE_DIRTY } from '../../agent/src/nbd/client.ts';
import { replicationChild } from '../../agent/src/colo/sequences.ts';
import { DR_EXPORT, drBitmaps, drCleanup, drExport, drFinish, drFleeceStart } from '../../agent/src/dr/qmp.ts';

const KiB = 1024, MiB = 1024 * KiB;

async function withQemu(t: { teardown(f: () => void): void }) {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-dr-qmp-'));
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'disk.img'), '16M']);
  const sock = join(dir, 'qmp.sock');
  const p = spawn('qemu-system-x86_64', ['-machine', 'pc', '-accel', 'tcg', '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${sock},server=on,wait=off`,
    '-drive', `if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=${join(dir, 'disk.img')},children.0.driver=raw`,
    '-device', 'virtio-blk-pci,id=disk0,drive=colo-disk0'], { stdio: 'ignore' });
  t.teardown(() => { p.kill('SIGKILL'); rmSync(dir, { recursive: true, force: true }); });
  for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
  const q = await QmpClient.connect(unixSocketConnector(sock), { handshakeTimeoutMs: 5000, commandTimeoutMs: 10_000 });
  t.teardown(() => q.close());
  const write = async (byte: number, at: number, len = 64 * KiB) => { await q.hmp(`qemu-io colo-disk0 "write -P ${byte} ${at} ${len}"`); };
  /** One point: start, read the frozen bitmap's dirty ranges and a byte of the view, finish. */
  const point = async (n: number, shipped: boolean, duringView?: () => Promise<void>) => {
    const fleece = join(dir, `fleece-${n}.qcow2`);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', fleece, '16M']);
    const started = await drFleeceStart(q, fleece);
    const nbdSock = join(dir, `nbd-${n}.sock`);
    await drExport(q, nbdSock, started.frozen);
    const ctx = started.frozen ? [`qemu:dirty-bitmap:${started.frozen}`] : [];
    const nbd = await NbdClient.connect({ path: nbdSock }, DR_EXPORT, 5000, undefined, ctx);
    await duringView?.();
    const dirty: [number, number][] = [];
    if (started.frozen) for (const e of await nbd.contextStatus(ctx[0]!, 0, nbd.size)) if (e.flags & STATE_DIRTY) dirty.push([e.offset, e.length]);
    const firstByte = (await nbd.read(0, 1))[0];
    nbd.close();
    await drFinish(q, started, shipped);
    rmSync(fleece, { force: true });
    return { started, dirty, firstByte };
  };
  return { q, write, point };
}

test('each delta holds exactly the writes since the last point shipped; the view is the disk at the point; nothing is left behind', async (t) => {
  const { q, write, point } = await withQemu(t);
  await q.execute('qmp_capabilities').catch(() => undefined);
  const p1 = await point(1, true);
  t.is(p1.started.frozen, null, 'the first point has no bitmap to ship from (a full or digest point)');
  await write(0x11, 0);
  const p2 = await point(2, true, () => write(0x22, 0)); // written after the view: not in it
  t.deepEqual(p2.dirty, [[0, 64 * KiB]], 'point 2: the block written since point 1');
  t.is(p2.firstByte, 0x11, 'the view is the disk at the transaction, not the write after it');
  await write(0x33, 1 * MiB);
  const p3 = await point(3, true);
  t.deepEqual(p3.dirty, [[0, 64 * KiB], [1 * MiB, 64 * KiB]], 'point 3: the write made during point 2\'s view and the one since; nothing older');
  await write(0x44, 2 * MiB);
  await point(4, false); // not shipped: its writes must go to the next point
  await write(0x55, 3 * MiB);
  const p5 = await point(5, true);
  t.deepEqual(p5.dirty, [[2 * MiB, 64 * KiB], [3 * MiB, 64 * KiB]], 'point 5: the unshipped point\'s writes and its own');
  const bms = await drBitmaps(q);
  t.is(bms.length, 1, `one recording bitmap between points: ${JSON.stringify(bms)}`);
  t.true(bms[0]!.recording ?? false);
  const jobs = await q.execute<unknown[]>('query-block-jobs');
  t.deepEqual(jobs, [], 'no fleece job left');
  await drCleanup(q); // idempotent
  t.is((await drBitmaps(q)).length, 1);
});

test('dropping the replica while a DR point runs: the replication child is removed from the quorum itself, not from the filter above it', async (t) => {
  const { q, point } = await withQemu(t);
  // A second quorum child named as the primary's replication child (null-co stands in for the NBD client).
  await q.execute('blockdev-add', { driver: 'null-co', 'node-name': 'replication0', size: 16 * MiB });
  await q.execute('x-blockdev-change', { parent: 'colo-disk0', node: 'replication0' });
  await point(1, true, async () => {
    const child = await replicationChild(q);
    t.truthy(child, 'found under the copy-before-write filter');
    t.not(child!.parent, 'colo-disk0', 'the quorum by its node name');
    const byDevice = await q.execute('x-blockdev-change', { parent: 'colo-disk0', child: child!.edge }).then(() => 'removed', (e: Error) => e.message);
    t.regex(byDevice, /child|not/i, `by device name the filter is asked: ${byDevice}`);
    await q.execute('x-blockdev-change', { parent: child!.parent, child: child!.edge });
    t.is(await replicationChild(q), undefined, 'removed from the quorum');
  });
});
