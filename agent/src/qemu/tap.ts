// QEMU creates the VM's tap (ifname=, script=no); the agent plugs it into the guest bridge.
import { readFileSync } from 'node:fs';
import type { Exec } from '../util/exec.ts';

const NET_ADDR_SET = '3'; // /sys/class/net/*/addr_assign_type: the MAC was set explicitly

/**
 * A Linux bridge whose MAC was never set explicitly takes the lowest MAC of its ports, so
 * plugging in or removing a tap can change it. The host's address on the bridge then answers
 * from another MAC while the guest (and its replica) keep the old one in their ARP caches:
 * after a failover, the guest's replies to this host (a drill's probe, say) are flooded to the
 * taps instead of delivered until the guest re-ARPs (seen: a probe stuck for over 10 s).
 * Setting the current MAC explicitly pins it. Returns the MAC when it pinned one, else null.
 */
export async function pinBridgeMac(exec: Exec, bridge: string, read: (path: string) => string = (p) => readFileSync(p, 'utf8')): Promise<string | null> {
  const dir = `/sys/class/net/${bridge}`;
  if (read(`${dir}/addr_assign_type`).trim() === NET_ADDR_SET) return null;
  const mac = read(`${dir}/address`).trim();
  await exec('ip', ['link', 'set', 'dev', bridge, 'address', mac]);
  return mac;
}

export async function plugTap(exec: Exec, tap: string, bridge: string, timeoutMs = 5000): Promise<void> {
  const t0 = performance.now();
  for (;;) {
    try {
      await exec('ip', ['link', 'set', 'dev', tap, 'master', bridge, 'up']);
      return;
    } catch (e) {
      // The tap appears when QEMU has opened /dev/net/tun; retry briefly.
      if (performance.now() - t0 > timeoutMs) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/**
 * Packets the host received from the guest through its tap so far (the kernel's rx counter of
 * the tap = what QEMU wrote to it = what the guest sent and COLO released), or null if unknown.
 */
export function tapPacketsFromGuest(tap: string, read: (path: string) => string = (p) => readFileSync(p, 'utf8')): number | null {
  try {
    const n = Number(read(`/sys/class/net/${tap}/statistics/rx_packets`).trim());
    return Number.isFinite(n) ? n : null;
  } catch { return null; }
}
