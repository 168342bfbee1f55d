// Polls BOTH QEMUs of a VM directly (their inspection QMP sockets, not the agents) and records
// every instant at which two guests run unpaused outside COLO-secondary mode: two primaries.
import { join } from 'node:path';
import { QmpClient } from '../../agent/src/qmp/client.ts';
import { unixSocketConnector } from '../../agent/src/qmp/transport.ts';
import type { AgentPair, H } from '../../lab/pair.ts';

export interface Sample { at: number; A: string; B: string }

export class PrimaryWatch {
  readonly samples: Sample[] = [];
  readonly violations: Sample[] = [];
  private clients: Partial<Record<H, QmpClient>> = {};
  private running = true;
  private loop: Promise<void>;

  constructor(private readonly p: AgentPair, private readonly vm: string, private readonly everyMs = 50) {
    this.loop = this.run();
  }

  private async state(h: H): Promise<string> {
    let c = this.clients[h];
    try {
      if (!c || c.state === 'closed') {
        c = await QmpClient.connect(unixSocketConnector(join(this.p.stateDir(h), 'vms', this.vm, 'qmp-observer.sock'), 300), { handshakeTimeoutMs: 500, commandTimeoutMs: 1000 });
        this.clients[h] = c;
      }
    } catch {
      return 'absent'; // no QEMU (or not yet listening)
    }
    try {
      const st = await c.execute<{ status: string; running: boolean }>('query-status');
      const colo = await c.execute<{ mode: string }>('query-colo-status');
      if (!st.running) return `paused(${st.status})`;
      return colo.mode === 'secondary' ? 'replica' : 'PRIMARY';
    } catch {
      return 'unknown'; // QEMU did not answer in time (e.g. a secondary loading a checkpoint)
    }
  }

  /** The last sample in which neither QEMU was in the middle of a checkpoint or silent. */
  lastSettled(): Sample | undefined {
    return [...this.samples].reverse().find((s) => ![s.A, s.B].some((x) => x === 'paused(colo)' || x === 'unknown' || x === 'paused(finish-migrate)'));
  }

  private async run(): Promise<void> {
    while (this.running) {
      const [A, B] = await Promise.all([this.state('A'), this.state('B')]);
      const s = { at: Date.now(), A, B };
      this.samples.push(s);
      if (A === 'PRIMARY' && B === 'PRIMARY') this.violations.push(s);
      await new Promise((r) => setTimeout(r, this.everyMs));
    }
  }

  /** Compressed timeline: "t+ms A/B" at every change. */
  timeline(t0: number): string {
    const out: string[] = [];
    let last = '';
    for (const s of this.samples) {
      const k = `${s.A}/${s.B}`;
      if (k !== last) out.push(`+${s.at - t0}ms ${k}`);
      last = k;
    }
    return out.join(', ');
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
    for (const c of Object.values(this.clients)) c?.close();
  }
}
