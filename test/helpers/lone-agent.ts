// One agent process on loopback with no reachable peer and no running VM: enough for API,
// CLI and robustness tests that do not need QEMU guests (the QEMU probe still runs).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, writeFileSync, closeSync, openSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { AGENT_BIN, testGuest } from '../../lab/guest.ts';
import { TOKEN, waitUntil } from '../../lab/pair.ts';
import { request } from 'undici';

export interface LoneAgent { dir: string; base: string; proc: ChildProcess; config: string; log: () => string; stop(): Promise<void> }

let portSeq = 0;

export async function startLoneAgent(opts: { vms?: boolean; api?: Record<string, unknown>; scheme?: 'http' | 'https' } = {}): Promise<LoneAgent> {
  const dir = mkdtempSync(join(tmpdir(), 'ftkvm-lone-'));
  const port = 17500 + (process.pid % 200) * 4 + (portSeq++ % 4);
  writeFileSync(join(dir, 'token'), TOKEN + '\n', { mode: 0o600 });
  writeFileSync(join(dir, 'disk.qcow2'), '');
  const g = testGuest();
  const cfg = {
    node: { name: 'hostA', replication_address: '127.0.0.1' },
    peer: { name: 'hostB', addresses: ['192.0.2.1', '192.0.2.2'], replication_address: '192.0.2.1' },
    api: { listen: `127.0.0.1:${port}`, token_file: join(dir, 'token'), ...opts.api },
    heartbeat: { port: port + 1000 },
    qemu: { accelerator: 'tcg' },
    state_dir: join(dir, 'state'),
    // a VM that stays stopped: the (unreachable) peer is waited for a long time
    colo: { startup_peer_wait_ms: 600_000 },
    witness: { two_node_mode: true },
    vms: opts.vms ? [{ name: 'idle', memory_mib: 128, vcpus: 1, disk: { path: join(dir, 'disk.qcow2') }, boot: { kernel: g.kernel },
      nic: { bridge: 'nobr0', mac: '52:54:00:00:00:42' }, base_port: port + 2000, preferred_primary: 'hostA' }] : [],
  };
  const config = join(dir, 'agent.yaml');
  writeFileSync(config, stringify(cfg));
  const logFile = join(dir, 'agent.log');
  const out = openSync(logFile, 'a');
  const proc = spawn(AGENT_BIN, ['run', '--config', config], { stdio: ['ignore', out, out] });
  closeSync(out);
  const base = `${opts.scheme ?? 'http'}://127.0.0.1:${port}`;
  const log = () => readFileSync(logFile, 'utf8');
  await waitUntil(async () => {
    if (proc.exitCode !== null) throw new Error(`agent exited ${proc.exitCode}: ${log()}`);
    try {
      const r = await request(`${base}/health`, { dispatcher: opts.scheme === 'https' ? insecureDispatcher : undefined });
      await r.body.dump();
      return true;
    } catch { return undefined; }
  }, 20_000, 'lone agent answering');
  return {
    dir, base, proc, config, log,
    stop: async () => { proc.kill('SIGTERM'); await new Promise((r) => (proc.exitCode !== null ? r(undefined) : proc.once('exit', r))); },
  };
}

import { Agent as UndiciAgent } from 'undici';
export const insecureDispatcher = new UndiciAgent({ connect: { rejectUnauthorized: false } });
