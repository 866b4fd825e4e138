#!/usr/bin/env bash
# Installs everything balancerd and its tests need on Debian 12 (as root). Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${BALANCERD_VENV:-$here/.venv}

debs=(libvirt-daemon-system libvirt-clients libvirt-dev qemu-system-x86 qemu-utils
      libsystemd-dev pkg-config busybox-static cpio iproute2 gcc libc6-dev bindfs
      prometheus systemd coinor-cbc faketime iptables etcd-server etcd-client
      gnutls-bin dpkg-dev mmdebstrap systemd-container)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's libvirt/prometheus/etcd postinst scripts try to start services; there is no
  # systemd as PID 1 here, so forbid that (we start our own daemons).
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e "$here[dev]"
# balancerd lab: guest kernel (Debian's linux-image-cloud-amd64) + initramfs, built once into
# ${BALANCERD_LAB_CACHE:-/var/cache/balancerd-lab}; resolving the kernel package needs apt lists.
if ! ls "${BALANCERD_LAB_CACHE:-/var/cache/balancerd-lab}"/vmlinuz-* >/dev/null 2>&1; then
  apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
fi
"$venv/bin/python" -c 'from balancerd.lab.images import ensure_images; i = ensure_images(); print(f"setup: lab images {i.kernel} {i.initrd}")'
echo "setup: ok (venv: $venv)"
