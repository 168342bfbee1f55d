// Durable per-node state: for each VM the highest epoch this node knows and the epoch at
// which this node last became primary. Used to elect who boots a VM after a cold start (the
// last primary has the authoritative disk) and to refuse a stale primary.
import { join } from 'node:path';
import { readJsonFile, writeFileAtomic } from './atomic.ts';

export type DurableRole = 'primary' | 'secondary' | 'none';

export interface VmDurable {
  epoch: number;          // highest generation known (own promotions and the peer's)
  primaryEpoch: number;   // epoch of this node's latest promotion; 0 = never primary
  role: DurableRole;      // role when last written
  fenced?: boolean;       // primary paused because it lost peer and witness: never resume blindly
  replicaEpoch?: number;  // secondary: the promotion epoch of the primary this node's replica copies
  updatedAt: number;
}

export interface NodeStateFile { version: 1; node: string; vms: Record<string, VmDurable> }

/** Where the state lives (default: state.json, atomic + fsync). The simulator keeps it in memory. */
export interface StateMedium {
  read(path: string): NodeStateFile | null;
  /** Durable before returning; throws when the write failed. */
  write(path: string, text: string): void;
}

export const fileMedium: StateMedium = {
  read: (path) => readJsonFile<NodeStateFile>(path) ?? null,
  write: (path, text) => writeFileAtomic(path, text),
};

export class StateStore {
  private readonly path: string;
  private data: NodeStateFile;
  private readonly medium: StateMedium;

  constructor(stateDir: string, node: string, medium: StateMedium = fileMedium) {
    this.path = join(stateDir, 'state.json');
    this.medium = medium;
    const existing = medium.read(this.path);
    if (existing && existing.node !== node) {
      throw new Error(`${this.path} belongs to node "${existing.node}", not "${node}" (wrong state_dir or node.name?)`);
    }
    this.data = existing ?? { version: 1, node, vms: {} };
  }

  get file(): string { return this.path; }

  vm(name: string): VmDurable {
    return this.data.vms[name] ?? { epoch: 0, primaryEpoch: 0, role: 'none', updatedAt: 0 };
  }

  /**
   * Writes through (atomic + fsync) before returning: callers act only on persisted state. When
   * the write fails (ENOSPC, EIO) it throws, but the new state is kept in memory and `unsaved`
   * stays true until a later update or flush() succeeds: a caller that must act anyway (a fence
   * must pause the guest whatever the disk says) goes on, and the state reaches the disk later.
   */
  update(name: string, patch: Partial<Omit<VmDurable, 'updatedAt'>>): VmDurable {
    const next = { ...this.vm(name), ...patch, updatedAt: Date.now() };
    next.epoch = Math.max(next.epoch, next.primaryEpoch);
    this.data = { ...this.data, vms: { ...this.data.vms, [name]: next } };
    this.unsaved = true;
    this.flush();
    return next;
  }

  /** True while the newest state failed to reach the disk. */
  unsaved = false;

  /** Write the in-memory state (throws like update()). */
  flush(): void {
    this.medium.write(this.path, JSON.stringify(this.data, null, 2) + '\n');
    this.unsaved = false;
  }

  snapshot(): NodeStateFile { return structuredClone(this.data); }
}
