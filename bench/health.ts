// bench/health: /health latency at a fixed request rate against a real agent process.
//   sudo bench/health [--rate 500] [--seconds 20] [--url http://host:7480]
// Without --url it starts its own agent on loopback (no peer, no VM). Open-loop: requests are
// sent on schedule whether or not earlier ones have returned, so queueing shows in the tail.
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';
import { startLoneAgent } from '../test/helpers/lone-agent.ts';

const { values } = parseArgs({ options: { rate: { type: 'string', default: '500' }, seconds: { type: 'string', default: '20' }, url: { type: 'string' } } });
const rate = Number(values.rate), seconds = Number(values.seconds);
const own = values.url ? undefined : await startLoneAgent();
const base = values.url ?? own!.base;
const dispatcher = new Agent({ connections: 64, pipelining: 1, keepAliveTimeout: 30_000 });
const lat: number[] = [];
const statuses = new Map<number, number>();
let errors = 0, inflight = 0, maxInflight = 0;
const total = rate * seconds;
const t0 = performance.now();
await new Promise<void>((done) => {
  let sent = 0, finished = 0;
  const fire = () => {
    const start = performance.now();
    inflight++; maxInflight = Math.max(maxInflight, inflight);
    request(`${base}/health`, { dispatcher }).then(async (r) => {
      await r.body.dump();
      lat.push(performance.now() - start);
      statuses.set(r.statusCode, (statuses.get(r.statusCode) ?? 0) + 1);
    }, () => { errors++; }).finally(() => { inflight--; if (++finished === total) done(); });
  };
  const tick = () => {
    const due = Math.min(total, Math.floor(((performance.now() - t0) / 1000) * rate));
    while (sent < due) { fire(); sent++; }
    if (sent < total) setTimeout(tick, 1);
  };
  tick();
});
const wall = (performance.now() - t0) / 1000;
lat.sort((a, b) => a - b);
const q = (p: number) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))]!.toFixed(2);
console.log(`bench/health: ${total} requests at ${rate}/s for ${seconds} s (achieved ${(lat.length / wall).toFixed(0)}/s), ` +
  `statuses ${[...statuses].map(([s, n]) => `${s}x${n}`).join(' ')}, errors ${errors}, max in flight ${maxInflight}`);
console.log(`/health latency ms: p50 ${q(0.5)}  p90 ${q(0.9)}  p99 ${q(0.99)}  max ${lat.at(-1)!.toFixed(2)}`);
await dispatcher.close();
await own?.stop();
