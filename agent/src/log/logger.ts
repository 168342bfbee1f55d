// Small structured logger: one line per event, `key=value` fields, written to an injected sink
// (stderr → journald in production, an array in tests). Decisions are logged with their reason.
// The production sink (sink.ts) never blocks: a stalled log reader costs log lines (counted, and
// reported by a later "dropped N log records" line), never a late fence or lease renewal.
import { createFdSink, type FdSink } from './sink.ts';
export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type Fields = Record<string, unknown>;
export interface LogRecord { ts: number; level: Level; component: string; msg: string; fields: Fields }
export type LogSink = (rec: LogRecord) => void;

export interface Logger {
  debug(msg: string, fields?: Fields): void;
  info(msg: string, fields?: Fields): void;
  warn(msg: string, fields?: Fields): void;
  error(msg: string, fields?: Fields): void;
  child(component: string, fields?: Fields): Logger;
}

function fmtValue(v: unknown): string {
  if (v === undefined) return 'undefined';
  if (v instanceof Error) v = v.message;
  const s = typeof v === 'string' ? v : JSON.stringify(v);
  return /[\s"=]/.test(s) || s === '' ? JSON.stringify(s) : s;
}

/** One line (journald: one entry per record): a line break in the message is written as `\n`. */
export function formatRecord(r: LogRecord): string {
  const kv = Object.entries(r.fields).map(([k, v]) => `${k}=${fmtValue(v)}`).join(' ');
  return `${new Date(r.ts).toISOString()} ${r.level.padEnd(5)} ${r.component}: ${r.msg.replace(/\r?\n/g, '\\n')}${kv ? ' ' + kv : ''}`;
}

/** The line a bounded sink writes when it had to drop records. */
export const droppedRecordsLine = (n: number): string =>
  formatRecord({ ts: Date.now(), level: 'warn', component: 'log', msg: `dropped ${n} log records (the log reader did not keep up)`, fields: { dropped: n } });

let stderr: FdSink | undefined;
/** The process's stderr as a bounded, non-blocking sink (created on first use, one per process). */
export function stderrFdSink(): FdSink {
  return stderr ??= createFdSink({ fd: 2, droppedLine: droppedRecordsLine });
}

export const stderrSink: LogSink = (r) => { stderrFdSink().write(formatRecord(r)); };

export function createLogger(opts: { sink?: LogSink; level?: Level; component?: string; fields?: Fields; now?: () => number } = {}): Logger {
  const sink = opts.sink ?? stderrSink;
  const min = ORDER[opts.level ?? 'info'];
  const now = opts.now ?? Date.now;
  const make = (component: string, base: Fields): Logger => {
    const emit = (level: Level, msg: string, fields?: Fields) => {
      if (ORDER[level] < min) return;
      sink({ ts: now(), level, component, msg, fields: { ...base, ...fields } });
    };
    return {
      debug: (m, f) => emit('debug', m, f),
      info: (m, f) => emit('info', m, f),
      warn: (m, f) => emit('warn', m, f),
      error: (m, f) => emit('error', m, f),
      child: (c, f) => make(c, { ...base, ...f }),
    };
  };
  return make(opts.component ?? 'ftkvm', opts.fields ?? {});
}

/** A logger that keeps records in memory (tests). */
export function memoryLogger(level: Level = 'debug'): Logger & { records: LogRecord[] } {
  const records: LogRecord[] = [];
  const l = createLogger({ sink: (r) => records.push(r), level });
  return Object.assign(l, { records });
}
