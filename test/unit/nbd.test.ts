// The agent's NBD client and the checksum resync against real qemu-nbd exports of real qcow2
// images: only the chunks that differ are copied, and the images end byte-identical.
import test from 'ava';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '../../agent/src/nbd/client.ts';
import { chunkDigests, copyChunks, differingChunks, DIGEST_BYTES } from '../../agent/src/nbd/checksums.ts';

const MiB = 1024 * 1024;

async function exportImage(dir: string, name: string, t: { teardown(f: () => void): void }): Promise<string> {
  const sock = join(dir, `${name}.sock`);
  const p: ChildProcess = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, '-x', 'disk', '--persistent', '--cache=none', '--aio=threads', join(dir, `${name}.qcow2`)], { stdio: 'ignore' });
  t.teardown(() => { p.kill('SIGTERM'); });
  for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 50));
  return sock;
}

function qemuIo(img: string, cmds: string[]): void {
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), img], { stdio: 'ignore' });
}

test('checksum resync: digests of two real exports, only the differing chunks copied, images identical after', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-nbd-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const a = join(dir, 'a.qcow2'), b = join(dir, 'b.qcow2');
  for (const img of [a, b]) execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(32 * MiB)]);
  // Common history, then each side diverges: B (the new primary) rewrote two regions, A (the old
  // primary) has a write of its own that never reached B.
  for (const img of [a, b]) qemuIo(img, ['write -P 0x11 0 8M', 'write -P 0x22 16M 4M']);
  qemuIo(b, ['write -P 0x33 1M 64k', 'write -P 0x44 17M 300k']);
  qemuIo(a, ['write -P 0x55 30M 4k']);
  // Written zeroes on one side, never written on the other: the same content, not a difference.
  qemuIo(a, ['write -P 0 24M 256k']);
  const sa = await exportImage(dir, 'a', t), sb = await exportImage(dir, 'b', t);
  const ca = await NbdClient.connect({ path: sa }, 'disk'), cb = await NbdClient.connect({ path: sb }, 'disk');
  t.teardown(() => { ca.close(); cb.close(); });
  t.is(ca.size, 32 * MiB);
  t.true(ca.hasBlockStatus && cb.hasBlockStatus, 'base:allocation negotiated: zero ranges are not read');
  const chunk = 256 * 1024;
  let progress = 0;
  const [da, db] = await Promise.all([chunkDigests(ca, chunk), chunkDigests(cb, chunk, (p) => { progress = p.doneBytes; })]);
  t.is(progress, 32 * MiB, 'progress reaches the disk size');
  t.is(da.length, (32 * MiB / chunk) * DIGEST_BYTES);
  const diff = differingChunks(da, db);
  // 1M+64k lies in chunk 4; 17M..17M+300k spans chunks 68-69; 30M is chunk 120; 24M (zeroes) is not there.
  t.deepEqual(diff, [4, 68, 69, 120]);
  const copied = await copyChunks(cb, ca, diff, chunk);
  t.is(copied, 4 * chunk, 'four chunks cross the link, not 32 MiB');
  ca.close(); cb.close();
  const r = spawn('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', a, b]);
  t.is(await new Promise((res) => r.on('exit', res)), 0, 'qemu-img compare: identical');
});

test('NBD errors are clear: an unknown export, a request beyond the end, a closed server', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-nbd-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'x.qcow2'), String(MiB)]);
  const s = await exportImage(dir, 'x', t);
  await t.throwsAsync(NbdClient.connect({ path: s }, 'nope'), { code: 'NBD_ERROR', message: /export "nope" refused/ });
  const c = await NbdClient.connect({ path: s }, 'disk');
  await t.throwsAsync(c.read(MiB - 512, 1024), { message: /beyond the export/ });
  t.is((await c.read(0, 512)).length, 512);
  c.close();
  await t.throwsAsync(NbdClient.connect({ path: join(dir, 'missing.sock') }, 'disk', 1000), { code: 'NBD_ERROR' });
});
