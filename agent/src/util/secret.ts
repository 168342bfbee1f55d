// Token and key files (API token, heartbeat key, witness tokens): read once, trimmed, and
// refused when too short to be a secret.
import { readFileSync } from 'node:fs';
import { FtkvmError } from './errors.ts';

export const MIN_SECRET_CHARS = 16;

export function readSecret(file: string): string {
  const s = readFileSync(file, 'utf8').trim();
  if (s.length < MIN_SECRET_CHARS) throw new FtkvmError('TOKEN_WEAK', `${file}: must hold at least ${MIN_SECRET_CHARS} characters`);
  return s;
}
