// Types and constants shared by the modules of one VM's controller.
import type { Config, VmConfig } from '../../config/schema.ts';
import type { Logger } from '../../log/logger.ts';
import type { Metrics } from '../../api/metrics.ts';
import type { PeerView } from '../../peer/heartbeat.ts';
import type { PeerClient } from '../../peer/client.ts';
import type { Reachability } from '../../peer/reachability.ts';
import type { QemuFeatures } from '../../qemu/argv.ts';
import type { QemuProcesses } from '../../qemu/process.ts';
import type { StateStore } from '../../state/store.ts';
import type { Clock } from '../../util/clock.ts';
import { FtkvmError } from '../../util/errors.ts';
import type { Exec } from '../../util/exec.ts';
import type { CheckpointSnapshot } from '../checkpoints.ts';
import type { PromotionGate } from '../gate.ts';
import type { Role, VmState } from '../states.ts';
import type { ReceivedBytes } from '../replica-health.ts';
import type { DrStatus } from '../../dr/shipper.ts';

/** How often QEMU is asked whether a virtio device is broken, and a primary counts the replica's output. */
export const DEVICE_CHECK_MS = 1000;

export interface VmControllerDeps {
  config: Config;
  vm: VmConfig;
  store: StateStore;
  gate: PromotionGate;
  peer: Pick<PeerClient, 'call'>;
  peerView: () => PeerView;
  heardPeerSinceStart: () => boolean;
  hostProbe: () => Promise<Reachability>;
  features: QemuFeatures;
  exec: Exec;
  /** Bytes received per local TCP port (shared by all VMs of the host). */
  receivedBytes: ReceivedBytes;
  clock: Clock;
  log: Logger;
  metrics: Metrics;
  agentStartMono: number;
  /** QEMU process lifecycle (default: real processes). The simulator passes its QEMU model. */
  qemuProcesses?: QemuProcesses;
  /** Reader of what a log file gained (default: LogTail on the file). */
  logTail?: (path: string) => LogReader;
}

/** The part of LogTail the controller uses. */
export interface LogReader { skipToEnd(): void; firstNewMatch(re: RegExp): string | null }

export interface FailoverRecord {
  at: number;                     // epoch ms when it completed
  /** restart-from-disk: a DEGRADED failover: the replica could not be resumed (known corrupt, or
   *  its takeover failed halfway); the guest was rebooted from the replicated disk. */
  kind: 'takeover' | 'secondary-dropped' | 'restart-from-disk';
  reason: string;
  /** From the last sign of life of the lost side to the end of the sequence (when known). */
  durationMs: number;
  detectionMs: number | null;
  sequenceMs: number;
}

export interface ResyncProgress {
  /** full: every block (drive-mirror); checksum: only the chunks whose digests differ, then the guest's writes since. */
  mode: 'full' | 'checksum';
  phase: 'preparing-secondary' | 'digesting' | 'copying' | 'catching-up' | 'mirroring' | 'connecting' | 'first-checkpoint';
  /** checksum: bytes whose chunks differ (what must cross the link), null until known. */
  plannedBytes: number | null;
  bytesDone: number;
  bytesTotal: number;
  rateBytesPerS: number;
  etaS: number | null;
  startedAt: number;
  attempt: number;
}

export interface VmStatus {
  name: string;
  state: VmState;
  role: Role;
  since: number;
  reason: string;
  decision: string;
  epoch: number;
  primaryEpoch: number;
  protected: boolean;
  qemu: { pid: number; runState: string; uptimeS: number; reattached: boolean } | null;
  checkpoints: CheckpointSnapshot;
  resync: ResyncProgress | null;
  /** The latest failover event of any kind, a dropped replica included. */
  lastFailover: FailoverRecord | null;
  /** The latest takeover (or degraded restart from disk) by this node: a replica dropped later does not hide it. */
  lastTakeover: FailoverRecord | null;
  lastProtectError: string | null;
  sick: string | null;
  /** virtio devices QEMU reports broken here (a primary: the guest cannot use them until it resets them). */
  brokenDevices: string[];
  /** Disaster recovery (vms[].dr): recovery points shipped to the DR site; null without DR. */
  dr: DrStatus | null;
}

/** `protection`: id of the primary's protection attempt; its heartbeat summaries carry it (see preparedFor). */
export interface PrepareRequest {
  epoch: number; sizeBytes: number; primary: string; protection?: string;
  /** Checksum resync: once ready, digest this host's copy of the disk in chunks of this size. */
  checksumChunkBytes?: number;
}

/** What the secondary answers to prepare: the digests of its disk when the primary asked for them. */
export interface PrepareAnswer { ready: true; digests?: string /* base64, nbd/checksums.ts DIGEST_BYTES each */ }

/**
 * How long a secondary disregards the primary's summaries that do not name the protection
 * attempt it was prepared for. Such a summary was sent before the attempt began (the prepare RPC
 * and the next heartbeat race); a summary of the attempt follows within a heartbeat interval.
 * The bound only matters for a primary that never sends one (an older agent, a restart).
 */
export const PRE_ATTEMPT_SUMMARY_GRACE_MS = 10_000;

/** How long the primary's own QEMU may take to answer query-status before a stall is blamed on it. */
export const OWN_QEMU_ANSWER_MS = 3000;

/** States that describe a running QEMU ('starting' and 'preparing' are set just before it starts). */
export const NEEDS_QEMU: readonly VmState[] = ['standalone', 'syncing', 'protected', 'dropping', 'fenced', 'secondary', 'taking-over'];

export class VmBusyError extends FtkvmError {
  constructor(vm: string, what: string) { super('VM_BUSY', `${vm}: ${what}`); }
}
