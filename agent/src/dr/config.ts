// The DR target's configuration (/etc/ftkvm/dr-target.yaml): `ftkvm-agent dr-target` on a host
// of the DR site keeps the recovery points of the VMs shipped to it and boots them there (a
// test copy, isolated, or the VM itself after the loss of the primary site).
import { z } from 'zod';
import { absPath, hostPort, ifName, ip, nodeName, vmSchema } from '../config/schema.ts';
import { parseCidr, cidrError } from '../util/cidr.ts';
import { readFileSync } from 'node:fs';
import { ConfigError, parseYamlConfig } from '../config/load.ts';
import { DEFAULT_DR_PORT } from './protocol.ts';

const drVm = vmSchema.pick({ name: true, memory_mib: true, vcpus: true, boot: true }).extend({
  // The VM's NIC at the DR site (dr.nic): the bridge of the DR site's network and its tap name.
  nic: z.object({ bridge: ifName, mac: vmSchema.shape.nic.shape.mac, tap: ifName.optional() }).strict(),
  // What dr-test and dr-failover check: the guest answers on this TCP port (a line per request).
  probe: z.object({
    address: ip,
    port: z.number().int().min(1).max(65535),
    request: z.string().regex(/^[^\r\n]{1,200}$/).optional(),
  }).strict(),
  // The isolated test network (user-mode, no route to any real network): the guest's own
  // subnet, so its configured address works unchanged (default: probe.address's /24).
  test_network: z.string().refine((s) => parseCidr(s) !== null, (s) => ({ message: cidrError(s) })).optional(),
}).strict();

export const drTargetSchema = z.object({
  node: z.object({ name: nodeName }).strict(),
  listen: hostPort.default(`0.0.0.0:${DEFAULT_DR_PORT}`),
  token_file: absPath.default('/etc/ftkvm/dr-token'),
  tls: z.object({ cert_file: absPath, key_file: absPath }).strict().optional(),
  data_dir: absPath.default('/var/lib/ftkvm-dr'),
  qemu: z.object({
    binary: absPath.default('/usr/bin/qemu-system-x86_64'),
    img_binary: absPath.default('/usr/bin/qemu-img'),
    nbd_binary: absPath.default('/usr/bin/qemu-nbd'),
    accelerator: z.enum(['kvm', 'tcg']).default('kvm'),
    machine: z.string().regex(/^[a-z0-9.-]+$/).default('pc'),
    extra_args: z.array(z.string()).default([]),
  }).strict().default({}),
  // The witness of the protected pairs: a DR failover takes each VM's lease at a new epoch
  // and keeps renewing it while the VM runs here, so a returning primary-site host cannot run it.
  witness: z.object({
    url: z.string().url().refine((u) => /^https?:\/\//.test(u), 'must be an http:// or https:// URL'),
    token_file: absPath.optional(),
    ca_file: absPath.optional(),
    lease_ms: z.number().int().min(500).max(600_000).default(1000),
  }).strict().optional(),
  log_level: z.enum(['debug', 'info', 'warn', 'error']).default('info'),
  vms: z.array(drVm).default([]),
}).strict();

export type DrTargetConfig = z.infer<typeof drTargetSchema>;
export type DrVm = DrTargetConfig['vms'][number];

export function loadDrTargetConfig(file: string): DrTargetConfig {
  let text: string;
  try { text = readFileSync(file, 'utf8'); } catch (e) { throw new ConfigError(file, [{ path: [], message: `cannot read: ${(e as Error).message}` }]); }
  return parseYamlConfig(drTargetSchema, text, file, (c) => {
    const seen = new Set<string>();
    return c.vms.flatMap((v, i) => {
      if (seen.has(v.name)) return [{ path: ['vms', i, 'name'], message: `duplicate VM name "${v.name}"` }];
      seen.add(v.name);
      return [];
    });
  });
}
