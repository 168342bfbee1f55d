// The DR host's store of recovery points, with the real qemu-img and qemu-nbd: points become
// visible only at commit, each point reads back exactly as shipped (a qcow2 chain), `keep`
// drops the oldest by committing the next overlay into it without changing any kept point,
// stale primaries and activated VMs are refused, leftovers of a crash are swept.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DrStore, DrStoreError } from '../../agent/src/dr/store.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';
import { realExec } from '../../agent/src/util/exec.ts';
import { RateLimiter } from '../../agent/src/dr/limiter.ts';
import { splitRanges } from '../../agent/src/dr/shipper.ts';
import { isolatedNet } from '../../agent/src/dr/boot.ts';
import { chunkDigests } from '../../agent/src/nbd/checksums.ts';
import { NbdClient } from '../../agent/src/nbd/client.ts';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

function newStore() {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-dr-store-'));
  const store = new DrStore({ dataDir: dir, imgBinary: '/usr/bin/qemu-img', nbdBinary: '/usr/bin/qemu-nbd', exec: realExec, log: memoryLogger() });
  return { dir, store, done: async () => { await store.close(); rmSync(dir, { recursive: true, force: true }); } };
}

/** The disk a point holds, read through its chain. */
function content(store: DrStore, vm: string, id: string): Buffer {
  const out = join(store.dir(vm), `read-${id}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', store.pointFile(vm, id).path, out]);
  const b = readFileSync(out);
  rmSync(out);
  return b;
}

const fill = (byte: number, len = MiB) => Buffer.alloc(len, byte);
const begin = (store: DrStore, epoch = 1, keep = 10) => store.begin('db', { sizeBytes: SIZE, capturedAt: Date.now(), from: 'hostA', epoch, keep });

test('a point is visible only once committed and reads back exactly as written; the next point builds on it', async (t) => {
  const { store, done } = newStore();
  try {
    const p1 = await begin(store);
    t.is(p1.newest, null, 'nothing to build on');
    await store.write('db', p1.id, 0, fill(0xaa));
    t.deepEqual(store.points('db').points, [], 'a pending point is not listed');
    t.throws(() => store.pointFile('db', p1.id), { instanceOf: DrStoreError });
    await store.commit('db', p1.id, { mode: 'full', bytesShipped: MiB });
    const p2 = await begin(store);
    t.is(p2.newest, p1.id, 'the next point is an overlay on the newest');
    await store.write('db', p2.id, MiB, fill(0xbb));
    await store.commit('db', p2.id, { mode: 'delta', bytesShipped: MiB });
    const c1 = content(store, 'db', p1.id), c2 = content(store, 'db', p2.id);
    t.true(c1.subarray(0, MiB).equals(fill(0xaa)) && c1.subarray(MiB).equals(Buffer.alloc(SIZE - MiB)), 'point 1 = what was shipped for it');
    t.true(c2.subarray(0, MiB).equals(fill(0xaa)) && c2.subarray(MiB, 2 * MiB).equals(fill(0xbb)), 'point 2 = point 1 + its delta');
    t.deepEqual(store.points('db').points.map((x) => [x.id, x.mode]), [[p1.id, 'full'], [p2.id, 'delta']]);
  } finally { await done(); }
});

test('keep: the oldest points go, every kept point reads as before, no file is left behind', async (t) => {
  const { store, done } = newStore();
  try {
    const ids: string[] = [];
    const expect: Buffer[] = [];
    let disk = Buffer.alloc(SIZE);
    for (let i = 0; i < 5; i++) {
      const p = await begin(store, 1, 2);
      const data = fill(0x10 + i);
      await store.write('db', p.id, (i % 4) * MiB, data);
      disk = Buffer.from(disk); data.copy(disk, (i % 4) * MiB);
      await store.commit('db', p.id, { mode: i ? 'delta' : 'full', bytesShipped: MiB });
      ids.push(p.id); expect.push(disk);
      const kept = store.points('db').points.map((x) => x.id);
      t.deepEqual(kept, ids.slice(-2), `after point ${i + 1}: the newest two`);
      for (const id of kept) t.true(content(store, 'db', id).equals(expect[ids.indexOf(id)]!), `point ${ids.indexOf(id) + 1} unchanged after pruning`);
    }
    const files = readdirSync(store.dir('db')).filter((f) => f.endsWith('.qcow2')).sort();
    t.is(files.length, 2, `two files for two points: ${files.join(', ')}`);
  } finally { await done(); }
});

test('refused: a stale primary, and any point once the VM was activated at the DR site; abort leaves nothing', async (t) => {
  const { store, done } = newStore();
  try {
    const p = await begin(store, 5);
    await store.commit('db', p.id, { mode: 'full', bytesShipped: 0 });
    await t.throwsAsync(begin(store, 4), { code: 'STALE_EPOCH' });
    const q = await begin(store, 5);
    await store.abort('db', q.id);
    t.false(readdirSync(store.dir('db')).some((f) => f.startsWith('pending-')), 'no pending file after an abort');
    await t.throwsAsync(store.write('db', q.id, 0, fill(1)), { code: 'NO_PENDING_POINT' });
    const newer = await begin(store, 6);
    await t.throwsAsync(begin(store, 5), { code: 'STALE_EPOCH' }, 'an older primary cannot cut short a newer one\'s point');
    store.markActivated('db', { at: Date.now(), point: p.id, epoch: 7 });
    await t.throwsAsync(store.commit('db', newer.id, { mode: 'delta', bytesShipped: 0 }), { code: 'DR_ACTIVATED' }, 'a point begun before the activation does not land after it');
    t.deepEqual(store.points('db').points.map((x) => x.id), [p.id]);
    await t.throwsAsync(begin(store, 8), { code: 'DR_ACTIVATED' });
  } finally { await done(); }
});

test('digests of a pending point are those of the newest point (the digest mode compares against it); writes outside the disk are refused', async (t) => {
  const { store, done } = newStore();
  try {
    const p = await begin(store);
    await store.write('db', p.id, 2 * MiB, fill(0x5a));
    await store.commit('db', p.id, { mode: 'full', bytesShipped: MiB });
    const q = await begin(store);
    const remote = await store.digests('db', q.id, 1 << 20);
    const raw = join(store.dir('db'), 'expect.raw');
    const b = Buffer.alloc(SIZE); fill(0x5a).copy(b, 2 * MiB); writeFileSync(raw, b);
    const sock = join(store.dir('db'), 'x.sock');
    const nbd = execFileSync('sh', ['-c', `qemu-nbd --socket ${sock} -f raw -r ${raw} >/dev/null 2>&1 & echo $!`]).toString().trim();
    try {
      let c: NbdClient | null = null;
      for (let i = 0; i < 100 && !c; i++) { c = existsSync(sock) ? await NbdClient.connect({ path: sock }, '').catch(() => null) : null; if (!c) await new Promise((r) => setTimeout(r, 50)); }
      t.true(remote.equals(await chunkDigests(c!, 1 << 20)));
      c!.close();
    } finally { process.kill(Number(nbd)); }
    await t.throwsAsync(store.write('db', q.id, SIZE - 10, fill(1, 20)), { code: 'BAD_RANGE' });
  } finally { await done(); }
});

test('a restart sweeps unfinished points', async (t) => {
  const { store, dir, done } = newStore();
  try {
    const p = await begin(store);
    const again = new DrStore({ dataDir: dir, imgBinary: '/usr/bin/qemu-img', nbdBinary: '/usr/bin/qemu-nbd', exec: realExec, log: memoryLogger() });
    again.sweep('db');
    t.false(readdirSync(store.dir('db')).some((f) => f.startsWith('pending-')), `swept: ${p.id}`);
  } finally { await done(); }
});

test('splitRanges cuts ranges into pieces; the limiter holds a rate; the test network avoids the guest address', async (t) => {
  t.deepEqual(splitRanges([[0, 5], [10, 2]], 2), [[0, 2], [2, 2], [4, 1], [10, 2]]);
  let now = 0;
  const slept: number[] = [];
  const lim = new RateLimiter(8_000, { mono: () => now }, async (ms) => { slept.push(ms); now += ms; }); // 1000 bytes/s, burst 1000
  await lim.take(1000); // the burst
  await lim.take(500);
  t.deepEqual(slept, [500], 'beyond the burst: waits for the deficit at the rate');
  const base = { name: 'db', memory_mib: 128, vcpus: 1, boot: { firmware: 'bios' as const }, nic: { bridge: 'br0', mac: '52:54:00:00:00:01' } };
  t.deepEqual(isolatedNet({ ...base, probe: { address: '192.168.116.16', port: 7000 } }), { net: '192.168.116.0/24', host: '192.168.116.2' });
  t.deepEqual(isolatedNet({ ...base, probe: { address: '10.0.0.2', port: 7000 }, test_network: '10.0.0.0/16' }), { net: '10.0.0.0/16', host: '10.0.0.3' });
});
