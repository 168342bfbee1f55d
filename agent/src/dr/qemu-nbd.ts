// A local qemu-nbd serving one image on a unix socket, and the NBD client connected to it (the
// DR store's pending points, fail-back's sources, dr-pull's local disk).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { NbdClient } from '../nbd/client.ts';

/**
 * Starts `binary --socket SOCK ...args` and connects once it serves (up to 10 s). Throws with
 * qemu-nbd's own words (a missing binary, a locked image) when it does not; the process is gone then.
 */
export async function serveOverNbd(binary: string, sock: string, args: string[]): Promise<{ proc: ChildProcess; nbd: NbdClient }> {
  const proc = spawn(binary, ['--socket', sock, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.on('error', (e) => { stderr += `${e.message}\n`; });
  proc.stderr?.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-2000); });
  let nbd: NbdClient | null = null;
  for (let i = 0; i < 200 && !nbd && proc.exitCode === null; i++) {
    if (existsSync(sock)) nbd = await NbdClient.connect({ path: sock }, '', 5000).catch(() => null);
    if (!nbd) await new Promise((r) => setTimeout(r, 50));
  }
  if (!nbd) { proc.kill('SIGKILL'); throw new Error(stderr.trim() || 'no answer within 10 s'); }
  return { proc, nbd };
}

/** SIGTERM, SIGKILL after timeoutMs; resolves when the process has exited. */
export function stopProcess(p: ChildProcess, timeoutMs = 10_000): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.once('exit', () => { clearTimeout(t); resolve(); });
    p.kill('SIGTERM');
  });
}
