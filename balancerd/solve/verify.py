"""Independent re-check of a target placement, straight from the snapshot and the policy.

It shares no code with the solver stages on purpose. A violation that the current
placement already has, and that the target does not make worse, is *carried* (e.g. a drain
cut short by the budget): reported, but it does not block the plan. Anything else blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from balancerd.model import Placement, Snapshot
from balancerd.policy.model import HostRule, Policy
from balancerd.solve.problem import HostCapacity
from balancerd.speed import demand_per_vcpu, speed_factors, too_slow

_TOL = 1e-6


@dataclass(frozen=True)
class Violation:
    kind: str  # capacity | pin | rule | anti-affinity | affinity | maintenance | excluded | host
    message: str
    carried: bool = False  # already so in the current placement, not made worse
    why: str = ""  # why a violation that is not "already so today" is accepted

    def __str__(self) -> str:
        if self.why:
            return f"{self.message} ({self.why})"
        return self.message + (" (already so today)" if self.carried else "")


def verify(  # noqa: C901 (the independent verifier: one branch per rule, deliberately flat)
    snapshot: Snapshot,
    policy: Policy,
    target: Placement,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    current: Placement | None = None,
) -> list[Violation]:
    """Every rule broken by ``target``; ``current`` defaults to the snapshot's placement."""
    capacity = capacity or {}
    cur = current if current is not None else snapshot.placement()
    c = policy.constraints
    lim = policy.limits
    out: list[Violation] = []
    hosts = {h.name: h for h in snapshot.hosts}
    vms = {v.name: v for v in snapshot.vms}
    factor = speed_factors(snapshot.hosts)  # CPU in reference cores (balancerd/speed.py)

    def add(kind: str, msg: str, carried: bool = False, why: str = "") -> None:
        out.append(Violation(kind, msg, carried, why))

    for name in cur.host_of:
        if name not in target.host_of:
            add("host", f"guest {name} has no host in the target")
    rules_of: dict[str, list[HostRule]] = {}
    for rule in c.host_rules:
        for name in rule.vms:
            rules_of.setdefault(name, []).append(rule)
    moved = {vm for vm, h in target.host_of.items() if vm in cur.host_of and cur.host_of[vm] != h}
    for vm, h in target.host_of.items():
        if vm not in vms:
            add("host", f"target places unknown guest {vm}")
            continue
        host = hosts.get(h)
        if host is None:
            add("host", f"guest {vm} placed on unknown host {h}")
            continue
        if vm in moved:
            if not host.up and not host.powered_off:
                add("host", f"guest {vm} moved to host {h}, which is down")
            if host.powered_off and policy.objective != "power-save":
                add("host", f"guest {vm} moved to powered-off host {h}")
            if h in c.exclude_hosts:
                add("excluded", f"guest {vm} moved to excluded host {h}")
            src = cur.host_of[vm]
            if src in c.exclude_hosts:
                add("excluded", f"guest {vm} moved off excluded host {src}")
            if vm in c.exclude_vms:
                add("excluded", f"excluded guest {vm} moved {src} -> {h}")
            if vms[vm].blockers:
                add("unmovable", f"guest {vm} moved {src} -> {h} but cannot be live-migrated")
            need = demand_per_vcpu(vms[vm], factor)
            if too_slow(need, factor.get(h, 1.0)):
                add(
                    "host",
                    f"guest {vm} moved to {h}, whose cores are too slow for it "
                    f"({need:.2f} of the fastest core per vCPU, {h} has "
                    f"{factor.get(h, 1.0):.2f})",
                )
        was_here = cur.host_of.get(vm) == h
        if h in c.maintenance:
            add("maintenance", f"guest {vm} on host {h}, which is in maintenance", was_here)
        allowed = c.pin.get(vm)
        if allowed is not None and h not in allowed:
            add("pin", f"guest {vm} pinned to {list(allowed)} but on {h}", was_here)
        for rule in rules_of.get(vm, ()):
            if rule.kind == "must" and h not in rule.hosts:
                add("rule", f"guest {vm} must run on {list(rule.hosts)} but on {h}", was_here)
            if rule.kind == "must_not" and h in rule.hosts:
                add("rule", f"guest {vm} must not run on {h}", was_here)

    # capacity, recomputed from the guests
    def loads(p: Placement) -> dict[str, tuple[float, float, float]]:
        acc: dict[str, list[float]] = {h: [0.0, 0.0, 0.0] for h in hosts}
        for vm, h in p.host_of.items():
            v = vms.get(vm)
            if v is None or h not in acc:
                continue
            acc[h][0] += v.cpu_util * v.vcpus * factor.get(v.host, 1.0)
            acc[h][1] += v.mem_bytes
            acc[h][2] += v.vcpus
        return {h: (a[0], a[1], a[2]) for h, a in acc.items()}

    after = loads(target)
    before = loads(cur)
    gains = {h for vm in moved for h in [target.host_of[vm]]}
    even = _cpu_even_level(snapshot, policy, capacity)
    for name, host in hosts.items():
        if not host.up and not (host.powered_off and name in gains):
            continue  # its guests are unknown; nothing is placed there
        over = capacity.get(name)
        cpus = over.cpus if over and over.cpus > 0 else float(host.cpus)
        mem = over.mem_bytes if over and over.mem_bytes > 0 else host.mem_bytes
        caps = (
            ("CPU", cpus * factor.get(name, 1.0) * lim.max_cpu_util, "cores"),
            ("memory", max(0, min(mem * lim.max_mem_util, mem - lim.mem_headroom_bytes)), "bytes"),
            ("vCPUs", cpus * lim.cpu_overcommit, "vCPUs"),
        )
        for k, (what, cap, unit) in enumerate(caps):
            a = after[name][k]
            if a <= cap * (1 + _TOL) + _TOL:
                continue
            b = before[name][k]
            carried = b > cap * (1 + _TOL) and a <= b * (1 + _TOL) + _TOL and name not in gains
            why = ""
            if (
                k == 0
                and not carried
                and even is not None
                and a <= (even[0] * cpus + even[1]) * (1 + _TOL) + _TOL
            ):
                # over-subscribed CPU is spread, not refused: no host above the even level
                # plus the largest guest (what any good spread of the load needs)
                carried, why = True, "CPU over-subscribed: within the even spread"
            if k == 1:
                msg = f"host {name}: guest memory {a / 2**30:.2f} GiB > limit {cap / 2**30:.2f} GiB"
            else:
                msg = f"host {name}: {what} {a:.2f} {unit} > limit {cap:.2f} {unit}"
            add("capacity", msg, carried, why)

    # anti-affinity: no new sharing of a host within a group
    for grp in c.anti_affinity:
        per_after: dict[str, list[str]] = {}
        per_before: dict[str, int] = {}
        for vm in grp:
            if vm in target.host_of:
                per_after.setdefault(target.host_of[vm], []).append(vm)
            if vm in cur.host_of:
                per_before[cur.host_of[vm]] = per_before.get(cur.host_of[vm], 0) + 1
        for h, names in per_after.items():
            if len(names) > 1:
                carried = len(names) <= per_before.get(h, 0)
                add(
                    "anti-affinity",
                    f"anti-affinity group {list(grp)}: {names} share host {h}",
                    carried,
                )
    for grp in c.affinity:
        placed = {target.host_of[vm] for vm in grp if vm in target.host_of}
        if len(placed) > 1:
            carried = not any(vm in moved for vm in grp)
            add("affinity", f"affinity group {list(grp)} spread over {sorted(placed)}", carried)
    return out


def blocking(violations: list[Violation]) -> list[Violation]:
    return [v for v in violations if not v.carried]


def _cpu_even_level(
    snapshot: Snapshot, policy: Policy, capacity: Mapping[str, HostCapacity]
) -> tuple[float, float] | None:
    """When the guests' CPU demand exceeds what the usable hosts allow under
    ``max_cpu_util``: (the utilization an even spread needs = demand / usable cores, the
    largest guest's demand in cores). A host with n cores may then hold up to
    ``level * n + largest``. None when CPU is not over-subscribed."""
    c = policy.constraints
    factor = speed_factors(snapshot.hosts)
    usable_cores = 0.0
    usable_cap = 0.0
    counted: set[str] = set()
    for h in snapshot.hosts:
        over = capacity.get(h.name)
        cpus = float(over.cpus) if over and over.cpus > 0 else float(h.cpus)
        cpus *= factor.get(h.name, 1.0)
        if h.up and h.name not in c.exclude_hosts:
            counted.add(h.name)
            if h.name not in c.maintenance and cpus > 0:
                usable_cores += cpus
                usable_cap += cpus * policy.limits.max_cpu_util
    need = 0.0
    largest = 0.0
    for v in snapshot.vms:
        if v.host in counted:
            ref_cores = v.cpu_cores * factor.get(v.host, 1.0)
            need += ref_cores
            if v.name not in c.exclude_vms:
                largest = max(largest, ref_cores)
    if usable_cores <= 0 or need <= usable_cap * (1 + _TOL) + _TOL:
        return None
    return need / usable_cores, largest
