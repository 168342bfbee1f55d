// A scriptable QMP server on a real unix socket, for client tests with fault injection.
import { createServer, type Server, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export type Handler = (cmd: { execute: string; arguments?: Record<string, unknown>; id?: unknown }, sock: Socket) => void;

export class FakeQmp {
  readonly path: string;
  private readonly dir: string;
  private server: Server;
  sockets: Socket[] = [];
  received: { execute: string; arguments?: Record<string, unknown> }[] = [];
  greeting = true;
  handler: Handler = (cmd, sock) => FakeQmp.reply(sock, cmd, {});

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), 'fakeqmp-'));
    this.path = join(this.dir, 'qmp.sock');
    this.server = createServer((sock) => {
      this.sockets.push(sock);
      if (this.greeting) sock.write(JSON.stringify({ QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: 'fake' }, capabilities: ['oob'] } }) + '\r\n');
      let buf = '';
      sock.on('data', (d) => {
        buf += d.toString();
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i); buf = buf.slice(i + 1);
          if (!line.trim()) continue;
          const cmd = JSON.parse(line);
          this.received.push(cmd);
          if (cmd.execute === 'qmp_capabilities') FakeQmp.reply(sock, cmd, {});
          else this.handler(cmd, sock);
        }
      });
      sock.on('error', () => undefined);
    });
  }

  static reply(sock: Socket, cmd: { id?: unknown }, ret: unknown): void {
    sock.write(JSON.stringify({ return: ret, id: cmd.id }) + '\r\n');
  }
  static error(sock: Socket, cmd: { id?: unknown }, cls: string, desc: string): void {
    sock.write(JSON.stringify({ error: { class: cls, desc }, id: cmd.id }) + '\r\n');
  }
  static event(sock: Socket, event: string, data: Record<string, unknown> = {}): void {
    sock.write(JSON.stringify({ event, data, timestamp: { seconds: 1700000000, microseconds: 123456 } }) + '\r\n');
  }

  listen(): Promise<void> { return new Promise((r) => this.server.listen(this.path, () => r())); }
  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise((r) => this.server.close(() => r(undefined)));
    rmSync(this.dir, { recursive: true, force: true });
  }
}
