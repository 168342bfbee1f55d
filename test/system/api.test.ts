// The operator HTTP API of a running agent, over real HTTP: endpoints, auth, bad input,
// limits, TLS and the read allow-list.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { connect } from 'node:net';
import { request } from 'undici';
import { startLoneAgent, insecureDispatcher, type LoneAgent } from '../helpers/lone-agent.ts';
import { TOKEN, waitUntil } from '../../lab/pair.ts';

let a: LoneAgent;
test.before(async () => { a = await startLoneAgent({ vms: true }); });
test.after.always(async () => { await a?.stop(); });

async function call(method: string, path: string, opts: { body?: string; token?: string | null; headers?: Record<string, string> } = {}) {
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.token !== null) headers.authorization = `Bearer ${opts.token ?? TOKEN}`;
  if (opts.body !== undefined) headers['content-type'] = 'application/json';
  const r = await request(`${a.base}${path}`, { method: method as 'GET', headers, body: opts.body });
  const text = await r.body.text();
  let json: any;
  try { json = JSON.parse(text); } catch { json = undefined; }
  return { status: r.statusCode, text, json, headers: r.headers };
}

test('GET /health: 503 with every failing condition named', async (t) => {
  const r = await call('GET', '/health', { token: null });
  t.is(r.status, 503);
  t.is(r.json.healthy, false);
  t.is(r.json.node, 'hostA');
  t.true(r.json.problems.some((p: any) => p.subject === 'peer' && /hostB never heard since agent start/.test(p.reason)), r.text);
  t.true(r.json.problems.some((p: any) => p.subject === 'vm/idle' && /^stopped \(none\)/.test(p.reason)), r.text);
  t.true(r.json.warnings.some((w: any) => w.subject === 'witness'));
});

test('GET /v1/status: node, agent, peer paths, witness, VMs', async (t) => {
  await waitUntil(async () => (await call('GET', '/v1/status')).json.vms[0].decision !== '' || undefined, 5000, 'first control step');
  const r = await call('GET', '/v1/status', { token: null });
  t.is(r.status, 200);
  t.is(r.json.node, 'hostA');
  t.regex(r.json.agent.version, /^\d+\.\d+\.\d+/);
  t.is(r.json.agent.qemu.version.split('.')[0], '7');
  t.is(r.json.peer.name, 'hostB');
  t.deepEqual(r.json.peer.paths.map((p: any) => p.address), ['192.0.2.1', '192.0.2.2']);
  t.false(r.json.peer.alive);
  t.is(r.json.witness.mode, 'two-node');
  t.is(r.json.vms[0].name, 'idle');
  t.is(r.json.vms[0].state, 'stopped');
  t.is(r.json.vms[0].qemu, null);
  t.regex(r.json.vms[0].decision, /waiting up to 600 s for the peer/);
});

test('GET /metrics: Prometheus text with ftkvm_ metrics', async (t) => {
  const r = await call('GET', '/metrics', { token: null });
  t.is(r.status, 200);
  t.regex(String(r.headers['content-type']), /^text\/plain; version=0\.0\.4/);
  for (const m of ['ftkvm_peer_up 0', 'ftkvm_protected_vms 0', 'ftkvm_vm_protected{vm="idle"} 0', 'ftkvm_vm_state{vm="idle",state="stopped"} 1',
    'ftkvm_heartbeat_path_up{path="0",address="192.0.2.1"} 0', 'ftkvm_vm_epoch{vm="idle"} 0',
    'ftkvm_heartbeat_stale_total 0']) {
    t.true(r.text.includes(m), `missing: ${m}`);
  }
  for (const m of ['# TYPE ftkvm_checkpoints_total counter', '# TYPE ftkvm_checkpoint_pause_seconds histogram', '# TYPE ftkvm_failovers_total counter',
    '# TYPE ftkvm_drills_total counter', '# TYPE ftkvm_resync_bytes_total counter', '# TYPE ftkvm_heartbeat_rtt_seconds gauge']) {
    t.true(r.text.includes(m), `missing: ${m}`);
  }
  t.regex(r.text, /\nftkvm_heartbeat_rejected_total \d+\n/);
  // every sample line is NAME{labels} VALUE
  const bad = r.text.split('\n').filter((l) => l && !l.startsWith('#') && !/^[a-z_:][a-z0-9_:]*(\{[^}]*\})? [-+0-9.eEInNaf]+$/.test(l));
  t.deepEqual(bad, []);
});

test('mutating endpoints need the bearer token: 401 without, 403 with a wrong one', async (t) => {
  const no = await call('POST', '/v1/vms/idle/drill', { token: null, body: '{}' });
  t.is(no.status, 401);
  t.is(no.json.error.code, 'UNAUTHENTICATED');
  t.is(no.headers['www-authenticate'], 'Bearer');
  const wrong = await call('POST', '/v1/vms/idle/drill', { token: 'not-the-token', body: '{}' });
  t.is(wrong.status, 403);
  t.is(wrong.json.error.code, 'FORBIDDEN');
  const peerNo = await call('POST', '/v1/peer/vms/idle/prepare', { token: null, body: '{}' });
  t.is(peerNo.status, 401);
  const peerState = await call('GET', '/v1/peer/state', { token: null });
  t.is(peerState.status, 401, 'the agent-to-agent state is not public');
});

test('a drill of an unprotected VM is refused with 409 and the reason', async (t) => {
  const r = await call('POST', '/v1/vms/idle/drill', { body: '{}' });
  t.is(r.status, 409);
  t.is(r.json.error.code, 'NOT_PROTECTED');
  t.regex(r.json.error.message, /idle is not fully protected, refusing the drill: on hostA it is stopped/);
  const s = await call('POST', '/v1/vms/idle/switchover', { body: '{}' });
  t.is(s.status, 409);
});

test('unknown VM 404, unknown route 404, wrong method 405, unknown drill 404', async (t) => {
  const vm = await call('POST', '/v1/vms/nope/drill', { body: '{}' });
  t.is(vm.status, 404);
  t.regex(vm.json.error.message, /no protected VM named "nope" on this node \(known: idle\)/);
  t.is((await call('GET', '/v2/everything')).status, 404);
  const m = await call('DELETE', '/v1/status');
  t.is(m.status, 405);
  t.is(m.headers.allow, 'GET');
  t.is((await call('GET', '/v1/drills/drill-none-1')).status, 404);
});

test('malformed JSON 400; wrong field types 400 naming the field; oversized body 413', async (t) => {
  const bad = await call('POST', '/v1/peer/vms/idle/prepare', { body: '{"epoch": 1,' });
  t.is(bad.status, 400);
  t.is(bad.json.error.code, 'BAD_JSON');
  const arr = await call('POST', '/v1/peer/vms/idle/prepare', { body: '[1,2]' });
  t.is(arr.status, 400);
  t.regex(arr.json.error.message, /JSON object/);
  const typ = await call('POST', '/v1/peer/vms/idle/prepare', { body: '{"epoch":"one","sizeBytes":1,"primary":"hostB"}' });
  t.is(typ.status, 400);
  t.regex(typ.json.error.message, /field "epoch" must be a number/);
  const big = await call('POST', '/v1/vms/idle/drill', { body: JSON.stringify({ pad: 'x'.repeat(100_000) }) });
  t.is(big.status, 413);
  t.is(big.json.error.code, 'BODY_TOO_LARGE');
});

test('peer RPCs: a release says only what is true, a takeover needs a replica, epochs out of bounds are refused', async (t) => {
  const rel = await call('POST', '/v1/peer/vms/idle/release', { body: '{"reason":"test","epoch":1}' });
  t.is(rel.status, 200, 'no replica here: nothing that could take over');
  t.true(rel.json.released);
  // Epochs are integers from 1 to 2^31-1 (an older but valid one is STALE_EPOCH: vm-modules unit test).
  for (const epoch of ['0', '-1', '1e308', '1.5', '4294967296']) {
    const bad = await call('POST', '/v1/peer/vms/idle/release', { body: `{"reason":"test","epoch":${epoch}}` });
    t.is(bad.status, 400, `epoch ${epoch}`);
    t.regex(bad.json.error.message, /epoch must be an integer from 1 to/);
  }
  const tk = await call('POST', '/v1/peer/vms/idle/takeover', { body: '{"reason":"test","epoch":1}' });
  t.is(tk.status, 409);
  t.is(tk.json.error.code, 'VM_BUSY');
  t.regex(tk.json.error.message, /cannot take over from state stopped/);
});

test('the agent survives a client that sends garbage on a raw socket', async (t) => {
  const port = Number(new URL(a.base).port);
  await new Promise<void>((resolve) => {
    const s = connect(port, '127.0.0.1', () => { s.write('\x00\x01\x02 NOT HTTP\r\n\r\n'); });
    s.on('data', () => undefined);
    s.on('close', () => resolve());
    s.on('error', () => resolve());
    setTimeout(() => { s.destroy(); resolve(); }, 3000);
  });
  t.is((await call('GET', '/health')).status, 503);
});

test('TLS and the read allow-list', async (t) => {
  const dir = a.dir;
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')], { stdio: 'ignore' });
  const tls = await startLoneAgent({ scheme: 'https', api: { tls: { cert_file: join(dir, 'cert.pem'), key_file: join(dir, 'key.pem') }, read_allow: ['10.99.0.0/16'] } });
  t.teardown(() => tls.stop());
  const denied = await request(`${tls.base}/v1/status`, { dispatcher: insecureDispatcher });
  t.is(denied.statusCode, 403, '127.0.0.1 is not in read_allow');
  t.regex(await denied.body.text(), /not in api\.read_allow/);
  const withToken = await request(`${tls.base}/v1/status`, { dispatcher: insecureDispatcher, headers: { authorization: `Bearer ${TOKEN}` } });
  t.is(withToken.statusCode, 200, 'a bearer token overrides the allow-list');
  await withToken.body.dump();
  await t.throwsAsync(request(`${tls.base.replace('https', 'http')}/health`, { headersTimeout: 2000 }));
});
