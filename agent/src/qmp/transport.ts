// The byte stream under QMP. Production: a unix socket. Tests may hand in any Duplex.
import { createConnection } from 'node:net';
import type { Duplex } from 'node:stream';
import { QmpConnectError } from './errors.ts';

export type QmpConnector = () => Promise<Duplex>;

export function unixSocketConnector(path: string, timeoutMs = 3000): QmpConnector {
  return () => new Promise<Duplex>((resolve, reject) => {
    const sock = createConnection({ path });
    const timer = setTimeout(() => { sock.destroy(); reject(new QmpConnectError(`connect to ${path} timed out after ${timeoutMs} ms`)); }, timeoutMs);
    sock.once('connect', () => { clearTimeout(timer); resolve(sock); });
    sock.once('error', (e) => { clearTimeout(timer); reject(new QmpConnectError(`cannot connect to QMP socket ${path}: ${e.message}`, e)); });
  });
}
