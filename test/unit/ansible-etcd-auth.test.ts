// The ftkvm_etcd role's users and roles (roles/ftkvm_etcd/library/ftkvm_etcd_auth.py), run by
// ansible-playbook against a real etcd: first run creates root, one role per pair and one user
// per node and turns authentication on; a second run changes nothing; a node moved to another
// pair or given a new password is converged; the agent's etcd transport, logged in as a node,
// reaches its own pair's leases only; a wrong root password fails with a clear message.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EtcdCluster } from '../../lab/etcd.ts';
import { ROOT } from '../../lab/guest.ts';
import { etcdTransport } from '../../agent/src/witness/etcd.ts';

const dir = mkdtempSync(join(tmpdir(), 'ftkvm-etcd-auth-'));
const playbook = join(dir, 'auth.yml');
writeFileSync(playbook, `- hosts: localhost
  gather_facts: false
  tasks:
    - name: Users and roles
      ftkvm_etcd_auth:
        endpoint: "{{ endpoint }}"
        root_password: "{{ root_password }}"
        nodes: "{{ nodes }}"
      register: r
    - name: Show
      ansible.builtin.debug:
        msg: "ACTIONS {{ r.actions | to_json }}"
`);
const env = { ...process.env, ANSIBLE_LIBRARY: join(ROOT, 'roles/ftkvm_etcd/library'), ANSIBLE_NOCOLOR: '1', ANSIBLE_LOCALHOST_WARNING: 'false', ANSIBLE_INVENTORY_UNPARSED_WARNING: 'false' };

function converge(vars: object, check = false): { code: number; actions: string[]; out: string } {
  const r = spawnSync('ansible-playbook', [playbook, '-e', JSON.stringify(vars), ...(check ? ['--check'] : [])], { env, encoding: 'utf8', timeout: 120_000 });
  const out = `${r.stdout}\n${r.stderr}`;
  const m = /ACTIONS (\[.*\])/.exec(out);
  return { code: r.status ?? -1, actions: m ? JSON.parse(m[1]!.replace(/\\"/g, '"')) : [], out };
}

const nodes = (c: Record<string, [string, string]>) => Object.entries(c).map(([name, [pair, password]]) => ({ name, pair, password }));

test('ftkvm_etcd_auth: pairs scoped by etcd users, authentication on, idempotent, converges changes', async (t) => {
  if (!EtcdCluster.available()) throw new Error('etcd missing: scripts/install-deps installs etcd-server');
  const c = new EtcdCluster(1, 22000 + (process.pid % 20) * 4);
  t.teardown(() => c.stop());
  await c.start();
  const base = { endpoint: c.endpoints[0], root_password: 'root-secret-1' };
  const first = nodes({ hostA: ['p1', 'pw-a'], hostB: ['p1', 'pw-b'], hostC: ['p2', 'pw-c'] });

  const dry = converge({ ...base, nodes: first }, true);
  t.is(dry.code, 0, dry.out);
  t.true(dry.actions.includes('enable authentication'), 'check mode says what it would do');
  t.is((await c.call('/v3/auth/user/list', {})).users, undefined, 'check mode changed nothing');

  const r1 = converge({ ...base, nodes: first });
  t.is(r1.code, 0, r1.out);
  t.deepEqual(r1.actions, ['add user root', 'add role root', 'grant role root to root', 'add role ftkvm-p1', 'grant ftkvm-p1 read-write on /ftkvm/p1/',
    'add role ftkvm-p2', 'grant ftkvm-p2 read-write on /ftkvm/p2/', 'add user hostA', 'grant role ftkvm-p1 to hostA', 'add user hostB',
    'grant role ftkvm-p1 to hostB', 'add user hostC', 'grant role ftkvm-p2 to hostC', 'enable authentication']);
  const r2 = converge({ ...base, nodes: first });
  t.is(r2.code, 0, r2.out);
  t.deepEqual(r2.actions, [], 'a second run changes nothing');
  t.regex(r2.out, /changed=0/);

  // The agents' transport, logged in as its node: its pair's leases, and nothing of another pair.
  const pw = (s: string) => { const f = join(dir, `pw-${s}`); writeFileSync(f, `${s}\n`, { mode: 0o600 }); return f; };
  const asA = etcdTransport({ endpoints: c.endpoints, prefix: '/ftkvm', pair: 'p1', user: 'hostA', passwordFile: pw('pw-a') });
  const aInP2 = etcdTransport({ endpoints: c.endpoints, prefix: '/ftkvm', pair: 'p2', user: 'hostA', passwordFile: pw('pw-a') });
  t.teardown(() => { asA.close(); aInP2.close(); });
  t.is((await asA.acquire('web1', { node: 'hostA', epoch: 1, leaseMs: 2000 }, 3000)).status, 200);
  await t.throwsAsync(aInP2.acquire('web1', { node: 'hostA', epoch: 1, leaseMs: 2000 }, 3000), { message: /permission denied/i }, 'another pair\'s keys are out of reach');

  // hostC moves to pair p1 with a new password; hostB gets a new password.
  const moved = nodes({ hostA: ['p1', 'pw-a'], hostB: ['p1', 'pw-b2'], hostC: ['p1', 'pw-c2'] });
  const r3 = converge({ ...base, nodes: moved });
  t.is(r3.code, 0, r3.out);
  t.deepEqual(r3.actions, ['set hostB\'s password', 'set hostC\'s password', 'revoke role ftkvm-p2 from hostC', 'grant role ftkvm-p1 to hostC']);
  t.deepEqual(converge({ ...base, nodes: moved }).actions, []);
  const asC = etcdTransport({ endpoints: c.endpoints, prefix: '/ftkvm', pair: 'p1', user: 'hostC', passwordFile: pw('pw-c2') });
  t.teardown(() => asC.close());
  t.is((await asC.acquire('web1', { node: 'hostC', epoch: 1, leaseMs: 2000 }, 3000)).status, 409, 'hostC now reads p1\'s leases (hostA holds web1)');

  const wrong = converge({ ...base, root_password: 'not-it', nodes: moved });
  t.not(wrong.code, 0);
  t.regex(wrong.out, /authentication failed/);
  t.notRegex(wrong.out, /pw-a|pw-b2|pw-c2|not-it/, 'no password in the output');
});
