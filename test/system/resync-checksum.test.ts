// Checksum resync (colo.resync: checksum) on the real pair: after each failover the returning
// host's disk is brought in sync by copying only the chunks whose digests differ plus what the
// guest wrote meanwhile. Checked through three failover rounds with the guest writing to its
// disk throughout: the disks are byte-identical at a paused moment, little crosses the link,
// every acknowledged transaction survives; a replaced disk gets everything that differs.
import test from 'ava';
import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { withPair, sleep, firstGap } from '../helpers/system.ts';
import { other, waitUntil, type AgentPair, type H } from '../../lab/pair.ts';
import { TxnClient } from '../../lab/traffic.ts';
import { QmpClient } from '../../agent/src/qmp/client.ts';
import { unixSocketConnector } from '../../agent/src/qmp/transport.ts';

const DISK_MIB = 32;
const img = (p: AgentPair, h: H) => join(p.hostDir(h), 'images', 'db.img');

/** Pauses the primary right after a checkpoint, compares both disks, resumes; retried if a checkpoint intervened. */
async function disksIdentical(p: AgentPair, prim: H): Promise<{ identical: boolean; out: string }> {
  for (let attempt = 0; attempt < 5; attempt++) {
    await p.waitCheckpointAfter('db', Date.now());
    const q = await QmpClient.connect(unixSocketConnector(join(p.stateDir(prim), 'vms', 'db', 'qmp-observer.sock'), 1000), { handshakeTimeoutMs: 2000, commandTimeoutMs: 5000 });
    try {
      await q.execute('stop'); // drains the guest's writes to both copies
      const r = spawnSync('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', img(p, 'A'), img(p, 'B')], { encoding: 'utf8' });
      const st = await q.execute<{ running: boolean }>('query-status');
      if (!st.running) await q.execute('cont');
      // A checkpoint resumes a stopped guest by itself (COLO's vm_start): then the comparison raced its writes.
      if (st.running) continue;
      return { identical: r.status === 0, out: (r.stdout + r.stderr).trim() };
    } finally { q.close(); }
  }
  throw new Error('no quiet moment for the comparison in 5 tries');
}

/** What the client saw, for a failure message: how many transactions, the last one, its errors. */
function clientState(c: TxnClient): string {
  const last = c.txns.at(-1);
  return `${c.txns.length} acknowledged, last ${last ? `${last.value} at ${new Date(last.ackAt).toISOString()}` : 'none'}, errors ${JSON.stringify(c.errors)}`;
}

/** The last "digests compared" line of a host's agent log at or after `since`. */
function resyncLine(p: AgentPair, h: H, since: number): { planned: number; disk: number } | null {
  const r = spawnSync('grep', ['-h', 'checksum resync: digests compared', p.agentLog(h)], { encoding: 'utf8' });
  for (const l of r.stdout.trim().split('\n').reverse()) {
    const at = Date.parse(l.split(' ')[0] ?? '');
    const planned = /plannedBytes=(\d+)/.exec(l), disk = /diskBytes=(\d+)/.exec(l);
    if (at >= since && planned && disk) return { planned: Number(planned[1]), disk: Number(disk[1]) };
  }
  return null;
}

test('checksum resync through three failovers: only what differs crosses the link, the disks end byte-identical, no acknowledged transaction lost; a replaced disk gets all that differs', async (t) => {
  t.timeout(900_000);
  await withPair(t, 15, { vms: [{ name: 'db', guestIp: 15, basePort: 19400 }], randomDiskMib: DISK_MIB, colo: { resync: 'checksum', resync_chunk_kib: 256 } }, async (p) => {
    p.startAgent('A'); p.startAgent('B');
    let prim = await p.waitProtected('db', 180_000);
    await p.waitGuestService('db');
    const client = new TxnClient(p.guestIp('db'));
    await client.open();
    client.start();
    for (let round = 1; round <= 3; round++) {
      await waitUntil(() => client.txns.length >= round * 20 || undefined, 60_000, () => `transactions before round ${round} (${clientState(client)})`);
      const sec = other(prim);
      const killedAt = Date.now();
      p.killQemu(prim, 'db'); // as a drill does: the primary's QEMU crashes
      await waitUntil(async () => { const s = await p.vmStatus(sec, 'db'); return s?.state === 'protected' && (s.lastTakeover?.at ?? 0) > killedAt ? s : undefined; }, 240_000, `round ${round}: ${sec} took over and re-protected`);
      const r = resyncLine(p, sec, killedAt);
      t.truthy(r, `round ${round}: the re-protection was a checksum resync`);
      t.log(`round ${round}: ${sec} took over; ${r!.planned} of ${r!.disk} bytes differed`);
      t.true(r!.planned < 0.05 * r!.disk, `round ${round}: less than 5 % of the disk differed (${r!.planned} bytes)`);
      const cmp = await disksIdentical(p, sec);
      t.true(cmp.identical, `round ${round}: disks identical (${cmp.out})`);
      prim = sec;
    }
    // The returning host's disk replaced by an empty one: everything non-zero differs and is copied.
    const sec = other(prim);
    await waitUntil(() => client.txns.length >= 80 || undefined, 60_000, () => `transactions before the replaced-disk round (${clientState(client)})`);
    p.killAgent(sec); p.killQemu(sec, 'db');
    await waitUntil(async () => (await p.vmStatus(prim, 'db'))?.state === 'standalone' || undefined, 60_000, `${prim} runs unprotected`);
    execFileSync('truncate', ['-s', '0', img(p, sec)]);
    execFileSync('truncate', ['-s', `${DISK_MIB}M`, img(p, sec)]);
    const rejoinAt = Date.now();
    p.startAgent(sec);
    await waitUntil(async () => { const s = await p.vmStatus(prim, 'db'); return s?.state === 'protected' || undefined; }, 240_000, 'protected again with the replaced disk');
    const r = resyncLine(p, prim, rejoinAt)!;
    t.log(`replaced disk: ${r.planned} of ${r.disk} bytes differed`);
    t.true(r.planned >= (DISK_MIB - 1) * 1024 * 1024, 'the random content of the whole disk was copied');
    t.true((await disksIdentical(p, prim)).identical, 'disks identical after the replaced-disk resync');
    await sleep(1000);
    await client.stop();
    t.deepEqual(client.errors, []);
    const values = client.txns.map((x) => x.value);
    t.is(firstGap(values), null, `acknowledged values consecutive: ${JSON.stringify(firstGap(values))}`);
  });
});
