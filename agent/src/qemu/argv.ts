// QEMU command lines per role. Pure: (config, VM, role, paths) → argv. The COLO proxy objects
// of a primary are NOT on its command line: they are hot-added when a replica is built, so the
// same primary can lose and regain its secondary any number of times.
import type { Config, VmConfig } from '../config/schema.ts';
import { tapName } from '../config/load.ts';
import { vmPorts } from '../colo/ports.ts';
import type { VmPaths } from './paths.ts';
import { qemuExtraArgs } from './lab.ts';

export type LaunchRole = 'primary' | 'secondary';

export interface QemuFeatures {
  /** QEMU >= 9.2 spells the chardev reconnect option reconnect-ms (and later drops `reconnect`). */
  reconnectMs: boolean;
}

export interface LaunchSpec {
  role: LaunchRole;
  /** Primary only: start with vCPUs stopped (-S), e.g. a first boot that waits for its replica. */
  paused?: boolean;
}

export function buildQemuArgv(c: Config, vm: VmConfig, paths: VmPaths, spec: LaunchSpec, feat: QemuFeatures): string[] {
  const a: string[] = [];
  a.push('-name', `guest=${vm.name},debug-threads=on`);
  a.push('-machine', c.qemu.machine, '-accel', c.qemu.accelerator);
  if (c.qemu.accelerator === 'kvm') a.push('-cpu', 'host');
  a.push('-m', String(vm.memory_mib), '-smp', String(vm.vcpus));
  a.push('-nodefaults', '-no-user-config', '-display', 'none', '-msg', 'timestamp=on');
  a.push('-chardev', `file,id=serial0,path=${paths.serialLog},append=on`, '-serial', 'chardev:serial0');
  a.push('-qmp', `unix:${paths.qmpSocket},server=on,wait=off`);
  a.push('-qmp', `unix:${paths.observerSocket},server=on,wait=off`);
  if ('kernel' in vm.boot) {
    a.push('-kernel', vm.boot.kernel);
    if (vm.boot.initrd) a.push('-initrd', vm.boot.initrd);
    if (vm.boot.append) a.push('-append', vm.boot.append);
  }
  // COLO needs vhost=off; vnet_hdr=off so colo-compare can parse the frames it compares.
  a.push('-netdev', `tap,id=hn0,ifname=${tapName(vm)},script=no,downscript=no,vhost=off,vnet_hdr=off`);
  a.push('-device', `virtio-net-pci,id=nic0,netdev=hn0,mac=${vm.nic.mac}`);
  if (spec.role === 'primary') {
    // A quorum with one child (vote-threshold=1): the replication child is added at protect time.
    a.push('-drive', `if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,` +
      `children.0.file.filename=${vm.disk.path},children.0.driver=${vm.disk.format}`);
    a.push('-device', 'virtio-blk-pci,id=disk0,drive=colo-disk0');
    if (spec.paused) a.push('-S');
  } else {
    const p = vmPorts(vm.base_port);
    const peer = c.peer.replication_address;
    const rc = feat.reconnectMs ? 'reconnect-ms=1000' : 'reconnect=1';
    a.push('-chardev', `socket,id=red0,host=${peer},port=${p.mirror},${rc}`);
    a.push('-chardev', `socket,id=red1,host=${peer},port=${p.compare1},${rc}`);
    a.push('-object', 'filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0');
    a.push('-object', 'filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1');
    a.push('-object', 'filter-rewriter,id=rew0,netdev=hn0,queue=all');
    // parent0 = this host's copy of the VM disk (overwritten by the primary's resync);
    // active/hidden hold the secondary's own writes and the pre-checkpoint blocks.
    a.push('-drive', `if=none,id=parent0,file.filename=${vm.disk.path},driver=${vm.disk.format}`);
    a.push('-drive', `if=none,id=childs0,driver=replication,mode=secondary,file.driver=qcow2,top-id=colo-disk0,` +
      `file.file.filename=${paths.secondaryActive},file.backing.driver=qcow2,` +
      `file.backing.file.filename=${paths.secondaryHidden},file.backing.backing=parent0`);
    a.push('-drive', 'if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0');
    a.push('-device', 'virtio-blk-pci,id=disk0,drive=colo-disk0');
    a.push('-incoming', 'defer');
  }
  a.push(...qemuExtraArgs(c.qemu));
  return a;
}
