// The agent's HTTP API. Read-only endpoints are served from state the agent keeps current (no
// QMP round-trip on the hot path). /v1/peer/* is the agent-to-agent protocol.
import type { Agent } from '../agent.ts';
import { roleOf } from '../colo/states.ts';
import { OperationRefused, type OperationKind } from '../ops/operations.ts';
import { z } from 'zod/v4';
import { bodyField, HttpError, parseBody, type Ctx, type Reply, type Route } from './http.ts';
import { MAX_EPOCH } from '../witness/lease.ts';

const FORWARDED = 'x-ftkvm-forwarded';

/** A peer RPC's epoch: a safe integer within bounds, or the request is refused (400) before it acts. */
const epoch = bodyField.int(1, MAX_EPOCH);
// The peer RPCs' bodies; a bad one is answered 400 naming the first bad field in this order.
const PrepareBody = z.object({
  epoch, sizeBytes: bodyField.number(), primary: bodyField.string(), protection: bodyField.string().optional(),
  // checksum resync: the chunk size to digest this host's disk in (64 KiB .. 4 MiB, a power of two)
  checksumChunkBytes: bodyField.int(65536, 4 * 1024 * 1024).refine((n) => (n & (n - 1)) === 0, 'a power of two').optional(),
});
const ReleaseBody = z.object({ reason: bodyField.string().optional(), epoch: epoch.optional() });
const TakeoverBody = ReleaseBody;

function vmOr404(agent: Agent, name: string) {
  const v = agent.vm(name);
  if (!v) throw new HttpError(404, 'NO_SUCH_VM', `no protected VM named "${name}" on this node (known: ${[...agent.controllers.keys()].join(', ') || 'none'})`);
  return v;
}

/** Drills and switchovers run on the VM's primary; the secondary's agent forwards them there. */
function startOperation(agent: Agent, kind: OperationKind) {
  return async (ctx: Ctx): Promise<Reply> => {
    const name = ctx.params.name!;
    const v = vmOr404(agent, name);
    if (roleOf(v.state) === 'secondary' && !ctx.req.headers[FORWARDED]) {
      const r = await agent.peer.callRaw(`POST`, `/v1/vms/${encodeURIComponent(name)}/${kind}`, {}, 10_000, { [FORWARDED]: '1' });
      return { status: r.status, json: r.json };
    }
    try {
      const op = await agent.ops.start(kind, name);
      return { status: 202, json: { id: op.id, kind, vm: name, node: op.node, state: op.state, phase: op.phase, poll: `/v1/${kind}s/${op.id}` } };
    } catch (e) {
      if (e instanceof OperationRefused) throw new HttpError(e.status, e.code, e.message);
      throw e;
    }
  };
}

function getOperation(agent: Agent, kind: OperationKind) {
  return async (ctx: Ctx): Promise<Reply> => {
    const op = agent.ops.get(ctx.params.id!);
    if (op && op.kind === kind) return { json: op };
    if (!ctx.req.headers[FORWARDED]) {
      try {
        const r = await agent.peer.callRaw(`GET`, `/v1/${kind}s/${encodeURIComponent(ctx.params.id!)}`, undefined, 5000, { [FORWARDED]: '1' });
        if (r.status === 200) return { json: r.json };
      } catch { /* peer unreachable: answer for this node */ }
    }
    throw new HttpError(404, 'NO_SUCH_OPERATION', `no ${kind} "${ctx.params.id}" on this node or its peer`);
  };
}

export function buildRoutes(agent: Agent): Route[] {
  return [
    { method: 'POST', path: '/v1/vms/:name/drill', access: 'write', handler: startOperation(agent, 'drill') },
    { method: 'GET', path: '/v1/drills/:id', access: 'read', handler: getOperation(agent, 'drill') },
    { method: 'GET', path: '/v1/drills', access: 'read', handler: () => ({ json: agent.ops.list('drill') }) },
    { method: 'POST', path: '/v1/vms/:name/switchover', access: 'write', handler: startOperation(agent, 'switchover') },
    { method: 'GET', path: '/v1/switchovers/:id', access: 'read', handler: getOperation(agent, 'switchover') },
    {
      method: 'GET', path: '/health', access: 'read',
      handler: () => { const h = agent.health(); return { status: h.healthy ? 200 : 503, json: h }; },
    },
    { method: 'GET', path: '/v1/status', access: 'read', handler: () => ({ json: agent.status() }) },
    {
      method: 'GET', path: '/metrics', access: 'read',
      handler: async () => ({ text: await agent.metrics.text(), contentType: agent.metrics.contentType }),
    },
    // ---- agent-to-agent
    { method: 'GET', path: '/v1/peer/state', access: 'write', handler: () => ({ json: agent.peerStateFile() }) },
    {
      method: 'POST', path: '/v1/peer/vms/:name/prepare', access: 'write',
      handler: async (ctx) => {
        const v = vmOr404(agent, ctx.params.name!);
        const b = parseBody(PrepareBody, await ctx.body());
        return { json: await v.prepareSecondary({ epoch: b.epoch, sizeBytes: b.sizeBytes, primary: b.primary, protection: b.protection, checksumChunkBytes: b.checksumChunkBytes }) };
      },
    },
    {
      method: 'POST', path: '/v1/peer/vms/:name/release', access: 'write',
      handler: async (ctx) => {
        const v = vmOr404(agent, ctx.params.name!);
        const b = parseBody(ReleaseBody, await ctx.body());
        await v.release(b.reason ?? 'no reason given', b.epoch);
        return { json: { released: true } };
      },
    },
    {
      method: 'POST', path: '/v1/peer/vms/:name/takeover', access: 'write',
      handler: async (ctx) => {
        const v = vmOr404(agent, ctx.params.name!);
        const b = parseBody(TakeoverBody, await ctx.body());
        v.requestTakeover(b.reason ?? 'requested by peer', b.epoch);
        return { status: 202, json: { accepted: true } };
      },
    },
  ];
}
