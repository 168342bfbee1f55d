// Test hosts for the Ansible roles: systemd-nspawn containers booted with systemd (sshd,
// NetworkManager, journald), each in its own network namespace, rootfs = overlay of one cached
// Debian bookworm image (lab/build-rootfs.sh) + a per-host upper dir.
//
//   root ns (the test = Ansible controller)
//     fk<i>c 10.231.<i>.1 ─────┐                      ┌──── fk<i>l 10.233.<i>.1 (guest LAN client)
//   switch ns fk<i>S:      [br-mgmt]    [br-repl]    [br-lan]     (eth3/eth4: spare NICs, no bridge)
//     hostA ns fk<i>A: eth0 10.231.<i>.11  eth1 10.232.<i>.11  eth2 (guest bridge uplink)  eth3 eth4
//     hostB ns fk<i>B: eth0 10.231.<i>.12  eth1 10.232.<i>.12  eth2                        eth3 eth4
//     witness  fk<i>W: eth0 10.231.<i>.13
//
// eth0's NetworkManager profile ("mgmt") is written before boot, like a kickstart would; every
// other NIC is left for the roles. Everything created here is named fk<i>*; down() removes it all
// (containers, overlay mounts, cgroups, namespaces, root veths) and is safe to call any time.
import { execFile, spawn } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from './guest.ts';

const run = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export type LabHost = 'A' | 'B' | 'W';
export const CACHE = process.env.FTKVM_CACHE || join(process.env.HOME || '/root', '.cache', 'ftkvm');

export interface RecapLine { ok: number; changed: number; unreachable: number; failed: number; skipped: number; rescued: number; ignored: number }
export interface PlaybookRun { code: number; output: string; recap: Record<string, RecapLine>; seconds: number; log: string }

/** Builds (once) or reuses the cached rootfs; returns its directory. */
export async function ensureRootfs(): Promise<string> {
  const { stdout } = await run('bash', [join(ROOT, 'lab/build-rootfs.sh')], { maxBuffer: 64 << 20, env: { ...process.env, FTKVM_CACHE: CACHE } });
  const dir = stdout.trim().split('\n').pop()!;
  if (!existsSync(join(dir, 'etc/os-release'))) throw new Error(`rootfs build did not produce ${dir}`);
  return dir;
}

export function parseRecap(output: string): Record<string, RecapLine> {
  const recap: Record<string, RecapLine> = {};
  const start = output.lastIndexOf('PLAY RECAP');
  if (start < 0) return recap;
  for (const line of output.slice(start).split('\n').slice(1)) {
    const m = /^(\S+)\s*:\s*(.*)$/.exec(line.trim());
    if (!m) continue;
    const kv = Object.fromEntries([...m[2]!.matchAll(/(\w+)=(\d+)/g)].map((x) => [x[1]!, Number(x[2])]));
    if (kv.ok === undefined) continue;
    recap[m[1]!] = { ok: kv.ok, changed: kv.changed ?? 0, unreachable: kv.unreachable ?? 0, failed: kv.failed ?? 0, skipped: kv.skipped ?? 0, rescued: kv.rescued ?? 0, ignored: kv.ignored ?? 0 };
  }
  return recap;
}

export class NspawnLab {
  readonly i: number;
  readonly prefix: string;
  readonly dir: string;
  readonly hosts: LabHost[];
  readonly name: Record<LabHost, string> = { A: 'hostA', B: 'hostB', W: 'witness' };
  readonly mgmt: Record<LabHost, string>;
  readonly repl: Record<'A' | 'B', string>;
  readonly lanBridgeAddr: Record<'A' | 'B', string>;
  readonly controller: string;
  readonly lanClient: string;
  readonly lanPrefix: string;
  private leaders: Partial<Record<LabHost, number>> = {};

  constructor(i: number, opts: { witness: boolean }) {
    if (!Number.isInteger(i) || i < 0 || i > 99) throw new Error('lab index 0..99');
    this.i = i;
    this.prefix = `fk${i}`;
    this.dir = `/tmp/ftkvm-nspawn-${i}`;
    this.hosts = opts.witness ? ['A', 'B', 'W'] : ['A', 'B'];
    this.mgmt = { A: `10.231.${i}.11`, B: `10.231.${i}.12`, W: `10.231.${i}.13` };
    this.repl = { A: `10.232.${i}.11`, B: `10.232.${i}.12` };
    this.lanPrefix = `10.233.${i}`;
    this.lanBridgeAddr = { A: `${this.lanPrefix}.11`, B: `${this.lanPrefix}.12` };
    this.controller = `10.231.${i}.1`;
    this.lanClient = `${this.lanPrefix}.1`;
  }

  ns(h: LabHost | 'S'): string { return `${this.prefix}${h}`; }
  machine(h: LabHost): string { return `${this.prefix}-${this.name[h]}`; }
  hostDir(h: LabHost): string { return join(this.dir, h); }
  rootOf(h: LabHost): string { return join(this.hostDir(h), 'root'); }
  get key(): string { return join(this.dir, 'id_ed25519'); }
  get ansibleCfg(): string { return join(this.dir, 'ansible.cfg'); }
  get inventoryDir(): string { return join(this.dir, 'inventory'); }
  guestIp(n = 50): string { return `${this.lanPrefix}.${n}`; }

  private async ip(...args: string[]): Promise<void> { await run('ip', args); }
  private async nsip(ns: string, ...args: string[]): Promise<void> { await run('ip', ['-n', ns, ...args]); }

  /** Boots the hosts (after removing whatever an earlier run of the same index left). */
  async up(extraFiles: { path: string; src: string; mode?: number }[] = []): Promise<void> {
    await this.down();
    const rootfs = await ensureRootfs();
    mkdirSync(this.dir, { recursive: true });
    rmSync(this.key, { force: true }); rmSync(`${this.key}.pub`, { force: true });
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', `ftkvm-lab-${this.i}`, '-f', this.key]);
    await this.network();
    for (const h of this.hosts) await this.prepareHost(h, rootfs, extraFiles);
    for (const h of this.hosts) this.boot(h);
    await Promise.all(this.hosts.map((h) => this.waitBooted(h)));
    this.writeAnsibleCfg();
  }

  private async network(): Promise<void> {
    const S = this.ns('S');
    for (const n of [S, ...this.hosts.map((h) => this.ns(h))]) { await this.ip('netns', 'add', n); await this.nsip(n, 'link', 'set', 'lo', 'up'); }
    for (const br of ['br-mgmt', 'br-repl', 'br-lan']) {
      await this.nsip(S, 'link', 'add', br, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0');
      await this.nsip(S, 'link', 'set', br, 'up');
    }
    const mac = (h: LabHost, n: number) => `02:fc:${this.i.toString(16).padStart(2, '0')}:${h.charCodeAt(0).toString(16)}:00:${n.toString(16).padStart(2, '0')}`;
    const plug = async (h: LabHost, inner: string, n: number, br: string | null) => {
      const port = `${h}-${inner}`;
      await this.nsip(S, 'link', 'add', port, 'type', 'veth', 'peer', 'name', inner, 'netns', this.ns(h));
      await this.nsip(this.ns(h), 'link', 'set', inner, 'address', mac(h, n));
      if (br) await this.nsip(S, 'link', 'set', port, 'master', br);
      await this.nsip(S, 'link', 'set', port, 'up');
    };
    for (const h of this.hosts) {
      await plug(h, 'eth0', 0, 'br-mgmt');
      if (h === 'W') continue;
      await plug(h, 'eth1', 1, 'br-repl');
      await this.nsip(S, 'link', 'set', `${h}-eth1`, 'mtu', '9000');   // jumbo frames on the replication "switch"
      await plug(h, 'eth2', 2, 'br-lan');
      await plug(h, 'eth3', 3, null);   // spare NICs (bond profile test)
      await plug(h, 'eth4', 4, null);
    }
    for (const [suffix, br, cidr] of [['c', 'br-mgmt', `${this.controller}/24`], ['l', 'br-lan', `${this.lanClient}/24`]] as const) {
      const rootIf = `${this.prefix}${suffix}`;
      await this.ip('link', 'add', rootIf, 'type', 'veth', 'peer', 'name', `C-${suffix}`, 'netns', S);
      await this.nsip(S, 'link', 'set', `C-${suffix}`, 'master', br, 'up');
      await this.ip('addr', 'add', cidr, 'dev', rootIf);
      await this.ip('link', 'set', rootIf, 'up');
    }
  }

  private async prepareHost(h: LabHost, rootfs: string, extraFiles: { path: string; src: string; mode?: number }[]): Promise<void> {
    const d = this.hostDir(h), R = this.rootOf(h);
    for (const x of ['upper', 'work', 'root']) mkdirSync(join(d, x), { recursive: true });
    await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${rootfs},upperdir=${join(d, 'upper')},workdir=${join(d, 'work')}`, R]);
    const w = (p: string, content: string, mode = 0o644) => {
      mkdirSync(dirname(join(R, p)), { recursive: true });
      writeFileSync(join(R, p), content, { mode });
      chmodSync(join(R, p), mode);
    };
    w('etc/hostname', `${this.name[h]}\n`);
    w('etc/hosts', `127.0.0.1 localhost\n127.0.1.1 ${this.name[h]}\n${this.mgmt.A} hostA\n${this.mgmt.B} hostB\n${this.mgmt.W} witness\n`);
    mkdirSync(join(R, 'root/.ssh'), { recursive: true, mode: 0o700 });
    w('root/.ssh/authorized_keys', readFileSync(`${this.key}.pub`, 'utf8'), 0o600);
    w('etc/NetworkManager/system-connections/mgmt.nmconnection',
      `[connection]\nid=mgmt\ntype=ethernet\ninterface-name=eth0\nautoconnect=true\n[ipv4]\nmethod=manual\naddress1=${this.mgmt[h]}/24\n[ipv6]\nmethod=disabled\n`, 0o600);
    for (const f of extraFiles) {
      mkdirSync(dirname(join(R, f.path)), { recursive: true });
      copyFileSync(f.src, join(R, f.path));
      chmodSync(join(R, f.path), f.mode ?? 0o644);
    }
  }

  private boot(h: LabHost): void {
    const log = openSync(join(this.hostDir(h), 'console.log'), 'a');
    const p = spawn('bash', [join(ROOT, 'lab/run-nspawn.sh'), `${this.prefix}${h}`, this.machine(h), this.name[h], this.rootOf(h), this.ns(h)],
      { detached: true, stdio: ['ignore', log, log] });
    closeSync(log);
    p.unref();
    writeFileSync(join(this.hostDir(h), 'nspawn.pid'), String(p.pid));
  }

  private nspawnPid(h: LabHost): number | null {
    try { return Number(readFileSync(join(this.hostDir(h), 'nspawn.pid'), 'utf8')); } catch { return null; }
  }

  /** PID 1 of the container (systemd), as seen from here. */
  private leader(h: LabHost): number | null {
    const n = this.nspawnPid(h);
    if (!n) return null;
    try {
      for (const t of readdirSync(`/proc/${n}/task`)) {
        for (const c of readFileSync(`/proc/${n}/task/${t}/children`, 'utf8').trim().split(/\s+/).filter(Boolean)) {
          const pid = Number(c);
          if (readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'systemd') return pid;
        }
      }
    } catch { /* not yet */ }
    return null;
  }

  private async waitBooted(h: LabHost): Promise<void> {
    const t0 = Date.now();
    let st = '';
    while (Date.now() - t0 < 60_000) {
      const L = this.leader(h);
      if (L) {
        this.leaders[h] = L;
        st = (await run('nsenter', ['-t', String(L), '-a', 'systemctl', 'is-system-running']).catch((e: { stdout?: string }) => ({ stdout: e.stdout ?? '' }))).stdout.trim();
        if (st === 'running' || st === 'degraded') break;
      }
      await sleep(200);
    }
    if (st !== 'running' && st !== 'degraded') throw new Error(`${this.name[h]} did not boot within 60 s (systemd: "${st}"); see ${join(this.hostDir(h), 'console.log')}`);
    while (Date.now() - t0 < 90_000) {
      const ok = await run('ssh', [...this.sshArgs(), `root@${this.mgmt[h]}`, 'true']).then(() => true, () => false);
      if (ok) return;
      await sleep(300);
    }
    throw new Error(`${this.name[h]}: ssh to ${this.mgmt[h]} not ready within 90 s`);
  }

  sshArgs(): string[] {
    return ['-q', '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=2', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-i', this.key];
  }

  /** The command line that enters a host (all its namespaces), e.g. to run an interactive command. */
  enterArgs(h: LabHost): string[] {
    const L = this.leaders[h] ?? this.leader(h);
    if (!L) throw new Error(`${this.name[h]} is not running`);
    return ['nsenter', '-t', String(L), '-a', 'env', '-i', 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'HOME=/root', `TERM=${process.env.TERM ?? 'xterm'}`];
  }

  /** Is this lab up (its hosts' containers running)? */
  isUp(): boolean { return this.hosts.every((h) => this.leader(h) !== null); }

  /** Runs a command inside a host (nsenter into all its namespaces); rejects on a non-zero exit. */
  async exec(h: LabHost, cmd: string): Promise<string> {
    const L = this.leaders[h] ?? this.leader(h);
    if (!L) throw new Error(`${this.name[h]} is not running`);
    const { stdout } = await run('nsenter', ['-t', String(L), '-a', 'env', '-i', 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'HOME=/root',
      'bash', '-c', cmd], { maxBuffer: 16 << 20 });
    return stdout;
  }

  /** Like exec, but never rejects: {code, stdout, stderr}. */
  async sh(h: LabHost, cmd: string): Promise<{ code: number; stdout: string; stderr: string }> {
    try { return { code: 0, stdout: await this.exec(h, cmd), stderr: '' }; } catch (e) {
      const x = e as { code?: number; stdout?: string; stderr?: string };
      return { code: typeof x.code === 'number' ? x.code : 1, stdout: x.stdout ?? '', stderr: x.stderr ?? String(e) };
    }
  }

  private writeAnsibleCfg(): void {
    writeFileSync(this.ansibleCfg, `[defaults]
roles_path = ${join(ROOT, 'roles')}
host_key_checking = False
interpreter_python = /usr/bin/python3
forks = 5
timeout = 20
retry_files_enabled = False
nocows = 1
[ssh_connection]
ssh_args = -o ControlMaster=auto -o ControlPersist=120s -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no
control_path_dir = ${this.dir}/cp
pipelining = True
`);
  }

  /** Writes the inventory directory: hosts.yml plus group_vars/<group>.yml files. */
  writeInventory(hostsYaml: string, groupVars: Record<string, string>): void {
    rmSync(this.inventoryDir, { recursive: true, force: true });
    mkdirSync(join(this.inventoryDir, 'group_vars'), { recursive: true });
    writeFileSync(join(this.inventoryDir, 'hosts.yml'), hostsYaml);
    for (const [g, y] of Object.entries(groupVars)) writeFileSync(join(this.inventoryDir, 'group_vars', `${g}.yml`), y);
  }

  /** Runs ansible-playbook against the lab inventory; never rejects (see code/recap). */
  async playbook(playbook: string, args: string[] = [], label = ''): Promise<PlaybookRun> {
    const t0 = Date.now();
    const log = join(this.dir, `ansible-${String(Date.now())}${label ? '-' + label : ''}.log`);
    return await new Promise<PlaybookRun>((resolve) => {
      const p = spawn('ansible-playbook', ['-i', this.inventoryDir, '--private-key', this.key, ...args, playbook], {
        cwd: ROOT,
        env: { ...process.env, ANSIBLE_CONFIG: this.ansibleCfg, ANSIBLE_FORCE_COLOR: '0', ANSIBLE_NOCOLOR: '1', PYTHONUNBUFFERED: '1' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      p.stdout.on('data', (d) => { out += d; });
      p.stderr.on('data', (d) => { out += d; });
      p.on('close', (code) => {
        writeFileSync(log, out);
        resolve({ code: code ?? -1, output: out, recap: parseRecap(out), seconds: (Date.now() - t0) / 1000, log });
      });
    });
  }

  /** Stops and removes everything of this lab index. Safe to call when nothing is up. */
  async down(): Promise<void> {
    const all: LabHost[] = ['A', 'B', 'W'];
    // 1. containers: SIGTERM to nspawn = poweroff of the container (its QEMUs die with it)
    const pids = all.map((h) => [h, this.nspawnPid(h)] as const).filter(([, p]) => p && isNspawn(p));
    for (const [, p] of pids) { try { process.kill(p!, 'SIGTERM'); } catch { /* gone */ } }
    const t0 = Date.now();
    while (pids.some(([, p]) => alive(p!)) && Date.now() - t0 < 20_000) await sleep(200);
    for (const [, p] of pids) {
      if (alive(p!)) { try { process.kill(p!, 'SIGTERM'); } catch { /* gone */ } }  // 2nd SIGTERM = hard stop
    }
    await sleep(pids.some(([, p]) => alive(p!)) ? 2000 : 0);
    for (const [, p] of pids) if (alive(p!)) { try { process.kill(p!, 'SIGKILL'); } catch { /* gone */ } }
    // 1b. Ansible's ssh connection masters of this lab (their control sockets live in this.dir)
    for (const pid of sshMasters(this.dir)) { try { process.kill(pid, 'SIGTERM'); } catch { /* gone */ } }
    // 2. overlay mounts
    for (const h of all) {
      const R = this.rootOf(h);
      if (isMountpoint(R)) await run('umount', [R]).catch(() => run('umount', ['-l', R]).catch(() => undefined));
    }
    // 3. cgroups (leaf first)
    for (const hier of ['systemd', 'unified', '.']) {
      for (const h of all) {
        const d = `/sys/fs/cgroup/${hier}/ftkvm-nspawn/${this.prefix}${h}`;
        if (existsSync(d)) await run('find', [d, '-depth', '-type', 'd', '-exec', 'rmdir', '{}', ';']).catch(() => undefined);
      }
      // the parent, once no lab uses it
      await run('rmdir', [`/sys/fs/cgroup/${hier}/ftkvm-nspawn`]).catch(() => undefined);
    }
    // 4. namespaces (deleting one destroys its veths and bridges) and the root veths
    for (const n of [...all, 'S' as const].map((h) => this.ns(h))) await run('ip', ['netns', 'del', n]).catch(() => undefined);
    for (const s of ['c', 'l']) await run('ip', ['link', 'del', `${this.prefix}${s}`]).catch(() => undefined);
    for (const h of all) rmSync(`/run/systemd/nspawn/propagate/${this.machine(h)}`, { recursive: true, force: true });
    // 5. per-host state
    if (existsSync(this.dir)) {
      for (const h of all) if (!isMountpoint(this.rootOf(h))) rmSync(this.hostDir(h), { recursive: true, force: true });
    }
    this.leaders = {};
  }

  /** Removes the lab directory too (logs, key, inventory). */
  async wipe(): Promise<void> {
    await this.down();
    if (this.hosts.every((h) => !isMountpoint(this.rootOf(h)))) rmSync(this.dir, { recursive: true, force: true });
  }
}

function sshMasters(dir: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const cmd = readFileSync(`/proc/${e}/cmdline`, 'utf8').replace(/\0/g, ' ');
      if (cmd.startsWith('ssh: ') && cmd.includes(`${dir}/`)) out.push(Number(e));
    } catch { /* gone */ }
  }
  return out;
}

function alive(pid: number): boolean { try { process.kill(pid, 0); return true; } catch { return false; } }

function isNspawn(pid: number): boolean {
  try { return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('systemd-nspawn'); } catch { return false; }
}

function isMountpoint(p: string): boolean {
  try { return readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === p); } catch { return false; }
}
