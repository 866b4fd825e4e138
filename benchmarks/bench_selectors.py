"""Selectors at scale: a must_not by tag x label against the same rule written as names.

    .venv/bin/python benchmarks/bench_selectors.py [--sizes 100x2000,1000x20000] [--repeat 5]

A third of the guests are tagged ``db``, half of the hosts labelled ``gen: g4``; the policy
keeps db guests off g4 hosts. Printed per size, best of ``--repeat``: resolving the
selectors (``resolve_policy``), building the problem from the named rule (the baseline:
what an operator listing every name got), and resolve + build from the selector rule.
Both give one shared allowed-host set (checked).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancerd.model import Host, Snapshot, Vm
from balancerd.policy.load import load_policy_text
from balancerd.policy.model import Constraints, Policy
from balancerd.selectors import resolve_policy
from balancerd.solve.problem import build_problem
from balancerd.units import GIB

POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: bench-selectors}
spec:
  objective: balance
  constraints:
    host_rules:
      - {vms: [{vms: {tags: [db]}}], hosts: [{hosts: {labels: {gen: g4}}}], kind: must_not}
"""


def cluster(n_hosts: int, n_guests: int) -> Snapshot:
    hosts = tuple(
        Host(
            f"h{i:04d}",
            "test:///",
            True,
            cpus=32,
            mem_bytes=256 * GIB,
            labels={"gen": "g4" if i % 2 else "g5"},
        )
        for i in range(n_hosts)
    )
    vms = tuple(
        Vm(
            f"v{j:05d}",
            f"u{j}",
            f"h{j % n_hosts:04d}",
            "running",
            2,
            2 * GIB,
            0.3,
            tags=("db",) if j % 3 == 0 else (),
        )
        for j in range(n_guests)
    )
    return Snapshot(0.0, hosts, vms)


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()  # a collection landing in one timing would swamp it
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        gc.enable()
    return 1000 * min(times)


def resolve_and_build(policy: Policy, snap: Snapshot) -> object:
    return build_problem(snap, resolve_policy(policy, snap))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100x2000,1000x20000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    policy = load_policy_text(POLICY, "bench.yaml")
    print(f"{'hosts x guests':>15} {'pairs':>12} {'resolve':>9} {'named':>9} {'selector':>9}")
    for size in args.sizes.split(","):
        n_hosts, n_guests = (int(x) for x in size.split("x"))
        snap = cluster(n_hosts, n_guests)
        resolved = resolve_policy(policy, snap)
        rule = resolved.constraints.host_rules[0]
        named: Policy = replace(policy, constraints=Constraints(host_rules=(rule,)))
        for p in (named, resolved):
            shared = {id(a) for a in build_problem(snap, p).allowed if a is not None}
            assert len(shared) == 1
        t_resolve = best_ms(partial(resolve_policy, policy, snap), args.repeat)
        t_named = best_ms(partial(build_problem, snap, named), args.repeat)
        t_sel = best_ms(partial(resolve_and_build, policy, snap), args.repeat)
        pairs = len(rule.vms) * len(rule.hosts)
        print(f"{size:>15} {pairs:>12,} {t_resolve:>7.1f}ms {t_named:>7.1f}ms {t_sel:>7.1f}ms")


if __name__ == "__main__":
    main()
