// The witness's lease rules, pure (unit-tested). One lease per VM: who may run it as primary,
// at which epoch (generation), until when. Epochs only grow; a lease held by another node is
// granted away only after it expired, so an isolated primary that paused itself when its own
// lease ran out (measured from before it asked) can never overlap with the new primary.
// Times are the witness's monotonic clock (ms): a step of its wall clock (NTP) must not expire
// a lease early.
export interface Lease { holder: string; epoch: number; expiresAt: number; grantedAt: number; leaseMs: number }
export interface AcquireRequest { node: string; epoch: number; leaseMs: number }
export type AcquireResult =
  | { granted: true; lease: Lease; previous: Lease | null }
  | { granted: false; current: Lease; reason: string; retryAfterMs: number | null };

export const MAX_LEASE_MS = 60_000;
export const MIN_LEASE_MS = 100;
/** Epochs are promotions: 2^31 - 1 of them is beyond any VM's life; anything larger is an attack or a bug. */
export const MAX_EPOCH = 2 ** 31 - 1;

/** A valid epoch: a safe integer in 1..MAX_EPOCH (`1e308` is a number, and would block every later takeover). */
export const isValidEpoch = (e: unknown): e is number => typeof e === 'number' && Number.isSafeInteger(e) && e >= 1 && e <= MAX_EPOCH;

export function decideAcquire(cur: Lease | undefined, req: AcquireRequest, now: number): AcquireResult {
  const leaseMs = Math.max(MIN_LEASE_MS, Math.min(req.leaseMs, MAX_LEASE_MS));
  const grant = (): AcquireResult => ({ granted: true, lease: { holder: req.node, epoch: req.epoch, expiresAt: now + leaseMs, grantedAt: now, leaseMs }, previous: cur ?? null });
  if (!cur) return grant();
  if (req.epoch < cur.epoch) {
    return { granted: false, current: cur, reason: `stale epoch ${req.epoch}: ${cur.holder} holds epoch ${cur.epoch}`, retryAfterMs: null };
  }
  if (cur.holder === req.node) return grant(); // renewal, or a promotion by the holder itself
  if (req.epoch === cur.epoch) {
    return { granted: false, current: cur, reason: `epoch ${req.epoch} belongs to ${cur.holder}; a takeover needs a newer epoch`, retryAfterMs: null };
  }
  if (now < cur.expiresAt) {
    return { granted: false, current: cur, reason: `${cur.holder} holds a valid lease for epoch ${cur.epoch} (${Math.ceil(cur.expiresAt - now)} ms left)`, retryAfterMs: Math.ceil(cur.expiresAt - now) };
  }
  return grant();
}

/** A renewal by the holder at its epoch changes nothing durable (only the expiry, which a restart resets). */
export const isRenewal = (cur: Lease | undefined, req: AcquireRequest): boolean => !!cur && cur.holder === req.node && cur.epoch === req.epoch;

export type ReleaseResult = { released: true; lease: Lease } | { released: false; reason: string };

/**
 * The holder gives its lease up now (its QEMU is gone: a crash, a drill, a switchover), so the
 * successor's takeover does not wait for the expiry. Only the holder, only at its epoch; the
 * epoch stays (the successor still needs a newer one).
 */
export function decideRelease(cur: Lease | undefined, req: { node: string; epoch: number }, now: number): ReleaseResult {
  if (!cur) return { released: false, reason: 'no lease' };
  if (cur.holder !== req.node || cur.epoch !== req.epoch) return { released: false, reason: `${cur.holder} holds epoch ${cur.epoch}, not ${req.node} at ${req.epoch}` };
  return { released: true, lease: { ...cur, expiresAt: Math.min(cur.expiresAt, now) } };
}

/**
 * After a witness restart, renewals since the last durable write are unknown: every lease counts
 * as just renewed. No holder counts its lease valid beyond (its last answered renewal + its lease
 * length), and all of those were answered before the restart, so nothing is granted to another
 * node while a holder may still run on its lease.
 */
export function afterRestart(leases: Record<string, Omit<Lease, 'expiresAt'> & { expiresAt?: number }>, now: number): Record<string, Lease> {
  const out: Record<string, Lease> = {};
  for (const [vm, l] of Object.entries(leases)) {
    const leaseMs = Math.max(MIN_LEASE_MS, Math.min(l.leaseMs ?? MAX_LEASE_MS, MAX_LEASE_MS));
    out[vm] = { holder: l.holder, epoch: l.epoch, grantedAt: l.grantedAt, leaseMs, expiresAt: now + leaseMs };
  }
  return out;
}
