// The time of the last drill per VM and result survives an agent restart: the registry restores
// it from the reports earlier runs saved (the FtkvmDrillOverdue alert depends on it).
import test from 'ava';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Metrics } from '../../agent/src/api/metrics.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';
import { OperationRegistry, type OperationDeps } from '../../agent/src/ops/operations.ts';

test('the last drill times per VM and result are restored from the saved reports; unreadable ones are named in a warning', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-drills-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, 'drills'));
  const report = (id: string, vm: string, verdict: string, finishedAt: number, kind = 'drill') =>
    writeFileSync(join(dir, 'drills', `${id}.json`), JSON.stringify({ id, kind, vm, verdict, finishedAt }));
  report('a', 'web1', 'pass', 1_700_000_000_000);
  report('b', 'web1', 'pass', 1_700_600_000_000); // the newest pass of web1
  report('c', 'web1', 'fail', 1_700_300_000_000);
  report('d', 'db1', 'pass', 1_699_000_000_000);
  report('e', 'db1', 'pass', 1_800_000_000_000, 'switchover'); // not a drill
  writeFileSync(join(dir, 'drills', 'torn.json'), '{"id": "x", "kind": "dri');
  const metrics = new Metrics();
  const log = memoryLogger();
  new OperationRegistry({ config: { state_dir: dir } as OperationDeps['config'], log, metrics, now: () => Date.now() } as unknown as OperationDeps);
  const text = await metrics.text();
  t.regex(text, /ftkvm_drill_last_timestamp_seconds\{vm="web1",result="pass"\} 1700600000\n/);
  t.regex(text, /ftkvm_drill_last_timestamp_seconds\{vm="web1",result="fail"\} 1700300000\n/);
  t.regex(text, /ftkvm_drill_last_timestamp_seconds\{vm="db1",result="pass"\} 1699000000\n/);
  t.is(log.records.filter((r) => /saved drill reports could not be read/.test(r.msg)).length, 1);
  // A drill run now is newer: it replaces the restored time; an older one never does.
  metrics.drill('web1', 'pass', 800, 1_701_000_000_000);
  metrics.drillSeen('web1', 'pass', 1_600_000_000_000);
  t.regex(await metrics.text(), /ftkvm_drill_last_timestamp_seconds\{vm="web1",result="pass"\} 1701000000\n/);
});

test('no drills directory yet: nothing restored, nothing logged', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-drills-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const metrics = new Metrics();
  const log = memoryLogger();
  new OperationRegistry({ config: { state_dir: dir } as OperationDeps['config'], log, metrics, now: () => Date.now() } as unknown as OperationDeps);
  t.notRegex(await metrics.text(), /ftkvm_drill_last_timestamp_seconds\{/);
  t.deepEqual(log.records.filter((r) => r.level === 'warn'), []);
});
