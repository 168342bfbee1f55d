// `ftkvm-agent drill VM` and `ftkvm-agent switchover VM`: start on the local agent (which
// forwards to the VM's primary), optionally wait, showing progress, and print the report.
import type { OperationKind, OperationReport } from '../ops/operations.ts';
import { apiCall, type ApiTarget } from './api-client.ts';
import { EXIT } from './exit-codes.ts';
import { bold, dim, green, red } from './format.ts';

export async function operationCommand(t: ApiTarget, kind: OperationKind, vm: string | undefined, opts: { wait: boolean; json: boolean }): Promise<number> {
  if (!vm) {
    process.stderr.write(`usage: ftkvm-agent ${kind} VM [--wait] [--json]\n`);
    return EXIT.USAGE;
  }
  // The agent checks the replica live before answering (bounded at ~6 s, more when forwarded).
  const start = await apiCall<{ id?: string; node?: string; error?: { code: string; message: string } }>(t, 'POST', `/v1/vms/${encodeURIComponent(vm)}/${kind}`, {}, 30_000);
  if (start.status !== 202 || !start.json.id) {
    const e = start.json.error;
    process.stderr.write(`${kind} refused (${start.status}${e ? ' ' + e.code : ''}): ${e?.message ?? JSON.stringify(start.json)}\n`);
    return start.status === 401 || start.status === 403 ? EXIT.FAILURE : EXIT.UNHEALTHY;
  }
  const id = start.json.id;
  if (!opts.wait) {
    process.stdout.write(opts.json ? JSON.stringify(start.json) + '\n' : `${kind} ${id} started on ${start.json.node}; follow with: ftkvm-agent ${kind} ${vm} --wait, or GET /v1/${kind}s/${id}\n`);
    return EXIT.OK;
  }
  if (!opts.json) process.stdout.write(`${bold(kind)} ${id} on ${start.json.node}\n`);
  let shown = 0;
  for (;;) {
    const r = await apiCall<OperationReport>(t, 'GET', `/v1/${kind}s/${encodeURIComponent(id)}`);
    if (r.status !== 200) {
      process.stderr.write(`lost track of ${id}: HTTP ${r.status}\n`);
      return EXIT.FAILURE;
    }
    const op = r.json;
    if (!opts.json) {
      for (const p of op.progress.slice(shown)) process.stdout.write(`  ${dim(new Date(p.at).toISOString().slice(11, 23))} ${p.msg}\n`);
      shown = op.progress.length;
    }
    if (op.state !== 'running') {
      if (opts.json) process.stdout.write(JSON.stringify(op, null, 2) + '\n');
      else process.stdout.write(renderReport(op) + '\n');
      return op.verdict === 'pass' ? EXIT.OK : EXIT.UNHEALTHY;
    }
    await new Promise((res) => setTimeout(res, 500));
  }
}

export function renderReport(op: OperationReport): string {
  const lines = [`${op.verdict === 'pass' ? green('PASS') : red('FAIL')}  ${op.kind} of ${op.vm}: ${op.oldPrimary} → ${op.newPrimary ?? '?'}`];
  const f = op.failover;
  lines.push(`  failover        ${f.ms ?? '?'} ms (takeover seen after ${f.takeoverSeenMs ?? '?'} ms; detection ${f.detectionMs ?? '-'} ms, takeover sequence ${f.sequenceMs ?? '?'} ms)`);
  lines.push(`  re-protected    ${op.reprotect.done ? `yes, ${op.reprotect.ms} ms after the kill` : 'no'}`);
  lines.push(`  checkpoints     before ${op.checkpoints.before.primary ?? '?'} / ${op.checkpoints.before.secondary ?? '?'}, after ${op.checkpoints.after.primary ?? '?'} / ${op.checkpoints.after.secondary ?? '?'} (primary / secondary)`);
  if ('replies' in op.probe) {
    const p = op.probe;
    lines.push(`  probe           ${p.replies} replies, connection ${p.connectionKept ? 'kept' : 'BROKEN'}, last before ${p.lastBefore ?? '-'}, first after ${p.firstAfter ?? '-'}` +
      `${p.gapMs !== null ? `, gap ${p.gapMs} ms` : ''}${p.counterOk === null ? '' : p.counterOk ? ', counter consecutive' : ', COUNTER BROKEN'}`);
  } else {
    lines.push('  probe           not configured (vms[].probe)');
  }
  for (const r of op.reasons) lines.push(`  ${red('reason')}          ${r}`);
  return lines.join('\n');
}
