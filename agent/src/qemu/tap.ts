// QEMU creates the VM's tap (ifname=, script=no); the agent plugs it into the guest bridge.
import type { Exec } from '../util/exec.ts';

export async function plugTap(exec: Exec, tap: string, bridge: string, timeoutMs = 5000): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    try {
      await exec('ip', ['link', 'set', 'dev', tap, 'master', bridge, 'up']);
      return;
    } catch (e) {
      // The tap appears when QEMU has opened /dev/net/tun; retry briefly.
      if (Date.now() - t0 > timeoutMs) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
