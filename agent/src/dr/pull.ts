// `ftkvm-agent dr-pull VM [--final]`: fail-back, the primary site's side. Run on the host that
// is to run the VM again, with its agent stopped: brings this host's copy of the VM's disk (its
// old copy, or an empty one of the same size) in line with the DR site's, copying only the 1 MiB
// chunks whose digests differ (a rebuilt host with an empty disk gets everything that is not
// zero at the DR site; a host that comes back with its old disk gets what changed).
//   without --final: from the recovery point the VM was activated from (the VM keeps running
//                    at the DR site meanwhile): most of the disk, before the planned stop;
//   --final:         from the VM's own disk at the DR site, once it is stopped there; then this
//                    node's state records the DR epoch as its own promotion, so this node is
//                    elected (its disk is the newest) and asks the witness for a newer epoch.
import { dirname, join } from 'node:path';
import { Agent, request } from 'undici';
import { readFileSync } from 'node:fs';
import type { Config, VmConfig } from '../config/schema.ts';
import { serveOverNbd, stopProcess } from './qemu-nbd.ts';
import { chunkDigests, differingChunks } from '../nbd/checksums.ts';
import { StateStore } from '../state/store.ts';
import { isSameProcessAlive, type ProcessRecord } from '../qemu/process.ts';
import { vmPaths } from '../qemu/paths.ts';
import { readSecret } from '../util/secret.ts';
import { FtkvmError } from '../util/errors.ts';
import type { VmPoints } from './protocol.ts';
import { DR_CHUNK_BYTES } from './shipper.ts';

export interface PullReport { vm: string; stage: 'seed' | 'final'; diskBytes: number; differingBytes: number; copiedBytes: number; ms: number; epoch: number | null }

export async function drPull(c: Config, vm: VmConfig, final: boolean, say: (line: string) => void): Promise<PullReport> {
  if (!vm.dr) throw new FtkvmError('NO_DR', `${vm.name} has no dr section in the configuration: nothing to pull from`);
  const paths = vmPaths(c.state_dir, vm.name);
  const rec = (() => { try { return JSON.parse(readFileSync(paths.processRecord, 'utf8')) as ProcessRecord; } catch { return null; } })();
  if (rec && isSameProcessAlive(rec)) throw new FtkvmError('VM_RUNNING_HERE', `${vm.name}: its QEMU runs on this host (pid ${rec.pid}): stop the agent and the VM here first`);
  const t0 = performance.now();
  const token = readSecret(vm.dr.token_file ?? c.api.token_file);
  const dispatcher = new Agent({ connectTimeout: 5000, connect: vm.dr.ca_file ? { ca: readFileSync(vm.dr.ca_file) } : undefined });
  const base = vm.dr.target.replace(/\/$/, '');
  const call = async (method: 'GET' | 'POST', path: string, body?: unknown): Promise<Buffer> => {
    const res = await request(`${base}${path}`, { method, dispatcher, headersTimeout: 3600_000, bodyTimeout: 3600_000,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) });
    const buf = Buffer.from(await res.body.arrayBuffer());
    if (res.statusCode >= 400) {
      let msg = buf.toString('utf8');
      try { msg = (JSON.parse(msg) as { error: { message: string } }).error.message; } catch { /* as is */ }
      throw new FtkvmError('DR_TARGET_REJECTED', `DR target ${method} ${path} → ${res.statusCode}: ${msg}`);
    }
    return buf;
  };
  const stage = final ? 'final' : 'seed';
  const info = JSON.parse((await call('GET', `/v1/dr/vms/${vm.name}`)).toString('utf8')) as VmPoints;
  if (!info.activated) throw new FtkvmError('DR_NOT_ACTIVATED', `${vm.name} does not run at the DR site: nothing to fail back`);
  const sock = join(paths.dir, 'dr-pull.sock');
  // qemu-nbd is shipped with qemu-img
  const { proc: nbdProc, nbd: local } = await serveOverNbd(join(dirname(c.qemu.img_binary), 'qemu-nbd'), sock, ['--format', vm.disk.format, '--cache', 'writeback', '--persistent', vm.disk.path])
    .catch(async () => { await dispatcher.close(); throw new FtkvmError('NBD_FAILED', `qemu-nbd did not serve ${vm.disk.path}`); });
  try {
    say(`${vm.name}: digesting this host's disk and the DR site's (${stage}), ${(local.size / 2 ** 20).toFixed(0)} MiB each`);
    const [remote, mine] = await Promise.all([
      call('POST', `/v1/dr/vms/${vm.name}/failback/digests`, { stage, chunkBytes: DR_CHUNK_BYTES }),
      chunkDigests(local, DR_CHUNK_BYTES),
    ]);
    if (remote.length !== mine.length) throw new FtkvmError('DISK_SIZE_DIFFERS', `${vm.name}: the disk here (${local.size} bytes) is not the DR site's size: resize it (qemu-img resize) or create an empty one of that size`);
    const diff = differingChunks(mine, remote);
    const differing = diff.reduce((s, i) => s + Math.min(DR_CHUNK_BYTES, local.size - i * DR_CHUNK_BYTES), 0);
    say(`${vm.name}: ${diff.length} chunks differ (${(differing / 2 ** 20).toFixed(1)} MiB); copying`);
    let copied = 0, lastSay = performance.now();
    for (const i of diff) {
      const off = i * DR_CHUNK_BYTES, len = Math.min(DR_CHUNK_BYTES, local.size - off);
      await local.write(off, await call('GET', `/v1/dr/vms/${vm.name}/failback/data?stage=${stage}&offset=${off}&length=${len}`));
      copied += len;
      if (performance.now() - lastSay > 5000) { lastSay = performance.now(); say(`${vm.name}: ${(copied / 2 ** 20).toFixed(1)} of ${(differing / 2 ** 20).toFixed(1)} MiB`); }
    }
    await local.flush();
    let epoch: number | null = null;
    if (final) {
      // This node now holds the VM's newest data, at the DR epoch: elected at the next start, and
      // its cold start asks the witness for a newer epoch than the DR site's.
      epoch = info.activated.epoch ?? Math.max(0, ...info.points.map((p) => p.epoch)) + 1;
      const store = new StateStore(c.state_dir, c.node.name);
      store.update(vm.name, { epoch: Math.max(store.vm(vm.name).epoch, epoch), primaryEpoch: epoch, role: 'none', fenced: false });
      say(`${vm.name}: this node's state records epoch ${epoch} (the DR site's): it runs the VM at the next start`);
    }
    return { vm: vm.name, stage, diskBytes: local.size, differingBytes: differing, copiedBytes: copied, ms: Math.round(performance.now() - t0), epoch };
  } finally {
    local.close();
    await stopProcess(nbdProc);
    await dispatcher.close();
  }
}
