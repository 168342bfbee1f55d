// A stalled log reader cannot delay a fence: a real child process (test/fixtures/log-stall.ts)
// logs ~40 MB/s through the production logger while a fake fence watchdog ticks every 50 ms,
// its stderr a pipe this test does not read (full after 64 KiB-ish). The watchdog keeps its
// period, the logger drops and counts what does not fit its bound, and once the reader reads
// again every line is whole and a "dropped N log records" line accounts for every lost one.
// The sink it replaced (process.stderr.write) is run once for comparison where it blocks: a
// stderr whose open file description another process made blocking (journald's socket is
// shared with whatever the unit starts that inherits it), and a terminal.
import test from 'ava';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, constants, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { formatRecord } from '../../agent/src/log/logger.ts';
import { createFdSink } from '../../agent/src/log/sink.ts';

const FIXTURE = join(import.meta.dirname, '../fixtures/log-stall.ts');
const LOG_MS = 2000;
const MAX_GAP_MS = 200; // the fencer steps every 50 ms; a fence must not wait for a log reader
const BOUND = 4 * 1024 * 1024;

interface Result { sinkMode: string; madeBlocking: boolean; ticks: number; maxGapMs: number; logged: number; dropped: number; pendingBytes: number; maxPendingBytes: number; rssMiB: number; ms: number }
interface Run { result: Result | null; resultAfterMs: number; lines: string[]; code: number | null; exitAfterResultMs: number }

/**
 * Runs the fixture with a stderr nobody reads until its result has come (or `giveUpMs`), then
 * reads. `tty`: stderr is a terminal (script(1)'s pty, whose output is that unread pipe).
 */
function run(o: { sink: 'new' | 'old'; flip?: boolean; tty?: boolean; settleMs?: number; giveUpMs?: number; neverRead?: boolean }): Promise<Run> {
  const resultFile = join(tmpdir(), `log-stall-${process.pid}-${Math.random().toString(36).slice(2)}.json`);
  const env = { ...process.env, LOG_SINK: o.sink, FLIP: o.flip ? '1' : '', LOG_MS: String(LOG_MS), SETTLE_MS: String(o.settleMs ?? 10_000), RESULT_FILE: resultFile };
  const child = o.tty
    ? spawn('script', ['-q', '-e', '-c', `${process.execPath} --import=tsx ${FIXTURE}`, '/dev/null'], { stdio: ['pipe', 'pipe', 'ignore'], env })
    : spawn(process.execPath, ['--import=tsx', FIXTURE], { stdio: ['ignore', 'ignore', 'pipe'], env });
  const logs = (o.tty ? child.stdout : child.stderr) as Readable;
  logs.pause(); // the stalled reader
  const t0 = Date.now();
  let text = '', result: Result | null = null, resultAt = 0, reading = false;
  const read = () => { if (reading || o.neverRead) return; reading = true; logs.on('data', (d: Buffer) => { text += d.toString('utf8'); }); logs.resume(); };
  return new Promise((resolve) => {
    const poll = setInterval(() => {
      if (!result && existsSync(resultFile)) {
        const s = readFileSync(resultFile, 'utf8');
        if (s.endsWith('\n')) { result = JSON.parse(s) as Result; resultAt = Date.now(); setTimeout(read, 300); }
      }
      if (!result && Date.now() - t0 > (o.giveUpMs ?? 30_000)) read();
    }, 20);
    let exitAt = 0;
    child.on('exit', () => { exitAt = Date.now(); if (o.neverRead) logs.destroy(); });
    child.on('close', (code) => {
      clearInterval(poll);
      if (!result && existsSync(resultFile)) { result = JSON.parse(readFileSync(resultFile, 'utf8')) as Result; resultAt = Date.now(); }
      rmSync(resultFile, { force: true });
      resolve({ result, resultAfterMs: resultAt - t0, lines: text.split(/\r?\n/).filter(Boolean), code, exitAfterResultMs: exitAt - resultAt });
    });
  });
}

const LINE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info |warn |error) [\w.-]+: /;

/** Every line whole and in order; every lost record counted by a "dropped N log records" line. */
function checkLines(t: import('ava').ExecutionContext, r: Run) {
  const res = r.result!;
  const bad = r.lines.filter((l) => !LINE.test(l));
  t.deepEqual(bad.map((l) => l.slice(0, 120)), [], 'one well-formed line per record');
  const flood = r.lines.filter((l) => / stall: flood /.test(l));
  const ns = flood.map((l) => Number(/ n=(\d+) /.exec(l)![1]));
  t.true(ns.every((n, i) => i === 0 || n > ns[i - 1]!), 'in order');
  t.true(flood.every((l) => l.endsWith(' pad=' + 'x'.repeat(4000))), 'no line torn');
  const reported = r.lines.map((l) => / log: dropped (\d+) log records/.exec(l)).filter((m) => m !== null).map((m) => Number(m![1]));
  t.true(reported.length > 0, 'a "dropped N log records" line');
  t.is(reported.reduce((a, b) => a + b, 0), res.dropped, 'the dropped lines account for every dropped record');
  t.is(flood.length + res.dropped, res.logged, 'written + dropped = logged');
  t.true(r.lines.some((l) => / stall: finished /.test(l)), 'the last line, logged once the reader caught up, is there');
}

test.serial('a stalled reader of a socket stderr (journald) does not delay the watchdog; records over the bound are dropped and counted', async (t) => {
  const r = await run({ sink: 'new' });
  const res = r.result!;
  t.log(`new sink, socket: ${JSON.stringify(res)}`);
  t.is(res.sinkMode, 'nonblocking');
  t.true(res.maxGapMs < MAX_GAP_MS, `watchdog gap ${res.maxGapMs} ms`);
  t.true(res.ticks >= LOG_MS / 50 - 3, `${res.ticks} ticks`);
  t.true(res.dropped > 0, 'records dropped while the reader stalled');
  t.true(res.maxPendingBytes <= BOUND, `queue bounded: ${res.maxPendingBytes} bytes`);
  t.is(r.code, 0);
  checkLines(t, r);
});

test.serial('the same when another process made the shared descriptor blocking — where the old process.stderr sink stops the event loop', async (t) => {
  const r = await run({ sink: 'new', flip: true });
  t.log(`new sink, socket made blocking: ${JSON.stringify(r.result)}`);
  t.true(r.result!.madeBlocking, 'the descriptor really was made blocking');
  t.true(r.result!.maxGapMs < MAX_GAP_MS, `watchdog gap ${r.result!.maxGapMs} ms`);
  t.is(r.code, 0);
  checkLines(t, r);

  // The old sink: no result while the reader stalls (its event loop is stuck in write()).
  const old = await run({ sink: 'old', flip: true, giveUpMs: LOG_MS + 2500 });
  t.log(`old sink, socket made blocking: result after ${old.resultAfterMs} ms (the reader resumed at ${LOG_MS + 2500} ms): ${JSON.stringify(old.result)}`);
  t.true(old.resultAfterMs >= LOG_MS + 2500, 'the old sink blocked until the reader read');
  t.true(old.result!.maxGapMs > 1000, `old sink watchdog gap ${old.result!.maxGapMs} ms`);
});

test.serial('the old sink on an unread socket that stays non-blocking: no stall, but its queue grows without bound', async (t) => {
  const old = await run({ sink: 'old' });
  t.log(`old sink, socket: ${JSON.stringify(old.result)}`);
  t.true(old.result!.maxPendingBytes > 4 * BOUND, `unbounded: ${old.result!.maxPendingBytes} bytes queued`);
});

const hasScript = spawnSync('script', ['--version']).status === 0;
(hasScript ? test.serial : test.serial.skip)('a terminal that stops reading (a stalled console) does not delay the watchdog either; the old sink stops', async (t) => {
  const r = await run({ sink: 'new', tty: true });
  t.log(`new sink, terminal: ${JSON.stringify(r.result)}`);
  t.is(r.result!.sinkMode, 'nonblocking');
  t.true(r.result!.maxGapMs < MAX_GAP_MS, `watchdog gap ${r.result!.maxGapMs} ms`);
  t.true(r.result!.dropped > 0);
  checkLines(t, r);

  const old = await run({ sink: 'old', tty: true, giveUpMs: LOG_MS + 2500 });
  t.log(`old sink, terminal: result after ${old.resultAfterMs} ms: ${JSON.stringify(old.result)}`);
  t.true(old.result!.maxGapMs > 1000, `old sink watchdog gap ${old.result!.maxGapMs} ms`);
});

test.serial('an ordinary exit waits a bounded time for a reader that never reads', async (t) => {
  const r = await run({ sink: 'new', settleMs: 0, neverRead: true });
  t.log(`exit ${r.exitAfterResultMs} ms after the result, reader stalled throughout`);
  t.is(r.code, 0);
  t.true(r.exitAfterResultMs < 3000, `exited after ${r.exitAfterResultMs} ms`);
});

test('a record is one line: a line break in the message is escaped', (t) => {
  const l = formatRecord({ ts: 0, level: 'error', component: 'x', msg: 'two\nlines', fields: { why: 'a\nb' } });
  t.is(l, '1970-01-01T00:00:00.000Z error x: two\\nlines why="a\\nb"');
});

test('the sink on a FIFO (a pipe to another supervisor): bounded, counted, drained with a report; a reader gone is no crash', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'sink-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fifo = join(dir, 'fifo');
  t.is(spawnSync('mkfifo', [fifo]).status, 0);
  const r = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const w = openSync(fifo, constants.O_WRONLY);
  const sink = createFdSink({ fd: w, maxBytes: 256 * 1024, retryMs: 5, flushOnExit: false, droppedLine: (n) => `DROPPED ${n}` });
  t.is(sink.mode, 'nonblocking', 'opened again with O_NONBLOCK');
  const line = 'y'.repeat(1000);
  const t0 = performance.now();
  for (let i = 0; i < 2000; i++) sink.write(`${i} ${line}`);
  t.true(performance.now() - t0 < 500, 'writing 2 MB to a full pipe does not wait');
  t.true(sink.pendingBytes <= 256 * 1024);
  const dropped = sink.dropped;
  t.true(dropped > 1000, `${dropped} dropped`);
  // The reader reads: everything queued arrives, then the report.
  let text = '';
  const buf = Buffer.alloc(1 << 16);
  for (let i = 0; i < 400 && !/DROPPED \d+\n/.test(text); i++) {
    for (;;) { let n = 0; try { n = readSync(r, buf); } catch { break; } if (n <= 0) break; text += buf.toString('utf8', 0, n); }
    await new Promise((res) => setTimeout(res, 5));
  }
  const lines = text.split('\n').filter(Boolean);
  t.is(lines.at(-1), `DROPPED ${dropped}`);
  t.is(lines.length - 1 + dropped, 2000, 'written + dropped = logged');
  t.true(lines.slice(0, -1).every((l, i) => l === `${i} ${line}`), 'the first ones, whole and in order');
  t.is(sink.pendingBytes, 0);
  // The reader goes away: EPIPE, lines counted as dropped, no exception.
  closeSync(r);
  sink.write('after');
  sink.write('after');
  t.is(sink.dropped, dropped + 2);
  t.true(sink.flushSync(10));
  closeSync(w);
});

test('the sink on a regular file writes at once (the fencer\'s fencer.log)', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'sink-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fd = openSync(join(dir, 'log'), 'a');
  const sink = createFdSink({ fd, flushOnExit: false });
  t.is(sink.mode, 'file');
  sink.write('one');
  sink.write('two');
  t.is(readFileSync(join(dir, 'log'), 'utf8'), 'one\ntwo\n');
  closeSync(fd);
});
