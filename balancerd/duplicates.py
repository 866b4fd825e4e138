"""Guests that appear under one name on several hosts (a migration's leftovers, or an
operator who recreated a guest) cannot be told apart by name: neither copy is moved.

Pure: the planning snapshot keeps every copy (its load counts where it runs), renamed
``name@host`` and excluded from moves by the policy; the notes say why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from balancerd.model import Snapshot
from balancerd.policy.model import Policy


def set_aside_duplicates(snapshot: Snapshot, policy: Policy) -> tuple[Snapshot, Policy, list[str]]:
    """(snapshot, policy, notes) with same-named guests renamed and excluded from moves."""
    counts = Counter(v.name for v in snapshot.vms)
    dups = sorted(name for name, n in counts.items() if n > 1)
    if not dups:
        return snapshot, policy, []
    vms = tuple(
        replace(v, name=f"{v.name}@{v.host}") if v.name in dups else v for v in snapshot.vms
    )
    renamed = tuple(v.name for v in vms if "@" in v.name and v.name.split("@", 1)[0] in dups)
    constraints = replace(
        policy.constraints, exclude_vms=tuple(policy.constraints.exclude_vms) + renamed
    )
    notes = []
    for name in dups:
        hosts = sorted(v.host for v in snapshot.vms if v.name == name)
        notes.append(f"guest {name} is on {', '.join(hosts)} under one name: neither copy moves")
    return replace(snapshot, vms=vms), replace(policy, constraints=constraints), notes
