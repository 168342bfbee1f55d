// Does this QEMU build have what COLO needs? Asked once at agent start by running the binary
// with no machine and reading its QMP introspection. Stock RHEL/CentOS qemu-kvm is configured
// with --disable-replication: no `replication` block driver, no x-colo-lost-heartbeat, no
// COLO proxy objects. Such a QEMU is refused with an explanation instead of failing later.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../log/logger.ts';
import { FtkvmError, errorMessage } from '../util/errors.ts';
import type { QmpClient } from '../qmp/client.ts';
import { launchQemu } from './process.ts';
import type { QemuFeatures } from './argv.ts';

export interface QemuVersion { major: number; minor: number; micro: number; package: string }

export interface ProbeResult {
  binary: string;
  version: QemuVersion;
  missing: string[];      // human-readable list of what COLO needs and this QEMU lacks
  problems: string[];     // missing things + known-bad versions
  features: QemuFeatures;
}

export class QemuNotColoCapableError extends FtkvmError {
  readonly probe: ProbeResult;
  constructor(probe: ProbeResult) {
    super('QEMU_NOT_COLO_CAPABLE', explainProbe(probe));
    this.probe = probe;
  }
}

const REQUIRED_TYPES = ['colo-compare', 'filter-mirror', 'filter-redirector', 'filter-rewriter', 'iothread'];
const REQUIRED_DRIVERS = ['quorum', 'replication', 'nbd'];
const REQUIRED_COMMANDS = ['x-colo-lost-heartbeat', 'x-blockdev-change', 'query-colo-status', 'drive-mirror', 'nbd-server-start', 'announce-self'];

type SchemaEntry = { name: string; 'meta-type': string; values?: string[]; members?: { name: string }[] };

// The upstream COLO regression: from 10.0.0 the primary completes the migration instead of
// entering COLO. Fixed by 0b5bf4ea7620 ("migration: Fix transition to COLO state from precopy")
// in 10.2.0 and backported to the 10.0.7 and 10.1.3 stable releases (qemu-stable series of
// December 2025). Every stable series that carries the bug, with the release that fixes it.
// Keep in step with roles/ftkvm_host/library/ftkvm_qemu_colo_probe.py.
export const COLO_REGRESSION_FIXED_IN: Record<string, number> = { '10.0': 7, '10.1': 3 };

/** Why this version must not run COLO, or null. */
export function coloRegression(v: Pick<QemuVersion, 'major' | 'minor' | 'micro'>): string | null {
  const fixedMicro = COLO_REGRESSION_FIXED_IN[`${v.major}.${v.minor}`];
  if (fixedMicro === undefined || v.micro >= fixedMicro) return null;
  return `QEMU ${v.major}.${v.minor}.${v.micro} has the upstream COLO regression of 10.0.0 (the primary completes the migration instead of entering COLO): `
    + `upgrade to ${v.major}.${v.minor}.${fixedMicro} or later in this series, or to 10.2.0 or later (fix 0b5bf4ea7620)`;
}

/** Pure part: decide from the introspection answers. Tests feed it stripped lists. */
export function evaluateCapabilities(input: {
  binary: string;
  version: QemuVersion;
  migrationCapabilities: string[];
  qomTypes: string[];
  schema: SchemaEntry[];
}): ProbeResult {
  const missing: string[] = [];
  if (!input.migrationCapabilities.includes('x-colo')) missing.push("migration capability 'x-colo'");
  for (const t of REQUIRED_TYPES) if (!input.qomTypes.includes(t)) missing.push(`object type '${t}'`);
  const commands = new Set(input.schema.filter((e) => e['meta-type'] === 'command').map((e) => e.name));
  for (const c of REQUIRED_COMMANDS) if (!commands.has(c)) missing.push(`QMP command '${c}'`);
  // The BlockdevDriver enum lists the block drivers compiled in ('replication' is conditional).
  const drivers = new Set(input.schema.filter((e) => e['meta-type'] === 'enum' && e.values?.includes('quorum') && e.values.includes('qcow2'))
    .flatMap((e) => e.values ?? []));
  for (const d of REQUIRED_DRIVERS) if (!drivers.has(d)) missing.push(`block driver '${d}'`);
  const problems = [...missing];
  const v = input.version;
  const broken = coloRegression(v);
  if (broken) problems.push(broken);
  const features: QemuFeatures = { reconnectMs: v.major > 9 || (v.major === 9 && v.minor >= 2) };
  return { binary: input.binary, version: v, missing, problems, features };
}

export function explainProbe(p: ProbeResult): string {
  const v = p.version;
  const lines = [`QEMU ${p.binary} (${v.major}.${v.minor}.${v.micro}${v.package ? ' ' + v.package.trim() : ''}) cannot protect VMs with COLO:`];
  if (p.missing.length) lines.push(`  missing: ${p.missing.join(', ')}`);
  for (const x of p.problems.filter((q) => !p.missing.includes(q))) lines.push(`  ${x}`);
  if (p.missing.some((m) => m.includes('replication') || m.includes('colo'))) {
    lines.push('  Stock RHEL/CentOS/Rocky/Alma qemu-kvm is built with --disable-replication and without the COLO proxy objects.',
      '  Install a COLO-capable QEMU build (the ftkvm_host role: ftkvm_qemu_repo_url / ftkvm_qemu_packages / ftkvm_qemu_binary)',
      '  and set qemu.binary in the agent configuration to it. Debian 12 qemu-system-x86 (7.2) works.');
  }
  return lines.join('\n');
}

export async function introspect(qmp: QmpClient, binary: string): Promise<Parameters<typeof evaluateCapabilities>[0]> {
  const ver = await qmp.execute<{ qemu: { major: number; minor: number; micro: number }; package: string }>('query-version');
  const caps = await qmp.execute<{ capability: string }[]>('query-migrate-capabilities');
  const types = await qmp.execute<{ name: string }[]>('qom-list-types');
  const schema = await qmp.execute<SchemaEntry[]>('query-qmp-schema', undefined, { timeoutMs: 20_000 });
  return {
    binary,
    version: { ...ver.qemu, package: ver.package ?? '' },
    migrationCapabilities: caps.map((c) => c.capability),
    qomTypes: types.map((t) => t.name),
    schema,
  };
}

/** Starts the binary with no machine, asks it over QMP, stops it. */
export async function probeQemu(binary: string, accelerator: string, env: Record<string, string>, log: Logger): Promise<ProbeResult> {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-probe-'));
  const paths = { dir, qmpSocket: join(dir, 'qmp.sock'), observerSocket: '', processRecord: join(dir, 'qemu.json'), serialLog: join(dir, 'serial.log'),
    qemuLog: join(dir, 'qemu.log'), secondaryActive: '', secondaryHidden: '' };
  let handle;
  try {
    handle = await launchQemu({
      binary, env, role: 'primary', paths, log: log.child('probe'), qmpDeadlineMs: 15_000,
      argv: ['-machine', 'none', '-accel', accelerator, '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${paths.qmpSocket},server=on,wait=off`],
    });
    const result = evaluateCapabilities(await introspect(handle.qmp, binary));
    log.info('QEMU capability probe', { binary, version: `${result.version.major}.${result.version.minor}.${result.version.micro}`, colo: result.problems.length === 0 ? 'yes' : 'no' });
    return result;
  } catch (e) {
    throw new FtkvmError('QEMU_PROBE_FAILED', `cannot probe QEMU ${binary}: ${errorMessage(e)}`, { cause: e });
  } finally {
    if (handle) {
      try { await handle.qmp.execute('quit', undefined, { timeoutMs: 2000 }); } catch { /* quitting closes the socket */ }
      await handle.killAndWait(3000);
    }
    rmSync(dir, { recursive: true, force: true });
  }
}
