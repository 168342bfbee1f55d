// How the CLI talks to the local agent: the API address from agent.yaml (0.0.0.0 → loopback),
// the bearer token from the token file when a command mutates something.
import { readFileSync } from 'node:fs';
import { Agent as UndiciAgent, request } from 'undici';
import { loadConfigFile, realConfigFs } from '../config/load.ts';
import { parseHostPort } from '../config/schema.ts';
import { FtkvmError, errorMessage } from '../util/errors.ts';

export interface ApiTarget { base: string; token: string | null; insecure: boolean; /** CA of the agent's certificate (api.tls.ca_file). */ caFile?: string }

export function resolveTarget(opts: { config?: string; url?: string; tokenFile?: string; insecure?: boolean }): ApiTarget {
  const readToken = (f: string) => { try { return readFileSync(f, 'utf8').trim(); } catch { return null; } };
  if (opts.url) return { base: opts.url.replace(/\/$/, ''), token: opts.tokenFile ? readToken(opts.tokenFile) : null, insecure: !!opts.insecure };
  const configPath = opts.config ?? process.env.FTKVM_CONFIG ?? '/etc/ftkvm/agent.yaml';
  // Only the API section matters here: do not fail a status query over, e.g., a missing image.
  const fsLenient = { ...realConfigFs, exists: () => true, isExecutable: () => true, mode: () => 0o600 };
  const c = loadConfigFile(configPath, fsLenient);
  const hp = parseHostPort(c.api.listen)!;
  const host = hp.host === '0.0.0.0' ? '127.0.0.1' : hp.host === '::' ? '::1' : hp.host;
  const h = host.includes(':') ? `[${host}]` : host;
  return { base: `${c.api.tls ? 'https' : 'http'}://${h}:${hp.port}`, token: readToken(opts.tokenFile ?? c.api.token_file), insecure: !!opts.insecure, caFile: c.api.tls?.ca_file };
}

export async function apiCall<T>(t: ApiTarget, method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs = 10_000): Promise<{ status: number; json: T }> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (t.token) headers.authorization = `Bearer ${t.token}`;
  try {
    const res = await request(`${t.base}${path}`, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      headersTimeout: timeoutMs, bodyTimeout: timeoutMs,
      dispatcher: t.insecure ? new UndiciAgent({ connect: { rejectUnauthorized: false } })
        : t.caFile ? new UndiciAgent({ connect: { ca: readFileSync(t.caFile) } }) : undefined,
    });
    const text = await res.body.text();
    return { status: res.statusCode, json: (text ? JSON.parse(text) : {}) as T };
  } catch (e) {
    throw new FtkvmError('AGENT_UNREACHABLE', `cannot reach the ftkvm agent at ${t.base}: ${errorMessage(e)}`, { cause: e });
  }
}
