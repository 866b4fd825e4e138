"""One decide-and-act cycle: inputs -> CycleReport.

Pure except for the ``CycleActions`` it is handed (the executor and the power switch),
so a test runs a whole cycle in-process against the simulated hypervisor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from balancerd.decide import decide
from balancerd.duplicates import set_aside_duplicates
from balancerd.execute.move import MoveResult
from balancerd.model import Plan, Snapshot
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.policy.model import Policy
from balancerd.power import PowerResult
from balancerd.schedule import ActiveSchedule


@dataclass(frozen=True)
class CycleInputs:
    snapshot: Snapshot  # what the hosts run now: moves act on this
    planning: Snapshot  # the same hosts with each guest's forecast demand: decide on this
    policy: Policy
    active: ActiveSchedule
    last_moved_s: Mapping[str, float]  # guest -> when it last moved (cooldowns)
    now_s: float
    at: str  # ISO timestamp for the report
    notes: tuple[str, ...] = ()  # for the plan (e.g. guests backing off)
    paused: bool = False  # an operator paused balancerd: plan, do not act


class CycleActions(Protocol):
    """What a cycle may do to the world."""

    def execute(self, plan: Plan, policy: Policy) -> list[MoveResult]: ...

    def switch_power(
        self, plan: Plan, snapshot: Snapshot, policy: Policy, now_s: float, *, only_on: bool
    ) -> list[PowerResult]: ...


@dataclass(frozen=True)
class CycleReport:
    at: str
    policy: str
    plan: Plan
    # Why the plan was not acted on (PAUSED, FREEZE, RECOMMEND); None when it was.
    held_back: SkipKind | None
    results: tuple[MoveResult, ...] = ()
    power: tuple[PowerResult, ...] = field(default=())

    @property
    def executed(self) -> bool:
        return self.held_back is None

    def count(self, outcome: MoveOutcome) -> int:
        return sum(r.outcome is outcome for r in self.results)

    def summary(self) -> dict[str, Any]:
        """The ``last_cycle`` block of ``balancerd status``."""
        return {
            "at": self.at,
            "policy": self.policy,
            "planned_moves": len(self.plan.moves),
            "executed": self.executed,
            "held_back": None if self.held_back is None else str(self.held_back),
            "migrated": self.count(MoveOutcome.MIGRATED),
            "skipped": self.count(MoveOutcome.SKIPPED),
            "failed": self.count(MoveOutcome.FAILED),
            "reason": self.plan.reason,
            "migration_ids": [r.migration_id for r in self.results if r.migration_id],
        }

    def status_line(self) -> str:
        return (
            f"idle; last cycle {self.policy}: {self.count(MoveOutcome.MIGRATED)} migrated, "
            f"{self.count(MoveOutcome.SKIPPED)} skipped, {self.count(MoveOutcome.FAILED)} failed"
        )


Decide = Callable[..., Plan]


def run_cycle(
    inputs: CycleInputs,
    actions: CycleActions,
    *,
    decide_fn: Decide = decide,
    on_plan: Callable[[Plan], None] = lambda _plan: None,
) -> CycleReport:
    """Decide on the planning snapshot, then act on the real one (or hold back)."""
    policy = inputs.policy
    planning, planning_policy, notes = set_aside_duplicates(inputs.planning, policy)
    plan = decide_fn(
        planning, planning_policy, last_moved_s=dict(inputs.last_moved_s), now_s=inputs.now_s
    )
    notes = [*inputs.notes, *notes]
    if notes:
        plan = replace(plan, notes=(*plan.notes, *notes))
    on_plan(plan)
    held_back: SkipKind | None = None
    if inputs.paused:
        held_back = SkipKind.PAUSED
    elif inputs.active.frozen:
        held_back = SkipKind.FREEZE
    elif policy.mode != "automatic":
        held_back = SkipKind.RECOMMEND
    if held_back is not None:
        return CycleReport(inputs.at, policy.name, plan, held_back)
    if plan.power_on:
        # Capacity first: switch hosts on; their guests move in a later cycle, once up.
        power = actions.switch_power(plan, inputs.snapshot, policy, inputs.now_s, only_on=True)
        return CycleReport(inputs.at, policy.name, plan, None, power=tuple(power))
    results = actions.execute(plan, policy) if plan.moves else []
    power = []
    if policy.objective == "power-save":
        power = actions.switch_power(plan, inputs.snapshot, policy, inputs.now_s, only_on=False)
    return CycleReport(inputs.at, policy.name, plan, None, tuple(results), tuple(power))
