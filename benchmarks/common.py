"""Shared benchmark helpers: seeded synthetic clusters, baselines, measurement, tables."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import resource
import shlex
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from balancerd.model import Host, Snapshot, Vm
from balancerd.policy.model import Budget, Hysteresis, Limits, Policy, Solver
from balancerd.solve.problem import Problem

GIB = 1024**3
T = TypeVar("T")

HOST_TYPES = ((32, 256), (48, 384), (64, 512))  # cores, GiB


def synthetic_cluster(n_hosts: int, n_guests: int, seed: int) -> Snapshot:
    """A skewed cluster: guests land on hosts with uneven odds, a tenth of hosts are hot."""
    rnd = random.Random(seed)
    hosts = []
    weight = []
    for i in range(n_hosts):
        cores, gib = HOST_TYPES[i % len(HOST_TYPES)]
        hosts.append(
            Host(name=f"h{i:04d}", uri=f"test:///h{i}", up=True, cpus=cores, mem_bytes=gib * GIB)
        )
        hot = 1.6 if rnd.random() < 0.1 else 1.0
        weight.append(cores * hot * rnd.uniform(0.8, 1.2))
    mem_used = [0.0] * n_hosts
    vms = []
    for j in range(n_guests):
        vcpus = rnd.choices((1, 2, 4, 8), (35, 35, 20, 10))[0]
        mem = vcpus * rnd.choice((2, 4)) * GIB
        util = min(1.0, rnd.betavariate(2, 3))
        while True:
            h = rnd.choices(range(n_hosts), weight)[0]
            if mem_used[h] + mem <= 0.97 * hosts[h].mem_bytes:
                break
        mem_used[h] += mem
        vms.append(
            Vm(
                name=f"vm{j:05d}",
                uuid=f"u{j}",
                host=hosts[h].name,
                state="running",
                vcpus=vcpus,
                mem_bytes=mem,
                cpu_util=util,
            )
        )
    return Snapshot(taken_at_s=0.0, hosts=tuple(hosts), vms=tuple(vms))


def bench_policy(name: str = "bench", **solver: object) -> Policy:
    """Balance with a budget big enough to reach the bound; moving is nearly free so the
    quality target decides, and the move count is what the method itself needs."""
    return Policy(
        name=name,
        objective="balance",
        limits=Limits(
            max_cpu_util=1.0, max_mem_util=1.0, mem_headroom_bytes=0, cpu_overcommit=64.0
        ),
        hysteresis=Hysteresis(min_improvement=0.0, cooldown_s=0.0),
        budget=Budget(max_moves=10**9, max_bytes=10**18),
        solver=replace(Solver(migration_cost=1e-6), **solver),  # type: ignore[arg-type]
    )


@dataclass
class Measured:
    value: object
    seconds: float
    peak_mib: float


def measure(fn: Callable[[], T], *, trace_memory: bool = True) -> Measured:
    """Run fn once; wall time and peak Python heap (tracemalloc) of that call."""
    if trace_memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    peak = 0.0
    if trace_memory:
        _, peak_b = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak = peak_b / 2**20
    return Measured(value, seconds, peak)


def first_fit_decreasing(p: Problem, cap_c: list[float], cap_m: list[float]) -> list[int] | None:
    """Baseline: guests largest first; each stays home if its host still has room under the
    target, else goes to the first host (in host order) with room. Placement rules and
    anti-affinity are honoured; it knows nothing about moves."""
    order = sorted(
        range(p.n_guests),
        key=lambda g: (
            -(p.cpu[g] / (p.cpu_total[p.cur[g]] or 1) + p.mem[g] / (p.mem_total[p.cur[g]] or 1))
        ),
    )
    cpu = [0.0] * p.n_hosts
    mem = [0.0] * p.n_hosts
    vcpu = [0.0] * p.n_hosts
    anti_of: dict[int, list[int]] = {}
    for gid, grp in enumerate(p.anti):
        for g in grp:
            anti_of.setdefault(g, []).append(gid)
    anti: list[set[int]] = [set() for _ in p.anti]
    host_of = [-1] * p.n_guests

    def fits(g: int, h: int) -> bool:
        return (
            p.can_host(g, h)
            and cpu[h] + p.cpu[g] <= cap_c[h] + 1e-9
            and mem[h] + p.mem[g] <= cap_m[h] + 0.5
            and vcpu[h] + p.vcpus[g] <= p.vcpu_cap[h]
            and all(h not in anti[gid] for gid in anti_of.get(g, ()))
        )

    # fixed guests first
    for g in range(p.n_guests):
        if not p.movable[g]:
            h = p.cur[g]
            host_of[g] = h
            cpu[h] += p.cpu[g]
            mem[h] += p.mem[g]
            vcpu[h] += p.vcpus[g]
            for gid in anti_of.get(g, ()):
                anti[gid].add(h)
    for g in order:
        if host_of[g] >= 0:
            continue
        h = p.cur[g] if fits(g, p.cur[g]) else next((x for x in range(p.n_hosts) if fits(g, x)), -1)
        if h < 0:
            return None
        host_of[g] = h
        cpu[h] += p.cpu[g]
        mem[h] += p.mem[g]
        vcpu[h] += p.vcpus[g]
        for gid in anti_of.get(g, ()):
            anti[gid].add(h)
    return host_of


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def command_line() -> str:
    return "cd /work/main && .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)


def peak_mib() -> float:
    """Peak RSS of this process or of its largest finished child (a solver), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def _child(conn: Any, fn: Any, args: tuple[Any, ...]) -> None:
    try:
        out = fn(*args)
    except Exception as e:  # reported in the table, not hidden
        out = {"status": f"error: {e!r}"}
    out["peak_mib"] = peak_mib()
    t = os.times()  # this forked process and its solver children, from the fork on
    out["cpu_s"] = t.user + t.system + t.children_user + t.children_system
    conn.send(out)
    conn.close()


def isolated(fn: Any, *args: Any) -> dict[str, Any]:
    """Run fn(*args) in a forked process so its peak memory is its own."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    out: dict[str, Any] = parent.recv()
    proc.join()
    return out
