#!/usr/bin/env node
// Test-only stand-in for stock RHEL 9 qemu-kvm over QMP on stdio (-qmp stdio): built with
// --disable-replication and without the COLO proxy objects. Answers what the ftkvm_host role's
// COLO check asks (roles/ftkvm_host/library/ftkvm_qemu_colo_probe.py).
import { createInterface } from 'node:readline';

const answers = {
  'query-version': { qemu: { major: 8, minor: 2, micro: 0 }, package: 'qemu-kvm-8.2.0-11.el9_4' },
  'query-migrate-capabilities': ['xbzrle', 'x-colo', 'postcopy-ram'].map((capability) => ({ capability, state: false })),
  'qom-list-types': ['filter-mirror', 'filter-redirector', 'iothread', 'virtio-net-pci'].map((name) => ({ name })),
  'query-qmp-schema': [
    ...['query-version', 'drive-mirror', 'nbd-server-start', 'announce-self', 'x-blockdev-change', 'query-colo-status'].map((name) => ({ name, 'meta-type': 'command' })),
    { name: 'BlockdevDriver', 'meta-type': 'enum', values: ['file', 'nbd', 'qcow2', 'quorum', 'raw'] },
  ],
};
const out = (o) => process.stdout.write(JSON.stringify(o) + '\r\n');
out({ QMP: { version: { qemu: { major: 8, minor: 2, micro: 0 }, package: '' }, capabilities: [] } });
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  if (cmd.execute === 'quit') { out({ return: {}, id: cmd.id }); process.exit(0); }
  out({ return: answers[cmd.execute] ?? {}, id: cmd.id });
}
