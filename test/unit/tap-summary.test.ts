// scripts/tap-summary.mjs: the last line CI reads, and a failure's reason kept next to its title.
import test from 'ava';
import { spawnSync } from 'node:child_process';

const summarize = (input: string, runs = 1) => {
  const r = spawnSync(process.execPath, ['scripts/tap-summary.mjs', String(runs)], { input, encoding: 'utf8' });
  return { lines: r.stdout.trimEnd().split('\n'), code: r.status };
};

const failing = [
  'TAP version 13',
  'not ok 1 - drill › drills pass',
  '#   ---- agent A log (last 60 lines)',
  '#   a long log line',
  '  ---',
  '    name: AssertionError',
  '    message: |-',
  '      drill 1 verdict',
  '      more',
  '  ...',
  'ok 2 - another # SKIP not here',
  'ok 3 - third',
  '',
  '1..3',
].join('\n');

test('a failure\'s YAML block comes right under its "not ok" line, logs after it; recap and counts last', (t) => {
  const { lines, code } = summarize(failing);
  const i = lines.indexOf('not ok 1 - drill › drills pass');
  t.is(lines[i + 1], '  ---');
  t.is(lines[i + 3], '    message: |-');
  t.is(lines[i + 7], '#   ---- agent A log (last 60 lines)');
  t.is(lines.at(-2), '#   drill › drills pass: drill 1 verdict');
  t.is(lines.at(-1), '1 passed, 1 failed, 1 skipped');
  t.is(code, 1);
});

test('a run that never printed its plan counts as a failure', (t) => {
  const { lines, code } = summarize('TAP version 13\nok 1 - a\n', 2);
  t.is(lines.at(-1), '1 passed, 2 failed');
  t.is(code, 1);
});

test('all passing: exit 0 and no recap', (t) => {
  const { lines, code } = summarize('TAP version 13\nok 1 - a\n\n1..1\n');
  t.deepEqual(lines.slice(-2), ['1..1', '1 passed, 0 failed']);
  t.is(code, 0);
});
