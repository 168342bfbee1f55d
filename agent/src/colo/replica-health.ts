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
    // Only whole lines: a line still being written is read again next time.
    const text = buf.toString('utf8');
    const end = len === size - this.offset && !text.endsWith('\n') ? text.lastIndexOf('\n') + 1 : len;
    this.offset += end === 0 && len === this.maxBytes ? len : Buffer.byteLength(text.slice(0, end));
    return text.slice(0, end).split('\n').find((l) => re.test(l))?.trim() ?? null;
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
 * secondary that produces no output (its NIC broken, its guest diverged or hung) therefore
 * makes every reply wait for the next periodic checkpoint while checkpoints stay periodic: no
 * storm, no stall, and nothing in QEMU says so. Seen from the host, the primary's tap then
 * receives guest packets only in the moments right after checkpoints, never between them.
 *
 * Fed with the tap's received-packet counter (guest → host) at each checkpoint's STOP and a
 * moment after its RESUME. A checkpoint "held" the output when packets left at it and none
 * left in the interval before it; `limit` such checkpoints in a row are the verdict. An idle
 * interval (no packet either way) is neither evidence nor counter-evidence.
 */
export class HeldOutputDetector {
  private atStop: number | null = null;
  private afterLastResume: number | null = null;
  private streak = 0;
  private heldPackets = 0;

  constructor(readonly limit = 3) {}

  /** A checkpoint began (STOP); count = tap packets from the guest so far (null: unknown). */
  stopped(count: number | null): void { this.atStop = count; }

  /** Sampled a moment after the checkpoint's RESUME (the flushed packets have reached the tap). */
  resumed(count: number | null): void {
    if (count === null || this.atStop === null) { this.reset(); return; }
    if (this.afterLastResume !== null) {
      const between = this.atStop - this.afterLastResume;
      const atCheckpoint = count - this.atStop;
      if (between > 0) { this.streak = 0; this.heldPackets = 0; } else if (atCheckpoint > 0) { this.streak++; this.heldPackets += atCheckpoint; }
    }
    this.afterLastResume = count;
    this.atStop = null;
  }

  /** Forget everything (a new protection period, or samples that cannot be paired). */
  reset(): void { this.atStop = null; this.afterLastResume = null; this.streak = 0; this.heldPackets = 0; }

  verdict(): string | null {
    return this.streak >= this.limit
      ? `the guest's output left only at checkpoints for ${this.streak} checkpoints in a row (${this.heldPackets} packets held until a checkpoint, none matched in between): the secondary produces no matching output (its copy diverged or its NIC is dead)`
      : null;
  }
}
