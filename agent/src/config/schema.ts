// The agent's configuration (/etc/ftkvm/agent.yaml). Field names are the YAML names so that
// every error message can point at exactly what the operator wrote.
import { isIP } from 'node:net';
import { z } from 'zod';
import { DEFAULT_API_PORT, DEFAULT_HEARTBEAT_PORT, VM_PORT_SPAN } from '../colo/ports.ts';
import { cidrError, parseCidr } from '../util/cidr.ts';

export const ip = z.string().refine((s) => isIP(s) !== 0, (s) => ({ message: `not an IP address: "${s}"` }));
const port = z.number().int().min(1).max(65535);
const ms = (min: number, max: number) => z.number().int().min(min).max(max);
export const absPath = z.string().min(1).refine((s) => s.startsWith('/'), (s) => ({ message: `must be an absolute path: "${s}"` }));
export const nodeName = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'must be 1-63 letters, digits, ".", "_" or "-"');
export const ifName = z.string().regex(/^[A-Za-z0-9_.-]{1,15}$/, 'must be a Linux interface name (1-15 characters)');
export const hostPort = z.string().refine((s) => parseHostPort(s) !== null,
  (s) => ({ message: `expected ADDRESS:PORT with an IP address (e.g. 0.0.0.0:${DEFAULT_API_PORT} or [::]:${DEFAULT_API_PORT}), got "${s}"` }));
const cidr = z.string().refine((s) => parseCidr(s) !== null, (s) => ({ message: cidrError(s) }));

export function parseHostPort(s: string): { host: string; port: number } | null {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(s) ?? /^([^:]+):(\d+)$/.exec(s);
  if (!m) return null;
  const host = m[1]!, p = Number(m[2]);
  if (isIP(host) === 0 || !Number.isInteger(p) || p < 1 || p > 65535) return null;
  return { host, port: p };
}

const httpUrl = z.string().url().refine((u) => /^https?:\/\//.test(u), 'must be an http:// or https:// URL');

/** Disaster recovery of one VM (dr/): recovery points shipped by whichever host is its primary. */
const drSettings = z.object({
  // The DR site's `ftkvm-agent dr-target` (e.g. https://dr1.example:7610).
  target: httpUrl,
  // Bearer token of the DR target (default: api.token_file); CA of its certificate (https).
  token_file: absPath.optional(),
  ca_file: absPath.optional(),
  // A crash-consistent recovery point every interval_s; the DR host keeps the newest `keep`.
  interval_s: z.number().int().min(2).max(7 * 86_400).default(300),
  keep: z.number().int().min(1).max(1000).default(24),
  // /health warns when the newest recovery point is older than this (default: 2 intervals + 60 s).
  rpo_target_s: z.number().int().min(5).max(30 * 86_400).optional(),
  // Cap on the DR traffic of this VM (Mbit/s of disk data): checkpoints and re-protection first.
  bandwidth_mbit: z.number().min(1).max(1_000_000).default(200),
}).strict().transform((d) => ({ ...d, rpo_target_s: d.rpo_target_s ?? 2 * d.interval_s + 60 }));

export const vmSchema = z.object({
  name: z.string().regex(/^[a-z][a-z0-9-]{0,30}$/, 'must be lowercase letters, digits and "-", starting with a letter, at most 31 characters'),
  memory_mib: z.number().int().min(64).max(4 * 1024 * 1024),
  vcpus: z.number().int().min(1).max(1024),
  disk: z.object({
    path: absPath,
    format: z.enum(['qcow2', 'raw']).default('qcow2'),
  }).strict(),
  boot: z.union([
    z.object({ kernel: absPath, initrd: absPath.optional(), append: z.string().default('') }).strict(),
    z.object({ firmware: z.enum(['bios']) }).strict(),
  ], { errorMap: () => ({ message: 'expected either {kernel, initrd?, append?} (direct kernel boot) or {firmware: bios}' }) }),
  nic: z.object({
    bridge: ifName,
    mac: z.string().regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/, 'must be a lowercase MAC address like 52:54:00:12:34:56')
      .refine((m) => (parseInt(m.slice(0, 2), 16) & 1) === 0, 'must be a unicast MAC (first octet even)'),
    tap: ifName.optional(),
  }).strict(),
  base_port: z.number().int().min(1024).max(65535 - VM_PORT_SPAN),
  preferred_primary: nodeName,
  checkpoint_delay_ms: ms(100, 60_000).optional(),
  // What a drill checks in the guest: a TCP service reachable from the hosts. With `request`,
  // the drill sends that line repeatedly over ONE connection and expects one reply line each;
  // with `counter: true` replies are integers that must go up by exactly one (no acknowledged
  // transaction lost or repeated across the failover).
  probe: z.object({
    address: ip,
    port,
    request: z.string().regex(/^[^\r\n]{1,200}$/, 'one line, at most 200 characters').optional(),
    counter: z.boolean().default(false),
    interval_ms: z.number().int().min(5).max(10_000).default(50),
  }).strict().optional(),
  dr: drSettings.optional(),
}).strict();
const vm = vmSchema;

export const configSchema = z.object({
  node: z.object({
    name: nodeName,
    replication_address: ip,
  }).strict(),
  peer: z.object({
    name: nodeName,
    addresses: z.array(ip).min(2, 'at least two addresses (e.g. replication and management networks) so one cut link never looks like a dead peer'),
    replication_address: ip,
    api_port: port.optional(),
    heartbeat_port: port.optional(),
  }).strict(),
  heartbeat: z.object({
    port: port.default(DEFAULT_HEARTBEAT_PORT),
    listen_address: ip.default('0.0.0.0'),
    interval_ms: ms(10, 5_000).default(100),
    timeout_ms: ms(30, 60_000).default(500),
    // HMAC key of the heartbeats, the same on both hosts of this pair only (default: api.token_file).
    key_file: absPath.optional(),
    // During a key change: the key being replaced, still accepted (and sent to a peer that has
    // not been heard with key_file yet). Remove once both hosts use key_file.
    previous_key_file: absPath.optional(),
  }).strict().default({}),
  api: z.object({
    listen: hostPort.default(`0.0.0.0:${DEFAULT_API_PORT}`),
    token_file: absPath.default('/etc/ftkvm/token'),
    read_allow: z.array(cidr).optional(),
    tls: z.object({ cert_file: absPath, key_file: absPath, ca_file: absPath.optional() }).strict().optional(),
    max_body_bytes: z.number().int().min(256).max(16 * 1024 * 1024).default(64 * 1024),
    max_concurrent_drills: z.number().int().min(1).max(64).default(1),
    drill_timeout_s: z.number().int().min(10).max(24 * 3600).default(900),
  }).strict().default({}),
  qemu: z.object({
    binary: absPath.default('/usr/bin/qemu-system-x86_64'),
    img_binary: absPath.default('/usr/bin/qemu-img'),
    accelerator: z.enum(['kvm', 'tcg']).default('kvm'),
    machine: z.string().regex(/^[a-z0-9.-]+$/).default('pc'),
    env: z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'environment variable names only'), z.string()).default({}),
    extra_args: z.array(z.string()).default([]),
    // TEST-ONLY lab mode (qemu/lab.ts): the TCG COLO shim preloaded and the trace events it hooks.
    tcg_lab_shim: absPath.optional(),
  }).strict().superRefine((q, ctx) => {
    if (!q.tcg_lab_shim) return;
    if (q.accelerator !== 'tcg') ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['tcg_lab_shim'], message: 'the COLO shim is for TCG labs only: set qemu.accelerator: tcg, or remove qemu.tcg_lab_shim (production uses KVM)' });
    if (q.env.LD_PRELOAD !== undefined) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['env', 'LD_PRELOAD'], message: 'qemu.tcg_lab_shim sets LD_PRELOAD itself: remove it from qemu.env' });
  }).default({}),
  state_dir: absPath.default('/var/lib/ftkvm'),
  colo: z.object({
    checkpoint_delay_ms: ms(100, 60_000).default(2000),
    startup_peer_wait_ms: ms(0, 600_000).default(15_000),
    resync_retry_min_ms: ms(100, 600_000).default(2_000),
    resync_retry_max_ms: ms(100, 3_600_000).default(60_000),
    // After a takeover, wait this long before re-protecting: the first checkpoint of a new
    // replica pauses the guest (~1 s under TCG for 256 MiB), and a client retransmission that
    // arrives meanwhile waits for it (bench/failover: a third of the rounds ~1 s slower).
    // Clients retransmit after 200, 600, 1400 ms (Linux's minimum RTO, doubling): 2000 ms lets
    // the retransmissions of a sub-second failover be served first, for 2 s more unprotected.
    reprotect_delay_ms: ms(0, 600_000).default(2_000),
    // How a new replica's disk is brought in sync: `full` copies every block (drive-mirror);
    // `checksum` digests both copies in chunks and copies only the chunks that differ plus what
    // the guest writes meanwhile (nbd/checksums.ts; sound whatever happened before, since it
    // compares content). A checksum resync that fails is retried as a full copy. Not the default
    // yet: its catch-up passes use blockdev-backup, whose copy-before-write makes a guest write
    // fail if the secondary vanishes during a pass (QEMU < 10.1 cannot say on-cbw-error).
    resync: z.enum(['full', 'checksum']).default('full'),
    resync_chunk_kib: z.number().int().min(64).max(4096).refine((n) => (n & (n - 1)) === 0, 'a power of two (64 .. 4096)').default(256),
    checkpoint_stall_ms: ms(1_000, 600_000).optional(),
    // A sustained checkpoint rate above this (outputs keep mismatching) marks the secondary
    // sick: it is rebuilt. 0 disables the check.
    storm_checkpoints_per_s: z.number().min(0).max(1000).default(4),
    storm_window_s: z.number().int().min(5).max(3600).default(30),
  }).strict().default({}),
  witness: z.object({
    url: httpUrl.optional(),
    // The lease store as an etcd v3 cluster instead of the embedded witness (witness/etcd.ts).
    etcd: z.object({
      endpoints: z.array(z.string().url().refine((u) => /^https?:\/\//.test(u), 'must be an http:// or https:// URL')).min(1),
      pair: nodeName,
      prefix: z.string().regex(/^\/[A-Za-z0-9/_.-]*[A-Za-z0-9_.-]$/, 'must be an absolute key path like /ftkvm').default('/ftkvm'),
      user: nodeName.optional(),
      password_file: absPath.optional(),
      ca_file: absPath.optional(),
      cert_file: absPath.optional(),
      key_file: absPath.optional(),
    }).strict().optional(),
    // Default 1000 with the embedded witness; 5000 with etcd, whose renewals stop for up to
    // ~2 s while it elects a new leader (README: etcd lease store).
    lease_ms: ms(500, 600_000).optional(),
    // This node's own token at the witness (its credentials file holds the digest). Default:
    // api.token_file, for a witness in shared-token mode.
    token_file: absPath.optional(),
    // CA that signed the witness's certificate (https:// URL; default: the system's CAs).
    ca_file: absPath.optional(),
    two_node_mode: z.boolean().default(false),
  }).strict().transform((w) => ({ ...w, lease_ms: w.lease_ms ?? (w.etcd ? 5_000 : 1_000) })),
  log_level: z.enum(['debug', 'info', 'warn', 'error']).default('info'),
  vms: z.array(vm).default([]),
}).strict();

export type Config = z.infer<typeof configSchema>;
export type VmConfig = Config['vms'][number];
export type DrSettings = NonNullable<VmConfig['dr']>;
export type KernelBoot = Extract<VmConfig['boot'], { kernel: string }>;
