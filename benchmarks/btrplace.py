"""BtrPlace TDSC'13 instances (../shared/traces/btrplace/*.json.gz) as Snapshot + Policy.

Mapping: a node is a host (uCpu -> cpus, memory units -> MiB); a VM's demand is its
consumption, raised to ``preserve`` amounts (the load spike); ``spread`` -> anti-affinity;
continuous ``among`` -> a ``must`` rule to the node group the VMs are in now (continuous
means they never leave it); ``offline`` -> maintenance (drain); an offline node with an
``online`` constraint is usable; VMs to start (``running`` on ready VMs) sit on a pseudo
host ``__ready__`` in maintenance, so leaving it is a boot, not a migration.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancerd.model import Host, Snapshot, Vm
from balancerd.policy.model import (
    Budget,
    Constraints,
    HostRule,
    Hysteresis,
    Limits,
    Migration,
    Policy,
    Solver,
)

MIB = 1024 * 1024
READY = "__ready__"


@dataclass
class Instance:
    name: str
    snapshot: Snapshot
    constraints: Constraints
    n_spread: int
    n_among: int
    n_offline: int
    n_ready: int
    cpu_cap: dict[str, float]
    mem_cap: dict[str, float]


def load(path: Path) -> Instance:  # noqa: C901 (the instance format, one branch per section)
    with gzip.open(path, "rt") as f:
        d: dict[str, Any] = json.load(f)
    m = d["model"]
    mp = m["mapping"]
    views = {v["rcId"]: v for v in m["views"] if v.get("id") == "shareableResource"}
    cpu_v, mem_v = views["uCpu"], views["memory"]

    def node_cap(v: dict[str, Any], n: str) -> float:
        return float(v["nodes"].get(n, v.get("defCapacity", 0)))

    def vm_use(v: dict[str, Any], vm: str) -> float:
        return float(v["vms"].get(vm, v.get("defConsumption", 0)))

    cons = d["constraints"]
    spike: dict[str, float] = {}
    spread: list[tuple[str, ...]] = []
    among: list[tuple[list[str], list[list[str]]]] = []
    offline: set[str] = set()
    online: set[str] = set()
    for c in cons:
        kind = c["id"]
        if kind == "preserve" and c["rc"] == "uCpu":
            vm = str(c["vm"])
            spike[vm] = max(spike.get(vm, 0.0), float(c["amount"]))
        elif kind == "spread":
            spread.append(tuple(f"vm{v}" for v in c["vms"]))
        elif kind == "among":
            among.append(([f"vm{v}" for v in c["vms"]], [[str(n) for n in p] for p in c["parts"]]))
        elif kind == "offline":
            offline.add(str(c["node"]))
        elif kind == "online":
            online.add(str(c["node"]))

    hosts: list[Host] = []
    vms: list[Vm] = []
    where: dict[str, str] = {}
    on_nodes = mp["onlineNodes"]
    off_nodes = [str(n) for n in mp.get("offlineNodes", [])]
    cpu_cap: dict[str, float] = {}
    mem_cap: dict[str, float] = {}
    for n in list(on_nodes) + off_nodes:
        cpus = node_cap(cpu_v, n)
        mem = node_cap(mem_v, n)
        cpu_cap[n], mem_cap[n] = cpus, mem
        usable_off = n in off_nodes and n not in online
        hosts.append(
            Host(
                name=n,
                uri=f"btrplace:///{n}",
                up=True,
                cpus=int(cpus),
                mem_bytes=int(mem * MIB),
                powered_off=usable_off,
            )
        )

    def add_vm(vm_id: str, host: str) -> None:
        cpu = max(vm_use(cpu_v, vm_id), spike.get(vm_id, 0.0))
        vcpus = max(1, math.ceil(cpu))
        name = f"vm{vm_id}"
        vms.append(
            Vm(
                name=name,
                uuid=vm_id,
                host=host,
                state="running",
                vcpus=vcpus,
                mem_bytes=int(vm_use(mem_v, vm_id) * MIB),
                cpu_util=cpu / vcpus if vcpus else 0.0,
            )
        )
        where[name] = host

    for n, st in on_nodes.items():
        for v in st.get("runningVMs", []):
            add_vm(str(v), str(n))
    ready = [str(v) for v in mp.get("readyVMs", [])]
    if ready:
        total_cpu = sum(node_cap(cpu_v, n) for n in on_nodes) + 1
        total_mem = sum(node_cap(mem_v, n) for n in on_nodes) + 1
        hosts.append(
            Host(
                name=READY,
                uri="btrplace:///ready",
                up=True,
                cpus=int(total_cpu),
                mem_bytes=int(total_mem * MIB),
            )
        )
        for v in ready:
            add_vm(v, READY)

    rules: list[HostRule] = []
    for names, parts in among:
        now = {where[v] for v in names if v in where and where[v] != READY}
        home = [p for p in parts if now <= set(p)]
        if home:
            rules.append(HostRule(vms=tuple(names), hosts=tuple(home[0]), kind="must"))
        # VMs already across groups: no continuous way to join one; left unconstrained
    constraints = Constraints(
        anti_affinity=tuple(spread),
        host_rules=tuple(rules),
        maintenance=tuple(sorted(offline)) + ((READY,) if ready else ()),
    )
    return Instance(
        name=path.name.removesuffix(".json.gz"),
        snapshot=Snapshot(taken_at_s=0.0, hosts=tuple(hosts), vms=tuple(vms)),
        constraints=constraints,
        n_spread=len(spread),
        n_among=len(rules),
        n_offline=len(offline),
        n_ready=len(ready),
        cpu_cap=cpu_cap,
        mem_cap=mem_cap,
    )


def repair_policy(inst: Instance, *, max_concurrent: int, per_host: int) -> Policy:
    """Viability with the fewest moves: hard limits at 100 %, and no move for balance
    alone (min_improvement 1.0: no rebalancing gains a whole host's capacity here), so
    the repair with the fewest moves wins; migration_cost still orders equal repairs by
    bytes."""
    return Policy(
        name=f"btrplace-{inst.name}",
        objective="balance",
        limits=Limits(
            max_cpu_util=1.0, max_mem_util=1.0, mem_headroom_bytes=0, cpu_overcommit=10_000.0
        ),
        hysteresis=Hysteresis(min_improvement=1.0, cooldown_s=0.0),
        budget=Budget(max_moves=10**9, max_bytes=10**18),
        constraints=inst.constraints,
        migration=Migration(
            bandwidth_mib_s=100.0, max_concurrent=max_concurrent, max_concurrent_per_host=per_host
        ),
        solver=Solver(backend="cbc", time_limit_s=2.0, gap=0.01, migration_cost=10.0),
    )
