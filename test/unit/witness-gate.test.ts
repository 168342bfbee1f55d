// The agent's witness client against a real witness on localhost.
import test from 'ava';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WitnessGate } from '../../agent/src/witness/client.ts';
import { WitnessServer } from '../../agent/src/witness/server.ts';
import { systemClock, sleep } from '../../agent/src/util/clock.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';

let nextPort = 29000 + (process.pid % 1000) * 2;
const TOKEN = 't'.repeat(32);

async function witness() {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-wg-'));
  writeFileSync(join(dir, 'token'), TOKEN, { mode: 0o600 });
  const port = nextPort++;
  const w = new WitnessServer({ listen: `127.0.0.1:${port}`, dataDir: dir, tokenFile: join(dir, 'token'), log: memoryLogger() });
  await w.start();
  return { w, url: `http://127.0.0.1:${port}` };
}
const gate = (url: string, node: string) => new WitnessGate({ url, node, leaseMs: 1000, token: () => TOKEN, clock: systemClock, log: memoryLogger() });

test('a lease just taken up again (agent restart) is unknown until the witness answers, then held', async (t) => {
  const { w, url } = await witness();
  const g = gate(url, 'hostA');
  t.teardown(async () => { g.stop(); await w.stop(); });
  g.keep('vm', 1);
  t.is(g.lease('vm').state, 'unknown', 'no news is not an expired lease');
  // Until the first answer (not a fixed 300 ms: CI once saw the answer later under load).
  const t0 = Date.now();
  while (g.lease('vm').state === 'unknown' && Date.now() - t0 < 5000) await sleep(5);
  t.is(g.lease('vm').state, 'held', `after ${Date.now() - t0} ms`);
});

test('a lease taken up again with the witness unreachable becomes expired once the renewal failed', async (t) => {
  const g = gate(`http://127.0.0.1:${nextPort++}`, 'hostA'); // nothing listens there
  t.teardown(() => g.stop());
  g.keep('vm', 1);
  t.is(g.lease('vm').state, 'unknown');
  const t0 = Date.now();
  while (g.lease('vm').state === 'unknown' && Date.now() - t0 < 5000) await sleep(5);
  t.is(g.lease('vm').state, 'expired', `after ${Date.now() - t0} ms`);
});

test('a primary that moved to a new epoch cannot have it taken by the replica it left behind, even expired', async (t) => {
  const { w, url } = await witness();
  const a = gate(url, 'hostA'), b = gate(url, 'hostB');
  t.teardown(async () => { a.stop(); b.stop(); await w.stop(); });
  t.true((await a.acquire('vm', 1, 'cold start')).granted);
  t.true((await a.acquire('vm', 2, 'dropped an unreachable replica')).granted);
  await sleep(1100); // A's lease expired
  const r = await b.acquire('vm', 2, 'primary lost');
  t.false(r.granted);
  t.regex(r.reason, /epoch 2 belongs to hostA/);
  t.true((await b.acquire('vm', 3, 'primary lost')).granted, 'only a newer epoch, which B learns only from A itself');
});

async function post(url: string, path: string, body: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const r = await fetch(`${url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
  return { status: r.status, json: await r.json() as Record<string, unknown> };
}

test('the witness refuses epochs that are not safe integers within bounds, and stores nothing for them', async (t) => {
  const { w, url } = await witness();
  t.teardown(() => w.stop());
  for (const epoch of [1e308, 2 ** 53, 2 ** 31, 0, -3, 1.5]) {
    const r = await post(url, '/v1/leases/vm/acquire', { node: 'hostA', epoch, leaseMs: 1000 });
    t.is(r.status, 400, `epoch ${epoch}`);
  }
  t.is((await post(url, '/v1/leases/vm/acquire', { node: 'hostA', epoch: 1, leaseMs: 10 ** 9 })).status, 400, 'lease length out of bounds');
  t.is(w.table.size, 0);
  t.is((await post(url, '/v1/leases/vm/acquire', { node: 'hostA', epoch: 1, leaseMs: 1000 })).status, 200);
  t.is((await post(url, '/v1/leases/vm/acquire', { node: 'hostB', epoch: 2, leaseMs: 1000 })).status, 409, 'a later takeover is still possible, after expiry');
});

test('renewals write nothing; a new holder or epoch is written before it is answered', async (t) => {
  const { w, url } = await witness();
  t.teardown(() => w.stop());
  await post(url, '/v1/leases/vm/acquire', { node: 'hostA', epoch: 1, leaseMs: 1000 });
  for (let i = 0; i < 20; i++) t.is((await post(url, '/v1/leases/vm/acquire', { node: 'hostA', epoch: 1, leaseMs: 1000 })).status, 200);
  t.is(w.table.writes, 1, 'one write: the first grant');
  await post(url, '/v1/leases/vm/acquire', { node: 'hostA', epoch: 2, leaseMs: 1000 });
  t.is(w.table.writes, 2, 'a promotion by the holder is written');
});

test('a released lease goes to the successor at once; only its holder can release it', async (t) => {
  const { w, url } = await witness();
  const a = gate(url, 'hostA'), b = gate(url, 'hostB');
  t.teardown(async () => { a.stop(); b.stop(); await w.stop(); });
  t.true((await a.acquire('vm', 3, 'start')).granted);
  a.keep('vm', 3);
  await sleep(50);
  t.false((await b.acquire('vm', 4, 'takeover')).granted, 'valid lease: the takeover waits');
  t.is((await post(url, '/v1/leases/vm/release', { node: 'hostB', epoch: 3 })).status, 409, 'not the holder');
  t.true(await a.release('vm', 3));
  const g = await b.acquire('vm', 4, 'takeover');
  t.true(g.granted, g.reason);
});

test('after a witness restart every lease counts as just renewed: no takeover before it could have run out', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-wg-'));
  writeFileSync(join(dir, 'token'), TOKEN, { mode: 0o600 });
  const port = nextPort++;
  const start = async () => { const s = new WitnessServer({ listen: `127.0.0.1:${port}`, dataDir: dir, tokenFile: join(dir, 'token'), log: memoryLogger() }); await s.start(); return s; };
  let w = await start();
  const url = `http://127.0.0.1:${port}`;
  await post(url, '/v1/leases/vm/acquire', { node: 'hostA', epoch: 1, leaseMs: 1000 });
  await sleep(1100); // expired at the old witness
  await w.stop();
  w = await start();
  t.teardown(() => w.stop());
  t.is((await post(url, '/v1/leases/vm/acquire', { node: 'hostB', epoch: 2, leaseMs: 1000 })).status, 409, 'valid again for its length after the restart');
  await sleep(1050);
  t.is((await post(url, '/v1/leases/vm/acquire', { node: 'hostB', epoch: 2, leaseMs: 1000 })).status, 200);
});
