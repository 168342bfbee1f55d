// Failover drills through the CLI and the API on a real pair: pass, failover measured,
// re-protected; forwarded from the secondary; refused while not protected; concurrency limit.
import test from 'ava';
import { withPair } from '../helpers/system.ts';
import { waitUntil } from '../../lab/pair.ts';
import type { OperationReport } from '../../agent/src/ops/operations.ts';

test('drills: pass with the guest probe kept, run from either host, refused when unprotected or over the limit', async (t) => {
  t.timeout(600_000);
  await withPair(t, 31, {
    vms: [{ name: 'web', guestIp: 10, basePort: 19000 }, { name: 'db', guestIp: 20, basePort: 19100, memoryMib: 160, preferred: 'B' }],
  }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    t.is(await p.waitProtected('web'), 'A');
    t.is(await p.waitProtected('db'), 'B');
    await p.waitGuestService('web');
    await p.waitGuestService('db');

    // 1. drill on A (primary of web), through the CLI, waiting for the report
    const r1 = await p.cli('A', ['drill', 'web', '--wait', '--json']);
    t.is(r1.code, 0, r1.stderr + r1.stdout.slice(-2000));
    const rep1 = JSON.parse(r1.stdout) as OperationReport;
    t.is(rep1.verdict, 'pass', rep1.reasons.join('; '));
    t.is(rep1.oldPrimary, 'hostA');
    t.is(rep1.newPrimary, 'hostB');
    t.true(rep1.reprotect.done);
    t.true(rep1.failover.ms! > 0);
    t.true('replies' in rep1.probe && rep1.probe.connectionKept && rep1.probe.counterOk === true, JSON.stringify(rep1.probe));
    t.is((await p.vmStatus('B', 'web'))!.state, 'protected');
    t.is((await p.vmStatus('A', 'web'))!.state, 'secondary');
    t.log(`drill 1: failover ${rep1.failover.ms} ms (takeover seen ${rep1.failover.takeoverSeenMs} ms, sequence ${rep1.failover.sequenceMs} ms), re-protected after ${rep1.reprotect.ms} ms, probe gap ${'gapMs' in rep1.probe ? rep1.probe.gapMs : '-'} ms`);

    // 2. the same VM, asked on A (now its secondary): forwarded to B; also visible from A by id
    const start = await p.api<{ id: string; node: string }>('A', 'POST', '/v1/vms/web/drill', {});
    t.is(start.status, 202);
    t.is(start.json.node, 'hostB');
    // a second drill of the same VM while it runs: 409; another VM over the limit of 1: 429
    const again = await p.api<{ error: { code: string } }>('B', 'POST', '/v1/vms/web/drill', {});
    t.is(again.status, 409);
    t.is(again.json.error.code, 'OPERATION_RUNNING');
    const other = await p.api<{ error: { code: string; message: string } }>('B', 'POST', '/v1/vms/db/drill', {});
    t.is(other.status, 429);
    t.regex(other.json.error.message, /api\.max_concurrent_drills/);
    let rep2: OperationReport;
    for (;;) {
      rep2 = (await p.api<OperationReport>('A', 'GET', `/v1/drills/${start.json.id}`)).json;
      if (rep2.state !== 'running') break;
      await new Promise((r) => setTimeout(r, 500));
    }
    t.is(rep2.verdict, 'pass', rep2.reasons.join('; '));
    t.is(rep2.newPrimary, 'hostA');

    // 3. refused while not fully protected: kill db's replica (on A); as soon as A's agent knows,
    // ask B — whose heartbeat view may still call the replica healthy: the live check refuses.
    p.killQemu('A', 'db');
    await waitUntil(async () => (await p.vmStatus('A', 'db'))?.state === 'stopped' || undefined, 10_000, 'A sees its replica gone');
    const refused = await p.api<{ error: { code: string; message: string } }>('B', 'POST', '/v1/vms/db/drill', {});
    t.is(refused.status, 409);
    t.is(refused.json.error.code, 'NOT_PROTECTED');
    t.regex(refused.json.error.message, /db is not fully protected/);
    const cliRefused = await p.cli('B', ['drill', 'nosuchvm', '--wait']);
    t.is(cliRefused.code, 5);
    t.regex(cliRefused.stderr, /no protected VM named "nosuchvm"/);
    // the report was saved on the node that ran the drill
    t.true((await p.api<OperationReport[]>('B', 'GET', '/v1/drills')).json.some((d) => d.id === start.json.id));
  });
});
