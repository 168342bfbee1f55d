import test from 'ava';
import { pinBridgeMac } from '../../agent/src/qemu/tap.ts';
import type { Exec } from '../../agent/src/util/exec.ts';

function fakes(files: Record<string, string>) {
  const calls: string[][] = [];
  const exec: Exec = async (cmd, args) => { calls.push([cmd, ...args]); return { stdout: '', stderr: '' }; };
  const read = (p: string) => { if (!(p in files)) throw new Error(`ENOENT ${p}`); return files[p]!; };
  return { calls, exec, read };
}

test('a bridge with a derived MAC gets its current MAC set explicitly', async (t) => {
  const f = fakes({ '/sys/class/net/br0/addr_assign_type': '0\n', '/sys/class/net/br0/address': '3a:1d:4c:50:5e:61\n' });
  t.is(await pinBridgeMac(f.exec, 'br0', f.read), '3a:1d:4c:50:5e:61');
  t.deepEqual(f.calls, [['ip', 'link', 'set', 'dev', 'br0', 'address', '3a:1d:4c:50:5e:61']]);
});

test('a bridge whose MAC was set explicitly is left alone', async (t) => {
  const f = fakes({ '/sys/class/net/br0/addr_assign_type': '3\n', '/sys/class/net/br0/address': '02:00:00:00:00:01\n' });
  t.is(await pinBridgeMac(f.exec, 'br0', f.read), null);
  t.deepEqual(f.calls, []);
});

test('a missing bridge is an error (the caller logs it)', async (t) => {
  const f = fakes({});
  await t.throwsAsync(pinBridgeMac(f.exec, 'nope', f.read), { message: /ENOENT/ });
});
