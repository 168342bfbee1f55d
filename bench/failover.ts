// bench/failover: repeated host failovers on the two-namespace testbed with real agents, real
// QEMU (TCG) and the real guest.
//   sudo bench/failover [--rounds 10] [--checkpoint-delay 2000] [--throughput-seconds 20] [--dirty-mib 16]
// Per round: wait until protected, run transactions over ONE TCP connection, SIGKILL the
// primary host's QEMU and agent, measure SIGKILL → first transaction acknowledged by the
// survivor (the guest's first externally visible progress), count lost/repeated values, then
// restart the dead host's agent and let protection rebuild onto it. Also: checkpoint pauses
// (p50/p99, from the agents) and guest throughput protected ÷ unprotected for a memory-dirtying
// guest loop ("work N" lines on the console).
import { parseArgs } from 'node:util';
import { AgentPair, other, waitUntil, type H } from '../test/helpers/pair.ts';
import { SerialWatcher, TxnClient } from '../test/helpers/traffic.ts';
import { sweepStaleTestbeds } from '../test/helpers/netns.ts';

const { values } = parseArgs({ options: {
  rounds: { type: 'string', default: '10' },
  'checkpoint-delay': { type: 'string', default: '2000' },
  'throughput-seconds': { type: 'string', default: '20' },
  'dirty-mib': { type: 'string', default: '16' },
} });
const rounds = Number(values.rounds), delay = Number(values['checkpoint-delay']);
const tputS = Number(values['throughput-seconds']), dirty = Number(values['dirty-mib']);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const q = (xs: number[], p: number) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))]! : NaN; };
const log = (m: string) => console.log(`[${new Date().toISOString().slice(11, 19)}] ${m}`);

await sweepStaleTestbeds();

// ---------------------------------------------------------------- failovers
const failoverMs: number[] = [], detectionMs: number[] = [], pauseP50: number[] = [], pauseP99: number[] = [];
let lost = 0, resets = 0, totalTxns = 0;
{
  const p = new AgentPair(41, { checkpointDelayMs: delay, vms: [{ name: 'bench', guestIp: 10, basePort: 19000 }] });
  await p.setup();
  try {
    p.startAgent('A'); p.startAgent('B');
    let primary: H = await p.waitProtected('bench');
    await p.waitGuestService('bench');
    const client = new TxnClient(p.guestIp('bench'), 7000, 10);
    await client.open();
    client.start();
    for (let r = 1; r <= rounds; r++) {
      primary = await p.waitProtected('bench', 180_000);
      await sleep(3000); // some checkpoints and transactions under protection
      const st = (await p.vmStatus(primary, 'bench'))!;
      if (st.checkpoints.pauseP50Ms !== null) { pauseP50.push(st.checkpoints.pauseP50Ms); pauseP99.push(st.checkpoints.pauseP99Ms!); }
      const before = client.txns.length;
      const killedAt = Date.now();
      p.killHost(primary);
      const survivor = other(primary);
      const first = await waitUntil(() => client.firstAckAfter(killedAt), 30_000, 'first transaction after the failover');
      const fo = first.ackAt - killedAt;
      failoverMs.push(fo);
      const sv = await waitUntil(async () => { const x = await p.vmStatus(survivor, 'bench'); return x?.lastFailover && x.lastFailover.at > killedAt ? x : undefined; }, 10_000, 'takeover record');
      if (sv.lastFailover!.detectionMs !== null) detectionMs.push(sv.lastFailover!.detectionMs);
      log(`round ${r}/${rounds}: killed ${primary}, ${survivor} serving after ${fo} ms (detection ${sv.lastFailover!.detectionMs} ms, takeover ${sv.lastFailover!.sequenceMs} ms); ${client.txns.length - before} txns this round`);
      if (client.errors.length) { resets++; break; }
      p.startAgent(primary); // the host comes back: protection is rebuilt onto it
    }
    await client.stop();
    const vals = client.txns.map((x) => x.value);
    totalTxns = vals.length;
    for (let i = 1; i < vals.length; i++) if (vals[i] !== vals[i - 1]! + 1) lost += Math.abs(vals[i]! - vals[i - 1]! - 1) || 1;
    const durable = await client.get().catch(() => NaN);
    if (!(durable >= vals.at(-1)!)) lost++;
    resets += client.errors.length;
    client.close();
  } finally {
    await p.teardown();
  }
}

// ---------------------------------------------------------------- throughput
let unprotectedRate = NaN, protectedRate = NaN;
if (tputS > 0) {
  const p = new AgentPair(42, { checkpointDelayMs: delay, startupPeerWaitMs: 1000, vms: [{ name: 'tput', guestIp: 10, basePort: 19000, extraAppend: `ftkvm.dirty_mib=${dirty}` }] });
  await p.setup();
  try {
    const rate = async (h: H) => {
      const w = new SerialWatcher(p.serialLog(h, 'tput'));
      await sleep(tputS * 1000);
      w.stop();
      const work = w.lines.flatMap((l) => { const m = /^work (\d+)$/.exec(l.line); return m ? [{ at: l.at, n: Number(m[1]) }] : []; });
      return work.length > 1 ? (work.at(-1)!.n - work[0]!.n) / ((work.at(-1)!.at - work[0]!.at) / 1000) : NaN;
    };
    p.startAgent('A'); p.startAgent('B');
    const prim = await p.waitProtected('tput', 180_000);
    await sleep(5000);
    protectedRate = await rate(prim);
    log(`throughput protected: ${protectedRate.toFixed(2)} rounds/s of ${dirty} MiB`);
    p.killHost(other(prim)); // the replica's host dies: the same guest continues unprotected
    await waitUntil(async () => (await p.vmStatus(prim, 'tput'))?.state === 'standalone' || undefined, 60_000, 'unprotected guest');
    await sleep(3000);
    unprotectedRate = await rate(prim);
    log(`throughput unprotected: ${unprotectedRate.toFixed(2)} rounds/s`);
  } finally {
    await p.teardown();
  }
}

console.log('');
console.log(`bench/failover (${new Date().toISOString().slice(0, 10)}, QEMU 7.2 TCG, checkpoint delay ${delay} ms, 256 MiB guest)`);
console.log(`failovers: ${failoverMs.length}/${rounds}   SIGKILL → first transaction served by the survivor: p50 ${q(failoverMs, 0.5)} ms  p99 ${q(failoverMs, 0.99)} ms  max ${Math.max(...failoverMs)} ms`);
console.log(`detection (last heartbeat → takeover decision): p50 ${q(detectionMs, 0.5)} ms  p99 ${q(detectionMs, 0.99)} ms`);
console.log(`transactions: ${totalTxns} acknowledged over one TCP connection, lost or repeated: ${lost}, connection resets: ${resets}`);
console.log(`checkpoint pause (primary, per round p50/p99 of recent checkpoints): p50 ${q(pauseP50, 0.5)} ms  p99 ${q(pauseP99, 0.99)} ms`);
console.log(`guest throughput protected ÷ unprotected (${dirty} MiB dirtying loop): ${(protectedRate / unprotectedRate).toFixed(2)} (${protectedRate.toFixed(2)} / ${unprotectedRate.toFixed(2)} rounds/s)`);
