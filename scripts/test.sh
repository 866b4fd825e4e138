#!/usr/bin/env bash
# Runs the whole test suite (unit, lab, daemon, Prometheus), after installing what it needs.
# Idempotent. Needs root on Debian 12 for the lab tests (real libvirtd + QEMU hosts).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
"$here/scripts/setup.sh"
venv=${BALANCERD_VENV:-$here/.venv}
echo "== lint and types"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy" balancerd
echo "== tests"
"$venv/bin/pytest" -ra "$@"
