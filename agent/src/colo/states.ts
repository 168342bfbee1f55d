// The states of one protected VM on one node. Changed only through VmController.setState,
// which logs `from -> to` with the reason.
export type VmState =
  | 'stopped'      // no QEMU for this VM on this node
  | 'starting'     // launching as primary (cold start)
  | 'standalone'   // primary, running without a replica
  | 'syncing'      // primary, building a replica (resync + first checkpoint)
  | 'protected'    // primary, COLO checkpointing to a healthy secondary
  | 'dropping'     // primary, removing a lost or sick replica
  | 'fenced'       // primary, paused: isolated from both peer and witness
  | 'preparing'    // secondary QEMU started, waiting for the primary's COLO stream
  | 'secondary'    // secondary, COLO running (the replica)
  | 'taking-over'  // secondary becoming primary
  | 'stopping';    // QEMU being stopped

export type Role = 'primary' | 'standalone' | 'secondary' | 'none';

export const PRIMARY_STATES: readonly VmState[] = ['starting', 'standalone', 'syncing', 'protected', 'dropping', 'fenced', 'taking-over'];

export function roleOf(s: VmState): Role {
  switch (s) {
    case 'protected': case 'syncing': return 'primary';
    case 'starting': case 'standalone': case 'dropping': case 'fenced': case 'taking-over': return 'standalone';
    case 'preparing': case 'secondary': return 'secondary';
    default: return 'none';
  }
}

export const isPrimaryState = (s: string | undefined): boolean => !!s && (PRIMARY_STATES as readonly string[]).includes(s);
