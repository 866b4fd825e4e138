"""Selectors: host labels, guest tags and name patterns -> host and guest names. Pure.

A policy list that names hosts or guests may hold selectors among the names::

    maintenance: [host-7, {hosts: {labels: {gen: g4}}}]
    host_rules: [{vms: [{vms: {tags: [db]}}], hosts: [{hosts: {names: ["rack2-*"]}}],
                  kind: must_not}]

Semantics: a list is the union of its items. Within one selector every criterion given
must hold (AND): ``names`` is a list of fnmatch patterns of which ANY may match (a name
has one value); ``labels`` (hosts, from the daemon config) must ALL be present with those
values; ``tags`` (guests, from their libvirt metadata) must ALL be present. "db or cache"
is two selectors in the list: ``[{vms: {tags: [db]}}, {vms: {tags: [cache]}}]``.

The loader keeps the names written in a constraint's fields and the selectors apart
(``Constraints.selectors``, each with the list it was written in); ``resolve_policy``
expands them against a snapshot, once per cycle, into a policy of plain names that every
later stage (solver, verifier, plan, explanations) reads as before.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from balancerd.yamlpos import FieldPath

if TYPE_CHECKING:
    from balancerd.model import Host, Snapshot, Vm
    from balancerd.policy.model import Policy


class Over(StrEnum):
    HOSTS = "hosts"
    VMS = "vms"


@dataclass(frozen=True)
class Selector:
    """``{hosts: {names: [...], labels: {...}}}`` or ``{vms: {names: [...], tags: [...]}}``."""

    over: Over
    names: tuple[str, ...] = ()  # fnmatch patterns: any
    labels: tuple[tuple[str, str], ...] = ()  # hosts: every key=value
    tags: tuple[str, ...] = ()  # guests: every tag
    path: FieldPath = field(default=(), compare=False)  # where it is written (messages)

    def matches_host(self, host: Host) -> bool:
        return self.over is Over.HOSTS and (
            _any_name(self.names, host.name)
            and all(host.labels.get(k) == v for k, v in self.labels)
        )

    def matches_vm(self, vm: Vm) -> bool:
        return self.over is Over.VMS and (
            _any_name(self.names, vm.name) and all(t in vm.tags for t in self.tags)
        )

    def text(self) -> str:
        """As written in a policy (flow style): ``{hosts: {labels: {gen: g4}}}``."""
        parts = []
        if self.names:
            parts.append("names: [" + ", ".join(self.names) + "]")
        if self.labels:
            parts.append("labels: {" + ", ".join(f"{k}: {v}" for k, v in self.labels) + "}")
        if self.tags:
            parts.append("tags: [" + ", ".join(self.tags) + "]")
        return f"{{{self.over}: {{{', '.join(parts)}}}}}"


def _any_name(patterns: Sequence[str], name: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class Selected:
    """A selector written in the constraint list at ``at`` (relative to
    ``spec.constraints``): ``("maintenance",)``, ``("pin", VM)``, ``("affinity", i)``,
    ``("host_rules", i, "vms")``."""

    at: tuple[str | int, ...]
    selector: Selector


def select_hosts(selector: Selector, hosts: Iterable[Host]) -> tuple[str, ...]:
    return tuple(h.name for h in hosts if selector.matches_host(h))


def select_vms(selector: Selector, vms: Iterable[Vm]) -> tuple[str, ...]:
    return tuple(v.name for v in vms if selector.matches_vm(v))


def matched(selected: Sequence[Selected], snapshot: Snapshot) -> dict[Selector, tuple[str, ...]]:
    """Each distinct selector's names in ``snapshot`` (each resolved once)."""
    out: dict[Selector, tuple[str, ...]] = {}
    for s in selected:
        sel = s.selector
        if sel not in out:
            if sel.over is Over.HOSTS:
                out[sel] = select_hosts(sel, snapshot.hosts)
            else:
                out[sel] = select_vms(sel, snapshot.vms)
    return out


def resolve_policy(policy: Policy, snapshot: Snapshot) -> Policy:
    """``policy`` with every selector replaced by the names it matches in ``snapshot``
    (appended after the names written in the same list, without repeats). A policy
    without selectors is returned as it is."""
    c = policy.constraints
    if not c.selectors:
        return policy
    names = matched(c.selectors, snapshot)
    extra: dict[tuple[str | int, ...], list[str]] = {}
    for s in c.selectors:
        extra.setdefault(s.at, []).extend(names[s.selector])

    def merged(at: tuple[str | int, ...], written: tuple[str, ...]) -> tuple[str, ...]:
        more = extra.get(at)
        return written if not more else tuple(dict.fromkeys((*written, *more)))

    return replace(
        policy,
        constraints=replace(
            c,
            pin={vm: merged(("pin", vm), hosts) for vm, hosts in c.pin.items()},
            exclude_vms=merged(("exclude_vms",), c.exclude_vms),
            exclude_hosts=merged(("exclude_hosts",), c.exclude_hosts),
            maintenance=merged(("maintenance",), c.maintenance),
            affinity=tuple(merged(("affinity", i), g) for i, g in enumerate(c.affinity)),
            anti_affinity=tuple(
                merged(("anti_affinity", i), g) for i, g in enumerate(c.anti_affinity)
            ),
            host_rules=tuple(
                replace(
                    r,
                    vms=merged(("host_rules", i, "vms"), r.vms),
                    hosts=merged(("host_rules", i, "hosts"), r.hosts),
                )
                for i, r in enumerate(c.host_rules)
            ),
            selectors=(),
        ),
    )


def split_written(
    items: Iterable[str | Selector], at: tuple[str | int, ...], out: list[Selected]
) -> tuple[str, ...]:
    """The names of a written list; its selectors go to ``out`` (the loader's helper)."""
    names: list[str] = []
    for item in items:
        if isinstance(item, Selector):
            out.append(Selected(at, item))
        else:
            names.append(item)
    return tuple(names)


def host_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Labels in the order a selector keeps them (sorted: equal selectors compare equal)."""
    return tuple(sorted(labels.items()))
