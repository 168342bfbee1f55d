// One simulated run: two agents, the witness, the network, QEMU models and a client, in
// virtual time (@sinonjs/fake-timers drives every timer; nothing real is awaited). A seed
// chooses the fault schedule and every latency, so (seed, faults) replays exactly. The
// invariants are checked after every event.
import FakeTimers from '@sinonjs/fake-timers';
import { Prng } from './prng.ts';
import { Net, type HostId, type NetId } from './net.ts';
import { SimWitness } from './witness.ts';
import { SimAgent, VM, other, type SimHost, type SimWorldPorts } from './agent.ts';
import type { QemuEnv, SimQemu } from './qemu.ts';
import { SimFencer } from './fencer.ts';
import { installProcesses, outside, type SimProcess } from './process.ts';

export const FAULT_KINDS = [
  'partition', 'cut-repl', 'cut-mgmt', 'cut-witness-A', 'cut-witness-B', 'one-way', 'isolate-A', 'isolate-B',
  'witness-crash', 'witness-slow', 'qemu-crash-A', 'qemu-crash-B', 'agent-crash-A', 'agent-crash-B',
  'host-crash-A', 'host-crash-B', 'loss', 'dup-reorder', 'replay', 'write-fail-A', 'write-fail-B',
  'qemu-wedge-A', 'qemu-wedge-B', 'replica-sick-A', 'replica-sick-B', 'takeover-fails-A', 'takeover-fails-B',
  'agent-hang-A', 'agent-hang-B', 'clock-step-A', 'clock-step-B',
] as const;
export type FaultKind = typeof FAULT_KINDS[number];
export interface Fault { kind: FaultKind; at: number; for: number; link?: string }

/**
 * A clock-step fault steps the host's wall clock by this much at `at` and back at its end (NTP
 * correcting a wrong clock both ways): odd durations forward, even ones back, 100x the fault's
 * length (30 s .. 15 min).
 */
export const clockStepMs = (f: Fault): number => (f.for % 2 ? 1 : -1) * f.for * 100;

export type Invariant = 'S1' | 'S2' | 'S3' | 'L1' | 'L2' | 'T';
export interface Violation { invariant: Invariant; atMs: number; detail: string }
export interface RunResult { seed: number; faults: Fault[]; violation: Violation | null; trace: string[]; events: number; acked: number; /** Log lines matching opts.watch. */ hits: string[] }

/** Fault phase, then everything heals, then the pair must have recovered by the end. */
export const HEAL_AT_MS = 45_000;
export const END_MS = 90_000;
/** L2: a primary's guest paused this long while its node holds the lease (the boot hold is 30 s). */
export const PAUSE_BOUND_MS = 35_000;
/** L2 too: a guest that ran, paused this long while its node hears the peer and the peer does not serve it. */
export const HEARD_PAUSE_BOUND_MS = 12_000;

const LINKS: [HostId, HostId, NetId][] = [['A', 'B', 'repl'], ['B', 'A', 'repl'], ['A', 'B', 'mgmt'], ['B', 'A', 'mgmt'], ['A', 'W', 'mgmt'], ['W', 'A', 'mgmt'], ['B', 'W', 'mgmt'], ['W', 'B', 'mgmt']];

export function scheduleFor(seed: number): Fault[] {
  const r = new Prng(seed ^ 0x5eed);
  const n = r.int(1, 4);
  const out: Fault[] = [];
  for (let i = 0; i < n; i++) {
    const kind = r.pick(FAULT_KINDS);
    const f: Fault = { kind, at: r.int(2_000, 35_000), for: r.int(300, 9_000) };
    if (kind === 'one-way') { const l = r.pick(LINKS); f.link = `${l[0]}>${l[1]}@${l[2]}`; }
    out.push(f);
  }
  return out.sort((a, b) => a.at - b.at);
}

const NOW0 = Date.UTC(2026, 10, 26);

export async function runSchedule(seed: number, faults: Fault[] = scheduleFor(seed), opts: { traceLines?: number; watch?: RegExp } = {}): Promise<RunResult> {
  const clock = FakeTimers.install({ now: NOW0, toFake: ['setTimeout', 'clearTimeout', 'setInterval', 'clearInterval', 'Date', 'performance'] });
  const uninstallProcesses = installProcesses();
  /** True time: what the invariants and the trace measure (Date.now() is a host's own clock). */
  const at = () => clock.now - NOW0;
  const keep = opts.traceLines ?? 80;
  const trace: string[] = [];
  const hits: string[] = [];
  let outsideTable: string | null = null;
  const log = (line: string) => {
    if (opts.watch?.test(line)) hits.push(line);
    if (!outsideTable && line.includes('state transition outside the table')) outsideTable = line;
    trace.push(`${(at() / 1000).toFixed(3)} ${line}`); if (trace.length > keep * 4) trace.splice(0, trace.length - keep);
  };
  try {
    const rng = new Prng(seed);
    const net = new Net(rng);
    const witness = new SimWitness();
    const hosts: Record<'A' | 'B', SimHost> = {
      A: { id: 'A', files: new Map(), writeFails: false, qemu: null, console: [], fencerControl: null, fencerPulse: null, clockOffsetMs: 0 },
      B: { id: 'B', files: new Map(), writeFails: false, qemu: null, console: [], fencerControl: null, fencerPulse: null, clockOffsetMs: 0 },
    };
    const disk = { A: { counter: 0 }, B: { counter: 0 } };
    const agents: Record<'A' | 'B', SimAgent | null> = { A: null, B: null };
    const qemuEnv: QemuEnv = {
      peerQemu: (h) => { const q = hosts[other(h as 'A' | 'B')].qemu; return q?.isAlive ? q : null; },
      replUp: () => net.both('A', 'B', 'repl'),
      disk, rate: () => 256 * 1024, latency: () => net.latency(), note: (s) => log(`qemu: ${s}`),
    };
    const w: SimWorldPorts = { net, witness, hosts, agents, qemuEnv, log };
    let gen = 0;
    const fencers: Record<'A' | 'B', SimFencer | null> = { A: null, B: null };
    const startAgent = (h: 'A' | 'B') => outside(() => {
      if (agents[h]?.alive || !net.hostUp[h]) return;
      if (!fencers[h]?.alive) fencers[h] = new SimFencer(hosts[h], w);
      const a = new SimAgent(hosts[h], w, ++gen);
      agents[h] = a;
      log(`agent ${h} starts`);
      // systemd (Restart=on-failure, RestartSec=2) starts an agent that failed to start again.
      void a.start().catch((e) => { log(`agent ${h} start failed: ${String(e)}`); a.crash(); outside(() => setTimeout(() => startAgent(h), 2000)); });
    });
    /** The processes a hang fault stopped (the agent may have been replaced meanwhile). */
    const hung: Record<'A' | 'B', SimProcess[]> = { A: [], B: [] };
    const crashHost = (h: 'A' | 'B') => { agents[h]?.crash(); fencers[h]?.stop(); hosts[h].fencerPulse = null; hosts[h].qemu?.die(); net.hostUp[h] = false; log(`host ${h} down`); };

    // ---------------------------------------------------------------- faults
    const cutsOf = (f: Fault): [HostId, HostId, NetId, boolean][] => {
      switch (f.kind) {
        case 'partition': return [['A', 'B', 'repl', false], ['A', 'B', 'mgmt', false]];
        case 'cut-repl': return [['A', 'B', 'repl', false]];
        case 'cut-mgmt': return [['A', 'B', 'mgmt', false]];
        case 'cut-witness-A': return [['A', 'W', 'mgmt', false]];
        case 'cut-witness-B': return [['B', 'W', 'mgmt', false]];
        case 'isolate-A': return [['A', 'B', 'repl', false], ['A', 'B', 'mgmt', false], ['A', 'W', 'mgmt', false]];
        case 'isolate-B': return [['B', 'A', 'repl', false], ['B', 'A', 'mgmt', false], ['B', 'W', 'mgmt', false]];
        case 'one-way': { const m = /^(\w)>(\w)@(\w+)$/.exec(f.link!)!; return [[m[1] as HostId, m[2] as HostId, m[3] as NetId, true]]; }
        default: return [];
      }
    };
    const hostOf = (f: Fault) => (f.kind.endsWith('-A') ? 'A' : 'B') as 'A' | 'B';
    const apply = (f: Fault) => {
      log(`FAULT ${f.kind}${f.link ? ' ' + f.link : ''} for ${f.for} ms`);
      for (const [a, b, n, one] of cutsOf(f)) net.cut(a, b, n, one);
      switch (f.kind) {
        case 'witness-crash': witness.up = false; break;
        case 'witness-slow': witness.slowMs = 300 + (f.for % 1200); break;
        case 'qemu-crash-A': case 'qemu-crash-B': hosts[hostOf(f)].qemu?.die(); break;
        case 'agent-crash-A': case 'agent-crash-B': agents[hostOf(f)]?.crash(); break;
        case 'host-crash-A': case 'host-crash-B': crashHost(hostOf(f)); break;
        case 'loss': net.loss = 0.3; break;
        case 'dup-reorder': net.dupProb = 0.3; net.jitterMs = 30; break;
        case 'replay': { const t = setInterval(() => net.replay(20), 100); setTimeout(() => clearInterval(t), f.for); break; }
        case 'write-fail-A': case 'write-fail-B': hosts[hostOf(f)].writeFails = true; break;
        case 'qemu-wedge-A': case 'qemu-wedge-B': { const q = hosts[hostOf(f)].qemu; if (q) q.wedged = true; break; }
        case 'replica-sick-A': case 'replica-sick-B': {
          const q = hosts[hostOf(f)].qemu;
          if (q?.colo === 'secondary') q.corrupt = true;
          hosts[hostOf(f)].console.push('[  12.345678] BUG: unable to handle page fault for address: ffff8880deadbeef');
          break;
        }
        case 'takeover-fails-A': case 'takeover-fails-B': { const q = hosts[hostOf(f)].qemu; if (q) q.failTakeover = true; break; }
        case 'agent-hang-A': case 'agent-hang-B': { const a = agents[hostOf(f)]; if (a?.alive) { a.proc.stop(); hung[hostOf(f)].push(a.proc); } break; }
        case 'clock-step-A': case 'clock-step-B': hosts[hostOf(f)].clockOffsetMs += clockStepMs(f); break;
        default: break;
      }
    };
    const contAll = (h: 'A' | 'B') => { for (const p of hung[h].splice(0)) p.cont(); };
    const revert = (f: Fault) => {
      log(`HEAL ${f.kind}`);
      for (const [a, b, n, one] of cutsOf(f)) net.heal(a, b, n, one);
      switch (f.kind) {
        case 'witness-crash': witness.up = true; break;
        case 'witness-slow': witness.slowMs = 0; break;
        case 'agent-crash-A': case 'agent-crash-B': startAgent(hostOf(f)); break;
        case 'host-crash-A': case 'host-crash-B': net.hostUp[hostOf(f)] = true; startAgent(hostOf(f)); break;
        case 'loss': net.loss = 0; break;
        case 'dup-reorder': net.dupProb = 0; net.jitterMs = 0; break;
        case 'write-fail-A': case 'write-fail-B': hosts[hostOf(f)].writeFails = false; break;
        case 'qemu-wedge-A': case 'qemu-wedge-B': for (const h of ['A', 'B'] as const) { const q = hosts[h].qemu; if (q) q.wedged = false; } break;
        case 'agent-hang-A': case 'agent-hang-B': contAll(hostOf(f)); break;
        case 'clock-step-A': case 'clock-step-B': hosts[hostOf(f)].clockOffsetMs -= clockStepMs(f); break;
        default: break;
      }
    };
    for (const f of faults) {
      setTimeout(() => apply(f), f.at);
      setTimeout(() => revert(f), Math.min(f.at + f.for, HEAL_AT_MS));
    }
    setTimeout(() => {
      log('HEAL ALL');
      net.healAll();
      witness.up = true; witness.slowMs = 0;
      for (const h of ['A', 'B'] as const) { net.hostUp[h] = true; hosts[h].writeFails = false; hosts[h].clockOffsetMs = 0; contAll(h); if (hosts[h].qemu) hosts[h].qemu!.wedged = false; startAgent(h); }
    }, HEAL_AT_MS);

    // ---------------------------------------------------------------- client
    let ackedMax = 0, acked = 0;
    setInterval(() => {
      const serving = (['A', 'B'] as const).map((h) => hosts[h].qemu).filter((q): q is SimQemu => !!q && q.serving());
      if (serving.length !== 1) return;
      const q = serving[0]!;
      if (q.apply()) { acked++; ackedMax = Math.max(ackedMax, q.counter); }
    }, 20);

    // ---------------------------------------------------------------- invariants
    let violation: Violation | null = null;
    const fail = (invariant: Invariant, detail: string) => { if (!violation) violation = { invariant, atMs: at(), detail }; };
    const wasServing = new Set<number>();
    const epochs = { A: { epoch: 0, primaryEpoch: 0 }, B: { epoch: 0, primaryEpoch: 0 } };
    const stored = { A: { epoch: 0, primaryEpoch: 0 }, B: { epoch: 0, primaryEpoch: 0 } };
    const storedText: Record<'A' | 'B', string | undefined> = { A: undefined, B: undefined };
    const epochGen: Record<'A' | 'B', SimAgent | null> = { A: null, B: null };
    let grantsSeen = 0, lastGrantEpoch = 0;
    const pausedSince: Record<'A' | 'B', number | null> = { A: null, B: null };
    const pausedHeard: Record<'A' | 'B', number | null> = { A: null, B: null };
    const check = () => {
      const now = at();
      const serving: SimQemu[] = [];
      for (const h of ['A', 'B'] as const) {
        const q = hosts[h].qemu;
        if (q?.serving()) {
          serving.push(q);
          if (!wasServing.has(q.pid)) {
            wasServing.add(q.pid);
            if (q.counter < ackedMax) fail('S2', `${h}'s QEMU ${q.pid} started serving with ${q.counter} units of work, ${ackedMax} were acknowledged`);
            if (q.corrupt) fail('S2', `${h}'s QEMU ${q.pid} resumed a replica known to be corrupt`);
          }
        } else if (q) wasServing.delete(q.pid);
        const a = agents[h];
        // S3 on the node: what is stored never goes back, nor what one agent's life holds in memory
        // (a write the disk refused is kept in memory only: a host crash may forget it).
        const text = hosts[h].files.get(`/sim/${h}/state.json`);
        if (text && text !== storedText[h]) {
          storedText[h] = text;
          const d = (JSON.parse(text) as { vms: Record<string, { epoch: number; primaryEpoch: number }> }).vms[VM];
          if (d && (d.epoch < stored[h].epoch || d.primaryEpoch < stored[h].primaryEpoch)) fail('S3', `${h}'s stored epochs went back: ${JSON.stringify(stored[h])} -> ${d.epoch}/${d.primaryEpoch}`);
          if (d) stored[h] = { epoch: Math.max(d.epoch, stored[h].epoch), primaryEpoch: Math.max(d.primaryEpoch, stored[h].primaryEpoch) };
        }
        if (a?.alive) {
          const d = a.store.vm(VM);
          if (epochGen[h] !== a) { epochGen[h] = a; epochs[h] = { epoch: d.epoch, primaryEpoch: d.primaryEpoch }; }
          if (d.epoch < epochs[h].epoch || d.primaryEpoch < epochs[h].primaryEpoch) fail('S3', `${h}'s epochs went back: ${JSON.stringify(epochs[h])} -> ${d.epoch}/${d.primaryEpoch}`);
          epochs[h] = { epoch: Math.max(d.epoch, epochs[h].epoch), primaryEpoch: Math.max(d.primaryEpoch, epochs[h].primaryEpoch) };
          // L2: a primary's guest kept paused while the node holds the lease.
          const primaryCopy = !!q && q.isAlive && !q.wedged && q.colo !== 'secondary' && !q.incoming && q.role !== 'secondary';
          if (primaryCopy && !q!.serving() && a.gate.lease(VM).state === 'held') {
            pausedSince[h] ??= now;
            if (now - pausedSince[h]! > PAUSE_BOUND_MS) fail('L2', `${h}'s guest paused for ${now - pausedSince[h]!} ms while its node holds the lease (state ${a.vm.state})`);
          } else pausedSince[h] = null;
          // ... and never left paused while the pair sees each other and nobody else serves it
          // (a healthy node could run it), whether or not the witness answers.
          const peerServes = !!hosts[other(h)].qemu?.serving();
          if (primaryCopy && q!.everRan && !q!.inService() && a.heartbeat.view().alive && !peerServes) {
            pausedHeard[h] ??= now;
            if (now - pausedHeard[h]! > HEARD_PAUSE_BOUND_MS) fail('L2', `${h}'s guest paused for ${now - pausedHeard[h]!} ms although its node hears the peer and nobody else serves it (state ${a.vm.state})`);
          } else pausedHeard[h] = null;
        } else { pausedSince[h] = null; pausedHeard[h] = null; }
      }
      if (outsideTable) fail('T', outsideTable);
      if (serving.length > 1) fail('S1', `both copies serve: A ${hosts.A.qemu?.pid} (counter ${hosts.A.qemu?.counter}), B ${hosts.B.qemu?.pid} (counter ${hosts.B.qemu?.counter})`);
      for (; grantsSeen < witness.grants.length; grantsSeen++) {
        const g = witness.grants[grantsSeen]!;
        if (g.epoch < lastGrantEpoch) fail('S3', `witness granted epoch ${g.epoch} to ${g.holder} after epoch ${lastGrantEpoch}`);
        lastGrantEpoch = Math.max(lastGrantEpoch, g.epoch);
      }
    };

    startAgent('A');
    startAgent('B');
    let events = 0;
    while (!violation) {
      if (clock.now - NOW0 >= END_MS) break;
      clock.next();
      events++;
      await new Promise((r) => setImmediate(r));
      check();
    }
    if (!violation) {
      // L1: healed for END-HEAL ms: one copy serves and, both hosts being up, it is protected.
      const states = (['A', 'B'] as const).map((h) => agents[h]?.vm.state ?? 'no agent');
      const serving = (['A', 'B'] as const).filter((h) => hosts[h].qemu?.inService());
      const protectedPair = states.includes('protected') && states.includes('secondary');
      if (serving.length !== 1 || !protectedPair) fail('L1', `${(END_MS - HEAL_AT_MS) / 1000} s after healing: serving ${JSON.stringify(serving)}, states A=${states[0]} B=${states[1]}`);
    }
    for (const h of ['A', 'B'] as const) { agents[h]?.crash(); fencers[h]?.stop(); }
    return { seed, faults, violation, trace: trace.slice(-keep), events, acked, hits };
  } finally {
    uninstallProcesses();
    clock.uninstall();
  }
}
