// The compound-fault paths of issue 11 as named, replayable scenarios: each runs the real
// controller through the fault mix that broke a promise before its fix, under every invariant,
// plus what the path itself must (or must not) show in the agents' logs.
import type { Fault } from './world.ts';

export interface Scenario {
  name: string;
  path: number;
  faults: Fault[];
  /** Log lines that must appear (the path was exercised) ... */
  mustLog?: RegExp;
  /** ... and lines that must not. */
  mustNotLog?: RegExp;
  /** Seeds to run it with (default 1, 2, 3): a seed that found it keeps it found. */
  seeds?: number[];
}

export const SCENARIOS: Scenario[] = [
  {
    name: 'stale replica promoted: partition with the witness reachable, then a lapse of the primary\'s lease',
    path: 1,
    faults: [{ kind: 'partition', at: 10_000, for: 14_000 }, { kind: 'cut-witness-A', at: 21_000, for: 3_000 }],
    mustLog: /moved to a new epoch/,
  },
  {
    name: 'takeover failing halfway ends in a restart from the replicated disk',
    path: 2,
    faults: [{ kind: 'takeover-fails-B', at: 9_000, for: 1 }, { kind: 'host-crash-A', at: 10_000, for: 20_000 }],
    mustLog: /DEGRADED FAILOVER/,
  },
  {
    name: 'cold start held paused while the replication network is down boots unprotected',
    path: 2,
    faults: [{ kind: 'cut-repl', at: 0, for: 40_000 }],
    mustLog: /guest booted unprotected|protection failed/,
  },
  {
    name: 'wedged primary hands over to the healthy replica instead of discarding it',
    path: 3,
    faults: [{ kind: 'qemu-wedge-A', at: 12_000, for: 20_000 }],
    mustLog: /decision: hand-over/,
    mustNotLog: /decision: drop-secondary.*stall/,
  },
  {
    name: 'replayed and duplicated heartbeats do not keep a dead primary alive',
    path: 4,
    faults: [{ kind: 'replay', at: 9_000, for: 8_000 }, { kind: 'dup-reorder', at: 9_000, for: 8_000 }, { kind: 'host-crash-A', at: 10_000, for: 20_000 }],
    mustLog: /took over as primary/,
  },
  {
    name: 'agent restart of a protected primary with a slow witness: no self-fence',
    path: 5,
    faults: [{ kind: 'witness-slow', at: 11_000, for: 3_600 }, { kind: 'agent-crash-A', at: 12_000, for: 300 }], // answers 300 ms late
    mustNotLog: /FENCED|FROZE/,
  },
  {
    name: 'state file unwritable while the primary is isolated: it still fences',
    path: 6,
    faults: [{ kind: 'write-fail-A', at: 11_000, for: 15_000 }, { kind: 'isolate-A', at: 12_000, for: 10_000 }],
    mustLog: /FENCED/,
  },
  {
    name: 'release refused by a node taking over; a takeover request does not outlive its replica',
    path: 7,
    faults: [{ kind: 'cut-witness-B', at: 10_000, for: 6_000 }, { kind: 'qemu-crash-A', at: 11_000, for: 1 }, { kind: 'cut-repl', at: 11_200, for: 3_000 }],
  },
  {
    name: 'primary agent dead and host cut off: the fencer freezes the old guest before the survivor serves',
    path: 8,
    faults: [{ kind: 'agent-crash-A', at: 12_000, for: 10_000 }, { kind: 'isolate-A', at: 12_100, for: 10_000 }],
    mustLog: /FROZE the primary QEMU/,
  },
  {
    name: 'replica known corrupt when the primary host is lost: restart from disk, never resumed',
    path: 9,
    faults: [{ kind: 'replica-sick-B', at: 12_000, for: 1 }, { kind: 'host-crash-A', at: 12_070, for: 20_000 }],
    mustLog: /DEGRADED FAILOVER/,
  },
  {
    name: 'primary lost while the replica is being built: the half-built copy never runs',
    path: 10,
    faults: [{ kind: 'qemu-crash-B', at: 10_000, for: 1 }, { kind: 'host-crash-A', at: 11_350, for: 15_000 }],
    mustLog: /primary lost before the replica was complete|discard/,
  },
  {
    // Found by CI (split-brain test, 191/1): with the witness down, one 215 ms heartbeat gap made
    // the primary fence itself, and only a renewed lease could lift it: paused until the witness
    // came back, although the peer was heard again at once.
    name: 'witness down while the pair sees each other, plus a heartbeat gap: the primary is not left paused',
    path: 12,
    faults: [{ kind: 'witness-crash', at: 10_000, for: 34_000 }, { kind: 'loss', at: 15_000, for: 4_000 }],
  },
  {
    // Found by the simulator: the secondary's takeover granted after its client timed out (slow
    // witness); the primary reclaimed, then lost the lease while protecting, with its QEMU frozen.
    name: 'a takeover granted after its request timed out: the reclaimed primary demotes, the VM restarts at a newer epoch',
    path: 13,
    faults: [{ kind: 'witness-slow', at: 18_527, for: 7_457 }, { kind: 'isolate-A', at: 21_262, for: 4_446 }],
    seeds: [4375, 1, 2],
  },
  {
    // Found by the simulator (seed 187): the agent fenced as its lease ran out, the fencer froze
    // the QEMU under it 29 ms later (the pulse said "no lease" before it said "fenced"), and once
    // the witness was back only the agent renewed: nobody thawed, the guest stayed paused.
    name: 'partition, then the witness crashes: the primary fences itself and resumes when the peer and the witness are back',
    path: 14,
    faults: [{ kind: 'partition', at: 27_361, for: 6_362 }, { kind: 'witness-crash', at: 30_685, for: 4_865 }],
    seeds: [187, 1, 2],
  },
  {
    // Found by the simulator: checkpoint ages were measured on the wall clock, so an NTP step
    // forward on the primary made the replica look stalled for 15 min and protection was dropped
    // (secondary killed, full resync). Intervals are monotonic now; wall time is only reported.
    name: 'NTP steps the wall clock of either host, both ways: nothing is decided, protection is never dropped',
    path: 15,
    faults: [{ kind: 'clock-step-A', at: 10_000, for: 9_001 }, { kind: 'clock-step-B', at: 22_000, for: 8_000 }, { kind: 'clock-step-A', at: 31_000, for: 6_000 }, { kind: 'clock-step-B', at: 33_000, for: 3_001 }],
    mustNotLog: /drop-secondary|discard-secondary|decision: takeover|FENCED|FROZE/,
  },
  {
    // Issue 11 path 8 with the agent hung (SIGSTOP) rather than dead: its timers and sockets wait;
    // on SIGCONT the expired timers run before the queued heartbeats (as in Node).
    name: 'the primary\'s agent hangs and its host is cut off: the fencer freezes the guest before the survivor serves; continued, the agent demotes',
    path: 16,
    faults: [{ kind: 'agent-hang-A', at: 10_000, for: 8_000 }, { kind: 'isolate-A', at: 10_100, for: 8_000 }],
    mustLog: /FROZE the primary QEMU|split brain resolved against this node/,
  },
];
