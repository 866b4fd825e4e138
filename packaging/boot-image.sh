#!/usr/bin/env bash
# Builds (once) the Debian 12 tree the boot test runs under systemd-nspawn --boot:
# systemd as PID 1, journald, D-Bus, and the Debian packages balancerd's .deb depends on,
# so `apt install ./balancerd_*.deb` inside it needs no network.
#
#   packaging/boot-image.sh [DIR]     (default /var/cache/balancerd-boot/bookworm)
#
# Prints the tree's path. Idempotent: a finished tree (DIR/.balancerd-boot-ok holding this
# recipe's hash) is reused; a changed recipe or a half-built tree is rebuilt.
# Needs root, mmdebstrap and Debian's package registry (as scripts/setup.sh has).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-${BALANCERD_BOOT_CACHE:-/var/cache/balancerd-boot}/bookworm}

# The package's Depends (packaging/build-deb.sh) plus what the boot test uses inside.
include=(systemd systemd-sysv dbus libpam-systemd
         python3 python3-libvirt python3-systemd python3-yaml python3-numpy
         coinor-cbc libvirt-clients iproute2 procps curl ca-certificates)
recipe_hash=$( { cat "$0"; printf '%s\n' "${include[@]}"; } | sha256sum | cut -c1-16)

if [ -f "$dir/.balancerd-boot-ok" ] && [ "$(cat "$dir/.balancerd-boot-ok")" = "$recipe_hash" ]; then
  echo "$dir"
  exit 0
fi
command -v mmdebstrap >/dev/null || { echo "boot-image: mmdebstrap missing (scripts/setup.sh)" >&2; exit 1; }
rm -rf "$dir" "$dir.tmp"
mkdir -p "$(dirname "$dir")"
inc=$(IFS=,; echo "${include[*]}")
# --variant=minbase + systemd: no recommends. The hook leaves a root password unset,
# a machine-id to be generated at first boot, and no getty on a console nobody reads.
mmdebstrap --variant=minbase --include="$inc" \
  --customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"' \
  --customize-hook='chroot "$1" systemctl mask console-getty.service getty@tty1.service systemd-networkd-wait-online.service >/dev/null 2>&1 || true' \
  --customize-hook='echo balancerd-boot > "$1/etc/hostname"' \
  bookworm "$dir.tmp" >&2
echo "$recipe_hash" > "$dir.tmp/.balancerd-boot-ok"
mv "$dir.tmp" "$dir"
echo "$dir"
