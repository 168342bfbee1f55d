// The states of one protected VM on one node. Changed only through VmCore.setState (colo/vm/core.ts),
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

/**
 * Every transition setState may make ('stopped' after the QEMU exited is always possible). The
 * re-attach after an agent restart moves from 'stopped' to whatever state the QEMU it finds is
 * in. setState logs an error for anything else, and the simulator counts it as a violation.
 */
export const TRANSITIONS: Readonly<Record<VmState, readonly VmState[]>> = {
  stopped: ['starting', 'preparing', 'standalone', 'protected', 'fenced', 'secondary'],
  starting: ['standalone', 'fenced', 'stopped'],
  standalone: ['syncing', 'fenced', 'stopped'],
  syncing: ['protected', 'standalone', 'fenced', 'stopped'],
  protected: ['dropping', 'fenced', 'stopped'],
  dropping: ['standalone', 'fenced', 'stopped'],
  fenced: ['standalone', 'stopped'],
  preparing: ['secondary', 'stopped'],
  secondary: ['taking-over', 'stopped'],
  'taking-over': ['standalone', 'stopped'],
  stopping: ['stopped'],
};

export const isTransition = (from: VmState, to: VmState): boolean => from === to || TRANSITIONS[from].includes(to);
