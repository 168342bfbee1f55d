// The agent's HTTP plumbing (api/http.ts) on a real socket: routing (404, 405 with Allow, path
// parameters), auth (401/403), the read allow-list (net.BlockList: IPv4 rules match an
// IPv4-mapped IPv6 source), and request bodies checked by zod schemas (400 naming the field,
// the exact bounds, 413). Plus the CIDR parsing behind api.read_allow's configuration errors.
import test from 'ava';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { z } from 'zod/v4';
import { bodyField, createRouter, field, intField, parseBody, type Route, type RouterOptions } from '../../agent/src/api/http.ts';
import { cidrMatcher, ipInCidrs, parseCidr } from '../../agent/src/util/cidr.ts';
import { parseConfig, ConfigError, type ConfigFs } from '../../agent/src/config/load.ts';

const TOKEN = 't'.repeat(32);
const Body = z.object({ epoch: bodyField.int(1, 2 ** 31 - 1), sizeBytes: bodyField.number(), primary: bodyField.string(), protection: bodyField.string().optional() });

const routes: Route[] = [
  { method: 'GET', path: '/v1/status', access: 'read', handler: () => ({ json: { ok: true } }) },
  { method: 'GET', path: '/health', access: 'public', handler: () => ({ status: 503, json: { healthy: false } }) },
  { method: 'POST', path: '/v1/vms/:name/drill', access: 'write', handler: (ctx) => ({ status: 202, json: { vm: ctx.params.name } }) },
  { method: 'GET', path: '/v1/drills/:id', access: 'read', handler: (ctx) => ({ json: { id: ctx.params.id } }) },
  { method: 'GET', path: '/v1/drills', access: 'read', handler: () => ({ json: [] }) },
  { method: 'GET', path: '/metrics', access: 'read', handler: () => ({ text: 'm 1\n', contentType: 'text/plain; version=0.0.4' }) },
  {
    method: 'POST', path: '/v1/peer/vms/:name/prepare', access: 'write',
    handler: async (ctx) => ({ json: parseBody(Body, await ctx.body()) }),
  },
  {
    method: 'POST', path: '/v1/one/:f', access: 'write',
    handler: async (ctx) => {
      const b = await ctx.body();
      return { json: { v: ctx.params.f === 'lease' ? intField(b, 'leaseMs', 1000, 600_000, true) : field(b, 'node', 'string', false) ?? null } };
    },
  },
];

async function serve(o: Partial<RouterOptions> = {}, host = '127.0.0.1'): Promise<{ url: string; server: Server }> {
  const handler = createRouter(routes, { token: () => TOKEN, maxBodyBytes: 1024, ...o });
  const server = createServer((req, res) => { void handler(req, res); });
  await new Promise<void>((r) => server.listen(0, host, r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, server };
}

async function call(url: string, method: string, path: string, o: { body?: string; token?: string | null } = {}) {
  const headers: Record<string, string> = {};
  if (o.token !== null) headers.authorization = `Bearer ${o.token ?? TOKEN}`;
  const r = await fetch(url + path, { method, headers, body: o.body });
  const text = await r.text();
  let json: any = null;
  try { json = JSON.parse(text); } catch { /* text */ }
  return { status: r.status, json, text, headers: r.headers };
}

test('routing: 404 for unknown paths, 405 with Allow for a wrong method, path parameters decoded, 400 for bad percent-encoding', async (t) => {
  const { url, server } = await serve();
  t.teardown(() => server.close());
  const nf = await call(url, 'GET', '/v2/everything');
  t.is(nf.status, 404);
  t.deepEqual(nf.json, { error: { code: 'NOT_FOUND', message: 'no such endpoint: /v2/everything' } });
  for (const p of ['/v1/drills/', '//', '/v1//vms', '/v1/vms//drill', '/v1/status/', '/V1/STATUS', '/v1/drills/a/b']) t.is((await call(url, 'GET', p)).status, 404, p);
  t.regex((await call(url, 'GET', '/' + 'a'.repeat(5000))).json.error.message, /^no such endpoint: \/a{199}…$/);
  const m = await call(url, 'DELETE', '/v1/status');
  t.is(m.status, 405);
  t.is(m.headers.get('allow'), 'GET');
  t.is(m.json.error.code, 'METHOD_NOT_ALLOWED');
  t.is(m.json.error.message, 'DELETE not allowed on /v1/status');
  t.is((await call(url, 'GET', '/v1/vms/x/drill')).headers.get('allow'), 'POST');
  t.deepEqual((await call(url, 'GET', '/v1/drills/drill%2Fx%20y?z=1')).json, { id: 'drill/x y' });
  t.deepEqual((await call(url, 'GET', '/v1/drills?x=1')).json, []);
  t.deepEqual((await call(url, 'POST', '/v1/vms/%E2%82%AC/drill')).json, { vm: '€' });
  const bad = await call(url, 'GET', '/v1/drills/%E0%A4%A');
  t.is(bad.status, 400);
  t.deepEqual(bad.json.error, { code: 'BAD_PATH', message: 'malformed percent-encoding in id' });
  t.is((await call(url, 'GET', '/metrics')).text, 'm 1\n');
  t.is((await call(url, 'GET', '/health', { token: null })).status, 503);
});

test('auth: a POST without a token is 401 with WWW-Authenticate, a wrong one 403; reads are open without read_allow', async (t) => {
  const { url, server } = await serve();
  t.teardown(() => server.close());
  const no = await call(url, 'POST', '/v1/vms/x/drill', { token: null });
  t.is(no.status, 401);
  t.is(no.json.error.code, 'UNAUTHENTICATED');
  t.is(no.headers.get('www-authenticate'), 'Bearer');
  t.regex(no.json.error.message, /token file: api\.token_file/);
  const wrong = await call(url, 'POST', '/v1/vms/x/drill', { token: 'nope' });
  t.is(wrong.status, 403);
  t.deepEqual(wrong.json.error, { code: 'FORBIDDEN', message: 'invalid bearer token' });
  t.is((await call(url, 'GET', '/v1/status', { token: null })).status, 200);
});

test('read_allow (net.BlockList): a source outside is refused unless it has a token; an IPv4 rule matches an IPv4-mapped IPv6 source', async (t) => {
  // Listening on "::" (dual stack), a client at 127.0.0.1 is seen as ::ffff:127.0.0.1.
  const dual = await serve({ readAllow: ['127.0.0.0/8'] }, '::');
  const outside = await serve({ readAllow: ['10.99.0.0/16', 'fd00::/8'] }, '::');
  t.teardown(() => { dual.server.close(); outside.server.close(); });
  const seen = await new Promise<string>((resolve) => {
    const s = createServer((req, res) => { resolve(req.socket.remoteAddress ?? ''); res.end(); });
    s.listen(0, '::', () => { void fetch(`http://127.0.0.1:${(s.address() as AddressInfo).port}/`).then(() => s.close()); });
  });
  t.is(seen, '::ffff:127.0.0.1', 'the dual-stack socket really reports an IPv4-mapped address');
  t.is((await call(dual.url, 'GET', '/v1/status', { token: null })).status, 200);
  const denied = await call(outside.url, 'GET', '/v1/status', { token: null });
  t.is(denied.status, 403);
  t.deepEqual(denied.json.error, { code: 'FORBIDDEN', message: 'source ::ffff:127.0.0.1 not in api.read_allow; send a bearer token' });
  t.is((await call(outside.url, 'GET', '/v1/status')).status, 200, 'a bearer token overrides the allow-list');
  t.is((await call(outside.url, 'GET', '/health', { token: null })).status, 503, 'public endpoints stay public');
});

test('CIDR matching: IPv4, IPv6, IPv4-mapped, single addresses, /0', (t) => {
  const m = cidrMatcher(['10.0.0.0/8', '192.168.1.5', 'fd00::/8', '2001:db8::1']);
  const yes = ['10.1.2.3', '::ffff:10.1.2.3', '::ffff:a01:203', '192.168.1.5', '::ffff:192.168.1.5', 'fd12::1', '2001:db8::1', '2001:0db8:0:0:0:0:0:1'];
  const no = ['11.0.0.1', '192.168.1.6', '::ffff:11.1.1.1', '::1', 'fe80::1', '2001:db8::2', '', 'garbage', '10.0.0.0/8'];
  for (const ip of yes) t.true(m(ip), ip);
  for (const ip of no) t.false(m(ip), ip);
  t.true(ipInCidrs('1.2.3.4', ['0.0.0.0/0']));
  t.true(ipInCidrs('::ffff:1.2.3.4', ['0.0.0.0/0']));
  t.false(ipInCidrs('::1', ['0.0.0.0/0']));
  t.true(ipInCidrs('::1', ['::/0']));
  t.true(ipInCidrs('10.0.0.77', ['10.0.0.5/24']), 'host bits in the rule are ignored');
  t.throws(() => cidrMatcher(['10.0.0.0/33']), { message: 'expected an IP or CIDR (e.g. 10.0.0.0/24 or fd00::/8), got "10.0.0.0/33"' });
});

test('CIDR parsing: what api.read_allow accepts', (t) => {
  t.deepEqual(parseCidr('10.0.0.0/24'), { addr: '10.0.0.0', bits: 24, family: 'ipv4' });
  t.deepEqual(parseCidr('10.0.0.1'), { addr: '10.0.0.1', bits: 32, family: 'ipv4' });
  t.deepEqual(parseCidr('fd00::/8'), { addr: 'fd00::', bits: 8, family: 'ipv6' });
  t.deepEqual(parseCidr('::1'), { addr: '::1', bits: 128, family: 'ipv6' });
  t.deepEqual(parseCidr('0.0.0.0/0'), { addr: '0.0.0.0', bits: 0, family: 'ipv4' });
  // "10.0.0.0/" used to be read as /0 (Number("") is 0): everything allowed.
  for (const s of ['', '10.0.0.0/', '10.0.0.0/33', 'fd00::/129', '10.0.0.0/-1', '10.0.0.0/ 24', '10.0.0.0/0x18', '10.0.0.0/2.4e1', '10.0.0.0/24/8', '10.0.0/24', 'host.example/24', '/24'])
    t.is(parseCidr(s), null, JSON.stringify(s));
});

test('a bad api.read_allow entry is a configuration error naming it', (t) => {
  const fs: ConfigFs = { exists: () => true, isExecutable: () => true, mode: () => 0o600 };
  const yaml = `node: {name: hostA, replication_address: 10.0.1.1}
peer: {name: hostB, addresses: [10.0.1.2], replication_address: 10.0.1.2}
witness: {url: "http://192.168.0.254:7490"}
api:
  read_allow: [10.0.0.0/8, "10.0.0.0/"]
vms: []
`;
  const e = t.throws(() => parseConfig(yaml, 'agent.yaml', fs), { instanceOf: ConfigError });
  t.regex(e!.message, /api\.read_allow\[1\]: expected an IP or CIDR \(e\.g\. 10\.0\.0\.0\/24 or fd00::\/8\), got "10\.0\.0\.0\/"/);
});

test('request bodies (zod): 400 naming the first bad field in order, the exact bounds, 413 over the limit', async (t) => {
  const { url, server } = await serve();
  t.teardown(() => server.close());
  const post = async (path: string, body: string) => { const r = await call(url, 'POST', path, { body }); return { status: r.status, code: r.json?.error?.code, message: r.json?.error?.message, json: r.json }; };
  const P = '/v1/peer/vms/a/prepare';
  t.deepEqual((await post(P, '{"epoch":3,"sizeBytes":1048576,"primary":"hostA","extra":1}')).json, { epoch: 3, sizeBytes: 1048576, primary: 'hostA' }, 'unknown fields dropped');
  const cases: [string, string, number, string, string][] = [
    [P, '{"epoch": 1,', 400, 'BAD_JSON', 'request body is not valid JSON'],
    [P, '[1,2]', 400, 'BAD_BODY', 'request body must be a JSON object'],
    [P, '42', 400, 'BAD_BODY', 'request body must be a JSON object'],
    [P, 'null', 400, 'BAD_BODY', 'request body must be a JSON object'],
    [P, '', 400, 'BAD_BODY', 'missing field "epoch"'],
    [P, '{"epoch":"one","sizeBytes":1,"primary":"hostB"}', 400, 'BAD_BODY', 'field "epoch" must be a number'],
    [P, '{"epoch":null,"sizeBytes":1,"primary":"hostB"}', 400, 'BAD_BODY', 'field "epoch" must be a number'],
    [P, '{"epoch":1e999,"sizeBytes":1,"primary":"hostB"}', 400, 'BAD_BODY', 'field "epoch" must be a number'],
    [P, '{"epoch":0,"sizeBytes":"x"}', 400, 'BAD_BODY', 'epoch must be an integer from 1 to 2147483647'],
    [P, '{"epoch":1e308}', 400, 'BAD_BODY', 'epoch must be an integer from 1 to 2147483647'],
    [P, '{"epoch":1.5}', 400, 'BAD_BODY', 'epoch must be an integer from 1 to 2147483647'],
    [P, '{"epoch":-1}', 400, 'BAD_BODY', 'epoch must be an integer from 1 to 2147483647'],
    [P, '{"epoch":4294967296}', 400, 'BAD_BODY', 'epoch must be an integer from 1 to 2147483647'],
    [P, '{"epoch":1}', 400, 'BAD_BODY', 'missing field "sizeBytes"'],
    [P, '{"epoch":1,"sizeBytes":1e999,"primary":"x"}', 400, 'BAD_BODY', 'field "sizeBytes" must be a number'],
    [P, '{"epoch":1,"sizeBytes":1,"primary":{}}', 400, 'BAD_BODY', 'field "primary" must be a string'],
    [P, '{"epoch":1,"sizeBytes":1,"primary":"x","protection":7}', 400, 'BAD_BODY', 'field "protection" must be a string'],
    ['/v1/one/lease', '{}', 400, 'BAD_BODY', 'missing field "leaseMs"'],
    ['/v1/one/lease', '{"leaseMs":999}', 400, 'BAD_BODY', 'leaseMs must be an integer from 1000 to 600000'],
    ['/v1/one/lease', '{"leaseMs":600001}', 400, 'BAD_BODY', 'leaseMs must be an integer from 1000 to 600000'],
    ['/v1/one/lease', '{"leaseMs":true}', 400, 'BAD_BODY', 'field "leaseMs" must be a number'],
    ['/v1/one/node', '{"node":false}', 400, 'BAD_BODY', 'field "node" must be a string'],
    ['/v1/one/node', '"x"', 400, 'BAD_BODY', 'request body must be a JSON object'],
    ['/v1/vms/a/drill', JSON.stringify({ pad: 'x'.repeat(2000) }), 413, 'BODY_TOO_LARGE', 'request body larger than 1024 bytes'],
  ];
  for (const [path, body, status, code, message] of cases) {
    const r = await post(path, body);
    t.is(r.status, status, body);
    t.is(r.code, code, body);
    t.true(r.message.startsWith(message), `${body}: ${r.message}`);
  }
  t.deepEqual((await post('/v1/one/lease', '{"leaseMs":1000}')).json, { v: 1000 });
  t.deepEqual((await post('/v1/one/node', '{}')).json, { v: null });
  t.deepEqual((await post('/v1/one/node', '{"node":"hostA"}')).json, { v: 'hostA' });
  t.false('polluted' in ({} as Record<string, unknown>));
  t.deepEqual((await post(P, '{"__proto__":{"polluted":true},"epoch":2,"sizeBytes":0,"primary":"p"}')).json, { epoch: 2, sizeBytes: 0, primary: 'p' });
  t.false('polluted' in ({} as Record<string, unknown>));
});
