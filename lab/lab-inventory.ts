// The Ansible inventory for an nspawn lab (one pair + witness, one TCG test guest): used by
// the converge test and by the local demo, so both provision exactly the same way.
import { join } from 'node:path';
import { testGuest } from './guest.ts';
import type { NspawnLab } from './nspawn.ts';

/** Test-only: QEMU under TCG needs the shim (test/tcg-shim) and the trace events it hooks. */
export const SHIM_IN_HOST = '/usr/local/lib/ftkvm-test/colo-tcg-bql-fix.so';

export interface LabVm {
  name: string;
  basePort: number;
  memoryMib?: number;
  checkpointDelayMs?: number;
  /** Drill probe: with request/counter the drill checks every transaction across the failover. */
  probe?: { request?: string; counter?: boolean };
}

export function writeLabInventory(lab: NspawnLab, o: { agentBinary: string; vm: LabVm; logLevel?: string }): void {
  const g = testGuest();
  const hosts = `---
all:
  vars:
    ansible_user: root
    # the lab's CA and certificates (ftkvm_pki), outside the inventory directory, which is rewritten
    ftkvm_pki_dir: ${join(lab.dir, 'pki')}
  children:
    ftkvm_witness:
      hosts:
        witness:
          ansible_host: ${lab.mgmt.W}
    ftkvm_pairs:
      children:
        pair_lab:
          hosts:
            hostA:
              ansible_host: ${lab.mgmt.A}
              ftkvm_replication_address: ${lab.repl.A}
              ftkvm_guest_bridge_address: ${lab.lanBridgeAddr.A}/24
            hostB:
              ansible_host: ${lab.mgmt.B}
              ftkvm_replication_address: ${lab.repl.B}
              ftkvm_guest_bridge_address: ${lab.lanBridgeAddr.B}/24
`;
  const all = `---
ftkvm_agent_binary_src: ${o.agentBinary}
`;
  const pairs = `---
# lab: software emulation, and QEMU's COLO under TCG needs the test-only shim (tests only)
ftkvm_accelerator: tcg
ftkvm_qemu_tcg_lab_shim: ${SHIM_IN_HOST}
# nspawn hosts: only net.* sysctls are writable (the role sets only net.bridge.*)
ftkvm_sysctl_apply: true
# this kernel has no bonding driver: the pair runs over plain interfaces
ftkvm_replication_type: interface
ftkvm_replication_interface: eth1
ftkvm_replication_prefix: 24
ftkvm_replication_mtu: 9000
ftkvm_guest_bridge: br-ftkvm
ftkvm_guest_bridge_uplink: eth2
ftkvm_firewall_enabled: true
ftkvm_log_level: ${o.logLevel ?? 'debug'}
ftkvm_colo_settings:
  startup_peer_wait_ms: 3000
  resync_retry_min_ms: 1000
`;
  const v = o.vm;
  const probe = [`address: ${lab.guestIp()}`, 'port: 7000',
    ...(v.probe?.request ? [`request: ${JSON.stringify(v.probe.request)}`] : []),
    ...(v.probe?.counter ? ['counter: true'] : [])].join(', ');
  const pairLab = `---
ftkvm_vms:
  - name: ${v.name}
    memory_mib: ${v.memoryMib ?? 128}
    vcpus: 1
    disk: {size: 64M, format: qcow2}
    boot:
      kernel_src: ${g.kernel}
      initrd_src: ${g.initrd}
      append: ${g.append} ftkvm.ip=${lab.guestIp()}/24
    nic: {mac: "52:54:00:fc:${lab.i.toString(16).padStart(2, '0')}:50"}
    base_port: ${v.basePort}
    preferred_primary: hostA
    probe: {${probe}}
    checkpoint_delay_ms: ${v.checkpointDelayMs ?? 2000}
`;
  lab.writeInventory(hosts, { all, ftkvm_pairs: pairs, pair_lab: pairLab });
}
