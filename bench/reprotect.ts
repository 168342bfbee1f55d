// bench/reprotect: what re-protection after a failover costs at real sizes, on the netns testbed
// with real agents, real QEMU (TCG), the real guest and the embedded witness, against the
// line-rate bound of the same replication link measured in the same run.
//   sudo bench/reprotect [--disks 64,1024,8192] [--mems 128,1024,4096] [--disk-fill 0.25]
//                        [--mem-fill 0.5] [--link-mbit 1000] [--rounds 1] [--resync full|checksum]
// Sweeps disk sizes (with 256 MiB of RAM) and RAM sizes (with a 64 MiB disk). Per size: a raw
// sparse disk with --disk-fill of it random data (as a guest would have written it) and a guest
// that fills --mem-fill of its RAM with non-zero data; once protected, the primary's QEMU is
// killed (a crash: the lease is released, the peer takes over at once), and the new primary
// re-protects onto the old one. Measured: re-protection time (takeover → protected; the
// agent's own "in sync after" figure, which excludes colo.reprotect_delay_ms), bytes the new
// primary sent on the replication link, the guest's pause at the first checkpoint, and the
// line-rate bound (a plain TCP stream between the two hosts' replication addresses, through
// the same tc rate limit) → ratio = measured ÷ (bytes ÷ link rate). --resync checksum: the
// returning host's disk is digested and only differing chunks cross the link (colo.resync);
// the guest keeps writing its counters, so a few chunks differ after each failover.
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { AgentPair, other, waitUntil, type H } from '../lab/pair.ts';
import { sweepStaleTestbeds } from '../lab/netns.ts';

const { values } = parseArgs({ options: {
  disks: { type: 'string', default: '64,1024,8192' }, mems: { type: 'string', default: '128,1024,4096' },
  'disk-fill': { type: 'string', default: '0.25' }, 'mem-fill': { type: 'string', default: '0.5' },
  'link-mbit': { type: 'string', default: '1000' }, rounds: { type: 'string', default: '1' },
  resync: { type: 'string', default: 'full' },
} });
const num = (s: string) => s.split(',').filter(Boolean).map(Number);
const diskFill = Number(values['disk-fill']), memFill = Number(values['mem-fill']);
const linkMbit = Number(values['link-mbit']), rounds = Number(values.rounds);
const resync = values.resync === 'checksum' ? 'checksum' : 'full';
const log = (m: string) => console.log(`[${new Date().toISOString().slice(11, 19)}] ${m}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const VM = 'rp';

interface Row { diskMib: number; memMib: number; round: number; reprotectS: number; syncS: number | null; pauseMs: number | null; bytes: number; linkMBps: number; boundS: number; ratio: number;
  /** checksum: disk bytes whose chunks differed (what the digests decided to copy) and how long digesting took. */
  diffBytes: number | null; digestMs: number | null }

/** Bytes sent so far on host h's replication interface. */
async function txBytes(p: AgentPair, h: H): Promise<number> {
  return Number((await p.tb.exec(h, 'cat', ['/sys/class/net/eth-repl/statistics/tx_bytes'])).trim());
}

/** A plain TCP stream A → B over the replication addresses for `seconds`: the link's rate in bytes/s. */
async function linkRate(p: AgentPair, seconds = 3): Promise<number> {
  const port = 29500;
  const server = p.tb.spawnIn('B', process.execPath, ['-e', `
    const s = require('net').createServer((c) => { let n = 0; const t0 = Date.now(); c.on('data', (d) => { n += d.length; }); c.on('end', () => { console.log(JSON.stringify({ n, ms: Date.now() - t0 })); s.close(); }); });
    s.listen(${port}, '${p.tb.addr.B.repl}');`], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  server.stdout!.on('data', (d) => { out += d; });
  await sleep(500);
  await p.tb.exec('A', process.execPath, ['-e', `
    const c = require('net').connect(${port}, '${p.tb.addr.B.repl}', () => {
      const buf = Buffer.alloc(1 << 20, 7); const end = Date.now() + ${seconds * 1000};
      const pump = () => { while (Date.now() < end) { if (!c.write(buf)) { c.once('drain', pump); return; } } c.end(); };
      pump();
    });`]);
  await new Promise((r) => server.on('exit', r));
  const { n, ms } = JSON.parse(out.trim()) as { n: number; ms: number };
  return n / (ms / 1000);
}

async function one(diskMib: number, memMib: number): Promise<Row[]> {
  // The guest's kernel and initramfs need ~90 MiB: a fuller tmpfs panics it (seen at 128 MiB).
  const filled = Math.round(diskMib * diskFill), memFilled = Math.max(0, Math.min(Math.round(memMib * memFill), memMib - 96));
  const p = new AgentPair(43, {
    witness: true, leaseMs: 1000, startupPeerWaitMs: 1000, sparseDisk: { sizeMib: diskMib, filledMib: filled }, colo: { resync },
    vms: [{ name: VM, guestIp: 10, basePort: 19000, memoryMib: memMib, extraAppend: memFilled > 0 ? `ftkvm.fill_mib=${memFilled}` : undefined }],
  });
  const rows: Row[] = [];
  await p.setup();
  try {
    const rate = `${linkMbit}mbit`, burst = `${Math.max(32, Math.round(linkMbit * 10))}kbit`; // 10 ms worth
    await p.tb.rateLimitRepl(rate, burst);
    const link = await linkRate(p);
    log(`disk ${diskMib} MiB (${filled} MiB written), RAM ${memMib} MiB (${memFilled} MiB filled): link ${(link / 1e6).toFixed(1)} MB/s (tc ${rate})`);
    p.startWitness();
    p.startAgent('A'); p.startAgent('B');
    const timeout = 600_000 + diskMib * 200;
    let primary = await p.waitProtected(VM, timeout);
    await waitUntil(() => (memFilled === 0 || readFileSync(p.serialLog(primary, VM), 'utf8').includes(`FILLED ${memFilled}`)) || undefined, timeout, 'the guest filled its RAM');
    for (let r = 1; r <= rounds; r++) {
      primary = await p.waitProtected(VM, timeout);
      await sleep(3000); // checkpoints with the filled RAM
      const next = other(primary);
      p.killQemu(primary, VM);
      await waitUntil(async () => { const s = await p.vmStatus(next, VM).catch(() => null); return s && ['standalone', 'syncing'].includes(s.state) ? s : undefined; }, 30_000, `${next} took over`);
      const tTakeover = Date.now();
      const tx0 = await txBytes(p, next);
      let lastLog = 0;
      await waitUntil(async () => {
        const s = await p.vmStatus(next, VM).catch(() => null);
        if (s?.resync && Date.now() - lastLog > 5000) { lastLog = Date.now(); log(`  resync ${(s.resync.bytesDone / 2 ** 20).toFixed(0)}/${(s.resync.bytesTotal / 2 ** 20).toFixed(0)} MiB, ${(s.resync.rateBytesPerS / 1e6).toFixed(1)} MB/s, ETA ${s.resync.etaS ?? '?'} s (${s.resync.phase})`); }
        return s?.state === 'protected' && (await p.vmStatus(primary, VM).catch(() => null))?.state === 'secondary' ? s : undefined;
      }, timeout, `${next} protected again`, 200);
      const reprotectS = (Date.now() - tTakeover) / 1000;
      const bytes = (await txBytes(p, next)) - tx0;
      const lines = readFileSync(p.agentLog(next), 'utf8').split('\n').filter((l) => /in sync after/.test(l));
      const m = /in sync after ([0-9.]+) s \(.*guest paused (\d+) ms/.exec(lines.at(-1) ?? '');
      const syncS = m ? Number(m[1]) : null, pauseMs = m ? Number(m[2]) : null;
      const ck = readFileSync(p.agentLog(next), 'utf8').split('\n').filter((l) => /checksum resync: digests compared/.test(l)).at(-1) ?? '';
      const diffBytes = /plannedBytes=(\d+)/.exec(ck) ? Number(/plannedBytes=(\d+)/.exec(ck)![1]) : null;
      const digestMs = /digestMs=(\d+)/.exec(ck) ? Number(/digestMs=(\d+)/.exec(ck)![1]) : null;
      const boundS = bytes / link;
      const row = { diskMib, memMib, round: r, reprotectS, syncS, pauseMs, bytes, linkMBps: link / 1e6, boundS, ratio: (syncS ?? reprotectS) / boundS, diffBytes: resync === 'checksum' ? diffBytes : null, digestMs: resync === 'checksum' ? digestMs : null };
      rows.push(row);
      log(`  round ${r}: ${next} re-protected in ${reprotectS.toFixed(1)} s (resync + first checkpoint ${syncS ?? '?'} s, guest paused ${pauseMs ?? '?'} ms), ${(bytes / 2 ** 20).toFixed(0)} MiB sent, line-rate bound ${boundS.toFixed(1)} s, ratio ${row.ratio.toFixed(2)}`);
    }
  } finally {
    await p.tb.rateLimitRepl(null).catch(() => undefined);
    await p.teardown();
  }
  return rows;
}

await sweepStaleTestbeds();
const all: Row[] = [];
const t0 = Date.now();
for (const d of num(values.disks!)) all.push(...await one(d, 256));
for (const m of num(values.mems!)) all.push(...await one(64, m));
console.log(`\nbench/reprotect (${new Date().toISOString().slice(0, 10)}, QEMU 7.2 TCG, 2 cores, both hosts on one machine, replication link tc-limited to ${linkMbit} Mbit/s, ` +
  `${resync === 'full' ? 'full copy (drive-mirror)' : 'checksum resync (digests, differing chunks, then the writes since)'} + first COLO checkpoint, embedded witness, ${((Date.now() - t0) / 60000).toFixed(1)} min)`);
console.log('| disk MiB (written) | RAM MiB (filled) | re-protected after takeover s | resync + first checkpoint s | guest paused ms | MiB sent | link MB/s | line-rate bound s | ratio | disk chunks differing (checksum) | digest s |');
console.log('|---|---|---|---|---|---|---|---|---|---|---|');
for (const r of all) {
  console.log(`| ${r.diskMib} (${Math.round(r.diskMib * diskFill)}) | ${r.memMib} (${Math.max(0, Math.min(Math.round(r.memMib * memFill), r.memMib - 96))}) | ${r.reprotectS.toFixed(1)} | ${r.syncS ?? '?'} | ${r.pauseMs ?? '?'} | ${(r.bytes / 2 ** 20).toFixed(0)} | ${r.linkMBps.toFixed(1)} | ${r.boundS.toFixed(1)} | ${r.ratio.toFixed(2)} | ${r.diffBytes === null ? '-' : `${(r.diffBytes / 2 ** 20).toFixed(2)} MiB (${(100 * r.diffBytes / (r.diskMib * 2 ** 20)).toFixed(2)} %)`} | ${r.digestMs === null ? '-' : (r.digestMs / 1000).toFixed(1)} |`);
}
