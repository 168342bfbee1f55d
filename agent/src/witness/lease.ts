// The witness's lease rules, pure (unit-tested). One lease per VM: who may run it as primary,
// at which epoch (generation), until when. Epochs only grow; a lease held by another node is
// granted away only after it expired, so an isolated primary that paused itself when its own
// lease ran out (measured from before it asked) can never overlap with the new primary.
export interface Lease { holder: string; epoch: number; expiresAt: number; grantedAt: number }
export interface AcquireRequest { node: string; epoch: number; leaseMs: number }
export type AcquireResult =
  | { granted: true; lease: Lease; previous: Lease | null }
  | { granted: false; current: Lease; reason: string; retryAfterMs: number | null };

export const MAX_LEASE_MS = 60_000;

export function decideAcquire(cur: Lease | undefined, req: AcquireRequest, now: number): AcquireResult {
  const leaseMs = Math.max(100, Math.min(req.leaseMs, MAX_LEASE_MS));
  const grant = (): AcquireResult => ({ granted: true, lease: { holder: req.node, epoch: req.epoch, expiresAt: now + leaseMs, grantedAt: now }, previous: cur ?? null });
  if (!cur) return grant();
  if (req.epoch < cur.epoch) {
    return { granted: false, current: cur, reason: `stale epoch ${req.epoch}: ${cur.holder} holds epoch ${cur.epoch}`, retryAfterMs: null };
  }
  if (cur.holder === req.node) return grant(); // renewal, or a promotion by the holder itself
  if (req.epoch === cur.epoch) {
    return { granted: false, current: cur, reason: `epoch ${req.epoch} belongs to ${cur.holder}; a takeover needs a newer epoch`, retryAfterMs: null };
  }
  if (now < cur.expiresAt) {
    return { granted: false, current: cur, reason: `${cur.holder} holds a valid lease for epoch ${cur.epoch} (${cur.expiresAt - now} ms left)`, retryAfterMs: cur.expiresAt - now };
  }
  return grant();
}
