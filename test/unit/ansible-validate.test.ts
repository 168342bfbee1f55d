// The ftkvm_agent role refuses a wrong inventory early, naming the variable to fix; a good
// inventory renders an agent.yaml that the real agent accepts (check-config). Runs Ansible on
// the controller only (connection local): no hosts needed.
import test from 'ava';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse, stringify } from 'yaml';
import { AGENT_BIN, ROOT } from '../../lab/guest.ts';

interface Inv { hosts: Record<string, Record<string, unknown>>; pairVars?: Record<string, unknown>; allVars?: Record<string, unknown>; witness?: boolean; etcd?: string[] }

async function render(inv: Inv): Promise<{ code: number; out: string; dir: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-validate-'));
  for (const f of ['disk.qcow2', 'vmlinuz', 'initrd']) writeFileSync(join(dir, f), '');
  for (const f of ['ca.pem', 'node.pem']) writeFileSync(join(dir, f), '');
  writeFileSync(join(dir, 'node.key'), '', { mode: 0o600 });
  for (const f of ['token', 'heartbeat.key', 'witness-token', 'etcd-password']) writeFileSync(join(dir, f), `${f}-`.padEnd(32, 'x') + '\n', { mode: 0o600 });
  const doc = {
    all: {
      vars: {
        ansible_connection: 'local', ansible_python_interpreter: process.env.FTKVM_TEST_PYTHON ?? '/usr/bin/python3',
        ftkvm_agent_binary_src: AGENT_BIN, ftkvm_test_out_dir: dir, ftkvm_token_file: join(dir, 'token'),
        ftkvm_heartbeat_key_file: join(dir, 'heartbeat.key'), ftkvm_witness_token_file: join(dir, 'witness-token'), ftkvm_tls_dir: dir,
        ftkvm_qemu_binary: '/usr/bin/qemu-system-x86_64', ftkvm_qemu_img_binary: '/usr/bin/qemu-img',
        ...JSON.parse(JSON.stringify(inv.allVars ?? {}).replaceAll('/DIR/', `${dir}/`)),
      },
      children: {
        ...(inv.witness === false ? {} : { ftkvm_witness: { hosts: { w1: { ansible_host: '10.9.0.5' } } } }),
        ...(inv.etcd ? { ftkvm_etcd: { hosts: Object.fromEntries(inv.etcd.map((a, i) => [`e${i + 1}`, { ansible_host: a }])) } } : {}),
        ftkvm_pairs: { children: { pair_t: { hosts: inv.hosts, vars: { ftkvm_vms: [vm('a', 9000)], ...inv.pairVars } } } },
      },
    },
  };
  writeFileSync(join(dir, 'inventory.yml'), stringify(doc, { defaultStringType: 'QUOTE_DOUBLE', defaultKeyType: 'PLAIN' }));
  return await new Promise((resolve) => {
    const p = spawn('ansible-playbook', ['-i', join(dir, 'inventory.yml'), 'test/testbed/render-agent-config.yml'], {
      cwd: ROOT, env: { ...process.env, ANSIBLE_CONFIG: join(ROOT, 'ansible.cfg'), ANSIBLE_NOCOLOR: '1', ANSIBLE_FORCE_COLOR: '0' }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { out += d; });
    // (Ansible prints messages JSON-escaped: \" -> ")
    p.on('close', (code) => resolve({ code: code ?? -1, out: out.replaceAll('\\"', '"'), dir }));
  });
}

function vm(name: string, base: number, extra: Record<string, unknown> = {}) {
  return {
    name, memory_mib: 256, vcpus: 1, base_port: base, preferred_primary: 'hostA',
    disk: { path: '/DIR/disk.qcow2' }, boot: { kernel: '/DIR/vmlinuz', initrd: '/DIR/initrd', append: 'console=ttyS0' },
    nic: { mac: `52:54:00:00:00:${(base % 256).toString(16).padStart(2, '0')}` }, probe: { address: '10.9.3.10', port: 7000 }, ...extra,
  };
}

const pair = () => ({
  hostA: { ansible_host: '10.9.0.11', ftkvm_replication_address: '10.9.1.11' },
  hostB: { ansible_host: '10.9.0.12', ftkvm_replication_address: '10.9.1.12' },
});

test('a good inventory renders an agent.yaml the agent accepts', async (t) => {
  if (!existsSync(AGENT_BIN)) { t.fail(`${AGENT_BIN} missing: npm run build`); return; }
  const r = await render({ hosts: pair(), pairVars: { ftkvm_vms: [] } });
  try {
    t.is(r.code, 0, r.out);
    const a = parse(readFileSync(join(r.dir, 'hostA.yaml'), 'utf8')) as Record<string, any>;
    t.deepEqual(a.node, { name: 'hostA', replication_address: '10.9.1.11' });
    t.deepEqual(a.peer, { name: 'hostB', addresses: ['10.9.1.12', '10.9.0.12'], replication_address: '10.9.1.12' });
    t.is(a.witness.url, 'https://10.9.0.5:7490', 'TLS by default');
    t.is(a.witness.ca_file, join(r.dir, 'ca.pem'));
    t.deepEqual(a.api.tls, { cert_file: join(r.dir, 'node.pem'), key_file: join(r.dir, 'node.key'), ca_file: join(r.dir, 'ca.pem') });
    t.is(a.witness.token_file, join(r.dir, 'witness-token'), 'this node\'s own witness token');
    t.is(a.heartbeat.key_file, join(r.dir, 'heartbeat.key'), 'the pair\'s heartbeat key');
    t.is(a.heartbeat.previous_key_file, undefined, 'no previous key on a new install');
    t.is(a.api.listen, '0.0.0.0:7480');
  } finally { rmSync(r.dir, { recursive: true, force: true }); }
});

test('the etcd lease store: every member\'s endpoint, this node as its own user within its pair, TLS, a numeric lease; check-config accepts it', async (t) => {
  if (!existsSync(AGENT_BIN)) { t.fail(`${AGENT_BIN} missing: npm run build`); return; }
  const r = await render({ hosts: pair(), witness: false, etcd: ['10.9.0.21', '10.9.0.22', '10.9.0.23'], pairVars: { ftkvm_vms: [] },
    allVars: { ftkvm_witness_backend: 'etcd', ftkvm_etcd_password_file: '/DIR/etcd-password' } });
  try {
    t.is(r.code, 0, r.out);
    const a = parse(readFileSync(join(r.dir, 'hostA.yaml'), 'utf8')) as Record<string, any>;
    t.deepEqual(a.witness, {
      etcd: { endpoints: ['https://10.9.0.21:2379', 'https://10.9.0.22:2379', 'https://10.9.0.23:2379'], pair: 't', prefix: '/ftkvm', user: 'hostA',
        password_file: join(r.dir, 'etcd-password'), ca_file: join(r.dir, 'ca.pem'), cert_file: join(r.dir, 'node.pem'), key_file: join(r.dir, 'node.key') },
      lease_ms: 5000,
    });
  } finally { rmSync(r.dir, { recursive: true, force: true }); }
  const bad = await render({ hosts: pair(), witness: false, pairVars: { ftkvm_vms: [] }, allVars: { ftkvm_witness_backend: 'etcd', ftkvm_etcd_lease_ms: 2500 } });
  try {
    t.not(bad.code, 0);
    t.regex(bad.out, /the ftkvm_etcd group \(ftkvm_etcd_group\) has no hosts/);
    t.regex(bad.out, /ftkvm_etcd_lease_ms must be whole seconds/);
  } finally { rmSync(bad.dir, { recursive: true, force: true }); }
});

test('VM files, preferred_primary and QEMU settings reach agent.yaml and pass check-config', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-vmfiles-'));
  for (const f of ['disk.qcow2', 'vmlinuz', 'initrd']) writeFileSync(join(dir, f), '');
  const v = JSON.parse(JSON.stringify(vm('web', 9000)).replaceAll('/DIR', dir));
  const r = await render({
    hosts: pair(), witness: false,
    pairVars: { ftkvm_vms: [v], ftkvm_two_node_mode: true, ftkvm_accelerator: 'tcg', ftkvm_qemu_environment: { X: '1' }, ftkvm_qemu_extra_args: ['-trace', 'enable=x'], ftkvm_qemu_tcg_lab_shim: '/usr/local/lib/ftkvm-test/shim.so' },
  });
  try {
    t.is(r.code, 0, r.out);
    const b = parse(readFileSync(join(r.dir, 'hostB.yaml'), 'utf8')) as Record<string, any>;
    t.deepEqual(b.witness, { two_node_mode: true });
    t.deepEqual(b.qemu.env, { X: '1' });
    t.is(b.qemu.tcg_lab_shim, '/usr/local/lib/ftkvm-test/shim.so');
    t.deepEqual(b.qemu.extra_args, ['-trace', 'enable=x']);
    t.is(b.vms[0].preferred_primary, 'hostA');
    t.deepEqual(b.vms[0].disk, { path: join(dir, 'disk.qcow2'), format: 'qcow2' });
    t.deepEqual(b.vms[0].nic, { bridge: 'br-ftkvm', mac: '52:54:00:00:00:28' });
    t.deepEqual(b.vms[0].probe, { address: '10.9.3.10', port: 7000 });
  } finally { rmSync(r.dir, { recursive: true, force: true }); rmSync(dir, { recursive: true, force: true }); }
});

const refusals: [string, Inv, RegExp][] = [
  ['three hosts in a pair', { hosts: { ...pair(), hostC: { ansible_host: '10.9.0.13', ftkvm_replication_address: '10.9.1.13' } } },
    /ftkvm_pair_hosts must list exactly 2 hosts including hostA, got 3 \(hostA, hostB, hostC\)/],
  ['the peer has no replication address', { hosts: { ...pair(), hostB: { ansible_host: '10.9.0.12' } } },
    /ftkvm_replication_address of the peer hostB must be an IP address, got ""/],
  ['a management address that is a name', { hosts: { ...pair(), hostA: { ansible_host: 'kvm-a.example.com', ftkvm_replication_address: '10.9.1.11' } } },
    /ftkvm_management_address of hostA must be an IP address, got "kvm-a.example.com"/],
  ['COLO ports of two VMs collide', { hosts: pair(), pairVars: { ftkvm_vms: [vm('a', 9000), vm('b', 9095)] } },
    /ftkvm_vms\[1\] \(b\)\.base_port 9095: port 9098 \(base_port\+3\) is also used by ftkvm_vms\[0\] \(a\)/],
  ['a COLO port is the API port', { hosts: pair(), pairVars: { ftkvm_vms: [vm('a', 7477)] } },
    /ftkvm_vms\[0\] \(a\)\.base_port 7477: port 7480 \(base_port\+3\) clashes with ftkvm_api_port/],
  ['duplicate VM names and MACs', { hosts: pair(), pairVars: { ftkvm_vms: [vm('a', 9000), vm('a', 9200, { nic: { mac: '52:54:00:00:00:28' } })] } },
    /duplicate VM name \(also ftkvm_vms\[0\]\).*duplicate MAC address 52:54:00:00:00:28/s],
  ['preferred_primary outside the pair', { hosts: pair(), pairVars: { ftkvm_vms: [vm('a', 9000, { preferred_primary: 'hostZ' })] } },
    /ftkvm_vms\[0\] \(a\)\.preferred_primary must name a host of the pair \(hostA or hostB\), got "hostZ"/],
  ['the TCG lab shim with KVM', { hosts: pair(), pairVars: { ftkvm_qemu_tcg_lab_shim: '/usr/local/lib/shim.so' } },
    /ftkvm_qemu_tcg_lab_shim is for TCG labs only: set ftkvm_accelerator: tcg/],
  ['no witness and no explicit two-node mode', { hosts: pair(), witness: false },
    /no witness: add a host to the ftkvm_witness group, or set ftkvm_witness_url, or \(no split-brain protection\) set ftkvm_two_node_mode: true/],
];

for (const [title, inv, re] of refusals) {
  test(`refused with the variable named: ${title}`, async (t) => {
    const r = await render(inv);
    try {
      t.not(r.code, 0, r.out);
      t.regex(r.out, re, r.out);
      t.regex(r.out, /TASK \[ftkvm_agent : Report the problems\]/, 'fails in the role\'s early check, before any change');
    } finally { rmSync(r.dir, { recursive: true, force: true }); }
  });
}
