// Files of one VM on one host: /var/lib/ftkvm/vms/<vm>/...
import { join } from 'node:path';

export interface VmPaths {
  dir: string;
  qmpSocket: string;
  observerSocket: string;  // a second QMP monitor for inspection tools (never used by the agent)
  processRecord: string;   // JSON: pid, start time, role — how a restarted agent finds its QEMU
  serialLog: string;
  qemuLog: string;         // QEMU's stdout/stderr (a file, never a pipe: QEMU must outlive the agent)
  secondaryActive: string; // secondary's replication images, recreated for every new replica
  secondaryHidden: string;
}

export function vmPaths(stateDir: string, vm: string): VmPaths {
  const dir = join(stateDir, 'vms', vm);
  return {
    dir,
    qmpSocket: join(dir, 'qmp.sock'),
    observerSocket: join(dir, 'qmp-observer.sock'),
    processRecord: join(dir, 'qemu.json'),
    serialLog: join(dir, 'serial.log'),
    qemuLog: join(dir, 'qemu.log'),
    secondaryActive: join(dir, 'secondary-active.qcow2'),
    secondaryHidden: join(dir, 'secondary-hidden.qcow2'),
  };
}
