// bench/dr: what the DR tier achieves, on the netns testbed with real agents, real QEMU (TCG),
// the real guest writing to its disk, the embedded witness and `ftkvm-agent dr-target` on a
// third host (netns D).
//   sudo bench/dr [--intervals 5,15,30] [--write-mib-s 1] [--span-mib 64] [--duration-s 60]
//                 [--disk-mib 256] [--bandwidth-mbit 200]
// Per interval: a protected pair ships recovery points every `interval` while the guest writes
// --write-mib-s MiB/s of random data over --span-mib MiB of its disk (64 KiB blocks at random
// places). Measured over --duration-s: the achieved RPO (age of the newest point's data,
// sampled every second from the primary's status), bytes shipped per point against bytes the
// guest wrote in that interval (QEMU's own count, query-blockstats), and at the end the RTO of
// a DR failover after both pair hosts are killed (request → the guest answers at the DR site).
import { parseArgs } from 'node:util';
import { join } from 'node:path';
import { AgentPair, waitUntil, type H } from '../lab/pair.ts';
import { sweepStaleTestbeds } from '../lab/netns.ts';
import { QmpClient } from '../agent/src/qmp/client.ts';
import { unixSocketConnector } from '../agent/src/qmp/transport.ts';
import type { VmPoints } from '../agent/src/dr/protocol.ts';
import type { ActivateReport } from '../agent/src/dr/target.ts';

const { values } = parseArgs({ options: {
  intervals: { type: 'string', default: '5,15,30' }, 'write-mib-s': { type: 'string', default: '1' }, 'span-mib': { type: 'string', default: '64' },
  'duration-s': { type: 'string', default: '60' }, 'disk-mib': { type: 'string', default: '256' }, 'bandwidth-mbit': { type: 'string', default: '200' },
} });
const intervals = values.intervals!.split(',').filter(Boolean).map(Number);
const writeMibS = Number(values['write-mib-s']), spanMib = Number(values['span-mib']), durationS = Number(values['duration-s']);
const diskMib = Number(values['disk-mib']), bandwidth = Number(values['bandwidth-mbit']);
const log = (m: string) => console.log(`[${new Date().toISOString().slice(11, 19)}] ${m}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const VM = 'drb';
const pct = (xs: number[], q: number) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))]! : NaN; };

interface Row { intervalS: number; points: number; rpoP50: number; rpoMax: number; shippedPerPoint: number; writtenPerInterval: number; modes: string; rtoMs: number; rpoAtFailoverS: number }

async function written(p: AgentPair, h: H): Promise<number> {
  const q = await QmpClient.connect(unixSocketConnector(join(p.stateDir(h), 'vms', VM, 'qmp-observer.sock'), 1000), { handshakeTimeoutMs: 2000, commandTimeoutMs: 5000 });
  try {
    const st = await q.execute<{ device: string; stats: { wr_bytes: number } }[]>('query-blockstats');
    return st.find((s) => s.device === 'colo-disk0')?.stats.wr_bytes ?? 0;
  } finally { q.close(); }
}

async function one(intervalS: number): Promise<Row> {
  const p = new AgentPair(44, {
    witness: true, leaseMs: 1000, startupPeerWaitMs: 1000, sparseDisk: { sizeMib: diskMib, filledMib: 0 },
    dr: { intervalS, keep: 4, bandwidthMbit: bandwidth },
    vms: [{ name: VM, guestIp: 10, basePort: 19000, extraAppend: `ftkvm.disk_kib_s=${Math.round(writeMibS * 1024)} ftkvm.disk_span_mib=${spanMib}` }],
  });
  await p.setup();
  try {
    p.startWitness(); p.startDrTarget();
    p.startAgent('A'); p.startAgent('B');
    const prim = await p.waitProtected(VM, 300_000);
    await p.waitGuestService(VM);
    const points = async () => (await p.drCall<VmPoints>('GET', `/v1/dr/vms/${VM}`)).json.points;
    // Start measuring once a point of the writing guest exists.
    const t0 = Date.now();
    await waitUntil(async () => (await points()).some((x) => x.capturedAt > t0) || undefined, 300_000, 'a first point', 500);
    const w0 = await written(p, prim), m0 = Date.now();
    const rpo: number[] = [];
    while (Date.now() - m0 < durationS * 1000) {
      const s = await p.vmStatus(prim, VM);
      if (s?.dr?.rpoS !== null && s?.dr?.rpoS !== undefined) rpo.push(s.dr.rpoS);
      if (rpo.length % 10 === 0) log(`  interval ${intervalS} s: RPO now ${s?.dr?.rpoS ?? '?'} s, ${s?.dr?.bytesShippedTotal ?? 0} bytes shipped in all`);
      await sleep(1000);
    }
    const w1 = await written(p, prim), m1 = Date.now();
    const during = (await points()).filter((x) => x.capturedAt >= m0 && x.capturedAt <= m1);
    const shipped = during.reduce((s, x) => s + x.bytesShipped, 0);
    const writtenPerInterval = (w1 - w0) / ((m1 - m0) / 1000) * intervalS;
    // The primary site is lost: both hosts killed, the VM activated at the DR site.
    await waitUntil(async () => (await points()).some((x) => x.capturedAt > m1) || undefined, 120_000, 'one more point', 500);
    const lost = Date.now();
    p.killHost('A'); p.killHost('B');
    const newest = (await points()).at(-1)!;
    const a = (await p.drCall<ActivateReport>('POST', `/v1/dr/vms/${VM}/activate`, { timeoutS: 300 }, 400_000)).json;
    const row: Row = {
      intervalS, points: during.length, rpoP50: pct(rpo, 0.5), rpoMax: Math.max(...rpo),
      shippedPerPoint: during.length ? shipped / during.length : 0, writtenPerInterval,
      modes: [...new Set(during.map((x) => x.mode))].join('+'), rtoMs: a.rtoMs, rpoAtFailoverS: (lost - newest.capturedAt) / 1000,
    };
    log(`interval ${intervalS} s: ${row.points} points, RPO p50 ${row.rpoP50} s max ${row.rpoMax} s; shipped ${(row.shippedPerPoint / 2 ** 20).toFixed(2)} MiB/point vs guest wrote ${(row.writtenPerInterval / 2 ** 20).toFixed(2)} MiB/interval; DR failover RTO ${a.rtoMs} ms from a point ${row.rpoAtFailoverS.toFixed(1)} s old`);
    return row;
  } finally { await p.teardown(); }
}

await sweepStaleTestbeds();
const rows: Row[] = [];
const t0 = Date.now();
for (const i of intervals) rows.push(await one(i));
console.log(`\nbench/dr (${new Date().toISOString().slice(0, 10)}, QEMU 7.2 TCG, 2 cores, pair + DR host as netns on one machine, ${diskMib} MiB disk, guest writing ${writeMibS} MiB/s over ${spanMib} MiB, DR bandwidth cap ${bandwidth} Mbit/s, ${durationS} s per interval, ${((Date.now() - t0) / 60000).toFixed(1)} min)`);
console.log('| interval s | points | RPO p50 s | RPO max s | shipped MiB/point | guest wrote MiB/interval | shipped ÷ written | modes | RTO ms (DR failover) | data age at site loss s |');
console.log('|---|---|---|---|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(`| ${r.intervalS} | ${r.points} | ${r.rpoP50} | ${r.rpoMax} | ${(r.shippedPerPoint / 2 ** 20).toFixed(2)} | ${(r.writtenPerInterval / 2 ** 20).toFixed(2)} | ${(r.shippedPerPoint / r.writtenPerInterval).toFixed(2)} | ${r.modes} | ${r.rtoMs} | ${r.rpoAtFailoverS.toFixed(1)} |`);
}
