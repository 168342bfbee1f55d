// Minimal HTTP plumbing: routes with :params, JSON bodies with a size limit, JSON errors, and
// auth (bearer token for mutations; optional source allow-list for reads). Every failure is a
// 4xx/5xx JSON answer: a bad request never crashes the agent.
import { timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { isIPv4 } from 'node:net';
import { FtkvmError, errorCode, errorMessage } from '../util/errors.ts';
import { parseCidr } from '../config/schema.ts';

export class HttpError extends FtkvmError {
  readonly status: number;
  readonly details: unknown;
  constructor(status: number, code: string, message: string, details?: unknown) {
    super(code, message);
    this.status = status;
    this.details = details;
  }
}

export type Access = 'public' | 'read' | 'write';

export interface Ctx {
  req: IncomingMessage;
  /** Who sent a valid bearer token (RouterOptions.identify's answer; `true` with a single token); null = nobody. */
  principal: unknown;
  params: Record<string, string>;
  query: URLSearchParams;
  body(): Promise<unknown>;
}

export type Reply = { status?: number; json?: unknown; text?: string; contentType?: string; headers?: Record<string, string> };

export interface Route {
  method: 'GET' | 'POST';
  path: string;           // e.g. /v1/vms/:name/drill
  access: Access;
  handler(ctx: Ctx): Promise<Reply> | Reply;
}

interface Compiled extends Route { re: RegExp; keys: string[] }

export interface RouterOptions {
  /** The one bearer token of mutating calls... */
  token?: () => string;
  /** ...or who a bearer token belongs to (null = nobody): several credentials, each its own principal. */
  identify?: (bearer: string) => unknown;
  /** Where the caller finds its token, named in the 401 answer (default: api.token_file). */
  tokenHint?: string;
  readAllow?: string[];     // CIDRs; undefined = reads open
  maxBodyBytes: number;
  onError?: (e: unknown, req: IncomingMessage) => void;
}

function compile(r: Route): Compiled {
  const keys: string[] = [];
  const re = new RegExp('^' + r.path.replace(/:[a-zA-Z]+/g, (m) => { keys.push(m.slice(1)); return '([^/]+)'; }) + '$');
  return { ...r, re, keys };
}

function ipToBigInt(ip: string): { v: bigint; bits: number } {
  if (isIPv4(ip)) return { v: ip.split('.').reduce((a, o) => (a << 8n) + BigInt(Number(o)), 0n), bits: 32 };
  // expand IPv6
  const [head, tail] = ip.split('::') as [string, string | undefined];
  const h = head ? head.split(':') : [];
  const t = tail !== undefined && tail !== '' ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  return { v: groups.reduce((a, g) => (a << 16n) + BigInt(parseInt(g || '0', 16)), 0n), bits: 128 };
}

export function ipInCidrs(remote: string, cidrs: string[]): boolean {
  const ip = remote.startsWith('::ffff:') && isIPv4(remote.slice(7)) ? remote.slice(7) : remote;
  const a = ipToBigInt(ip);
  return cidrs.some((c) => {
    const p = parseCidr(c);
    if (!p) return false;
    const b = ipToBigInt(p.addr);
    if (a.bits !== b.bits) return false;
    const shift = BigInt(a.bits - p.bits);
    return (a.v >> shift) === (b.v >> shift);
  });
}

function bearerOf(req: IncomingMessage): string | null {
  const m = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? '');
  return m ? m[1]!.trim() : null;
}

/** Constant-time comparison of a bearer token with the expected one (false when none is set). */
export function tokenOk(bearer: string, token: string): boolean {
  if (!token) return false;
  const a = Buffer.from(bearer), b = Buffer.from(token);
  return a.length === b.length && timingSafeEqual(a, b);
}

function principalOf(req: IncomingMessage, o: RouterOptions): unknown {
  const bearer = bearerOf(req);
  if (bearer === null) return null;
  if (o.identify) return o.identify(bearer) ?? null;
  return o.token && tokenOk(bearer, o.token()) ? true : null;
}

function readBody(req: IncomingMessage, limit: number): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length'] ?? '0');
    if (declared > limit) { req.resume(); reject(new HttpError(413, 'BODY_TOO_LARGE', `request body larger than ${limit} bytes`)); return; }
    let size = 0;
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > limit) { req.destroy(); reject(new HttpError(413, 'BODY_TOO_LARGE', `request body larger than ${limit} bytes`)); return; }
      chunks.push(c);
    });
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      if (!text.trim()) { resolve({}); return; }
      try { resolve(JSON.parse(text)); } catch (e) { reject(new HttpError(400, 'BAD_JSON', `request body is not valid JSON: ${errorMessage(e)}`)); }
    });
    req.on('error', reject);
  });
}

export function createRouter(routes: Route[], o: RouterOptions) {
  const compiled = routes.map(compile);
  const send = (res: ServerResponse, r: Reply) => {
    if (res.headersSent) return;
    const body = r.text ?? JSON.stringify(r.json ?? {}, null, 2) + '\n';
    res.writeHead(r.status ?? 200, { 'content-type': r.contentType ?? (r.text !== undefined ? 'text/plain; charset=utf-8' : 'application/json'), ...r.headers });
    res.end(body);
  };
  const fail = (res: ServerResponse, status: number, code: string, message: string, details?: unknown, headers?: Record<string, string>) =>
    send(res, { status, json: { error: { code, message, ...(details !== undefined ? { details } : {}) } }, headers });

  return async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    try {
      // Not `new URL()`: a request line like "//x" would parse as a protocol-relative URL.
      const rawUrl = req.url ?? '/';
      const q = rawUrl.indexOf('?');
      const pathname = q >= 0 ? rawUrl.slice(0, q) : rawUrl;
      const query = new URLSearchParams(q >= 0 ? rawUrl.slice(q + 1) : '');
      const shown = pathname.length > 200 ? pathname.slice(0, 200) + '…' : pathname;
      const matches = compiled.filter((r) => r.re.test(pathname));
      if (matches.length === 0) return fail(res, 404, 'NOT_FOUND', `no such endpoint: ${shown}`);
      const route = matches.find((r) => r.method === req.method);
      if (!route) return fail(res, 405, 'METHOD_NOT_ALLOWED', `${req.method} not allowed on ${shown}`, undefined, { allow: [...new Set(matches.map((m) => m.method))].join(', ') });
      const principal = principalOf(req, o);
      const authed = principal !== null;
      if (route.access === 'write' && !authed) {
        if (!req.headers.authorization) return fail(res, 401, 'UNAUTHENTICATED', `this endpoint needs "Authorization: Bearer <token>" (token file: ${o.tokenHint ?? 'api.token_file'})`, undefined, { 'www-authenticate': 'Bearer' });
        return fail(res, 403, 'FORBIDDEN', 'invalid bearer token');
      }
      if (route.access === 'read' && !authed && o.readAllow && !ipInCidrs(req.socket.remoteAddress ?? '', o.readAllow)) {
        return fail(res, 403, 'FORBIDDEN', `source ${req.socket.remoteAddress} not in api.read_allow; send a bearer token`);
      }
      const m = route.re.exec(pathname)!;
      const params: Record<string, string> = {};
      for (const [i, k] of route.keys.entries()) {
        try { params[k] = decodeURIComponent(m[i + 1]!); } catch { return fail(res, 400, 'BAD_PATH', `malformed percent-encoding in ${k}`); }
      }
      let bodyP: Promise<unknown> | undefined;
      const ctx: Ctx = { req, principal, params, query, body: () => (bodyP ??= readBody(req, o.maxBodyBytes)) };
      if (req.method === 'POST') await ctx.body(); // enforce limits and syntax even when the handler ignores the body
      else req.resume();
      send(res, await route.handler(ctx));
    } catch (e) {
      if (e instanceof HttpError) return fail(res, e.status, e.code, e.message, e.details);
      const code = errorCode(e);
      const status = code === 'VM_BUSY' || code === 'STALE_EPOCH' ? 409 : 500;
      if (status === 500) o.onError?.(e, req); // refusals are answers, not errors
      return fail(res, status, code, errorMessage(e));
    }
  };
}

/** Validates a JSON body against a tiny shape description; 400 with the field name otherwise. */
export function field<T>(body: unknown, name: string, type: 'string' | 'number' | 'boolean', required: boolean): T | undefined {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new HttpError(400, 'BAD_BODY', 'request body must be a JSON object');
  const v = (body as Record<string, unknown>)[name];
  if (v === undefined) {
    if (required) throw new HttpError(400, 'BAD_BODY', `missing field "${name}"`);
    return undefined;
  }
  if (typeof v !== type || (type === 'number' && !Number.isFinite(v))) throw new HttpError(400, 'BAD_BODY', `field "${name}" must be a ${type}`);
  return v as T;
}

/** An integer field within [min, max] (epochs: `1e308` is a number too); 400 otherwise. */
export function intField(body: unknown, name: string, min: number, max: number, required: boolean): number | undefined {
  const v = field<number>(body, name, 'number', required);
  if (v === undefined) return undefined;
  if (!Number.isSafeInteger(v) || v < min || v > max) throw new HttpError(400, 'BAD_BODY', `${name} must be an integer from ${min} to ${max}`);
  return v;
}
