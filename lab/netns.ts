// Two "hosts" on one machine as network namespaces, for end-to-end tests and benchmarks.
//
//   root ns (the test: controller + LAN client)
//     ftc<i>m 10.202.<i>.100 ──┐                       ┌── ftc<i>l 192.168.<100+i>.100
//   switch ns ftS<i>:       [br-mgmt]      [br-repl]    [br-lan]
//     hostA ns ftA<i>: eth-mgmt 10.202.<i>.1  eth-repl 10.201.<i>.1   br0 {tap of the VM, uplink}
//     hostB ns ftB<i>: eth-mgmt 10.202.<i>.2  eth-repl 10.201.<i>.2   br0 {tap of the VM, uplink}
//     witness ns ftW<i>: eth-mgmt 10.202.<i>.254
//     DR host ns ftD<i>:  eth-mgmt 10.202.<i>.253                        br0 {tap of a DR copy, uplink}
//       (the DR site: its guest bridge reaches the same LAN, as a stretched VLAN would)
//
// Links are cut with nft in the switch namespace (bridge family, forward hook: frames dropped
// silently, no carrier change — like a dead switch port or a firewall mistake). This kernel has
// no netem and no bonding.
import { execFile, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);
// Absolute paths: under npm/npx, node_modules/.bin comes first on PATH and `nft` there is
// @vercel/nft (an ava dependency) that exits 0 without touching the firewall.
const NFT = '/usr/sbin/nft';

export type HostId = 'A' | 'B' | 'W' | 'D';
export type Link = 'repl' | 'mgmt';

export interface HostAddrs { repl: string; mgmt: string }

export class NetnsTestbed {
  readonly i: number;
  readonly ns: Record<HostId | 'S', string>;
  readonly addr: Record<'A' | 'B', HostAddrs> & { W: { mgmt: string }; D: { mgmt: string } };
  readonly controller: string;
  readonly lanClient: string;
  readonly lanPrefix: string;
  readonly guestBridge = 'br0';
  private cuts = new Set<string>();

  constructor(i: number) {
    if (!Number.isInteger(i) || i < 0 || i > 99) throw new Error('testbed index 0..99');
    this.i = i;
    this.ns = { A: `ftA${i}`, B: `ftB${i}`, W: `ftW${i}`, D: `ftD${i}`, S: `ftS${i}` };
    this.addr = {
      A: { repl: `10.201.${i}.1`, mgmt: `10.202.${i}.1` },
      B: { repl: `10.201.${i}.2`, mgmt: `10.202.${i}.2` },
      W: { mgmt: `10.202.${i}.254` },
      D: { mgmt: `10.202.${i}.253` },
    };
    this.controller = `10.202.${i}.100`;
    this.lanPrefix = `192.168.${100 + i}`;
    this.lanClient = `${this.lanPrefix}.100`;
  }

  hostLanIp(h: 'A' | 'B' | 'D'): string { return `${this.lanPrefix}.${h === 'A' ? 1 : h === 'B' ? 2 : 3}`; }

  /** Guest address n on the shared LAN (tests give each VM one). */
  guestIp(n = 10): string { return `${this.lanPrefix}.${n}`; }

  private async ip(...args: string[]): Promise<void> { await run('ip', args); }
  private async nsip(ns: string, ...args: string[]): Promise<void> { await run('ip', ['-n', ns, ...args]); }

  async up(): Promise<void> {
    await this.down();
    // Claimed while up: a sweep by another run (a bench next to the tests) leaves it alone.
    mkdirSync(OWNERS, { recursive: true });
    writeFileSync(`${OWNERS}/${this.i}`, String(process.pid));
    const { A, B, W, D, S } = this.ns;
    for (const n of [A, B, W, D, S]) { await this.ip('netns', 'add', n); await this.nsip(n, 'link', 'set', 'lo', 'up'); }
    for (const br of ['br-mgmt', 'br-repl', 'br-lan']) {
      await this.nsip(S, 'link', 'add', br, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0');
      await this.nsip(S, 'link', 'set', br, 'up');
    }
    const plug = async (ns: string, inner: string, port: string, br: string, cidr?: string) => {
      await this.nsip(S, 'link', 'add', port, 'type', 'veth', 'peer', 'name', inner, 'netns', ns);
      await this.nsip(S, 'link', 'set', port, 'master', br, 'up');
      if (cidr) await this.nsip(ns, 'addr', 'add', cidr, 'dev', inner);
      await this.nsip(ns, 'link', 'set', inner, 'up');
    };
    for (const h of ['A', 'B', 'D'] as const) {
      const ns = this.ns[h];
      await plug(ns, 'eth-mgmt', `${h}-m`, 'br-mgmt', `${this.addr[h].mgmt}/24`);
      if (h !== 'D') await plug(ns, 'eth-repl', `${h}-r`, 'br-repl', `${this.addr[h].repl}/24`);
      // guest bridge on the host, uplinked to the shared LAN
      await this.nsip(ns, 'link', 'add', this.guestBridge, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0');
      await this.nsip(ns, 'link', 'set', this.guestBridge, 'up');
      await plug(ns, 'uplink', `${h}-l`, 'br-lan');
      await this.nsip(ns, 'link', 'set', 'uplink', 'master', this.guestBridge);
      // the host itself on the guest LAN (drill probes reach the guest from here)
      await this.nsip(ns, 'addr', 'add', `${this.hostLanIp(h)}/24`, 'dev', this.guestBridge);
    }
    await plug(W, 'eth-mgmt', 'W-m', 'br-mgmt', `${this.addr.W.mgmt}/24`);
    // the test process itself: controller on mgmt, client on the guest LAN
    for (const [suffix, br, cidr] of [['m', 'br-mgmt', `${this.controller}/24`], ['l', 'br-lan', `${this.lanClient}/24`]] as const) {
      const rootIf = `ftc${this.i}${suffix}`;
      await this.ip('link', 'add', rootIf, 'type', 'veth', 'peer', 'name', `C-${suffix}`, 'netns', S);
      await this.nsip(S, 'link', 'set', `C-${suffix}`, 'master', br, 'up');
      await this.ip('addr', 'add', cidr, 'dev', rootIf);
      await this.ip('link', 'set', rootIf, 'up');
    }
    await this.applyCuts();
  }

  async down(): Promise<void> {
    for (const n of Object.values(this.ns)) await run('ip', ['netns', 'del', n]).catch(() => undefined);
    rmSync(`${OWNERS}/${this.i}`, { force: true });
    for (const s of ['m', 'l']) await run('ip', ['link', 'del', `ftc${this.i}${s}`]).catch(() => undefined);
    this.cuts.clear();
  }

  /** Cut a link: 'repl' = the replication link A↔B; 'mgmt' = A↔B on the management LAN. */
  async cut(link: Link): Promise<void> { this.cuts.add(link); await this.applyCuts(); }
  async restore(link: Link): Promise<void> { this.cuts.delete(link); await this.applyCuts(); }
  /** Isolate a host from the witness (management LAN between host and W). */
  async cutWitness(h: 'A' | 'B'): Promise<void> { this.cuts.add(`W${h}`); await this.applyCuts(); }
  async restoreWitness(h: 'A' | 'B'): Promise<void> { this.cuts.delete(`W${h}`); await this.applyCuts(); }
  async restoreAll(): Promise<void> { this.cuts.clear(); await this.applyCuts(); }
  /** A whole host off the network (every link: replication, management, guest LAN), as a dead host is. */
  async isolate(h: 'A' | 'B'): Promise<void> { this.cuts.add(`host${h}`); await this.applyCuts(); }
  async rejoin(h: 'A' | 'B'): Promise<void> { this.cuts.delete(`host${h}`); await this.applyCuts(); }
  /** Drop one TCP stream on the replication link: segments from host `from` to `port` on the other host. */
  async dropReplTcp(from: 'A' | 'B', port: number): Promise<void> { this.cuts.add(`tcp:${from}:${port}`); await this.applyCuts(); }

  private async applyCuts(): Promise<void> {
    const pair = (x: string, y: string) => [`iifname "${x}" oifname "${y}" drop`, `iifname "${y}" oifname "${x}" drop`];
    const rules: string[] = [];
    if (this.cuts.has('repl')) rules.push(...pair('A-r', 'B-r'));
    if (this.cuts.has('mgmt')) rules.push(...pair('A-m', 'B-m'));
    if (this.cuts.has('WA')) rules.push(...pair('A-m', 'W-m'));
    if (this.cuts.has('WB')) rules.push(...pair('B-m', 'W-m'));
    for (const c of this.cuts) {
      const m = /^tcp:([AB]):(\d+)$/.exec(c);
      if (m) rules.push(`iifname "${m[1]}-r" oifname "${m[1] === 'A' ? 'B' : 'A'}-r" tcp dport ${m[2]} drop`);
    }
    for (const h of ['A', 'B']) {
      if (this.cuts.has(`host${h}`)) for (const port of [`${h}-r`, `${h}-m`, `${h}-l`]) rules.push(`iifname "${port}" drop`, `oifname "${port}" drop`);
    }
    const script = `table bridge ftkvm_cuts\ndelete table bridge ftkvm_cuts\n` +
      `table bridge ftkvm_cuts {\n chain cuts {\n  type filter hook forward priority 0; policy accept;\n` +
      rules.map((r) => `  ${r}\n`).join('') + ` }\n}\n`;
    await new Promise<void>((resolve, reject) => {
      const p = spawn('ip', ['netns', 'exec', this.ns.S, NFT, '-f', '-'], { stdio: ['pipe', 'ignore', 'pipe'] });
      let err = '';
      p.stderr.on('data', (d) => { err += d; });
      p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`nft failed: ${err}`))));
      p.stdin.end(script);
    });
  }

  /**
   * Limits the replication link to `rate` (tc tbf, e.g. '16mbit') in both directions; null
   * removes it. `burst` must hold at least one timer tick's worth at that rate for the rate to be
   * reached (bench/reprotect gives 10 ms worth).
   */
  async rateLimitRepl(rate: string | null, burst = '32kbit'): Promise<void> {
    for (const port of ['A-r', 'B-r']) {
      if (rate) await run('ip', ['netns', 'exec', this.ns.S, '/usr/sbin/tc', 'qdisc', 'replace', 'dev', port, 'root', 'tbf', 'rate', rate, 'burst', burst, 'latency', '100ms']);
      else await run('ip', ['netns', 'exec', this.ns.S, '/usr/sbin/tc', 'qdisc', 'del', 'dev', port, 'root']).catch(() => undefined);
    }
  }

  /** Runs a command inside a host namespace and waits for it. */
  async exec(h: HostId, cmd: string, args: string[]): Promise<string> {
    const { stdout } = await run('ip', ['netns', 'exec', this.ns[h], cmd, ...args]);
    return stdout;
  }

  /** Starts a long-running process inside a host namespace (ip netns exec execs: same pid). */
  spawnIn(h: HostId, cmd: string, args: string[], opts: SpawnOptions = {}): ChildProcess {
    return spawn('ip', ['netns', 'exec', this.ns[h], cmd, ...args], opts);
  }
}

const OWNERS = '/run/ftkvm-testbeds';

/** Is testbed i claimed by a live process other than this one? */
function inUse(i: string): boolean {
  try {
    const pid = Number(readFileSync(`${OWNERS}/${i}`, 'utf8'));
    if (!pid || pid === process.pid) return false;
    process.kill(pid, 0);
    return true;
  } catch { return false; }
}

/** Removes testbeds a crashed earlier run left behind (namespaces and root veths named ft*); not those of a live run. */
export async function sweepStaleTestbeds(): Promise<void> {
  const { stdout } = await run('ip', ['netns', 'list']);
  for (const line of stdout.split('\n')) {
    const m = /^ft[ABWSD](\d+)$/.exec(line.split(' ')[0] ?? '');
    if (m && !inUse(m[1]!)) await run('ip', ['netns', 'del', m[0]]).catch(() => undefined);
  }
  const links = (await run('ip', ['-o', 'link', 'show'])).stdout;
  for (const m of links.matchAll(/^\d+: (ftc(\d+)[ml])[@:]/gm)) if (!inUse(m[2]!)) await run('ip', ['link', 'del', m[1]!]).catch(() => undefined);
}
