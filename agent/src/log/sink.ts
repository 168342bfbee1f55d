// The production log sink: lines to a file descriptor (stderr → journald) through a bounded
// queue that never blocks the event loop, so a stalled log reader (journald busy, a pipe or
// terminal nobody reads) cannot delay the agent's timers: the fencer's watchdog, lease
// renewals, heartbeats. Past the bound, records are dropped and counted, and a later line says
// how many ("dropped N log records").
//
// Why not process.stderr: on Linux, Node makes a pipe or socket stderr non-blocking but queues
// without limit (memory grows for as long as the reader stalls), and it writes files and
// terminals synchronously (a terminal stopped with ^S, or a stalled serial console, blocks
// the event loop). Why not pino/sonic-boom: the agent's lines are text (`key=value`), and
// sonic-boom's bounded asynchronous mode writes from libuv's thread pool without making the
// descriptor non-blocking (a write stuck on a full pipe holds a pool thread, and process exit,
// which joins the pool, waits for the reader) and its exit flush retries EAGAIN without a
// time limit.
//
// How: the descriptor is made non-blocking (a pipe, FIFO or terminal is opened again through
// /proc/self/fd with O_NONBLOCK: a new open file description, so whoever shares the original
// keeps its flags; a socket, which cannot be, gets O_NONBLOCK set again before each write), and
// lines are written with writeSync, which then returns EAGAIN instead of waiting. A full pipe leaves the
// lines queued (up to maxBytes) and retries on an unref'd timer. Regular files are written
// synchronously, as before. At process exit what is queued is flushed for at most exitFlushMs.
import { fstatSync, openSync, readFileSync, write, writeSync, constants } from 'node:fs';
import { Socket } from 'node:net';

export interface FdSinkOptions {
  /** Where lines go (default 2, stderr). */
  fd?: number;
  /** Queued bytes beyond which new lines are dropped (default 4 MiB). */
  maxBytes?: number;
  /** Retry period while the reader does not take more (default 20 ms). */
  retryMs?: number;
  /** How long process exit waits for a stalled reader to take the queued lines (default 1000 ms). */
  exitFlushMs?: number;
  /** The line that reports `n` dropped lines (written once the queue has room again). */
  droppedLine?: (n: number) => string;
  /** Flush at process exit (default true). */
  flushOnExit?: boolean;
}

export interface FdSink {
  /** Queues one line ("\n" is added); drops it (counted) when the queue is full. */
  write(line: string): void;
  /** Writes what it can now and waits (blocking, at most `timeoutMs`) for the reader; true if everything was written. */
  flushSync(timeoutMs: number): boolean;
  /** How the descriptor is written: 'nonblocking' (writeSync, EAGAIN queues), 'file' (writeSync), 'async' (fs.write from the thread pool). */
  readonly mode: 'nonblocking' | 'file' | 'async';
  /** Lines dropped so far (the queue was full, or the reader went away). */
  readonly dropped: number;
  /** Bytes waiting for the reader. */
  readonly pendingBytes: number;
}

const O_NONBLOCK = constants.O_NONBLOCK ?? 0o4000;
const CHUNK = 64 * 1024;

/** Whether `fd`'s open file description is non-blocking (Linux: /proc/self/fdinfo). */
export function isNonBlocking(fd: number): boolean {
  try {
    const m = /^flags:\s*([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
    return m ? (parseInt(m[1]!, 8) & O_NONBLOCK) !== 0 : false;
  } catch { return false; }
}

interface Prepared { fd: number; mode: FdSink['mode']; /** Sets O_NONBLOCK again (a shared descriptor: someone may have cleared it); false if it cannot. */ reassert?: () => boolean }

function prepare(fd: number): Prepared {
  let st;
  try { st = fstatSync(fd); } catch { return { fd, mode: 'async' }; }
  if (st.isFile()) return { fd, mode: 'file' };
  if (st.isFIFO() || st.isCharacterDevice()) {
    try {
      const own = openSync(`/proc/self/fd/${fd}`, constants.O_WRONLY | O_NONBLOCK | constants.O_NOCTTY);
      if (isNonBlocking(own)) return { fd: own, mode: 'nonblocking' };
    } catch { /* no /proc, or not reopenable: below */ }
  }
  // A socket (journald's stream) cannot be opened again: its open file description is shared
  // (with whoever else has it: a child that inherited it may make it blocking again; Go
  // programs do), so O_NONBLOCK is set again, through libuv, before every write.
  if (st.isSocket() || st.isFIFO()) {
    const stream = fd === 1 ? process.stdout : fd === 2 ? process.stderr : new Socket({ fd, readable: false, writable: true });
    const handle = (stream as unknown as { _handle?: { setBlocking?: (on: boolean) => number } })._handle;
    if (typeof handle?.setBlocking === 'function') {
      const reassert = () => handle.setBlocking!(false) === 0;
      if (reassert() && isNonBlocking(fd)) return { fd, mode: 'nonblocking', reassert };
    }
  }
  return { fd, mode: 'async' };
}

const isAgain = (e: unknown) => { const c = (e as NodeJS.ErrnoException).code; return c === 'EAGAIN' || c === 'EWOULDBLOCK'; };

export function createFdSink(opts: FdSinkOptions = {}): FdSink {
  const { fd, mode, reassert } = prepare(opts.fd ?? 2);
  const maxBytes = opts.maxBytes ?? 4 * 1024 * 1024;
  const retryMs = opts.retryMs ?? 20;
  const droppedLine = opts.droppedLine ?? ((n: number) => `dropped ${n} log records (log reader too slow)`);
  const queue: string[] = [];
  let queued = 0;            // bytes in `queue` and `head`
  let head: Buffer | null = null; // the part of a batch not yet written
  let dropped = 0, unreported = 0;
  let waiting: NodeJS.Timeout | null = null; // EAGAIN: retry later
  let inflight = false;      // async mode: one fs.write at a time
  let broken = false;        // the reader went away (EPIPE, EBADF...): everything is dropped

  const batch = (): Buffer => {
    const parts: string[] = [];
    let n = 0;
    while (queue.length && (n === 0 || n + queue[0]!.length <= CHUNK)) { const l = queue.shift()!; parts.push(l); n += l.length; }
    return Buffer.from(parts.join(''), 'utf8');
  };
  const lose = () => { // nobody will ever read these: count them as dropped, and every later line
    let inHead = 0;
    if (head) for (const b of head) if (b === 0x0a) inHead++;
    dropped += queue.length + inHead;
    queue.length = 0; head = null; queued = 0; unreported = 0;
    broken = true;
  };
  const written = (n: number) => {
    queued -= n;
    head = n < head!.length ? head!.subarray(n) : null;
    // Room again after drops: say how many (the report itself is not subject to the bound).
    if (unreported > 0 && queued <= maxBytes / 2) {
      const l = droppedLine(unreported) + '\n';
      unreported = 0;
      queue.push(l); queued += Buffer.byteLength(l);
    }
  };
  const retryLater = () => { waiting = setTimeout(() => { waiting = null; pump(); }, retryMs); waiting.unref(); };

  function pump(): void {
    if (broken || waiting || inflight) return;
    if (mode === 'async') {
      if (!head && queue.length) head = batch();
      if (!head) return;
      inflight = true;
      write(fd, head, 0, head.length, null, (e, n) => {
        inflight = false;
        if (e) { if (isAgain(e)) { retryLater(); return; } lose(); return; }
        written(n);
        pump();
      });
      return;
    }
    if (reassert && (head || queue.length) && !reassert()) { lose(); return; }
    while (head || queue.length) {
      if (!head) head = batch();
      let n: number;
      try { n = writeSync(fd, head); } catch (e) {
        if (isAgain(e)) retryLater(); else lose();
        return;
      }
      written(n);
    }
  }

  const sink: FdSink = {
    mode,
    get dropped() { return dropped; },
    get pendingBytes() { return queued; },
    write(line: string) {
      const l = line + '\n';
      const n = Buffer.byteLength(l);
      if (broken) { dropped++; return; }
      if (queued + n > maxBytes) { dropped++; unreported++; return; }
      queue.push(l); queued += n;
      pump();
    },
    flushSync(timeoutMs: number) {
      if (mode === 'async' || broken) return queued === 0;
      if (waiting) { clearTimeout(waiting); waiting = null; }
      const end = Date.now() + timeoutMs;
      const nap = new Int32Array(new SharedArrayBuffer(4));
      for (;;) {
        pump();
        if (waiting) { clearTimeout(waiting); waiting = null; } else return queued === 0;
        if (Date.now() >= end) return false;
        Atomics.wait(nap, 0, 0, 5); // the reader is slow: a short nap, then try again
      }
    },
  };
  if (opts.flushOnExit ?? true) process.once('exit', () => { sink.flushSync(opts.exitFlushMs ?? 1000); });
  return sink;
}
