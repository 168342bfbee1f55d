// Time is injected so the pure parts (failure detector, leases, state machines) are testable
// with a fake clock. `now()` is wall time for reports; `mono()` is monotonic for intervals.
export interface Clock {
  now(): number;
  mono(): number;
  setTimeout(fn: () => void, ms: number): { cancel(): void };
}

export const systemClock: Clock = {
  now: () => Date.now(),
  mono: () => performance.now(),
  setTimeout(fn, ms) {
    const t = setTimeout(fn, ms);
    t.unref?.();
    return { cancel: () => clearTimeout(t) };
  },
};

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
