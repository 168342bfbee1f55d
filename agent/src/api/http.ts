// Minimal HTTP plumbing: routes with :params, JSON bodies with a size limit validated by zod
// schemas, JSON errors, and auth (bearer token for mutations; optional source allow-list for
// reads, matched by net.BlockList). Every failure is a 4xx/5xx JSON answer: a bad request never
// crashes the agent.
// Bodies use zod's v4 API ('zod/v4', shipped in the zod 3.25 package whose v3 API the
// configuration uses): ~10x faster than v3 on the witness's per-lease checks (a 1000-lease
// renewal is checked in ~0.5 ms; v3 took ~4 ms).
import { timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { z } from 'zod/v4';
import { FtkvmError, errorCode, errorMessage } from '../util/errors.ts';
import { cidrMatcher } from '../util/cidr.ts';

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
  /** A PUT route's body as bytes (at most the route's rawBodyMax). */
  raw(): Promise<Buffer>;
}

/** `bytes` answers application/octet-stream (a binary reply); otherwise text or JSON. */
export type Reply = { status?: number; json?: unknown; text?: string; bytes?: Buffer; contentType?: string; headers?: Record<string, string> };

export interface Route {
  method: 'GET' | 'POST' | 'PUT';
  path: string;           // e.g. /v1/vms/:name/drill
  access: Access;
  /** PUT: the largest body (bytes, not JSON) the route takes; 413 above it. */
  rawBodyMax?: number;
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
  return readBytes(req, limit).then((buf) => {
    const text = buf.toString('utf8');
    if (!text.trim()) return {};
    try { return JSON.parse(text) as unknown; } catch (e) { throw new HttpError(400, 'BAD_JSON', `request body is not valid JSON: ${errorMessage(e)}`); }
  });
}

function readBytes(req: IncomingMessage, limit: number): Promise<Buffer> {
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
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

export function createRouter(routes: Route[], o: RouterOptions) {
  const compiled = routes.map(compile);
  const readAllowed = o.readAllow ? cidrMatcher(o.readAllow) : () => true;
  const send = (res: ServerResponse, r: Reply) => {
    if (res.headersSent) return;
    const body = r.bytes ?? r.text ?? JSON.stringify(r.json ?? {}, null, 2) + '\n';
    const type = r.bytes ? 'application/octet-stream' : r.text !== undefined ? 'text/plain; charset=utf-8' : 'application/json';
    res.writeHead(r.status ?? 200, { 'content-type': r.contentType ?? type, ...r.headers });
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
      if (route.access === 'read' && !authed && !readAllowed(req.socket.remoteAddress ?? '')) {
        return fail(res, 403, 'FORBIDDEN', `source ${req.socket.remoteAddress} not in api.read_allow; send a bearer token`);
      }
      const m = route.re.exec(pathname)!;
      const params: Record<string, string> = {};
      for (const [i, k] of route.keys.entries()) {
        try { params[k] = decodeURIComponent(m[i + 1]!); } catch { return fail(res, 400, 'BAD_PATH', `malformed percent-encoding in ${k}`); }
      }
      let bodyP: Promise<unknown> | undefined;
      let rawP: Promise<Buffer> | undefined;
      const ctx: Ctx = {
        req, principal, params, query,
        body: () => (bodyP ??= readBody(req, o.maxBodyBytes)),
        raw: () => (rawP ??= readBytes(req, route.rawBodyMax ?? o.maxBodyBytes)),
      };
      if (req.method === 'POST') await ctx.body(); // enforce limits and syntax even when the handler ignores the body
      else if (req.method === 'PUT') await ctx.raw();
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

// ---- request bodies: zod schemas, 400 BAD_BODY answers that name the field.

/** Field types of request bodies (zod v4 numbers are finite: JSON's 1e999 parses as Infinity). */
export const bodyField = {
  string: () => z.string(),
  number: () => z.number(),
  boolean: () => z.boolean(),
  /** An integer within [min, max] (epochs: `1e308` is a number too). */
  int: (min: number, max: number) => z.number()
    .refine((v) => Number.isSafeInteger(v) && v >= min && v <= max, { params: { intRange: [min, max] } }),
};

function bodyIssueMessage(i: z.core.$ZodIssue, body: object): string {
  const name = i.path.join('.');
  if (i.code === 'invalid_type') {
    const v = i.path.reduce<unknown>((o, k) => (o !== null && typeof o === 'object' ? (o as Record<PropertyKey, unknown>)[k] : undefined), body);
    return v === undefined ? `missing field "${name}"` : `field "${name}" must be a ${i.expected}`;
  }
  const range = i.code === 'custom' ? (i.params as { intRange?: [number, number] } | undefined)?.intRange : undefined;
  if (range) return `${name} must be an integer from ${range[0]} to ${range[1]}`;
  return `field "${name}": ${i.message}`;
}

/** A JSON body checked against `schema`; 400 BAD_BODY naming the first bad field (in the schema's order) otherwise. */
export function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.output<S> {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new HttpError(400, 'BAD_BODY', 'request body must be a JSON object');
  const r = schema.safeParse(body);
  if (!r.success) throw new HttpError(400, 'BAD_BODY', bodyIssueMessage(r.error.issues[0]!, body));
  return r.data;
}

const oneField = new Map<string, z.ZodType>();
function single(key: string, name: string, make: () => z.ZodType, required: boolean): z.ZodType {
  let s = oneField.get(key);
  if (!s) { const t = make(); s = z.object({ [name]: required ? t : t.optional() }); oneField.set(key, s); }
  return s;
}

/** One field of a JSON body (parseBody with a one-field schema); 400 with the field name otherwise. */
export function field<T>(body: unknown, name: string, type: 'string' | 'number' | 'boolean', required: boolean): T | undefined {
  return (parseBody(single(`${name}|${type}|${required}`, name, bodyField[type], required), body) as Record<string, unknown>)[name] as T | undefined;
}

/** An integer field within [min, max]; 400 otherwise. */
export function intField(body: unknown, name: string, min: number, max: number, required: boolean): number | undefined {
  return (parseBody(single(`${name}|int|${min}|${max}|${required}`, name, () => bodyField.int(min, max), required), body) as Record<string, number | undefined>)[name];
}
