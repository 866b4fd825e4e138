"""Why no valid placement exists, in words an operator can act on."""

from __future__ import annotations

from collections.abc import Mapping

from balancerd.model import Snapshot
from balancerd.policy.model import Policy
from balancerd.solve.problem import GIB, HostCapacity, Problem, build_problem


def explain_infeasible(
    snapshot: Snapshot,
    policy: Policy,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    problem: Problem | None = None,
) -> list[str]:
    """Each necessary condition that fails, one sentence each (empty: none found)."""
    p = problem or build_problem(snapshot, policy, capacity=capacity)
    reasons: list[str] = []
    usable = [h for h in range(p.n_hosts) if p.usable[h]]
    n_usable = len(usable)

    usable_set = frozenset(usable)
    kinds_cache: dict[int, list[tuple[float, float, float]]] = {}

    def hosts_for(g: int) -> frozenset[int]:
        if not p.movable[g]:
            return frozenset((p.cur[g],))
        a = p.allowed[g]
        return usable_set if a is None else a & usable_set

    def cap_kinds(g: int) -> list[tuple[float, float, float]]:
        """Distinct (cpu, mem, vcpu) caps among the hosts g may use (cached per set)."""
        hs = hosts_for(g)
        key = id(p.allowed[g]) if p.movable[g] else -1 - g
        got = kinds_cache.get(key)
        if got is None:
            got = sorted({(p.cpu_cap[h], p.mem_cap[h], p.vcpu_cap[h]) for h in hs})
            kinds_cache[key] = got
        return got

    def unusable_why(names: list[str]) -> str:
        c = policy.constraints
        parts = []
        for n in names:
            h = p.host_index.get(n)
            if h is None:
                parts.append(f"{n} unknown")
            elif n in c.maintenance:
                parts.append(f"{n} in maintenance")
            elif n in c.exclude_hosts:
                parts.append(f"{n} excluded")
            elif not snapshot.hosts[h].up:
                parts.append(f"{n} down")
            elif p.powered_off[h]:
                parts.append(f"{n} powered off")
        return ", ".join(parts)

    for g in range(p.n_guests):
        name = p.guests[g]
        if not p.movable[g] and p.must_move[g]:
            reasons.append(
                f"guest {name} must leave host {p.hosts[p.cur[g]]} but cannot be moved "
                "(excluded, on an excluded host, or its host is down)"
            )
            continue
        hs = hosts_for(g)
        if not hs:
            pinned = policy.constraints.pin.get(name)
            why = f" (pinned to {list(pinned)}: {unusable_why(list(pinned))})" if pinned else ""
            reasons.append(f"guest {name} has no usable host{why}")
            continue
        if p.movable[g] and not any(
            p.cpu[g] <= c + 1e-9 and p.mem[g] <= m and p.vcpus[g] <= v for c, m, v in cap_kinds(g)
        ):
            reasons.append(
                f"guest {name} ({p.cpu[g]:.2f} cores, {p.mem[g] / GIB:.1f} GiB, "
                f"{p.vcpus[g]} vCPUs) fits under the limits of none of its "
                f"{len(hs)} allowed host(s)"
            )

    for grp in p.anti:
        names = [p.guests[g] for g in grp]
        sets = [hosts_for(g) for g in grp]
        # a group member free to use every usable host settles the count at once
        n_reach = (
            len(usable_set) if any(s is usable_set for s in sets) else len(frozenset().union(*sets))
        )
        if n_reach < len(grp):
            reasons.append(
                f"anti-affinity group [{', '.join(names)}] needs {len(grp)} hosts; "
                f"{n_reach} are usable"
            )
    anti_pairs = {(a, b) for grp in p.anti for a in grp for b in grp if a != b}
    for grp in p.affinity:
        names = [p.guests[g] for g in grp]
        common: frozenset[int] | None = None
        for g in grp:
            s = hosts_for(g)
            common = s if common is None else common & s
        if not common:
            reasons.append(f"affinity group [{', '.join(names)}] has no host all may run on")
            continue
        cpu = sum(p.cpu[g] for g in grp)
        mem = sum(p.mem[g] for g in grp)
        if not any(cpu <= p.cpu_cap[h] + 1e-9 and mem <= p.mem_cap[h] for h in common):
            reasons.append(
                f"affinity group [{', '.join(names)}] ({cpu:.2f} cores, {mem / GIB:.1f} GiB) "
                "fits on no single allowed host"
            )
        clash = [(a, b) for a in grp for b in grp if a < b and (a, b) in anti_pairs]
        for a, b in clash:
            reasons.append(
                f"guests {p.guests[a]} and {p.guests[b]} are in both an affinity and an "
                "anti-affinity group"
            )

    for what, demand, caps in (
        ("CPU", sum(p.cpu), [p.cpu_cap[h] for h in usable]),
        ("memory", sum(p.mem), [p.mem_cap[h] for h in usable]),
        ("vCPUs", float(sum(p.vcpus)), [p.vcpu_cap[h] for h in usable]),
    ):
        # guests on hosts that are not usable and cannot move stay out of the sum
        stay = sum(
            (p.cpu, p.mem, p.vcpus)[("CPU", "memory", "vCPUs").index(what)][g]
            for g in range(p.n_guests)
            if not p.movable[g] and not p.usable[p.cur[g]]
        )
        need = demand - stay
        have = sum(caps)
        if need > have * (1 + 1e-9) + 1e-9:
            if what == "memory":
                reasons.append(
                    f"guests need {need / GIB:.1f} GiB of memory; the {n_usable} usable hosts "
                    f"allow {have / GIB:.1f} GiB under the limits"
                )
            else:
                reasons.append(
                    f"guests need {need:.1f} {what}; the {n_usable} usable hosts allow "
                    f"{have:.1f} under the limits"
                )
    return reasons
