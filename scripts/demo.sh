#!/usr/bin/env bash
# The main job on the built-in lab: install everything, bring up an imbalanced 3-host lab
# (six guests, all on host1), show it, let the daemon balance it, show it again.
# Idempotent: a lab that is already up is reused (`balancerd lab down` removes it).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
bd="$here/.venv/bin/balancerd"
lab_dir=${BALANCERD_LAB_DIR:-/var/lib/balancerd-lab/bd}
cycles=${BALANCERD_DEMO_CYCLES:-3}

echo "== lab up (3 hosts, 6 guests on host1)"
"$bd" lab up --dir "$lab_dir" --policy "$here/policies/lab-demo.yaml"
config="$lab_dir/balancerd.yaml"
echo
echo "== before: balancerd status --config $config"
"$bd" status --config "$config"
echo
echo "== the daemon's plan (dry run): balancerd plan --config $config"
"$bd" plan --config "$config"
echo
echo "== balancerd run --config $config --cycles $cycles (metrics on http://127.0.0.1:9177/metrics)"
"$bd" run --config "$config" --cycles "$cycles"
echo
echo "== after: balancerd status --config $config"
"$bd" status --config "$config"
echo
echo "The lab stays up: try 'balancerd plan --config $config', or remove it with"
echo "'$bd lab down --dir $lab_dir'."
