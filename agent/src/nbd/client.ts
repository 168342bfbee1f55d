// A minimal NBD client (the protocol QEMU's block exports speak): fixed newstyle handshake,
// structured replies with the base:allocation meta context, NBD_OPT_GO; read, write, flush and
// block status, several requests in flight. The agent uses it to digest a disk through its own
// QEMU's export (a consistent guest view of a disk in use, which reading a qcow2 file behind
// QEMU's back is not; block status skips the ranges QEMU knows read as zeroes) and to write
// the chunks that differ into the peer's export.
// Spec: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
import { connect, type Socket } from 'node:net';
import { FtkvmError } from '../util/errors.ts';

const NBDMAGIC = 0x4e42444d41474943n;      // "NBDMAGIC"
const IHAVEOPT = 0x49484156454f5054n;      // "IHAVEOPT"
const REPLY_MAGIC = 0x3e889045565a9n;      // option reply
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const FLAG_FIXED_NEWSTYLE = 1, FLAG_NO_ZEROES = 2;
const OPT_GO = 7, OPT_STRUCTURED_REPLY = 8, OPT_SET_META_CONTEXT = 10;
const REP_ACK = 1, REP_INFO = 3, REP_META_CONTEXT = 4;
const INFO_EXPORT = 0;
const CMD_READ = 0, CMD_WRITE = 1, CMD_DISC = 2, CMD_FLUSH = 3, CMD_BLOCK_STATUS = 7;
const FLAG_READ_ONLY = 1 << 1;
const REPLY_FLAG_DONE = 1;
const REPLY_TYPE_NONE = 0, REPLY_TYPE_OFFSET_DATA = 1, REPLY_TYPE_OFFSET_HOLE = 2, REPLY_TYPE_BLOCK_STATUS = 5;
/** base:allocation: the range is a hole / reads as zeroes. */
export const STATE_HOLE = 1, STATE_ZERO = 2;
/** qemu:dirty-bitmap:NAME extents: flag 1 = dirty. */
export const STATE_DIRTY = 1;
const ALLOCATION = 'base:allocation';

export class NbdError extends FtkvmError {
  constructor(message: string, options?: { cause?: unknown }) { super('NBD_ERROR', message, options); }
}

export type NbdAddress = { path: string } | { host: string; port: number };

/** One extent of a block status answer. */
export interface Extent { offset: number; length: number; flags: number }

interface Pending {
  cmd: number; offset: number; length: number;
  /** READ (structured): bytes the data and hole chunks covered so far. */
  covered: number;
  timer: NodeJS.Timeout;
  /** READ: the data, zero-filled (holes stay zero). */
  data: Buffer | null;
  extents: Extent[];
  /** BLOCK_STATUS: the metadata context id whose extents are kept (others are ignored). */
  context: number | null;
  error: string | null;
  resolve: (p: Pending) => void; reject: (e: Error) => void;
}

/** A request not answered within this long fails, and the connection with it (a peer that lost
 * power after TCP acknowledged our writes would otherwise leave them pending for ever). */
export const NBD_REQUEST_TIMEOUT_MS = 120_000;

export class NbdClient {
  readonly size: number;
  readonly readOnly: boolean;
  private readonly sock: Socket;
  private readonly allocationContext: number | null;
  /** Negotiated metadata contexts by name (base:allocation, qemu:dirty-bitmap:NAME) → id. */
  private readonly contexts: ReadonlyMap<string, number>;
  /** Received and not yet parsed: a list (copied once per reply payload, not once per packet). */
  private chunks: Buffer[] = [];
  private buffered = 0;
  private readonly pending = new Map<bigint, Pending>();
  private nextHandle = 1n;
  private failed: Error | null = null;
  /** The reply being read: its header is parsed, its payload not yet complete. */
  private current: { handle: bigint; structured: boolean; error: number; flags: number; type: number; length: number } | null = null;

  private constructor(sock: Socket, size: number, flags: number, contexts: Map<string, number>, rest: Buffer, private readonly requestTimeoutMs: number) {
    this.sock = sock;
    this.size = size;
    this.readOnly = (flags & FLAG_READ_ONLY) !== 0;
    this.contexts = contexts;
    this.allocationContext = contexts.get(ALLOCATION) ?? null;
    if (rest.length) { this.chunks.push(rest); this.buffered = rest.length; }
    sock.on('data', (d: Buffer) => { this.chunks.push(d); this.buffered += d.length; this.drain(); });
    const fail = (e: Error) => {
      if (this.failed) return;
      this.failed = e;
      for (const p of this.pending.values()) { clearTimeout(p.timer); p.reject(e); }
      this.pending.clear();
    };
    sock.on('error', (e) => fail(new NbdError(`NBD connection failed: ${e.message}`, { cause: e })));
    sock.on('close', () => fail(new NbdError('NBD connection closed')));
    this.drain();
  }

  /** Whether block status (base:allocation) was negotiated. */
  get hasBlockStatus(): boolean { return this.allocationContext !== null; }

  /** Whether the export offered this metadata context (e.g. qemu:dirty-bitmap:NAME). */
  hasContext(name: string): boolean { return this.contexts.has(name); }

  /**
   * Connects and negotiates the export: structured replies and base:allocation (plus any
   * `extraContexts`, e.g. an exported dirty bitmap) when offered, then NBD_OPT_GO.
   */
  static async connect(addr: NbdAddress, exportName: string, timeoutMs = 10_000, requestTimeoutMs = NBD_REQUEST_TIMEOUT_MS, extraContexts: string[] = []): Promise<NbdClient> {
    const sock = 'path' in addr ? connect(addr.path) : connect(addr.port, addr.host);
    sock.setNoDelay(true);
    sock.setKeepAlive(true, 10_000); // a silently vanished peer ends the connection
    const where = 'path' in addr ? addr.path : `${addr.host}:${addr.port}`;
    const reader = new HandshakeReader(sock, timeoutMs, `NBD handshake with ${where}`);
    try {
      await reader.ready();
      const hello = await reader.take(18);
      if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdError(`${where} is not a newstyle NBD server`);
      const serverFlags = hello.readUInt16BE(16);
      if (!(serverFlags & FLAG_FIXED_NEWSTYLE)) throw new NbdError(`${where}: the NBD server does not speak fixed newstyle`);
      const clientFlags = Buffer.alloc(4);
      clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
      sock.write(clientFlags);
      const option = (opt: number, data: Buffer) => {
        const h = Buffer.alloc(16);
        h.writeBigUInt64BE(IHAVEOPT, 0); h.writeUInt32BE(opt, 8); h.writeUInt32BE(data.length, 12);
        sock.write(Buffer.concat([h, data]));
      };
      /** Replies to one option until its ACK (or an error reply). */
      const replies = async (what: string, onReply: (type: number, body: Buffer) => void): Promise<boolean> => {
        for (;;) {
          const h = await reader.take(20);
          if (h.readBigUInt64BE(0) !== REPLY_MAGIC) throw new NbdError(`${where}: bad option reply magic`);
          const type = h.readUInt32BE(12), len = h.readUInt32BE(16);
          const body = await reader.take(len);
          if (type === REP_ACK) return true;
          if (type & 0x80000000) {
            if (what === 'go') throw new NbdError(`${where}: export "${exportName}" refused (NBD_REP_ERR ${type & 0x7fffffff}${len ? ': ' + body.toString('utf8') : ''})`);
            return false; // an optional feature the server does not offer
          }
          onReply(type, body);
        }
      };
      const name = Buffer.from(exportName, 'utf8');
      option(OPT_STRUCTURED_REPLY, Buffer.alloc(0));
      const structured = await replies('structured', () => undefined);
      const contexts = new Map<string, number>();
      if (structured) {
        const wanted = [ALLOCATION, ...extraContexts].map((c) => Buffer.from(c, 'utf8'));
        const data = Buffer.alloc(4 + name.length + 4 + wanted.reduce((n, q) => n + 4 + q.length, 0));
        let o = data.writeUInt32BE(name.length, 0); o += name.copy(data, o);
        o = data.writeUInt32BE(wanted.length, o);
        for (const q of wanted) { o = data.writeUInt32BE(q.length, o); o += q.copy(data, o); }
        option(OPT_SET_META_CONTEXT, data);
        await replies('meta', (type, body) => { if (type === REP_META_CONTEXT) contexts.set(body.subarray(4).toString('utf8'), body.readUInt32BE(0)); });
      }
      const go = Buffer.alloc(4 + name.length + 2);
      go.writeUInt32BE(name.length, 0); name.copy(go, 4); go.writeUInt16BE(0, 4 + name.length); // the server sends NBD_INFO_EXPORT anyway
      option(OPT_GO, go);
      let size: number | null = null, flags = 0;
      await replies('go', (type, body) => {
        if (type === REP_INFO && body.length >= 12 && body.readUInt16BE(0) === INFO_EXPORT) { size = Number(body.readBigUInt64BE(2)); flags = body.readUInt16BE(10); }
      });
      if (size === null) throw new NbdError(`${where}: no export size in the NBD_OPT_GO reply`);
      return new NbdClient(sock, size, flags, contexts, reader.release(), requestTimeoutMs);
    } catch (e) {
      reader.release();
      sock.destroy();
      throw e instanceof NbdError ? e : new NbdError(`NBD handshake with ${where} failed: ${(e as Error).message}`, { cause: e });
    }
  }

  async read(offset: number, length: number): Promise<Buffer> { return (await this.request(CMD_READ, offset, length, null)).data!; }
  async write(offset: number, data: Buffer): Promise<void> { await this.request(CMD_WRITE, offset, data.length, data); }
  async flush(): Promise<void> { await this.request(CMD_FLUSH, 0, 0, null); }

  /**
   * Allocation of [offset, offset+length) (base:allocation): extents from `offset` on; they may
   * cover less than asked (ask again from where they end). Without the context: one data extent.
   */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (this.allocationContext === null) return [{ offset, length, flags: 0 }];
    const p = await this.request(CMD_BLOCK_STATUS, offset, length, null, this.allocationContext);
    return p.extents.length ? p.extents : [{ offset, length, flags: 0 }];
  }

  /**
   * Extents of a negotiated metadata context other than base:allocation (for a
   * qemu:dirty-bitmap context flag 1 = dirty); they may cover less than asked.
   */
  async contextStatus(context: string, offset: number, length: number): Promise<Extent[]> {
    const id = this.contexts.get(context);
    if (id === undefined) throw new NbdError(`the export did not offer the metadata context "${context}"`);
    const p = await this.request(CMD_BLOCK_STATUS, offset, length, null, id);
    if (!p.extents.length) throw new NbdError(`no "${context}" status for ${offset}+${length}`);
    return p.extents;
  }

  /** Orderly end: NBD_CMD_DISC, then the socket closes. */
  close(): void {
    if (!this.failed && !this.sock.destroyed) {
      const h = Buffer.alloc(28);
      h.writeUInt32BE(REQUEST_MAGIC, 0); h.writeUInt16BE(CMD_DISC, 6);
      this.sock.end(h);
    }
    this.sock.destroy();
  }

  private request(cmd: number, offset: number, length: number, data: Buffer | null, context: number | null = null): Promise<Pending> {
    if (this.failed) return Promise.reject(this.failed);
    if (offset < 0 || length < 0 || offset + length > this.size) return Promise.reject(new NbdError(`request beyond the export: ${offset}+${length} > ${this.size}`));
    const handle = this.nextHandle++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0); h.writeUInt16BE(0, 4); h.writeUInt16BE(cmd, 6);
    h.writeBigUInt64BE(handle, 8); h.writeBigUInt64BE(BigInt(offset), 16); h.writeUInt32BE(length, 24);
    return new Promise<Pending>((resolve, reject) => {
      const timer = setTimeout(() => this.sock.destroy(new NbdError(`NBD request (command ${cmd}, ${length} bytes at ${offset}) not answered within ${this.requestTimeoutMs} ms`)), this.requestTimeoutMs);
      timer.unref();
      this.pending.set(handle, { cmd, offset, length, covered: 0, timer, data: cmd === CMD_READ ? Buffer.alloc(length) : null, extents: [], context, error: null, resolve, reject });
      this.sock.write(data ? Buffer.concat([h, data]) : h);
    });
  }

  /** The next n received bytes (n <= buffered), as one buffer. */
  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift(); else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let off = 0;
      while (off < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - off);
        c.copy(out, off, 0, k);
        off += k;
        if (k === c.length) this.chunks.shift(); else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    return out;
  }

  private protocolError(msg: string): void { this.sock.destroy(new NbdError(msg)); }

  /** A malformed reply must end the connection, not throw out of the socket's data handler (the agent). */
  private drain(): void {
    try { this.parse(); } catch (e) { this.protocolError(`malformed NBD reply: ${(e as Error).message}`); }
  }

  private parse(): void {
    for (;;) {
      if (!this.current) {
        if (this.buffered < 4) return;
        if (this.chunks[0]!.length < 4) this.chunks = [Buffer.concat(this.chunks)]; // a header split across packets
        const magic = this.chunks[0]!.readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) {
          if (this.buffered < 16) return;
          const h = this.take(16);
          this.current = { structured: false, error: h.readUInt32BE(4), handle: h.readBigUInt64BE(8), flags: REPLY_FLAG_DONE, type: 0, length: 0 };
        } else if (magic === STRUCTURED_REPLY_MAGIC) {
          if (this.buffered < 20) return;
          const h = this.take(20);
          this.current = { structured: true, error: 0, flags: h.readUInt16BE(4), type: h.readUInt16BE(6), handle: h.readBigUInt64BE(8), length: h.readUInt32BE(16) };
        } else { this.protocolError(`bad NBD reply magic 0x${magic.toString(16)}`); return; }
      }
      const cur = this.current;
      const p = this.pending.get(cur.handle);
      if (!p) { this.protocolError(`NBD reply for an unknown handle ${cur.handle}`); return; }
      if (!cur.structured) {
        // Simple reply: a READ's data follows unless it failed.
        const need = cur.error || p.cmd !== CMD_READ ? 0 : p.length;
        if (this.buffered < need) return;
        if (need) this.take(need).copy(p.data!);
        if (cur.error) p.error = `errno ${cur.error}`;
      } else {
        if (this.buffered < cur.length) return;
        const body = this.take(cur.length);
        if (cur.type & 0x8000) {
          const errno = body.length >= 4 ? body.readUInt32BE(0) : -1, mlen = body.length >= 6 ? body.readUInt16BE(4) : 0;
          p.error = `errno ${errno}${mlen ? ': ' + body.subarray(6, 6 + mlen).toString('utf8') : ''}`;
        } else if (cur.type === REPLY_TYPE_OFFSET_DATA || cur.type === REPLY_TYPE_OFFSET_HOLE) {
          const at = Number(body.readBigUInt64BE(0)) - p.offset;
          const len = cur.type === REPLY_TYPE_OFFSET_DATA ? body.length - 8 : body.readUInt32BE(8);
          if (!p.data || at < 0 || at + len > p.length) { this.protocolError(`NBD read chunk outside its request (${at}+${len} of ${p.length})`); return; }
          if (cur.type === REPLY_TYPE_OFFSET_DATA) body.copy(p.data, at, 8); // a hole: p.data is zero-filled already
          p.covered += len;
        } else if (cur.type === REPLY_TYPE_BLOCK_STATUS) {
          if (body.readUInt32BE(0) === p.context) {
            let at = p.offset;
            for (let o = 4; o + 8 <= body.length; o += 8) {
              const len = body.readUInt32BE(o), flags = body.readUInt32BE(o + 4);
              p.extents.push({ offset: at, length: len, flags });
              at += len;
            }
          }
        } else if (cur.type !== REPLY_TYPE_NONE) { this.protocolError(`unknown NBD structured reply type ${cur.type}`); return; }
      }
      this.current = null;
      if (cur.flags & REPLY_FLAG_DONE) {
        this.pending.delete(cur.handle);
        clearTimeout(p.timer);
        // A structured read must cover its whole range (else the gap would read as zeroes).
        if (!p.error && cur.structured && p.cmd === CMD_READ && p.covered !== p.length) p.error = `read of ${p.length} bytes answered for ${p.covered}`;
        if (p.error) p.reject(new NbdError(`NBD request failed: ${p.error}`)); else p.resolve(p);
      }
    }
  }
}

/** Sequential reads during the handshake. */
class HandshakeReader {
  private buf: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private error: Error | null = null;
  private readonly timer: NodeJS.Timeout;
  private readonly onData = (d: Buffer) => { this.buf = Buffer.concat([this.buf, d]); this.waiter?.(); };

  constructor(private readonly sock: Socket, timeoutMs: number, what: string) {
    sock.on('data', this.onData);
    const fail = (e: Error) => { this.error ??= e; this.waiter?.(); };
    sock.once('error', (e) => fail(e));
    sock.once('close', () => fail(new NbdError(`${what}: connection closed`)));
    this.timer = setTimeout(() => { fail(new NbdError(`${what}: no answer within ${timeoutMs} ms`)); sock.destroy(); }, timeoutMs);
  }

  ready(): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.sock.connecting) {
        this.sock.once('connect', () => resolve());
        this.sock.once('error', (e) => reject(e));
      } else resolve();
    });
  }

  async take(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.error) throw this.error;
      await new Promise<void>((r) => { this.waiter = r; });
      this.waiter = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return Buffer.from(out);
  }

  /** The handshake is over: what was read beyond it belongs to the transmission phase. */
  release(): Buffer {
    clearTimeout(this.timer);
    this.sock.off('data', this.onData);
    this.sock.removeAllListeners('error');
    this.sock.removeAllListeners('close');
    return this.buf;
  }
}
