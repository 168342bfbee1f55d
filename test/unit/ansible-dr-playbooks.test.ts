// playbooks/dr-test.yml, dr-failover.yml and dr-failback.yml against a real DR target (agent/src/dr/
// target.ts, in this process, plain HTTP on 127.0.0.1) holding a real recovery point (qemu-img,
// qemu-nbd); its "QEMU" is a stand-in that answers the guest's probe, and `ip` is a no-op. The DR
// host is this machine (connection local); the pairs' hosts are unreachable (a closed port), or
// this machine when a test needs one that answers. Checked: what the playbooks send (token,
// body types), what they report and save, and what they refuse.
import test from 'ava';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { ROOT } from '../../lab/guest.ts';
import { DrTarget } from '../../agent/src/dr/target.ts';
import { drTargetSchema } from '../../agent/src/dr/config.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';
import { realExec, type Exec } from '../../agent/src/util/exec.ts';

const QEMU_IMG = '/usr/bin/qemu-img';
const QEMU_NBD = '/usr/bin/qemu-nbd';
const TOKEN = 'dr-token-of-the-test-0123456789';
const dir = mkdtempSync(join(tmpdir(), 'ftkvm-dr-playbooks-'));
const reports = join(dir, 'reports');
const pids = join(dir, 'qemu-pids');

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const p = (s.address() as { port: number }).port; s.close(() => resolve(p)); });
  });
}

// The stand-in QEMU: listens where the guest's probe is reached (the user-mode port forward of a
// test copy, or the guest's own address at the DR site) and answers each line with "7".
const FAKE_QEMU = `#!${process.execPath}
const { createServer } = require('node:net');
const { appendFileSync } = require('node:fs');
const a = process.argv.slice(2);
const netdev = a[a.indexOf('-netdev') + 1] || '';
const fwd = /hostfwd=tcp:127\\.0\\.0\\.1:(\\d+)-/.exec(netdev);
const port = fwd ? Number(fwd[1]) : Number(process.env.FTKVM_TEST_SITE_PORT);
appendFileSync(process.env.FTKVM_TEST_QEMU_PIDS, process.pid + '\\n');
createServer((s) => { s.on('data', () => s.write('7\\n')); s.on('error', () => {}); }).listen(port, '127.0.0.1');
setInterval(() => {}, 1000);
`;

interface Ctx { target: DrTarget; port: number; sitePort: number; point: string; requests: { method: string; url: string; auth: string; body: unknown }[] }
let ctx: Ctx;

test.before(async () => {
  for (const b of [QEMU_IMG, QEMU_NBD]) if (!existsSync(b)) throw new Error(`${b} is missing (scripts/install-deps installs it)`);
  mkdirSync(reports);
  writeFileSync(join(dir, 'qemu'), FAKE_QEMU);
  chmodSync(join(dir, 'qemu'), 0o755);
  writeFileSync(join(dir, 'dr-token'), `${TOKEN}\n`, { mode: 0o600 });
  writeFileSync(pids, '');
  const [port, sitePort] = [await freePort(), await freePort()];
  process.env.FTKVM_TEST_SITE_PORT = String(sitePort);
  process.env.FTKVM_TEST_QEMU_PIDS = pids;
  const vm = (name: string, mac: string) => ({
    name, memory_mib: 64, vcpus: 1, boot: { firmware: 'bios' as const }, nic: { bridge: 'br-dr', mac }, probe: { address: '127.0.0.1', port: sitePort, request: 'get' },
  });
  const config = drTargetSchema.parse({
    node: { name: 'dr1' }, listen: `127.0.0.1:${port}`, token_file: join(dir, 'dr-token'), data_dir: join(dir, 'data'),
    qemu: { binary: join(dir, 'qemu'), img_binary: QEMU_IMG, nbd_binary: QEMU_NBD, accelerator: 'tcg' },
    vms: [vm('drdb', '52:54:00:00:00:01'), vm('api', '52:54:00:00:00:02')],
  });
  // `ip` (the tap into the DR bridge) does nothing here; qemu-img is real.
  const exec: Exec = (cmd, args, o) => (cmd === 'ip' ? Promise.resolve({ stdout: '', stderr: '' }) : realExec(cmd, args, o));
  const target = new DrTarget(config, memoryLogger(), exec);
  await target.start();
  // One recovery point of drdb, as a shipper makes it.
  const b = await target.store.begin('drdb', { sizeBytes: 1024 * 1024, capturedAt: Date.now() - 61_000, from: 'hostA', epoch: 3, keep: 4 });
  await target.store.write('drdb', b.id, 0, Buffer.alloc(65536, 7));
  const point = await target.store.commit('drdb', b.id, { mode: 'full', bytesShipped: 65536 });
  ctx = { target, port, sitePort, point: point.id, requests: [] };
  // What the playbooks send, seen before the DR target answers
  const server = (target as unknown as { server: import('node:http').Server }).server;
  server.prependListener('request', (req: import('node:http').IncomingMessage) => {
    let body = '';
    req.on('data', (d: Buffer) => { body += d; });
    req.on('end', () => ctx.requests.push({ method: req.method ?? '', url: req.url ?? '', auth: String(req.headers.authorization ?? ''), body: body ? JSON.parse(body) : undefined }));
  });
});

test.after.always(async () => {
  for (const p of readFileSync(pids, 'utf8').split('\n').filter(Boolean)) { try { process.kill(Number(p), 'SIGKILL'); } catch { /* gone */ } }
  await ctx?.target.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** The inventory: dr1 = this machine; pair_t (drdb, web) and pair_u (api) on hosts that do not answer, unless `reachable`
 *  (hostA answers) or `pairUp` (hostA and hostB answer). */
function inventory(o: { reachable?: boolean; pairUp?: boolean } = {}): string {
  const local = { ansible_connection: 'local', ansible_python_interpreter: process.env.FTKVM_TEST_PYTHON ?? '/usr/bin/python3', ansible_become: false };
  const down = { ansible_connection: 'ssh', ansible_host: '127.0.0.1', ansible_port: 1, ansible_python_interpreter: '/usr/bin/python3' };
  const f = join(dir, `inventory-${o.pairUp ? 'pair-up' : o.reachable ? 'up' : 'down'}.yml`);
  const up = { ...local, ftkvm_agent_service: 'ftkvm-test-no-such-unit', ftkvm_images_dir: join(dir, 'images') };
  writeFileSync(f, stringify({
    all: {
      vars: { ftkvm_tls: false, ftkvm_dr_report_dir: reports },
      children: {
        ftkvm_dr: { hosts: { dr1: { ...local, ftkvm_dr_listen_address: '127.0.0.1', ftkvm_dr_port: ctx.port, ftkvm_dr_token_file: join(dir, 'dr-token') } } },
        ftkvm_pairs: { children: {
          pair_t: { hosts: { hostA: o.reachable || o.pairUp ? up : down, hostB: o.pairUp ? up : down }, vars: { ftkvm_vms: [
            { name: 'drdb', probe: { address: '10.9.3.10', port: 7000 }, dr: { target: 'dr1' }, preferred_primary: 'hostB' },
            { name: 'web', dr: { target: 'https://dr.example.net:7610' } },
            { name: 'app' },
          ] } },
          pair_u: { hosts: { hostC: down, hostD: down }, vars: { ftkvm_vms: [{ name: 'api', probe: { address: '10.9.4.10', port: 80 }, dr: { target: 'dr1' } }] } },
        } },
      },
    },
  }));
  return f;
}

function playbook(name: string, inv: string, extra: Record<string, unknown> = {}, args: string[] = []): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    const p = spawn('ansible-playbook', ['-i', inv, join(ROOT, 'playbooks', name), ...(Object.keys(extra).length ? ['-e', JSON.stringify(extra)] : []), ...args], {
      cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ANSIBLE_CONFIG: join(ROOT, 'ansible.cfg'), ANSIBLE_NOCOLOR: '1', ANSIBLE_FORCE_COLOR: '0', ANSIBLE_HOST_KEY_CHECKING: 'false' },
    });
    let out = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { out += d; });
    p.on('close', (code) => resolve({ code: code ?? -1, out: out.replaceAll('\\"', '"') }));
  });
}

const saved = (kind: string) => readdirSync(reports).filter((f) => f.includes(`-${kind}-`)).sort()
  .map((f) => ({ f, j: JSON.parse(readFileSync(join(reports, f), 'utf8')) as Record<string, any> }));
const drCalls = () => ctx.requests.filter((r) => r.url.startsWith('/v1/dr/vms/'));

test.serial('dr-test: every VM with a DR host is tested with the DR token; a pass and a failure reported, saved, and the run fails', async (t) => {
  ctx.requests.length = 0;
  const r = await playbook('dr-test.yml', inventory());
  t.not(r.code, 0, r.out);
  t.deepEqual(drCalls().map((c) => `${c.method} ${c.url}`), ['POST /v1/dr/vms/drdb/test', 'POST /v1/dr/vms/api/test'], 'web (a DR target outside the inventory) and app (no dr) are not tested');
  for (const c of drCalls()) {
    t.is(c.auth, `Bearer ${TOKEN}`);
    t.deepEqual(c.body, { timeoutS: 300 }, 'timeoutS is a JSON number');
  }
  t.regex(r.out, new RegExp(`pair_t/drdb: PASSED on dr1: recovery point ${ctx.point} \\(data age \\d+ s\\), the isolated copy answered after \\d+ ms, reply "7", copy discarded`), r.out);
  t.regex(r.out, /pair_u\/api: FAILED on dr1: HTTP 404 DR_TEST_FAILED: api: DR test failed: api: no recovery point yet/, r.out);
  t.regex(r.out, /not tested here \(a DR target outside the inventory\): web/, r.out);
  t.regex(r.out, /DR test failed: api/, r.out);
  const s = saved('dr-test');
  t.deepEqual(s.map((x) => [x.j.pair, x.j.vm, x.j.passed]), [['pair_t', 'drdb', true], ['pair_u', 'api', false]]);
  t.is(s[0]!.j.report.point.id, ctx.point);
  t.true(s[0]!.j.report.discarded);
  t.true(s[0]!.j.report.dataAgeS >= 61, 'the age of the point\'s data');
  t.is(s[1]!.j.report.error.code, 'DR_TEST_FAILED');
  t.is(ctx.target.store.points('drdb').activated, null, 'production and the DR copy untouched');
});

test.serial('dr-test of one VM at one recovery point passes', async (t) => {
  ctx.requests.length = 0;
  const r = await playbook('dr-test.yml', inventory(), { ftkvm_dr_vms: ['pair_t/drdb'], ftkvm_dr_point: ctx.point, ftkvm_dr_timeout: 30 });
  t.is(r.code, 0, r.out);
  t.deepEqual(drCalls().map((c) => [c.url, c.body]), [['/v1/dr/vms/drdb/test', { timeoutS: 30, point: ctx.point }]]);
  t.regex(r.out, /1 DR test\(s\) passed on dr1/);
});

test.serial('dr-test and dr-failover refuse a wrong request before calling anything', async (t) => {
  ctx.requests.length = 0;
  const cases: [string, Record<string, unknown>, RegExp][] = [
    ['dr-failover.yml', {}, /ftkvm_dr_vms is required: the VMs to start at the DR site, named one by one, e\.g\. -e ftkvm_dr_vms=db1,web1 \(VMs with a DR target: drdb, web, api\)/],
    ['dr-test.yml', { ftkvm_dr_vms: ['nope'] }, /ftkvm_dr_vms: nope is not a VM with a dr entry in the ftkvm_vms of a pair/],
    ['dr-failover.yml', { ftkvm_dr_vms: 'web' }, /ftkvm_dr_vms: web ships to https:\/\/dr\.example\.net:7610, a DR target outside the inventory/],
    ['dr-test.yml', { ftkvm_dr_vms: 'drdb,api', ftkvm_dr_point: ctx.point }, /ftkvm_dr_point names a recovery point of one VM: give that VM alone in ftkvm_dr_vms/],
    ['dr-test.yml', { ftkvm_dr_timeout: 2 }, /ftkvm_dr_timeout must be a number of seconds from 5 to 3600, got "2"/],
  ];
  for (const [pb, extra, re] of cases) {
    const r = await playbook(pb, inventory(), extra);
    t.not(r.code, 0, `${pb} ${JSON.stringify(extra)}: ${r.out}`);
    t.regex(r.out, re, r.out);
    t.regex(r.out, /TASK \[Check the request\]/, 'refused by the request check');
  }
  t.deepEqual(drCalls(), [], 'nothing was called');
});

test.serial('dr-failover refuses while a VM still runs on a primary-site host that answers: nothing stopped, nothing started', async (t) => {
  ctx.requests.length = 0;
  // a process that looks like the agent's QEMU of drdb
  const q = spawn('bash', ['-c', 'exec -a "qemu-system-x86_64 -name guest=drdb,debug-threads=on" sleep 120'], { stdio: 'ignore' });
  t.teardown(() => { q.kill('SIGKILL'); });
  await new Promise((res) => setTimeout(res, 300));
  const r = await playbook('dr-failover.yml', inventory({ reachable: true }), { ftkvm_dr_vms: ['drdb'], ftkvm_dr_confirm_site_lost: true });
  t.not(r.code, 0, r.out);
  t.regex(r.out, new RegExp(`nothing was changed: pair_t/drdb runs on hostA \\(QEMU pid ${q.pid}\\)`), r.out);
  t.notRegex(r.out, /TASK \[Stop and disable the ftkvm agent/, 'the agent was not stopped');
  t.deepEqual(drCalls(), [], 'the DR target was not asked');
});

test.serial('dr-failover: the unreachable primary site is reported; without the witness the DR target asks for confirmation; with it the VM starts (RPO, RTO, guarantee)', async (t) => {
  ctx.requests.length = 0;
  const before = saved('dr-failover').length;
  const refused = await playbook('dr-failover.yml', inventory(), { ftkvm_dr_vms: ['drdb'] });
  t.not(refused.code, 0, refused.out);
  t.regex(refused.out, /hostA: UNREACHABLE \(.*\): its agent could not be stopped/, refused.out);
  t.regex(refused.out, /hostB: UNREACHABLE/, refused.out);
  t.regex(refused.out, /pair_t\/drdb NOT STARTED on dr1: drdb: this DR target has no witness configured, .*nothing was started.* -- The DR target could not take the lease of the VM at the witness/, refused.out);
  t.regex(refused.out, /run again with -e ftkvm_dr_confirm_site_lost=true: the VM then starts here WITHOUT that guarantee/, refused.out);
  t.deepEqual(drCalls().map((c) => [c.url, c.auth, c.body]), [['/v1/dr/vms/drdb/activate', `Bearer ${TOKEN}`, { timeoutS: 300, confirmSiteLost: false }]]);
  t.is(ctx.target.store.points('drdb').activated, null, 'nothing started');

  ctx.requests.length = 0;
  const r = await playbook('dr-failover.yml', inventory(), { ftkvm_dr_vms: 'drdb', ftkvm_dr_confirm_site_lost: true, ftkvm_dr_timeout: 60 });
  t.is(r.code, 0, r.out);
  t.deepEqual(drCalls().map((c) => c.body), [{ timeoutS: 60, confirmSiteLost: true }], 'confirmSiteLost is a JSON boolean');
  t.regex(r.out, new RegExp(`pair_t/drdb RUNS AT THE DR SITE on dr1 \\(QEMU pid \\d+\\) from recovery point ${ctx.point}: RPO \\d+ s \\(age of its data\\), RTO \\d+ ms .*no witness lease\\. Guarantee: NOT GUARANTEED: no witness`), r.out);
  t.regex(r.out, /1 VM\(s\) started at the DR site on dr1/);
  t.like(ctx.target.store.points('drdb').activated, { point: ctx.point, epoch: null });
  const s = saved('dr-failover');
  t.is(s.length, before + 2);
  const last = s.filter((x) => x.j.activated);
  t.is(last.length, 1);
  t.like(last[0]!.j, { pair: 'pair_t', vm: 'drdb', drHost: 'dr1', status: 200, request: { confirmSiteLost: true, timeoutS: 60 } });
  t.true(last[0]!.j.report.rpoS >= 61, 'the age of the point\'s data at activation');
  t.true(last[0]!.j.report.rtoMs > 0);
  t.is(last[0]!.j.report.witness, null);
  t.is(s.filter((x) => !x.j.activated)[0]!.j.report.error.code, 'CONFIRMATION_REQUIRED');
});

test.serial('check mode: dr-failover and dr-test call nothing', async (t) => {
  ctx.requests.length = 0;
  const f = await playbook('dr-failover.yml', inventory(), { ftkvm_dr_vms: ['api'], ftkvm_dr_confirm_site_lost: true }, ['--check']);
  t.is(f.code, 0, f.out);
  const d = await playbook('dr-test.yml', inventory(), {}, ['--check']);
  t.is(d.code, 0, d.out);
  t.deepEqual(drCalls(), []);
});

/** drdb runs at the DR site (dr-failover's test activates it; again here when run alone). */
async function drdbActivated(): Promise<void> {
  if (ctx.target.store.points('drdb').activated) return;
  const r = await fetch(`http://127.0.0.1:${ctx.port}/v1/dr/vms/drdb/activate`, {
    method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify({ timeoutS: 60, confirmSiteLost: true }),
  });
  if (r.status !== 200) throw new Error(`activate: ${r.status} ${await r.text()}`);
}

test.serial('dr-failback refuses a wrong request before calling anything', async (t) => {
  ctx.requests.length = 0;
  const cases: [Record<string, unknown>, RegExp][] = [
    [{}, /ftkvm_dr_vms is required: the VMs to bring back from the DR site to their pair, named one by one, e\.g\. -e ftkvm_dr_vms=db1,web1 \(VMs with a DR target: drdb, web, api\)/],
    [{ ftkvm_dr_vms: 'drdb', ftkvm_dr_failback_host: 'hostC' }, /ftkvm_dr_failback_host: hostC is not a host of pair_t \(hostA, hostB\), the pair of drdb/],
    [{ ftkvm_dr_vms: 'drdb', ftkvm_dr_protect_timeout: 'soon' }, /ftkvm_dr_protect_timeout must be a number of seconds from 1 to 86400, got "soon"/],
  ];
  for (const [extra, re] of cases) {
    const r = await playbook('dr-failback.yml', inventory(), extra);
    t.not(r.code, 0, `${JSON.stringify(extra)}: ${r.out}`);
    t.regex(r.out, re, r.out);
  }
  t.deepEqual(drCalls(), [], 'nothing was called');
});

test.serial('dr-failback refuses, naming the host, unless both hosts of the pair answer: nothing changed', async (t) => {
  await drdbActivated();
  ctx.requests.length = 0;
  const r = await playbook('dr-failback.yml', inventory({ reachable: true }), { ftkvm_dr_vms: ['drdb'] });
  t.not(r.code, 0, r.out);
  t.regex(r.out, /nothing was changed: hostB does not answer \(.*\)\. A fail-back of pair_t\/drdb needs both hosts\s+of its pair up/, r.out);
  t.notRegex(r.out, /hostA does not answer/, r.out);
  t.deepEqual(drCalls(), [], 'the DR target was not asked');
  t.truthy(ctx.target.store.points('drdb').activated, 'the VM still runs at the DR site');
});

test.serial('dr-failback refuses while a QEMU of the VM runs on the pair: nothing changed', async (t) => {
  await drdbActivated();
  ctx.requests.length = 0;
  const q = spawn('bash', ['-c', 'exec -a "qemu-system-x86_64 -name guest=drdb,debug-threads=on" sleep 120'], { stdio: 'ignore' });
  t.teardown(() => { q.kill('SIGKILL'); });
  await new Promise((res) => setTimeout(res, 300));
  const r = await playbook('dr-failback.yml', inventory({ pairUp: true }), { ftkvm_dr_vms: ['drdb'] });
  t.not(r.code, 0, r.out);
  t.regex(r.out, new RegExp(`nothing was changed: a QEMU of drdb runs on hostA \\(QEMU pid ${q.pid}\\); hostB \\(QEMU pid ${q.pid}\\)`), r.out);
  t.notRegex(r.out, /TASK \[Stop the ftkvm agent/, r.out);
  t.deepEqual(drCalls(), [], 'the DR target was not asked');
});

test.serial('check mode: dr-failback only reads (the DR target\'s view of the VM) and says what it would do', async (t) => {
  await drdbActivated();
  const before = ctx.target.store.points('drdb');
  const reportsBefore = readdirSync(reports).length;
  ctx.requests.length = 0;
  const r = await playbook('dr-failback.yml', inventory({ pairUp: true }), { ftkvm_dr_vms: 'drdb', ftkvm_dr_stop_timeout: 30 }, ['--check']);
  t.is(r.code, 0, r.out);
  t.deepEqual(drCalls().map((c) => [c.method, c.url, c.auth]), [['GET', '/v1/dr/vms/drdb', `Bearer ${TOKEN}`]], 'one read, nothing else');
  t.regex(r.out, new RegExp(`pair_t/drdb runs at the DR site dr1 \\(activated from point ${before.activated!.point}\\); it would come back to hostB \\(node hostB\\)`), 'preferred_primary is the pulling host');
  t.regex(r.out, new RegExp(`create an empty qcow2 disk ${join(dir, 'images', 'drdb.qcow2').replaceAll('/', '\\/')} of 1048576 bytes on hostB \\(missing there\\)`), r.out);
  t.regex(r.out, /planned stop at the DR site \(timeout 30 s\)/, r.out);
  t.regex(r.out, /changed=0/, r.out);
  t.notRegex(r.out, /changed=[1-9]/, r.out);
  t.false(existsSync(join(dir, 'images')), 'no disk created');
  t.deepEqual(ctx.target.store.points('drdb').activated, before.activated, 'the VM still runs at the DR site');
  t.is(readdirSync(reports).length, reportsBefore, 'no report saved');
});

test.serial('dr-failback: a failure before the planned stop leaves the VM at the DR site, says so and saves a report (here: no systemd unit)', async (t) => {
  await drdbActivated();
  const before = ctx.target.store.points('drdb');
  const n = saved('dr-failback').length;
  ctx.requests.length = 0;
  const r = await playbook('dr-failback.yml', inventory({ pairUp: true }), { ftkvm_dr_vms: 'pair_t/drdb', ftkvm_dr_failback_host: 'hostA' });
  t.not(r.code, 0, r.out);
  t.regex(r.out, /the fail-back of pair_t\/drdb stopped at "Stop the ftkvm agent on both hosts of the pair": One or more items failed; hostA: .+; hostB: .+\. The VM still runs at the DR site \(it was not stopped there\)/s, r.out);
  t.deepEqual(drCalls().map((c) => `${c.method} ${c.url}`), ['GET /v1/dr/vms/drdb'], 'no stop, no release');
  t.deepEqual(ctx.target.store.points('drdb').activated, before.activated);
  const s = saved('dr-failback');
  t.is(s.length, n + 1);
  t.like(s.at(-1)!.j, { kind: 'dr-failback', pair: 'pair_t', vm: 'drdb', drHost: 'dr1', host: 'hostA', node: 'hostA', ok: false, failedAt: 'Stop the ftkvm agent on both hosts of the pair', stop: {}, deactivate: {} });
});
