// Ending the replication TCP connections of a VM from outside QEMU. When the secondary's host
// vanishes silently (power loss, partition), the primary's in-flight NBD writes wait for TCP
// to give up (minutes): the guest's I/O and x-blockdev-change both hang. Destroying the
// sockets (SOCK_DESTROY via `ss -K`, kernel CONFIG_INET_DIAG_DESTROY) fails those requests at
// once; the quorum completes the write on the local child and the guest carries on.
import type { Exec } from '../util/exec.ts';
import type { VmPortName } from './ports.ts';

export function replicationSocketFilter(peerAddr: string, ports: Record<VmPortName, number>): string[] {
  // Outgoing: NBD and migration to the peer. Incoming: the peer's redirectors on our proxy ports.
  return ['dst', peerAddr, `( dport = :${ports.nbd} or dport = :${ports.migration} or sport = :${ports.mirror} or sport = :${ports.compare1} )`];
}

export async function destroyConnections(exec: Exec, filter: string[]): Promise<{ before: number; after: number }> {
  const count = async () => {
    // Only established connections can hold I/O; torn-down ones linger in TIME-WAIT.
    const { stdout } = await exec('ss', ['-Htn', 'state', 'established', ...filter]);
    return stdout.split('\n').filter((l) => l.trim()).length;
  };
  const before = await count();
  if (before > 0) await exec('ss', ['-K', '-Htn', ...filter]);
  return { before, after: before > 0 ? await count() : 0 };
}
