// The secondary's side of the peer RPC: become a replica (prepare), let it go (release), take
// over on the primary's request. Every request carries the sender's promotion epoch.
import { mkdirSync, rmSync } from 'node:fs';
import { createQcow2, ensureImageSize } from '../../qemu/images.ts';
import { FtkvmError, errorMessage } from '../../util/errors.ts';
import { vmPorts } from '../ports.ts';
import * as seq from '../sequences.ts';
import { roleOf, isPrimaryState } from '../states.ts';
import { tick } from './control.ts';
import type { VmCore } from './core.ts';
import { launch, killQemu } from './lifecycle.ts';
import { VmBusyError, type PrepareAnswer, type PrepareRequest } from './types.ts';
import { NbdClient } from '../../nbd/client.ts';
import { chunkDigests } from '../../nbd/checksums.ts';


/** Peer (primary) asks this node to become its secondary. Resolves when ready for the stream. */
export async function prepareSecondary(c: VmCore, req: PrepareRequest): Promise<PrepareAnswer> {
  if (isPrimaryState(c.state)) throw new VmBusyError(c.name, `this node runs the VM as ${c.state}; refusing to become a secondary`);
  if (c.busy) throw new VmBusyError(c.name, 'an operation is in progress');
  const dur = c.durable();
  if (req.epoch < dur.epoch) throw new FtkvmError('STALE_EPOCH', `${req.primary} was promoted at epoch ${req.epoch}, older than epoch ${dur.epoch} known here: it is not the current primary`);
  c.busy = true;
  try {
    if (c.qemu) await killQemu(c, 'replaced by a fresh secondary');
    c.sick = null;
    c.brokenDevices = [];
    c.d.store.update(c.name, { epoch: req.epoch, role: 'secondary', fenced: false, replicaEpoch: req.epoch });
    c.preparedFor = req.protection ? { protection: req.protection, atMono: c.d.clock.mono() } : null;
    c.setState('preparing', `becoming the secondary of ${req.primary} (epoch ${req.epoch})`);
    const vm = c.d.vm;
    const img = c.d.config.qemu.img_binary;
    mkdirSync(c.paths.dir, { recursive: true, mode: 0o700 });
    const r = await ensureImageSize(c.d.exec, img, vm.disk.path, vm.disk.format, req.sizeBytes);
    if (r !== 'ok') c.log.info(`local disk image ${r} to ${req.sizeBytes} bytes`, { path: vm.disk.path });
    for (const f of [c.paths.secondaryActive, c.paths.secondaryHidden]) {
      rmSync(f, { force: true });
      await createQcow2(c.d.exec, img, f, req.sizeBytes);
    }
    // Skip our own history so only the secondary's new output is scanned.
    c.consoleTail.skipToEnd();
    c.qemuLogTail.skipToEnd();
    const h = await launch(c, 'secondary', false);
    await seq.secondaryPrepare(h.qmp, { listen: c.d.config.node.replication_address, ports: vmPorts(vm.base_port) });
    let digests: string | undefined;
    if (req.checksumChunkBytes) {
      // Through our own QEMU's export of the disk (parent0), before anything writes to it.
      const t0 = c.d.clock.mono();
      const nbd = await NbdClient.connect({ host: c.d.config.node.replication_address, port: vmPorts(vm.base_port).nbd }, 'parent0');
      try {
        digests = (await chunkDigests(nbd, req.checksumChunkBytes)).toString('base64');
      } finally { nbd.close(); }
      c.log.info('disk digested for a checksum resync', { bytes: req.sizeBytes, chunkBytes: req.checksumChunkBytes, ms: Math.round(c.d.clock.mono() - t0) });
    }
    c.log.info('secondary ready for the COLO stream', { primary: req.primary });
    return digests === undefined ? { ready: true } : { ready: true, digests };
  } catch (e) {
    await killQemu(c, `secondary preparation failed: ${errorMessage(e)}`);
    throw e;
  } finally {
    c.busy = false;
  }
}

/** A peer RPC from a primary promoted at `epoch`: refused when a newer promotion is known here. */
export function checkSenderEpoch(c: VmCore, epoch: number | undefined, what: string): void {
  const known = c.durable().epoch;
  if (epoch !== undefined && epoch < known) throw new FtkvmError('STALE_EPOCH', `${what} from a primary promoted at epoch ${epoch}, older than epoch ${known} known here: it is not the current primary`);
}

/**
 * Peer (primary) no longer wants this node's replica. Answered only when it is true that this
 * node will not take over: the replica is gone, or there was none. A node that runs the VM or
 * is taking over refuses (the primary relies on the answer to resume its guest).
 */
export async function release(c: VmCore, reason: string, epoch?: number): Promise<void> {
  checkSenderEpoch(c, epoch, 'release');
  if (isPrimaryState(c.state)) throw new VmBusyError(c.name, `this node runs the VM as ${c.state}: it holds no replica to release`);
  if (c.takingOver) throw new VmBusyError(c.name, 'this node is asking the witness for the lease to take over: it cannot promise not to');
  if (roleOf(c.state) === 'secondary') await killQemu(c, `released by the primary: ${reason}`);
}

/** Peer (primary) tells us its QEMU is gone or hands over (switchover): take over now. */
export function requestTakeover(c: VmCore, reason: string, epoch?: number): void {
  checkSenderEpoch(c, epoch, 'takeover request');
  if (c.state !== 'secondary') throw new VmBusyError(c.name, `cannot take over from state ${c.state}`);
  c.takeoverRequested = `requested by the primary: ${reason}`;
  void tick(c);
}
