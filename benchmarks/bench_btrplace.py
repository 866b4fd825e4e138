"""Repair the BtrPlace TDSC'13 instances: a viable placement with the fewest moves AND a
complete plan whose every step keeps capacity and the continuous spread/among rules.

    .venv/bin/python benchmarks/bench_btrplace.py [--instances li-r6-c33,nr-r6-c33]
        [--max-concurrent 1000] [--per-host 1]

Side by side, same run, each in its own forked process:
- ours: ``solve()`` (greedy repair incumbent, reduced ILP, verify) + ``make_plan()``, as
  ``decide()`` does (boots out of the pseudo host are not limited per source);
- greedy FFD: every VM largest first stays home if it fits, else the first node with room
  (placement rules and spread honoured for the end state); its moves applied in list order,
  one at a time, counting the steps that break capacity or spread on the way;
- the naive whole ILP is not attempted here (nodes x VMs binaries are printed).

Every plan is replayed by an independent checker (a running step holds its VM on both
nodes; a wave's steps may finish in any order). ``moves_lb``: per node, the fewest VMs
(largest first) whose removal brings it under capacity, plus every VM on a node going
offline. Boots (ready VMs started) are counted apart from migrations.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancerd.model import Placement
from balancerd.plan import make_plan, total_seconds
from balancerd.policy.model import Policy
from balancerd.solve import solve
from balancerd.solve.problem import build_problem, move_lower_bound
from balancerd.solve.verify import blocking, verify
from benchmarks.btrplace import READY, Instance, load, repair_policy
from benchmarks.common import command_line, first_fit_decreasing, isolated, print_table

TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "btrplace"


def unsafe_steps(inst: Instance, pol: Policy, steps: Sequence[tuple[str, str, str, int]]) -> int:  # noqa: C901 (a replay checker: one branch per rule)
    """Steps (vm, src, dst, wave) that break a node's capacity or a continuous spread /
    among rule at some moment, under both-nodes accounting within a wave."""
    snap = inst.snapshot
    vms = {v.name: v for v in snap.vms}
    where = {v.name: v.host for v in snap.vms}
    cpu: dict[str, float] = {h.name: 0.0 for h in snap.hosts}
    mem: dict[str, float] = {h.name: 0.0 for h in snap.hosts}
    for v in snap.vms:
        cpu[v.host] += v.cpu_cores
        mem[v.host] += v.mem_bytes / 2**20
    group_of: dict[str, list[int]] = {}
    for gid, grp in enumerate(pol.constraints.anti_affinity):
        for n in grp:
            group_of.setdefault(n, []).append(gid)
    members_on: dict[tuple[int, str], int] = {}
    for n, h in where.items():
        for gid in group_of.get(n, ()):
            members_on[gid, h] = members_on.get((gid, h), 0) + 1
    allowed: dict[str, set[str]] = {}
    for rule in pol.constraints.host_rules:
        for n in rule.vms:
            allowed[n] = set(rule.hosts)
    bad = 0
    waves: dict[int, list[tuple[str, str, str, int]]] = {}
    for s in steps:
        waves.setdefault(s[3], []).append(s)
    for w in sorted(waves):
        running = waves[w]
        for vm, src, dst, _ in running:
            v = vms[vm]
            broken = where[vm] != src
            cpu[dst] += v.cpu_cores
            mem[dst] += v.mem_bytes / 2**20
            for gid in group_of.get(vm, ()):
                members_on[gid, dst] = members_on.get((gid, dst), 0) + 1
                broken |= members_on[gid, dst] > 1
            if vm in allowed and dst not in allowed[vm]:
                broken = True
            if dst != READY and (
                cpu[dst] > inst.cpu_cap.get(dst, 0) + 1e-6
                or mem[dst] > inst.mem_cap.get(dst, 0) + 1e-6
            ):
                broken = True
            bad += broken
        for vm, src, _, _ in running:
            v = vms[vm]
            cpu[src] -= v.cpu_cores
            mem[src] -= v.mem_bytes / 2**20
            for gid in group_of.get(vm, ()):
                members_on[gid, src] -= 1
            where[vm] = running[[r[0] for r in running].index(vm)][2]
    return bad


def viable(inst: Instance, pol: Policy, target: Placement) -> bool:
    if blocking(verify(inst.snapshot, pol, target)):
        return False
    cpu: dict[str, float] = {}
    mem: dict[str, float] = {}
    vms = {v.name: v for v in inst.snapshot.vms}
    for n, h in target.host_of.items():
        if h == READY or h in pol.constraints.maintenance:
            return False
        cpu[h] = cpu.get(h, 0.0) + vms[n].cpu_cores
        mem[h] = mem.get(h, 0.0) + vms[n].mem_bytes / 2**20
    return all(cpu[h] <= inst.cpu_cap[h] + 1e-6 and mem[h] <= inst.mem_cap[h] + 1e-6 for h in cpu)


def lower_bound(inst: Instance, pol: Policy) -> int:
    p = build_problem(inst.snapshot, pol)
    return move_lower_bound(p, 1.0, 1.0) - inst.n_ready


def run_ours(inst: Instance, pol: Policy) -> dict[str, Any]:
    t0 = time.perf_counter()
    # decide(), except that boots (from the pseudo host) are not limited per source
    res = solve(inst.snapshot, pol)
    plan = make_plan(
        inst.snapshot,
        pol,
        res.target,
        res.report,
        notes=res.notes,
        problem=res.problem,
        uncounted_sources=frozenset({READY}),
    )
    seconds = time.perf_counter() - t0
    steps = [(m.vm, m.src, m.dst, m.wave) for m in plan.moves]
    left_out = sum("left out" in n for n in plan.notes)
    return {
        "seconds": seconds,
        "migrations": sum(m.src != READY for m in plan.moves),
        "boots": sum(m.src == READY for m in plan.moves),
        "viable": viable(inst, pol, plan.target),
        "complete": left_out == 0,
        "unsafe": unsafe_steps(inst, pol, steps),
        "waves": len({m.wave for m in plan.moves}),
        "duration_s": total_seconds(plan),
        "status": f"{plan.solver.backend}/{plan.solver.status} {plan.reason}".strip(),
    }


def run_greedy(inst: Instance, pol: Policy) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = build_problem(inst.snapshot, pol)
    host_of = first_fit_decreasing(p, list(p.cpu_cap), list(p.mem_cap))
    seconds = time.perf_counter() - t0
    if host_of is None:
        return {"seconds": seconds, "status": "no placement"}
    moved = [g for g in range(p.n_guests) if host_of[g] != p.cur[g]]
    steps = [(p.guests[g], p.hosts[p.cur[g]], p.hosts[host_of[g]], i) for i, g in enumerate(moved)]
    target = Placement({p.guests[g]: p.hosts[host_of[g]] for g in range(p.n_guests)})
    return {
        "seconds": seconds,
        "migrations": sum(s[1] != READY for s in steps),
        "boots": sum(s[1] == READY for s in steps),
        "viable": viable(inst, pol, target),
        "complete": True,
        "unsafe": unsafe_steps(inst, pol, steps),
        "waves": len(steps),
        "duration_s": None,
        "status": "end state only, list order",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", default="li-r6-c33,nr-r6-c33,li-r6-c0,nr-r6-c0")
    ap.add_argument("--max-concurrent", type=int, default=1000)
    ap.add_argument("--per-host", type=int, default=1)
    args = ap.parse_args()
    if not TRACES.is_dir():
        print(f"no traces at {TRACES}; nothing to run")
        return 0
    rows = []
    for name in args.instances.split(","):
        inst = load(TRACES / f"{name}.json.gz")
        pol = repair_policy(inst, max_concurrent=args.max_concurrent, per_host=args.per_host)
        lb = lower_bound(inst, pol)
        label = (
            f"{name} ({len(inst.snapshot.vms)} VMs, spread {inst.n_spread}, "
            f"among {inst.n_among}, offline {inst.n_offline}, boots {inst.n_ready})"
        )
        for method, fn in (("ours", run_ours), ("greedy FFD", run_greedy)):
            r = isolated(fn, inst, pol)
            if "migrations" not in r:
                rows.append(
                    [
                        label,
                        method,
                        f"{r.get('seconds', 0):.2f}",
                        f"{r.get('cpu_s', 0):.2f}",
                        "-",
                        str(lb),
                    ]
                    + ["-"] * 5
                    + [f"{r.get('peak_mib', 0):.0f}", r["status"]]
                )
                continue
            rows.append(
                [
                    label,
                    method,
                    f"{r['seconds']:.2f}",
                    f"{r['cpu_s']:.2f}",
                    f"{r['migrations']}+{r['boots']}b",
                    str(lb),
                    "yes" if r["viable"] else "NO",
                    "yes" if r["complete"] else "NO",
                    str(r["unsafe"]),
                    str(r["waves"]),
                    "-" if r["duration_s"] is None else f"{r['duration_s']:.0f}",
                    f"{r['peak_mib']:.0f}",
                    r["status"],
                ]
            )
            label = ""
        n_nodes = sum(h.name != READY for h in inst.snapshot.hosts)
        rows.append(
            ["", "naive ILP", "-", "-", "-", str(lb)]
            + ["-"] * 6
            + [f"not run: {n_nodes * len(inst.snapshot.vms):,} binaries"]
        )
    print_table(
        f"BtrPlace repair (max_concurrent {args.max_concurrent}, per host {args.per_host}, "
        "100 MiB/s)",
        [
            "instance",
            "method",
            "wall_s",
            "cpu_s",
            "moves",
            "moves_lb",
            "viable",
            "complete",
            "unsafe_steps",
            "waves",
            "plan_s",
            "peak_MiB",
            "result",
        ],
        rows,
    )
    print(f"\ncommand: {command_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
