// Per-node identity at the witness: a real WitnessServer over HTTP on localhost, with a
// credentials file. Every refusal is checked to change nothing (the leases read back after it).
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { WitnessServer } from '../../agent/src/witness/server.ts';
import { sha256 } from '../../agent/src/witness/credentials.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';
import { WitnessGate } from '../../agent/src/witness/client.ts';
import { systemClock, sleep } from '../../agent/src/util/clock.ts';

// Below 32768: ports in the ephemeral range can be taken by any outgoing connection.
let nextPort = 20000 + (process.pid % 500) * 4;
const tok = (n: string) => `token-of-${n}-`.padEnd(40, 'x');
const READER = 'r'.repeat(32);
const NODES = { hostA: 'p1', hostB: 'p1', hostC: 'p2', hostD: 'p2' } as const;

function credentials(dir: string, nodes: Record<string, string> = NODES, extra = ''): string {
  const f = join(dir, 'credentials.yml');
  writeFileSync(f, 'nodes:\n' + Object.entries(nodes).map(([n, p]) => `  ${n}: {pair: ${p}, token_sha256: ${sha256(tok(n))}}\n`).join('') + extra);
  return f;
}

async function witness(o: { dir?: string; shared?: boolean } = {}) {
  const dir = o.dir ?? mkdtempSync(join(tmpdir(), 'ftkvm-wa-'));
  writeFileSync(join(dir, 'reader'), READER, { mode: 0o600 });
  const port = nextPort++;
  const log = memoryLogger();
  const w = new WitnessServer(o.shared
    ? { listen: `127.0.0.1:${port}`, dataDir: dir, tokenFile: join(dir, 'reader'), log }
    : { listen: `127.0.0.1:${port}`, dataDir: dir, credentialsFile: credentials(dir), tokenFile: join(dir, 'reader'), log });
  await w.start();
  const call = async (method: 'GET' | 'POST', path: string, token: string | null, body?: unknown) => {
    const r = await request(`http://127.0.0.1:${port}${path}`, {
      method, headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: r.statusCode, json: (await r.body.json()) as any };
  };
  // Who holds what (expiresInMs left out: it runs down between two reads).
  const all = async () => ((await call('GET', '/v1/leases', READER)).json as { pair?: string; vm: string; holder: string; epoch: number; leaseMs: number }[])
    .map(({ pair, vm, holder, epoch, leaseMs }) => ({ pair, vm, holder, epoch, leaseMs }));
  return { w, dir, port, call, all, log };
}

const acquire = (node: string, epoch: number) => ({ node, epoch, leaseMs: 2000 });

test('leases are keyed by pair and VM: two pairs run a VM of the same name side by side', async (t) => {
  const { w, call, all } = await witness();
  t.teardown(() => w.stop());
  t.is((await call('POST', '/v1/leases/web1/acquire', tok('hostA'), acquire('hostA', 1))).status, 200);
  t.is((await call('POST', '/v1/leases/web1/acquire', tok('hostC'), acquire('hostC', 1))).status, 200, 'the other pair\'s web1 is another lease');
  t.deepEqual((await all()).map((l) => `${l.pair}/${l.vm}=${l.holder}@${l.epoch}`).sort(), ['p1/web1=hostA@1', 'p2/web1=hostC@1']);
  const mine = await call('GET', '/v1/leases', tok('hostD'));
  t.deepEqual(mine.json.map((l: any) => `${l.pair}/${l.vm}`), ['p2/web1'], 'a node lists its own pair\'s leases only');
  t.is((await call('GET', '/v1/leases/web1', tok('hostB'))).json.holder, 'hostA');
  t.is((await call('GET', '/health', null)).json.auth, 'per-node');
});

test('a node cannot act for another node, nor touch another pair\'s VM; refusals change nothing', async (t) => {
  const { w, call, all } = await witness();
  t.teardown(() => w.stop());
  await call('POST', '/v1/leases/web1/acquire', tok('hostA'), acquire('hostA', 3));
  const before = await all();
  // hostB (same pair) names hostA with a huge epoch: the attack of the issue (hostA would demote).
  const asOther = await call('POST', '/v1/leases/web1/acquire', tok('hostB'), acquire('hostA', 1_000_000_000));
  t.is(asOther.status, 403);
  t.is(asOther.json.error.code, 'NOT_YOUR_NODE');
  const relOther = await call('POST', '/v1/leases/web1/release', tok('hostB'), { node: 'hostA', epoch: 3 });
  t.is(relOther.status, 403);
  // hostC (another pair) with a huge epoch under its own name: only its own pair's web1 moves.
  t.is((await call('POST', '/v1/leases/web1/acquire', tok('hostC'), { epoch: 1_000_000_000, leaseMs: 2000 })).status, 200);
  const after = await all();
  t.deepEqual(after.filter((l) => l.pair === 'p1'), before, 'pair p1 untouched');
  // hostA still renews its lease at its epoch.
  t.is((await call('POST', '/v1/leases/web1/acquire', tok('hostA'), acquire('hostA', 3))).status, 200);
  // The reader token reads but cannot take a lease; an unknown token and no token are refused.
  const r = await call('POST', '/v1/leases/web1/acquire', READER, acquire('hostA', 4));
  t.is(r.status, 403);
  t.is(r.json.error.code, 'READ_ONLY');
  // ...nor renew for a node that uses its own token (see the switch test below for the one case it may).
  t.is((await call('POST', '/v1/leases/web1/acquire', READER, acquire('hostA', 3))).status, 403);
  t.is((await call('POST', '/v1/leases/web1/acquire', READER, acquire('hostB', 3))).status, 403, 'not for another holder');
  t.is((await call('POST', '/v1/leases/web1/release', READER, { node: 'hostA', epoch: 3 })).status, 403, 'never a release');
  t.is((await call('POST', '/v1/leases/web1/acquire', 'x'.repeat(40), acquire('hostA', 4))).status, 403);
  t.is((await call('POST', '/v1/leases/web1/acquire', null, acquire('hostA', 4))).status, 401);
  t.is((await call('GET', '/v1/leases', 'x'.repeat(40))).status, 403);
  t.deepEqual((await all()).find((l) => l.pair === 'p1')?.epoch, 3);
});

test('the agent\'s witness client works with its own token and is refused with another node\'s', async (t) => {
  const { w, port, all } = await witness();
  const url = `http://127.0.0.1:${port}`;
  const mine = new WitnessGate({ url, node: 'hostA', leaseMs: 1000, token: () => tok('hostA'), clock: systemClock, log: memoryLogger() });
  const stolen = new WitnessGate({ url, node: 'hostA', leaseMs: 1000, token: () => tok('hostD'), clock: systemClock, log: memoryLogger() });
  t.teardown(async () => { mine.stop(); stolen.stop(); await w.stop(); });
  t.true((await mine.acquire('web1', 1, 'test')).granted);
  t.false((await stolen.acquire('web1', 2, 'test')).granted, 'another pair\'s host using hostA\'s name is refused');
  await sleep(50);
  t.deepEqual((await all()).map((l) => `${l.pair}/${l.vm}=${l.holder}@${l.epoch}`), ['p1/web1=hostA@1']);
});

test('credentials files are checked whole: bad digests and shared tokens are refused with the line', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-wa-'));
  const cases: [string, RegExp][] = [
    ['nodes:\n  hostA: {pair: p1, token_sha256: abc}\n', /nodes\.hostA\.token_sha256: must be the SHA-256/],
    [`nodes:\n  hostA: {pair: p1, token_sha256: ${sha256('a'.repeat(20))}}\n  hostB: {pair: p1, token_sha256: ${sha256('a'.repeat(20))}}\n`, /hostA and hostB have the same token/],
    [`nodes:\n  hostA: {pair: "p 1", token_sha256: ${sha256('a'.repeat(20))}}\n`, /nodes\.hostA\.pair/],
    [`nodes:\n  hostA: {pair: p1, token_sha256: ${sha256(READER)}}\n`, /also a node's token/],
    ['nodes: [', /credentials\.yml/],
  ];
  for (const [text, re] of cases) {
    writeFileSync(join(dir, 'credentials.yml'), text);
    writeFileSync(join(dir, 'reader'), READER, { mode: 0o600 });
    const w = new WitnessServer({ listen: `127.0.0.1:${nextPort++}`, dataDir: dir, credentialsFile: join(dir, 'credentials.yml'), tokenFile: join(dir, 'reader'), log: memoryLogger() });
    await t.throwsAsync(() => w.start(), { message: re }, text);
  }
});

test('a reload with a broken file keeps the credentials in force; a good one takes effect at once', async (t) => {
  const { w, dir, call } = await witness();
  t.teardown(() => w.stop());
  writeFileSync(join(dir, 'credentials.yml'), 'nodes: {hostA: {pair: p1}}\n');
  t.throws(() => w.reload(), { message: /token_sha256/ });
  t.is((await call('POST', '/v1/leases/web1/acquire', tok('hostA'), acquire('hostA', 1))).status, 200, 'old credentials still in force');
  credentials(dir, { hostA: 'p1' }); // hostB removed
  w.reload();
  t.is((await call('POST', '/v1/leases/web1/acquire', tok('hostB'), acquire('hostB', 2))).status, 403);
});

test('switching a witness from a shared token to per-node credentials keeps running leases', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-wa-'));
  const shared = await witness({ dir, shared: true });
  t.is((await shared.call('POST', '/v1/leases/web1/acquire', READER, acquire('hostA', 5))).status, 200);
  await shared.w.stop();
  const perNode = await witness({ dir });
  t.teardown(() => perNode.w.stop());
  // hostB must not get web1 while hostA's lease may still run: the lease moved to p1/web1.
  const b = await perNode.call('POST', '/v1/leases/web1/acquire', tok('hostB'), acquire('hostB', 6));
  t.is(b.status, 409);
  t.is(b.json.holder, 'hostA');
  t.deepEqual((await perNode.all()).map((l) => `${l.pair}/${l.vm}=${l.holder}@${l.epoch}`), ['p1/web1=hostA@5']);
  t.true(JSON.parse(readFileSync(join(dir, 'leases.json'), 'utf8'))['p1/web1'] !== undefined, 'stored under the new key');
  // hostA's agent still on the site token keeps its lease: the site token may extend it, at its
  // epoch and length only, and only until hostA uses its own token.
  t.is((await perNode.call('POST', '/v1/leases/web1/acquire', READER, { ...acquire('hostA', 5), leaseMs: 100 })).status, 403, 'never shortened');
  t.is((await perNode.call('POST', '/v1/leases/web1/acquire', READER, { ...acquire('hostA', 5), leaseMs: 60000 })).status, 403, 'never lengthened');
  t.is((await perNode.call('POST', '/v1/leases/web1/acquire', READER, acquire('hostA', 5))).status, 200);
  t.is((await perNode.call('POST', '/v1/leases/web1/acquire', tok('hostA'), acquire('hostA', 5))).status, 200);
  t.is((await perNode.call('POST', '/v1/leases/web1/acquire', READER, acquire('hostA', 5))).status, 403, 'hostA speaks for itself now');
});

test('HTTPS witness: the agent\'s client trusts it through witness.ca_file; without the CA it cannot renew', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-wtls-'));
  const sh = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
  sh(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=ftkvm test CA']);
  sh(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'w.key', '-out', 'w.csr', '-subj', '/CN=witness']);
  writeFileSync(join(dir, 'san.ext'), 'subjectAltName=IP:127.0.0.1\n');
  sh(['x509', '-req', '-in', 'w.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'w.pem', '-days', '2', '-extfile', 'san.ext']);
  writeFileSync(join(dir, 'reader'), READER, { mode: 0o600 });
  const port = nextPort++;
  const w = new WitnessServer({ listen: `127.0.0.1:${port}`, dataDir: dir, credentialsFile: credentials(dir), tokenFile: join(dir, 'reader'), log: memoryLogger(), tls: { certFile: join(dir, 'w.pem'), keyFile: join(dir, 'w.key') } });
  await w.start();
  const url = `https://127.0.0.1:${port}`;
  const trusted = new WitnessGate({ url, node: 'hostA', leaseMs: 1000, token: () => tok('hostA'), caFile: join(dir, 'ca.pem'), clock: systemClock, log: memoryLogger() });
  const untrusting = new WitnessGate({ url, node: 'hostB', leaseMs: 1000, token: () => tok('hostB'), clock: systemClock, log: memoryLogger() });
  t.teardown(async () => { trusted.stop(); untrusting.stop(); await w.stop(); });
  t.true((await trusted.acquire('web1', 1, 'test')).granted);
  const r = await untrusting.acquire('web2', 1, 'test');
  t.false(r.granted);
  t.regex(r.reason, /unreachable: .*(certificate|self.signed|issuer)/i);
});

test('renewals in one request: each lease decided and answered apart, within the caller\'s pair and node', async (t) => {
  const { w, call, all } = await witness();
  t.teardown(() => w.stop());
  for (const vm of ['web1', 'web2']) t.is((await call('POST', `/v1/leases/${vm}/acquire`, tok('hostA'), acquire('hostA', 2))).status, 200);
  t.is((await call('POST', '/v1/leases/db1/acquire', tok('hostB'), acquire('hostB', 5))).status, 200);
  const before = await all();
  const r = await call('POST', '/v1/renewals', tok('hostA'), { leaseMs: 2000, leases: [
    { vm: 'web1', epoch: 2 },           // renewal
    { vm: 'web2', epoch: 1 },           // stale epoch: refused
    { vm: 'db1', epoch: 5 },            // hostB's at its epoch: a takeover needs a newer one
    { vm: 'Bad VM', epoch: 1 },         // malformed: 400 for this item only
    { vm: 'web3', epoch: 1e308 },       // not a safe epoch
    { vm: 'new1', epoch: 1 },           // a first lease: granted (durable)
  ] });
  t.is(r.status, 200);
  t.deepEqual(r.json.results.map((x: any) => `${x.vm}:${x.status}:${x.granted}`), ['web1:200:true', 'web2:409:false', 'db1:409:false', 'Bad VM:400:false', 'web3:400:false', 'new1:200:true']);
  t.regex(r.json.results[1].reason, /stale epoch/);
  t.is(r.json.results[3].code, 'BAD_VM');
  t.deepEqual((await all()).filter((l) => l.vm !== 'new1'), before, 'the refused items changed nothing');
  // Acting for another node, or with the reader token: every item refused, nothing changed.
  const other = await call('POST', '/v1/renewals', tok('hostB'), { node: 'hostA', leaseMs: 2000, leases: [{ vm: 'web1', epoch: 9 }] });
  t.deepEqual(other.json.results.map((x: any) => `${x.status}:${x.code}`), ['403:NOT_YOUR_NODE']);
  const reader = await call('POST', '/v1/renewals', READER, { node: 'hostA', leaseMs: 2000, leases: [{ vm: 'web1', epoch: 9 }] });
  t.deepEqual(reader.json.results.map((x: any) => `${x.status}:${x.code}`), ['403:READ_ONLY']);
  // The batch itself malformed: 400, nothing decided.
  for (const bad of [{ leaseMs: 2000, leases: [] }, { leaseMs: 2000 }, { leases: [{ vm: 'web1', epoch: 2 }] }, { leaseMs: 2000, leases: Array.from({ length: 1001 }, (_, i) => ({ vm: `v${i}`, epoch: 1 })) }]) {
    t.is((await call('POST', '/v1/renewals', tok('hostA'), bad)).status, 400, JSON.stringify(bad).slice(0, 60));
  }
  t.is((await call('POST', '/v1/renewals', tok('hostA'), { leaseMs: 2000, leases: [null] })).json.results[0].status, 400);
  t.is((await all()).length, before.length + 1);
});

test('the agent renews every lease it keeps in one request; against a witness without /v1/renewals, one by one', async (t) => {
  const { w, port, all } = await witness();
  t.teardown(() => w.stop());
  // Count the requests the witness receives, by path.
  const seen: string[] = [];
  const { createServer } = await import('node:http');
  const proxyPort = nextPort++;
  let oldWitness = false;
  const proxy = createServer((req, res) => {
    seen.push(req.url!);
    if (oldWitness && req.url === '/v1/renewals') { res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":{"code":"NOT_FOUND"}}'); return; }
    const up = request(`http://127.0.0.1:${port}${req.url}`, { method: req.method as 'POST', headers: req.headers as Record<string, string>, body: req });
    up.then(async (u) => { res.writeHead(u.statusCode, { 'content-type': 'application/json' }); res.end(Buffer.from(await u.body.arrayBuffer())); }, () => res.destroy());
  });
  await new Promise<void>((r) => proxy.listen(proxyPort, '127.0.0.1', r));
  t.teardown(() => proxy.close());
  for (const old of [false, true]) {
    oldWitness = old;
    const g = new WitnessGate({ url: `http://127.0.0.1:${proxyPort}`, node: 'hostA', leaseMs: 500, token: () => tok('hostA'), clock: systemClock, log: memoryLogger() });
    for (const vm of ['web1', 'web2', 'web3']) g.keep(vm, old ? 4 : 3);
    // keep() renews a new lease at once, one by one: count from when those were answered.
    for (let i = 0; i < 100 && ['web1', 'web2', 'web3'].some((vm) => g.lease(vm).state !== 'held'); i++) await sleep(10);
    seen.length = 0;
    await sleep(650); // six renewal rounds (every 100 ms); at least three even on a loaded machine
    g.stop();
    const batches = seen.filter((u) => u === '/v1/renewals').length, singles = seen.filter((u) => u.endsWith('/acquire')).length;
    if (old) {
      t.true(batches <= 1 && singles >= 9, `old witness: ${batches} batch requests (one, then known), ${singles} single renewals`);
    } else {
      t.true(batches >= 3 && singles === 0, `${batches} batch requests, ${singles} single renewals`);
    }
    for (const vm of ['web1', 'web2', 'web3']) t.is(g.lease(vm).state, 'held', `${vm} held (old witness: ${old})`);
  }
  t.deepEqual((await all()).map((l) => `${l.vm}=${l.holder}@${l.epoch}`).sort(), ['web1=hostA@4', 'web2=hostA@4', 'web3=hostA@4']);
});
