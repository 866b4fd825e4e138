"""Balance at scale: ours vs the naive whole ILP vs greedy first-fit-decreasing, same run.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 100x2000,1000x20000] [--seed 1]
        [--naive-time-limit 60] [--naive-max-guests 2000] [--ilp-time-limit 4]
        [--backends cbc,highs]

Each method runs in its own forked process (peak RSS is that process's own, plus its
solver subprocess). Quality: highest weighted host utilization against the bound
max_r(total demand_r / total capacity_r) (the LP relaxation's value on these clusters,
whose hosts all have the same memory per core), and moves against the fewest moves any
placement needs to bring every host to the utilization the method reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancerd.decide import decide
from balancerd.model import Placement, Snapshot
from balancerd.policy.model import Policy
from balancerd.solve.heuristic import build_units, target_caps
from balancerd.solve.ilp import solve_ilp
from balancerd.solve.problem import (
    balance_lower_bound,
    build_problem,
    max_utils,
    move_lower_bound,
)
from balancerd.solve.verify import blocking, verify
from benchmarks.common import (
    bench_policy,
    command_line,
    first_fit_decreasing,
    isolated,
    print_table,
    synthetic_cluster,
)


def _quality(snapshot: Snapshot, pol: Policy, host_of: dict[str, str]) -> dict[str, Any]:
    p = build_problem(snapshot, pol)
    idx = [p.host_index[host_of[g]] for g in p.guests]
    uc, um = max_utils(p, idx)
    viol = verify(snapshot, pol, Placement(host_of))
    # valid: nothing new broken, and no host left over a hard limit (even one that was)
    viol = blocking(viol) + [v for v in viol if v.kind == "capacity"]
    return {
        "util": max(p.w_cpu * uc, p.w_mem * um),
        "bound": balance_lower_bound(p),
        "moves": sum(1 for g in range(p.n_guests) if idx[g] != p.cur[g]),
        "move_lb": move_lower_bound(p, uc, um),
        "valid": not viol,
    }


def run_ours(snapshot: Snapshot, pol: Policy, use_ilp: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = decide(snapshot, pol, use_ilp=use_ilp)
    seconds = time.perf_counter() - t0
    q = _quality(snapshot, pol, dict(plan.target.host_of))
    q.update(
        seconds=seconds,
        status=f"{plan.solver.backend}/{plan.solver.status}",
        steps=len(plan.moves),
        waves=len({m.wave for m in plan.moves}),
    )
    return q


def run_ffd(snapshot: Snapshot, pol: Policy) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = build_problem(snapshot, pol)
    lb = balance_lower_bound(p)
    host_of = None
    slack = 0.01
    while host_of is None and slack < 1.0:
        cc, cm = target_caps(p, (lb + slack) / p.w_cpu, (lb + slack) / p.w_mem)
        host_of = first_fit_decreasing(p, cc, cm)
        slack += 0.005
    seconds = time.perf_counter() - t0
    if host_of is None:
        return {"seconds": seconds, "status": "failed"}
    q = _quality(snapshot, pol, {p.guests[g]: p.hosts[host_of[g]] for g in range(p.n_guests)})
    q.update(seconds=seconds, status=f"target +{slack - 0.005:.3f}")
    return q


def run_naive(snapshot: Snapshot, pol: Policy, time_limit_s: float) -> dict[str, Any]:
    """One binary per guest x host, the whole problem at once, CBC, time-limited."""
    t0 = time.perf_counter()
    p = build_problem(snapshot, pol)
    units, _ = build_units(p)
    free = [i for i, u in enumerate(units) if u.movable]
    cands = {i: [h for h in range(p.n_hosts) if p.usable[h]] for i in free}
    res = solve_ilp(
        p,
        units,
        free,
        cands,
        list(p.cur),
        backend="cbc",
        time_limit_s=time_limit_s,
        gap=pol.solver.gap,
        max_moves=10**9,
        max_bytes=1e18,
    )
    seconds = time.perf_counter() - t0
    if res.host_of is None:
        return {"seconds": seconds, "status": f"cbc/{res.status} (no solution)"}
    q = _quality(snapshot, pol, {p.guests[g]: p.hosts[res.host_of[g]] for g in range(p.n_guests)})
    q.update(seconds=seconds, status=f"cbc/{res.status} gap={res.gap}")
    return q


def row(name: str, r: dict[str, Any]) -> list[str]:
    if "util" not in r:
        return [
            name,
            f"{r.get('seconds', 0):.2f}",
            f"{r.get('cpu_s', 0):.2f}",
            "-",
            "-",
            "-",
            "-",
            f"{r.get('peak_mib', 0):.0f}",
            r.get("status", ""),
        ]
    return [
        name,
        f"{r['seconds']:.2f}",
        f"{r['cpu_s']:.2f}",
        f"{r['util']:.4f}",
        f"{r['bound']:.4f}",
        f"{100 * (r['util'] - r['bound']):+.2f}",
        str(r["moves"]),
        f"{r['move_lb']} ({r['moves'] / max(r['move_lb'], 1):.2f}x)",
        f"{r['peak_mib']:.0f}",
        ("valid " if r["valid"] else "INVALID ") + r.get("status", ""),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100x2000,1000x20000")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--naive-time-limit", type=float, default=60.0)
    ap.add_argument("--naive-max-guests", type=int, default=2000)
    ap.add_argument("--ilp-time-limit", type=float, default=4.0)
    ap.add_argument("--backends", default="cbc,highs")
    args = ap.parse_args()
    for size in args.sizes.split(","):
        n_hosts, n_guests = (int(x) for x in size.split("x"))
        snapshot = synthetic_cluster(n_hosts, n_guests, args.seed)
        pol = bench_policy(time_limit_s=args.ilp_time_limit)
        rows = [
            row(
                f"ours (decide, {backend})",
                isolated(
                    run_ours, snapshot, replace(pol, solver=replace(pol.solver, backend=backend))
                ),
            )
            for backend in args.backends.split(",")
        ]
        rows.append(row("ours, greedy stages only", isolated(run_ours, snapshot, pol, False)))
        rows.append(row("greedy FFD", isolated(run_ffd, snapshot, pol)))
        if n_guests <= args.naive_max_guests:
            rows.append(
                row(
                    f"naive ILP ({args.naive_time_limit:.0f}s limit)",
                    isolated(run_naive, snapshot, replace(pol), args.naive_time_limit),
                )
            )
        else:
            rows.append(
                [
                    "naive ILP",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"not run: {n_guests * n_hosts:,} binaries",
                ]
            )
        print_table(
            f"balance {n_hosts} hosts / {n_guests} guests (seed {args.seed})",
            [
                "method",
                "wall_s",
                "cpu_s",
                "max_util",
                "bound",
                "+pts",
                "moves",
                "move_lb",
                "peak_MiB",
                "result",
            ],
            rows,
        )
    print(f"\ncommand: {command_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
