// The Prometheus alerting rules and the Grafana dashboard (monitoring/): the real promtool checks
// the rules and runs their unit tests (monitoring/ftkvm-alerts.test.yml), and every metric the
// rules and the dashboard query must be one a live agent exports on GET /metrics, with the
// labels (and label values) the agent really sets.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { parse, stringify } from 'yaml';
import { Metrics } from '../../agent/src/api/metrics.ts';
import { TRANSITIONS } from '../../agent/src/colo/states.ts';
import { ROOT } from '../../lab/guest.ts';
import { startLoneAgent, type LoneAgent } from '../helpers/lone-agent.ts';

const RULES = join(ROOT, 'monitoring/ftkvm-alerts.yml');
const RULE_TESTS = join(ROOT, 'monitoring/ftkvm-alerts.test.yml');
const DASHBOARD = join(ROOT, 'monitoring/ftkvm-dashboard.json');

interface AlertRule { alert: string; expr: string; for?: string; labels?: Record<string, string>; annotations?: Record<string, string> }
const alerts = (parse(readFileSync(RULES, 'utf8')) as { groups: { name: string; rules: AlertRule[] }[] }).groups.flatMap((g) => g.rules);

interface Target { expr?: string; datasource?: { type?: string; uid?: string } }
interface Panel { id: number; type: string; title: string; datasource?: { uid?: string }; targets?: Target[]; panels?: Panel[] }
const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as {
  uid: string; title: string; panels: Panel[];
  templating: { list: { name: string; type: string; query: unknown; datasource?: { uid?: string }; multi?: boolean; includeAll?: boolean }[] };
};
const allPanels = (ps: Panel[]): Panel[] => ps.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);
const panels = allPanels(dashboard.panels).filter((p) => p.type !== 'row');
/** A Grafana variable query `label_values(SELECTOR, LABEL)` as the selector it reads. */
const variableExprs = dashboard.templating.list.filter((v) => v.type === 'query').map((v) => {
  const q = typeof v.query === 'string' ? v.query : (v.query as { query: string }).query;
  const m = /^label_values\((.+),\s*(\w+)\)$/.exec(q);
  if (!m) throw new Error(`dashboard variable ${v.name}: unexpected query ${q}`);
  return { where: `variable $${v.name}`, expr: `${m[1]}`, label: m[2]! };
});
/** Every PromQL expression shipped: alert rules, dashboard panels, dashboard variables. */
const exprs: { where: string; expr: string }[] = [
  ...alerts.map((a) => ({ where: `alert ${a.alert}`, expr: a.expr })),
  ...panels.flatMap((p) => (p.targets ?? []).map((t) => ({ where: `panel "${p.title}"`, expr: t.expr ?? '' }))),
  ...variableExprs,
];

// ---- PromQL, just enough to find metric names and label references -----------------------------

// Aggregation operators and keywords; anything else directly followed by `(` is a function.
const KEYWORDS = new Set(['sum', 'min', 'max', 'avg', 'group', 'stddev', 'stdvar', 'count', 'count_values', 'bottomk', 'topk', 'quantile',
  'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'offset', 'bool', 'and', 'or', 'unless', 'atan2', 'inf', 'nan']);
const LABEL_LIST = /\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)/g;
const STRING = /"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g;

/** The metric names in a PromQL expression: identifiers before `{` or `[` or standing alone, not functions, keywords or labels. */
function metricNames(expr: string): string[] {
  const s = expr
    .replace(STRING, '""')                 // string literals (label values, regexes)
    .replace(/\{[^}]*\}/g, '{}')            // label matchers
    .replace(/\[[^\]]*\]/g, '[]')           // ranges and subqueries, with Grafana's $__rate_interval
    .replace(LABEL_LIST, ' $1 ')            // by (...), on (...), group_left (...)
    .replace(/\$\{?\w+\}?/g, ' ');          // Grafana variables elsewhere
  const names = new Set<string>();
  for (const m of s.matchAll(/(\d[\w.]*)|([A-Za-z_:][\w:]*)(\s*\()?/g)) {
    if (m[1] || m[3] || KEYWORDS.has(m[2]!)) continue; // a number or duration; a function call; a keyword
    names.add(m[2]!);
  }
  return [...names].sort();
}

/** Selectors `name{label op "value", ...}` and the labels named in by/on/... lists. */
function labelRefs(expr: string): { selectors: { metric: string; matchers: { label: string; op: string; value: string }[] }[]; listed: string[] } {
  const selectors = [...expr.matchAll(/([A-Za-z_:][\w:]*)\s*\{([^}]*)\}/g)].map((m) => ({
    metric: m[1]!,
    matchers: [...m[2]!.matchAll(/(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"/g)].map((x) => ({ label: x[1]!, op: x[2]!, value: x[3]! })),
  }));
  const listed = [...expr.replace(STRING, '""').matchAll(LABEL_LIST)].flatMap((m) => m[2]!.split(',').map((l) => l.trim()).filter(Boolean));
  return { selectors, listed };
}

/** Metric families of an exposition text: name -> type (from `# TYPE`), and the label names of its samples. */
function families(text: string): { types: Map<string, string>; labels: Map<string, Set<string>> } {
  const types = new Map<string, string>();
  const labels = new Map<string, Set<string>>();
  for (const line of text.split('\n')) {
    const t = /^# TYPE (\S+) (\S+)$/.exec(line);
    if (t) { types.set(t[1]!, t[2]!); continue; }
    const s = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})? \S+$/.exec(line);
    if (!s) continue;
    const set = labels.get(s[1]!) ?? new Set<string>();
    for (const l of (s[2] ?? '').matchAll(/(\w+)="/g)) set.add(l[1]!);
    labels.set(s[1]!, set);
  }
  return { types, labels };
}

/** The series names a scrape of these families yields (a histogram is _bucket, _sum and _count). */
function seriesNames(types: Map<string, string>): Set<string> {
  const out = new Set<string>();
  for (const [name, type] of types) {
    if (type === 'histogram') for (const suffix of ['_bucket', '_sum', '_count']) out.add(name + suffix);
    else if (type === 'summary') for (const suffix of ['', '_sum', '_count']) out.add(name + suffix);
    else out.add(name);
  }
  return out;
}

// Not exported by the agent: Prometheus makes it for every target.
const PROMETHEUS_SERIES = new Set(['up']);
const TARGET_LABELS = ['instance', 'job'];

function missingNames(exported: Set<string>): string[] {
  return exprs.flatMap(({ where, expr }) => metricNames(expr).filter((n) => !exported.has(n) && !PROMETHEUS_SERIES.has(n)).map((n) => `${where}: ${n}`));
}

function promtool(args: string[]): { status: number | null; out: string } {
  const r = spawnSync('promtool', args, { cwd: ROOT, encoding: 'utf8', timeout: 120_000 });
  if (r.error) return { status: null, out: `promtool: ${r.error.message} (Debian package prometheus; scripts/install-deps installs it)` };
  return { status: r.status, out: `${r.stdout}\n${r.stderr}` };
}

// ---- the live agent ---------------------------------------------------------------------------

let agent: LoneAgent | undefined;
/** What a live agent (dist/ftkvm-agent, one stopped VM, no peer) serves on GET /metrics. */
let live: ReturnType<typeof families>;
/** The same families from the real metrics module with every metric set once: all label names. */
let filled: ReturnType<typeof families>;
test.before(async () => {
  filled = families(await filledRegistry().text());
  agent = await startLoneAgent({ vms: true });
  const r = await request(`${agent.base}/metrics`);
  if (r.statusCode !== 200) throw new Error(`GET /metrics: ${r.statusCode}`);
  live = families(await r.body.text());
});
test.after.always(async () => {
  await agent?.stop();
  if (agent) rmSync(agent.dir, { recursive: true, force: true });
});

function filledRegistry(): Metrics {
  const m = new Metrics();
  m.setSnapshot(() => ({
    peerUp: true, heartbeatRejected: 1, heartbeatStale: 1, witnessUp: true,
    paths: [{ index: 0, address: '10.0.0.2', up: true, rttMs: 0.3 }],
    vms: [{ name: 'web1', state: 'syncing', protected: false, epoch: 3, resyncRemaining: 1_000_000, resyncMode: 'checksum', resyncPlanned: 2_000_000, drRpoS: 30, drRpoTargetS: 660 }],
  }));
  m.checkpoint('web1', 40);
  m.failover('web1', 'primary-lost');
  m.resync('web1', 4096);
  m.drill('web1', 'pass', 300, Date.now());
  m.drShipped('web1', 'delta', 65536);
  m.drFailed('web1');
  return m;
}

// ---- the rules --------------------------------------------------------------------------------

test('promtool check rules: the rule file is valid', (t) => {
  const r = promtool(['check', 'rules', RULES]);
  t.is(r.status, 0, r.out);
  t.regex(r.out, new RegExp(`SUCCESS: ${alerts.length} rules found`), r.out);
});

test('promtool test rules: every alert fires and stays quiet where it should', (t) => {
  const r = promtool(['test', 'rules', RULE_TESTS]);
  t.is(r.status, 0, r.out);
  t.regex(r.out, /SUCCESS/, r.out);
  t.notRegex(r.out, /FAILED/, r.out);
});

test('the rule tests cover every alert both firing and not firing', (t) => {
  const doc = parse(readFileSync(RULE_TESTS, 'utf8')) as { rule_files: string[]; tests: { alert_rule_test?: { alertname: string; exp_alerts?: unknown[] | null }[] }[] };
  t.deepEqual(doc.rule_files, ['ftkvm-alerts.yml']);
  const cases = doc.tests.flatMap((x) => x.alert_rule_test ?? []);
  const names = new Set(alerts.map((a) => a.alert));
  t.deepEqual(cases.filter((c) => !names.has(c.alertname)).map((c) => c.alertname), [], 'tests of alerts the rule file does not have');
  for (const a of alerts) {
    t.true(cases.some((c) => c.alertname === a.alert && (c.exp_alerts?.length ?? 0) > 0), `${a.alert}: no test where it fires`);
    t.true(cases.some((c) => c.alertname === a.alert && (c.exp_alerts?.length ?? 0) === 0), `${a.alert}: no test where it does not fire`);
  }
});

test('every alert has for:, a severity, summary, description and a runbook pointing at a README anchor that exists', (t) => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  // GitHub's anchors: the heading lower-cased, punctuation dropped, spaces to hyphens.
  const anchors = new Set([...readme.matchAll(/^#{1,6} (.+)$/gm)].map((m) => m[1]!.trim().toLowerCase().replace(/[^\p{L}\p{N} _-]/gu, '').replace(/ /g, '-')));
  t.true(alerts.length >= 10);
  t.is(new Set(alerts.map((a) => a.alert)).size, alerts.length, 'alert names are unique');
  for (const a of alerts) {
    t.regex(a.alert, /^Ftkvm[A-Z]\w+$/);
    t.regex(a.for ?? '', /^\d+[smh]$/, `${a.alert}: for:`);
    t.true(['critical', 'warning', 'info'].includes(a.labels?.severity ?? ''), `${a.alert}: severity ${a.labels?.severity}`);
    for (const k of ['summary', 'description', 'runbook']) t.truthy(a.annotations?.[k], `${a.alert}: annotation ${k}`);
    const anchor = /^https:\/\/github\.com\/ftkvm\/ftkvm#([\w-]+)$/.exec(a.annotations?.runbook ?? '');
    t.truthy(anchor, `${a.alert}: runbook ${a.annotations?.runbook}`);
    t.true(anchors.has(anchor?.[1] ?? ''), `${a.alert}: README has no heading for #${anchor?.[1]}`);
    t.true(readme.includes(`\`${a.alert}\``), `${a.alert}: not described in the README`);
  }
});

// ---- metric names against a live agent ---------------------------------------------------------

test('the metric name extractor finds metric names only, and reports a misspelt one', (t) => {
  t.deepEqual(metricNames('(histogram_quantile(0.99, sum by (instance, job, vm, le) (rate(ftkvm_checkpoint_pause_seconds_bucket{vm=~"a|b"}[10m]))) > 0.5) and on (instance, job, vm) (ftkvm_vm_state{state="protected"} == 1)'),
    ['ftkvm_checkpoint_pause_seconds_bucket', 'ftkvm_vm_state']);
  t.deepEqual(metricNames('(increase(ftkvm_drills_total{result="fail"}[1h]) > 0) or (ftkvm_drills_total unless ftkvm_drills_total offset 1h)'), ['ftkvm_drills_total']);
  t.deepEqual(metricNames('count by (vm) (up{job="ftkvm"} == 1) or vector(0)'), ['up']);
  t.deepEqual(metricNames('sum by (instance, vm) (rate(ftkvm_checkpoints_total{vm=~"$vm"}[$__rate_interval])) / ignoring (le) group_left (vm) ftkvm_peer_up'), ['ftkvm_checkpoints_total', 'ftkvm_peer_up']);
  const exported = seriesNames(live.types);
  t.true(exported.has('ftkvm_checkpoints_total') && exported.has('ftkvm_checkpoint_pause_seconds_bucket'));
  // A typo is caught: singular "checkpoint", and a histogram's base name is not a series.
  for (const typo of ['rate(ftkvm_checkpoint_total[5m])', 'ftkvm_checkpoint_pause_seconds{vm="x"}', 'ftkvm_vm_protect == 0']) {
    t.is(metricNames(typo).filter((n) => !exported.has(n)).length, 1, typo);
  }
});

test('every metric in the alert rules and the dashboard is exported by a live agent', (t) => {
  t.true(live.types.size >= 17, `only ${live.types.size} metric families on /metrics`);
  const used = new Set(exprs.flatMap((e) => metricNames(e.expr)));
  t.deepEqual(missingNames(seriesNames(live.types)), [], 'metrics the agent does not export');
  // Sanity: the extractor saw the rules' and the dashboard's metrics.
  for (const n of ['up', 'ftkvm_vm_protected', 'ftkvm_vm_state', 'ftkvm_peer_up', 'ftkvm_heartbeat_path_up', 'ftkvm_witness_up', 'ftkvm_checkpoints_total',
    'ftkvm_checkpoint_pause_seconds_bucket', 'ftkvm_resync_remaining_bytes', 'ftkvm_resync_bytes_total', 'ftkvm_drills_total', 'ftkvm_failovers_total']) {
    t.true(used.has(n), `${n} not found in any expression`);
  }
});

test('every label and label value the rules and the dashboard match on is one the agent sets', (t) => {
  // The module is the one the live agent runs (dist/ftkvm-agent built from this source).
  t.deepEqual([...filled.types].sort(), [...live.types].sort(), 'the live agent and agent/src/api/metrics.ts export different metrics: rebuild (npm run build)');
  const labelsOf = (series: string): Set<string> | undefined => filled.labels.get(series);
  for (const name of seriesNames(filled.types)) t.truthy(labelsOf(name), `${name}: filledRegistry() must set it once`);
  // Label values the agent produces, from its source.
  const src = readFileSync(join(ROOT, 'agent/src/api/metrics.ts'), 'utf8');
  const reasons = [.../type FailoverReason =([^;]+);/.exec(src)?.[1]?.matchAll(/'([\w-]+)'/g) ?? []].map((x) => x[1]!);
  const results = [.../result: ('[\w-]+'(?: \| '[\w-]+')*)/.exec(src)?.[1]?.matchAll(/'([\w-]+)'/g) ?? []].map((x) => x[1]!);
  t.true(reasons.includes('primary-lost') && results.includes('fail'), 'FailoverReason and the drill results read from metrics.ts');
  const values: Record<string, string[]> = { state: Object.keys(TRANSITIONS), reason: reasons, result: results, job: ['ftkvm'] };
  const problems: string[] = [];
  for (const { where, expr } of exprs) {
    const { selectors, listed } = labelRefs(expr);
    const known = new Set(TARGET_LABELS);
    for (const n of metricNames(expr)) for (const l of labelsOf(n) ?? []) known.add(l);
    for (const s of selectors) {
      const own = s.metric === 'up' ? new Set(TARGET_LABELS) : new Set([...(labelsOf(s.metric) ?? []), ...TARGET_LABELS]);
      for (const mt of s.matchers) {
        if (!own.has(mt.label)) problems.push(`${where}: ${s.metric} has no label ${mt.label}`);
        const allowed = values[mt.label];
        if (!allowed || mt.value.includes('$')) continue;
        const literals = mt.op.endsWith('~') ? (/^[\w-]+(\|[\w-]+)*$/.test(mt.value) ? mt.value.split('|') : []) : [mt.value];
        for (const v of literals) if (!allowed.includes(v)) problems.push(`${where}: ${mt.label}="${v}" is not a value the agent sets (${allowed.join(', ')})`);
      }
    }
    for (const l of listed) if (!known.has(l)) problems.push(`${where}: label ${l} in by/on(...) is on none of its metrics`);
  }
  for (const v of variableExprs) if (!labelsOf(metricNames(v.expr)[0]!)?.has(v.label)) problems.push(`${v.where}: no label ${v.label}`);
  t.deepEqual(problems, []);
});

// ---- the dashboard ----------------------------------------------------------------------------

test('dashboard: Prometheus through ${DS_PROMETHEUS}, a $vm variable, the panels operators need', (t) => {
  t.is(dashboard.uid, 'ftkvm-overview');
  const ds = dashboard.templating.list.find((v) => v.name === 'DS_PROMETHEUS');
  t.is(ds?.type, 'datasource');
  t.is(ds?.query, 'prometheus');
  const vm = dashboard.templating.list.find((v) => v.name === 'vm');
  t.truthy(vm?.multi && vm.includeAll, '$vm: multi-value with All');
  t.is(vm?.datasource?.uid, '${DS_PROMETHEUS}');
  t.is(new Set(allPanels(dashboard.panels).map((p) => p.id)).size, allPanels(dashboard.panels).length, 'panel ids are unique');
  for (const p of panels) {
    t.is(p.datasource?.uid, '${DS_PROMETHEUS}', `panel "${p.title}"`);
    t.true((p.targets ?? []).length > 0, `panel "${p.title}" has no query`);
    for (const q of p.targets ?? []) {
      t.is(q.datasource?.uid, '${DS_PROMETHEUS}', `panel "${p.title}"`);
      // A panel about VMs follows the $vm selection.
      if (metricNames(q.expr ?? '').some((n) => filled.labels.get(n)?.has('vm'))) t.regex(q.expr ?? '', /vm=~"\$vm"/, `panel "${p.title}": ${q.expr}`);
    }
  }
  const all = panels.map((p) => `${p.title} ${(p.targets ?? []).map((q) => q.expr).join(' ')}`).join('\n');
  for (const [what, re] of [
    ['protection state per VM', /ftkvm_vm_protected/], ['VM state', /ftkvm_vm_state/], ['checkpoint rate', /rate\(ftkvm_checkpoints_total/],
    ['checkpoint pause quantile', /histogram_quantile\(0\.99, .*ftkvm_checkpoint_pause_seconds_bucket/], ['resync progress', /ftkvm_resync_remaining_bytes/],
    ['failovers', /ftkvm_failovers_total/], ['drills', /ftkvm_drills_total/], ['drill failover time', /ftkvm_drill_last_failover_seconds/],
    ['peer reachability', /ftkvm_peer_up/], ['heartbeat paths', /ftkvm_heartbeat_path_up/], ['witness reachability', /ftkvm_witness_up/], ['agents scraped', /up\{job="ftkvm"\}/],
  ] as const) t.regex(all, re, `no panel shows ${what}`);
});

test('dashboard: every query is valid PromQL (promtool, with Grafana\'s variables filled in)', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-dash-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fill = (e: string) => e.replace(/\$__rate_interval|\$__interval|\$__range/g, '5m').replace(/\$\{?vm\}?/g, '.*');
  const rules = exprs.filter((e) => e.where.startsWith('panel') || e.where.startsWith('variable')).map((e, i) => ({ record: `dashboard:query_${i}`, expr: fill(e.expr) }));
  const file = join(dir, 'dashboard-queries.yml');
  writeFileSync(file, stringify({ groups: [{ name: 'dashboard', rules }] }));
  const r = promtool(['check', 'rules', file]);
  t.is(r.status, 0, r.out);
  t.regex(r.out, new RegExp(`SUCCESS: ${rules.length} rules found`), r.out);
});
