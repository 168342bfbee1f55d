import type { HealthReport, StatusReport } from '../agent.ts';
import { apiCall, type ApiTarget } from './api-client.ts';
import { EXIT } from './exit-codes.ts';
import { ago, bold, bytes, dim, green, red, table, yellow } from './format.ts';

export async function statusCommand(t: ApiTarget, opts: { json: boolean; check: boolean }): Promise<number> {
  const [{ json: st }, { json: health }] = await Promise.all([
    apiCall<StatusReport>(t, 'GET', '/v1/status'),
    apiCall<HealthReport>(t, 'GET', '/health'),
  ]);
  if (opts.json) {
    process.stdout.write(JSON.stringify({ ...st, health }, null, 2) + '\n');
  } else {
    process.stdout.write(renderStatus(st, health) + '\n');
  }
  return opts.check && !health.healthy ? EXIT.UNHEALTHY : EXIT.OK;
}

export function renderStatus(st: StatusReport, health: HealthReport): string {
  const now = Date.now();
  const out: string[] = [];
  out.push(`${bold('node')} ${st.node}   ${bold('agent')} ${st.agent.version} (${st.agent.commit})   ${bold('qemu')} ${st.agent.qemu?.version ?? '?'}   ` +
    `${bold('health')} ${health.healthy ? green('OK') : red('DEGRADED')}`);
  const p = st.peer;
  out.push(`${bold('peer')} ${p.name}: ${p.alive ? green('up') : red('silent')}` +
    `   ${p.paths.map((x, i) => `path${i} ${x.address} ${x.up ? green('up') : red('down')}${x.rttMs !== null ? ` rtt ${x.rttMs} ms` : ''}`).join('   ')}`);
  const w = st.witness;
  out.push(`${bold('witness')} ${w.mode === 'two-node' ? yellow('none (two-node mode)') : `${w.url} ${w.reachable ? green('reachable') : red('unreachable')}`}`);
  out.push('');
  const rows = st.vms.map((v) => {
    const stateCol = v.protected ? green(v.state) : ['standalone', 'dropping', 'fenced', 'stopped'].includes(v.state) ? red(v.state) : yellow(v.state);
    const ck = v.checkpoints;
    const lf = v.lastFailover;
    return [
      v.name, v.role, stateCol, String(v.epoch),
      v.qemu ? `${v.qemu.runState} pid ${v.qemu.pid} up ${v.qemu.uptimeS}s${v.qemu.reattached ? ' (re-attached)' : ''}` : 'absent',
      ck.count ? `${ck.count}, last ${ago(ck.lastAt, now)}, pause ${ck.lastPauseMs} ms` : '-',
      v.resync ? `${v.resync.phase} ${bytes(v.resync.bytesDone)}/${bytes(v.resync.bytesTotal)}${v.resync.etaS !== null ? ` eta ${v.resync.etaS}s` : ''}` : '-',
      lf ? `${lf.kind} ${ago(lf.at, now)}, ${lf.durationMs} ms` : '-',
    ];
  });
  out.push(table(['VM', 'ROLE', 'STATE', 'EPOCH', 'QEMU', 'CHECKPOINTS', 'RESYNC', 'LAST FAILOVER'], rows));
  for (const v of st.vms) {
    out.push(dim(`  ${v.name}: ${v.reason}`));
    if (v.lastFailover) out.push(dim(`  ${v.name}: last failover: ${v.lastFailover.reason}`));
  }
  if (health.problems.length || health.warnings.length) {
    out.push('');
    for (const x of health.problems) out.push(`${red('problem')} ${x.subject}: ${x.reason}`);
    for (const x of health.warnings) out.push(`${yellow('warning')} ${x.subject}: ${x.reason}`);
  }
  return out.join('\n');
}
