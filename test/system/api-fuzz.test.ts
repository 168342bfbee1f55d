// Hundreds of generated bad requests (seeded, reproducible); afterwards the agent still
// answers /health and never answered 5xx.
import test from 'ava';
import { connect } from 'node:net';
import { startLoneAgent } from '../helpers/lone-agent.ts';
import { TOKEN } from '../../lab/pair.ts';

function rng(seed: number) {
  return () => { seed |= 0; seed = (seed + 0x6d2b79f5) | 0; let t = Math.imul(seed ^ (seed >>> 15), 1 | seed); t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t; return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
}

test("600 generated malformed requests: no internal error (no 5xx except /health's 503), no crash, /health still answers", async (t) => {
  t.timeout(180_000);
  const a = await startLoneAgent();
  t.teardown(() => a.stop());
  const port = Number(new URL(a.base).port);
  const r = rng(20261124);
  const pick = <T>(xs: T[]): T => xs[Math.floor(r() * xs.length)]!;
  const junk = (n: number) => Array.from({ length: n }, () => String.fromCharCode(Math.floor(r() * 256))).join('');
  const paths = ['/health', '/v1/status', '/metrics', '/v1/vms/x/drill', '/v1/vms/%00/drill', '/v1/vms/../../etc/passwd/drill', '/v1/drills/',
    '/v1/drills/%E0%A4%A', '/v1/peer/vms/a/prepare', '/v1/peer/vms/a/release', '/v1/peer/vms/a/takeover', '/v1/peer/state', '/v1/switchovers/x',
    '/' + 'a'.repeat(5000), '/v1/vms/' + encodeURIComponent(junk(20)) + '/drill', '/?' + 'q=1&'.repeat(500), '//', '/v1//vms'];
  const bodies = () => pick([
    '', '{}', '[]', 'null', '"str"', '42', '{"epoch":', '{"epoch":1e999,"sizeBytes":-1,"primary":{}}', '{"reason":' + '['.repeat(5000) + ']'.repeat(5000) + '}',
    junk(200), JSON.stringify({ reason: junk(50) }), 'x'.repeat(70_000), '{"__proto__":{"polluted":true}}', '\u0000\u0000',
  ]);
  const statuses = new Map<number, number>();
  let raw = 0;
  for (let i = 0; i < 600; i++) {
    const method = pick(['GET', 'POST', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'HEAD']);
    const auth = pick([undefined, `Bearer ${TOKEN}`, 'Bearer wrong', 'Basic Zm9vOmJhcg==', 'Bearer ' + junk(10).replace(/[\r\n]/g, ''), 'Bearer']);
    const body = method === 'GET' || method === 'HEAD' ? '' : bodies();
    const lie = r() < 0.1; // content-length that does not match the body
    const headers = [`${method} ${pick(paths)} HTTP/1.1`, 'Host: x', 'Connection: close'];
    if (auth) headers.push(`Authorization: ${auth.replace(/[^\x20-\x7e]/g, '?')}`);
    if (body || method === 'POST') headers.push(`Content-Length: ${lie ? Buffer.byteLength(body) + Math.floor(r() * 10) + 1 : Buffer.byteLength(body)}`);
    if (r() < 0.3) headers.push('Content-Type: application/json');
    const req = headers.join('\r\n') + '\r\n\r\n' + body;
    const status = await new Promise<number | null>((resolve) => {
      const s = connect(port, '127.0.0.1');
      let got = '';
      const timer = setTimeout(() => { s.destroy(); resolve(null); }, lie ? 300 : 5000); // a lying length waits for bytes that never come
      s.on('connect', () => s.write(req, 'latin1'));
      s.on('data', (d) => { got += d.toString('latin1'); });
      s.on('close', () => { clearTimeout(timer); const m = /^HTTP\/1\.1 (\d{3})/.exec(got); resolve(m ? Number(m[1]) : null); });
      s.on('error', () => undefined);
    });
    if (status === null) raw++;
    else statuses.set(status, (statuses.get(status) ?? 0) + 1);
  }
  const summary = [...statuses].sort((x, y) => x[0] - y[0]).map(([s, n]) => `${s}×${n}`).join(' ');
  t.log(`statuses: ${summary}; no HTTP answer (lying content-length / dropped): ${raw}`);
  // 503 is /health's "not healthy" answer; anything else 5xx would be an internal error.
  t.false([...statuses.keys()].some((s) => s >= 500 && s !== 503), summary);
  t.true([...statuses.values()].reduce((x, y) => x + y, 0) > 450, 'most requests got an HTTP answer');
  t.is(a.proc.exitCode, null, 'agent still running');
  const h = await fetch(`${a.base}/health`);
  t.is(h.status, 503);
  t.is((await h.json() as { node: string }).node, 'hostA');
  t.false(/polluted/.test(JSON.stringify(await (await fetch(`${a.base}/v1/status`)).json())));
});
