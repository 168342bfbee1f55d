#!/bin/sh
# Memory-dirtying work loop for the throughput benchmark: rewrites N MiB of tmpfs each round
# and prints "work <rounds>" on the serial console once per round.
mib=$1; mkdir -p /run/dirty; mount -t tmpfs -o size=$((mib+8))m tmpfs /run/dirty
r=0
while true; do
  dd if=/dev/zero of=/run/dirty/buf bs=1M count="$mib" conv=notrunc 2>/dev/null
  r=$((r+1)); echo "work $r" > /dev/ttyS0
done
