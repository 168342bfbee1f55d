// playbooks/build_qemu.yml rebuilds the distribution's qemu-kvm for COLO; its spec edit
// (playbooks/library/ftkvm_qemu_spec_colo.py) runs here, as Ansible runs a module (python with an
// ANSIBLE_MODULE_ARGS file), on copies of two real RHEL qemu-kvm.spec files
// (test/fixtures/qemu-kvm-spec/): the build's effective configure options (%{disable_everything}
// then the run_configure call, the later option wins) end up with replication enabled (and the
// COLO proxy from QEMU 8.1), quorum and replication join the read-write whitelist, Release gets
// the suffix, a second run changes nothing, a QEMU with the upstream COLO regression is refused,
// and a spec whose layout changed fails naming the missing anchor. The playbook itself passes
// --syntax-check and runs end to end on this (Debian) machine against fake dnf/rpm/rpmbuild/
// createrepo_c: first run builds and publishes, second run changes nothing. The real build needs
// an EL build host and was not run here.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, userInfo } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { COLO_REGRESSION_FIXED_IN } from '../../agent/src/qemu/probe.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '../..');
const MODULE = join(ROOT, 'playbooks/library/ftkvm_qemu_spec_colo.py');
const FIXTURES = join(ROOT, 'test/fixtures/qemu-kvm-spec');
const EL10 = 'rhel10-qemu-kvm-10.1.0-16.spec';
const EL9 = 'rhel9-qemu-kvm-8.0.0-16.el9_3.3.spec';
const ENV = { ...process.env, ANSIBLE_NOCOLOR: '1', ANSIBLE_FORCE_COLOR: '0', ANSIBLE_CONFIG: join(ROOT, 'ansible.cfg') };

// the Python that Ansible itself runs on (modules import ansible.module_utils)
const PYTHON = (() => {
  const r = spawnSync('ansible', ['--version'], { encoding: 'utf8', env: ENV });
  const m = /python version = .*\((\/[^)]+)\)\s*$/m.exec(r.stdout ?? '');
  return m?.[1] ?? 'python3';
})();

const work = mkdtempSync(join(tmpdir(), 'ftkvm-qemu-spec-'));
test.after.always(() => rmSync(work, { recursive: true, force: true }));
let n = 0;

function copyFixture(name: string): string {
  const p = join(work, `${n++}-${name}`);
  copyFileSync(join(FIXTURES, name), p);
  return p;
}

interface ModuleResult {
  failed?: boolean; changed?: boolean; msg?: string; anchor?: string; edits?: string[]; version?: string; release?: string;
  configure_options?: string[]; colo_regression?: string;
}

function runModule(args: Record<string, unknown>, check = false): ModuleResult {
  const f = join(work, `args-${n++}.json`);
  writeFileSync(f, JSON.stringify({ ANSIBLE_MODULE_ARGS: { ...args, ...(check ? { _ansible_check_mode: true } : {}) } }));
  const r = spawnSync(PYTHON, [MODULE, f], { encoding: 'utf8', env: ENV, timeout: 60_000 });
  const line = (r.stdout ?? '').split('\n').find((l) => l.startsWith('{'));
  if (!line) throw new Error(`module gave no JSON (exit ${r.status}): ${r.stdout}\n${r.stderr}`);
  return JSON.parse(line) as ModuleResult;
}

/** The configure options the build really gets, the last one winning: run_configure()'s own
 *  options up to "$@" (with %{disable_everything} expanded where it stands), then the options of
 *  the run_configure call of %build, then run_configure()'s options after "$@". Conditionals
 *  (%if/%ifarch) are read as if every branch were taken. */
function effectiveConfigure(spec: string): Map<string, 'enable' | 'disable'> {
  const lines = spec.split('\n');
  const block = (from: number, stop: (l: string, prev: string) => boolean): string[] => {
    const out: string[] = [];
    for (let k = from; k < lines.length; k++) {
      const l = lines[k]!;
      if (stop(l, lines[k - 1] ?? '')) break;
      out.push(l);
    }
    return out;
  };
  const d = lines.findIndex((l) => l.startsWith('%define disable_everything'));
  const everything = block(d + 1, (_l, prev) => !prev.trimEnd().endsWith('\\') && !prev.startsWith('%define'));
  const f = lines.findIndex((l) => /^run_configure\(\)\s*\{/.test(l));
  const fn = block(f + 1, (l) => l.startsWith('}'));
  const c = lines.findIndex((l) => /^run_configure\s*\\\s*$/.test(l));
  const call = block(c + 1, (l) => l.trim() === '');
  const at = fn.findIndex((l) => l.includes('"$@"'));
  const seq = [...fn.slice(0, at).flatMap((l) => (l.includes('%{disable_everything}') ? everything : [l])), ...call, ...fn.slice(at)];
  const state = new Map<string, 'enable' | 'disable'>();
  for (const l of seq) for (const m of l.matchAll(/--(enable|disable)-([a-z0-9-]+)/g)) state.set(m[2]!, m[1] as 'enable' | 'disable');
  return state;
}

const rwList = (spec: string) => /^%global\s+block_drivers_rw_list\s+(\S+)/m.exec(spec)?.[1]?.split(',') ?? [];
const release = (spec: string) => /^Release:\s*(.*)$/m.exec(spec)?.[1];
const sha256 = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

test('the fixtures are the unmodified specs their README names', (t) => {
  const readme = readFileSync(join(FIXTURES, 'README.md'), 'utf8');
  for (const f of [EL10, EL9]) {
    const row = readme.split('\n').find((l) => l.startsWith(`| \`${f}\``));
    t.truthy(row, `README lists ${f}`);
    t.true(row!.includes(sha256(join(FIXTURES, f))), `${f}: SHA-256 as in the README`);
  }
  // what the stock builds get: replication off, the whitelist without quorum and replication
  for (const f of [EL10, EL9]) {
    const spec = readFileSync(join(FIXTURES, f), 'utf8');
    t.is(effectiveConfigure(spec).get('replication'), 'disable', f);
    t.false(rwList(spec).includes('quorum'), f);
    t.false(rwList(spec).includes('replication'), f);
  }
});

for (const [fixture, version, proxy, stockRelease] of [
  [EL10, '10.1.0', true, '16%{?rcrel}%{?dist}%{?cc_suffix}'],
  [EL9, '8.0.0', false, '16%{?rcrel}%{?dist}%{?cc_suffix}.3'],
] as const) {
  test(`${fixture}: replication${proxy ? ' and the COLO proxy' : ''} enabled in the build, quorum,replication whitelisted, Release suffixed, idempotent`, (t) => {
    const p = copyFixture(fixture);
    const before = readFileSync(p, 'utf8');
    const r1 = runModule({ path: p, refuse_colo_regression: false });
    t.falsy(r1.failed, r1.msg);
    t.true(r1.changed);
    t.is(r1.version, version);
    t.is(r1.release, `${stockRelease}.ftkvm1`);
    t.deepEqual(r1.configure_options, proxy ? ['--enable-replication', '--enable-colo-proxy'] : ['--enable-replication']);
    t.deepEqual(r1.edits, [
      `Release: ${stockRelease} -> ${stockRelease}.ftkvm1`,
      'block_drivers_rw_list: added quorum, replication',
      `run_configure: added ${proxy ? '--enable-replication --enable-colo-proxy' : '--enable-replication'}`,
    ]);
    const after = readFileSync(p, 'utf8');
    const eff = effectiveConfigure(after);
    t.is(eff.get('replication'), 'enable', 'the build configures --enable-replication last');
    t.is(eff.get('colo-proxy'), proxy ? 'enable' : undefined, 'QEMU >= 8.1 gets --enable-colo-proxy; 8.0 has no such option');
    t.true(after.includes('--disable-replication'), '%{disable_everything} itself is left alone');
    t.deepEqual(rwList(after).slice(-2), ['quorum', 'replication']);
    t.deepEqual(rwList(after).slice(0, -2), rwList(before), 'the stock drivers stay');
    t.true(after.includes('--block-drv-rw-whitelist=%{block_drivers_rw_list}'), 'the build passes the whitelist');
    t.is(release(after), `${stockRelease}.ftkvm1`);
    // nothing else changed: the only removed lines are the old Release and whitelist lines
    const old = new Set(after.split('\n'));
    t.deepEqual(before.split('\n').filter((l) => !old.has(l)).map((l) => l.split(/\s/)[0] + ' ' + l.split(/\s/)[1]),
      ['%global block_drivers_rw_list', `Release: ${stockRelease}`]);
    t.is(after.split('\n').length - before.split('\n').length, proxy ? 3 : 2, 'marker comment + the added options');

    const r2 = runModule({ path: p, refuse_colo_regression: false });
    t.falsy(r2.failed, r2.msg);
    t.false(r2.changed, 'a second run changes nothing');
    t.deepEqual(r2.edits, []);
    t.is(readFileSync(p, 'utf8'), after);

    const r3 = runModule({ path: p, refuse_colo_regression: false, release_suffix: '.ftkvm2' });
    t.deepEqual(r3.edits, [`Release: ${stockRelease}.ftkvm1 -> ${stockRelease}.ftkvm2`], 'a new suffix replaces the old one');
  });
}

test('check mode reports the edits and writes nothing', (t) => {
  const p = copyFixture(EL9);
  const r = runModule({ path: p }, true);
  t.falsy(r.failed, r.msg);
  t.true(r.changed);
  t.is(r.edits?.length, 3);
  t.is(sha256(p), sha256(join(FIXTURES, EL9)));
});

test('a QEMU with the upstream COLO regression is refused before anything is written', (t) => {
  const p = copyFixture(EL10);
  const r = runModule({ path: p });
  t.true(r.failed);
  t.regex(r.msg ?? '', /refusing to build it: QEMU 10\.1\.0 has the upstream COLO regression .* upgrade to 10\.1\.3 or later .* 10\.2\.0 .*0b5bf4ea7620/);
  t.is(r.version, '10.1.0');
  t.is(sha256(p), sha256(join(FIXTURES, EL10)), 'spec untouched');
  // the playbook asks with the source RPM's version before downloading it
  const verdict = (v: string) => runModule({ version: v });
  for (const v of ['10.0.0', '10.0.6', '10.1.0', '10.1.2']) t.true(verdict(v).failed, v);
  for (const v of ['8.0.0', '9.1.0', '10.0.7', '10.1.3', '10.2.0', '11.0.0']) {
    const r2 = verdict(v);
    t.falsy(r2.failed, `${v}: ${r2.msg}`);
    t.is(r2.colo_regression, '', v);
  }
  t.regex(verdict('10.0').msg ?? '', /plain x\.y\.z/);
});

test('the regression table is the same in the agent, ftkvm_host and the build playbook', (t) => {
  const py = spawnSync(PYTHON, ['-c', `
import importlib.util, json, sys
out = []
for p in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location('m%d' % len(out), p)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    out.append({'%d.%d' % k: v for k, v in m.COLO_REGRESSION_FIXED_IN.items()})
print(json.dumps(out))
`, MODULE, join(ROOT, 'roles/ftkvm_host/library/ftkvm_qemu_colo_probe.py')], { encoding: 'utf8', env: { ...ENV, PYTHONDONTWRITEBYTECODE: '1' } });
  t.is(py.status, 0, py.stderr);
  const [build, role] = JSON.parse(py.stdout) as Record<string, number>[];
  t.deepEqual(build, COLO_REGRESSION_FIXED_IN);
  t.deepEqual(role, COLO_REGRESSION_FIXED_IN);
});

test('a spec whose layout changed fails naming the missing anchor, and is left alone', (t) => {
  const stock = readFileSync(join(FIXTURES, EL10), 'utf8');
  const cases: [string, (s: string) => string, RegExp][] = [
    ['no Version', (s) => s.replace(/^Version:.*$/m, ''), /anchor 'Version:'/],
    ['macro Version', (s) => s.replace(/^Version:.*$/m, 'Version: %{qemu_version}'), /anchor 'Version:': expected a plain x\.y\.z/],
    ['no Release', (s) => s.replace(/^Release:.*$/m, ''), /anchor 'Release:'/],
    ['no whitelist macro', (s) => s.replace(/^%global block_drivers_rw_list .*$/m, ''), /anchor '%global block_drivers_rw_list'/],
    ['whitelist not passed', (s) => s.replace('--block-drv-rw-whitelist=%{block_drivers_rw_list}', '--block-drv-rw-whitelist=qcow2'),
      /anchor '--block-drv-rw-whitelist=%\{block_drivers_rw_list\}'/],
    ['no run_configure()', (s) => s.replace(/^run_configure\(\) \{$/m, 'configure_qemu() {'), /anchor 'run_configure\(\) \{'/],
    ['"$@" before %{disable_everything}', (s) => s.replace('        %{disable_everything} \\\n', '').replace('        "$@"\n', '        "$@" \\\n        %{disable_everything}\n'),
      /anchor '%\{disable_everything\} \.\.\. "\$@"' in run_configure\(\)/],
    ['no run_configure call', (s) => s.replace(/^run_configure \\$/m, 'run_configure --enable-foo \\'), /anchor 'run_configure \\' \(the build's configure call\): expected exactly one, found 0/],
  ];
  for (const [what, mutate, msg] of cases) {
    const text = mutate(stock);
    t.not(text, stock, `${what}: the mutation applies`);
    const p = join(work, `${n++}-broken.spec`);
    writeFileSync(p, text);
    const r = runModule({ path: p, refuse_colo_regression: false });
    t.true(r.failed, what);
    t.regex(r.msg ?? '', msg, what);
    t.regex(r.msg ?? '', /the spec does not have the layout ftkvm_qemu_spec_colo edits/, what);
    t.truthy(r.anchor, what);
    t.is(readFileSync(p, 'utf8'), text, `${what}: left alone`);
  }
});

// A tiny inventory with the playbook's group, the build host being this machine.
const inventory = join(work, 'inventory.ini');
writeFileSync(inventory, `[ftkvm_qemu_build]\nlocalhost ansible_connection=local ansible_python_interpreter=${PYTHON}\n`);

test('ansible-playbook --syntax-check playbooks/build_qemu.yml', (t) => {
  const r = spawnSync('ansible-playbook', ['-i', inventory, '--syntax-check', join(ROOT, 'playbooks/build_qemu.yml')], { encoding: 'utf8', env: ENV, timeout: 120_000 });
  t.is(r.status, 0, `${r.stdout}\n${r.stderr}`);
  t.notRegex(r.stderr, /ERROR!|WARNING/);
});

// Fake EL tools: just enough of dnf, rpm, rpmspec, rpmbuild and createrepo_c for the play's logic.
function fakeTools(dir: string): void {
  mkdirSync(dir, { recursive: true });
  const tool = (name: string, body: string) => {
    writeFileSync(join(dir, name), `#!/bin/bash\necho "${name} $*" >> "$FAKE_LOG"\n${body}\n`);
    chmodSync(join(dir, name), 0o755);
  };
  const names = `v=$(sed -n 's/^Version: *//p' "$spec" | head -1); r=$(sed -n 's/^Release: *//p' "$spec" | head -1 | sed 's/%{[^}]*}//g; s/\\.\\.*/./g')
for p in qemu-kvm qemu-kvm-core qemu-img; do echo "$p-$v-$r.x86_64.rpm"; done`;
  tool('dnf', `case "$1" in
  repoquery) echo "$FAKE_VERSION qemu-kvm-$FAKE_VERSION-$FAKE_RELEASE.src.rpm" ;;
  download) while [ $# -gt 0 ]; do [ "$1" = --destdir ] && { dest=$2; shift; }; last=$1; shift; done
            mkdir -p "$dest" && cp "$FAKE_SPEC" "$dest/$last.src.rpm" ;;
  builddep) if [ -e "$FAKE_LOG.builddep" ]; then echo "Nothing to do."; else touch "$FAKE_LOG.builddep"; echo "Installed: 42 packages"; fi ;;
  *) exit 2 ;;
esac`);
  tool('rpm', `[ "$1" = -i ] || exit 2
top=$(echo "$3" | sed 's/^_topdir //'); mkdir -p "$top/SPECS" "$top/SOURCES" && cp "$4" "$top/SPECS/qemu-kvm.spec"`);
  tool('rpmspec', `spec=\${!#}\n${names}`);
  tool('rpmbuild', `spec=\${!#}; top=$(echo "$3" | sed 's/^_topdir //')
mkdir -p "$top/RPMS/x86_64" "$top/SRPMS"
${names.split('\n')[0]}
for p in qemu-kvm qemu-kvm-core qemu-img qemu-kvm-debuginfo; do echo rpm > "$top/RPMS/x86_64/$p-$v-$r.x86_64.rpm"; done
echo srpm > "$top/SRPMS/qemu-kvm-$v-$r.src.rpm"; echo "built $v-$r"`);
  tool('createrepo_c', 'mkdir -p "$2/repodata" && echo repomd > "$2/repodata/repomd.xml"');
}

function play(dir: string, version: string, release: string, fixture: string, extra: string[] = []) {
  const vars = {
    ftkvm_qemu_build_dir: join(dir, 'build'), ftkvm_qemu_build_publish_dir: join(dir, 'repo'),
    ftkvm_qemu_build_user: userInfo().username, ansible_become: false,
  };
  // from the first task after the platform check, the dnf install of the build tools and the
  // creation of the build user: those would change this (Debian) machine
  const r = spawnSync('ansible-playbook', ['-i', inventory, join(ROOT, 'playbooks/build_qemu.yml'), '-e', JSON.stringify(vars),
    '--start-at-task', 'Find the source RPM to rebuild', ...extra], {
    encoding: 'utf8', timeout: 300_000,
    env: { ...ENV, PATH: `${join(dir, 'bin')}:${process.env.PATH}`, FAKE_LOG: join(dir, 'tools.log'), FAKE_VERSION: version, FAKE_RELEASE: release,
      FAKE_SPEC: join(FIXTURES, fixture), ANSIBLE_LOCALHOST_WARNING: 'false' },
  });
  const out = `${r.stdout}\n${r.stderr}`;
  const recap = /localhost\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)/.exec(out);
  const log = existsSync(join(dir, 'tools.log')) ? readFileSync(join(dir, 'tools.log'), 'utf8') : '';
  return { code: r.status, out, changed: Number(recap?.[2]), failed: Number(recap?.[3]), log };
}

test('build_qemu.yml end to end with fake EL tools: check mode changes nothing, a run builds and publishes, a second run changes nothing', (t) => {
  const dir = mkdtempSync(join(work, 'play-'));
  fakeTools(join(dir, 'bin'));
  const dry = play(dir, '8.0.0', '16.el9_3.3', EL9, ['--check']);
  t.is(dry.code, 0, dry.out);
  t.regex(dry.out, /qemu-kvm-8\.0\.0-16\.el9_3\.3\.src\.rpm \(QEMU 8\.0\.0\) would be downloaded, edited for COLO and built \(check mode\)/);
  t.deepEqual(dry.log.split('\n').filter(Boolean).map((l) => l.split(' ').slice(0, 2).join(' ')), ['dnf repoquery'], 'check mode only asks dnf');
  t.false(existsSync(join(dir, 'repo')), 'check mode publishes nothing');

  const r1 = play(dir, '8.0.0', '16.el9_3.3', EL9);
  t.is(r1.code, 0, r1.out);
  t.regex(r1.log, /^dnf repoquery .* --enablerepo=appstream-source qemu-kvm$/m);
  t.regex(r1.log, /^dnf download --source --destdir .*\/srpms --enablerepo=appstream-source qemu-kvm-8\.0\.0-16\.el9_3\.3$/m);
  t.regex(r1.log, /^dnf builddep -y --enablerepo=crb .*\/qemu-kvm-8\.0\.0-16\.el9_3\.3\/SPECS\/qemu-kvm\.spec$/m);
  t.is(r1.log.match(/^rpmbuild -ba /gm)?.length, 1, r1.log);
  t.notRegex(r1.log, /--nocheck/);
  const spec = readFileSync(join(dir, 'build/qemu-kvm-8.0.0-16.el9_3.3/SPECS/qemu-kvm.spec'), 'utf8');
  t.is(effectiveConfigure(spec).get('replication'), 'enable');
  t.true(rwList(spec).includes('quorum') && rwList(spec).includes('replication'));
  const published = readdirSync(join(dir, 'repo')).sort();
  t.deepEqual(published, ['qemu-img-8.0.0-16.3.ftkvm1.x86_64.rpm', 'qemu-kvm-8.0.0-16.3.ftkvm1.src.rpm', 'qemu-kvm-8.0.0-16.3.ftkvm1.x86_64.rpm',
    'qemu-kvm-core-8.0.0-16.3.ftkvm1.x86_64.rpm', 'repodata'], 'RPMs, source RPM and metadata; no debuginfo');
  t.regex(r1.out, /ftkvm_qemu_repo_url: <the URL at which you serve .*\/repo\/>/);
  t.regex(r1.out, /ftkvm_qemu_repo_gpgcheck: false/);

  const r2 = play(dir, '8.0.0', '16.el9_3.3', EL9);
  t.is(r2.code, 0, r2.out);
  t.is(r2.changed, 0, r2.out);
  t.is(r2.log.match(/^rpmbuild -ba /gm)?.length, 1, 'not rebuilt');
  t.is(r2.log.match(/^dnf download /gm)?.length, 1, 'not downloaded again');
  t.is(r2.log.match(/^createrepo_c /gm)?.length, 1, 'metadata not rewritten');
});

test('build_qemu.yml refuses a QEMU with the COLO regression before downloading it', (t) => {
  const dir = mkdtempSync(join(work, 'play-'));
  fakeTools(join(dir, 'bin'));
  const r = play(dir, '10.1.0', '16.el10', EL10);
  t.not(r.code, 0);
  t.regex(r.out, /qemu-kvm-10\.1\.0-16\.el10\.src\.rpm: refusing to build QEMU 10\.1\.0: QEMU 10\.1\.0 has the upstream COLO regression/);
  t.regex(r.out, /Set ftkvm_qemu_build_version/);
  t.notRegex(r.log, /^dnf download/m);
});
