import test from 'ava';
import { parseConfig, ConfigError, tapName, type ConfigFs } from '../../agent/src/config/load.ts';

// Files that "exist" for these tests; everything else is missing.
const files = new Set(['/usr/bin/qemu-system-x86_64', '/usr/bin/qemu-img', '/etc/ftkvm/token', '/var/lib/ftkvm/images/web1.qcow2',
  '/var/lib/ftkvm/images/db1.qcow2', '/boot/vmlinuz', '/boot/initrd.gz']);
const fakeFs = (overrides: Partial<ConfigFs> = {}): ConfigFs => ({
  exists: (p) => files.has(p),
  isExecutable: (p) => p.startsWith('/usr/bin/') && files.has(p),
  mode: (p) => (files.has(p) ? 0o600 : null),
  ...overrides,
});

const GOOD = `node:
  name: hostA
  replication_address: 10.0.1.1
peer:
  name: hostB
  addresses: [10.0.1.2, 192.168.0.12]
  replication_address: 10.0.1.2
witness:
  url: http://192.168.0.254:7490
vms:
  - name: web1
    memory_mib: 1024
    vcpus: 2
    disk: { path: /var/lib/ftkvm/images/web1.qcow2 }
    boot: { kernel: /boot/vmlinuz, initrd: /boot/initrd.gz, append: console=ttyS0 }
    nic: { bridge: br0, mac: "52:54:00:00:00:01" }
    base_port: 19000
    preferred_primary: hostA
`;

function problems(text: string, fs = fakeFs()): string[] {
  try {
    parseConfig(text, '/etc/ftkvm/agent.yaml', fs);
  } catch (e) {
    if (e instanceof ConfigError) return e.message.split('\n').slice(1).map((l) => l.trim());
    throw e;
  }
  return [];
}

test('a valid configuration loads, with defaults filled in', (t) => {
  const c = parseConfig(GOOD, 'agent.yaml', fakeFs());
  t.is(c.heartbeat.interval_ms, 100);
  t.is(c.heartbeat.timeout_ms, 500);
  t.is(c.api.listen, '0.0.0.0:7480');
  t.is(c.qemu.accelerator, 'kvm');
  t.is(c.colo.checkpoint_delay_ms, 2000);
  t.is(c.vms[0]!.disk.format, 'qcow2');
  t.is(tapName(c.vms[0]!), 'ftk-web1');
  t.false(c.witness.two_node_mode);
});

const cases: [string, (s: string) => string, string[]][] = [
  ['unknown top-level key', (s) => s + 'colour: blue\n', ['/etc/ftkvm/agent.yaml:19:1: colour: unknown key (typo? see the configuration reference in the README)']],
  ['unknown nested key', (s) => s.replace('    vcpus: 2\n', '    vcpus: 2\n    cpus: 4\n'), ['/etc/ftkvm/agent.yaml:14:5: vms[0].cpus: unknown key (typo? see the configuration reference in the README)']],
  ['wrong type', (s) => s.replace('memory_mib: 1024', 'memory_mib: lots'), ['/etc/ftkvm/agent.yaml:12:17: vms[0].memory_mib: expected a number, got "lots"']],
  ['float where an integer is needed', (s) => s.replace('vcpus: 2', 'vcpus: 1.5'), ['/etc/ftkvm/agent.yaml:13:12: vms[0].vcpus: expected an integer, got number 1.5']],
  ['missing required field', (s) => s.replace('    base_port: 19000\n', ''), ['/etc/ftkvm/agent.yaml:11:5: vms[0].base_port: required field is missing']],
  ['bad replication address', (s) => s.replace('replication_address: 10.0.1.1', 'replication_address: 10.0.1.300'), ['/etc/ftkvm/agent.yaml:3:24: node.replication_address: not an IP address: "10.0.1.300"']],
  ['hostname instead of an IP in peer addresses', (s) => s.replace('[10.0.1.2, 192.168.0.12]', '[10.0.1.2, hostb.example]'), ['/etc/ftkvm/agent.yaml:6:25: peer.addresses[1]: not an IP address: "hostb.example"']],
  ['only one heartbeat address', (s) => s.replace('[10.0.1.2, 192.168.0.12]', '[10.0.1.2]'), ['/etc/ftkvm/agent.yaml:6:14: peer.addresses: at least two addresses (e.g. replication and management networks) so one cut link never looks like a dead peer']],
  ['duplicate heartbeat address', (s) => s.replace('[10.0.1.2, 192.168.0.12]', '[10.0.1.2, 10.0.1.2]'), ['/etc/ftkvm/agent.yaml:6:25: peer.addresses[1]: duplicate address 10.0.1.2 (also entry 0): each heartbeat path needs its own address']],
  ['peer name equals node name', (s) => s.replace('name: hostB', 'name: hostA'), ['/etc/ftkvm/agent.yaml:5:9: peer.name: must differ from node.name ("hostA")']],
  ['bad api listen address', (s) => s + 'api:\n  listen: "localhost:80"\n', ['/etc/ftkvm/agent.yaml:20:11: api.listen: expected ADDRESS:PORT with an IP address (e.g. 0.0.0.0:7480 or [::]:7480), got "localhost:80"']],
  ['accelerator not kvm|tcg', (s) => s + 'qemu:\n  accelerator: hvf\n', ['/etc/ftkvm/agent.yaml:20:16: qemu.accelerator: expected one of kvm | tcg, got "hvf"']],
  ['the TCG lab shim with KVM', (s) => s + 'qemu:\n  tcg_lab_shim: /usr/local/lib/shim.so\n', ['/etc/ftkvm/agent.yaml:20:17: qemu.tcg_lab_shim: the COLO shim is for TCG labs only: set qemu.accelerator: tcg, or remove qemu.tcg_lab_shim (production uses KVM)']],
  ['the TCG lab shim and an LD_PRELOAD of its own', (s) => s + 'qemu:\n  accelerator: tcg\n  tcg_lab_shim: /usr/local/lib/shim.so\n  env: {LD_PRELOAD: /x.so}\n', ['/etc/ftkvm/agent.yaml:22:21: qemu.env.LD_PRELOAD: qemu.tcg_lab_shim sets LD_PRELOAD itself: remove it from qemu.env']],
  ['missing disk image', (s) => s.replace('/var/lib/ftkvm/images/web1.qcow2', '/var/lib/ftkvm/images/nope.qcow2'), ['/etc/ftkvm/agent.yaml:14:19: vms[0].disk.path: image file not found: /var/lib/ftkvm/images/nope.qcow2']],
  ['missing kernel', (s) => s.replace('kernel: /boot/vmlinuz', 'kernel: /boot/missing'), ['/etc/ftkvm/agent.yaml:15:21: vms[0].boot.kernel: file not found: /boot/missing']],
  ['relative path', (s) => s.replace('path: /var/lib/ftkvm/images/web1.qcow2', 'path: images/web1.qcow2'), ['/etc/ftkvm/agent.yaml:14:19: vms[0].disk.path: must be an absolute path: "images/web1.qcow2"']],
  ['preferred primary not in the pair', (s) => s.replace('preferred_primary: hostA', 'preferred_primary: hostC'), ['/etc/ftkvm/agent.yaml:18:24: vms[0].preferred_primary: must be "hostA" or "hostB", got "hostC"']],
  ['multicast MAC', (s) => s.replace('"52:54:00:00:00:01"', '"01:00:5e:00:00:01"'), ['/etc/ftkvm/agent.yaml:16:30: vms[0].nic.mac: must be a unicast MAC (first octet even)']],
  ['uppercase VM name', (s) => s.replace('name: web1', 'name: Web1'), ['/etc/ftkvm/agent.yaml:11:11: vms[0].name: must be lowercase letters, digits and "-", starting with a letter, at most 31 characters, got "Web1"']],
  ['no witness and no explicit two-node mode', (s) => s.replace('witness:\n  url: http://192.168.0.254:7490\n', 'witness: {}\n'), ['/etc/ftkvm/agent.yaml:8:10: witness: set witness.url (recommended) or witness.etcd, or, explicitly, witness.two_node_mode: true (no split-brain protection when the hosts are partitioned)']],
  ['witness missing entirely', (s) => s.replace('witness:\n  url: http://192.168.0.254:7490\n', ''), ['/etc/ftkvm/agent.yaml:1:1: witness: required field is missing']],
  ['heartbeat timeout too short for the interval', (s) => s + 'heartbeat:\n  interval_ms: 200\n  timeout_ms: 500\n', ['/etc/ftkvm/agent.yaml:21:15: heartbeat.timeout_ms: must be at least 3 × heartbeat.interval_ms (600) so one lost datagram is not a dead peer']],
  ['token readable by others', (s) => s, ['/etc/ftkvm/agent.yaml:1:1: api.token_file: /etc/ftkvm/token is readable by others (mode 644); run: chmod 600 /etc/ftkvm/token']],
  ['witness token file missing', (s) => s.replace('url: http://192.168.0.254:7490\n', 'url: http://192.168.0.254:7490\n  token_file: /etc/ftkvm/witness-token\n'), ['/etc/ftkvm/agent.yaml:10:15: witness.token_file: file not found: /etc/ftkvm/witness-token']],
  ['witness token file in two-node mode', (s) => s.replace('url: http://192.168.0.254:7490\n', 'two_node_mode: true\n  token_file: /etc/ftkvm/token\n'), ['/etc/ftkvm/agent.yaml:10:15: witness.token_file: only used with witness.url']],
  ['heartbeat key file missing', (s) => s + 'heartbeat:\n  key_file: /etc/ftkvm/heartbeat.key\n', ['/etc/ftkvm/agent.yaml:20:13: heartbeat.key_file: file not found: /etc/ftkvm/heartbeat.key']],
  ['YAML syntax error', (s) => s.replace('vcpus: 2', 'vcpus: [2'), ['/etc/ftkvm/agent.yaml:14:5: YAML syntax: (top level): ']],
];

for (const [name, mutate, expected] of cases) {
  test(`refused: ${name}`, (t) => {
    const fs = name === 'token readable by others' ? fakeFs({ mode: () => 0o644 }) : fakeFs();
    const got = problems(mutate(GOOD), fs);
    if (name === 'YAML syntax error') {
      t.is(got.length >= 1, true);
      t.regex(got[0]!, /^\/etc\/ftkvm\/agent\.yaml:\d+:\d+: \(top level\): YAML syntax: /);
      return;
    }
    t.deepEqual(got, expected);
  });
}

test('witness.etcd: lease_ms defaults to 5000 and must be whole seconds; one lease store only', (t) => {
  const etcd = (extra: string) => GOOD.replace('witness:\n  url: http://192.168.0.254:7490\n', `witness:\n  etcd: { endpoints: [http://10.0.9.1:2379, http://10.0.9.2:2379], pair: prod1 }\n${extra}`);
  t.is(parseConfig(etcd(''), 'agent.yaml', fakeFs()).witness.lease_ms, 5000);
  t.is(parseConfig(GOOD, 'agent.yaml', fakeFs()).witness.lease_ms, 1000);
  t.deepEqual(problems(etcd('  lease_ms: 2500\n')), ['/etc/ftkvm/agent.yaml:10:13: witness.lease_ms: with witness.etcd must be whole seconds and at least 2000 (etcd leases count in seconds; got 2500)']);
  t.deepEqual(problems(etcd('  url: http://10.0.9.9:7490\n')), ['/etc/ftkvm/agent.yaml:9:9: witness.etcd: cannot be set together with witness.url or two_node_mode: choose one lease store']);
  t.deepEqual(problems(etcd('').replace('pair: prod1', 'pair: prod1, user: hostA')), ['/etc/ftkvm/agent.yaml:9:87: witness.etcd.user: needs witness.etcd.password_file']);
});

test('port clash between two VMs names both and the offending offset', (t) => {
  const second = `  - name: db1
    memory_mib: 512
    vcpus: 1
    disk: { path: /var/lib/ftkvm/images/db1.qcow2 }
    boot: { firmware: bios }
    nic: { bridge: br0, mac: "52:54:00:00:00:02" }
    base_port: 19004
    preferred_primary: hostB
`;
  const got = problems(GOOD + second);
  t.deepEqual(got, ['/etc/ftkvm/agent.yaml:25:16: vms[1].base_port: port 19005 (compare0 = base_port+1) clashes with vms[0] (web1) compareOut port']);
});

test('a VM port equal to the API port is a clash', (t) => {
  const got = problems(GOOD.replace('base_port: 19000', 'base_port: 7479'));
  t.deepEqual(got, ['/etc/ftkvm/agent.yaml:17:16: vms[0].base_port: port 7480 (compare0 = base_port+1) clashes with api.listen']);
});

test('duplicate MAC and name across VMs are refused', (t) => {
  const dup = GOOD.replace(/^vms:\n/m, 'vms:\n').replace(/(  - name: web1[\s\S]*)$/, (m) => m + m.replace('19000', '20000'));
  const got = problems(dup);
  t.true(got.some((l) => l.includes('vms[1].name: duplicate VM name "web1" (also vms[0])')), got.join('\n'));
  t.true(got.some((l) => l.includes('vms[1].nic.mac: duplicate MAC address "52:54:00:00:00:01" (also vms[0])')));
  t.true(got.some((l) => l.includes('vms[1].nic.tap: duplicate tap device "ftk-web1" (also vms[0])')));
});

test('all problems are reported at once', (t) => {
  const got = problems(GOOD.replace('vcpus: 2', 'vcpus: 0').replace('memory_mib: 1024', 'memory_mib: 8').replace('replication_address: 10.0.1.1', 'replication_address: x'));
  t.is(got.length, 3);
});

test('an unreadable file is reported with its name', (t) => {
  const err = t.throws(() => parseConfig('{', '/nonexistent.yaml', fakeFs()), { instanceOf: ConfigError });
  t.regex(err!.message, /nonexistent\.yaml/);
});
