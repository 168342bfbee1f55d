// The agent as a process on one host (issue: foundation): it starts and supervises a real VM,
// reports it, survives SIGKILL + restart without touching the guest, and refuses bad input.
import test from 'ava';
import { execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { stringify } from 'yaml';
import { withPair, sleep, firstGap } from '../helpers/system.ts';
import { waitUntil, TOKEN } from '../../lab/pair.ts';
import { SerialWatcher, TxnClient } from '../../lab/traffic.ts';
import { AGENT_BIN, ROOT, testGuest } from '../../lab/guest.ts';
import type { StatusReport } from '../../agent/src/agent.ts';

const run = promisify(execFile);

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(AGENT_BIN, args, { timeout: 60_000, env: { ...process.env, NO_COLOR: '1' } });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (e) {
    const x = e as { code: number; stdout: string; stderr: string };
    return { code: x.code, stdout: x.stdout, stderr: x.stderr };
  }
}

test('the binary runs without Node and prints version and git commit', async (t) => {
  const r = await run(AGENT_BIN, ['--version'], { env: { PATH: '/nonexistent' } });
  t.regex(r.stdout, /^ftkvm-agent \d+\.\d+\.\d+ \(commit [0-9a-f]{12}(-dirty)?, node 20\.\d+\.\d+\)\n$/);
});

test('agent starts the VM, the guest works, status --json reports it; SIGKILL + restart re-attaches the same QEMU without stopping the guest', async (t) => {
  t.timeout(240_000);
  await withPair(t, 21, { peerless: true, startupPeerWaitMs: 1500, vms: [{ name: 'solo', guestIp: 10, basePort: 19000 }] }, async (p) => {
    const agent = p.startAgent('A');
    await waitUntil(async () => (await p.vmStatus('A', 'solo'))?.state === 'standalone' || undefined, 60_000, 'VM started');
    const serial = new SerialWatcher(p.serialLog('A', 'solo'));
    const client = new TxnClient(p.guestIp('solo'));
    await client.open();
    client.start();
    await waitUntil(() => client.txns.length >= 10 || undefined, 60_000, 'transactions');
    await waitUntil(() => serial.ticks().length >= 10 || undefined, 60_000, 'guest ticks');

    const st = await cli(['status', '--json', '--config', p.configPath('A')]);
    t.is(st.code, 0, st.stderr);
    const report = JSON.parse(st.stdout) as StatusReport & { health: { healthy: boolean } };
    const vm = report.vms[0]!;
    t.is(vm.name, 'solo');
    t.is(vm.role, 'standalone');
    t.is(vm.qemu?.runState, 'running');
    t.true(vm.qemu!.uptimeS >= 0);
    t.false(report.health.healthy, 'a VM without a replica is not healthy');
    const human = await cli(['status', '--config', p.configPath('A')]);
    t.regex(human.stdout, /solo\s+standalone\s+standalone\s+1\s+running pid \d+/);

    const pid = p.qemuPid('A', 'solo')!;
    t.is(vm.qemu?.pid, pid);
    const killedAt = Date.now();
    p.killAgent('A');
    await new Promise((r) => agent.once('exit', r));
    await sleep(3000); // the guest keeps running without its agent
    const ticksWhileDead = serial.ticks().filter((x) => x.at > killedAt + 200);
    t.true(ticksWhileDead.length >= 10, `guest ticked ${ticksWhileDead.length} times while the agent was dead`);
    p.startAgent('A');
    await waitUntil(async () => (await p.vmStatus('A', 'solo'))?.qemu?.reattached || undefined, 30_000, 're-attached');
    const after = (await p.vmStatus('A', 'solo'))!;
    t.is(after.qemu?.pid, pid, 'same QEMU process');
    t.is(after.state, 'standalone');
    t.is(after.epoch, 1, 're-attaching is not a new start');
    await sleep(2000);
    await client.stop();
    serial.stop();
    t.deepEqual(client.errors, []);
    t.is(firstGap(client.txns.map((x) => x.value)), null);
    const ticks = serial.ticks();
    t.is(firstGap(ticks.map((x) => x.n)), null, 'no tick lost or repeated');
    const maxGap = Math.max(...ticks.slice(1).map((x, i) => x.at - ticks[i]!.at));
    t.true(maxGap < 1000, `longest pause between guest ticks ${maxGap} ms (agent killed and restarted meanwhile)`);
    t.log(`guest ticks ${ticks.length}, longest gap ${maxGap} ms across agent SIGKILL + restart; QEMU pid ${pid} kept`);
    client.close();
  });
});

function minimalConfig(dir: string, overrides: Record<string, unknown> = {}) {
  const g = testGuest();
  writeFileSync(join(dir, 'token'), TOKEN + '\n', { mode: 0o600 });
  writeFileSync(join(dir, 'disk.qcow2'), '');
  return {
    node: { name: 'hostA', replication_address: '127.0.0.1' },
    peer: { name: 'hostB', addresses: ['192.0.2.1', '192.0.2.2'], replication_address: '192.0.2.1' },
    api: { listen: '127.0.0.1:0', token_file: join(dir, 'token') },
    heartbeat: { port: 0 },
    qemu: { accelerator: 'tcg' },
    state_dir: join(dir, 'state'),
    witness: { two_node_mode: true },
    vms: [{ name: 'x', memory_mib: 128, vcpus: 1, disk: { path: join(dir, 'disk.qcow2') }, boot: { kernel: g.kernel },
      nic: { bridge: 'br0', mac: '52:54:00:00:00:09' }, base_port: 19000, preferred_primary: 'hostA' }],
    ...overrides,
  };
}

test('a QEMU without COLO support is refused at start with the explanation (exit 3)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-nocolo-'));
  const cfg = minimalConfig(dir, { qemu: { accelerator: 'kvm', binary: join(ROOT, 'test/fixtures/fake-qemu-no-colo.mjs') } });
  writeFileSync(join(dir, 'agent.yaml'), stringify(cfg).replace('127.0.0.1:0', '127.0.0.1:17999').replace('port: 0', 'port: 17998'));
  const r = await cli(['run', '--config', join(dir, 'agent.yaml')]);
  t.is(r.code, 3);
  t.regex(r.stderr, /refusing to protect VMs: QEMU .*fake-qemu-no-colo\.mjs \(8\.2\.0 qemu-kvm-8\.2\.0-11\.el9_4\) cannot protect VMs with COLO/);
  t.regex(r.stderr, /missing: .*object type 'colo-compare'.*QMP command 'x-colo-lost-heartbeat'.*block driver 'replication'/);
  t.regex(r.stderr, /built with --disable-replication/);
});

test('an invalid configuration is refused at start: exit 2, file, line and field named', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-badcfg-'));
  const cfg = minimalConfig(dir);
  const text = stringify(cfg).replace('memory_mib: 128', 'memory_mib: "128M"').replace('port: 0', 'port: 7481').replace('127.0.0.1:0', '127.0.0.1:17997');
  writeFileSync(join(dir, 'agent.yaml'), text);
  const r = await cli(['run', '--config', join(dir, 'agent.yaml')]);
  t.is(r.code, 2);
  t.regex(r.stderr, new RegExp(`refusing to start: invalid configuration .*agent\\.yaml:\\n  .*agent\\.yaml:\\d+:\\d+: vms\\[0\\]\\.memory_mib: expected a number, got "128M"`));
  const c = await cli(['check-config', '--config', join(dir, 'agent.yaml')]);
  t.is(c.code, 2);
  t.regex(c.stderr, /vms\[0\]\.memory_mib/);
});

test('unknown commands and options are usage errors (exit 2)', async (t) => {
  t.is((await cli(['frobnicate'])).code, 2);
  const r = await cli(['status', '--no-such-flag']);
  t.is(r.code, 2);
  t.regex(r.stderr, /Unknown option '--no-such-flag'/);
  t.is((await cli(['status', '--url', 'http://127.0.0.1:1'])).code, 4);
});
