// The firewall role opens the ports of agent/src/colo/ports.ts: one table in the code, the same
// numbers in roles/ftkvm_firewall/vars/ports.yml (and the roles' defaults). This keeps them equal.
import test from 'ava';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { DEFAULT_API_PORT, DEFAULT_HEARTBEAT_PORT, DEFAULT_WITNESS_PORT, PEER_FACING_VM_PORTS, VM_PORT_OFFSETS } from '../../agent/src/colo/ports.ts';
import { ROOT } from '../../lab/guest.ts';

const yml = (p: string) => parse(readFileSync(join(ROOT, p), 'utf8')) as Record<string, unknown>;

test('roles/ftkvm_firewall/vars/ports.yml matches agent/src/colo/ports.ts', (t) => {
  const ports = yml('roles/ftkvm_firewall/vars/ports.yml');
  t.deepEqual(ports.__ftkvm_ports_vm_offsets, { ...VM_PORT_OFFSETS });
  t.deepEqual(ports.__ftkvm_ports_vm_peer_facing, [...PEER_FACING_VM_PORTS]);
  t.is(ports.__ftkvm_ports_api, DEFAULT_API_PORT);
  t.is(ports.__ftkvm_ports_heartbeat, DEFAULT_HEARTBEAT_PORT);
  t.is(ports.__ftkvm_ports_witness, DEFAULT_WITNESS_PORT);
});

test('the roles default to the same API, heartbeat and witness ports', (t) => {
  const want: Record<string, number> = { ftkvm_api_port: DEFAULT_API_PORT, ftkvm_heartbeat_port: DEFAULT_HEARTBEAT_PORT, ftkvm_witness_port: DEFAULT_WITNESS_PORT };
  let seen = 0;
  for (const role of ['ftkvm_agent', 'ftkvm_firewall', 'ftkvm_witness']) {
    const d = yml(`roles/${role}/defaults/main.yml`);
    for (const [k, v] of Object.entries(want)) {
      if (k in d) { t.is(d[k], v, `${role}: ${k}`); seen++; }
    }
  }
  t.true(seen >= 6);
});

test("the agent role's port-clash check uses the same offsets", (t) => {
  const v = yml('roles/ftkvm_agent/vars/main.yml');
  t.deepEqual(v.__ftkvm_agent_vm_port_offsets, Object.values(VM_PORT_OFFSETS).sort((a, b) => a - b));
});
