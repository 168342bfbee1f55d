// The Ansible appliance against real hosts: two systemd-nspawn containers (Debian 12 with
// systemd, sshd, NetworkManager, firewalld) + a witness container, each in its own network
// namespace (lab/nspawn.ts). site.yml + protect.yml bring up a real COLO-protected test
// guest under TCG; then idempotence, health.yml, the agent restart that must not stop the guest,
// drill.yml, check mode, and the bond profiles the network role writes without activating them.
// The steps share one lab and run in order; the lab is removed at the end, even on failure.
import test from 'ava';
import { appendFileSync, copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { parse } from 'yaml';
import { AGENT_BIN, ROOT, testGuest } from '../../lab/guest.ts';
import { writeLabInventory, SHIM_IN_HOST } from '../../lab/lab-inventory.ts';
import { NspawnLab, type PlaybookRun } from '../../lab/nspawn.ts';

const INDEX = Number(process.env.FTKVM_NSPAWN_INDEX ?? 0);
const VM = 'lab1';
const BASE_PORT = 9000;

if (!existsSync(AGENT_BIN)) throw new Error(`${AGENT_BIN} missing: run npm run build first`);
const lab = new NspawnLab(INDEX, { witness: true });
let agentCopy = '';
let reportDir = '';
let failedBefore = false;

function recapSummary(r: PlaybookRun): string {
  return Object.entries(r.recap).map(([h, x]) => `${h}: ok=${x.ok} changed=${x.changed} failed=${x.failed} unreachable=${x.unreachable}`).join(', ');
}

/** Last lines of a playbook's output plus every task that changed/failed: what to read when it goes wrong. */
function explain(r: PlaybookRun): string {
  const lines = r.output.split('\n');
  const interesting: string[] = [];
  let task = '';
  for (const l of lines) {
    if (l.startsWith('TASK [')) task = l;
    else if (/^(changed|fatal|failed):|^\s*"msg"|UNREACHABLE/.test(l)) interesting.push(task, l.length > 1500 ? l.slice(0, 1500) + ' …' : l);
  }
  return `exit ${r.code} after ${r.seconds.toFixed(1)} s (${recapSummary(r)}); log ${r.log}\n` +
    [...new Set(interesting)].slice(-60).join('\n') + '\n---- tail ----\n' + lines.slice(-25).map((l) => (l.length > 1500 ? l.slice(0, 1500) + ' …' : l)).join('\n');
}

async function apiGet<T>(h: 'A' | 'B', path: string): Promise<T | null> {
  const r = await lab.sh(h, `python3 -c 'import sys,ssl,urllib.request
try:
  print(urllib.request.urlopen("https://127.0.0.1:7480${path}", timeout=5, context=ssl.create_default_context(cafile="/etc/ftkvm/tls/ca.pem")).read().decode())
except urllib.error.HTTPError as e:
  print(e.read().decode())'`);
  try { return JSON.parse(r.stdout) as T; } catch { return null; }
}

interface VmView { name: string; state: string; role: string; epoch: number; checkpoints: { count: number } }

async function vmStates(): Promise<Record<'A' | 'B', VmView | undefined>> {
  const [a, b] = await Promise.all([apiGet<{ vms: VmView[] }>('A', '/v1/status'), apiGet<{ vms: VmView[] }>('B', '/v1/status')]);
  return { A: a?.vms.find((v) => v.name === VM), B: b?.vms.find((v) => v.name === VM) };
}

async function waitProtected(timeoutMs: number): Promise<'A' | 'B'> {
  const t0 = Date.now();
  let last = '';
  while (Date.now() - t0 < timeoutMs) {
    const s = await vmStates();
    last = `A=${s.A?.state} B=${s.B?.state}`;
    if (s.A?.state === 'protected' && s.B?.state === 'secondary' && (s.B.checkpoints.count ?? 0) > 0) return 'A';
    if (s.B?.state === 'protected' && s.A?.state === 'secondary' && (s.A.checkpoints.count ?? 0) > 0) return 'B';
    await new Promise((r) => setTimeout(r, 1000));
  }
  throw new Error(`${VM} not protected within ${timeoutMs} ms (${last})`);
}

/** One "inc" transaction against the guest's service over the shared guest LAN. */
function guestInc(timeoutMs = 5000): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: lab.guestIp(), port: 7000 });
    const timer = setTimeout(() => { s.destroy(); reject(new Error('guest service timeout')); }, timeoutMs);
    let buf = '';
    s.on('connect', () => s.write('inc\n'));
    s.on('data', (d) => { buf += d; if (buf.includes('\n')) { clearTimeout(timer); s.destroy(); resolve(Number(buf.trim())); } });
    s.on('error', (e) => { clearTimeout(timer); reject(e); });
  });
}

function writeInventory(checkpointDelayMs = 2000): void {
  writeLabInventory(lab, { agentBinary: agentCopy, vm: { name: VM, basePort: BASE_PORT, checkpointDelayMs } });
}

test.before(async (t) => {
  t.timeout(10 * 60_000);
  const t0 = Date.now();
  const g = testGuest();
  await lab.up([{ path: SHIM_IN_HOST.slice(1), src: g.tcgShim, mode: 0o755 }]);
  // a private copy: a rebuild of dist/ during the test must not look like a change
  agentCopy = join(lab.dir, 'ftkvm-agent');
  copyFileSync(AGENT_BIN, agentCopy);
  reportDir = mkdtempSync(join(tmpdir(), 'ftkvm-drill-reports-'));
  writeInventory();
  t.log(`lab ${lab.prefix} up in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
});

test.after.always(async () => {
  if (process.env.FTKVM_KEEP_LAB === '1') return;
  // after a failure keep the logs (playbook outputs, consoles) in lab.dir; remove all the rest
  if (failedBefore) await lab.down(); else await lab.wipe();
  if (reportDir) rmSync(reportDir, { recursive: true, force: true });
});

test.afterEach.always((t) => { if (!t.passed) failedBefore = true; });

/** Every step after a failed one is meaningless: skip it loudly. */
function step(title: string, timeoutMs: number, body: (t: import('ava').ExecutionContext) => Promise<void>) {
  test.serial(title, async (t) => {
    t.timeout(timeoutMs);
    if (failedBefore) { t.fail('an earlier step failed'); return; }
    await body(t);
  });
}

async function journal(h: 'A' | 'B' | 'W', unit: string): Promise<string> {
  return (await lab.sh(h, `journalctl -u ${unit} -n 60 --no-pager -o cat`)).stdout;
}

step('check mode on fresh hosts: site.yml --check succeeds and changes nothing', 3 * 60_000, async (t) => {
  const r = await lab.playbook('playbooks/site.yml', ['--check'], 'check-fresh');
  t.is(r.code, 0, explain(r));
  t.true(Object.values(r.recap).some((x) => x.changed > 0), 'a fresh host must report pending changes');
  for (const h of ['A', 'B'] as const) {
    t.is((await lab.sh(h, 'test -e /etc/ftkvm || test -e /usr/local/bin/ftkvm-agent || test -e /etc/systemd/system/ftkvm-agent.service')).code, 1, `check mode wrote files on ${lab.name[h]}`);
    t.false((await lab.exec(h, 'nmcli -t -f NAME con show')).includes('ftkvm-'), 'check mode wrote NetworkManager profiles');
    t.not((await lab.sh(h, 'systemctl is-active firewalld')).stdout.trim(), 'active', 'check mode started firewalld');
  }
  t.log(`site.yml --check (fresh): ${r.seconds.toFixed(1)} s, ${recapSummary(r)}`);
});

step('site.yml converges the witness and the pair', 6 * 60_000, async (t) => {
  const r = await lab.playbook('playbooks/site.yml', [], 'site-1');
  t.is(r.code, 0, explain(r));
  for (const h of ['A', 'B'] as const) {
    t.is((await lab.sh(h, 'systemctl is-active ftkvm-agent')).stdout.trim(), 'active', await journal(h, 'ftkvm-agent'));
    const show = await lab.exec(h, 'systemctl show ftkvm-agent -p KillMode -p ProtectSystem -p NoNewPrivileges -p RestartPreventExitStatus');
    t.regex(show, /KillMode=process/);
    t.regex(show, /ProtectSystem=strict/);
    t.regex(show, /NoNewPrivileges=yes/);
    t.is((await lab.exec(h, 'stat -c %a /etc/ftkvm/token')).trim(), '600');
    t.is((await lab.sh(h, '/usr/local/bin/ftkvm-agent check-config --config /etc/ftkvm/agent.yaml')).code, 0);
    t.is((await lab.exec(h, 'firewall-cmd --zone=ftkvm --list-ports')).trim().split(/\s+/).sort().join(' '),
      ['7480/tcp', '7481/udp', `${BASE_PORT + 3}/tcp`, `${BASE_PORT + 4}/tcp`, `${BASE_PORT + 98}/tcp`, `${BASE_PORT + 99}/tcp`].sort().join(' '));
    t.is((await lab.exec(h, 'sysctl -n net.bridge.bridge-nf-call-iptables')).trim(), '0');
    t.is((await lab.exec(h, 'cat /sys/class/net/eth1/mtu')).trim(), '9000', 'replication MTU applied');
    t.regex(await lab.exec(h, 'ip -br addr show br-ftkvm'), new RegExp(`${lab.lanBridgeAddr[h].replaceAll('.', '\\.')}/24`));
    t.regex(await lab.exec(h, 'ip -o link show eth2'), /master br-ftkvm/);
  }
  const tokens = await Promise.all((['A', 'B', 'W'] as const).map((h) => lab.exec(h, 'cat /etc/ftkvm/token')));
  t.is(new Set(tokens).size, 1, 'the pair and the witness share one token');
  t.true(tokens[0]!.trim().length >= 16);
  t.is((await lab.sh('W', 'systemctl is-active ftkvm-witness')).stdout.trim(), 'active', await journal('W', 'ftkvm-witness'));
  t.regex(await lab.exec('W', 'firewall-cmd --list-ports'), /7490\/tcp/);
  const wshow = await lab.exec('W', 'systemctl show ftkvm-witness -p ProtectSystem -p ExecStart');
  t.regex(wshow, /ProtectSystem=strict/);
  t.regex(wshow, /witness --listen 0\.0\.0\.0:7490 --data-dir \/var\/lib\/ftkvm-witness --token-file \/etc\/ftkvm\/token --credentials \/etc\/ftkvm\/witness-credentials\.yml --tls-cert \/etc\/ftkvm\/tls\/node\.pem --tls-key \/etc\/ftkvm\/tls\/node\.key/);
  // TLS on the control connections: the witness and both agents serve certificates from the lab's CA.
  for (const h of ['A', 'B'] as const) t.regex(await lab.exec(h, 'openssl x509 -in /etc/ftkvm/tls/node.pem -noout -issuer -ext subjectAltName'), new RegExp(`ftkvm CA[\\s\\S]*IP Address:${lab.mgmt[h].replaceAll('.', '\\.')}`));
  t.regex((await lab.sh('A', `openssl s_client -connect ${lab.mgmt.B}:7480 -CAfile /etc/ftkvm/tls/ca.pem -verify_return_error < /dev/null`)).stdout, /Verify return code: 0 \(ok\)/, 'A verifies B\'s API certificate');
  // Per-node identity: each host its own witness token, the witness only their digests with the
  // node and pair; the pair's heartbeat key on both hosts of the pair.
  const own = await Promise.all((['A', 'B'] as const).map((h) => lab.exec(h, 'cat /etc/ftkvm/witness-token')));
  t.is(new Set(own).size, 2, 'two hosts, two witness tokens');
  for (const h of ['A', 'B'] as const) t.is((await lab.exec(h, 'stat -c %a /etc/ftkvm/witness-token /etc/ftkvm/heartbeat.key')).trim().split(/\s+/).join(' '), '600 600');
  const creds = parse(await lab.exec('W', 'cat /etc/ftkvm/witness-credentials.yml')) as { nodes: Record<string, { pair: string; token_sha256: string }> };
  t.deepEqual(Object.keys(creds.nodes).sort(), ['hostA', 'hostB']);
  t.is(creds.nodes.hostA!.token_sha256, createHash('sha256').update(own[0]!.trim()).digest('hex'));
  t.is(creds.nodes.hostB!.pair, creds.nodes.hostA!.pair);
  t.false((await lab.exec('W', 'cat /etc/ftkvm/witness-credentials.yml')).includes(own[0]!.trim()), 'no token on the witness');
  const keys = await Promise.all((['A', 'B'] as const).map((h) => lab.exec(h, 'cat /etc/ftkvm/heartbeat.key')));
  t.is(keys[0], keys[1], 'one heartbeat key for the pair');
  t.not(keys[0], tokens[0], 'the heartbeat key is not the API token');
  t.regex(await lab.exec('W', 'journalctl -u ftkvm-witness -o cat --no-pager'), /credentials loaded .*nodes=2/);
  // the hosts reach the witness through its firewall
  t.is((await lab.sh('A', `python3 -c 'import ssl,urllib.request; print(urllib.request.urlopen("https://${lab.mgmt.W}:7490/health", timeout=5, context=ssl.create_default_context(cafile="/etc/ftkvm/tls/ca.pem")).status)'`)).stdout.trim(), '200');
  t.log(`site.yml (first run): ${r.seconds.toFixed(1)} s, ${recapSummary(r)}`);
});

step('protect.yml waits until the VM is protected; the guest answers on the shared LAN', 6 * 60_000, async (t) => {
  const r = await lab.playbook('playbooks/protect.yml', ['-e', 'ftkvm_protect_timeout=240'], 'protect');
  t.is(r.code, 0, explain(r) + '\n---- agent A ----\n' + await journal('A', 'ftkvm-agent'));
  t.regex(r.output, /protected: .*lab1@host[AB]=protected/);
  const primary = await waitProtected(30_000);
  t.is(primary, 'A', 'preferred_primary hostA runs the VM');
  const v1 = await guestInc(), v2 = await guestInc();
  t.is(v2, v1 + 1, 'the guest counter increments through the guest bridge');
  t.log(`protect.yml: ${r.seconds.toFixed(1)} s, ${recapSummary(r)}; guest counter ${v2}`);
});

step('protect.yml applies a changed VM definition: both agents restart, the guest keeps running', 5 * 60_000, async (t) => {
  const pidOf = async () => Number(JSON.parse(await lab.exec('A', `cat /var/lib/ftkvm/vms/${VM}/qemu.json`)).pid);
  const qemuBefore = await pidOf();
  const agentPid = async (h: 'A' | 'B') => (await lab.exec(h, 'systemctl show -p MainPID --value ftkvm-agent')).trim();
  const agentsBefore = [await agentPid('A'), await agentPid('B')];
  const v0 = await guestInc();
  writeInventory(1500);
  const r = await lab.playbook('playbooks/protect.yml', ['-e', 'ftkvm_protect_timeout=240'], 'protect-update');
  t.is(r.code, 0, explain(r));
  t.true((r.recap.hostA?.changed ?? 0) > 0 && (r.recap.hostB?.changed ?? 0) > 0, recapSummary(r));
  t.regex(await lab.exec('B', 'cat /etc/ftkvm/agent.yaml'), /checkpoint_delay_ms: 1500/);
  t.not(await agentPid('A'), agentsBefore[0], 'agent on hostA restarted');
  t.not(await agentPid('B'), agentsBefore[1], 'agent on hostB restarted');
  t.is(await pidOf(), qemuBefore, 'the primary QEMU kept running through the agent restart');
  await waitProtected(60_000);
  t.true((await guestInc()) > v0, 'the guest kept its state');
  t.log(`protect.yml (update): ${r.seconds.toFixed(1)} s, ${recapSummary(r)}`);
});

step('second site.yml run changes nothing', 5 * 60_000, async (t) => {
  const r = await lab.playbook('playbooks/site.yml', [], 'site-2');
  t.is(r.code, 0, explain(r));
  for (const [h, x] of Object.entries(r.recap)) t.is(x.changed, 0, `${h} changed ${x.changed} things:\n${explain(r)}`);
  t.is(Object.keys(r.recap).length, 3);
  t.log(`site.yml (second run): ${r.seconds.toFixed(1)} s, ${recapSummary(r)}`);
});

step('health.yml prints the table and passes', 2 * 60_000, async (t) => {
  const r = await lab.playbook('playbooks/health.yml', [], 'health');
  t.is(r.code, 0, explain(r));
  t.regex(r.output, /HOST\s+VM\s+ROLE\s+STATE\s+EPOCH/);
  t.regex(r.output, /hostA\s+lab1\s+primary\s+protected/);
  t.regex(r.output, /hostB\s+lab1\s+secondary\s+secondary/);
  const table = r.output.split('\n').filter((l) => /^\s+"(HOST|host[AB])\s/.test(l)).map((l) => l.trim().replace(/^"|",?$/g, ''));
  t.log('\n' + table.join('\n'));
  t.log(`health.yml: ${r.seconds.toFixed(1)} s`);
});

step('restarting the agent (KillMode=process, hardened unit) keeps the guest running', 3 * 60_000, async (t) => {
  const pidOf = async () => Number(JSON.parse(await lab.exec('A', `cat /var/lib/ftkvm/vms/${VM}/qemu.json`)).pid);
  const before = await pidOf();
  await lab.exec('A', 'systemctl restart ftkvm-agent');
  t.is((await lab.sh('A', `kill -0 ${before}`)).code, 0, 'QEMU survived the agent restart');
  await waitProtected(120_000);
  t.is(await pidOf(), before, 'the restarted agent re-attached to the same QEMU');
  const v = await guestInc();
  t.true(v > 0);
});

step('drill.yml installs the drill timers on both hosts, and removes them', 3 * 60_000, async (t) => {
  const on = await lab.playbook('playbooks/drill.yml', ['-e', 'ftkvm_drill_timer_enabled=true', '-e', 'ftkvm_drill_run=false',
    '-e', 'ftkvm_drill_schedule="*-*-* 04:30:00"'], 'drill-timer-on');
  t.is(on.code, 0, explain(on));
  for (const h of ['A', 'B'] as const) {
    t.is((await lab.exec(h, `systemctl is-enabled ftkvm-drill@${VM}.timer`)).trim(), 'enabled');
    t.is((await lab.exec(h, `systemctl is-active ftkvm-drill@${VM}.timer`)).trim(), 'active');
    t.regex(await lab.exec(h, `systemctl cat ftkvm-drill@${VM}.timer`), /OnCalendar=\*-\*-\* 04:30:00/);
  }
  // the timer fires on both hosts: on the secondary, the script does nothing
  const sec = await lab.sh('B', `/usr/local/libexec/ftkvm/drill-if-primary ${VM}`);
  t.is(sec.code, 0, sec.stderr);
  t.regex(sec.stdout, /this node is secondary \(not the primary\): nothing to do/);
  const again = await lab.playbook('playbooks/drill.yml', ['-e', 'ftkvm_drill_timer_enabled=true', '-e', 'ftkvm_drill_run=false',
    '-e', 'ftkvm_drill_schedule="*-*-* 04:30:00"'], 'drill-timer-again');
  for (const [h, x] of Object.entries(again.recap)) t.is(x.changed, 0, `${h}: ${explain(again)}`);
  const off = await lab.playbook('playbooks/drill.yml', ['-e', 'ftkvm_drill_run=false'], 'drill-timer-off');
  t.is(off.code, 0, explain(off));
  for (const h of ['A', 'B'] as const) {
    t.not((await lab.sh(h, `systemctl is-enabled ftkvm-drill@${VM}.timer`)).stdout.trim(), 'enabled');
    t.is((await lab.sh(h, 'test -e /etc/systemd/system/ftkvm-drill@.timer')).code, 1);
  }
});

step('drill.yml runs a failover drill per VM and saves the report', 5 * 60_000, async (t) => {
  const r = await lab.playbook('playbooks/drill.yml', ['-e', `ftkvm_drill_report_dir=${reportDir}`, '-e', 'ftkvm_drill_timeout=240'], 'drill');
  t.is(r.code, 0, explain(r));
  const reports = readdirSync(reportDir).filter((f) => f.startsWith(`pair_lab-${VM}-`));
  t.is(reports.length, 1);
  const rep = JSON.parse(readFileSync(join(reportDir, reports[0]!), 'utf8')) as { state: string; verdict: string };
  t.is(rep.state, 'passed');
  t.is(rep.verdict, 'pass');
  t.regex(r.output, /drill of pair_lab\/lab1 passed: hostA -> hostB/);
  await waitProtected(180_000);
  t.log(`drill.yml: ${r.seconds.toFixed(1)} s`);
});

step('check mode on the converged system reports no change', 4 * 60_000, async (t) => {
  const before = await lab.exec('A', 'stat -c %Y /etc/ftkvm/agent.yaml /usr/local/bin/ftkvm-agent /etc/ftkvm/token');
  const r = await lab.playbook('playbooks/site.yml', ['--check'], 'check-converged');
  t.is(r.code, 0, explain(r));
  for (const [h, x] of Object.entries(r.recap)) t.is(x.changed, 0, `${h}: ${explain(r)}`);
  t.is(await lab.exec('A', 'stat -c %Y /etc/ftkvm/agent.yaml /usr/local/bin/ftkvm-agent /etc/ftkvm/token'), before);
  t.log(`site.yml --check (converged): ${r.seconds.toFixed(1)} s`);
});

step('an agent upgrade with site.yml changes one host of the pair at a time; the guest serves throughout and protection returns in between', 8 * 60_000, async (t) => {
  // The next version: the same executable with bytes appended (an ELF ignores them), so the
  // role sees a new binary, installs it and restarts the agent.
  const next = join(lab.dir, 'ftkvm-agent-next');
  copyFileSync(agentCopy, next);
  appendFileSync(next, '\n# next version\n');
  const sha = createHash('sha256').update(readFileSync(next)).digest('hex');
  writeLabInventory(lab, { agentBinary: next, vm: { name: VM, basePort: BASE_PORT, checkpointDelayMs: 2000 } });
  await waitProtected(60_000);
  const agentStart = async (h: 'A' | 'B') => Number((await lab.exec(h, 'systemctl show -p ExecMainStartTimestampMonotonic --value ftkvm-agent')).trim());
  const before = { A: await agentStart('A'), B: await agentStart('B') };
  // A client: one transaction every 100 ms for the whole upgrade.
  const txns: { at: number; value: number }[] = [];
  const errors: string[] = [];
  let running = true;
  const client = (async () => {
    while (running) {
      try { txns.push({ at: Date.now(), value: await guestInc(10_000) }); } catch (e) { errors.push((e as Error).message); }
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  const r = await lab.playbook('playbooks/site.yml', ['-e', 'ftkvm_rolling_timeout=300'], 'upgrade');
  running = false;
  await client;
  t.is(r.code, 0, explain(r));
  const after = { A: await agentStart('A'), B: await agentStart('B') };
  t.true(after.A > before.A && after.B > before.B, 'both agents restarted on the new binary');
  for (const h of ['A', 'B'] as const) t.is((await lab.exec(h, 'sha256sum /usr/local/bin/ftkvm-agent')).split(' ')[0], sha, `host${h} runs the new binary`);
  // One host at a time: the first host's VMs were seen protected again before the second play began.
  const firstHost = after.A < after.B ? 'hostA' : 'hostB', secondHost = firstHost === 'hostA' ? 'hostB' : 'hostA';
  const protectedAgain = r.output.indexOf(`rolling change of ${firstHost}: protected again: ${VM}`);
  const secondPlay = r.output.indexOf('PLAY [Protected pairs, second host of each pair]');
  t.true(protectedAgain >= 0 && secondPlay > protectedAgain, `${firstHost} protected again before ${secondHost} was touched`);
  t.regex(r.output, new RegExp(`rolling change of ${secondHost}: protected again: ${VM}`));
  t.true((Math.max(after.A, after.B) - Math.min(after.A, after.B)) / 1e6 > 1, 'the agents restarted at different times');
  // The guest: every transaction answered, in order, none lost, never held longer than a checkpoint pause.
  t.deepEqual(errors, []);
  const values = txns.map((x) => x.value);
  t.true(values.every((v, i) => i === 0 || v === values[i - 1]! + 1), `consecutive values: ${JSON.stringify(values.slice(0, 5))}…`);
  const gaps = txns.slice(1).map((x, i) => x.at - txns[i]!.at);
  const maxGap = Math.max(...gaps);
  t.true(maxGap < 3000, `longest gap between answers ${maxGap} ms`);
  await waitProtected(60_000);
  t.log(`upgrade via site.yml: ${r.seconds.toFixed(1)} s, ${txns.length} transactions, longest gap ${maxGap} ms; agents restarted ${((Math.max(after.A, after.B) - Math.min(after.A, after.B)) / 1e6).toFixed(1)} s apart`);
});

step('ftkvm_network writes an active-backup bond without activating it, and refuses the management NIC', 3 * 60_000, async (t) => {
  const vars = (extra: string) => ['-e', '@' + join(lab.dir, 'bond-vars.yml'), '-e', extra, '--limit', 'hostA'];
  writeFileSync(join(lab.dir, 'bond-vars.yml'), `---
ftkvm_network_activate: false
ftkvm_network_manage_replication: true
ftkvm_replication_type: bond
ftkvm_replication_connection: ftkvm-bondtest
ftkvm_replication_bond_ifname: bond7
ftkvm_replication_bond_mode: active-backup
ftkvm_replication_bond_miimon: 100
ftkvm_replication_bond_ports: [eth3, eth4]
ftkvm_replication_bond_primary: eth4
ftkvm_replication_address: 10.234.${INDEX}.11
ftkvm_replication_prefix: 24
ftkvm_replication_mtu: 9000
ftkvm_guest_bridge_manage: false
`);
  const pb = join('test', 'testbed', 'network-only.yml');
  const r1 = await lab.playbook(pb, vars('ftkvm_network_activate=false'), 'bond-1');
  t.is(r1.code, 0, explain(r1));
  const show = await lab.exec('A', 'nmcli -t -f connection.type,connection.interface-name,connection.autoconnect,bond.options,ipv4.method,ipv4.addresses,802-3-ethernet.mtu con show ftkvm-bondtest');
  t.regex(show, /802-3-ethernet\.mtu:9000/);
  t.regex(show, /connection\.type:bond/);
  t.regex(show, /connection\.interface-name:bond7/);
  t.regex(show, /connection\.autoconnect:no/);
  t.regex(show, /bond\.options:.*mode=active-backup/);
  t.regex(show, /bond\.options:.*miimon=100/);
  t.regex(show, /bond\.options:.*primary=eth4/);
  t.regex(show, /ipv4\.addresses:10\.234\.\d+\.11\/24/);
  for (const port of ['eth3', 'eth4']) {
    const p = await lab.exec('A', `nmcli -t -f connection.master,connection.slave-type,connection.interface-name,connection.autoconnect con show ftkvm-bondtest-port-${port}`);
    t.regex(p, /connection\.master:bond7/);
    t.regex(p, /connection\.slave-type:bond/);
    t.regex(p, new RegExp(`connection\\.interface-name:${port}`));
    t.regex(p, /connection\.autoconnect:no/);
  }
  t.is((await lab.exec('A', 'nmcli -g GENERAL.STATE con show ftkvm-bondtest')).trim(), '', 'the bond stays inactive');
  t.true(existsSync(join(lab.rootOf('A'), 'etc/NetworkManager/system-connections/ftkvm-bondtest.nmconnection')), 'keyfile written');
  const r2 = await lab.playbook(pb, vars('ftkvm_network_activate=false'), 'bond-2');
  t.is(r2.code, 0, explain(r2));
  t.is(r2.recap.hostA?.changed, 0, explain(r2));
  // the NIC that carries the Ansible connection is refused, with the variable named
  const r3 = await lab.playbook(pb, vars('{"ftkvm_replication_bond_ports": ["eth0", "eth3"], "ftkvm_replication_bond_primary": "eth3"}'), 'bond-mgmt');
  t.not(r3.code, 0);
  t.regex(r3.output, /ftkvm_replication_bond_ports names eth0, which carries the connection Ansible uses/);
  t.is((await lab.exec('A', 'nmcli -g GENERAL.STATE con show mgmt')).trim(), 'activated');
});

step('teardown removes every container, mount, cgroup, namespace and link of the lab', 2 * 60_000, async (t) => {
  await lab.wipe();
  const netns = execFileSync('ip', ['netns', 'list']).toString();
  t.notRegex(netns, new RegExp(`^${lab.prefix}[ABWS]\\b`, 'm'));
  const links = execFileSync('ip', ['-o', 'link', 'show']).toString();
  t.notRegex(links, new RegExp(`: ${lab.prefix}[cl][@:]`));
  t.false(readFileSync('/proc/mounts', 'utf8').includes(lab.dir), 'overlay mounts left');
  for (const hier of ['systemd', 'unified']) t.false(existsSync(`/sys/fs/cgroup/${hier}/ftkvm-nspawn/${lab.prefix}A`), 'cgroup left');
  t.false(existsSync(lab.dir));
});
