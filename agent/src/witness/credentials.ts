// Who may talk to the witness, and for what. With a credentials file every host authenticates
// as itself (its own bearer token) and may acquire or release leases only for its own node name
// and only within its own pair; leases are keyed by pair and VM, so two pairs may both have a
// VM "web1". The file holds SHA-256 digests, not tokens: a copy of it lets nobody act as a host.
//
//   # /etc/ftkvm-witness/credentials.yml (written by the ftkvm_witness role)
//   nodes:
//     kvm-a1: { pair: prod1, token_sha256: 9f86d081884c7d65... }
//     kvm-a2: { pair: prod1, token_sha256: 60303ae22b998861... }
//
// Without it (the shared-token mode of earlier versions and of quick labs) one token is
// accepted for every node: whoever holds it can act for any node of any pair.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { z } from 'zod';
import { FtkvmError, errorMessage } from '../util/errors.ts';

/** Who a request comes from. */
export type Principal =
  | { kind: 'node'; node: string; pair: string }
  /** The --token-file token next to a credentials file: reads every lease, changes none. */
  | { kind: 'reader' }
  /** The one token of shared-token mode: may act for any node; leases keyed by VM alone. */
  | { kind: 'shared' };

const name = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'must be 1-63 letters, digits, ".", "_" or "-"');
const fileSchema = z.object({
  nodes: z.record(name, z.object({
    pair: name,
    token_sha256: z.string().regex(/^[0-9a-f]{64}$/, 'must be the SHA-256 of the token, 64 lowercase hex digits'),
  }).strict()),
}).strict();

export const sha256 = (s: string): string => createHash('sha256').update(s).digest('hex');

export class Credentials {
  private constructor(private readonly byDigest: Map<string, Principal>, private readonly pairByNode: Map<string, string>, readonly pairs: number) {}

  get nodes(): number { return this.pairByNode.size; }

  /** Parses and checks the whole file; throws BAD_CREDENTIALS naming the first problem (nothing half-loaded). */
  static load(file: string): Credentials {
    let raw: unknown;
    try { raw = parse(readFileSync(file, 'utf8')); } catch (e) { throw new FtkvmError('BAD_CREDENTIALS', `${file}: ${errorMessage(e)}`); }
    const r = fileSchema.safeParse(raw);
    if (!r.success) {
      const i = r.error.issues[0]!;
      throw new FtkvmError('BAD_CREDENTIALS', `${file}: ${i.path.join('.') || '(top)'}: ${i.message}`);
    }
    const byDigest = new Map<string, Principal>();
    for (const [node, c] of Object.entries(r.data.nodes)) {
      const other = byDigest.get(c.token_sha256);
      // One token for two nodes would let either act as the other: refuse the file.
      if (other?.kind === 'node') throw new FtkvmError('BAD_CREDENTIALS', `${file}: nodes ${other.node} and ${node} have the same token`);
      byDigest.set(c.token_sha256, { kind: 'node', node, pair: c.pair });
    }
    const pairByNode = new Map(Object.entries(r.data.nodes).map(([node, c]) => [node, c.pair]));
    return new Credentials(byDigest, pairByNode, new Set(pairByNode.values()).size);
  }

  /** Adds the read-only token (the witness's --token-file); refused when a node already uses it. */
  withReader(token: string): this {
    const d = sha256(token);
    if (this.byDigest.has(d)) throw new FtkvmError('BAD_CREDENTIALS', 'the --token-file token is also a node\'s token: give the witness its own');
    this.byDigest.set(d, { kind: 'reader' });
    return this;
  }

  /** The pair of a node named in the file, or null. */
  pairOf(node: string): string | null { return this.pairByNode.get(node) ?? null; }

  /** The principal of a bearer token, or null. A map lookup of its digest: the timing says nothing about the token. */
  identify(token: string): Principal | null { return this.byDigest.get(sha256(token)) ?? null; }
}
