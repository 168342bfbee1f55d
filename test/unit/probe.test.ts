import test from 'ava';
import { evaluateCapabilities, explainProbe, probeQemu, QemuNotColoCapableError } from '../../agent/src/qemu/probe.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';
import { join } from 'node:path';
import { ROOT } from '../../lab/guest.ts';

const FULL = {
  binary: '/usr/bin/qemu-system-x86_64',
  version: { major: 7, minor: 2, micro: 22, package: 'Debian 1:7.2+dfsg-7+deb12u18' },
  migrationCapabilities: ['x-colo', 'xbzrle'],
  qomTypes: ['colo-compare', 'filter-mirror', 'filter-redirector', 'filter-rewriter', 'iothread'],
  schema: [
    ...['x-colo-lost-heartbeat', 'x-blockdev-change', 'query-colo-status', 'drive-mirror', 'nbd-server-start', 'announce-self'].map((name) => ({ name, 'meta-type': 'command' })),
    { name: 'BlockdevDriver', 'meta-type': 'enum', values: ['nbd', 'qcow2', 'quorum', 'raw', 'replication'] },
  ],
};

test('a COLO-capable QEMU passes; 7.2 uses the old reconnect= spelling', (t) => {
  const r = evaluateCapabilities(FULL);
  t.deepEqual(r.problems, []);
  t.false(r.features.reconnectMs);
  t.true(evaluateCapabilities({ ...FULL, version: { major: 9, minor: 2, micro: 0, package: '' } }).features.reconnectMs);
});

test('a QEMU built with --disable-replication is refused with every missing piece named', (t) => {
  const r = evaluateCapabilities({
    ...FULL,
    schema: [...FULL.schema.filter((e) => e.name !== 'x-colo-lost-heartbeat' && e.name !== 'BlockdevDriver'),
      { name: 'BlockdevDriver', 'meta-type': 'enum', values: ['nbd', 'qcow2', 'quorum', 'raw'] }],
    qomTypes: FULL.qomTypes.filter((x) => x !== 'colo-compare'),
  });
  t.deepEqual(r.missing, ["object type 'colo-compare'", "QMP command 'x-colo-lost-heartbeat'", "block driver 'replication'"]);
  const msg = explainProbe(r);
  t.regex(msg, /cannot protect VMs with COLO/);
  t.regex(msg, /missing: object type 'colo-compare', QMP command 'x-colo-lost-heartbeat', block driver 'replication'/);
  t.regex(msg, /Stock RHEL\/CentOS\/Rocky\/Alma qemu-kvm is built with --disable-replication/);
  t.regex(msg, /ftkvm_qemu_repo_url/);
});

test('missing x-colo capability is named', (t) => {
  t.deepEqual(evaluateCapabilities({ ...FULL, migrationCapabilities: ['xbzrle'] }).missing, ["migration capability 'x-colo'"]);
});

test('the QEMU releases with the upstream COLO regression are refused, naming the fix release; the fixed ones are accepted', (t) => {
  const at = (minor: number, micro: number) => evaluateCapabilities({ ...FULL, version: { major: 10, minor, micro, package: '' } }).problems;
  for (const micro of [0, 2, 6]) {
    const p = at(0, micro);
    t.is(p.length, 1, `10.0.${micro}`);
    t.regex(p[0]!, new RegExp(`QEMU 10\\.0\\.${micro} has the upstream COLO regression.*upgrade to 10\\.0\\.7 or later in this series, or to 10\\.2\\.0`));
  }
  for (const micro of [0, 1, 2]) t.regex(at(1, micro)[0] ?? '', /upgrade to 10\.1\.3 or later/, `10.1.${micro}`);
  for (const [minor, micro] of [[0, 7], [0, 13], [1, 3], [2, 0], [2, 5]] as const) t.deepEqual(at(minor, micro), [], `10.${minor}.${micro}`);
  t.deepEqual(evaluateCapabilities({ ...FULL, version: { major: 9, minor: 2, micro: 0, package: '' } }).problems, []);
  t.deepEqual(evaluateCapabilities({ ...FULL, version: { major: 11, minor: 0, micro: 0, package: '' } }).problems, []);
});

test('probing a real process: a QEMU without COLO (stock RHEL look-alike) over real QMP', async (t) => {
  const r = await probeQemu(join(ROOT, 'test/fixtures/fake-qemu-no-colo.mjs'), 'kvm', {}, memoryLogger());
  t.is(r.version.major, 8);
  t.true(r.missing.includes("block driver 'replication'"));
  t.true(r.missing.includes("QMP command 'x-colo-lost-heartbeat'"));
  t.true(r.missing.includes("object type 'colo-compare'"));
  const e = new QemuNotColoCapableError(r);
  t.is(e.code, 'QEMU_NOT_COLO_CAPABLE');
  t.regex(e.message, /qemu-kvm-8\.2\.0-11\.el9_4/);
});

test('probing the real Debian QEMU: it has COLO', async (t) => {
  const r = await probeQemu('/usr/bin/qemu-system-x86_64', 'tcg', {}, memoryLogger());
  t.deepEqual(r.problems, []);
  t.is(r.version.major, 7);
});

test('probing a binary that is not QEMU fails with a clear error', async (t) => {
  await t.throwsAsync(probeQemu('/bin/true', 'tcg', {}, memoryLogger()), { message: /cannot probe QEMU \/bin\/true: .*QMP socket/ });
});
