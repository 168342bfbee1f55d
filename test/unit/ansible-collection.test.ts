// The ftkvm.ftkvm Ansible collection (collection/galaxy.yml, scripts/build-collection): built from
// roles/, playbooks/ and the roles' modules, installed with ansible-galaxy into a temporary
// collections path (--no-deps: no network), then used from there only — a temporary working
// directory, an empty ansible.cfg, no roles path or module path into the repository: every
// playbook passes --syntax-check as ftkvm.ftkvm.<playbook>; ansible-doc renders each role's
// meta/argument_specs.yml and each module's documentation; a collection playbook finds its roles
// by short name (include_role) and a collection role finds its module (plugins/modules: a
// collection role's library/ is not on the module path).
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse, stringify } from 'yaml';
import { ROOT } from '../../lab/guest.ts';

const tmp = mkdtempSync(join(tmpdir(), 'ftkvm-collection-'));
const collections = join(tmp, 'collections');
const installed = join(collections, 'ansible_collections', 'ftkvm', 'ftkvm');
const cwd = join(tmp, 'run');
const QEMU = '/usr/bin/qemu-system-x86_64';
mkdirSync(cwd);
mkdirSync(join(tmp, 'no-roles'));
writeFileSync(join(tmp, 'ansible.cfg'), '[defaults]\n');

const env: NodeJS.ProcessEnv = {
  ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ANSIBLE_'))),
  ANSIBLE_CONFIG: join(tmp, 'ansible.cfg'), ANSIBLE_COLLECTIONS_PATH: collections, ANSIBLE_ROLES_PATH: join(tmp, 'no-roles'),
  ANSIBLE_NOCOLOR: '1', ANSIBLE_FORCE_COLOR: '0', NO_COLOR: '1', ANSIBLE_LOCALHOST_WARNING: 'false', ANSIBLE_INVENTORY_UNPARSED_WARNING: 'false',
};
function run(cmd: string, args: string[], timeout = 120_000) {
  const r = spawnSync(cmd, args, { cwd, env, encoding: 'utf8', timeout });
  return { code: r.status ?? -1, stdout: r.stdout ?? '', out: `${r.stdout}\n${r.stderr}${r.error ? `\n${r.error.message}` : ''}` };
}

const roles = readdirSync(join(ROOT, 'roles')).filter((r) => existsSync(join(ROOT, 'roles', r, 'meta/argument_specs.yml'))).sort();
const libraries = [...roles.map((r) => join(ROOT, 'roles', r, 'library')), join(ROOT, 'playbooks', 'library')];
const modules = libraries.flatMap((dir) => (existsSync(dir) ? readdirSync(dir) : [])
  .filter((f) => f.endsWith('.py')).map((f) => ({ name: f.slice(0, -3), file: join(dir, f) })));
const playbooks = readdirSync(join(ROOT, 'playbooks')).filter((f) => f.endsWith('.yml')).map((f) => f.slice(0, -4)).sort();

// The groups of inventory.example: a witness, (empty) etcd and DR groups, one pair of two hosts.
const inventory = join(tmp, 'inventory.yml');
writeFileSync(inventory, stringify({
  all: {
    children: {
      ftkvm_witness: { hosts: { w1: { ansible_host: '10.9.0.5' } } },
      ftkvm_etcd: { hosts: {} },
      ftkvm_dr: { hosts: {} },
      ftkvm_pairs: { children: { pair_t: { hosts: {
        hostA: { ansible_host: '10.9.0.11', ftkvm_replication_address: '10.9.1.11' },
        hostB: { ansible_host: '10.9.0.12', ftkvm_replication_address: '10.9.1.12' },
      } } } },
    },
  },
}));

let tarball = '';
test.before(() => {
  const b = spawnSync('bash', [join(ROOT, 'scripts/build-collection'), join(tmp, 'dist')], { cwd: ROOT, env, encoding: 'utf8', timeout: 120_000 });
  if (b.status !== 0) throw new Error(`scripts/build-collection failed (${b.status}):\n${b.stdout}\n${b.stderr}`);
  tarball = b.stdout.trim();
  const i = run('ansible-galaxy', ['collection', 'install', '--no-deps', '-p', collections, tarball]);
  if (i.code !== 0 || !existsSync(join(installed, 'MANIFEST.json'))) throw new Error(`ansible-galaxy collection install failed:\n${i.out}`);
});
test.after.always(() => rmSync(tmp, { recursive: true, force: true }));

test('the build prints the tarball it wrote, outside the repository, versioned like package.json', (t) => {
  const { version } = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };
  t.is(tarball, join(tmp, 'dist', `ftkvm-ftkvm-${version}.tar.gz`));
  t.true(existsSync(tarball));
  const manifest = JSON.parse(readFileSync(join(installed, 'MANIFEST.json'), 'utf8')) as { collection_info: Record<string, unknown> };
  t.like(manifest.collection_info, { namespace: 'ftkvm', name: 'ftkvm', version, license: ['Apache-2.0'] });
  // the collections the roles call (FQCNs in roles/), and only those, are dependencies
  const used = new Set<string>();
  const scan = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) scan(join(d, e.name));
      else if (e.name.endsWith('.yml')) {
        for (const m of readFileSync(join(d, e.name), 'utf8').matchAll(/\b([a-z_]+\.[a-z_]+)\.[a-z0-9_]+/g)) {
          if (/^(ansible\.posix|community\.[a-z_]+|ansible\.(utils|netcommon))$/.test(m[1]!)) used.add(m[1]!);
        }
      }
    }
  };
  scan(join(ROOT, 'roles'));
  scan(join(ROOT, 'playbooks'));
  t.deepEqual(Object.keys(manifest.collection_info.dependencies as object).sort(), [...used].sort());
});

test('the installed collection holds the roles, the playbooks and the modules (no symlink back into the repository)', (t) => {
  for (const r of roles) {
    t.true(existsSync(join(installed, 'roles', r, 'tasks/main.yml')), r);
    t.true(existsSync(join(installed, 'roles', r, 'meta/argument_specs.yml')), r);
    t.true(existsSync(join(installed, 'roles', r, 'README.md')), `${r}/README.md`);
  }
  for (const p of playbooks) t.true(existsSync(join(installed, 'playbooks', `${p}.yml`)), p);
  t.true(existsSync(join(installed, 'playbooks/tasks/drill-vm.yml')));
  t.false(existsSync(join(installed, 'playbooks/roles')));
  t.true(modules.length >= 3);
  for (const m of modules) t.is(readFileSync(join(installed, 'plugins/modules', `${m.name}.py`), 'utf8'), readFileSync(m.file, 'utf8'), m.name);
  t.regex(readFileSync(join(installed, 'meta/runtime.yml'), 'utf8'), /^requires_ansible: "?>=2\.14/m);
});

// A playbook's FQCN cannot contain "-" (dr-test, dr-failover, dr-failback): those are run by their path in the
// installed collection.
const byFqcn = (pb: string) => /^[a-z_][a-z0-9_]*$/.test(pb);
for (const pb of playbooks) {
  test(`ansible-playbook ${byFqcn(pb) ? `ftkvm.ftkvm.${pb}` : `<collection>/playbooks/${pb}.yml`} --syntax-check (from the installed collection)`, (t) => {
    const r = run('ansible-playbook', [byFqcn(pb) ? `ftkvm.ftkvm.${pb}` : join(installed, 'playbooks', `${pb}.yml`), '--syntax-check', '-i', inventory]);
    t.is(r.code, 0, r.out);
    t.notRegex(r.out, /ERROR!/, r.out);
    t.notRegex(r.out, /Could not match supplied host pattern/, r.out);
    t.true(r.stdout.includes(join(installed, 'playbooks', `${pb}.yml`)), r.out);
  });
}

for (const role of roles) {
  test(`ansible-doc -t role ftkvm.ftkvm.${role} renders meta/argument_specs.yml`, (t) => {
    const spec = parse(readFileSync(join(ROOT, 'roles', role, 'meta/argument_specs.yml'), 'utf8')) as
      { argument_specs: { main: { short_description: string; options: Record<string, { description: string }> } } };
    const r = run('ansible-doc', ['-t', 'role', `ftkvm.ftkvm.${role}`]);
    t.is(r.code, 0, r.out);
    t.true(r.stdout.startsWith(`> FTKVM.FTKVM.${role.toUpperCase()}`), r.out);
    t.true(r.stdout.includes(installed), 'documented from the installed collection');
    t.true(r.stdout.replace(/\s+/g, ' ').includes(spec.argument_specs.main.short_description.replace(/\s+/g, ' ')), r.out);
    const names = Object.keys(spec.argument_specs.main.options);
    t.true(names.length > 0);
    for (const name of names) t.regex(r.stdout, new RegExp(`^[-=] ${name}$`, 'm'), `${role}: ${name} is not rendered`);
  });
}

for (const mod of modules) {
  test(`ansible-doc -t module ftkvm.ftkvm.${mod.name} renders its DOCUMENTATION, EXAMPLES and RETURN`, (t) => {
    const src = readFileSync(mod.file, 'utf8');
    const block = (name: string) => parse(new RegExp(`^${name} = r(['"])\\1\\1\\n([\\s\\S]*?)\\n\\1\\1\\1`, 'm').exec(src)?.[2] ?? 'null') as Record<string, unknown> | null;
    const doc = block('DOCUMENTATION') as { module: string; short_description: string; options: Record<string, unknown> } | null;
    const ret = block('RETURN');
    t.truthy(doc, 'DOCUMENTATION');
    t.truthy(block('EXAMPLES'), 'EXAMPLES');
    t.truthy(ret, 'RETURN');
    t.is(doc!.module, mod.name);
    const r = run('ansible-doc', ['-t', 'module', `ftkvm.ftkvm.${mod.name}`]);
    t.is(r.code, 0, r.out);
    t.true(r.stdout.includes(join(installed, 'plugins/modules', `${mod.name}.py`)), r.out);
    for (const o of Object.keys(doc!.options)) t.regex(r.stdout, new RegExp(`^[-=] ${o}$`, 'm'), `option ${o}`);
    t.regex(r.stdout, /^EXAMPLES:/m);
    t.regex(r.stdout, new RegExp(`ftkvm\\.ftkvm\\.${mod.name}:`));
    for (const k of Object.keys(ret!)) t.regex(r.stdout, new RegExp(`^- ${k}$`, 'm'), `return value ${k}`);
  });
}

test('a collection playbook finds its roles by short name (include_role in ftkvm.ftkvm.protect)', (t) => {
  // Local host, check mode, the firewall role disabled, and a wrong ftkvm_api_port: the play stops
  // at the argument validation of the first role it includes, before anything could change.
  const inv = join(tmp, 'local.yml');
  writeFileSync(inv, stringify({ all: { children: { ftkvm_pairs: { children: { pair_t: { hosts: { hostA: {
    ansible_connection: 'local', ansible_python_interpreter: '/usr/bin/python3' } } } } } } } }));
  const r = run('ansible-playbook', ['ftkvm.ftkvm.protect', '-i', inv, '--check', '-e', 'ftkvm_firewall_enabled=false', '-e', 'ftkvm_api_port=not-a-port']);
  t.not(r.code, 0, r.out);
  t.notRegex(r.out, /was not found|could not be found|couldn't resolve/i, r.out);
  t.regex(r.out, /TASK \[ftkvm\.ftkvm\.ftkvm_firewall : Validating arguments against arg spec 'main'/, r.out);
  t.regex(r.out, /argument 'ftkvm_api_port' is of type/, r.out);
  t.true(r.out.includes(`"path": "${join(installed, 'roles/ftkvm_firewall')}"`), r.out);
});

test('a collection role calls its module from plugins/modules (ftkvm_host COLO check on the local QEMU)', (t) => {
  if (!existsSync(QEMU)) { t.fail(`${QEMU} is missing (scripts/install-deps installs it)`); return; }
  const pb = join(cwd, 'colo.yml');
  writeFileSync(pb, stringify([{
    name: 'COLO check through the collection', hosts: 'localhost', connection: 'local', gather_facts: false,
    tasks: [
      { name: 'The module by its FQCN', 'ftkvm.ftkvm.ftkvm_qemu_colo_probe': { binary: QEMU, accelerator: 'tcg' }, register: 'probe' },
      { name: 'Its answer', 'ansible.builtin.assert': { that: ['probe.colo_capable', 'probe.version is match("[0-9]+[.][0-9]+")'] } },
      { name: "The role's COLO check", 'ansible.builtin.include_role': { name: 'ftkvm.ftkvm.ftkvm_host', tasks_from: 'colo_check.yml' } },
    ],
  }]));
  const r = run('ansible-playbook', ['-i', 'localhost,', pb, '-e', `ftkvm_qemu_binary=${QEMU}`, '-e', 'ftkvm_accelerator=tcg', '-e', 'ansible_python_interpreter=/usr/bin/python3']);
  t.is(r.code, 0, r.out);
  t.regex(r.out, /TASK \[ftkvm\.ftkvm\.ftkvm_host : Ask QEMU over QMP whether it can run COLO\]/);
  t.regex(r.out, new RegExp(`QEMU \\d+\\.\\d+\\.\\d+ at ${QEMU.replaceAll('/', '\\/')} can run COLO`));
});
