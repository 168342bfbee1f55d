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

/** A scripted NBD server (fixed newstyle, structured replies, one export of 1 MiB) for protocol edge cases. */
async function fakeServer(t: { teardown(f: () => void): void }, onRequest: (sock: import('node:net').Socket, handle: Buffer, offset: number, length: number) => void): Promise<string> {
  const { createServer } = await import('node:net');
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-nbd-fake-'));
  const path = join(dir, 's.sock');
  const srv = createServer((sock) => {
    const hello = Buffer.alloc(18); hello.write('NBDMAGIC'); hello.write('IHAVEOPT', 8); hello.writeUInt16BE(3, 16);
    sock.write(hello);
    let buf = Buffer.alloc(0), stage = 'flags';
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (stage === 'flags') { if (buf.length < 4) return; buf = buf.subarray(4); stage = 'opts'; continue; }
        if (stage === 'opts') {
          if (buf.length < 16) return;
          const opt = buf.readUInt32BE(8), len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          buf = buf.subarray(16 + len);
          const reply = (type: number, body = Buffer.alloc(0)) => { const h = Buffer.alloc(20); h.writeBigUInt64BE(0x3e889045565a9n); h.writeUInt32BE(opt, 8); h.writeUInt32BE(type, 12); h.writeUInt32BE(body.length, 16); sock.write(Buffer.concat([h, body])); };
          if (opt === 7) { const info = Buffer.alloc(12); info.writeUInt16BE(0); info.writeBigUInt64BE(1048576n, 2); info.writeUInt16BE(1, 10); reply(3, info); reply(1); stage = 'tx'; }
          else reply(opt === 8 ? 1 : 0x80000001); // structured replies yes, meta contexts no
          continue;
        }
        if (buf.length < 28) return;
        const handle = buf.subarray(8, 16), offset = Number(buf.readBigUInt64BE(16)), length = buf.readUInt32BE(24);
        buf = buf.subarray(28);
        onRequest(sock, Buffer.from(handle), offset, length);
      }
    });
  });
  await new Promise<void>((r) => srv.listen(path, r));
  t.teardown(() => { srv.close(); rmSync(dir, { recursive: true, force: true }); });
  return path;
}

test('NBD: a request the server never answers fails after the request timeout; a malformed reply fails the request, not the process', async (t) => {
  const silent = await fakeServer(t, () => undefined);
  const c1 = await NbdClient.connect({ path: silent }, 'x', 2000, 300);
  const t0 = Date.now();
  await t.throwsAsync(c1.read(0, 4096), { code: 'NBD_ERROR', message: /not answered within 300 ms/ });
  t.true(Date.now() - t0 < 2000);
  const bad = await fakeServer(t, (sock, handle, offset) => {
    // an OFFSET_DATA chunk that lies outside the request, with the DONE flag
    const h = Buffer.alloc(20); h.writeUInt32BE(0x668e33ef); h.writeUInt16BE(1, 4); h.writeUInt16BE(1, 6); handle.copy(h, 8); h.writeUInt32BE(8 + 16, 16);
    const body = Buffer.alloc(8 + 16); body.writeBigUInt64BE(BigInt(offset + 1_000_000));
    sock.write(Buffer.concat([h, body]));
  });
  const c2 = await NbdClient.connect({ path: bad }, 'x', 2000, 5000);
  await t.throwsAsync(c2.read(0, 4096), { code: 'NBD_ERROR', message: /outside its request/ });
  const short = await fakeServer(t, (sock, handle) => {
    // a structured read answered for only half its range
    const h = Buffer.alloc(20); h.writeUInt32BE(0x668e33ef); h.writeUInt16BE(1, 4); h.writeUInt16BE(1, 6); handle.copy(h, 8); h.writeUInt32BE(8 + 2048, 16);
    sock.write(Buffer.concat([h, Buffer.alloc(8), Buffer.alloc(2048, 7)]));
  });
  const c3 = await NbdClient.connect({ path: short }, 'x', 2000, 5000);
  await t.throwsAsync(c3.read(0, 4096), { code: 'NBD_ERROR', message: /answered for 2048/ });
});
