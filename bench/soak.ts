// bench/soak: hundreds of failovers back to back on the real pair (netns testbed, real agents,
// real QEMU under TCG, the real guest), under CPU pressure, with clients that judge every one.
//   sudo bench/soak [--failovers 300] [--kinds crash,host,switchover] [--witness off,on]
//                   [--stress-load 60] [--silent-ms 15000] [--evidence DIR] [--seed 1] [--lease-ms 2000]
// Kinds, taken in turn:
//   crash       SIGKILL of the primary's QEMU (a drill without the API): its agent tells the peer
//   host        the primary host dies: SIGKILL of its agent and QEMU AND every link of the host cut
//               (nft), so nothing of it answers; healed and its agent restarted after the takeover
//   switchover  planned: POST /v1/vms/soak/switchover
//   drill       POST /v1/vms/soak/drill: a QEMU crash judged by the agent's own probe, a client
//               on the old primary's host (as the demo and drill.yml do); a failed verdict is
//               a silent client too
// Clients, all the time: ONE long-lived connection sending "inc" back to back, and a client that
// opens a fresh connection for every "inc". Both increment the guest's one durable counter, so
// every acknowledged value must be unique (a lost acknowledged transaction shows up as a value
// acknowledged twice) and increase per client; the final durable value must be >= every ack.
// Per failover: time from the fault to the long-lived client's first reply, connection kept,
// fresh-connection failures, re-protection time, COLO exits the soak did not cause.
// A "silent client" (no reply for --silent-ms) saves evidence to DIR/<n>-<kind>/: packet captures
// on both hosts (all interfaces, port 7000 and ARP) and of the client, both QEMUs' state, the
// guest's own TCP view (console "tcpview" lines), bridge FDBs and neighbours, agent and QEMU logs.
import { parseArgs } from 'node:util';
import { connect } from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { AgentPair, other, waitUntil, type H } from '../lab/pair.ts';
import { TxnClient } from '../lab/traffic.ts';
import { sweepStaleTestbeds } from '../lab/netns.ts';

type Kind = 'crash' | 'host' | 'switchover' | 'drill';
const { values } = parseArgs({ options: {
  failovers: { type: 'string', default: '300' },
  kinds: { type: 'string', default: 'crash,host,switchover,drill' },
  witness: { type: 'string', default: 'off,on' },
  'stress-load': { type: 'string', default: '60' },
  'silent-ms': { type: 'string', default: '15000' },
  'checkpoint-delay': { type: 'string', default: '2000' },
  'lease-ms': { type: 'string', default: '2000' },
  evidence: { type: 'string', default: '/tmp/ftkvm-soak' },
  seed: { type: 'string', default: '1' },
} });
const total = Number(values.failovers);
const kinds = values.kinds.split(',') as Kind[];
const modes = values.witness.split(',').map((w) => w === 'on');
const stressLoad = Number(values['stress-load']);
const silentMs = Number(values['silent-ms']);
const evidenceRoot = values.evidence;
let seed = Number(values.seed) >>> 0 || 1;
const rand = () => { seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0; return seed / 2 ** 32; };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const q = (xs: number[], p: number) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))]! : NaN; };
const t0All = Date.now();
const stamp = () => new Date().toISOString().slice(11, 19);
const log = (m: string) => console.log(`[${stamp()}] ${m}`);
const VM = 'soak';

/** "inc" on a fresh TCP connection every gapMs; each connection carries exactly one transaction. */
class FreshClient {
  readonly acks: { at: number; value: number }[] = [];
  readonly failures: { at: number; error: string }[] = [];
  private running = false;
  private loop: Promise<void> | undefined;
  constructor(readonly host: string, readonly gapMs = 250, readonly timeoutMs = 20_000) {}
  private once(): Promise<number> {
    return new Promise((resolve, reject) => {
      const s = connect({ host: this.host, port: 7000 });
      let buf = '';
      const timer = setTimeout(() => { s.destroy(); reject(new Error(`no reply within ${this.timeoutMs} ms`)); }, this.timeoutMs);
      s.setEncoding('utf8');
      s.on('connect', () => s.write('inc\n'));
      s.on('data', (d: string) => { buf += d; const i = buf.indexOf('\n'); if (i >= 0) { clearTimeout(timer); s.end(); resolve(Number(buf.slice(0, i).trim())); } });
      s.on('error', (e) => { clearTimeout(timer); reject(e); });
    });
  }
  start(): void {
    this.running = true;
    this.loop = (async () => {
      while (this.running) {
        try { this.acks.push({ value: await this.once(), at: Date.now() }); } catch (e) { this.failures.push({ at: Date.now(), error: (e as Error).message }); }
        await sleep(this.gapMs);
      }
    })();
  }
  async stop(): Promise<void> { this.running = false; await this.loop; }
}

/** tcpdump rings in both host namespaces and on the client's interface, kept for evidence. */
class Captures {
  private procs: ChildProcess[] = [];
  constructor(private readonly p: AgentPair, private readonly dir: string) {}
  start(): void {
    mkdirSync(this.dir, { recursive: true });
    const filter = ['tcp', 'port', '7000', 'or', 'arp'];
    const ring = (name: string) => ['-Z', 'root', '-nn', '-U', '-s', '200', '-C', '20', '-W', '2', '-w', join(this.dir, `${name}.pcap`)];
    for (const h of ['A', 'B'] as H[]) this.procs.push(this.p.tb.spawnIn(h, 'tcpdump', ['-i', 'any', ...ring(`host${h}`), ...filter], { stdio: 'ignore' }));
    this.procs.push(spawn('tcpdump', ['-i', `ftc${this.p.tb.i}l`, ...ring('client'), ...filter], { stdio: 'ignore' }));
  }
  async stop(): Promise<void> { for (const c of this.procs) c.kill('SIGINT'); this.procs = []; await sleep(300); }
}

interface FailoverRecord { n: number; kind: Kind; witness: boolean; from: H; firstReplyMs: number | null; reprotectMs: number | null; kept: boolean; freshFailures: number; silent: boolean; note: string }
const records: FailoverRecord[] = [];
let fences = 0;
let unexplainedColoExits = 0, sickReplicas = 0, duplicates = 0, orderViolations = 0, finalShort = 0;
const unexplained: string[] = [];

async function saveEvidence(p: AgentPair, caps: Captures, capDir: string, n: number, kind: Kind, extra: string): Promise<string> {
  const dir = join(evidenceRoot, `${String(n).padStart(3, '0')}-${kind}`);
  mkdirSync(dir, { recursive: true });
  const parts: string[] = [extra];
  for (const h of ['A', 'B'] as H[]) {
    parts.push(await p.inspect(h, VM));
    for (const [what, cmd, args] of [['fdb', 'bridge', ['fdb', 'show', 'br', 'br0']], ['neigh', 'ip', ['neigh']], ['links', 'ip', ['-br', 'link']]] as const) {
      parts.push(`--- ${h} ${what}\n${await p.tb.exec(h, cmd, [...args]).catch((e) => String(e))}`);
    }
    for (const f of ['agent.log']) if (existsSync(join(p.hostDir(h), f))) cpSync(join(p.hostDir(h), f), join(dir, `${h}-${f}`));
    for (const f of ['qemu.log', 'serial.log']) {
      const src = join(p.stateDir(h), 'vms', VM, f);
      if (existsSync(src)) cpSync(src, join(dir, `${h}-${f}`));
    }
  }
  writeFileSync(join(dir, 'state.txt'), parts.join('\n\n'));
  await caps.stop();
  cpSync(capDir, join(dir, 'pcap'), { recursive: true });
  caps.start();
  return dir;
}

/** COLO exits and sick replicas in the agents' logs since the last look (not caused by the soak's faults). */
function scanLogs(p: AgentPair, offsets: { A: number; B: number }, why: string): void {
  for (const h of ['A', 'B'] as H[]) {
    let text = '';
    try { text = readFileSync(p.agentLog(h), 'utf8'); } catch { continue; }
    const fresh = text.slice(offsets[h as 'A' | 'B']);
    offsets[h as 'A' | 'B'] = text.length;
    for (const line of fresh.split('\n')) {
      if (/decision: drop-secondary .*COLO ended in QEMU/.test(line)) { unexplainedColoExits++; unexplained.push(`${why} ${h}: ${line.slice(0, 300)}`); }
      if (/secondary marked sick|checkpoint storm|no checkpoint for|secondary not trusted/.test(line)) { sickReplicas++; unexplained.push(`${why} ${h}: ${line.slice(0, 300)}`); }
      // No fault of the soak isolates a live primary (a killed host's agent cannot fence): every
      // fence is a false one, e.g. a survivor whose lease renewal was answered too late.
      if (/FENCED:/.test(line)) { fences++; unexplained.push(`${why} ${h}: ${line.slice(0, 300)}`); }
    }
  }
}

let acknowledged = 0;
/** One guest's history (a pair's lifetime): every acknowledged value once, each client's values increasing, durable >= every ack. */
function judge(longs: number[][], fresh: FreshClient, durable: number): void {
  const seen = new Set<number>();
  for (const v of [...longs.flat(), ...fresh.acks.map((a) => a.value)]) { if (seen.has(v)) duplicates++; seen.add(v); }
  for (const vs of [...longs, fresh.acks.map((a) => a.value)]) for (let k = 1; k < vs.length; k++) if (!(vs[k]! > vs[k - 1]!)) orderViolations++;
  if (!Number.isNaN(durable) && seen.size && !(durable >= Math.max(...seen))) finalShort++;
  acknowledged += seen.size;
}

async function pairUp(index: number, witness: boolean): Promise<{ p: AgentPair; primary: H }> {
  const p = new AgentPair(index, {
    witness, checkpointDelayMs: Number(values['checkpoint-delay']), leaseMs: Number(values['lease-ms']),
    // The drill's probe must not check the counter: the soak's own clients increment it too.
    vms: [{ name: VM, guestIp: 10, basePort: 19000, extraAppend: 'ftkvm.tcpview_s=1', probe: { request: 'inc', counter: false } }],
  });
  await p.setup();
  if (witness) p.startWitness();
  p.startAgent('A'); p.startAgent('B');
  const primary = await p.waitProtected(VM, 180_000);
  await p.waitGuestService(VM);
  return { p, primary };
}

interface OpReport { state: string; reasons: string[]; progress: { at: number; msg: string }[]; probe?: { firstReplyAfterMs?: number | null } }
const drillVerdicts: { n: number; report: OpReport }[] = [];

/**
 * Opens the long-lived connection and waits until a checkpoint has taken it into the replica:
 * the product's promise is for connections older than a checkpoint at a failover (README,
 * Limits; QEMU keeps the sequence translation of a younger one only on the host that took
 * over). Connections opened right before failovers are the fresh client's part.
 */
async function openLong(p: AgentPair, c: TxnClient, timeoutMs = 30_000): Promise<void> {
  const openedAt = Date.now();
  await c.open(timeoutMs);
  c.start();
  await p.waitCheckpointAfter(VM, openedAt);
}

/** Injects the fault; returns when the primary's QEMU died (wall clock, ms) and, for API kinds, the operation's poll path. */
async function fault(p: AgentPair, kind: Kind, primary: H): Promise<{ at: number; op?: string }> {
  const at = Date.now();
  if (kind === 'crash') { p.killQemu(primary, VM); return { at }; }
  if (kind === 'host') { p.killHost(primary); await p.tb.isolate(primary); return { at }; }
  const r = await p.api<{ id: string; poll: string }>(primary, 'POST', `/v1/vms/${VM}/${kind}`, {});
  if (r.status !== 202) throw new Error(`${kind} refused: ${r.status} ${JSON.stringify(r.json)}`);
  const killed = await waitUntil(async () => {
    const rep = await p.api<OpReport>(primary, 'GET', r.json.poll).catch(() => null);
    return rep?.json.progress.find((x) => x.msg.startsWith('killing the primary'));
  }, 60_000, `the ${kind} to kill the primary QEMU`, 20);
  return { at: killed.at, op: r.json.poll };
}

/** Protected again with `survivor` as the primary. */
async function protectedOn(p: AgentPair, survivor: H, timeoutMs: number): Promise<void> {
  await waitUntil(async () => {
    const [s, o] = await Promise.all([p.vmStatus(survivor, VM), p.vmStatus(other(survivor), VM)]);
    return s?.state === 'protected' && o?.state === 'secondary' && (o.checkpoints.count ?? 0) > 0;
  }, timeoutMs, `${VM} protected with host${survivor} primary`, 50);
}

async function soak(witness: boolean, count: number, index: number): Promise<void> {
  const mode = witness ? 'witness' : 'two-node';
  const capDir = join(evidenceRoot, `capture-${mode}`);
  rmSync(capDir, { recursive: true, force: true });
  let { p, primary } = await pairUp(index, witness);
  const caps = new Captures(p, capDir);
  caps.start();
  const offsets = { A: 0, B: 0 };
  let long = new TxnClient(p.guestIp(VM), 7000, 20);
  await openLong(p, long);
  const fresh = new FreshClient(p.guestIp(VM));
  fresh.start();
  const allLong: number[][] = [];
  try {
    for (let i = 1; i <= count; i++) {
      const kind = kinds[(i - 1) % kinds.length]!;
      const n = records.length + 1;
      await sleep(1000 + Math.floor(rand() * 3000)); // traffic under protection, 1-4 s
      scanLogs(p, offsets, `before failover ${n}`);
      const freshBefore = fresh.failures.length;
      const { at, op } = await fault(p, kind, primary);
      const survivor = other(primary);
      let firstReplyMs: number | null = null, silent = false, note = '';
      try {
        const first = await waitUntil(() => long.firstAckAfter(at), silentMs, 'first reply', 10);
        firstReplyMs = first.ackAt - at;
      } catch {
        silent = true;
        const dir = await saveEvidence(p, caps, capDir, n, kind, `failover ${n} (${kind}, ${mode}): no reply on the long-lived connection for ${silentMs} ms; last ack ${long.txns.at(-1)?.value} at -${at - (long.txns.at(-1)?.ackAt ?? at)} ms; client errors ${JSON.stringify(long.errors)}`);
        note = `SILENT, evidence in ${dir}`;
        log(`failover ${n}: ${note}`);
      }
      if (kind === 'host') {
        await sleep(500);
        await p.tb.rejoin(primary);
        p.startAgent(primary);
      }
      let reprotectMs: number | null = null;
      try {
        await protectedOn(p, survivor, 120_000);
        reprotectMs = Date.now() - at;
        primary = survivor;
      } catch (e) { note += ` not re-protected: ${(e as Error).message}`; primary = (await p.waitProtected(VM, 1000).catch(() => primary)); }
      if (op) {
        const rep = await waitUntil(async () => { const x = await p.api<OpReport>(other(survivor), 'GET', op).catch(() => null); return x && x.json.state !== 'running' ? x.json : undefined; }, 120_000, `the ${kind} report`).catch(() => null);
        if (kind === 'drill' && rep) {
          drillVerdicts.push({ n, report: rep });
          if (rep.state !== 'passed') {
            silent = true;
            const dir = await saveEvidence(p, caps, capDir, n, kind, `failover ${n} (drill, ${mode}): verdict ${rep.state}: ${rep.reasons.join('; ')}\n${JSON.stringify(rep, null, 1)}`);
            note += ` DRILL ${rep.state}: ${rep.reasons.join('; ')} (evidence in ${dir})`;
          }
        }
      }
      const kept = long.errors.length === 0;
      records.push({ n, kind, witness, from: other(survivor), firstReplyMs, reprotectMs, kept, freshFailures: fresh.failures.length - freshBefore, silent, note });
      log(`failover ${n}/${total} ${kind.padEnd(10)} ${mode}: first reply ${firstReplyMs ?? '-'} ms, protected again ${reprotectMs ?? '-'} ms, ` +
        `connection ${kept ? 'kept' : 'LOST'}, fresh failures ${fresh.failures.length - freshBefore}${note ? ', ' + note : ''}`);
      scanLogs(p, offsets, `failover ${n}`);
      if (!kept || silent || reprotectMs === null) {
        // Start a new long-lived client (and, if the guest no longer answers, a new pair).
        allLong.push(long.txns.map((x) => x.value));
        long.close();
        long = new TxnClient(p.guestIp(VM), 7000, 20);
        try {
          if (reprotectMs === null) throw new Error('not protected');
          await openLong(p, long, 20_000);
        } catch {
          log(`guest unreachable: rebuilding the pair (the old one's files: ${join(evidenceRoot, `pair-${n}`)})`);
          await fresh.stop(); await caps.stop(); await p.teardown();
          judge(allLong, fresh, NaN);
          allLong.length = 0; fresh.acks.length = 0;
          rmSync(join(evidenceRoot, `pair-${n}`), { recursive: true, force: true });
          renameSync(p.dir, join(evidenceRoot, `pair-${n}`));
          ({ p, primary } = await pairUp(index, witness));
          caps.start();
          long = new TxnClient(p.guestIp(VM), 7000, 20); await openLong(p, long);
          fresh.start();
        }
      }
    }
  } finally {
    await long.stop();
    await fresh.stop();
    allLong.push(long.txns.map((x) => x.value));
    const durable = await long.get().catch(() => NaN);
    long.close();
    await caps.stop();
    judge(allLong, fresh, durable);
    // The lease fencer's freezes (its own log): none of the soak's faults leaves a live primary
    // without its agent, so each is a false one too.
    for (const h of ['A', 'B'] as H[]) {
      let text = '';
      try { text = readFileSync(join(p.stateDir(h), 'fencer.log'), 'utf8'); } catch { continue; }
      for (const line of text.split('\n').filter((l) => /FROZE/.test(l))) { fences++; unexplained.push(`fencer ${h}: ${line.slice(0, 300)}`); }
    }
    log(`${mode}: ${acknowledged} acknowledged transactions so far, duplicates ${duplicates}, order violations ${orderViolations}`);
    await p.teardown();
  }
}

await sweepStaleTestbeds();
mkdirSync(evidenceRoot, { recursive: true });
let stress: ChildProcess | undefined;
if (stressLoad > 0) {
  stress = spawn('stress-ng', ['--cpu', '2', '--cpu-load', String(stressLoad), '--quiet'], { stdio: 'ignore' });
  log(`CPU pressure: stress-ng --cpu 2 --cpu-load ${stressLoad}`);
}
try {
  const per = Math.ceil(total / modes.length);
  for (const [k, w] of modes.entries()) await soak(w, Math.min(per, total - k * per), 45 + k);
} finally {
  stress?.kill('SIGTERM');
}

const lines: string[] = [];
lines.push(`bench/soak (${new Date().toISOString().slice(0, 10)}, QEMU 7.2 TCG, 2 cores, checkpoint delay ${values['checkpoint-delay']} ms, witness lease ${values['lease-ms']} ms, 256 MiB guest, ` +
  `CPU pressure ${stressLoad ? `stress-ng --cpu 2 --cpu-load ${stressLoad}` : 'none'}, ${((Date.now() - t0All) / 60000).toFixed(1)} min)`);
lines.push('| kind | witness | failovers | silent | connection lost | fresh failures | first reply p50 / p99 / max (ms) | re-protected p50 / p99 (ms) |');
lines.push('|---|---|---|---|---|---|---|---|');
for (const kind of kinds) {
  for (const w of modes) {
    const rs = records.filter((r) => r.kind === kind && r.witness === w);
    if (!rs.length) continue;
    const fr = rs.flatMap((r) => (r.firstReplyMs === null ? [] : [r.firstReplyMs]));
    const rp = rs.flatMap((r) => (r.reprotectMs === null ? [] : [r.reprotectMs]));
    lines.push(`| ${kind} | ${w ? 'yes' : 'no'} | ${rs.length} | ${rs.filter((r) => r.silent).length} | ${rs.filter((r) => !r.kept).length} | ${rs.reduce((s, r) => s + r.freshFailures, 0)} | ` +
      `${q(fr, 0.5)} / ${q(fr, 0.99)} / ${fr.length ? Math.max(...fr) : NaN} | ${q(rp, 0.5)} / ${q(rp, 0.99)} |`);
  }
}
lines.push(`failovers ${records.length}; silent clients ${records.filter((r) => r.silent).length}; acknowledged values seen twice ${duplicates}; ` +
  `per-client order violations ${orderViolations}; durable counter short of an ack ${finalShort}; COLO exits not caused by a fault ${unexplainedColoExits}; replicas dropped as sick/stalled ${sickReplicas}; false fences ${fences}`);
for (const u of unexplained) lines.push(`  ${u}`);
console.log('\n' + lines.join('\n'));
writeFileSync(join(evidenceRoot, 'summary.md'), lines.join('\n') + '\n' + records.map((r) => JSON.stringify(r)).join('\n') + '\n');
