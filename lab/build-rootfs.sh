#!/bin/bash
# Builds (once) the Debian bookworm rootfs of the nspawn test hosts used by the Ansible tests,
# cached under ${FTKVM_CACHE:-$HOME/.cache/ftkvm}/nspawn: rootfs-<key>.tar.zst (the cache) and
# rootfs-<key>/ (the read-only overlay lower dir, restored from the tarball in ~2 s if missing).
# The key hashes the package list and REVISION: changing either rebuilds.
#   build-rootfs.sh            prints the rootfs directory on its last line
set -euo pipefail
CACHE=${FTKVM_CACHE:-$HOME/.cache/ftkvm}/nspawn
MIRROR=${FTKVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What a freshly installed Debian 12 "server" has, plus what the roles install (the hosts have
# no Internet access in the tests: packages the roles want must already be there, the package
# tasks then only verify them).
PKGS=systemd,systemd-sysv,dbus,libpam-systemd,openssh-server,python3,python3-apt,iproute2,iputils-ping,procps,kmod,netbase,network-manager,sudo,nftables,firewalld,qemu-system-x86,qemu-utils,ca-certificates
# Bump REVISION when the customisation below changes (the package list is part of the key).
REVISION=1
KEY=$(printf '%s\n' "$PKGS" "$REVISION" | sha256sum | cut -c1-12)
OUT=$CACHE/rootfs-$KEY
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9
if [ -e "$OUT/etc/os-release" ]; then echo "$OUT"; exit 0; fi
if [ -e "$OUT.tar.zst" ]; then
  rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
  tar --zstd -xpf "$OUT.tar.zst" -C "$OUT.tmp" --numeric-owner
  mv "$OUT.tmp" "$OUT"; echo "$OUT"; exit 0
fi
R=$OUT.tmp
rm -rf "$R"; mkdir -p "$R"
echo "[rootfs] debootstrap bookworm into $R (once, ~2 min)" >&2
debootstrap --variant=minbase --include="$PKGS" --components=main bookworm "$R" "$MIRROR" >&2
echo "deb $MIRROR bookworm main" > "$R/etc/apt/sources.list"
: > "$R/etc/machine-id"                  # generated per container at boot
rm -f "$R"/etc/ssh/ssh_host_*            # generated per container at boot (unit below)
cat > "$R/etc/systemd/system/ssh-hostkeys.service" <<'UNIT'
[Unit]
Description=Generate SSH host keys if missing
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
chroot "$R" systemctl enable ssh-hostkeys.service ssh.service NetworkManager.service >/dev/null 2>&1 || true
# firewalld is installed but off, like a host where the firewall role has not run yet
chroot "$R" systemctl disable firewalld.service >/dev/null 2>&1 || true
chroot "$R" systemctl mask systemd-timesyncd.service getty@tty1.service console-getty.service >/dev/null 2>&1 || true
sed -i 's/^#\?PermitRootLogin.*/PermitRootLogin prohibit-password/' "$R/etc/ssh/sshd_config"
echo 'UseDNS no' >> "$R/etc/ssh/sshd_config"
mkdir -p "$R/etc/NetworkManager/conf.d"
printf '[main]\nplugins=keyfile\nno-auto-default=*\n[keyfile]\nunmanaged-devices=none\n' > "$R/etc/NetworkManager/conf.d/10-testbed.conf"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
tar --zstd -cpf "$OUT.tar.zst.tmp" -C "$R" --numeric-owner .
mv "$OUT.tar.zst.tmp" "$OUT.tar.zst"
mv "$R" "$OUT"
du -sh "$OUT" "$OUT.tar.zst" >&2
# drop the images of older versions of this script (unless a lab still has one mounted)
for old in "$CACHE"/rootfs-*; do
  case $old in "$OUT"|"$OUT.tar.zst") continue ;; esac
  grep -q "lowerdir=${old%.tar.zst}[,:]" /proc/mounts || rm -rf "$old"
done
echo "$OUT"
