// The DR target's HTTP protocol (bearer token on every call but /health), shared by the
// shipper (the VM's primary) and the target (`ftkvm-agent dr-target` on the DR host):
//   GET  /v1/dr/vms                          every VM's recovery points
//   GET  /v1/dr/vms/{vm}                     one VM's points, newest last
//   POST /v1/dr/vms/{vm}/points {sizeBytes, capturedAt, from, epoch, keep}
//        201 {id, newest}   a pending point on top of the newest (`newest`: its id or null)
//   POST /v1/dr/vms/{vm}/points/{id}/digests {chunkBytes}   → bytes: the pending point's chunk digests
//   PUT  /v1/dr/vms/{vm}/points/{id}/data?offset=N   body: the bytes at N (≤ MAX_PUT_BYTES)
//   POST /v1/dr/vms/{vm}/points/{id}/commit {mode, bytesShipped}   → 200 {point}: now a recovery point
//   POST /v1/dr/vms/{vm}/points/{id}/abort   the pending point is deleted
//   POST /v1/dr/vms/{vm}/test {point?, timeoutS?}         boot a copy isolated, probe it, discard it
//   POST /v1/dr/vms/{vm}/activate {point?, confirmSiteLost?, timeoutS?}   DR failover
//   GET  /health, GET /metrics
// A pending point is invisible (not in the list, not bootable) until its commit is answered.
import { Agent, request } from 'undici';
import { readFileSync } from 'node:fs';
import { FtkvmError } from '../util/errors.ts';

export const MAX_PUT_BYTES = 4 * 1024 * 1024;
export const DEFAULT_DR_PORT = 7610;

export interface RecoveryPoint {
  id: string;
  /** When the primary took the point-in-time view (ms since the epoch): the data's age starts here. */
  capturedAt: number;
  /** When it became a recovery point on the DR host. */
  committedAt: number;
  from: string;
  epoch: number;
  sizeBytes: number;
  /** delta: the blocks a dirty bitmap marked; digest: chunks whose digests differed; full: everything that is not zero. */
  mode: 'delta' | 'digest' | 'full';
  bytesShipped: number;
}

export interface VmPoints {
  vm: string;
  points: RecoveryPoint[];
  /** Set once a DR failover started the VM here: no more points are taken in. */
  activated: { at: number; point: string; epoch: number | null } | null;
}

export class DrTargetError extends FtkvmError {
  readonly status: number | null;
  constructor(message: string, status: number | null, code?: string) {
    super(code ?? (status === null ? 'DR_TARGET_UNREACHABLE' : 'DR_TARGET_REJECTED'), message);
    this.status = status;
  }
}

/** The shipper's side of the protocol. */
export class DrTargetClient {
  private readonly dispatcher: Agent;
  constructor(private readonly base: string, private readonly token: () => string, caFile?: string) {
    this.dispatcher = new Agent({ connectTimeout: 5000, keepAliveTimeout: 30_000, connect: caFile ? { ca: readFileSync(caFile) } : undefined });
  }

  private async call(method: 'GET' | 'POST' | 'PUT', path: string, body: unknown, timeoutMs: number, raw?: Buffer, signal?: AbortSignal): Promise<{ json?: unknown; bytes?: Buffer }> {
    let res;
    try {
      res = await request(`${this.base.replace(/\/$/, '')}${path}`, {
        method, dispatcher: this.dispatcher, headersTimeout: timeoutMs, bodyTimeout: timeoutMs, signal,
        headers: { authorization: `Bearer ${this.token()}`, 'content-type': raw ? 'application/octet-stream' : 'application/json' },
        body: raw ?? (body === undefined ? undefined : JSON.stringify(body)),
      });
    } catch (e) {
      throw new DrTargetError(`DR target ${this.base} unreachable for ${method} ${path}: ${(e as Error).message}`, null);
    }
    if ((res.headers['content-type'] ?? '').toString().startsWith('application/octet-stream') && res.statusCode < 400) return { bytes: Buffer.from(await res.body.arrayBuffer()) };
    const text = await res.body.text();
    const json = text ? JSON.parse(text) as unknown : undefined;
    if (res.statusCode >= 400) {
      const err = (json as { error?: { code?: string; message?: string } } | undefined)?.error;
      throw new DrTargetError(`DR target ${method} ${path} → ${res.statusCode}: ${err?.message ?? text}`, res.statusCode, err?.code);
    }
    return { json };
  }

  async points(vm: string): Promise<VmPoints> { return (await this.call('GET', `/v1/dr/vms/${vm}`, undefined, 10_000)).json as VmPoints; }
  // A re-protection aborts a point in flight: `signal` ends the request at once.
  async begin(vm: string, signal: AbortSignal, b: { sizeBytes: number; capturedAt: number; from: string; epoch: number; keep: number }): Promise<{ id: string; newest: string | null }> {
    return (await this.call('POST', `/v1/dr/vms/${vm}/points`, b, 60_000, undefined, signal)).json as { id: string; newest: string | null };
  }
  async digests(vm: string, id: string, chunkBytes: number, signal?: AbortSignal): Promise<Buffer> {
    return (await this.call('POST', `/v1/dr/vms/${vm}/points/${id}/digests`, { chunkBytes }, 3600_000, undefined, signal)).bytes!;
  }
  async put(vm: string, id: string, offset: number, data: Buffer, signal?: AbortSignal): Promise<void> { await this.call('PUT', `/v1/dr/vms/${vm}/points/${id}/data?offset=${offset}`, undefined, 120_000, data, signal); }
  async commit(vm: string, id: string, b: { mode: RecoveryPoint['mode']; bytesShipped: number }, signal?: AbortSignal): Promise<RecoveryPoint> {
    return ((await this.call('POST', `/v1/dr/vms/${vm}/points/${id}/commit`, b, 600_000, undefined, signal)).json as { point: RecoveryPoint }).point;
  }
  async abort(vm: string, id: string): Promise<void> { await this.call('POST', `/v1/dr/vms/${vm}/points/${id}/abort`, {}, 60_000); }
  close(): Promise<void> { return this.dispatcher.close(); }
}
