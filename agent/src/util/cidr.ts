// IP allow-lists (api.read_allow): parsing of "ADDRESS[/BITS]" for the configuration's error
// messages, matching with Node's own net.BlockList (which also matches an IPv4-mapped IPv6
// source, ::ffff:10.0.0.1 from a dual-stack socket, against IPv4 rules).
import { BlockList, isIP } from 'node:net';

export interface Cidr { addr: string; bits: number; family: 'ipv4' | 'ipv6' }

/** "10.0.0.0/24", "fd00::/8" or a single address (a /32 or /128); null when it is none of these. */
export function parseCidr(s: string): Cidr | null {
  const slash = s.indexOf('/');
  const addr = slash < 0 ? s : s.slice(0, slash);
  const fam = isIP(addr);
  if (fam === 0) return null;
  const max = fam === 4 ? 32 : 128;
  let bits = max;
  if (slash >= 0) {
    const b = s.slice(slash + 1);
    if (!/^\d{1,3}$/.test(b)) return null; // not "", " 24", "0x18" or "24/8"
    bits = Number(b);
    if (bits > max) return null;
  }
  return { addr, bits, family: fam === 4 ? 'ipv4' : 'ipv6' };
}

/** What the configuration says of an entry parseCidr refuses. */
export const cidrError = (s: string): string => `expected an IP or CIDR (e.g. 10.0.0.0/24 or fd00::/8), got "${s}"`;

/** A matcher for a list of CIDRs (validated by the configuration schema; an invalid one throws). */
export function cidrMatcher(cidrs: readonly string[]): (remote: string) => boolean {
  const list = new BlockList();
  for (const c of cidrs) {
    const p = parseCidr(c);
    if (!p) throw new Error(cidrError(c));
    list.addSubnet(p.addr, p.bits, p.family);
  }
  return (remote) => {
    const fam = isIP(remote);
    return fam !== 0 && list.check(remote, fam === 4 ? 'ipv4' : 'ipv6');
  };
}

/** Whether `remote` is in one of `cidrs` (one-off; build a cidrMatcher once for a hot path). */
export function ipInCidrs(remote: string, cidrs: readonly string[]): boolean {
  return cidrMatcher(cidrs)(remote);
}
