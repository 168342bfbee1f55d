// bench/witness: lease renewals against the embedded witness (`ftkvm-agent witness`, the built
// binary, its own process on loopback), the way agents renew: one renewal per VM every
// lease_ms/5, open loop (sent on schedule whether or not earlier ones returned).
//   bench/witness [--vms 10,100,1000,5000] [--seconds 20] [--lease-ms 1000] [--binary dist/ftkvm-agent]
// Prints per fleet size: offered and served renewals/s, latency p50/p99/max, errors and
// refusals, the witness's CPU (of one core) and its durable writes; then a table.
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, statSync } from 'node:fs';
import { tmpdir, cpus } from 'node:os';
import { join } from 'node:path';
import { Agent, request } from 'undici';

const { values } = parseArgs({ options: {
  vms: { type: 'string', default: '10,100,1000,5000' }, seconds: { type: 'string', default: '20' },
  'lease-ms': { type: 'string', default: '1000' }, binary: { type: 'string', default: 'dist/ftkvm-agent' },
} });
const sizes = values.vms!.split(',').map(Number);
const seconds = Number(values.seconds), leaseMs = Number(values['lease-ms']);
const renewMs = Math.max(50, Math.floor(leaseMs / 5));
const TOKEN = 'b'.repeat(32);
const ticksPerS = 100;
const cpuMs = (pid: number) => { const f = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' '); return ((Number(f[11]) + Number(f[12])) * 1000) / ticksPerS; };

interface Row { vms: number; offered: number; served: number; p50: number; p99: number; max: number; errors: number; refused: number; cpu: number; fileBytes: number }

async function run(n: number, port: number): Promise<Row> {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-bench-witness-'));
  writeFileSync(join(dir, 'token'), TOKEN, { mode: 0o600 });
  const w = spawn(values.binary!, ['witness', '--listen', `127.0.0.1:${port}`, '--data-dir', dir, '--token-file', join(dir, 'token')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  w.stderr.on('data', (d) => { stderr += d; });
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    try { const r = await request(`${base}/health`); await r.body.dump(); break; } catch { if (i > 100) throw new Error(`witness did not start: ${stderr}`); await new Promise((r) => setTimeout(r, 50)); }
  }
  const dispatcher = new Agent({ connections: 256, keepAliveTimeout: 30_000 });
  const acquire = (vm: number, node: string) => request(`${base}/v1/leases/vm${vm}/acquire`, {
    method: 'POST', dispatcher, headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ node, epoch: 1, leaseMs }), headersTimeout: 10_000, bodyTimeout: 10_000,
  });
  // Every VM's lease first (the grants: written durably), then the renewals measured.
  for (let i = 0; i < n; i += 200) await Promise.all(Array.from({ length: Math.min(200, n - i) }, async (_, k) => { const r = await acquire(i + k, i + k < n / 2 ? 'hosta' : 'hostb'); await r.body.dump(); }));
  const lat: number[] = [];
  let errors = 0, refused = 0, offered = 0;
  const cpu0 = cpuMs(w.pid!);
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  const pending: Promise<void>[] = [];
  await new Promise<void>((done) => {
    // VM i renews at t0 + i*renewMs/n + k*renewMs: spread evenly, as independent agents would.
    let k = 0;
    const tick = () => {
      const now = performance.now();
      if (now >= end) { done(); return; }
      const due = Math.floor(((now - t0) / renewMs) * n);
      while (k < due) {
        const vm = k % n; k++; offered++;
        const s = performance.now();
        pending.push(acquire(vm, vm < n / 2 ? 'hosta' : 'hostb').then(async (r) => {
          await r.body.dump();
          if (r.statusCode === 200) lat.push(performance.now() - s); else refused++;
        }, () => { errors++; }));
      }
      setTimeout(tick, 1);
    };
    tick();
  });
  await Promise.all(pending);
  const wall = (performance.now() - t0) / 1000;
  const cpu = (cpuMs(w.pid!) - cpu0) / (wall * 1000);
  w.kill('SIGTERM');
  await dispatcher.close();
  lat.sort((a, b) => a - b);
  const q = (p: number) => lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))]! : NaN;
  const row = { vms: n, offered: offered / seconds, served: lat.length / wall, p50: q(0.5), p99: q(0.99), max: lat.at(-1) ?? NaN, errors, refused, cpu, fileBytes: statSync(join(dir, 'leases.json')).size };
  console.log(`${n} VMs: offered ${row.offered.toFixed(0)}/s, served ${row.served.toFixed(0)}/s (${(100 * row.served / row.offered).toFixed(1)} %), ` +
    `latency p50 ${row.p50.toFixed(1)} ms p99 ${row.p99.toFixed(1)} ms max ${row.max.toFixed(1)} ms, errors ${errors}, refused ${refused}, witness CPU ${(100 * cpu).toFixed(0)} % of a core, leases.json ${row.fileBytes} B`);
  return row;
}

console.log(`bench/witness: ${values.binary} witness on 127.0.0.1, lease ${leaseMs} ms, one renewal per VM every ${renewMs} ms for ${seconds} s; ${cpus().length} cores (${cpus()[0]?.model}); ${new Date().toISOString()}`);
const rows: Row[] = [];
let port = 27400;
for (const n of sizes) rows.push(await run(n, port++));
console.log('\n| VMs | renewals offered/s | served/s | p50 ms | p99 ms | max ms | errors | witness CPU |\n|---|---|---|---|---|---|---|---|');
for (const r of rows) console.log(`| ${r.vms} | ${r.offered.toFixed(0)} | ${r.served.toFixed(0)} | ${r.p50.toFixed(1)} | ${r.p99.toFixed(1)} | ${r.max.toFixed(1)} | ${r.errors} | ${(100 * r.cpu).toFixed(0)} % |`);
