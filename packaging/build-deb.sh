#!/usr/bin/env bash
# Builds the Debian package of balancerd from this checkout:
#
#   packaging/build-deb.sh [OUTDIR]      -> OUTDIR/balancerd_VERSION_ARCH.deb (default: dist/)
#
# Prints the path of the .deb. Needs dpkg-deb (dpkg), git, Python 3.11 with pip (the
# project's .venv, made by scripts/setup.sh) and PyPI for the vendored wheels (cached in
# ${BALANCERD_WHEEL_CACHE:-/var/cache/balancerd-build/wheels}).
#
# What goes where (installs with `apt install ./balancerd_*.deb` on Debian 12):
#   /usr/bin/balancerd                    launcher: /usr/bin/python3 -I, vendored path first
#   /usr/lib/balancerd/                   balancerd itself + the Python packages Debian 12
#                                         lacks or has too old: prometheus-client (TLS needs
#                                         >= 0.17; Debian has 0.16), APScheduler + tzlocal,
#                                         PuLP (with its CBC), highspy (HiGHS; not in
#                                         Debian): pinned to the versions the tests ran with
#   Depends (from Debian): python3 3.11, python3-libvirt (built against Debian's libvirt),
#                          python3-systemd, python3-yaml, python3-numpy, systemd
#   /lib/systemd/system/balancerd.service, /usr/lib/sysusers.d/balancerd.conf,
#   /usr/lib/tmpfiles.d/balancerd.conf
#   /etc/balancerd/balancerd.yaml, /etc/balancerd/policies/*.yaml   (conffiles)
#   /usr/share/doc/balancerd/ (README.md, docs, copyright, examples: policies, dashboard)
# highspy and PuLP's CBC are compiled code, so the package is for this architecture
# (amd64), not "all". The package does not enable or start the service: the example
# configuration names example hosts; edit it, then `systemctl enable --now balancerd`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$here/dist}" && cd "${1:-$here/dist}" && pwd)
venv=${BALANCERD_VENV:-$here/.venv}
wheels=${BALANCERD_WHEEL_CACHE:-/var/cache/balancerd-build/wheels}
py=$venv/bin/python
[ -x "$py" ] || { echo "build-deb: no $py (run scripts/setup.sh)" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/pyproject.toml" | head -1)
arch=$(dpkg --print-architecture)
[ -n "$version" ] || { echo "build-deb: no version in pyproject.toml" >&2; exit 1; }

# The vendored packages at the versions installed in the venv (what the tests ran).
vendored=()
for dist in prometheus-client APScheduler tzlocal PuLP highspy; do
  v=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
  vendored+=("$dist==$v")
done

work=$(mktemp -d /tmp/balancerd-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
lib=$root/usr/lib/balancerd
doc=$root/usr/share/doc/balancerd
mkdir -p "$lib" "$doc/examples/policies" "$root/usr/bin" "$root/lib/systemd/system" \
  "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" "$root/etc/balancerd/policies" \
  "$root/DEBIAN"

# The source: the committed tree when this is a git checkout (no stray files), else the
# folder as it is.
src=$work/src
mkdir -p "$src"
if git -C "$here" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$here" archive HEAD balancerd policies systemd docs dashboards README.md \
    | tar -x -C "$src"
  revision=$(git -C "$here" rev-parse --short HEAD)
else
  cp -r "$here/balancerd" "$here/policies" "$here/systemd" "$here/docs" \
    "$here/dashboards" "$here/README.md" "$src/"
  revision=unknown
fi

mkdir -p "$wheels"
"$py" -m pip download -q --only-binary=:all: --no-deps -d "$wheels" "${vendored[@]}"
"$py" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile \
  --target "$lib" "${vendored[@]}"
cp -r "$src/balancerd" "$lib/balancerd"
find "$lib" -name '__pycache__' -prune -exec rm -rf {} +
rm -rf "$lib/bin"  # console scripts of the vendored packages: not ours to ship
# Byte-compile with Debian's python3 (3.11), whose cache tag the launcher uses.
compile_py=/usr/bin/python3
[ -x "$compile_py" ] || compile_py=$py
"$compile_py" -m compileall -q -j0 "$lib" >/dev/null

cat > "$root/usr/bin/balancerd" <<'EOF'
#!/usr/bin/python3 -I
# balancerd (Debian package): its own Python packages come first.
import sys

sys.path.insert(0, "/usr/lib/balancerd")
from balancerd.cli import main  # noqa: E402

sys.exit(main())
EOF
chmod 755 "$root/usr/bin/balancerd"

install -m644 "$src/systemd/balancerd.service" "$root/lib/systemd/system/balancerd.service"
install -m644 "$src/systemd/balancerd.sysusers" "$root/usr/lib/sysusers.d/balancerd.conf"
install -m644 "$src/systemd/balancerd.tmpfiles" "$root/usr/lib/tmpfiles.d/balancerd.conf"
install -m644 "$src/systemd/balancerd.yaml" "$root/etc/balancerd/balancerd.yaml"
for p in balance power-save maintenance-drain; do
  install -m644 "$src/policies/$p.yaml" "$root/etc/balancerd/policies/$p.yaml"
done
install -m644 "$src"/policies/*.yaml "$doc/examples/policies/"
install -m644 "$src/dashboards/balancerd.json" "$doc/examples/grafana-dashboard.json"
for f in "$src"/dashboards/alerts.yml; do
  [ -f "$f" ] && install -m644 "$f" "$doc/examples/prometheus-alerts.yml"
done
install -m644 "$src/README.md" "$doc/README.md"
if [ -d "$src/docs" ]; then
  (cd "$src/docs" && find . -type f -name '*.md' -exec install -D -m644 {} "$doc/{}" \;)
fi
cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: balancerd
Source: built from revision $revision

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

Files: usr/lib/balancerd/prometheus_client* usr/lib/balancerd/apscheduler*
 usr/lib/balancerd/tzlocal* usr/lib/balancerd/pulp* usr/lib/balancerd/highspy*
Comment: vendored from PyPI (${vendored[*]}); each keeps its license file in its
 .dist-info folder next to it.
License: various (Apache-2.0, MIT, BSD)
EOF

cat > "$root/DEBIAN/conffiles" <<'EOF'
/etc/balancerd/balancerd.yaml
/etc/balancerd/policies/balance.yaml
/etc/balancerd/policies/power-save.yaml
/etc/balancerd/policies/maintenance-drain.yaml
EOF
cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  systemd-sysusers balancerd.conf
  systemd-tmpfiles --create balancerd.conf
  chgrp balancerd /etc/balancerd/balancerd.yaml
  chmod 0640 /etc/balancerd/balancerd.yaml
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # an upgrade restarts a running daemon; a first install starts nothing
    [ -z "$2" ] || systemctl try-restart balancerd.service || true
  fi
fi
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop balancerd.service || true
  systemctl disable balancerd.service >/dev/null 2>&1 || true
fi
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /var/lib/balancerd
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
EOF
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: balancerd
Version: $version
Architecture: $arch
Maintainer: balancerd developers <balancerd@localhost>
Installed-Size: $size
Depends: python3 (>= 3.11), python3 (<< 3.12), python3-libvirt, python3-systemd, python3-yaml, python3-numpy, systemd
Recommends: coinor-cbc, libvirt-clients
Suggests: ipmitool, prometheus
Section: admin
Priority: optional
Homepage: file:///usr/share/doc/balancerd/README.md
Description: policy-driven load balancing for KVM/libvirt clusters
 balancerd collects host and guest utilization from libvirt, solves a
 placement ILP for a YAML policy (balance or power-save) with CBC or HiGHS,
 and live-migrates guests with preflight checks, convergence handling and a
 crash-safe journal. Runs as a systemd service (Type=notify, watchdog, reload).
EOF

deb=$out/balancerd_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
