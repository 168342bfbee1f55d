// Agent-to-agent RPC over HTTP (undici), authenticated with the shared bearer token. Each call
// tries the peer's addresses in turn (replication and management networks), so one cut link
// does not stop the pair from agreeing.
import { Agent, request } from 'undici';
import { readFileSync } from 'node:fs';
import { FtkvmError, errorMessage } from '../util/errors.ts';

export class PeerRpcError extends FtkvmError {
  readonly status: number | null;
  constructor(message: string, status: number | null, cause?: unknown) {
    super(status === null ? 'PEER_UNREACHABLE' : 'PEER_REJECTED', message, { cause });
    this.status = status;
  }
}

export interface PeerClientOptions {
  addresses: string[];
  port: number;
  token: () => string;
  tls?: { caFile?: string };
  preferred?: () => number[]; // address indexes in the order to try (e.g. most recently heard first)
}

export class PeerClient {
  private readonly o: PeerClientOptions;
  private readonly dispatcher: Agent;

  constructor(o: PeerClientOptions) {
    this.o = o;
    this.dispatcher = new Agent({
      connectTimeout: 1000,
      keepAliveTimeout: 10_000,
      connect: o.tls ? { ca: o.tls.caFile ? readFileSync(o.tls.caFile) : undefined } : undefined,
    });
  }

  async call<T>(method: 'GET' | 'POST', path: string, body: unknown, timeoutMs: number, extraHeaders: Record<string, string> = {}): Promise<T> {
    return (await this.callRaw<T>(method, path, body, timeoutMs, extraHeaders, true)).json;
  }

  /** Like call(), but with `throwOnStatus: false` returns 4xx/5xx answers instead of throwing. */
  async callRaw<T>(method: 'GET' | 'POST', path: string, body: unknown, timeoutMs: number, extraHeaders: Record<string, string> = {}, throwOnStatus = false): Promise<{ status: number; json: T }> {
    const order = this.o.preferred?.() ?? this.o.addresses.map((_, i) => i);
    const scheme = this.o.tls ? 'https' : 'http';
    let lastErr: unknown;
    for (const i of order) {
      const addr = this.o.addresses[i]!;
      const host = addr.includes(':') ? `[${addr}]` : addr;
      try {
        const res = await request(`${scheme}://${host}:${this.o.port}${path}`, {
          method,
          dispatcher: this.dispatcher,
          headers: { authorization: `Bearer ${this.o.token()}`, 'content-type': 'application/json', ...extraHeaders },
          body: body === undefined ? undefined : JSON.stringify(body),
          headersTimeout: timeoutMs,
          bodyTimeout: timeoutMs,
        });
        const text = await res.body.text();
        const json = text ? JSON.parse(text) as unknown : undefined;
        if (res.statusCode >= 400 && throwOnStatus) {
          const msg = (json as { error?: { message?: string } } | undefined)?.error?.message ?? text;
          throw new PeerRpcError(`peer ${method} ${path} → ${res.statusCode}: ${msg}`, res.statusCode);
        }
        return { status: res.statusCode, json: json as T };
      } catch (e) {
        if (e instanceof PeerRpcError && e.status !== null) throw e; // the peer answered: do not retry elsewhere
        lastErr = e;
      }
    }
    throw new PeerRpcError(`peer unreachable for ${method} ${path} on ${this.o.addresses.join(', ')}: ${errorMessage(lastErr)}`, null, lastErr);
  }

  close(): Promise<void> { return this.dispatcher.close(); }
}
