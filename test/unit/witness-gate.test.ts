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
  await sleep(300);
  t.is(g.lease('vm').state, 'held');
});

test('a lease taken up again with the witness unreachable becomes expired once the renewal failed', async (t) => {
  const g = gate(`http://127.0.0.1:${nextPort++}`, 'hostA'); // nothing listens there
  t.teardown(() => g.stop());
  g.keep('vm', 1);
  t.is(g.lease('vm').state, 'unknown');
  await sleep(300);
  t.is(g.lease('vm').state, 'expired');
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
