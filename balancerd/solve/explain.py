"""Why limits cannot all hold, in words an operator can act on, and the best effort the
solver makes instead (``best_effort``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from balancerd.model import Snapshot
from balancerd.policy.model import Policy
from balancerd.solve.problem import GIB, HostCapacity, Problem, build_problem


def explain_infeasible(  # noqa: C901 (one branch per necessary condition explained)
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


@dataclass
class Effort:
    """What cannot hold this cycle and what the solver does instead (best effort)."""

    reasons: list[str] = field(default_factory=list)  # contradictions: nothing is planned
    notes: list[str] = field(default_factory=list)  # named: what stays broken, and why
    stuck: list[int] = field(default_factory=list)  # guests left in place: they fit nowhere
    cpu_level: float | None = None  # over-subscribed CPU: the even utilization it needs


def best_effort(snapshot: Snapshot, policy: Policy, p: Problem) -> Effort:
    """Turn what cannot all hold into the first thing to minimize, not a refusal.

    - A guest with no usable host, or too big for every host it may use under the limits,
      stays where it is (named); so do the members of an affinity group that fits on no
      single host (the group is not enforced this cycle).
    - CPU demand above what the usable hosts allow under ``max_cpu_util``: the load is
      spread evenly instead. Each usable host's CPU cap becomes the even level plus the
      largest movable guest (what any good spread needs, and what ``verify`` accepts), so
      the highest utilization is minimized even above 100 %.
    - Memory or vCPUs over-subscribed: noted; hosts over a limit shed what fits elsewhere
      and no host is filled past a limit (memory cannot be overcommitted safely).
    - Only a policy that contradicts itself (a pair both affine and anti-affine) is a
      refusal: ``reasons``.

    Mutates ``p`` (movability, affinity groups, CPU caps); the verifier applies the same
    rules from the snapshot on its own."""
    eff = Effort()
    usable = [h for h in range(p.n_hosts) if p.usable[h]]
    usable_set = frozenset(usable)
    _contradictions(p, eff)
    if eff.reasons:
        return eff
    _stuck_guests(snapshot, policy, p, usable_set, eff)
    _unplaceable_groups(p, usable_set, eff)
    for grp in p.anti:
        reach: set[int] = set()
        for g in grp:
            a = p.allowed[g]
            reach |= usable_set if a is None else (a & usable_set)
        if len(reach) < len(grp):
            eff.notes.append(
                f"anti-affinity group [{', '.join(p.guests[g] for g in grp)}] needs "
                f"{len(grp)} hosts; {len(reach)} are usable: members already sharing a host "
                "may stay together"
            )
    _oversubscription(policy, p, usable, eff)
    return eff


def _contradictions(p: Problem, eff: Effort) -> None:
    anti_pairs = {(a, b) for grp in p.anti for a in grp for b in grp if a != b}
    for grp in p.affinity:
        for a in grp:
            for b in grp:
                if a < b and (a, b) in anti_pairs:
                    eff.reasons.append(
                        f"guests {p.guests[a]} and {p.guests[b]} are in both an affinity and "
                        "an anti-affinity group"
                    )


def _stuck_guests(
    snapshot: Snapshot, policy: Policy, p: Problem, usable_set: frozenset[int], eff: Effort
) -> None:
    kinds: dict[int, list[tuple[float, float, float]]] = {}
    for g in range(p.n_guests):
        name = p.guests[g]
        here = p.hosts[p.cur[g]]
        if not p.movable[g]:
            if p.must_move[g]:
                eff.notes.append(
                    f"guest {name} must leave host {here} but cannot be moved (excluded, on "
                    "an excluded host, or its host is down): it stays"
                )
            continue
        a = p.allowed[g]
        hs = usable_set if a is None else a & usable_set
        if not hs:
            pinned = policy.constraints.pin.get(name)
            why = f" (pinned to {list(pinned)})" if pinned else ""
            eff.notes.append(f"guest {name} has no usable host{why}: left on {here}")
        else:
            key = id(a) if a is not None else -1
            caps = kinds.get(key)
            if caps is None:
                caps = sorted({(p.cpu_cap[h], p.mem_cap[h], p.vcpu_cap[h]) for h in hs})
                kinds[key] = caps
            if any(p.cpu[g] <= c + 1e-9 and p.mem[g] <= m and p.vcpus[g] <= v for c, m, v in caps):
                continue
            eff.notes.append(
                f"guest {name} ({p.cpu[g]:.2f} cores, {p.mem[g] / GIB:.1f} GiB, "
                f"{p.vcpus[g]} vCPUs) fits under the limits of none of its {len(hs)} allowed "
                f"host(s): left on {here}"
            )
        p.movable[g] = False
        eff.stuck.append(g)
    del snapshot


def _unplaceable_groups(p: Problem, usable_set: frozenset[int], eff: Effort) -> None:
    keep: list[list[int]] = []
    for grp in p.affinity:
        common: frozenset[int] = usable_set
        for g in grp:
            a = p.allowed[g]
            if a is not None:
                common = common & a
        cpu = sum(p.cpu[g] for g in grp)
        mem = sum(p.mem[g] for g in grp)
        names = ", ".join(p.guests[g] for g in grp)
        if not common:
            why = "has no host all may run on"
        elif not any(cpu <= p.cpu_cap[h] + 1e-9 and mem <= p.mem_cap[h] for h in common):
            why = f"({cpu:.2f} cores, {mem / GIB:.1f} GiB) fits on no single allowed host"
        else:
            keep.append(grp)
            continue
        eff.notes.append(f"affinity group [{names}] {why}: its guests stay where they are")
        for g in grp:
            if p.movable[g]:
                p.movable[g] = False
                eff.stuck.append(g)
    p.affinity = keep


def _oversubscription(policy: Policy, p: Problem, usable: list[int], eff: Effort) -> None:
    n = len(usable)
    # guests that stay on a host that is not usable are out of the sums
    counted = [g for g in range(p.n_guests) if p.movable[g] or p.usable[p.cur[g]]]
    cpu_need = sum(p.cpu[g] for g in counted)
    cores = sum(p.cpu_total[h] for h in usable)
    cpu_have = sum(p.cpu_cap[h] for h in usable)
    if cores > 0 and cpu_need > cpu_have * (1 + 1e-9) + 1e-9:
        level = cpu_need / cores
        biggest = max((p.cpu[g] for g in range(p.n_guests) if p.movable[g]), default=0.0)
        for h in usable:
            p.cpu_cap[h] = max(p.cpu_cap[h], level * p.cpu_total[h] + biggest)
        eff.cpu_level = level
        eff.notes.append(
            f"CPU over-subscribed: guests need {cpu_need:.1f} CPU; the {n} usable hosts allow "
            f"{cpu_have:.1f} under the limits (max_cpu_util "
            f"{policy.limits.max_cpu_util:g}): the load is spread evenly instead (at least "
            f"{100 * level:.0f} % on every host)"
        )
    mem_need = sum(p.mem[g] for g in counted) / GIB
    mem_have = sum(p.mem_cap[h] for h in usable) / GIB
    vcpu_need = float(sum(p.vcpus[g] for g in counted))
    vcpu_have = sum(p.vcpu_cap[h] for h in usable)
    for what, need, have in (
        ("memory", f"{mem_need:.1f} GiB of memory", f"{mem_have:.1f} GiB"),
        ("vCPUs", f"{vcpu_need:.1f} vCPUs", f"{vcpu_have:.1f}"),
    ):
        over = mem_need > mem_have * (1 + 1e-9) if what == "memory" else vcpu_need > vcpu_have
        if over:
            eff.notes.append(
                f"{what} over-subscribed: guests need {need}; the {n} usable hosts allow "
                f"{have} under the limits: hosts over a limit shed what fits elsewhere, none "
                "is filled past one"
            )
