// qemu-img: sizes and fresh images for a secondary.
import type { Exec } from '../util/exec.ts';

export async function imageVirtualSize(exec: Exec, qemuImg: string, path: string, format: string): Promise<number> {
  const { stdout } = await exec(qemuImg, ['info', '--output=json', '-U', '-f', format, path]);
  return (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
}

export async function createQcow2(exec: Exec, qemuImg: string, path: string, sizeBytes: number): Promise<void> {
  await exec(qemuImg, ['create', '-q', '-f', 'qcow2', path, String(sizeBytes)]);
}

/** Makes the local disk image match the primary's virtual size (content is resynced anyway). */
export async function ensureImageSize(exec: Exec, qemuImg: string, path: string, format: string, sizeBytes: number): Promise<'ok' | 'created' | 'resized'> {
  let cur: number | undefined;
  try { cur = await imageVirtualSize(exec, qemuImg, path, format); } catch { cur = undefined; }
  if (cur === undefined) {
    await exec(qemuImg, ['create', '-q', '-f', format, path, String(sizeBytes)]);
    return 'created';
  }
  if (cur !== sizeBytes) {
    await exec(qemuImg, ['resize', '-q', '-f', format, ...(cur > sizeBytes ? ['--shrink'] : []), path, String(sizeBytes)]);
    return 'resized';
  }
  return 'ok';
}
