// Loads and validates agent.yaml. Every problem is reported as `FILE:LINE:COL: FIELD: what is
// wrong`, all at once, and the agent refuses to start: nothing is half-applied.
import { accessSync, constants, readFileSync, statSync } from 'node:fs';
import { isMap, isSeq, LineCounter, parseDocument, type Document, type Node as YamlNode } from 'yaml';
import type { ZodIssue, z } from 'zod';
import { FtkvmError } from '../util/errors.ts';
import { PEER_FACING_VM_PORTS, vmPorts, VM_PORT_OFFSETS } from '../colo/ports.ts';
import { configSchema, parseHostPort, type Config, type VmConfig } from './schema.ts';

export interface ConfigProblem { path: (string | number)[]; message: string; line?: number; col?: number }

export class ConfigError extends FtkvmError {
  readonly file: string;
  readonly problems: ConfigProblem[];
  constructor(file: string, problems: ConfigProblem[]) {
    super('CONFIG_INVALID', `invalid configuration ${file}:\n` + problems.map((p) => '  ' + formatProblem(file, p)).join('\n'));
    this.file = file;
    this.problems = problems;
  }
}

export function formatPath(path: (string | number)[]): string {
  let s = '';
  for (const p of path) s += typeof p === 'number' ? `[${p}]` : (s ? '.' : '') + p;
  return s || '(top level)';
}

export function formatProblem(file: string, p: ConfigProblem): string {
  const where = p.line !== undefined ? `${file}:${p.line}:${p.col}` : file;
  return `${where}: ${formatPath(p.path)}: ${p.message}`;
}

/** Hooks for the checks that touch the filesystem (injected so unit tests can use fakes). */
export interface ConfigFs {
  exists(path: string): boolean;
  isExecutable(path: string): boolean;
  mode(path: string): number | null;
}

export const realConfigFs: ConfigFs = {
  exists: (p) => { try { statSync(p); return true; } catch { return false; } },
  isExecutable: (p) => { try { accessSync(p, constants.X_OK); return statSync(p).isFile(); } catch { return false; } },
  mode: (p) => { try { return statSync(p).mode & 0o777; } catch { return null; } },
};

export function loadConfigFile(file: string, fs: ConfigFs = realConfigFs): Config {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(file, [{ path: [], message: `cannot read: ${(e as Error).message}` }]);
  }
  return parseConfig(text, file, fs);
}

export function parseConfig(text: string, file: string, fs: ConfigFs = realConfigFs): Config {
  return parseYamlConfig(configSchema, text, file, (c) => semanticProblems(c, fs));
}

/**
 * A YAML configuration checked against a zod schema, every problem at once with its line
 * (agent.yaml, dr-target.yaml): ConfigError otherwise, nothing half-applied.
 */
export function parseYamlConfig<S extends z.ZodTypeAny>(schema: S, text: string, file: string, semantic: (c: z.output<S>) => ConfigProblem[] = () => []): z.output<S> {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, uniqueKeys: true, prettyErrors: false });
  if (doc.errors.length > 0) {
    throw new ConfigError(file, doc.errors.map((e) => {
      const pos = lc.linePos(e.pos[0]);
      return { path: [], message: `YAML syntax: ${e.message.split('\n')[0]}`, line: pos.line, col: pos.col };
    }));
  }
  const raw = doc.toJS() ?? {};
  const parsed = schema.safeParse(raw);
  const locate = (path: (string | number)[], key?: string): Pick<ConfigProblem, 'line' | 'col'> => {
    const node = findNode(doc, path, key);
    if (!node?.range) return {};
    const pos = lc.linePos(node.range[0]);
    return { line: pos.line, col: pos.col };
  };
  if (!parsed.success) {
    const problems = parsed.error.issues.flatMap((i) => zodIssueToProblems(i, raw));
    throw new ConfigError(file, problems.map((p) => ({ ...p, ...locate(p.path, p.unknownKey) })).map(stripKey));
  }
  const problems = semantic(parsed.data);
  if (problems.length > 0) throw new ConfigError(file, problems.map((p) => ({ ...p, ...locate(p.path) })));
  return parsed.data;
}

type ProblemWithKey = ConfigProblem & { unknownKey?: string };
const stripKey = ({ unknownKey: _k, ...p }: ProblemWithKey): ConfigProblem => p;

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a mapping';
  if (typeof v === 'string') return `"${v}"`;
  return `${typeof v} ${String(v)}`;
}

const EXPECTED: Record<string, string> = {
  number: 'a number', integer: 'an integer', string: 'a string', boolean: 'true or false',
  object: 'a mapping', array: 'a list',
};

function valueAt(root: unknown, path: (string | number)[]): unknown {
  let v: unknown = root;
  for (const p of path) v = v && typeof v === 'object' ? (v as Record<string | number, unknown>)[p] : undefined;
  return v;
}

function zodIssueToProblems(i: ZodIssue, raw: unknown): ProblemWithKey[] {
  const path = i.path;
  switch (i.code) {
    case 'unrecognized_keys':
      return i.keys.map((k) => ({ path: [...path, k], unknownKey: k, message: 'unknown key (typo? see the configuration reference in the README)' }));
    case 'invalid_type':
      if (i.received === 'undefined') return [{ path, message: 'required field is missing' }];
      return [{ path, message: `expected ${EXPECTED[i.expected] ?? i.expected}, got ${describe(valueAt(raw, path))}` }];
    case 'invalid_enum_value':
      return [{ path, message: `expected one of ${i.options.map((o) => String(o)).join(' | ')}, got ${describe(i.received)}` }];
    case 'too_small':
      if (i.type === 'array') return [{ path, message: i.message.startsWith('Array') ? `needs at least ${i.minimum} entries` : i.message }];
      if (i.type === 'string') return [{ path, message: 'must not be empty' }];
      return [{ path, message: `must be at least ${i.minimum}, got ${describe(valueAt(raw, path))}` }];
    case 'too_big':
      return [{ path, message: `must be at most ${i.maximum}, got ${describe(valueAt(raw, path))}` }];
    case 'invalid_string':
      if (i.validation === 'url') return [{ path, message: `not a URL: ${describe(valueAt(raw, path))}` }];
      return [{ path, message: `${i.message}, got ${describe(valueAt(raw, path))}` }];
    default:
      return [{ path, message: i.message }];
  }
}

function findNode(doc: Document, path: (string | number)[], key?: string): YamlNode | undefined {
  // Walk as far as the path exists; point at the deepest existing node (or the offending key).
  let node: unknown = doc.contents;
  const walk = key !== undefined ? path.slice(0, -1) : path;
  for (const p of walk) {
    if (isMap(node)) {
      const pair = node.items.find((it) => (it.key as { value?: unknown })?.value === p);
      if (!pair) return node as YamlNode;
      node = pair.value ?? pair.key;
    } else if (isSeq(node) && typeof p === 'number') {
      const item = node.items[p];
      if (!item) return node as YamlNode;
      node = item;
    } else {
      return node as YamlNode;
    }
  }
  if (key !== undefined && isMap(node)) {
    const pair = node.items.find((it) => (it.key as { value?: unknown })?.value === key);
    if (pair?.key) return pair.key as YamlNode;
  }
  return node as YamlNode;
}

/** Checks that need the whole config or the filesystem. */
export function semanticProblems(c: Config, fs: ConfigFs): ConfigProblem[] {
  const out: ConfigProblem[] = [];
  const add = (path: (string | number)[], message: string) => out.push({ path, message });

  if (c.node.name === c.peer.name) add(['peer', 'name'], `must differ from node.name ("${c.node.name}")`);
  const seenAddr = new Map<string, number>();
  c.peer.addresses.forEach((a, i) => {
    if (seenAddr.has(a)) add(['peer', 'addresses', i], `duplicate address ${a} (also entry ${seenAddr.get(a)}): each heartbeat path needs its own address`);
    seenAddr.set(a, i);
  });
  if (c.heartbeat.timeout_ms < 3 * c.heartbeat.interval_ms) {
    add(['heartbeat', 'timeout_ms'], `must be at least 3 × heartbeat.interval_ms (${3 * c.heartbeat.interval_ms}) so one lost datagram is not a dead peer`);
  }
  if (c.colo.resync_retry_max_ms < c.colo.resync_retry_min_ms) add(['colo', 'resync_retry_max_ms'], 'must be >= colo.resync_retry_min_ms');
  if (c.witness.url && c.witness.two_node_mode) add(['witness', 'two_node_mode'], 'cannot be true together with witness.url: choose one');
  if (c.witness.etcd && (c.witness.url || c.witness.two_node_mode)) add(['witness', 'etcd'], 'cannot be set together with witness.url or two_node_mode: choose one lease store');
  if (!c.witness.url && !c.witness.etcd && !c.witness.two_node_mode) {
    add(['witness'], 'set witness.url (recommended) or witness.etcd, or, explicitly, witness.two_node_mode: true (no split-brain protection when the hosts are partitioned)');
  }
  const etcd = c.witness.etcd;
  if (etcd) {
    if (c.witness.lease_ms % 1000 !== 0 || c.witness.lease_ms < 2000) {
      add(['witness', 'lease_ms'], `with witness.etcd must be whole seconds and at least 2000 (etcd leases count in seconds; got ${c.witness.lease_ms})`);
    }
    if (etcd.password_file && !etcd.user) add(['witness', 'etcd', 'password_file'], 'only used with witness.etcd.user');
    if (etcd.user && !etcd.password_file) add(['witness', 'etcd', 'user'], 'needs witness.etcd.password_file');
    if (etcd.key_file && !etcd.cert_file) add(['witness', 'etcd', 'key_file'], 'only used with witness.etcd.cert_file');
    if (etcd.cert_file && !etcd.key_file) add(['witness', 'etcd', 'cert_file'], 'needs witness.etcd.key_file');
  }

  // Files
  if (!fs.isExecutable(c.qemu.binary)) add(['qemu', 'binary'], `not an executable file: ${c.qemu.binary}`);
  if (!fs.isExecutable(c.qemu.img_binary)) add(['qemu', 'img_binary'], `not an executable file: ${c.qemu.img_binary}`);
  const secret = (path: (string | number)[], file: string) => {
    const mode = fs.mode(file);
    if (mode === null) add(path, `file not found: ${file}`);
    else if ((mode & 0o077) !== 0) add(path, `${file} is readable by others (mode ${mode.toString(8)}); run: chmod 600 ${file}`);
  };
  secret(['api', 'token_file'], c.api.token_file);
  if (c.heartbeat.key_file) secret(['heartbeat', 'key_file'], c.heartbeat.key_file);
  if (c.heartbeat.previous_key_file) {
    if (!c.heartbeat.key_file) add(['heartbeat', 'previous_key_file'], 'only used with heartbeat.key_file (the key that replaces it)');
    else secret(['heartbeat', 'previous_key_file'], c.heartbeat.previous_key_file);
  }
  if (c.witness.token_file) {
    if (!c.witness.url) add(['witness', 'token_file'], 'only used with witness.url');
    else secret(['witness', 'token_file'], c.witness.token_file);
  }
  if (c.witness.ca_file) {
    if (!c.witness.url?.startsWith('https://')) add(['witness', 'ca_file'], 'only used with an https:// witness.url');
    else if (!fs.exists(c.witness.ca_file)) add(['witness', 'ca_file'], `file not found: ${c.witness.ca_file}`);
  }
  if (etcd?.password_file && etcd.user) secret(['witness', 'etcd', 'password_file'], etcd.password_file);
  if (etcd?.key_file && etcd.cert_file) secret(['witness', 'etcd', 'key_file'], etcd.key_file);
  for (const k of ['ca_file', 'cert_file'] as const) {
    const f = etcd?.[k];
    if (f && !fs.exists(f)) add(['witness', 'etcd', k], `file not found: ${f}`);
  }
  if (c.api.tls) {
    for (const k of ['cert_file', 'key_file', 'ca_file'] as const) {
      const f = c.api.tls[k];
      if (f && !fs.exists(f)) add(['api', 'tls', k], `file not found: ${f}`);
    }
  }

  // Ports: API (TCP), heartbeat (UDP) and every VM's COLO ports must not collide.
  const api = parseHostPort(c.api.listen)!;
  const owners = new Map<number, string>();
  owners.set(api.port, 'api.listen');
  c.vms.forEach((vm, i) => {
    const ports = vmPorts(vm.base_port);
    for (const [name, p] of Object.entries(ports)) {
      const other = owners.get(p);
      if (other) add(['vms', i, 'base_port'], `port ${p} (${name} = base_port+${VM_PORT_OFFSETS[name as keyof typeof VM_PORT_OFFSETS]}) clashes with ${other}`);
      else owners.set(p, `vms[${i}] (${vm.name}) ${name} port`);
    }
    if (ports.migration === c.heartbeat.port || PEER_FACING_VM_PORTS.some((n) => ports[n] === c.heartbeat.port)) {
      add(['vms', i, 'base_port'], `a COLO port of this VM equals heartbeat.port ${c.heartbeat.port}`);
    }
  });

  // VMs
  const names = new Map<string, number>(), macs = new Map<string, number>(), taps = new Map<string, number>();
  c.vms.forEach((vm, i) => {
    const dup = (m: Map<string, number>, v: string, field: (string | number)[], what: string) => {
      if (m.has(v)) add(['vms', i, ...field], `duplicate ${what} "${v}" (also vms[${m.get(v)}])`);
      else m.set(v, i);
    };
    dup(names, vm.name, ['name'], 'VM name');
    dup(macs, vm.nic.mac, ['nic', 'mac'], 'MAC address');
    dup(taps, tapName(vm), ['nic', 'tap'], 'tap device');
    if (vm.preferred_primary !== c.node.name && vm.preferred_primary !== c.peer.name) {
      add(['vms', i, 'preferred_primary'], `must be "${c.node.name}" or "${c.peer.name}", got "${vm.preferred_primary}"`);
    }
    if (!fs.exists(vm.disk.path)) add(['vms', i, 'disk', 'path'], `image file not found: ${vm.disk.path}`);
    if ('kernel' in vm.boot) {
      if (!fs.exists(vm.boot.kernel)) add(['vms', i, 'boot', 'kernel'], `file not found: ${vm.boot.kernel}`);
      if (vm.boot.initrd && !fs.exists(vm.boot.initrd)) add(['vms', i, 'boot', 'initrd'], `file not found: ${vm.boot.initrd}`);
    }
  });
  return out;
}

/** The tap device name of a VM: nic.tap, or "ftk-" + the name cut to Linux's 15 characters. */
export function tapName(vm: VmConfig): string {
  return vm.nic.tap ?? `ftk-${vm.name}`.slice(0, 15);
}

export function checkpointDelay(c: Config, vm: VmConfig): number {
  return vm.checkpoint_delay_ms ?? c.colo.checkpoint_delay_ms;
}

/** A protected primary with no checkpoint for this long has a stuck or sick secondary. */
export function checkpointStallMs(c: Config, vm: VmConfig): number {
  return c.colo.checkpoint_stall_ms ?? Math.max(4 * checkpointDelay(c, vm), 10_000);
}

export function peerApiPort(c: Config): number {
  return c.peer.api_port ?? parseHostPort(c.api.listen)!.port;
}

export function peerHeartbeatPort(c: Config): number {
  return c.peer.heartbeat_port ?? c.heartbeat.port;
}
