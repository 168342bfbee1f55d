#!/bin/busybox sh
# ftkvm test guest /init (busybox initramfs, Debian cloud kernel).
# Kernel command line knobs:
#   ftkvm.ip=ADDR/PREFIX   address of eth0 (default: no network service)
#   ftkvm.tick_ms=N        disk counter period (default 100)
#   ftkvm.dirty_mib=N      also run a memory-dirtying loop over N MiB, printing "work N" (bench)
#   ftkvm.fill_mib=N       before the services start, fill N MiB of RAM (tmpfs) with non-zero
#                          data and keep it: memory a migration must really copy (bench)
#   ftkvm.disk_kib_s=N     also write about N KiB/s of random data to /dev/vda in 64 KiB blocks at
#   ftkvm.disk_span_mib=S  random places of the S MiB (default 64) after the first MiB (bench/dr)
#   ftkvm.tcpview_s=N      every N s print the guest's own view of its port-7000 TCP connections
#                          (/proc/net/tcp{,6} rows: queues, timers, retransmits) as "tcpview ..." (soak)
# Disk layout (/dev/vda, 512-byte sectors, read with O_DIRECT so values come from the disk):
#   sector 0: tick counter      sector 8: transaction counter
# Serial console lines the tests parse:
#   GUEST-UP <uptime> <ip>           once, when the services run
#   tick N disk=M                    every tick: N in memory, M read back from the disk after the fsync
#   txn V                            every acknowledged transaction (V = durable counter)
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net virtio_blk; do
  [ -f /lib/modules/$m.ko ] && { insmod /lib/modules/$m.ko || echo "insmod $m FAILED" > /dev/ttyS0; }
done
arg() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" /proc/cmdline; }
IP=$(arg ftkvm.ip); TICK_MS=$(arg ftkvm.tick_ms); DIRTY=$(arg ftkvm.dirty_mib); TCPVIEW=$(arg ftkvm.tcpview_s)
TICK_MS=${TICK_MS:-100}
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "GUEST-ERROR no /dev/vda" > /dev/ttyS0; }
ip link set lo up
if [ -n "$IP" ]; then
  ip link set eth0 up; ip addr add "$IP" dev eth0
  # persistent server: one forked handler per connection
  nc -ll -p 7000 -e /bin/txn-handler &
fi
if [ -n "$DIRTY" ]; then /bin/dirty-loop "$DIRTY" & fi
DISKW=$(arg ftkvm.disk_kib_s); SPAN=$(arg ftkvm.disk_span_mib)
if [ -n "$DISKW" ]; then
  ( blocks=$(( ${SPAN:-64} * 16 )); per=$(( (DISKW + 63) / 64 ))
    while true; do
      i=0
      while [ $i -lt $per ]; do
        dd if=/dev/urandom of=/dev/vda bs=64k seek=$(( 16 + RANDOM % blocks )) count=1 conv=notrunc oflag=direct 2>/dev/null
        i=$((i+1))
      done
      sleep 1
    done ) &
fi
FILL=$(arg ftkvm.fill_mib)
if [ -n "$FILL" ]; then
  mkdir -p /run/fill; mount -t tmpfs -o size=$((FILL+8))m tmpfs /run/fill
  yes ftkvm-fill-0123456789abcdef | head -c $((FILL*1048576)) > /run/fill/buf
  echo "FILLED $FILL" > /dev/ttyS0
fi
if [ -n "$TCPVIEW" ]; then
  # port 7000 = 1B58; local/remote address, state, tx:rx queue, timer:when, retransmits
  while sleep "$TCPVIEW"; do
    awk '$2 ~ /:1B58$/ {print "tcpview " $2, $3, $4, $5, $6, $7}' /proc/net/tcp /proc/net/tcp6 > /dev/ttyS0
  done &
fi
echo "GUEST-UP $(cut -d' ' -f1 /proc/uptime) ${IP:-no-ip}" > /dev/ttyS0
readsec() { dd if=/dev/vda bs=512 skip=$1 count=1 iflag=direct 2>/dev/null | tr -dc '0-9'; }
n=$(readsec 0); n=${n:-0}
period=$(awk "BEGIN{printf \"%.3f\", $TICK_MS/1000}")
while true; do
  n=$((n+1))
  printf '%s\n' "$n" | dd of=/dev/vda bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null
  echo "tick $n disk=$(readsec 0)" > /dev/ttyS0
  sleep "$period"
done
