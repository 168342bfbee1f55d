// The agent's HTTP API. Read-only endpoints are served from state the agent keeps current (no
// QMP round-trip on the hot path). /v1/peer/* is the agent-to-agent protocol.
import type { Agent } from '../agent.ts';
import { field, HttpError, type Route } from './http.ts';

function vmOr404(agent: Agent, name: string) {
  const v = agent.vm(name);
  if (!v) throw new HttpError(404, 'NO_SUCH_VM', `no protected VM named "${name}" on this node (known: ${[...agent.controllers.keys()].join(', ') || 'none'})`);
  return v;
}

export function buildRoutes(agent: Agent): Route[] {
  return [
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
        const b = await ctx.body();
        await v.prepareSecondary({
          epoch: field<number>(b, 'epoch', 'number', true)!,
          sizeBytes: field<number>(b, 'sizeBytes', 'number', true)!,
          primary: field<string>(b, 'primary', 'string', true)!,
        });
        return { json: { ready: true } };
      },
    },
    {
      method: 'POST', path: '/v1/peer/vms/:name/release', access: 'write',
      handler: async (ctx) => {
        const v = vmOr404(agent, ctx.params.name!);
        await v.release(field<string>(await ctx.body(), 'reason', 'string', false) ?? 'no reason given');
        return { json: { released: true } };
      },
    },
    {
      method: 'POST', path: '/v1/peer/vms/:name/takeover', access: 'write',
      handler: async (ctx) => {
        const v = vmOr404(agent, ctx.params.name!);
        v.requestTakeover(field<string>(await ctx.body(), 'reason', 'string', false) ?? 'requested by peer');
        return { status: 202, json: { accepted: true } };
      },
    },
  ];
}
