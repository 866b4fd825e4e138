"""Rules of a policy that span several fields (a VM both pinned and excluded, ...).

They run after the per-field pass of ``policy/spec.py``, on a ``Policy`` built from
whatever validated, and add their problems to the same ``Problems`` so one pass reports
everything, each at the line of the key that has to change.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from balancerd.policy.model import Constraints, Policy, PowerModel
from balancerd.validate import Problems, format_number
from balancerd.yamlpos import FieldPath

C = ("spec", "constraints")
# must / must_not conflicts are found per VM-host pair: a policy naming more pairs than
# this (never a real one) is refused rather than checked for minutes.
MAX_RULE_PAIRS = 200_000


def cross_check(policy: Policy, out: Problems) -> None:
    """Rules that involve more than one field."""
    res = policy.resources
    if res.cpu_weight == 0 and res.memory_weight == 0:
        out.add(("spec", "resources"), "at least one of cpu.weight, memory.weight must be > 0")
    _check_constraints(policy.constraints, out)
    _check_power(policy, out)
    _check_migration(policy, out)


def _check_constraints(c: Constraints, out: Problems) -> None:  # noqa: C901 (a flat list of cross-field rules)
    maintenance = set(c.maintenance)
    for vm in c.exclude_vms:
        if vm in c.pin:
            out.add(
                out.item_path((*C, "exclude_vms"), vm),
                f"'{vm}' is also pinned (line {out.doc.line((*C, 'pin', vm))}); an excluded "
                "VM is never moved, so remove it from exclude_vms or from pin",
            )
    for vm, hosts in c.pin.items():
        if hosts and all(h in maintenance for h in hosts):
            out.add(
                (*C, "pin", vm),
                f"pinned only to host(s) in maintenance ({', '.join(hosts)}): "
                "it would have nowhere to run",
            )
    for host in c.maintenance:
        if host in c.exclude_hosts:
            out.add(
                out.item_path((*C, "maintenance"), host),
                f"'{host}' is also in exclude_hosts: a host in maintenance is drained, an "
                "excluded host is never touched",
            )
    # Affinity groups sharing a VM form one group (union-find over VM names).
    parent: dict[str, str] = {}

    def root(vm: str) -> str:
        top = vm
        while parent.get(top, top) != top:
            top = parent[top]
        while vm != top:  # path compression: long chains of groups stay linear
            parent[vm], vm = top, parent[vm]
        return top

    for group in c.affinity:
        for vm in group[1:]:
            a, b = root(group[0]), root(vm)
            if a != b:
                parent[b] = a
    for index, group in enumerate(c.anti_affinity):
        clash = _first_pair(group, root)
        if clash is not None:
            a, b = clash
            out.add(
                (*C, "anti_affinity", index),
                f"'{a}' and '{b}' must share a host (affinity) and must not (anti_affinity)",
            )
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    pairs = sum(len(r.vms) * len(r.hosts) for r in c.host_rules if r.kind in ("must", "must_not"))
    if pairs > MAX_RULE_PAIRS:
        out.add(
            (*C, "host_rules"),
            f"must / must_not rules name {pairs} VM-host pairs, more than {MAX_RULE_PAIRS}: "
            "use exclude_hosts, pin or fewer, larger host groups",
        )
    for index, rule in enumerate(c.host_rules):
        path = (*C, "host_rules", index)
        if rule.kind in ("must", "must_not") and out.has((*path, "weight")):
            out.add((*path, "weight"), "weight only applies to kind should / should_not")
        if rule.kind == "must" and rule.hosts and all(h in maintenance for h in rule.hosts):
            out.add(
                (*path, "hosts"),
                "all these hosts are in maintenance: the VMs would have nowhere to run",
            )
        if rule.kind not in ("must", "must_not") or pairs > MAX_RULE_PAIRS:
            continue
        for vm in rule.vms:
            for host in rule.hosts:
                other = seen.get((vm, host))
                if other is not None and other[0] != rule.kind:
                    out.add(
                        path,
                        f"'{vm}' on '{host}' is both {other[0]} (host_rules[{other[1]}]) "
                        f"and {rule.kind}",
                    )
                seen.setdefault((vm, host), (rule.kind, index))


def _first_pair(items: Sequence[str], key: Callable[[str], str]) -> tuple[str, str] | None:
    """The first two items with the same key (in one pass)."""
    first: dict[str, str] = {}
    for item in items:
        k = key(item)
        if k in first:
            return first[k], item
        first[k] = item
    return None


def _check_power(policy: Policy, out: Problems) -> None:
    models: list[tuple[FieldPath, PowerModel]] = [
        (("spec", "power", "default_model"), policy.power.default_model)
    ]
    models += [
        (("spec", "power", "host_models", host), model)
        for host, model in policy.power.host_models.items()
    ]
    for path, model in models:
        if model.idle_watts > model.max_watts:
            idle, peak = format_number(model.idle_watts), format_number(model.max_watts)
            out.add((*path, "idle_watts"), f"idle_watts {idle} is above max_watts {peak}")


def _check_migration(policy: Policy, out: Problems) -> None:
    m = policy.migration
    path = ("spec", "migration")
    if m.max_concurrent_per_host > m.max_concurrent:
        out.add(
            (*path, "max_concurrent_per_host"),
            f"{m.max_concurrent_per_host} is above max_concurrent {m.max_concurrent}",
        )
    steps = m.downtime_steps_ms
    if any(b <= a for a, b in itertools.pairwise(steps)):
        out.add((*path, "downtime_steps_ms"), f"must increase, got {list(steps)}")
    if steps and steps[0] <= m.max_downtime_ms:
        where = "downtime_steps_ms" if out.has((*path, "downtime_steps_ms")) else "max_downtime_ms"
        out.add(
            (*path, where),
            f"the first downtime step ({steps[0]} ms) must be above max_downtime_ms "
            f"({m.max_downtime_ms} ms): the steps raise the allowed downtime",
        )
