// The ONE table of network ports ftkvm uses. The firewall role reads the same numbers from
// roles/ftkvm_firewall/vars/ports.yml; a unit test keeps the two in sync.
//
// Per protected VM, offsets from its `base_port` P. "repl" = the node's replication address.
export const VM_PORT_OFFSETS = {
  compare0: 1,      // primary, 127.0.0.1: primary's inbound packets → colo-compare
  mirror: 3,        // primary, repl: filter-mirror → secondary's redirector red0
  compare1: 4,      // primary, repl: secondary's outputs (red1) → colo-compare
  compareOut: 5,    // primary, 127.0.0.1: colo-compare's released packets → redirector
  migration: 98,    // secondary, repl: incoming COLO migration stream
  nbd: 99,          // secondary, repl: NBD export the primary replicates disk writes into
} as const;

export type VmPortName = keyof typeof VM_PORT_OFFSETS;

/** Ports that must be reachable from the peer (opened by the firewall role). */
export const PEER_FACING_VM_PORTS: VmPortName[] = ['mirror', 'compare1', 'migration', 'nbd'];

export function vmPorts(base: number): Record<VmPortName, number> {
  const out = {} as Record<VmPortName, number>;
  for (const [k, off] of Object.entries(VM_PORT_OFFSETS)) out[k as VmPortName] = base + off;
  return out;
}

/** Largest offset: base_port must leave room for it. */
export const VM_PORT_SPAN = Math.max(...Object.values(VM_PORT_OFFSETS));

/** Per-node defaults. */
export const DEFAULT_API_PORT = 7480;      // TCP: HTTP API (operators, playbooks, peer RPC)
export const DEFAULT_HEARTBEAT_PORT = 7481; // UDP: heartbeats on every path
export const DEFAULT_WITNESS_PORT = 7490;   // TCP: witness lease service (third machine)
