// bench/witness: lease renewals the way agents renew (every lease_ms/5, open loop: sent on
// schedule whether or not earlier ones returned), against
//   embedded: `ftkvm-agent witness` (the built binary, its own process on loopback) with per-node
//             credentials, as the roles run it: pairs of two nodes, 8 VMs per pair (each node
//             primary of 4), each node its own token. --renew batch (the default, as agents
//             renew since POST /v1/renewals): per node, one request renewing all its VMs (its
//             fencer renews only while the agent does not: fence/fencer.ts agentRenews);
//             --renew single: one request per VM (older agents, and what the etcd transport does);
//   etcd:     a 3-member etcd cluster on loopback (Debian's etcd-server), through the agent's
//             etcd transport (witness/etcd.ts); optionally its leader killed mid-run.
//   bench/witness [--backend embedded,etcd] [--vms 10,100,1000,5000] [--seconds 20] [--renew batch|single]
//                 [--lease-ms 1000] [--etcd-lease-ms 5000] [--kill-leader] [--binary dist/ftkvm-agent]
// Prints per backend and fleet size: offered and served renewals/s, latency p50/p99/max,
// errors and refusals, the server's CPU (of one core); then a table.
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, statSync } from 'node:fs';
import { tmpdir, cpus } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { Agent, request } from 'undici';
import { EtcdCluster } from '../lab/etcd.ts';
import { etcdLeader, etcdTransport } from '../agent/src/witness/etcd.ts';

const { values } = parseArgs({ options: {
  backend: { type: 'string', default: 'embedded,etcd' },
  vms: { type: 'string', default: '10,100,1000,5000' }, seconds: { type: 'string', default: '20' },
  'lease-ms': { type: 'string', default: '1000' }, 'etcd-lease-ms': { type: 'string', default: '5000' },
  'kill-leader': { type: 'boolean', default: false }, binary: { type: 'string', default: 'dist/ftkvm-agent' },
  renew: { type: 'string', default: 'batch' },
} });
if (!['batch', 'single'].includes(values.renew!)) throw new Error(`--renew: batch or single, got ${values.renew}`);
const batch = values.renew === 'batch';
const sizes = values.vms!.split(',').map(Number);
const seconds = Number(values.seconds);
const VMS_PER_PAIR = 8;
const READER = 'b'.repeat(32);
const nodeToken = (node: string) => `bench-token-${node}-`.padEnd(40, 'x');
/** VM i belongs to pair floor(i/8); its primary is the pair's first or second node, alternately. */
const placement = (i: number) => { const pair = Math.floor(i / VMS_PER_PAIR); return { pair: `p${pair}`, node: `n${pair}${i % 2 ? 'b' : 'a'}` }; };
const ticksPerS = 100;
const cpuMs = (pid: number) => { try { return cpuMsOf(pid); } catch { return 0; } }; // a killed member counts 0
const cpuMsOf = (pid: number) => { const f = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' '); return ((Number(f[11]) + Number(f[12])) * 1000) / ticksPerS; };

interface Row { backend: string; vms: number; offered: number; served: number; p50: number; p99: number; max: number; errors: number; refused: number; fences: number; cpu: number; note?: string }

/** Renewals of n VMs, each `renew(vm)` resolving to 'ok' | 'refused' (throws: an error), on the agents' schedule. */
async function drive(n: number, renewMs: number, leaseMs: number, renew: (vm: number) => Promise<'ok' | 'refused'>, during?: (elapsedMs: number) => void) {
  const lat: number[] = [];
  // The agent trusts a lease until (renewal sent + lease - margin) (witness/client.ts): a VM
  // whose answered renewals were further apart than that would have been fenced.
  const trustMs = leaseMs - Math.max(300, Math.floor(leaseMs / 4));
  const lastOk = new Map<number, number>();
  const wouldFence = new Set<number>();
  let errors = 0, refused = 0, offered = 0;
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  const pending: Promise<void>[] = [];
  await new Promise<void>((done) => {
    // VM i renews at t0 + i*renewMs/n + k*renewMs: spread evenly, as independent agents would.
    let k = 0;
    const tick = () => {
      const now = performance.now();
      during?.(now - t0);
      if (now >= end) { done(); return; }
      const due = Math.floor(((now - t0) / renewMs) * n);
      while (k < due) {
        const vm = k % n; k++; offered++;
        const s = performance.now();
        pending.push(renew(vm).then((r) => {
          if (r !== 'ok') { refused++; return; }
          lat.push(performance.now() - s);
          const prev = lastOk.get(vm);
          // answered now; the previous answered renewal was sent at prev: the lease was trusted until prev + trustMs
          if (prev !== undefined && performance.now() > prev + trustMs) wouldFence.add(vm);
          if (prev === undefined || s > prev) lastOk.set(vm, s);
        }, () => { errors++; }));
      }
      setTimeout(tick, 1);
    };
    tick();
  });
  await Promise.all(pending);
  const wall = (performance.now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  const q = (p: number) => lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))]! : NaN;
  return { wall, offered: offered / seconds, served: lat.length / wall, p50: q(0.5), p99: q(0.99), max: lat.at(-1) ?? NaN, errors, refused, fences: wouldFence.size };
}

function report(r: Row): Row {
  console.log(`${r.backend} ${r.vms} VMs: offered ${r.offered.toFixed(0)}/s, served ${r.served.toFixed(0)}/s (${(100 * r.served / r.offered).toFixed(1)} %), ` +
    `latency p50 ${r.p50.toFixed(1)} ms p99 ${r.p99.toFixed(1)} ms max ${r.max.toFixed(1)} ms, errors ${r.errors}, refused ${r.refused}, VMs that would have fenced ${r.fences}, server CPU ${(100 * r.cpu).toFixed(0)} % of a core${r.note ? `, ${r.note}` : ''}`);
  return r;
}

async function runEtcd(n: number, basePort: number): Promise<Row> {
  const leaseMs = Number(values['etcd-lease-ms']);
  const renewMs = Math.floor(leaseMs / 5);
  const c = new EtcdCluster(3, basePort);
  await c.start();
  const dispatcher = new Agent({ connections: 256, keepAliveTimeout: 30_000 });
  // One transport per pair (its key prefix), sharing one connection pool.
  const pairs = new Map<string, ReturnType<typeof etcdTransport>>();
  const transport = (pair: string) => { let t = pairs.get(pair); if (!t) { t = etcdTransport({ endpoints: c.endpoints, prefix: '/ftkvm', pair }, { dispatcher }); pairs.set(pair, t); } return t; };
  const renew = async (i: number) => { const p = placement(i); const r = await transport(p.pair).acquire(`vm${i}`, { node: p.node, epoch: 1, leaseMs }, Math.max(200, renewMs * 2)); return r.status === 200 ? 'ok' as const : 'refused' as const; };
  for (let i = 0; i < n; i += 100) await Promise.all(Array.from({ length: Math.min(100, n - i) }, (_, k) => renew(i + k)));
  const pids = c.pids();
  const cpu0 = pids.reduce((a, p) => a + cpuMs(p), 0);
  let killed: string | null = null;
  const r = await drive(n, renewMs, leaseMs, renew, (ms) => {
    if (values['kill-leader'] && killed === null && ms > (seconds * 1000) / 2) {
      killed = 'pending';
      void etcdLeader(c.endpoints).then((l) => { if (l) { c.kill(c.endpoints.indexOf(l.endpoint)); killed = `leader ${l.endpoint} killed at ${(ms / 1000).toFixed(1)} s`; } });
    }
  });
  const cpu = Math.max(0, pids.reduce((a, p) => a + cpuMs(p), 0) - cpu0) / (r.wall * 1000);
  // After a leader kill: was any VM's lease lost (expired) or granted to another node?
  let lost = 0;
  if (values['kill-leader']) {
    for (let i = 0; i < n; i++) { const p = placement(i); const x = await transport(p.pair).acquire(`vm${i}`, { node: p.node, epoch: 1, leaseMs }, 5000).catch(() => null); if (x?.status !== 200) lost++; }
  }
  for (const t of pairs.values()) t.close();
  await dispatcher.close();
  c.stop();
  return report({ backend: `etcd (3 members, lease ${leaseMs} ms)`, vms: n, ...r, cpu, note: values['kill-leader'] ? `${killed ?? 'leader not killed'}; leases not renewable afterwards: ${lost}` : undefined });
}

async function run(n: number, port: number): Promise<Row> {
  const leaseMs = Number(values['lease-ms']);
  const renewMs = Math.max(50, Math.floor(leaseMs / 5));
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-bench-witness-'));
  writeFileSync(join(dir, 'token'), READER, { mode: 0o600 });
  const nodes = new Map<string, string>();
  for (let i = 0; i < n; i++) { const p = placement(i); nodes.set(p.node, p.pair); nodes.set(p.node.replace(/.$/, (x) => (x === 'a' ? 'b' : 'a')), p.pair); }
  writeFileSync(join(dir, 'credentials.yml'), 'nodes:\n' + [...nodes].map(([node, pair]) => `  ${node}: {pair: ${pair}, token_sha256: ${createHash('sha256').update(nodeToken(node)).digest('hex')}}\n`).join(''));
  const w = spawn(values.binary!, ['witness', '--listen', `127.0.0.1:${port}`, '--data-dir', dir, '--credentials', join(dir, 'credentials.yml'), '--token-file', join(dir, 'token')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  w.stderr.on('data', (d) => { stderr += d; });
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    try { const r = await request(`${base}/health`); await r.body.dump(); break; } catch { if (i > 100) throw new Error(`witness did not start: ${stderr}`); await new Promise((r) => setTimeout(r, 50)); }
  }
  const dispatcher = new Agent({ connections: 256, keepAliveTimeout: 30_000 });
  const acquire = (vm: number) => { const p = placement(vm); return request(`${base}/v1/leases/vm${vm}/acquire`, {
    method: 'POST', dispatcher, headers: { authorization: `Bearer ${nodeToken(p.node)}`, 'content-type': 'application/json' },
    body: JSON.stringify({ node: p.node, epoch: 1, leaseMs }), headersTimeout: 10_000, bodyTimeout: 10_000,
  }); };
  // Every VM's lease first (the grants: written durably), then the renewals measured.
  for (let i = 0; i < n; i += 200) await Promise.all(Array.from({ length: Math.min(200, n - i) }, async (_, k) => { const r = await acquire(i + k); await r.body.dump(); }));
  const cpu0 = cpuMs(w.pid!);
  let r;
  if (batch) {
    // Renewers: each node's agent, renewing the node's VMs in one request.
    const byNode = new Map<string, number[]>();
    for (let i = 0; i < n; i++) { const p = placement(i); byNode.set(p.node, [...(byNode.get(p.node) ?? []), i]); }
    const renewers = [...byNode].map(([node, vms]) => ({ node, vms }));
    r = await drive(renewers.length, renewMs, leaseMs, async (u) => {
      const { node, vms } = renewers[u]!;
      const x = await request(`${base}/v1/renewals`, {
        method: 'POST', dispatcher, headers: { authorization: `Bearer ${nodeToken(node)}`, 'content-type': 'application/json' },
        body: JSON.stringify({ node, leaseMs, leases: vms.map((vm) => ({ vm: `vm${vm}`, epoch: 1 })) }), headersTimeout: 10_000, bodyTimeout: 10_000,
      });
      const body = (await x.body.json()) as { results?: { granted: boolean }[] };
      return x.statusCode === 200 && body.results?.every((a) => a.granted) ? 'ok' : 'refused';
    });
    // Counted per VM: every VM of a node whose answers came too far apart.
    r = { ...r, fences: Math.min(n, r.fences * Math.round(n / renewers.length)), units: `${renewers.length} nodes, each renewing its ${(n / byNode.size).toFixed(0)} VMs in one request` };
  } else {
    r = await drive(n, renewMs, leaseMs, async (vm) => { const x = await acquire(vm); await x.body.dump(); return x.statusCode === 200 ? 'ok' : 'refused'; });
  }
  const cpu = (cpuMs(w.pid!) - cpu0) / (r.wall * 1000);
  w.kill('SIGTERM');
  await dispatcher.close();
  return report({ backend: `embedded (lease ${leaseMs} ms, ${batch ? 'batch' : 'single'})`, vms: n, ...r, cpu, note: `leases.json ${statSync(join(dir, 'leases.json')).size} B${'units' in r ? `; ${r.units}` : ''}` });
}

const backends = values.backend!.split(',');
console.log(`bench/witness: ${backends.join(' and ')} on 127.0.0.1, client on the same machine; renewals every lease/5 for ${seconds} s, ` +
  `embedded: ${batch ? 'per node, one request for all its VMs' : 'one request per VM'}; etcd: one request per VM; ` +
  `${VMS_PER_PAIR} VMs per pair; ${cpus().length} cores (${cpus()[0]?.model}); ${new Date().toISOString()}`);
const rows: Row[] = [];
let port = 27400;
for (const b of backends) {
  for (const n of sizes) {
    if (b === 'embedded') rows.push(await run(n, port++));
    else if (b === 'etcd') rows.push(await runEtcd(n, 25000 + (port++ % 50) * 8)); // below the ephemeral ports (32768+)
    else throw new Error(`--backend: embedded or etcd, got ${b}`);
  }
}
console.log('\n| backend | VMs | requests offered/s | served/s | p50 ms | p99 ms | max ms | errors | refused | would fence | server CPU |\n|---|---|---|---|---|---|---|---|---|---|---|');
for (const r of rows) console.log(`| ${r.backend} | ${r.vms} | ${r.offered.toFixed(0)} | ${r.served.toFixed(0)} | ${r.p50.toFixed(1)} | ${r.p99.toFixed(1)} | ${r.max.toFixed(1)} | ${r.errors} | ${r.refused} | ${r.fences} | ${(100 * r.cpu).toFixed(0)} % |`);
for (const r of rows) if (r.note) console.log(`${r.backend} ${r.vms} VMs: ${r.note}`);
