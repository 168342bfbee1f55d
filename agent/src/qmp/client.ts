// A QMP client (QEMU Machine Protocol) written here because no maintained npm one exists.
// Protocol: server greeting {"QMP": ...}; client sends qmp_capabilities; then JSON commands
// {"execute", "arguments", "id"} answered in order by {"return"|"error", "id"}; asynchronous
// {"event"} messages may arrive between replies. Lines end with \r\n.
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import type { Logger } from '../log/logger.ts';
import { QmpCommandError, QmpConnectError, QmpDisconnectedError, QmpProtocolError, QmpTimeoutError } from './errors.ts';
import type { QmpConnector } from './transport.ts';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}
export interface QmpGreeting { QMP: { version: { qemu: { major: number; minor: number; micro: number }; package: string }; capabilities: string[] } }

export type QmpClientState = 'connecting' | 'negotiating' | 'ready' | 'closed';

interface Pending { id: number; command: string; resolve(v: unknown): void; reject(e: Error): void; timer: NodeJS.Timeout | undefined }

export interface QmpClientOptions {
  /** Default per-command timeout. */
  commandTimeoutMs?: number;
  /** Time allowed for greeting + capabilities negotiation. */
  handshakeTimeoutMs?: number;
  logger?: Logger;
  /** Longest line accepted; QMP replies are small except query-qmp-schema (~500 KiB). */
  maxLineBytes?: number;
}

/** Event timestamp in epoch milliseconds. */
export const eventTimeMs = (e: QmpEvent): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [Error | undefined]; state: [QmpClientState] }> {
  private stream: Duplex | undefined;
  private buf = '';
  private nextId = 1;
  private pending: Pending[] = [];
  private abandoned = new Set<number>();
  private _state: QmpClientState = 'connecting';
  private readonly commandTimeoutMs: number;
  private readonly handshakeTimeoutMs: number;
  private readonly maxLineBytes: number;
  private readonly log: Logger | undefined;
  greeting: QmpGreeting | undefined;
  /** Resolves when the connection is gone, with the reason (undefined = closed by us). */
  readonly closed: Promise<Error | undefined>;
  private resolveClosed!: (e: Error | undefined) => void;

  private constructor(opts: QmpClientOptions) {
    super();
    this.commandTimeoutMs = opts.commandTimeoutMs ?? 10_000;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 5_000;
    this.maxLineBytes = opts.maxLineBytes ?? 8 * 1024 * 1024;
    this.log = opts.logger;
    this.closed = new Promise((r) => { this.resolveClosed = r; });
  }

  get state(): QmpClientState { return this._state; }

  private setState(to: QmpClientState): void {
    if (this._state === to) return;
    this.log?.debug('qmp state', { from: this._state, to });
    this._state = to;
    this.emit('state', to);
  }

  /** Connects, waits for the greeting and negotiates capabilities. */
  static async connect(connector: QmpConnector, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const c = new QmpClient(opts);
    const stream = await connector();
    await c.attach(stream);
    return c;
  }

  private attach(stream: Duplex): Promise<void> {
    this.stream = stream;
    stream.setEncoding('utf8');
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        const e = new QmpConnectError(`no QMP greeting/negotiation within ${this.handshakeTimeoutMs} ms`);
        this.shutdown(e);
        reject(e);
      }, this.handshakeTimeoutMs);
      const fail = (e: Error | undefined) => { clearTimeout(timer); reject(new QmpConnectError(`QMP handshake failed: ${e?.message ?? 'connection closed'}`, e)); };
      this.once('close', fail);
      this.onGreeting = (g) => {
        this.greeting = g;
        this.setState('negotiating');
        this.execute('qmp_capabilities', undefined, { timeoutMs: this.handshakeTimeoutMs }).then(() => {
          clearTimeout(timer);
          this.off('close', fail);
          this.setState('ready');
          resolve();
        }, (e: Error) => { clearTimeout(timer); this.off('close', fail); this.shutdown(e); reject(new QmpConnectError(`qmp_capabilities failed: ${e.message}`, e)); });
      };
      stream.on('data', (chunk: string) => this.onData(chunk));
      stream.on('error', (e) => this.shutdown(new QmpDisconnectedError(undefined, e)));
      stream.on('close', () => this.shutdown(undefined, true));
    });
  }

  private onGreeting: ((g: QmpGreeting) => void) | undefined;

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onLine(line);
      if (this._state === 'closed') return;
    }
    if (this.buf.length > this.maxLineBytes) this.shutdown(new QmpProtocolError(`QMP line longer than ${this.maxLineBytes} bytes`));
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      const v: unknown = JSON.parse(line);
      if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('not a JSON object');
      msg = v as Record<string, unknown>;
    } catch (e) {
      this.shutdown(new QmpProtocolError(`not QMP: ${JSON.stringify(line.slice(0, 120))}`, e));
      return;
    }
    if ('QMP' in msg) {
      const cb = this.onGreeting;
      this.onGreeting = undefined;
      if (cb) cb(msg as unknown as QmpGreeting);
      return;
    }
    if (typeof msg.event === 'string') {
      this.emit('event', msg as unknown as QmpEvent);
      return;
    }
    if ('return' in msg || 'error' in msg) {
      const id = typeof msg.id === 'number' ? msg.id : undefined;
      if (id !== undefined && this.abandoned.delete(id)) return; // late reply to a timed-out command
      // Replies come in order; one without an id (QEMU could not parse ours) belongs to the oldest.
      const idx = id === undefined ? 0 : this.pending.findIndex((p) => p.id === id);
      const p = this.pending[idx];
      if (!p) {
        this.log?.warn('QMP reply to no pending command', { id });
        return;
      }
      this.pending.splice(idx, 1);
      if (p.timer) clearTimeout(p.timer);
      if ('error' in msg) {
        const err = (msg.error ?? {}) as { class?: string; desc?: string };
        p.reject(new QmpCommandError(p.command, err.class ?? 'GenericError', err.desc ?? 'unknown error'));
      } else {
        p.resolve(msg.return);
      }
      return;
    }
    this.shutdown(new QmpProtocolError(`unexpected QMP message: ${line.slice(0, 120)}`));
  }

  /** Runs a QMP command. Rejects with QmpCommandError / QmpTimeoutError / QmpDisconnectedError. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this._state === 'closed' || !this.stream) return Promise.reject(new QmpDisconnectedError(command));
    const id = this.nextId++;
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { id, command, resolve: resolve as (v: unknown) => void, reject, timer: undefined };
      if (timeoutMs > 0) {
        p.timer = setTimeout(() => {
          const i = this.pending.indexOf(p);
          if (i >= 0) this.pending.splice(i, 1);
          this.abandoned.add(id);
          reject(new QmpTimeoutError(command, timeoutMs));
        }, timeoutMs);
      }
      this.pending.push(p);
      const msg = JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id });
      this.stream!.write(msg + '\r\n');
    });
  }

  /** Human monitor passthrough; returns HMP's text output. */
  hmp(commandLine: string, opts: { timeoutMs?: number } = {}): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine }, opts);
  }

  /** Waits for the next event `name` (optionally matching `pred`). */
  waitEvent(name: string, timeoutMs: number, pred: (e: QmpEvent) => boolean = () => true): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEv = (e: QmpEvent) => { if (e.event === name && pred(e)) { cleanup(); resolve(e); } };
      const onClose = (err: Error | undefined) => { cleanup(); reject(new QmpDisconnectedError(`wait for event ${name}`, err)); };
      const timer = setTimeout(() => { cleanup(); reject(new QmpTimeoutError(`wait for event ${name}`, timeoutMs)); }, timeoutMs);
      const cleanup = () => { clearTimeout(timer); this.off('event', onEv); this.off('close', onClose); };
      this.on('event', onEv);
      this.on('close', onClose);
    });
  }

  close(): void { this.shutdown(undefined); }

  private shutdown(reason: Error | undefined, remoteClosed = false): void {
    if (this._state === 'closed') return;
    this.setState('closed');
    const cause = reason ?? (remoteClosed ? new QmpDisconnectedError(undefined) : undefined);
    for (const p of this.pending.splice(0)) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(reason instanceof QmpProtocolError ? reason : new QmpDisconnectedError(p.command, cause));
    }
    this.stream?.destroy();
    this.emit('close', cause);
    this.resolveClosed(cause);
  }
}
