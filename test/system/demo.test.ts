// The README's first command, as a user runs it: `scripts/demo` (up: install, build, two
// nspawn hosts + witness, site.yml, protect.yml, status, drill.yml, report), then
// `scripts/demo status`, `scripts/demo down`. Down must leave nothing behind.
import test from 'ava';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { ROOT } from '../../lab/guest.ts';

const INDEX = 91; // not the demo's default (90): a user's own demo on this machine is left alone
const env = { ...process.env, FTKVM_DEMO_INDEX: String(INDEX), NO_COLOR: '1' };
const labDir = `/tmp/ftkvm-nspawn-${INDEX}`;

function demo(args: string[], timeoutMs: number): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn('bash', ['scripts/demo', ...args], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { out += d; });
    const timer = setTimeout(() => p.kill('SIGTERM'), timeoutMs);
    p.on('close', (code) => { clearTimeout(timer); resolve({ code, out }); });
  });
}

function leftovers(): string[] {
  const found: string[] = [];
  const netns = spawnSync('ip', ['netns', 'list']).stdout.toString().split('\n').filter((l) => l.startsWith(`fk${INDEX}`));
  if (netns.length) found.push(`network namespaces: ${netns.join(', ')}`);
  const mounts = readFileSync('/proc/mounts', 'utf8').split('\n').filter((l) => l.includes(labDir));
  if (mounts.length) found.push(`mounts: ${mounts.length}`);
  if (existsSync(labDir)) found.push(`${labDir} still exists`);
  const procs = spawnSync('pgrep', ['-af', `machine=fk${INDEX}-`]).stdout.toString().trim();
  if (procs) found.push(`processes: ${procs}`);
  const links = spawnSync('ip', ['-br', 'link']).stdout.toString().split('\n').filter((l) => l.startsWith(`fk${INDEX}`));
  if (links.length) found.push(`links: ${links.join(', ')}`);
  return found;
}

/** What a failed `up` leaves to look at: each host's agent journal, bridge and neighbours, drill reports. */
async function diagnostics(): Promise<string> {
  const out: string[] = [];
  for (const h of ['A', 'B']) {
    const cmd = 'journalctl -u ftkvm-agent --no-pager -o short-iso-precise -n 80 | grep -v " debug "; ' +
      'echo "-- bridge fdb"; bridge fdb show br br-ftkvm | grep -v permanent; echo "-- links"; ip -br link; ' +
      'echo "-- neighbours"; ip neigh; echo "-- drill reports"; for f in /var/lib/ftkvm/drills/*.json; do [ -f "$f" ] && cat "$f"; done';
    const r = await demo(['exec', h, 'sh', '-c', cmd], 60_000);
    out.push(`---- host${h}\n${r.out.trim()}`);
  }
  return out.join('\n');
}

test.after.always('the demo is removed even when a step failed', async () => {
  if (existsSync(labDir)) await demo(['down'], 120_000);
});

test('scripts/demo: up provisions, protects and drills a pair (PASS, nothing lost); status shows it; down leaves nothing', async (t) => {
  t.timeout(1_200_000);
  const up = await demo(['up'], 1_100_000);
  t.log(up.out.split('\n').filter((l) => /^\[\d\/\d\]|verdict|failover |nothing lost|re-protected|The pair is up/.test(l)).join('\n'));
  if (up.code !== 0) t.log(await diagnostics());
  t.is(up.code, 0, up.out.slice(-4000));
  t.regex(up.out, /verdict\s+PASS/);
  t.regex(up.out, /nothing lost\s+\d+ transactions over one TCP connection \(kept\)/);
  t.regex(up.out, /counter consecutive/);
  t.regex(up.out, /re-protected\s+yes/);

  const st = await demo(['status'], 60_000);
  t.is(st.code, 0, st.out);
  t.regex(st.out, /---- hostA[\s\S]*---- hostB/);
  t.regex(st.out, /demo\s+primary\s+protected/, 'one host runs the VM protected');
  t.regex(st.out, /demo\s+secondary\s+secondary/, 'the other holds the replica');

  const down = await demo(['down'], 180_000);
  t.is(down.code, 0, down.out);
  t.regex(down.out, /namespaces left: 0, mounts left: 0, lab dir gone/);
  t.deepEqual(leftovers(), [], 'independently checked: nothing of the demo is left');
});
