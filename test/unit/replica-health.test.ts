import test from 'ava';
import { appendFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEVICE_ERROR, GUEST_KERNEL_ERROR, LogTail, ReceivedBytes, SilentReplicaDetector, brokenVirtioDevices, parseReceivedBytes } from '../../agent/src/colo/replica-health.ts';
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
  appendFileSync(f, '[ 1.0] état ünïcode ✓ console line\n' + TS + 'virtio: bogus descriptor or out of resources\n');
  t.is(tail.firstNewMatch(DEVICE_ERROR), TS + 'virtio: bogus descriptor or out of resources', 'multi-byte text before it does not shift the offset');
  appendFileSync(f, 'x'.repeat(70) + '\n' + TS + 'Looped descriptor\n');
  const small = new LogTail(f, 128);
  small.skipToEnd();
  appendFileSync(f, 'y'.repeat(300) + '\n' + TS + 'Guest says index 9 is available\n');
  const seen: (string | null)[] = [];
  for (let i = 0; i < 6 && !seen.at(-1); i++) seen.push(small.firstNewMatch(DEVICE_ERROR));
  t.true(seen.length >= 3 && seen.slice(0, -1).every((x) => x === null), `a line longer than the read bound is passed over in pieces…: ${JSON.stringify(seen)}`);
  t.regex(seen.at(-1) ?? '', /Guest says index 9 is available$/, '…and the next line is still found whole');
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

/** One sample a second: [packets the guest sent so far, bytes the secondary sent so far]. */
function feed(d: SilentReplicaDetector, xs: [number | null, number | null][], startMs = 0): void {
  xs.forEach(([g, b], i) => d.sample({ atMs: startMs + 1000 * i, guestPackets: g, secondaryBytes: b }));
}

test('silent replica: the guest talks for the whole window and the secondary sends nothing', (t) => {
  const d = new SilentReplicaDetector(6000);
  feed(d, [[10, 500], [12, 500], [12, 500], [14, 500], [15, 500], [15, 500]]);
  t.is(d.verdict(), null, '5 s are not the window yet');
  d.sample({ atMs: 6000, guestPackets: 16, secondaryBytes: 500 });
  t.regex(d.verdict() ?? '', /sent no output to colo-compare for 6\.0 s while the guest sent 6 packets/);
  d.sample({ atMs: 7000, guestPackets: 17, secondaryBytes: 520 });
  t.is(d.verdict(), null, 'one byte from the secondary and it is not silent');
});

test('silent replica: a quiet guest, a talking secondary or an unknown counter is no verdict', (t) => {
  const quiet = new SilentReplicaDetector(3000);
  feed(quiet, [[10, 500], [10, 500], [11, 500], [11, 500], [11, 500]]);
  t.is(quiet.verdict(), null, 'fewer than 3 packets from the guest');
  const talking = new SilentReplicaDetector(3000);
  feed(talking, [[10, 500], [20, 600], [30, 700], [40, 800], [50, 900]]);
  t.is(talking.verdict(), null, 'a secondary that answers (even differently) is the storm rule\'s business');
  const unknown = new SilentReplicaDetector(3000);
  feed(unknown, [[10, 500], [20, 500], [30, null], [40, 500], [50, 500]]);
  t.is(unknown.verdict(), null, 'the connection was gone for a moment: the window starts again');
  feed(unknown, [[60, 500], [70, 500]], 5000);
  t.not(unknown.verdict(), null, 'a full silent window after the gap');
  const renewed = new SilentReplicaDetector(3000);
  feed(renewed, [[10, 500], [20, 500], [30, 0], [40, 0], [50, 0]]);
  t.is(renewed.verdict(), null, 'a counter going back is a new connection: start again');
});

const SS = [
  '0      0      10.201.45.1:19004 10.201.45.2:40788',
  '\t bbr wscale:10,10 rto:204 rtt:0.017/0.008 mss:32768 cwnd:10 bytes_received:6420 segs_out:1 segs_in:3',
  '0      0      10.201.45.1:19003 10.201.45.2:40790',
  '\t cubic wscale:7,7 rto:204 cwnd:10 segs_in:1',
  '0      0      [::1]:7480 [::1]:51000',
  '\t cubic rto:204 bytes_received:10',
  '0      0      [::1]:7480 [::1]:51002',
  '\t cubic rto:204 bytes_received:5',
].join('\n') + '\n';

test('bytes received per local port, from ss -tinH', (t) => {
  const m = parseReceivedBytes(SS);
  t.is(m.get(19004), 6420);
  t.is(m.get(19003), 0, 'connected, nothing received yet');
  t.is(m.get(7480), 15, 'two connections to one port');
  t.is(m.get(19005), undefined);
});

test('ReceivedBytes runs one ss for every VM within its TTL', async (t) => {
  let calls = 0, now = 0;
  const rb = new ReceivedBytes(async () => { calls++; return { stdout: SS, stderr: '' }; }, () => now, 900);
  t.is(await rb.onLocalPort(19004), 6420);
  t.is(await rb.onLocalPort(19003), 0);
  t.is(await rb.onLocalPort(19104), null, 'no connection on that port');
  t.is(calls, 1);
  now = 1000;
  await rb.onLocalPort(19004);
  t.is(calls, 2);
});

test('tapPacketsFromGuest reads the tap\'s rx counter from sysfs', (t) => {
  t.is(tapPacketsFromGuest('ftk-web1', (p) => { t.is(p, '/sys/class/net/ftk-web1/statistics/rx_packets'); return '1234\n'; }), 1234);
  t.is(tapPacketsFromGuest('gone', () => { throw new Error('ENOENT'); }), null);
});
