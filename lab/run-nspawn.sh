#!/bin/bash
# Boots one nspawn test host in its own cgroup (the machine has no systemd: nspawn would
# otherwise split the caller's cgroup, and two containers would share their unit cgroups).
#   run-nspawn.sh CGROUP MACHINE HOSTNAME ROOTDIR NETNS
# exec's systemd-nspawn: this script's pid is nspawn's. SIGTERM = clean poweroff.
set -euo pipefail
cg=$1 machine=$2 hostname=$3 root=$4 ns=$5
if grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts; then hiers=.; else
  hiers=
  grep -q ' /sys/fs/cgroup/systemd cgroup ' /proc/mounts && hiers="$hiers systemd"
  grep -q ' /sys/fs/cgroup/unified cgroup2 ' /proc/mounts && hiers="$hiers unified"
fi
[ -n "$hiers" ] || { echo "no usable cgroup hierarchy (need cgroup2 or name=systemd)" >&2; exit 1; }
for h in $hiers; do
  mkdir -p "/sys/fs/cgroup/$h/ftkvm-nspawn/$cg"
  echo $$ > "/sys/fs/cgroup/$h/ftkvm-nspawn/$cg/cgroup.procs"
done
exec systemd-nspawn --boot --directory="$root" --machine="$machine" --hostname="$hostname" \
  --register=no --keep-unit --link-journal=no --private-users=no \
  --private-network --network-namespace-path="/run/netns/$ns" \
  --bind=/dev/net/tun --console=pipe </dev/null
