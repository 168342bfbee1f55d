// Checksum-based resync (as DRBD's csums-alg): both hosts hash their copy of the disk in
// fixed chunks; only the chunks whose digests differ cross the replication link. Sound whatever
// happened before (writes the old primary made that never reached the replica, a host that lost
// its page cache, a replaced disk): it compares content, not history. SHA-256 (truncated to 16
// bytes): a guest that controls both copies' content cannot craft a collision to hide a chunk.
import { createHash } from 'node:crypto';
import { STATE_ZERO, type NbdClient } from './client.ts';

export const DIGEST_BYTES = 16;

/** Runs f(0) .. f(count-1) with at most `inflight` running at once (NBD requests in flight). */
async function inParallel(count: number, inflight: number, f: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => { for (let i = next++; i < count; i = next++) await f(i); };
  await Promise.all(Array.from({ length: Math.min(inflight, Math.max(1, count)) }, worker));
}

export interface ScanProgress { doneBytes: number; totalBytes: number }

/**
 * Which chunks read entirely as zeroes, from the export's block status (base:allocation: QEMU
 * knows holes and zeroed clusters through its own block layer, qcow2 metadata in its cache
 * included). Without block status: none (every chunk is read).
 */
export async function zeroChunks(src: NbdClient, chunkBytes: number): Promise<Uint8Array> {
  const n = Math.ceil(src.size / chunkBytes);
  const zero = new Uint8Array(n);
  if (!src.hasBlockStatus) return zero;
  zero.fill(1);
  for (let off = 0; off < src.size;) {
    const extents = await src.blockStatus(off, Math.min(src.size - off, 1 << 30));
    let end = off;
    for (const e of extents) {
      const a = Math.max(e.offset, off), b = Math.min(e.offset + e.length, src.size);
      if (b <= a) continue;
      if (!(e.flags & STATE_ZERO)) zero.fill(0, Math.floor(a / chunkBytes), Math.ceil(b / chunkBytes));
      end = Math.max(end, b);
    }
    if (end <= off) throw new Error(`block status made no progress at offset ${off}`);
    off = end;
  }
  return zero;
}

const zeroDigests = new Map<number, Buffer>();
function zeroDigest(len: number): Buffer {
  let d = zeroDigests.get(len);
  if (!d) { d = createHash('sha256').update(Buffer.alloc(len)).digest().subarray(0, DIGEST_BYTES); zeroDigests.set(len, d); }
  return d;
}

/**
 * One digest per chunk of the export, concatenated; several reads in flight. Chunks the block
 * status shows as zeroes are not read: their digest is that of zeroes, as on a host that reads them.
 */
export async function chunkDigests(src: NbdClient, chunkBytes: number, onProgress?: (p: ScanProgress) => void, inflight = 8): Promise<Buffer> {
  const n = Math.ceil(src.size / chunkBytes);
  const out = Buffer.alloc(n * DIGEST_BYTES);
  const zero = await zeroChunks(src, chunkBytes);
  let done = 0;
  await inParallel(n, inflight, async (i) => {
    const off = i * chunkBytes, len = Math.min(chunkBytes, src.size - off);
    if (zero[i]) zeroDigest(len).copy(out, i * DIGEST_BYTES);
    else createHash('sha256').update(await src.read(off, len)).digest().copy(out, i * DIGEST_BYTES, 0, DIGEST_BYTES);
    done += len;
    onProgress?.({ doneBytes: done, totalBytes: src.size });
  });
  return out;
}

/** The bytes these chunks cover on a disk of `size` (the last chunk may be short). */
export function chunkBytesOf(chunks: number[], chunkBytes: number, size: number): number {
  return chunks.reduce((s, i) => s + Math.min(chunkBytes, size - i * chunkBytes), 0);
}

/** Indices of the chunks whose digests differ (both lists of the same disk size and chunk). */
export function differingChunks(a: Buffer, b: Buffer): number[] {
  if (a.length !== b.length || a.length % DIGEST_BYTES !== 0) throw new Error(`digest lists differ in length (${a.length} vs ${b.length} bytes)`);
  const out: number[] = [];
  for (let i = 0, n = a.length / DIGEST_BYTES; i < n; i++) {
    if (a.compare(b, i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES, i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES) !== 0) out.push(i);
  }
  return out;
}

/** Copies these chunks from src to dst (same size), several in flight, then flushes dst. */
export async function copyChunks(src: NbdClient, dst: NbdClient, chunks: number[], chunkBytes: number, onProgress?: (p: ScanProgress) => void, inflight = 4): Promise<number> {
  if (src.size !== dst.size) throw new Error(`export sizes differ: ${src.size} vs ${dst.size}`);
  const total = chunkBytesOf(chunks, chunkBytes, src.size);
  let done = 0;
  await inParallel(chunks.length, inflight, async (k) => {
    const off = chunks[k]! * chunkBytes;
    const data = await src.read(off, Math.min(chunkBytes, src.size - off));
    await dst.write(off, data);
    done += data.length;
    onProgress?.({ doneBytes: done, totalBytes: total });
  });
  await dst.flush();
  return done;
}
