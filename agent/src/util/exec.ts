// Running short external commands (ip, qemu-img) behind an interface so the core stays testable.
import { execFile } from 'node:child_process';
import { FtkvmError } from './errors.ts';

export interface ExecResult { stdout: string; stderr: string }
export type Exec = (cmd: string, args: string[], opts?: { timeoutMs?: number; env?: NodeJS.ProcessEnv }) => Promise<ExecResult>;

export class ExecError extends FtkvmError {
  readonly stderr: string;
  constructor(cmd: string, args: string[], stderr: string, cause: unknown) {
    super('EXEC_FAILED', `${[cmd, ...args].join(' ')} failed: ${stderr.trim().split('\n').slice(-3).join(' / ') || (cause as Error)?.message}`, { cause });
    this.stderr = stderr;
  }
}

export const realExec: Exec = (cmd, args, opts = {}) => new Promise((resolve, reject) => {
  execFile(cmd, args, { timeout: opts.timeoutMs ?? 30_000, env: opts.env ?? process.env, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
    if (err) reject(new ExecError(cmd, args, String(stderr ?? ''), err));
    else resolve({ stdout: String(stdout), stderr: String(stderr) });
  });
});
