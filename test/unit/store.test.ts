import test from 'ava';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StateStore } from '../../agent/src/state/store.ts';

test('a failed state write throws, keeps the state in memory and writes it once the disk takes it', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-store-'));
  const s = new StateStore(dir, 'hostA');
  s.update('vm', { epoch: 2, primaryEpoch: 2 });
  rmSync(dir, { recursive: true });
  writeFileSync(dir, 'not a directory'); // every write now fails, as on EIO/ENOSPC
  t.throws(() => s.update('vm', { fenced: true }), { code: 'EEXIST' });
  t.true(s.unsaved);
  t.true(s.vm('vm').fenced, 'nothing in memory may un-fence the VM');
  t.is(s.vm('vm').epoch, 2);
  t.throws(() => s.flush());
  rmSync(dir);
  mkdirSync(dir);
  s.flush();
  t.false(s.unsaved);
  t.true(JSON.parse(readFileSync(join(dir, 'state.json'), 'utf8')).vms.vm.fenced);
  t.true(new StateStore(dir, 'hostA').vm('vm').fenced, 'a restarted agent finds the fence');
});
