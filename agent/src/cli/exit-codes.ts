// Documented in the README ("CLI").
export const EXIT = {
  OK: 0,
  FAILURE: 1,          // runtime failure
  USAGE: 2,            // bad command line or invalid configuration
  QEMU_UNSUPPORTED: 3, // QEMU lacks COLO support
  UNREACHABLE: 4,      // the agent API could not be reached
  UNHEALTHY: 5,        // status --check: not every VM protected / drill failed / switchover refused
} as const;
