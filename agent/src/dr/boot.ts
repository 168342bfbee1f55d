// Boots a recovery point at the DR site: always on a new qcow2 overlay, so the point itself is
// never written. Two networks:
//   isolated — a test copy: user-mode networking with `restrict=on` (no packet reaches any real
//              network) on the guest's own subnet, so its configured address works; the agent
//              reaches the probe port through a loopback port forward, nothing else can.
//   site     — the VM itself after a DR failover: a tap on the DR site's bridge (dr nic).
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, connect } from 'node:net';
import { openSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import type { Exec } from '../util/exec.ts';
import { plugTap } from '../qemu/tap.ts';
import { parseCidr } from '../util/cidr.ts';
import type { DrTargetConfig, DrVm } from './config.ts';

export interface Booted { proc: ChildProcess; pid: number; overlay: string; serialLog: string; probeAt: { host: string; port: number } }

export function drTapName(vm: DrVm): string { return vm.nic.tap ?? `ftdr-${vm.name}`.slice(0, 15); }

/** The user-mode network of a test copy: the guest's subnet, a host address in it that is not the guest's. */
export function isolatedNet(vm: DrVm): { net: string; host: string } {
  const c = parseCidr(vm.test_network ?? `${vm.probe.address}/24`);
  if (!c || c.family !== 'ipv4') throw new Error(`${vm.name}: test_network must be an IPv4 subnet`);
  const base = c.addr.split('.').map(Number).reduce((a, o) => a * 256 + o, 0) & (c.bits === 0 ? 0 : (~0 << (32 - c.bits)) >>> 0);
  const toIp = (n: number) => [24, 16, 8, 0].map((s) => (n >>> s) & 255).join('.');
  const guest = vm.probe.address;
  const host = [2, 3].map((k) => toIp((base + k) >>> 0)).find((h) => h !== guest)!;
  return { net: `${toIp(base >>> 0)}/${c.bits}`, host };
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const p = (s.address() as { port: number }).port; s.close(() => resolve(p)); });
  });
}

export async function bootPoint(o: { config: DrTargetConfig; vm: DrVm; pointFile: string; dir: string; tag: string; network: 'isolated' | 'site'; exec: Exec; detached: boolean }): Promise<Booted> {
  const { config: c, vm } = o;
  const overlay = join(o.dir, `${o.tag}.qcow2`);
  const serialLog = join(o.dir, `${o.tag}.serial.log`);
  await o.exec(c.qemu.img_binary, ['create', '-q', '-f', 'qcow2', '-b', o.pointFile, '-F', 'qcow2', overlay], { timeoutMs: 60_000 });
  const a: string[] = ['-name', `guest=${vm.name}-${o.tag},debug-threads=on`, '-machine', c.qemu.machine, '-accel', c.qemu.accelerator];
  if (c.qemu.accelerator === 'kvm') a.push('-cpu', 'host');
  a.push('-m', String(vm.memory_mib), '-smp', String(vm.vcpus), '-nodefaults', '-no-user-config', '-display', 'none');
  a.push('-chardev', `file,id=serial0,path=${serialLog},append=on`, '-serial', 'chardev:serial0');
  if ('kernel' in vm.boot) {
    a.push('-kernel', vm.boot.kernel);
    if (vm.boot.initrd) a.push('-initrd', vm.boot.initrd);
    if (vm.boot.append) a.push('-append', vm.boot.append);
  }
  let probeAt = { host: vm.probe.address, port: vm.probe.port };
  if (o.network === 'isolated') {
    const { net, host } = isolatedNet(vm);
    const port = await freePort();
    a.push('-netdev', `user,id=hn0,net=${net},host=${host},restrict=on,hostfwd=tcp:127.0.0.1:${port}-${vm.probe.address}:${vm.probe.port}`);
    probeAt = { host: '127.0.0.1', port };
  } else {
    a.push('-netdev', `tap,id=hn0,ifname=${drTapName(vm)},script=no,downscript=no`);
  }
  a.push('-device', `virtio-net-pci,id=nic0,netdev=hn0,mac=${vm.nic.mac}`);
  a.push('-drive', `if=none,id=disk0,file=${overlay},format=qcow2`, '-device', 'virtio-blk-pci,id=vdisk0,drive=disk0');
  a.push('-pidfile', join(o.dir, `${o.tag}.pid`));
  a.push(...c.qemu.extra_args);
  const logFd = openSync(join(o.dir, `${o.tag}.qemu.log`), 'a');
  const proc = spawn(c.qemu.binary, a, { stdio: ['ignore', logFd, logFd], detached: o.detached });
  closeSync(logFd);
  if (o.detached) proc.unref();
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(resolve, 300); // an argv QEMU refuses ends at once
    proc.once('exit', (code, sig) => { clearTimeout(t); reject(new Error(`QEMU exited at start (${sig ?? code}); see ${join(o.dir, `${o.tag}.qemu.log`)}`)); });
    proc.once('error', (e) => { clearTimeout(t); reject(e); });
  });
  if (o.network === 'site') await plugTap(o.exec, drTapName(vm), vm.nic.bridge);
  return { proc, pid: proc.pid!, overlay, serialLog, probeAt };
}

/** Waits until the guest answers on its probe port (a reply line to `request`, or a connection); ms until it did. */
export async function waitGuestAnswers(at: { host: string; port: number }, request: string | undefined, timeoutMs: number): Promise<{ afterMs: number; reply: string | null }> {
  const t0 = performance.now();
  let last = 'no attempt';
  while (performance.now() - t0 < timeoutMs) {
    try {
      const reply = await once(at, request, Math.min(3000, timeoutMs));
      return { afterMs: Math.round(performance.now() - t0), reply };
    } catch (e) { last = (e as Error).message; }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`the guest did not answer on ${at.host}:${at.port} within ${timeoutMs} ms (last: ${last})`);
}

function once(at: { host: string; port: number }, request: string | undefined, timeoutMs: number): Promise<string | null> {
  return new Promise((resolve, reject) => {
    const s = connect(at.port, at.host);
    let buf = '';
    const done = (e: Error | null, v: string | null = null) => { clearTimeout(t); s.destroy(); if (e) reject(e); else resolve(v); };
    const t = setTimeout(() => done(new Error('no answer')), timeoutMs);
    s.once('error', (e) => done(e));
    s.once('connect', () => { if (request === undefined) done(null); else s.write(request + '\n'); });
    s.on('data', (d) => { buf += d.toString(); const i = buf.indexOf('\n'); if (i >= 0) done(null, buf.slice(0, i).trim()); });
    s.once('close', () => done(new Error('closed without a reply')));
  });
}
