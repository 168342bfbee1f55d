// The Ansible side of disaster recovery, on the controller only (connection local, no hosts):
// the ftkvm_agent role renders vms[].dr from the inventory (a DR host's URL, the DR token, the CA)
// and the agent's own schema accepts it; the ftkvm_dr_target role renders dr-target.yaml from
// the pairs' ftkvm_vms and the DR target's own loader accepts it; the witness role registers a DR
// host in the one pair it serves; wrong inventories are refused naming the variable; the argument
// specs know vms[].dr; every role defaults to the DR target's port.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse, stringify } from 'yaml';
import { ROOT } from '../../lab/guest.ts';
import { parseConfig } from '../../agent/src/config/load.ts';
import { loadDrTargetConfig } from '../../agent/src/dr/config.ts';
import { DEFAULT_DR_PORT } from '../../agent/src/dr/protocol.ts';

// Playbooks of the test (the roles' own tasks and templates, rendered on the controller), run
// one after the other: a play whose hosts all fail would stop the ones after it.
const PLAYBOOKS = {
  agent: `
- name: Agent configuration of the pairs
  hosts: ftkvm_pairs
  gather_facts: false
  tasks:
    - name: The agent role's inventory checks
      ansible.builtin.include_role: {name: ftkvm_agent, tasks_from: validate.yml, public: true}
    - name: Render agent.yaml
      ansible.builtin.template:
        src: "${ROOT}/roles/ftkvm_agent/templates/agent.yaml.j2"
        dest: "{{ ftkvm_test_out_dir }}/{{ inventory_hostname }}.yaml"
        mode: "0600"
    - name: Whether the host gets the DR token
      ansible.builtin.copy:
        content: "{{ __ftkvm_agent_dr_token_needed | bool | to_json }}"
        dest: "{{ ftkvm_test_out_dir }}/{{ inventory_hostname }}.dr-token-needed"
        mode: "0600"
`,
  witness: `
- name: The witness's nodes
  hosts: ftkvm_witness
  gather_facts: false
  tasks:
    - name: The witness role's checks
      ansible.builtin.include_role: {name: ftkvm_witness, tasks_from: validate.yml, public: true}
    - name: Its nodes, their names and pairs
      ansible.builtin.copy:
        content: "{{ {'nodes': __ftkvm_witness_nodes, 'names': __ftkvm_witness_node_names, 'pairs': __ftkvm_witness_node_pairs} | to_json }}"
        dest: "{{ ftkvm_test_out_dir }}/witness-nodes.json"
        mode: "0600"
`,
  dr: `
- name: DR targets
  hosts: ftkvm_dr
  gather_facts: false
  tasks:
    - name: The DR target role's inventory checks
      ansible.builtin.include_role: {name: ftkvm_dr_target, tasks_from: validate.yml, public: true}
    - name: Render dr-target.yaml
      ansible.builtin.template:
        src: "${ROOT}/roles/ftkvm_dr_target/templates/dr-target.yaml.j2"
        dest: "{{ ftkvm_test_out_dir }}/{{ inventory_hostname }}.yaml"
        mode: "0600"
    - name: What the role uploads and checks on the DR host
      ansible.builtin.copy:
        content: "{{ {'uploads': __ftkvm_dr_uploads, 'host_files': __ftkvm_dr_host_files, 'bridges': __ftkvm_dr_bridges} | to_json }}"
        dest: "{{ ftkvm_test_out_dir }}/{{ inventory_hostname }}.checks.json"
        mode: "0600"
`,
};
type Part = keyof typeof PLAYBOOKS;

type Vm = Record<string, unknown>;
interface Inv { pairs: Record<string, Vm[]>; dr?: Record<string, Record<string, unknown>>; allVars?: Record<string, unknown>; pairVars?: Record<string, Record<string, unknown>> }

function vm(name: string, base: number, extra: Vm = {}): Vm {
  return {
    name, memory_mib: 256, vcpus: 1, base_port: base, disk: { path: '/DIR/disk.qcow2' },
    boot: { kernel: '/DIR/vmlinuz', initrd: '/DIR/initrd', append: 'console=ttyS0' },
    nic: { mac: `52:54:00:00:00:${(base % 256).toString(16).padStart(2, '0')}` }, probe: { address: '10.9.3.10', port: 7000 }, ...extra,
  };
}

function render(inv: Inv, parts: Part[] = ['agent', 'witness', 'dr']): { code: number; out: string; dir: string; read: (f: string) => string } {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-dr-'));
  // (api.vmlinuz: where the agent role puts a kernel_src, ftkvm_images_dir below)
  for (const f of ['disk.qcow2', 'vmlinuz', 'initrd', 'api.vmlinuz', 'ca.pem', 'node.pem', 'agent-bin']) writeFileSync(join(dir, f), '');
  writeFileSync(join(dir, 'node.key'), '', { mode: 0o600 });
  for (const f of ['token', 'heartbeat.key', 'witness-token', 'dr-token', 'other-token']) writeFileSync(join(dir, f), `${f}-`.padEnd(32, 'x') + '\n', { mode: 0o600 });
  const sub = <T>(o: T): T => JSON.parse(JSON.stringify(o).replaceAll('/DIR/', `${dir}/`)) as T;
  const local = { ansible_connection: 'local', ansible_python_interpreter: process.env.FTKVM_TEST_PYTHON ?? '/usr/bin/python3' };
  let n = 10;
  const pairs = Object.fromEntries(Object.entries(inv.pairs).map(([p, vms]) => {
    const hosts = Object.fromEntries([1, 2].map((k) => [`pair_${p}-h${k}`, { ansible_host: `10.9.0.${n + k}`, ftkvm_replication_address: `10.9.1.${n + k}` }]));
    const first = Object.keys(hosts)[0]!;
    n += 10;
    return [`pair_${p}`, { hosts, vars: { ftkvm_vms: sub(vms).map((v) => ({ preferred_primary: first, ...v })), ...inv.pairVars?.[p] } }];
  }));
  const doc = {
    all: {
      vars: {
        ...local, ftkvm_agent_binary_src: join(dir, 'agent-bin'), ftkvm_test_out_dir: dir, ftkvm_token_file: join(dir, 'token'),
        ftkvm_heartbeat_key_file: join(dir, 'heartbeat.key'), ftkvm_witness_token_file: join(dir, 'witness-token'), ftkvm_tls_dir: dir,
        ftkvm_dr_token_file: join(dir, 'dr-token'), ftkvm_images_dir: dir,
        ftkvm_qemu_binary: '/usr/bin/qemu-system-x86_64', ftkvm_qemu_img_binary: '/usr/bin/qemu-img', ftkvm_qemu_nbd_binary: '/usr/bin/qemu-nbd',
        ...sub(inv.allVars ?? {}),
      },
      children: {
        ftkvm_witness: { hosts: { w1: { ansible_host: '10.9.0.5' } } },
        ftkvm_dr: { hosts: sub(inv.dr ?? {}) },
        ftkvm_pairs: { children: pairs },
      },
    },
  };
  writeFileSync(join(dir, 'inventory.yml'), stringify(doc, { defaultStringType: 'QUOTE_DOUBLE', defaultKeyType: 'PLAIN' }));
  let code = 0, out = '';
  for (const part of parts) {
    writeFileSync(join(dir, `${part}.yml`), PLAYBOOKS[part]);
    const r = spawnSync('ansible-playbook', ['-i', join(dir, 'inventory.yml'), join(dir, `${part}.yml`)], {
      cwd: ROOT, encoding: 'utf8', timeout: 240_000,
      env: { ...process.env, ANSIBLE_CONFIG: join(ROOT, 'ansible.cfg'), ANSIBLE_NOCOLOR: '1', ANSIBLE_FORCE_COLOR: '0' },
    });
    // (Ansible prints messages JSON-escaped: \" -> ")
    out += `${r.stdout}\n${r.stderr}${r.error ? `\n${r.error.message}` : ''}`.replaceAll('\\"', '"');
    code ||= r.status ?? -1;
  }
  return { code, out, dir, read: (f) => readFileSync(join(dir, f), 'utf8') };
}

// pair t: db ships to the DR host dr1 (with DR-site-only keys), web to a DR target outside the
// inventory, app has no DR. pair u: api ships to dr2 (its own port, no witness; kernel uploaded).
const goodInventory = (): Inv => ({
  pairs: {
    t: [
      vm('db', 9000, { probe: { address: '10.9.3.10', port: 7000, request: 'inc', counter: true },
        dr: { target: 'dr1', interval_s: 60, keep: 12, bandwidth_mbit: 50, nic: { bridge: 'br-dr', tap: 'ftdr-db' }, probe_request: 'get', test_network: '10.9.3.0/24' } }),
      vm('web', 9100, { dr: { target: 'https://dr.example.net:7610', token_file: '/DIR/other-token', interval_s: 120 } }),
      vm('app', 9200),
    ],
    u: [vm('api', 9300, { boot: { kernel_src: '/DIR/vmlinuz', append: 'console=ttyS0' }, nic: { mac: '52:54:00:00:01:01', bridge: 'br-u' },
      probe: { address: '10.9.4.10', port: 8080, request: 'ping' }, dr: { target: 'dr2' } })],
  },
  dr: {
    dr1: { ansible_host: '10.9.5.1' },
    dr2: { ansible_host: '10.9.5.2', ftkvm_dr_address: 'fd00::52', ftkvm_dr_port: 7611, ftkvm_dr_use_witness: false },
  },
});

test('vms[].dr in agent.yaml: a DR host of the inventory becomes its URL, the DR token and the CA; the agent accepts it', (t) => {
  const r = render(goodInventory());
  try {
    t.is(r.code, 0, r.out);
    const text = r.read('pair_t-h1.yaml');
    const a = parse(text) as { vms: { name: string; dr?: Record<string, unknown> }[] };
    t.deepEqual(a.vms.map((v) => v.name), ['db', 'web', 'app']);
    t.deepEqual(a.vms[0]!.dr, { target: 'https://10.9.5.1:7610', token_file: join(r.dir, 'dr-token'), ca_file: join(r.dir, 'ca.pem'), interval_s: 60, keep: 12, bandwidth_mbit: 50 },
      'nic, probe_request and test_network stay on the DR host');
    t.deepEqual(a.vms[1]!.dr, { target: 'https://dr.example.net:7610', token_file: join(r.dir, 'other-token'), interval_s: 120 }, 'a URL target as given');
    t.is(a.vms[2]!.dr, undefined);
    const c = parseConfig(text, 'pair_t-h1.yaml');
    t.like(c.vms[0]!.dr, { target: 'https://10.9.5.1:7610', interval_s: 60, keep: 12, bandwidth_mbit: 50, rpo_target_s: 180 });
    t.like(c.vms[1]!.dr, { keep: 24, bandwidth_mbit: 200, rpo_target_s: 300 }, 'the agent\'s defaults');
    const u = parseConfig(r.read('pair_u-h1.yaml'), 'pair_u-h1.yaml');
    t.deepEqual(u.vms[0]!.dr?.target, 'https://[fd00::52]:7611', 'the DR host\'s ftkvm_dr_address (bracketed IPv6) and its own ftkvm_dr_port');
    t.is(r.read('pair_t-h2.dr-token-needed'), 'true');
    t.is(r.read('pair_u-h2.dr-token-needed'), 'true');
  } finally { rmSync(r.dir, { recursive: true, force: true }); }
});

test('dr-target.yaml of each DR host: the VMs whose dr.target it is, DR bridge and probe, witness; the DR target accepts it', (t) => {
  const r = render(goodInventory());
  try {
    t.is(r.code, 0, r.out);
    const d1 = loadDrTargetConfig(join(r.dir, 'dr1.yaml'));
    t.deepEqual(d1.node, { name: 'dr1' });
    t.is(d1.listen, '0.0.0.0:7610');
    t.is(d1.token_file, join(r.dir, 'dr-token'));
    t.deepEqual(d1.tls, { cert_file: join(r.dir, 'node.pem'), key_file: join(r.dir, 'node.key') });
    t.deepEqual(d1.witness, { url: 'https://10.9.0.5:7490', token_file: join(r.dir, 'witness-token'), ca_file: join(r.dir, 'ca.pem'), lease_ms: 1000 });
    t.deepEqual(d1.qemu, { binary: '/usr/bin/qemu-system-x86_64', img_binary: '/usr/bin/qemu-img', nbd_binary: '/usr/bin/qemu-nbd', accelerator: 'kvm', machine: 'pc', extra_args: [] });
    t.deepEqual(d1.vms, [{
      name: 'db', memory_mib: 256, vcpus: 1, boot: { kernel: join(r.dir, 'vmlinuz'), initrd: join(r.dir, 'initrd'), append: 'console=ttyS0' },
      nic: { bridge: 'br-dr', mac: '52:54:00:00:00:28', tap: 'ftdr-db' }, probe: { address: '10.9.3.10', port: 7000, request: 'get' }, test_network: '10.9.3.0/24',
    }], 'only db: web ships outside the inventory, app has no dr, api goes to dr2');
    const d2 = loadDrTargetConfig(join(r.dir, 'dr2.yaml'));
    t.is(d2.listen, '0.0.0.0:7611');
    t.is(d2.witness, undefined, 'ftkvm_dr_use_witness: false');
    t.deepEqual(d2.vms, [{
      name: 'api', memory_mib: 256, vcpus: 1, boot: { kernel: '/var/lib/ftkvm-dr/boot/api.vmlinuz', append: 'console=ttyS0' },
      nic: { bridge: 'br-u', mac: '52:54:00:00:01:01' }, probe: { address: '10.9.4.10', port: 8080, request: 'ping' },
    }], 'the VM\'s own bridge and probe request when dr sets none; the kernel uploaded to the boot directory');
    const c1 = JSON.parse(r.read('dr1.checks.json'));
    t.deepEqual(c1.host_files.map((f: { path: string }) => f.path), [join(r.dir, 'vmlinuz'), join(r.dir, 'initrd')], 'kernel paths checked on the DR host');
    t.deepEqual(c1.bridges, [{ bridge: 'br-dr', vms: ['db'] }]);
    const c2 = JSON.parse(r.read('dr2.checks.json'));
    t.deepEqual(c2.uploads, [{ vm: 'api', src: join(r.dir, 'vmlinuz'), dest: '/var/lib/ftkvm-dr/boot/api.vmlinuz' }]);
    const w = JSON.parse(r.read('witness-nodes.json')) as { nodes: string[]; names: string[]; pairs: string[] };
    t.deepEqual(w.nodes, ['pair_t-h1', 'pair_t-h2', 'pair_u-h1', 'pair_u-h2', 'dr1'], 'dr1 has its own witness identity; dr2 runs without the witness');
    t.is(w.pairs[w.nodes.indexOf('dr1')], 't', 'in the pair whose VMs it serves');
    t.is(w.names[w.nodes.indexOf('dr1')], 'dr1');
  } finally { rmSync(r.dir, { recursive: true, force: true }); }
});

test('a pair without a DR host of the inventory does not get the DR token', (t) => {
  const r = render({ pairs: { t: [vm('web', 9100, { dr: { target: 'http://192.0.2.9:7610' } }), vm('app', 9200)] } });
  try {
    t.is(r.code, 0, r.out);
    t.is(r.read('pair_t-h1.dr-token-needed'), 'false');
    const a = parseConfig(r.read('pair_t-h1.yaml'), 'a.yaml');
    t.deepEqual(a.vms[0]!.dr?.target, 'http://192.0.2.9:7610');
    t.is((parse(r.read('pair_t-h1.yaml')) as { vms: { dr?: { token_file?: string } }[] }).vms[0]!.dr!.token_file, undefined, 'a URL target without token_file: the agent uses its API token');
  } finally { rmSync(r.dir, { recursive: true, force: true }); }
});

const refusals: [string, Inv, string, RegExp[]][] = [
  ['dr.target neither a DR host nor a URL', { pairs: { t: [vm('a', 9000, { dr: { target: 'dr9' } })] }, dr: { dr1: { ansible_host: '10.9.5.1' } } }, 'ftkvm_agent',
    [/ftkvm_vms\[0\] \(a\)\.dr\.target must be the inventory name of a host of the ftkvm_dr group \(ftkvm_dr_group: dr1\) or an http:\/\/ or https:\/\/ URL, got "dr9"/]],
  ['unknown dr keys and out-of-range numbers', { pairs: { t: [vm('a', 9000, { dr: { target: 'http://192.0.2.9:7610', interval: 60, keep: 0 } })] } }, 'ftkvm_agent',
    [/ftkvm_vms\[0\] \(a\)\.dr: unknown keys interval/, /ftkvm_vms\[0\] \(a\)\.dr\.keep must be a whole number from 1 to 1000, got "0"/]],
  ['a DR host serving two pairs with the witness', {
    pairs: { t: [vm('db', 9000, { dr: { target: 'dr1' } })], u: [vm('api', 9300, { nic: { mac: '52:54:00:00:01:01' }, dr: { target: 'dr1' } })] },
    dr: { dr1: { ansible_host: '10.9.5.1' } } }, 'ftkvm_dr_target',
    [/dr1 serves the VMs of 2 pairs \(pair_t, pair_u\), but the witness knows a node in one pair only: give each pair its own DR host \(or set ftkvm_dr_use_witness: false for dr1/]],
  ['a DR host for a pair whose leases are in etcd', {
    pairs: { t: [vm('db', 9000, { dr: { target: 'dr1' } })] }, dr: { dr1: { ansible_host: '10.9.5.1' } },
    pairVars: { t: { ftkvm_witness_backend: 'etcd' } } }, 'ftkvm_dr_target',
    [/pair_t keeps its leases in etcd \(ftkvm_witness_backend: etcd\): the DR target takes leases at the embedded witness only \(or set ftkvm_dr_use_witness: false/]],
  ['one VM name twice on a DR host, a bad DR bridge, no probe', {
    pairs: {
      t: [vm('db', 9000, { dr: { target: 'dr1', nic: { bridge: 'a-bridge-name-too-long' } } })],
      u: [vm('db', 9300, { nic: { mac: '52:54:00:00:01:01' }, probe: undefined, dr: { target: 'dr1' } })],
    },
    dr: { dr1: { ansible_host: '10.9.5.1', ftkvm_dr_use_witness: false } } }, 'ftkvm_dr_target',
    [/ftkvm_vms\[0\] \(db\) of pair_t: the bridge at the DR site \(dr\.nic\.bridge, else nic\.bridge, else ftkvm_guest_bridge of dr1\) must be a Linux interface name \(1-15 characters\), got "a-bridge-name-too-long"/,
      /ftkvm_vms\[0\] \(db\) of pair_u: the VM name db is also used by ftkvm_vms\[0\] of pair_t, and both have dr\.target dr1/,
      /ftkvm_vms\[0\] \(db\) of pair_u has a dr entry but no probe \{address, port\}/]],
];

for (const [title, inv, role, res] of refusals) {
  test(`refused with the variable named: ${title}`, (t) => {
    const r = render(inv, [role === 'ftkvm_agent' ? 'agent' : 'dr']);
    try {
      t.not(r.code, 0, r.out);
      for (const re of res) t.regex(r.out, re, r.out);
      t.regex(r.out, new RegExp(`TASK \\[${role} : Report the problems\\]`), 'fails in the role\'s early check, before any change');
    } finally { rmSync(r.dir, { recursive: true, force: true }); }
  });
}

test('the agent role\'s argument spec knows vms[].dr (and requires its target)', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-dr-spec-'));
  try {
    const spec = (parse(readFileSync(join(ROOT, 'roles/ftkvm_agent/meta/argument_specs.yml'), 'utf8')) as { argument_specs: { main: { options: Record<string, unknown> } } }).argument_specs.main.options;
    const check = (dr: unknown) => {
      writeFileSync(join(dir, 'spec.yml'), stringify([{ hosts: 'localhost', gather_facts: false, tasks: [{
        name: 'Validate', 'ansible.builtin.validate_argument_spec': { argument_spec: { ftkvm_vms: spec.ftkvm_vms }, provided_arguments: {
          ftkvm_vms: [{ name: 'db', memory_mib: 256, vcpus: 1, disk: { size: '1G' }, boot: { firmware: 'bios' }, nic: { mac: '52:54:00:00:00:01' },
            base_port: 9000, preferred_primary: 'a', probe: { address: '10.9.3.10', port: 7000 }, dr } ] } } }] }]));
      const r = spawnSync('ansible-playbook', ['-i', 'localhost,', '-c', 'local', join(dir, 'spec.yml')], { encoding: 'utf8', timeout: 60_000,
        env: { ...process.env, ANSIBLE_NOCOLOR: '1', ANSIBLE_LOCALHOST_WARNING: 'false' } });
      return { code: r.status ?? -1, out: `${r.stdout}\n${r.stderr}` };
    };
    const ok = check({ target: 'dr1', interval_s: 60, keep: 12, rpo_target_s: 300, bandwidth_mbit: 50, token_file: '/etc/ftkvm/dr-token', ca_file: '/etc/ftkvm/tls/ca.pem',
      nic: { bridge: 'br-dr', tap: 'ftdr-db' }, probe_request: 'get', test_network: '10.9.3.0/24' });
    t.is(ok.code, 0, ok.out);
    const bad = check({ interval_s: 60, colour: 'blue' });
    t.not(bad.code, 0, bad.out);
    t.regex(bad.out, /missing required arguments: target found in ftkvm_vms -> dr/, bad.out);
    t.regex(bad.out, /colour/, bad.out);
  } finally { rmSync(dir, { recursive: true, force: true }); }
});

test('every role defaults to the DR target\'s port (agent/src/dr/protocol.ts)', (t) => {
  let seen = 0;
  for (const role of ['ftkvm_agent', 'ftkvm_firewall', 'ftkvm_dr_target']) {
    const d = parse(readFileSync(join(ROOT, 'roles', role, 'defaults/main.yml'), 'utf8')) as Record<string, unknown>;
    t.is(d.ftkvm_dr_port, DEFAULT_DR_PORT, role);
    t.is(d.ftkvm_dr_group ?? 'ftkvm_dr', 'ftkvm_dr', role);
    seen++;
  }
  t.is(seen, 3);
  const f = parse(readFileSync(join(ROOT, 'roles/ftkvm_firewall/vars/main.yml'), 'utf8')) as Record<string, string>;
  t.regex(f.__ftkvm_firewall_mgmt_ports!, /ftkvm_dr_port ~ '\/tcp'\] if __ftkvm_firewall_is_dr/, 'the firewall opens it on DR hosts');
});
