import test from 'ava';
import { appendFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEVICE_ERROR, GUEST_KERNEL_ERROR, HeldOutputDetector, LogTail, brokenVirtioDevices } from '../../agent/src/colo/replica-health.ts';
import { tapPacketsFromGuest } from '../../agent/src/qemu/tap.ts';
import type { QmpLike } from '../../agent/src/colo/sequences.ts';
import { QmpCommandError, QmpTimeoutError } from '../../agent/src/qmp/errors.ts';

const TS = '2026-11-26T00:40:53.186123Z qemu-system-x86_64: ';

test('device-model errors QEMU logs when a device meets a ring it cannot process are recognised', (t) => {
  for (const msg of [
    'virtio: zero sized buffers are not allowed',
    'virtio: bogus descriptor or out of resources',
    'Guest moved used index from 12 to 4096',
    'Guest says index 300 is available',
    'Desc next is 257',
    'Looped descriptor',
    'virtio-net: saved image requires vnet_hdr=on',
    'VQ 0 size 0x100 < last_avail_idx 0x5 - used_idx 0x9 inconsistent with Host index 0x2',
  ]) t.true(DEVICE_ERROR.test(TS + msg), msg);
  for (const msg of [
    'terminating on signal 15 from pid 123 (<unknown process>)',
    'warning: TCG doesn\'t support requested feature: CPUID.01H:ECX.vmx [bit 5]',
    '-chardev socket,id=red0,host=10.201.45.1,port=19003,reconnect=1: info: QEMU waiting for connection',
  ]) t.false(DEVICE_ERROR.test(TS + msg), msg);
  t.true(GUEST_KERNEL_ERROR.test('[   12.345678] BUG: kernel NULL pointer dereference, address: 0000000000000008'));
  t.false(GUEST_KERNEL_ERROR.test('tick 12 disk=12'));
});

test('LogTail reads only what was appended since the last look, whole lines only, and survives a replaced file', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'logtail-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const f = join(dir, 'qemu.log');
  const tail = new LogTail(f);
  t.is(tail.firstNewMatch(DEVICE_ERROR), null, 'no file yet');
  writeFileSync(f, TS + 'virtio: zero sized buffers are not allowed\n');
  tail.skipToEnd();
  t.is(tail.firstNewMatch(DEVICE_ERROR), null, 'history before skipToEnd does not count');
  appendFileSync(f, TS + 'info: something harmless\n' + TS + 'Guest moved used ind');
  t.is(tail.firstNewMatch(DEVICE_ERROR), null, 'a line still being written is not judged');
  appendFileSync(f, 'ex from 1 to 9\n');
  t.is(tail.firstNewMatch(DEVICE_ERROR), TS + 'Guest moved used index from 1 to 9');
  t.is(tail.firstNewMatch(DEVICE_ERROR), null, 'each line once');
  writeFileSync(f, TS + 'Looped descriptor\n'); // a new QEMU replaced the log: shorter than the offset
  t.is(tail.firstNewMatch(DEVICE_ERROR), TS + 'Looped descriptor');
});

function fakeQmp(reply: (path: string) => unknown): QmpLike & { asked: string[] } {
  const asked: string[] = [];
  return {
    asked,
    async execute<T>(command: string, args?: Record<string, unknown>): Promise<T> {
      if (command !== 'x-query-virtio-status') throw new Error(`unexpected ${command}`);
      asked.push(String(args?.path));
      const r = reply(String(args?.path));
      if (r instanceof Error) throw r;
      return r as T;
    },
    async hmp() { return ''; },
    on() { return undefined; },
    off() { return undefined; },
  };
}

test('brokenVirtioDevices asks QEMU about the NIC and the disk and names the broken ones', async (t) => {
  const q = fakeQmp((p) => ({ name: p.includes('nic0') ? 'virtio-net' : 'virtio-blk', broken: p.includes('nic0') }));
  t.deepEqual(await brokenVirtioDevices(q), ['nic0 (virtio-net)']);
  t.deepEqual(q.asked, ['/machine/peripheral/nic0/virtio-backend', '/machine/peripheral/disk0/virtio-backend']);
  t.deepEqual(await brokenVirtioDevices(fakeQmp(() => ({ name: 'virtio-net', broken: false }))), []);
});

test('brokenVirtioDevices: a QEMU without the command says nothing (null); other failures are errors', async (t) => {
  t.is(await brokenVirtioDevices(fakeQmp(() => new QmpCommandError('x-query-virtio-status', 'CommandNotFound', 'The command x-query-virtio-status has not been found'))), null);
  await t.throwsAsync(brokenVirtioDevices(fakeQmp(() => new QmpTimeoutError('x-query-virtio-status', 2000))), { instanceOf: QmpTimeoutError });
});

/** Feeds checkpoints: [packets between the previous checkpoint and this one, packets flushed at it]. */
function feed(d: HeldOutputDetector, checkpoints: [number, number][], start = 100): void {
  let n = start;
  d.stopped(n); d.resumed(n); // the first checkpoint only sets the baseline
  for (const [between, at] of checkpoints) { n += between; d.stopped(n); n += at; d.resumed(n); }
}

test('held output: replies that leave only at checkpoints, three checkpoints in a row, are the verdict', (t) => {
  const d = new HeldOutputDetector(3);
  feed(d, [[0, 4], [0, 3]]);
  t.is(d.verdict(), null, 'two are not enough');
  d.stopped(107); d.resumed(109);
  t.regex(d.verdict() ?? '', /only at checkpoints for 3 checkpoints in a row \(9 packets held/);
});

test('held output: one packet matched between checkpoints clears it; idle intervals neither add nor clear', (t) => {
  const healthy = new HeldOutputDetector(3);
  feed(healthy, [[0, 2], [0, 2], [1, 2], [0, 2], [0, 2]]);
  t.is(healthy.verdict(), null, 'the matched packet restarted the count');
  const idle = new HeldOutputDetector(3);
  feed(idle, [[0, 2], [0, 0], [0, 2], [0, 0], [0, 0], [0, 2]]);
  t.not(idle.verdict(), null, 'idle intervals are no counter-evidence');
  const quiet = new HeldOutputDetector(3);
  feed(quiet, [[0, 0], [0, 0], [0, 0], [0, 0]]);
  t.is(quiet.verdict(), null, 'a silent guest is not a held one');
});

test('held output: an unknown counter or an unpaired sample resets the judgement', (t) => {
  const d = new HeldOutputDetector(2);
  feed(d, [[0, 1], [0, 1]]);
  t.not(d.verdict(), null);
  d.stopped(null); d.resumed(500);
  t.is(d.verdict(), null);
  d.resumed(510); // no STOP before it
  t.is(d.verdict(), null);
});

test('tapPacketsFromGuest reads the tap\'s rx counter from sysfs', (t) => {
  t.is(tapPacketsFromGuest('ftk-web1', (p) => { t.is(p, '/sys/class/net/ftk-web1/statistics/rx_packets'); return '1234\n'; }), 1234);
  t.is(tapPacketsFromGuest('gone', () => { throw new Error('ENOENT'); }), null);
});
