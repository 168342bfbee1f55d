// ftkvm-agent: one executable, several commands. See `ftkvm-agent --help`.
import { parseArgs } from 'node:util';
import { Agent } from './agent.ts';
import { ConfigError, loadConfigFile } from './config/load.ts';
import { createLogger } from './log/logger.ts';
import { QemuNotColoCapableError } from './qemu/probe.ts';
import { systemClock } from './util/clock.ts';
import { realExec } from './util/exec.ts';
import { errorCode, errorMessage } from './util/errors.ts';
import { resolveTarget } from './cli/api-client.ts';
import { EXIT } from './cli/exit-codes.ts';
import { statusCommand } from './cli/status.ts';
import { operationCommand } from './cli/ops.ts';
import { HELP, commandHelp } from './cli/help.ts';
import { VERSION, COMMIT } from './version.ts';
import { WitnessServer } from './witness/server.ts';
import { runFencer } from './fence/process.ts';
import { loadDrTargetConfig } from './dr/config.ts';
import { DrTarget } from './dr/target.ts';
import { drPull } from './dr/pull.ts';

const DEFAULT_CONFIG = '/etc/ftkvm/agent.yaml';

async function runAgent(configPath: string): Promise<number> {
  let config;
  try {
    config = loadConfigFile(configPath);
  } catch (e) {
    process.stderr.write(`ftkvm-agent: refusing to start: ${errorMessage(e)}\n`);
    return EXIT.USAGE;
  }
  const log = createLogger({ level: config.log_level });
  const agent = new Agent({ config, configPath, log, clock: systemClock, exec: realExec });
  try {
    await agent.start();
  } catch (e) {
    if (e instanceof QemuNotColoCapableError) {
      process.stderr.write(`ftkvm-agent: refusing to protect VMs: ${e.message}\n`);
      await agent.stop().catch(() => undefined);
      return EXIT.QEMU_UNSUPPORTED;
    }
    process.stderr.write(`ftkvm-agent: start failed (${errorCode(e)}): ${errorMessage(e)}\n`);
    await agent.stop().catch(() => undefined);
    return EXIT.FAILURE;
  }
  return await new Promise<number>((resolve) => {
    const stop = (sig: string) => {
      log.info(`${sig}: stopping agent (QEMU processes keep running)`);
      void agent.stop().then(() => resolve(EXIT.OK));
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write((rest[0] ? commandHelp(rest[0]) : HELP) + '\n');
    return EXIT.OK;
  }
  if (cmd === '--version' || cmd === 'version') {
    process.stdout.write(`ftkvm-agent ${VERSION} (commit ${COMMIT}, node ${process.versions.node})\n`);
    return EXIT.OK;
  }
  const common = {
    config: { type: 'string', short: 'c' },
    url: { type: 'string' },
    'token-file': { type: 'string' },
    insecure: { type: 'boolean' },
    json: { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
  } as const;
  let parsed;
  try {
    parsed = parseArgs({ args: rest, options: { ...common, check: { type: 'boolean' }, wait: { type: 'boolean' }, final: { type: 'boolean' }, listen: { type: 'string' }, 'data-dir': { type: 'string' }, 'state-dir': { type: 'string' }, credentials: { type: 'string' }, 'tls-cert': { type: 'string' }, 'tls-key': { type: 'string' } }, allowPositionals: true, strict: true });
  } catch (e) {
    process.stderr.write(`ftkvm-agent ${cmd}: ${errorMessage(e)}\n${commandHelp(cmd)}\n`);
    return EXIT.USAGE;
  }
  const { values: o, positionals } = parsed;
  if (o.help) { process.stdout.write(commandHelp(cmd) + '\n'); return EXIT.OK; }
  const target = () => resolveTarget({ config: o.config, url: o.url, tokenFile: o['token-file'], insecure: o.insecure });
  try {
    switch (cmd) {
      case 'run':
        return await runAgent(o.config ?? DEFAULT_CONFIG);
      case 'check-config': {
        const path = o.config ?? positionals[0] ?? DEFAULT_CONFIG;
        try {
          const c = loadConfigFile(path);
          process.stdout.write(`${path}: OK (node ${c.node.name}, peer ${c.peer.name}, ${c.vms.length} VM${c.vms.length === 1 ? '' : 's'})\n`);
          return EXIT.OK;
        } catch (e) {
          process.stderr.write(`${errorMessage(e)}\n`);
          return e instanceof ConfigError ? EXIT.USAGE : EXIT.FAILURE;
        }
      }
      case 'status':
        return await statusCommand(target(), { json: !!o.json, check: !!o.check });
      case 'witness': {
        if (!o.listen) { process.stderr.write(`ftkvm-agent witness: --listen ADDRESS:PORT is required\n${commandHelp('witness')}\n`); return EXIT.USAGE; }
        const log = createLogger({ component: 'witness' });
        const w = new WitnessServer({
          listen: o.listen, dataDir: o['data-dir'] ?? '/var/lib/ftkvm-witness', log, credentialsFile: o.credentials,
          // With credentials the token file is an optional read-only token; without, the shared one.
          tokenFile: o['token-file'] ?? (o.credentials ? undefined : '/etc/ftkvm/token'),
          tls: o['tls-cert'] && o['tls-key'] ? { certFile: o['tls-cert'], keyFile: o['tls-key'] } : undefined,
        });
        if (!!o['tls-cert'] !== !!o['tls-key']) { process.stderr.write('ftkvm-agent witness: --tls-cert and --tls-key go together\n'); return EXIT.USAGE; }
        try {
          await w.start();
        } catch (e) {
          process.stderr.write(`ftkvm-agent witness: cannot start: ${errorMessage(e)}\n`);
          return EXIT.USAGE;
        }
        return await new Promise<number>((resolve) => {
          const stop = () => void w.stop().then(() => resolve(EXIT.OK));
          process.once('SIGTERM', stop);
          process.once('SIGINT', stop);
          // New credentials without a restart (a restart would hold every lease for one more lease length).
          process.on('SIGHUP', () => { try { w.reload(); } catch (e) { log.error('reload refused; the previous credentials stay in force', { error: errorMessage(e) }); } });
        });
      }
      case 'dr-target': {
        const path = o.config ?? '/etc/ftkvm/dr-target.yaml';
        let cfg;
        try { cfg = loadDrTargetConfig(path); } catch (e) { process.stderr.write(`ftkvm-agent dr-target: refusing to start: ${errorMessage(e)}\n`); return EXIT.USAGE; }
        const log = createLogger({ component: 'dr-target', level: cfg.log_level });
        const t = new DrTarget(cfg, log, realExec);
        try { await t.start(); } catch (e) { process.stderr.write(`ftkvm-agent dr-target: cannot start: ${errorMessage(e)}\n`); await t.stop().catch(() => undefined); return EXIT.FAILURE; }
        return await new Promise<number>((resolve) => {
          const stop = () => void t.stop().then(() => resolve(EXIT.OK));
          process.once('SIGTERM', stop);
          process.once('SIGINT', stop);
        });
      }
      case 'dr-pull': {
        const path = o.config ?? DEFAULT_CONFIG;
        const name = positionals[0];
        if (!name) { process.stderr.write(`ftkvm-agent dr-pull: the VM is required\n${commandHelp('dr-pull')}\n`); return EXIT.USAGE; }
        let cfg;
        try { cfg = loadConfigFile(path); } catch (e) { process.stderr.write(`${errorMessage(e)}\n`); return EXIT.USAGE; }
        const vm = cfg.vms.find((v) => v.name === name);
        if (!vm) { process.stderr.write(`ftkvm-agent dr-pull: no VM "${name}" in ${path}\n`); return EXIT.USAGE; }
        const r = await drPull(cfg, vm, !!o.final, (l) => { if (!o.json) process.stdout.write(l + '\n'); });
        process.stdout.write(o.json ? JSON.stringify(r) + '\n' : `${r.vm}: ${r.stage} pull done: ${r.copiedBytes} of ${r.diskBytes} bytes copied in ${r.ms} ms${r.epoch !== null ? `, epoch ${r.epoch}` : ''}\n`);
        return EXIT.OK;
      }
      case 'fencer': {
        if (!o['state-dir']) { process.stderr.write('ftkvm-agent fencer: --state-dir DIR is required (the agent starts it)\n'); return EXIT.USAGE; }
        await runFencer(o['state-dir'], createLogger({ component: 'fencer' }));
        return EXIT.OK;
      }
      case 'drill':
      case 'switchover':
        return await operationCommand(target(), cmd, positionals[0], { wait: !!o.wait, json: !!o.json });
      default:
        process.stderr.write(`ftkvm-agent: unknown command "${cmd}"\n\n${HELP}\n`);
        return EXIT.USAGE;
    }
  } catch (e) {
    process.stderr.write(`ftkvm-agent ${cmd}: ${errorMessage(e)}\n`);
    return errorCode(e) === 'AGENT_UNREACHABLE' ? EXIT.UNREACHABLE : EXIT.FAILURE;
  }
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; if (code !== 0 || (process.argv[2] !== 'run' && process.argv[2] !== 'witness' && process.argv[2] !== 'fencer' && process.argv[2] !== 'dr-target')) setTimeout(() => process.exit(code), 50).unref(); },
  (e) => { process.stderr.write(`ftkvm-agent: ${errorMessage(e)}\n`); process.exit(EXIT.FAILURE); });
