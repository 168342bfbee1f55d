#!/bin/sh
# One TCP connection of the guest's "transaction" service (run by `nc -ll -e`).
# Request lines:  "inc" -> durable counter += 1, written + fsynced to sector 8, THEN reply the value
#                 "get" -> reply the durable counter as read from the disk (O_DIRECT)
# A mkdir lock serialises concurrent connections so no increment is lost.
readsec() { dd if=/dev/vda bs=512 skip=8 count=1 iflag=direct 2>/dev/null | tr -dc '0-9'; }
while read -r line; do
  case "$line" in
    get*) v=$(readsec); echo "${v:-0}" ;;
    *)
      until mkdir /run/txn.lock 2>/dev/null; do usleep 1000; done
      v=$(readsec); v=$((${v:-0}+1))
      printf '%s\n' "$v" | dd of=/dev/vda bs=512 seek=8 count=1 conv=notrunc,sync,fsync 2>/dev/null
      rmdir /run/txn.lock
      echo "txn $v" > /dev/ttyS0
      echo "$v" ;;
  esac
done
