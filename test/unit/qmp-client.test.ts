import test from 'ava';
import { QmpClient, eventTimeMs, type QmpEvent } from '../../agent/src/qmp/client.ts';
import { QmpCommandError, QmpConnectError, QmpDisconnectedError, QmpProtocolError, QmpTimeoutError } from '../../agent/src/qmp/errors.ts';
import { unixSocketConnector } from '../../agent/src/qmp/transport.ts';
import { FakeQmp } from '../helpers/fake-qmp.ts';

async function setup(t: { teardown(f: () => void | Promise<void>): void }, configure?: (f: FakeQmp) => void, opts = {}) {
  const f = new FakeQmp();
  configure?.(f);
  await f.listen();
  t.teardown(() => f.close());
  const c = await QmpClient.connect(unixSocketConnector(f.path), { commandTimeoutMs: 2000, handshakeTimeoutMs: 1000, ...opts });
  t.teardown(() => c.close());
  return { f, c };
}

test('greeting, capability negotiation, command and reply', async (t) => {
  const { f, c } = await setup(t, (f) => { f.handler = (cmd, s) => FakeQmp.reply(s, cmd, { status: 'running', running: true }); });
  t.is(c.state, 'ready');
  t.is(c.greeting?.QMP.version.qemu.major, 7);
  t.deepEqual(await c.execute('query-status'), { status: 'running', running: true });
  t.deepEqual(f.received.map((r) => r.execute), ['qmp_capabilities', 'query-status']);
});

test('replies are matched by id even when they arrive out of order', async (t) => {
  const { c } = await setup(t, (f) => {
    const held: [unknown, unknown][] = [];
    f.handler = (cmd, s) => {
      held.push([cmd, s]);
      if (held.length === 2) { // answer the second command first
        FakeQmp.reply(s, held[1]![0] as { id: unknown }, 'second');
        FakeQmp.reply(s, held[0]![0] as { id: unknown }, 'first');
      }
    };
  });
  const [a, b] = await Promise.all([c.execute('a'), c.execute('b')]);
  t.is(a, 'first');
  t.is(b, 'second');
});

test('events interleaved with replies are delivered as events, not as replies', async (t) => {
  const { c } = await setup(t, (f) => {
    f.handler = (cmd, s) => {
      FakeQmp.event(s, 'STOP');
      FakeQmp.event(s, 'RESUME');
      FakeQmp.reply(s, cmd, 42);
      FakeQmp.event(s, 'COLO_EXIT', { mode: 'primary', reason: 'error' });
    };
  });
  const events: QmpEvent[] = [];
  c.on('event', (e) => events.push(e));
  const colo = c.waitEvent('COLO_EXIT', 1000);
  t.is(await c.execute('x'), 42);
  const e = await colo;
  t.deepEqual(e.data, { mode: 'primary', reason: 'error' });
  t.deepEqual(events.map((x) => x.event), ['STOP', 'RESUME', 'COLO_EXIT']);
  t.is(eventTimeMs(e), 1700000000123.456);
});

test('a message split across several TCP chunks is reassembled', async (t) => {
  const { c } = await setup(t, (f) => {
    f.handler = (cmd, s) => {
      const msg = JSON.stringify({ return: { big: 'x'.repeat(5000) }, id: cmd.id }) + '\r\n';
      s.write(msg.slice(0, 7));
      setTimeout(() => s.write(msg.slice(7, 3000)), 10);
      setTimeout(() => s.write(msg.slice(3000)), 20);
    };
  });
  const r = await c.execute<{ big: string }>('query-big');
  t.is(r.big.length, 5000);
});

test('QMP errors become QmpCommandError with class and description', async (t) => {
  const { c } = await setup(t, (f) => { f.handler = (cmd, s) => FakeQmp.error(s, cmd, 'GenericError', 'Device not found'); });
  const e = await t.throwsAsync(c.execute('object-del', { id: 'nope' }), { instanceOf: QmpCommandError });
  t.is(e!.code, 'QMP_COMMAND_FAILED');
  t.is(e!.errorClass, 'GenericError');
  t.is(e!.desc, 'Device not found');
  t.is(e!.message, 'QMP object-del failed: GenericError: Device not found');
});

test('a hanging command times out; the connection stays usable and the late reply is dropped', async (t) => {
  let first = true;
  const { c } = await setup(t, (f) => {
    f.handler = (cmd, s) => {
      if (first) { first = false; setTimeout(() => FakeQmp.reply(s, cmd, 'late'), 300); return; }
      FakeQmp.reply(s, cmd, 'on time');
    };
  });
  const e = await t.throwsAsync(c.execute('hang', undefined, { timeoutMs: 100 }), { instanceOf: QmpTimeoutError });
  t.is(e!.code, 'QMP_TIMEOUT');
  await new Promise((r) => setTimeout(r, 400)); // the late reply arrives meanwhile
  t.is(await c.execute('next'), 'on time');
  t.is(c.state, 'ready');
});

test('QEMU dying mid-reply fails the pending command with QmpDisconnectedError', async (t) => {
  const { c } = await setup(t, (f) => {
    f.handler = (cmd, s) => { s.write(`{"return": {"status": "runn`); setTimeout(() => s.destroy(), 20); };
  });
  const closed = c.closed;
  const e = await t.throwsAsync(c.execute('query-status'), { instanceOf: QmpDisconnectedError });
  t.is(e!.code, 'QMP_DISCONNECTED');
  t.is(e!.command, 'query-status');
  t.true((await closed) instanceof QmpDisconnectedError);
  t.is(c.state, 'closed');
  await t.throwsAsync(c.execute('after-close'), { instanceOf: QmpDisconnectedError });
});

test('all outstanding commands fail when the connection drops', async (t) => {
  const { c, f } = await setup(t, (f) => { f.handler = () => undefined; });
  const ps = [c.execute('a'), c.execute('b'), c.execute('c')];
  setTimeout(() => f.sockets[0]!.destroy(), 50);
  const results = await Promise.allSettled(ps);
  t.true(results.every((r) => r.status === 'rejected' && r.reason instanceof QmpDisconnectedError));
});

test('garbage on the wire closes the connection with QmpProtocolError', async (t) => {
  const { c } = await setup(t, (f) => { f.handler = (_cmd, s) => s.write('this is not json\r\n'); });
  const e = await t.throwsAsync(c.execute('x'), { instanceOf: QmpProtocolError });
  t.is(e!.code, 'QMP_PROTOCOL');
  t.is(c.state, 'closed');
});

test('no greeting: connect fails within the handshake timeout', async (t) => {
  const f = new FakeQmp();
  f.greeting = false;
  await f.listen();
  t.teardown(() => f.close());
  const t0 = Date.now();
  const e = await t.throwsAsync(QmpClient.connect(unixSocketConnector(f.path), { handshakeTimeoutMs: 200 }), { instanceOf: QmpConnectError });
  t.is(e!.code, 'QMP_CONNECT_FAILED');
  t.true(Date.now() - t0 < 1500);
});

test('connecting to a missing socket fails with QmpConnectError naming the path', async (t) => {
  const e = await t.throwsAsync(QmpClient.connect(unixSocketConnector('/nonexistent/qmp.sock')), { instanceOf: QmpConnectError });
  t.regex(e!.message, /\/nonexistent\/qmp\.sock/);
});

test('HMP passthrough returns the text output', async (t) => {
  const { c, f } = await setup(t, (f) => { f.handler = (cmd, s) => FakeQmp.reply(s, cmd, 'OK\r\n'); });
  t.is(await c.hmp('drive_add -n buddy driver=replication'), 'OK\r\n');
  t.deepEqual(f.received.at(-1), { execute: 'human-monitor-command', arguments: { 'command-line': 'drive_add -n buddy driver=replication' }, id: 2 });
});

test('waitEvent rejects when the connection closes', async (t) => {
  const { c, f } = await setup(t);
  const w = c.waitEvent('RESUME', 5000);
  f.sockets[0]!.destroy();
  await t.throwsAsync(w, { instanceOf: QmpDisconnectedError });
});
