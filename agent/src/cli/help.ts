export const HELP = `ftkvm-agent — fault-tolerant KVM virtual machines (QEMU COLO) agent

Usage: ftkvm-agent <command> [options]

Commands:
  run            run the agent (systemd service): supervise QEMU, replicate, fail over, serve the API
  status         show this node, its peer, witness and every protected VM (--json for scripts)
  drill VM       failover drill: crash the primary's QEMU, verify takeover, probe and re-protection
  switchover VM  planned move of the primary role to the other host (then re-protected back)
  witness        run the witness lease service (third machine)
  fencer         the lease fencer (started by the agent in witness mode; not run by hand)
  dr-target      run the DR site's agent: keep recovery points, boot test copies, DR failover
  dr-pull VM     fail-back: bring this host's copy of the VM's disk in line with the DR site's
  check-config   validate agent.yaml and exit
  version        print version and git commit

Common options:
  -c, --config PATH     agent configuration (default /etc/ftkvm/agent.yaml, or $FTKVM_CONFIG)
      --url URL         talk to this agent API instead of the one in the configuration
      --token-file PATH bearer token for mutating calls (default: api.token_file of the configuration)
  -h, --help            help for a command: ftkvm-agent <command> --help

Exit codes: 0 ok, 1 failure, 2 usage or invalid configuration, 3 QEMU lacks COLO support,
            4 agent unreachable, 5 not healthy / drill failed / request refused`;

const PER: Record<string, string> = {
  'dr-pull': `Usage: ftkvm-agent dr-pull VM [--final] [--json] [-c /etc/ftkvm/agent.yaml]

Fail-back after a DR failover (playbooks/dr-failback.yml runs it). On the host that is to run the
VM again, with its agent stopped and no QEMU of the VM here: copies from the DR site only the
1 MiB chunks of the VM's disk that differ from this host's copy (an empty disk of the same size
gets all that is not zero). Without --final: from the recovery point the VM was activated from,
while it still runs at the DR site. --final: from its own disk there, once stopped; then this
node's state takes the DR epoch, so this node runs the VM at the next start and asks the
witness for a newer epoch.`,
  'dr-target': `Usage: ftkvm-agent dr-target [-c /etc/ftkvm/dr-target.yaml]

The agent of a host at the DR site (README "Disaster recovery"). The VMs' primaries ship
crash-consistent recovery points to it every dr.interval_s (vms[].dr in agent.yaml); it keeps the
newest \`keep\` of each VM as a qcow2 chain and never shows a point before it is complete.
playbooks/dr-test.yml boots a copy of a point with no network but a loopback port to its probe,
checks the guest answers and discards it; playbooks/dr-failover.yml starts the VM here on the DR
site's bridge after taking its lease at the witness at a new epoch.`,
  fencer: `Usage: ftkvm-agent fencer --state-dir DIR

Started by the agent (witness mode), detached, and left running across agent restarts, as QEMU
is. It renews this host's primaries' leases at the witness like the agent does, and freezes a
primary's QEMU (SIGSTOP) when the lease can no longer be proven and the agent has not vouched
for a live peer within two heartbeat intervals (the agent dead or hung while the host is cut
off); it thaws it (SIGCONT) when the witness renews the lease again. Logs to DIR/fencer.log.`,
  run: `Usage: ftkvm-agent run [--config PATH]

Validates the configuration (refuses to start, exit 2, on any error: the message names the
file, line and field), probes QEMU for COLO support (exit 3 if missing), re-attaches to QEMU
processes a previous agent left running, then supervises and replicates every VM.
QEMU runs in its own process group: stopping or restarting the agent never stops a guest.`,
  status: `Usage: ftkvm-agent status [--json] [--check] [--config PATH | --url URL]

Per VM: role (primary|secondary|standalone), COLO state, epoch, QEMU state, checkpoints (count,
last, pause), resync progress and the last failover; plus peer heartbeat paths and witness.
  --json   machine-readable (status and health in one document)
  --check  exit 5 when the node is not healthy`,
  'check-config': `Usage: ftkvm-agent check-config [--config PATH | PATH]

Validates agent.yaml exactly as \`run\` does (schema, addresses, ports, files) and exits 0 or 2.`,
  version: 'Usage: ftkvm-agent version   (or --version)',
  witness: `Usage: ftkvm-agent witness --listen ADDRESS:PORT [--data-dir /var/lib/ftkvm-witness]
                           (--credentials FILE [--token-file FILE] | --token-file FILE)
                           [--tls-cert FILE --tls-key FILE]

The lease service that decides who may run a VM as primary when the two hosts cannot see
each other. Run it on a third machine reachable from both hosts' management networks.
Leases (holder, epoch, expiry) are stored durably in the data directory.
  --credentials FILE  per-node identity (YAML: nodes: {NODE: {pair: PAIR, token_sha256: HEX}}):
                      each host authenticates with its own token (witness.token_file) and may
                      take leases only for itself, only for its pair's VMs. SIGHUP reloads it.
  --token-file FILE   with --credentials: a read-only token (lists every lease); without it:
                      one token shared by every node (default /etc/ftkvm/token; any holder
                      can act for any node: labs only)
  --tls-cert, --tls-key  serve HTTPS with this certificate (chain) and key, PEM; the agents
                      trust it with witness.ca_file`,
  drill: `Usage: ftkvm-agent drill VM [--wait] [--json] [--config PATH | --url URL]

Fails the VM's current primary QEMU the way a crash would (SIGKILL), lets the secondary take
over, waits for protection to be rebuilt onto the old primary and reports: failover time,
the guest probe (vms[].probe: connection kept, transactions consecutive), checkpoints
before/after, re-protection time, verdict. Refused (exit 5) when the VM is not fully
protected. Can be run on either host: the secondary forwards it to the primary.
  --wait   show progress and the final report; exit 0 on pass, 5 on fail`,
  switchover: `Usage: ftkvm-agent switchover VM [--wait] [--json] [--config PATH | --url URL]

Planned maintenance: moves the primary role to the other host (the secondary takes over from
its replica; nothing the guest acknowledged is lost) and rebuilds protection onto the old
primary, so that host can be patched later with another switchover. Refused (exit 5) when
the VM is not fully protected.`,
};

export function commandHelp(cmd: string): string {
  return PER[cmd] ?? HELP;
}
