// The real test guest (built or reused from the cache by scripts/build-test-guest.mjs).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
export const AGENT_BIN = join(ROOT, 'dist', 'ftkvm-agent');

export interface GuestManifest { kernel: string; initrd: string; append: string; tcgShim: string; kernelPackage: string; kernelVersion: string }

let cached: GuestManifest | undefined;
export function testGuest(): GuestManifest {
  cached ??= JSON.parse(execFileSync(process.execPath, [join(ROOT, 'scripts/build-test-guest.mjs'), '--json'], { stdio: ['ignore', 'pipe', 'inherit'] }).toString()) as GuestManifest;
  return cached;
}

export interface SerialTick { n: number; disk: number }

/** Parses the guest console: ticks (memory counter + value read back from disk) and transactions. */
export function parseSerial(path: string): { ticks: SerialTick[]; txns: number[]; up: boolean; oops: boolean } {
  let text = '';
  try { text = readFileSync(path, 'utf8'); } catch { /* not yet */ }
  const ticks: SerialTick[] = [], txns: number[] = [];
  let up = false, oops = false;
  for (const raw of text.split('\n')) {
    const l = raw.replace(/\r/g, '');
    let m;
    if ((m = /^tick (\d+) disk=(\d*)$/.exec(l))) ticks.push({ n: Number(m[1]), disk: Number(m[2] || 0) });
    else if ((m = /^txn (\d+)$/.exec(l))) txns.push(Number(m[1]));
    else if (l.startsWith('GUEST-UP')) up = true;
    else if (/Kernel panic|Oops:|BUG: /.test(l)) oops = true;
  }
  return { ticks, txns, up, oops };
}
