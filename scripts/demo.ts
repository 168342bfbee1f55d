// The local demo: a protected pair and a witness on this machine, provisioned by the real
// playbooks, then a failover drill. See `sudo scripts/demo help`.
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AGENT_BIN, ROOT, testGuest } from '../lab/guest.ts';
import { SHIM_IN_HOST, writeLabInventory } from '../lab/lab-inventory.ts';
import { NspawnLab, type LabHost, type PlaybookRun } from '../lab/nspawn.ts';

const INDEX = Number(process.env.FTKVM_DEMO_INDEX ?? 90);
const VM = 'demo';
const lab = new NspawnLab(INDEX, { witness: true });
const tty = process.stdout.isTTY && !process.env.NO_COLOR;
const c = (code: number) => (s: string) => (tty ? `\x1b[${code}m${s}\x1b[0m` : s);
const bold = c(1), green = c(32), red = c(31), dim = c(2);
const STEPS = 8;
let step = 0;

function say(msg: string): void { process.stdout.write(msg + '\n'); }

async function timed<T>(title: string, f: () => Promise<T>): Promise<T> {
  step++;
  const t0 = Date.now();
  process.stdout.write(`${bold(`[${step}/${STEPS}]`)} ${title} … `);
  try {
    const r = await f();
    say(green(`done in ${((Date.now() - t0) / 1000).toFixed(1)} s`));
    return r;
  } catch (e) {
    say(red('FAILED'));
    throw e;
  }
}

function sh(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { out += d; });
    p.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')} failed (${code}):\n${out.split('\n').slice(-20).join('\n')}`))));
  });
}

async function playbook(name: string, args: string[] = []): Promise<PlaybookRun> {
  const r = await lab.playbook(`playbooks/${name}`, args, name.replace('.yml', ''));
  if (r.code !== 0) {
    const tail = r.output.split('\n').filter((l) => /fatal|FAILED|msg|ERROR/.test(l)).slice(-15).join('\n');
    throw new Error(`playbooks/${name} failed (log: ${r.log}):\n${tail}`);
  }
  return r;
}

function recap(r: PlaybookRun): string {
  return Object.entries(r.recap).map(([h, x]) => `${h} ok=${x.ok} changed=${x.changed}`).join(', ');
}

async function up(): Promise<void> {
  const t0 = Date.now();
  say(bold('ftkvm demo: a fault-tolerant VM on two hosts with a witness, all on this machine'));
  await timed('installing what is needed (Debian packages, npm ci)', () => sh('bash', ['scripts/install-deps']));
  await timed('building the agent (dist/ftkvm-agent) and the test guest', async () => {
    await sh('npm', ['run', '-s', 'build']);
    testGuest();
  });
  await timed('starting hostA, hostB and the witness (systemd-nspawn, own networks)', async () => {
    await lab.up([{ path: SHIM_IN_HOST.slice(1), src: testGuest().tcgShim, mode: 0o755 }]);
    const agentCopy = join(lab.dir, 'ftkvm-agent');
    copyFileSync(AGENT_BIN, agentCopy);
    writeLabInventory(lab, { agentBinary: agentCopy, logLevel: 'info', vm: { name: VM, basePort: 9000, probe: { request: 'inc', counter: true } } });
  });
  const site = await timed('provisioning with playbooks/site.yml (QEMU, networks, firewall, agents, witness)', () => playbook('site.yml'));
  say(dim(`      ${recap(site)}`));
  const prot = await timed(`declaring the VM "${VM}" with playbooks/protect.yml and waiting until it is protected`, () => playbook('protect.yml'));
  say(dim(`      ${recap(prot)}`));
  await timed('ftkvm-agent status on hostA', async () => undefined);
  say(await lab.exec('A', 'NO_COLOR=1 ftkvm-agent status || true'));
  const reportDir = join(lab.dir, 'drill-reports');
  await timed('failover drill with playbooks/drill.yml (crash the primary, verify, re-protect)', () => playbook('drill.yml', ['-e', `ftkvm_drill_report_dir=${reportDir}`]));
  const file = readdirSync(reportDir).filter((f) => f.includes(`-${VM}-`)).sort().at(-1)!;
  const rep = JSON.parse(readFileSync(join(reportDir, file), 'utf8'));
  step++;
  say(`${bold(`[${step}/${STEPS}]`)} drill report (${join(reportDir, file)}):`);
  say(`      verdict        ${rep.verdict === 'pass' ? green('PASS') : red('FAIL ' + rep.reasons.join('; '))}`);
  say(`      failover       ${rep.oldPrimary} → ${rep.newPrimary}: the guest answered again ${rep.failover.ms} ms after its primary QEMU was killed`);
  if (rep.probe?.replies !== undefined) {
    say(`      nothing lost   ${rep.probe.replies} transactions over one TCP connection (${rep.probe.connectionKept ? 'kept' : 'BROKEN'}), ` +
      `${rep.probe.lastBefore} → ${rep.probe.firstAfter} across the failover, counter ${rep.probe.counterOk ? 'consecutive' : 'BROKEN'}`);
  }
  say(`      re-protected   ${rep.reprotect.done ? `yes, ${rep.reprotect.ms} ms after the crash (${rep.oldPrimary} is now the secondary)` : 'NO'}`);
  writeFileSync(join(lab.dir, 'demo.up'), new Date().toISOString());
  say('');
  say(bold(`The pair is up (${((Date.now() - t0) / 1000).toFixed(0)} s). Try:`));
  // TLS on every control connection: the lab's CA (made by the playbooks on this machine).
  const ca = join(lab.dir, 'pki', 'ca.pem');
  say(`  curl -s --cacert ${ca} https://${lab.mgmt.A}:7480/health | python3 -m json.tool     ${dim('# 200 when protected')}`);
  say(`  curl -s --cacert ${ca} https://${lab.mgmt.B}:7480/metrics | grep ^ftkvm_`);
  say(`  sudo scripts/demo status                        ${dim('# ftkvm-agent status on both hosts')}`);
  say(`  sudo scripts/demo kill-primary                  ${dim("# SIGKILL the primary's QEMU, watch the takeover")}`);
  say(`  sudo scripts/demo exec A ftkvm-agent drill ${VM} --wait`);
  say(`  sudo scripts/demo exec B                        ${dim('# a shell on hostB')}`);
  say(`  echo inc | nc -q1 ${lab.guestIp()} 7000              ${dim("# a transaction in the guest (from this machine)")}`);
  say(`  sudo scripts/demo down                          ${dim('# remove everything the demo created')}`);
}

async function status(): Promise<void> {
  for (const h of ['A', 'B'] as LabHost[]) {
    say(bold(`---- ${lab.name[h]}`));
    say(await lab.exec(h, 'ftkvm-agent status || true'));
  }
}

async function killPrimary(): Promise<void> {
  for (const h of ['A', 'B'] as LabHost[]) {
    const st = JSON.parse(await lab.exec(h, 'ftkvm-agent status --json')) as { vms: { name: string; state: string; qemu: { pid: number } | null }[] };
    const v = st.vms.find((x) => x.name === VM);
    if (v?.state === 'protected' && v.qemu) {
      await lab.exec(h, `kill -9 ${v.qemu.pid}`);
      say(`killed the primary QEMU of ${VM} on ${lab.name[h]} (pid ${v.qemu.pid}); watch: sudo scripts/demo status`);
      return;
    }
  }
  say(red(`${VM} is not protected right now (nothing killed); see: sudo scripts/demo status`));
  process.exitCode = 1;
}

function execIn(h: LabHost, cmd: string[]): void {
  const r = spawnSync(lab.enterArgs(h)[0]!, [...lab.enterArgs(h).slice(1), ...(cmd.length ? cmd : ['bash', '-l'])], { stdio: 'inherit' });
  process.exitCode = r.status ?? 1;
}

async function down(): Promise<void> {
  const t0 = Date.now();
  await lab.wipe();
  const netns = spawnSync('ip', ['netns', 'list']).stdout.toString().split('\n').filter((l) => l.startsWith(lab.prefix));
  const mounts = readFileSync('/proc/mounts', 'utf8').split('\n').filter((l) => l.includes(lab.dir));
  say(`demo removed in ${((Date.now() - t0) / 1000).toFixed(1)} s (namespaces left: ${netns.length}, mounts left: ${mounts.length}, ` +
    `lab dir ${existsSync(lab.dir) ? 'still there' : 'gone'}); caches kept in ${process.env.FTKVM_CACHE ?? '~/.cache/ftkvm'}`);
}

const HELP = `Usage: sudo scripts/demo [up|down|status|kill-primary|exec HOST [CMD...]]
  up            (default) install, build, start two hosts + witness, site.yml, protect.yml, drill.yml
  down          remove everything the demo created (containers, namespaces, mounts, nft, processes)
  status        ftkvm-agent status on both hosts
  kill-primary  SIGKILL the QEMU of the VM's current primary (a crash), then watch status
  exec HOST     a shell (or a command) on hostA (A), hostB (B) or the witness (W)`;

const [cmd = 'up', ...rest] = process.argv.slice(2);
if (process.getuid?.() !== 0 && cmd !== 'help') { console.error('the demo needs root: sudo scripts/demo'); process.exit(1); }
try {
  switch (cmd) {
    case 'up': await up(); break;
    case 'down': await down(); break;
    case 'status': await status(); break;
    case 'kill-primary': await killPrimary(); break;
    case 'exec': execIn((rest[0] ?? 'A').toUpperCase() as LabHost, rest.slice(1)); break;
    default: say(HELP); process.exitCode = cmd === 'help' ? 0 : 2;
  }
} catch (e) {
  console.error(red(String((e as Error).message ?? e)));
  console.error(`state and logs: ${lab.dir}; clean up with: sudo scripts/demo down`);
  process.exitCode = 1;
}
