// Human output for the CLI: aligned tables, colors only on a terminal.
const useColor = () => !!process.stdout.isTTY && !process.env.NO_COLOR;
const wrap = (code: number) => (s: string) => (useColor() ? `\x1b[${code}m${s}\x1b[0m` : s);
export const green = wrap(32), red = wrap(31), yellow = wrap(33), bold = wrap(1), dim = wrap(2);

// eslint-disable-next-line no-control-regex
const visible = (s: string) => s.replace(/\x1b\[[0-9;]*m/g, '').length;

export function table(headers: string[], rows: string[][]): string {
  const w = headers.map((h, i) => Math.max(visible(h), ...rows.map((r) => visible(r[i] ?? ''))));
  const line = (r: string[]) => r.map((c, i) => c + ' '.repeat(w[i]! - visible(c))).join('  ').trimEnd();
  return [bold(line(headers)), ...rows.map(line)].join('\n');
}

export function ago(epochMs: number | null | undefined, now = Date.now()): string {
  if (!epochMs) return '-';
  const s = Math.max(0, Math.round((now - epochMs) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m${s % 60}s ago`;
  return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m ago`;
}

export function bytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
