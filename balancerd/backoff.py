"""Exponential back-off for moves that failed or were refused, so a guest that cannot move
(a passthrough device, a local disk, a destination without room) is not planned and refused
again every cycle.

Pure: times are passed in (the daemon's monotonic clock). A failed move backs off the guest
(any destination); a refusal that depends on the destination (no memory there, a network
or disk it lacks, it does not answer) backs off that guest-destination pair; a refusal that
depends on the guest alone (its cache mode, its state) backs off the guest. Skips caused by
the orchestration itself (freeze, stopping, an earlier move) do not count. A successful move
clears the guest's history.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from balancerd.execute.move import MoveResult
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.policy.model import HostRule, Policy

FIRST_S = 120.0
MAX_S = 3600.0

# Refusals that say something about the destination only.
DESTINATION_KINDS = frozenset(
    {
        SkipKind.NO_MEMORY,
        SkipKind.DISK_MISSING,
        SkipKind.NETWORK,
        SkipKind.VERSION,
        SkipKind.CPU_INCOMPATIBLE,
        SkipKind.HOST_DOWN,
        SkipKind.NAME_TAKEN,
    }
)
# Refusals that say something about the guest wherever it goes.
GUEST_KINDS = frozenset({SkipKind.CACHE_MODE, SkipKind.NOT_RUNNING, SkipKind.IN_JOB})


@dataclass(frozen=True)
class Backoff:
    until_s: float
    failures: int
    reason: str


class BackoffTable:
    def __init__(self, first_s: float = FIRST_S, max_s: float = MAX_S) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.guests: dict[str, Backoff] = {}
        self.pairs: dict[tuple[str, str], Backoff] = {}

    def record(self, r: MoveResult, now_s: float) -> None:
        if r.outcome is MoveOutcome.MIGRATED:
            self.guests.pop(r.vm, None)
            for key in [k for k in self.pairs if k[0] == r.vm]:
                del self.pairs[key]
            return
        if r.outcome is MoveOutcome.FAILED:
            self.guests[r.vm] = self._next(self.guests.get(r.vm), f"failed: {r.reason}", now_s)
        elif r.skip_kind in GUEST_KINDS:
            self.guests[r.vm] = self._next(self.guests.get(r.vm), r.reason, now_s)
        elif r.skip_kind in DESTINATION_KINDS:
            key = (r.vm, r.dst)
            self.pairs[key] = self._next(self.pairs.get(key), r.reason, now_s)

    def _next(self, prev: Backoff | None, reason: str, now_s: float) -> Backoff:
        failures = 1 if prev is None else prev.failures + 1
        wait_s = min(self.max_s, self.first_s * 2 ** (failures - 1))
        return Backoff(until_s=now_s + wait_s, failures=failures, reason=reason)

    def active(self, now_s: float) -> tuple[dict[str, Backoff], dict[tuple[str, str], Backoff]]:
        guests = {vm: b for vm, b in self.guests.items() if b.until_s > now_s}
        pairs = {k: b for k, b in self.pairs.items() if b.until_s > now_s}
        return guests, pairs

    def apply(self, policy: Policy, now_s: float) -> tuple[Policy, list[str]]:
        """``policy`` with backed-off guests excluded and backed-off pairs forbidden, and
        one note per back-off for the plan."""
        guests, pairs = self.active(now_s)
        if not guests and not pairs:
            return policy, []
        c = policy.constraints
        rules = tuple(HostRule(vms=(vm,), hosts=(dst,), kind="must_not") for vm, dst in pairs)
        constraints = replace(
            c,
            exclude_vms=(*c.exclude_vms, *sorted(guests)),
            host_rules=(*c.host_rules, *rules),
        )
        notes = [
            f"{vm} backs off for {b.until_s - now_s:.0f} s (failure {b.failures}): {b.reason}"
            for vm, b in sorted(guests.items())
        ] + [
            f"{vm} -> {dst} backs off for {b.until_s - now_s:.0f} s: {b.reason}"
            for (vm, dst), b in sorted(pairs.items())
        ]
        return replace(policy, constraints=constraints), notes
