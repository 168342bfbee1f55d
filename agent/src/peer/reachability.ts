// Is the peer HOST up, even if its agent is not? A TCP connect to the peer's API port gets an
// answer from a live kernel (accepted, or RST when the agent is down) and nothing from a dead
// host or a cut network. Used only after heartbeats went silent, to tell "agent restarting"
// (hold on: its QEMU keeps running) from "host gone" (fail over).
import { connect } from 'node:net';

export type Reachability = 'answered' | 'silent';

export function probeTcp(host: string, port: number, timeoutMs: number): Promise<Reachability> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    const done = (r: Reachability) => { clearTimeout(t); s.destroy(); resolve(r); };
    const t = setTimeout(() => done('silent'), timeoutMs);
    s.once('connect', () => done('answered'));
    s.once('error', (e: NodeJS.ErrnoException) => done(e.code === 'ECONNREFUSED' || e.code === 'ECONNRESET' ? 'answered' : 'silent'));
  });
}

/** 'answered' if any address answers within the timeout. */
export async function probeHost(addresses: string[], port: number, timeoutMs: number): Promise<Reachability> {
  const results = await Promise.all(addresses.map((a) => probeTcp(a, port, timeoutMs)));
  return results.includes('answered') ? 'answered' : 'silent';
}
