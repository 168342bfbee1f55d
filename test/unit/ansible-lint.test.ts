// ansible-lint (production profile, .ansible-lint at the repository root) on the roles and
// playbooks, and ansible-playbook --syntax-check of every playbook with inventory.example.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../../lab/guest.ts';

const env = { ...process.env, ANSIBLE_FORCE_COLOR: '0', ANSIBLE_NOCOLOR: '1', NO_COLOR: '1', ANSIBLE_CONFIG: join(ROOT, 'ansible.cfg') };
const strip = (s: string) => s.replace(/\x1b\[[0-9;]*m/g, '').replace(/\x1b\]8;[^\x1b]*\x1b\\/g, '');

test('ansible-lint (production profile) is clean', (t) => {
  const r = spawnSync('ansible-lint', ['--offline', '--nocolor', 'roles', 'playbooks'], { cwd: ROOT, env, encoding: 'utf8', timeout: 240_000 });
  const out = strip(`${r.stdout}\n${r.stderr}`);
  t.is(r.status, 0, out);
  t.regex(out, /Passed with production profile: 0 failure\(s\), 0 warning\(s\)/, out);
});

for (const pb of readdirSync(join(ROOT, 'playbooks')).filter((f) => f.endsWith('.yml'))) {
  test(`ansible-playbook --syntax-check playbooks/${pb}`, (t) => {
    const r = spawnSync('ansible-playbook', ['-i', 'inventory.example', '--syntax-check', `playbooks/${pb}`], { cwd: ROOT, env, encoding: 'utf8', timeout: 120_000 });
    t.is(r.status, 0, `${r.stdout}\n${r.stderr}`);
    t.notRegex(r.stderr, /ERROR!/);
    t.notRegex(r.stderr, /Could not match supplied host pattern/, 'inventory.example must provide every group the playbook targets');
  });
}

test('inventory.example parses: pairs of two, a witness, VMs per pair', (t) => {
  const r = spawnSync('ansible-inventory', ['-i', 'inventory.example', '--list'], { cwd: ROOT, env, encoding: 'utf8', timeout: 60_000 });
  t.is(r.status, 0, r.stderr);
  const inv = JSON.parse(r.stdout) as Record<string, { hosts?: string[]; children?: string[] }> & { _meta: { hostvars: Record<string, Record<string, unknown>> } };
  const pairs = inv.ftkvm_pairs?.children ?? [];
  t.true(pairs.length >= 1);
  for (const p of pairs) {
    t.regex(p, /^pair_/);
    t.is(inv[p]?.hosts?.length, 2, p);
    for (const h of inv[p]!.hosts!) {
      t.truthy(inv._meta.hostvars[h]?.ftkvm_replication_address, `${h}: ftkvm_replication_address`);
      t.true(Array.isArray(inv._meta.hostvars[h]?.ftkvm_vms), `${h}: ftkvm_vms`);
    }
  }
  t.is(inv.ftkvm_witness?.hosts?.length, 1);
});

test('every role documents exactly its defaults in meta/argument_specs.yml', async (t) => {
  const { parse } = await import('yaml');
  const { readFileSync } = await import('node:fs');
  const roles = readdirSync(join(ROOT, 'roles'));
  t.deepEqual(roles.sort(), ['ftkvm_agent', 'ftkvm_dr_target', 'ftkvm_etcd', 'ftkvm_firewall', 'ftkvm_host', 'ftkvm_network', 'ftkvm_pki', 'ftkvm_witness']);
  for (const role of roles) {
    const defaults = parse(readFileSync(join(ROOT, 'roles', role, 'defaults/main.yml'), 'utf8')) as Record<string, unknown>;
    const spec = parse(readFileSync(join(ROOT, 'roles', role, 'meta/argument_specs.yml'), 'utf8')) as
      { argument_specs: { main: { options: Record<string, { description: string; type: string; default?: unknown }> } } };
    const opts = spec.argument_specs.main.options;
    t.deepEqual(Object.keys(opts).sort(), Object.keys(defaults).sort(), role);
    // every public variable is documented right above its default (not by a neighbour's comment)
    const lines = readFileSync(join(ROOT, 'roles', role, 'defaults/main.yml'), 'utf8').split('\n');
    lines.forEach((l, i) => {
      const m = /^(ftkvm_[a-z0-9_]+):/.exec(l);
      if (m) t.true((lines[i - 1] ?? '').startsWith('#'), `${role}/defaults/main.yml:${i + 1}: ${m[1]} has no comment of its own`);
    });
    for (const [k, v] of Object.entries(defaults)) {
      t.true(k.startsWith('ftkvm_'), `${role}: public variable ${k} must start with ftkvm_`);
      t.truthy(opts[k]?.description, `${role}: ${k} has no description`);
      if (!(typeof v === 'string' && v.includes('{{'))) t.deepEqual(opts[k]?.default, v, `${role}: default of ${k}`);
    }
  }
});
