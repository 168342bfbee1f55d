// The ftkvm_host role proves the installed QEMU can run COLO by asking it over QMP, and refuses
// a QEMU like stock RHEL qemu-kvm (--disable-replication) with an explanation naming the
// variables to set.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { ROOT } from '../../lab/guest.ts';

function check(binary: string) {
  const r = spawnSync('ansible-playbook', ['-i', 'localhost,', 'test/testbed/colo-check.yml', '-e', `ftkvm_qemu_binary=${binary}`, '-e', 'ftkvm_accelerator=tcg',
    '-e', 'ansible_python_interpreter=/usr/bin/python3'],
  { cwd: ROOT, encoding: 'utf8', timeout: 120_000, env: { ...process.env, ANSIBLE_CONFIG: join(ROOT, 'ansible.cfg'), ANSIBLE_NOCOLOR: '1', ANSIBLE_FORCE_COLOR: '0' } });
  return { code: r.status, out: `${r.stdout}\n${r.stderr}`.replaceAll('\\"', '"') };
}

test("Debian 12's QEMU passes the COLO check", (t) => {
  const r = check('/usr/bin/qemu-system-x86_64');
  t.is(r.code, 0, r.out);
  t.regex(r.out, /QEMU \d+\.\d+\.\d+ at \/usr\/bin\/qemu-system-x86_64 can run COLO/);
});

test('a QEMU without replication and COLO objects is refused with the variables to set', (t) => {
  const r = check(join(ROOT, 'test/testbed/fake-qemu-no-colo-stdio.mjs'));
  t.not(r.code, 0, r.out);
  t.regex(r.out, /cannot run COLO: .*object type 'colo-compare'/);
  t.regex(r.out, /block driver 'replication'/);
  t.regex(r.out, /QMP command 'x-colo-lost-heartbeat'/);
  t.regex(r.out, /built with --disable-replication/);
  t.regex(r.out, /Set ftkvm_qemu_repo_url .* ftkvm_qemu_packages .* ftkvm_qemu_binary/);
});
