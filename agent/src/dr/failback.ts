// Fail-back, the DR host's side: the VM's disk as the rebuilt primary site reads it.
//   seed  — the recovery point the VM was activated from (a stable chain): read while the VM
//           still runs here, so most of the disk is copied before the planned stop;
//   final — the VM's own disk here (its overlay on that point), once the VM is stopped: only
//           the chunks that differ from what the seed left cross.
// Each source is a read-only qemu-nbd on a unix socket, opened on demand and closed at deactivate.
import type { ChildProcess } from 'node:child_process';
import { serveOverNbd } from './qemu-nbd.ts';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { NbdClient } from '../nbd/client.ts';
import { DrStoreError } from './store.ts';

export type FailbackStage = 'seed' | 'final';

interface Source { proc: ChildProcess; nbd: NbdClient; sock: string }

/** The pid of the VM's QEMU at the DR site, if it runs (from its pidfile). */
export function activePid(dir: string): number | null {
  try {
    const pid = Number(readFileSync(join(dir, 'active.pid'), 'utf8').trim());
    if (!pid) return null;
    // That pid is our QEMU (the pidfile may outlive it, and pids are reused).
    if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('-active,debug-threads=on')) return null;
    return pid;
  } catch { return null; }
}

export class FailbackSources {
  private readonly open = new Map<string, Source>();
  constructor(private readonly nbdBinary: string) {}

  async get(vm: string, stage: FailbackStage, file: string, dir: string): Promise<NbdClient> {
    const key = `${vm}/${stage}`;
    const have = this.open.get(key);
    if (have) return have.nbd;
    if (stage === 'final' && activePid(dir) !== null) throw new DrStoreError(409, 'DR_VM_RUNNING', `${vm} still runs at the DR site: stop it first (POST /v1/dr/vms/${vm}/stop)`);
    if (!existsSync(file)) throw new DrStoreError(404, 'NO_SOURCE', `${vm}: ${file} does not exist`);
    const sock = join(dir, `failback-${stage}.sock`);
    rmSync(sock, { force: true });
    const { proc, nbd } = await serveOverNbd(this.nbdBinary, sock, ['--format', 'qcow2', '--read-only', '--shared', '4', '--persistent', file])
      .catch(() => { throw new DrStoreError(500, 'DR_STORE_FAILED', `qemu-nbd did not serve ${file}`); });
    this.open.set(key, { proc, nbd, sock });
    return nbd;
  }

  close(vm?: string): void {
    for (const [key, s] of [...this.open]) {
      if (vm && !key.startsWith(`${vm}/`)) continue;
      s.nbd.close(); s.proc.kill('SIGTERM'); rmSync(s.sock, { force: true });
      this.open.delete(key);
    }
  }
}
