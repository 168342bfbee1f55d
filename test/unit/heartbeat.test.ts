import test from 'ava';
import { HeartbeatService, type PeerView } from '../../agent/src/peer/heartbeat.ts';
import { systemClock, sleep } from '../../agent/src/util/clock.ts';
import { memoryLogger } from '../../agent/src/log/logger.ts';

let nextPort = 27000 + (process.pid % 1000) * 4;

function pair(opts: { bAddresses?: string[]; keyB?: string; keyA?: string; previousA?: string; previousB?: string } = {}) {
  const pa = nextPort++, pb = nextPort++;
  const changes: Record<'a' | 'b', { view: PeerView; why: string }[]> = { a: [], b: [] };
  const mk = (me: 'a' | 'b', port: number, peerPort: number, addresses: string[], key: string, previousKey?: string) => new HeartbeatService({
    node: me === 'a' ? 'hostA' : 'hostB', peer: me === 'a' ? 'hostB' : 'hostA',
    peerAddresses: addresses, peerPort, listenAddress: '127.0.0.1', listenPort: port,
    intervalMs: 20, timeoutMs: 120, key, previousKey, clock: systemClock, log: memoryLogger(),
    summaries: () => ({ vm1: { state: me === 'a' ? 'protected' : 'secondary', epoch: 3, primaryEpoch: me === 'a' ? 3 : 0, qemu: true } }),
    onChange: (view, why) => changes[me].push({ view, why }),
  });
  // A's view of B: 127.0.0.1 (works) and, optionally, a black-holed documentation address.
  const a = mk('a', pa, pb, opts.bAddresses ?? ['127.0.0.1', '127.0.0.1'], opts.keyA ?? 'k'.repeat(20), opts.previousA);
  const b = mk('b', pb, pa, ['127.0.0.1', '127.0.0.1'], opts.keyB ?? 'k'.repeat(20), opts.previousB);
  return { a, b, changes };
}

test('two agents hear each other on every path, with RTT and the peer\'s VM summaries', async (t) => {
  const { a, b } = pair();
  await a.start(); await b.start();
  t.teardown(() => { a.stop(); b.stop(); });
  await sleep(150);
  const v = a.view();
  t.true(v.alive);
  t.is(v.paths.length, 2);
  t.true(v.paths.every((p) => p.up && p.rttMs !== null && p.rttMs < 50));
  t.deepEqual(v.vms.vm1, { state: 'secondary', epoch: 3, primaryEpoch: 0, qemu: true });
  t.truthy(v.instance);
});

test('one silent path does not make the peer silent', async (t) => {
  const { a, b } = pair({ bAddresses: ['127.0.0.1', '192.0.2.1'] }); // TEST-NET-1: never answers
  await a.start(); await b.start();
  t.teardown(() => { a.stop(); b.stop(); });
  await sleep(300);
  const v = a.view();
  t.true(v.alive);
  t.true(v.paths[0]!.up);
  t.false(v.paths[1]!.up);
});

test('the peer is declared silent only after the timeout, and heard again when it returns', async (t) => {
  const { a, b, changes } = pair();
  await a.start(); await b.start();
  t.teardown(() => { a.stop(); b.stop(); });
  await sleep(100);
  t.true(a.view().alive);
  const stoppedAt = Date.now();
  b.stop();
  await sleep(60);
  t.true(a.view().alive, 'still alive before the 120 ms timeout');
  await sleep(150);
  t.false(a.view().alive);
  const silent = changes.a.find((c) => !c.view.alive)!;
  t.regex(silent.why, /no heartbeat on any of 2 paths for 120 ms/);
  t.true(Date.now() - stoppedAt >= 120);
  await b.start();
  await sleep(100);
  t.true(a.view().alive);
  t.true(changes.a.at(-1)!.view.alive);
});

test('datagrams signed with another key are rejected and counted', async (t) => {
  const { a, b } = pair({ keyB: 'x'.repeat(20) });
  await a.start(); await b.start();
  t.teardown(() => { a.stop(); b.stop(); });
  await sleep(150);
  t.false(a.view().alive);
  t.true(a.rejected > 0);
});

test('binding an address in use fails loudly', async (t) => {
  const { a } = pair();
  await a.start();
  t.teardown(() => a.stop());
  const dup = new HeartbeatService({ ...(a as unknown as { o: ConstructorParameters<typeof HeartbeatService>[0] }).o });
  await t.throwsAsync(dup.start(), { message: /EADDRINUSE/ });
});

/**
 * A relay between A and B that records what B sends A, and can replay it later: an attacker on
 * the path, or datagrams queued in A's socket while A's agent was stopped.
 */
async function relayed() {
  const { createSocket } = await import('node:dgram');
  const pa = nextPort++, pb = nextPort++, pr = nextPort++;
  const key = 'k'.repeat(20);
  const mk = (me: 'a' | 'b', port: number, peerPort: number) => new HeartbeatService({
    node: me === 'a' ? 'hostA' : 'hostB', peer: me === 'a' ? 'hostB' : 'hostA',
    peerAddresses: ['127.0.0.1'], peerPort, listenAddress: '127.0.0.1', listenPort: port,
    intervalMs: 20, timeoutMs: 120, key, clock: systemClock, log: memoryLogger(),
    summaries: () => ({ vm1: { state: me === 'a' ? 'protected' : 'secondary', epoch: 3, primaryEpoch: 0, qemu: true } }),
    onChange: () => undefined,
  });
  const a = mk('a', pa, pr); // A talks to B only through the relay
  const b = mk('b', pb, pa);
  const relay = createSocket('udp4');
  const recorded: Buffer[] = [];
  relay.on('message', (buf, rinfo) => {
    if (rinfo.port === pa) relay.send(buf, pb, '127.0.0.1');   // A -> B
    else { recorded.push(buf); relay.send(buf, pa, '127.0.0.1'); } // B's pongs -> A
  });
  await new Promise<void>((r) => relay.bind(pr, '127.0.0.1', r));
  const replay = () => { for (const buf of recorded) relay.send(buf, pa, '127.0.0.1'); };
  return { a, b, relay, recorded, replay };
}

test('replayed heartbeats do not keep a dead peer alive', async (t) => {
  const { a, b, relay, recorded, replay } = await relayed();
  await a.start(); await b.start();
  t.teardown(() => { a.stop(); b.stop(); relay.close(); });
  await sleep(150);
  t.true(a.view().alive, 'heard through the relay');
  t.true(recorded.length > 3);
  b.stop();
  const timer = setInterval(replay, 20); // every authentic datagram B ever sent, again and again
  t.teardown(() => clearInterval(timer));
  await sleep(300);
  t.false(a.view().alive, 'replays prove nothing recent');
  t.true(a.stale > 0);
  t.is(a.rejected, 0, 'they are authentic, just old');
});

test('datagrams queued while this agent was stopped are not taken as news', async (t) => {
  const { a, b, relay, recorded } = await relayed();
  await a.start(); await b.start();
  t.teardown(() => { a.stop(); b.stop(); relay.close(); });
  await sleep(150);
  t.true(a.view().alive);
  const before = recorded.length;
  // A's agent "restarts": a new instance, then B's old datagrams arrive first.
  a.stop();
  b.stop();
  const a2 = new HeartbeatService({ ...(a as unknown as { o: ConstructorParameters<typeof HeartbeatService>[0] }).o });
  await a2.start();
  t.teardown(() => a2.stop());
  for (const buf of recorded.slice(0, before)) relay.send(buf, (a as unknown as { o: { listenPort: number } }).o.listenPort, '127.0.0.1');
  await sleep(60);
  t.false(a2.view().alive, 'B is gone: what it said before the restart is no proof');
  t.deepEqual(a2.view().vms, {}, 'nor a summary to act on');
  t.true(a2.stale >= before);
});

test('a key change one host at a time: the host with the new key and the previous one hears a peer that has only the old key, and back', async (t) => {
  const OLD = 'o'.repeat(20), NEW = 'n'.repeat(20);
  // A has changed first (new key, old one as previous); B still runs with the old key only.
  const first = pair({ keyA: NEW, previousA: OLD, keyB: OLD });
  await first.a.start(); await first.b.start();
  await sleep(200);
  t.true(first.a.view().alive, 'A hears B (old key accepted)');
  t.true(first.b.view().alive, 'B hears A (A also sends with the old key)');
  first.a.stop(); first.b.stop();
  // Then B changes too: both hold the new key; A stops sending the old one once it hears it.
  const second = pair({ keyA: NEW, previousA: OLD, keyB: NEW, previousB: OLD });
  await second.a.start(); await second.b.start();
  t.teardown(() => { second.a.stop(); second.b.stop(); });
  await sleep(200);
  t.true(second.a.view().alive && second.b.view().alive);
  // A third host with only the old key (not a party to the change) is no longer heard by a node without a previous key.
  const third = pair({ keyA: NEW, keyB: OLD });
  await third.a.start(); await third.b.start();
  await sleep(200);
  t.false(third.a.view().alive, 'the old key alone is refused once previous_key_file is gone');
  third.a.stop(); third.b.stop();
});
