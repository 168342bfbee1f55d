// Is the replica still a faithful copy? COLO only compares network output, so a secondary whose
// memory or devices diverged can look healthy for a long time: checkpoints keep succeeding, the
// primary's replies are merely held until the next checkpoint, and the divergence is found only
// when a takeover hands clients to a guest that cannot answer. Signs used here:
//  - QEMU's own log: virtio_error() and its relatives print there when a device model meets a
//    ring it cannot process ("virtio: zero sized buffers are not allowed", "Guest moved used
//    index", …). The device is then marked broken and stays broken across every later
//    checkpoint and after a failover (QEMU 7.2 hw/virtio/virtio.c: only a device reset clears
//    vdev->broken; virtio_load does not), so such a replica can never serve again;
//  - `x-query-virtio-status` (QEMU >= 7.2): the same `broken` flag, asked directly;
//  - the guest console: a kernel oops.
import { closeSync, openSync, readSync, statSync } from 'node:fs';
import type { QmpLike } from './sequences.ts';
import { QmpCommandError } from '../qmp/errors.ts';
import type { Exec } from '../util/exec.ts';

/** Guest kernel errors on a console. */
export const GUEST_KERNEL_ERROR = /(Kernel panic|Oops:|BUG: |general protection fault|Call Trace:)/;

/**
 * Device-model errors in QEMU's log (hw/virtio/virtio.c, hw/net/virtio-net.c virtio_error()
 * messages, QEMU 7.2 … 10.x). Each one marks the device broken.
 */
export const DEVICE_ERROR = new RegExp([
  'virtio[-\\w]*: ', 'Guest moved (used|avail) index', 'Guest says index', 'Desc next is', 'Looped descriptor',
  'Cannot map (desc|used|avail|descriptor|indirect)', 'Virtqueue size exceeded', 'Incorrect order for descriptors',
  'Invalid (size|indirect) for indirect', 'bogus descriptor', 'inconsistent with Host index',
].join('|'));

/** Reads what was appended to a log file since the last call (bounded per call). */
export class LogTail {
  private offset = 0;
  constructor(readonly path: string, private readonly maxBytes = 256 * 1024) {}

  /** Forget what is there now: only lines written from here on count. */
  skipToEnd(): void {
    try { this.offset = statSync(this.path).size; } catch { this.offset = 0; }
  }

  /** The first new line matching re, or null. A file that shrank (replaced) is read from its start. */
  firstNewMatch(re: RegExp): string | null {
    let size: number;
    try { size = statSync(this.path).size; } catch { return null; }
    if (size < this.offset) this.offset = 0;
    if (size === this.offset) return null;
    const len = Math.min(size - this.offset, this.maxBytes);
    const buf = Buffer.alloc(len);
    const fd = openSync(this.path, 'r');
    try { readSync(fd, buf, 0, len, this.offset); } finally { closeSync(fd); }
    // Whole lines only (in bytes): a line still being written is read again next time; a
    // line longer than maxBytes is passed over.
    const whole = buf.lastIndexOf(0x0a) + 1;
    const take = whole > 0 ? whole : len === this.maxBytes ? len : 0;
    this.offset += take;
    const text = buf.subarray(0, take).toString('utf8');
    return text.split('\n').find((l) => re.test(l))?.trim() ?? null;
  }
}

/** The virtio devices ftkvm gives every VM (qemu/argv.ts): the NIC and the disk. */
export const VIRTIO_DEVICES = ['/machine/peripheral/nic0/virtio-backend', '/machine/peripheral/disk0/virtio-backend'];

/**
 * Names of the devices QEMU reports broken. A QEMU without x-query-virtio-status (< 7.2)
 * answers CommandNotFound: then nothing is known (null), the log is the only sign.
 */
export async function brokenVirtioDevices(q: QmpLike, paths = VIRTIO_DEVICES, timeoutMs = 2000): Promise<string[] | null> {
  const broken: string[] = [];
  for (const path of paths) {
    try {
      const st = await q.execute<{ name?: string; broken?: boolean }>('x-query-virtio-status', { path }, { timeoutMs });
      if (st.broken) broken.push(`${path.split('/')[3] ?? path} (${st.name ?? 'virtio'})`);
    } catch (e) {
      if (e instanceof QmpCommandError && e.errorClass === 'CommandNotFound') return null;
      throw e;
    }
  }
  return broken;
}

/**
 * "The guest's replies leave only at checkpoints." colo-compare releases a primary packet when
 * the secondary produced the same one, else holds it until the next checkpoint flushes it. A
 * secondary that produces no output (its NIC broken, its guest diverged or hung, its stream
 * lost) therefore makes every reply wait for the next periodic checkpoint while checkpoints
 * stay periodic: no storm, no stall, and nothing in QEMU says so.
 *
 * The cause is visible from the primary's host: the secondary's output arrives on one TCP
 * connection (its redirector → our compare1 port), and the guest's released output on the
 * tap. A replica is silent when, over `windowMs`, the primary's guest sent at least
 * `minPackets` packets and not one byte arrived from the secondary. A secondary that answers
 * differently (a guest with nondeterministic output) still sends bytes: that is the storm
 * rule's business, not this one's.
 */
export interface OutputSample { atMs: number; guestPackets: number | null; secondaryBytes: number | null }

export class SilentReplicaDetector {
  private samples: { atMs: number; guestPackets: number; secondaryBytes: number }[] = [];

  constructor(readonly windowMs: number, readonly minPackets = 3) {}

  /** One look at both counters; an unknown counter (no connection, no tap) starts over. */
  sample(s: OutputSample): void {
    if (s.guestPackets === null || s.secondaryBytes === null) { this.reset(); return; }
    const last = this.samples.at(-1);
    if (last && (s.secondaryBytes < last.secondaryBytes || s.guestPackets < last.guestPackets)) this.samples = []; // a new connection or tap
    this.samples.push({ atMs: s.atMs, guestPackets: s.guestPackets, secondaryBytes: s.secondaryBytes });
    // keep the newest sample that is at least windowMs old, and everything after it
    while (this.samples.length > 2 && s.atMs - this.samples[1]!.atMs >= this.windowMs) this.samples.shift();
  }

  reset(): void { this.samples = []; }

  verdict(): string | null {
    const first = this.samples[0], last = this.samples.at(-1);
    if (!first || !last || last.atMs - first.atMs < this.windowMs) return null;
    const sent = last.guestPackets - first.guestPackets;
    if (last.secondaryBytes !== first.secondaryBytes || sent < this.minPackets) return null;
    return `the secondary sent no output to colo-compare for ${((last.atMs - first.atMs) / 1000).toFixed(1)} s while the guest sent ${sent} packets: ` +
      'its replies leave only at checkpoints (the copy diverged, hung, or its NIC is dead)';
  }
}

/**
 * Bytes received so far per local TCP port, from `ss -tinH state established` (a header line
 * "RECV-Q SEND-Q LOCAL PEER" and an indented info line per connection; a connection that has
 * received nothing has no bytes_received field). Connections sharing a local port are added.
 */
export function parseReceivedBytes(ssOutput: string): Map<number, number> {
  const byPort = new Map<number, number>();
  const lines = ssOutput.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^\d+\s+\d+\s+(\S+):(\d+)\s+\S+:\d+/.exec(lines[i]!);
    if (!m) continue;
    const info = /^\s/.test(lines[i + 1] ?? '') ? lines[i + 1]! : '';
    const bytes = Number(/bytes_received:(\d+)/.exec(info)?.[1] ?? 0);
    byPort.set(Number(m[2]), (byPort.get(Number(m[2])) ?? 0) + bytes);
  }
  return byPort;
}

/**
 * One `ss` for the whole host, shared by every VM's controller and reused for `ttlMs`: one
 * process a second however many VMs the host protects, not one per VM.
 */
export class ReceivedBytes {
  private cache: { at: number; byPort: Promise<Map<number, number>> } | null = null;
  constructor(private readonly exec: Exec, private readonly now: () => number, private readonly ttlMs = 900) {}

  /** Bytes received on the established connection(s) to this local port, or null if there is none. */
  async onLocalPort(port: number): Promise<number | null> {
    const t = this.now();
    if (!this.cache || t - this.cache.at >= this.ttlMs) {
      this.cache = { at: t, byPort: this.exec('ss', ['-tinH', 'state', 'established']).then((r) => parseReceivedBytes(r.stdout), () => new Map()) };
    }
    return (await this.cache.byPort).get(port) ?? null;
  }
}
