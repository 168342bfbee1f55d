// Lab mode (qemu.tcg_lab_shim): one option brings both halves the TCG COLO shim needs.
import test from 'ava';
import { TCG_SHIM_TRACE_ARGS, qemuEnv, qemuExtraArgs } from '../../agent/src/qemu/lab.ts';
import { configSchema } from '../../agent/src/config/schema.ts';

const qemu = (extra: Record<string, unknown>) => configSchema.shape.qemu.parse({ accelerator: 'tcg', ...extra });

test('lab mode preloads the shim and enables its trace events, before any extra arguments; off, nothing is added', (t) => {
  const lab = qemu({ tcg_lab_shim: '/usr/local/lib/ftkvm-test/shim.so', env: { X: '1' }, extra_args: ['-d', 'guest_errors'] });
  t.deepEqual(qemuEnv(lab), { X: '1', LD_PRELOAD: '/usr/local/lib/ftkvm-test/shim.so' });
  t.deepEqual(qemuExtraArgs(lab), [...TCG_SHIM_TRACE_ARGS, '-d', 'guest_errors']);
  t.true(TCG_SHIM_TRACE_ARGS.includes('enable=migration_bitmap_sync_end') && TCG_SHIM_TRACE_ARGS.some((a) => a.startsWith('enable=colo_flush_ram_cache_end')));
  const prod = qemu({ env: { X: '1' }, extra_args: [] });
  t.deepEqual(qemuEnv(prod), { X: '1' });
  t.deepEqual(qemuExtraArgs(prod), []);
});

test('the shim is refused with KVM and next to an LD_PRELOAD of its own', (t) => {
  t.throws(() => configSchema.shape.qemu.parse({ accelerator: 'kvm', tcg_lab_shim: '/x.so' }), { message: /TCG labs only/ });
  t.throws(() => qemu({ tcg_lab_shim: '/x.so', env: { LD_PRELOAD: '/y.so' } }), { message: /sets LD_PRELOAD itself/ });
  t.throws(() => qemu({ tcg_lab_shim: 'shim.so' }), { message: /absolute path/ });
});
