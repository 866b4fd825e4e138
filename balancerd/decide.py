"""The one entry point of a decision: snapshot + policy -> Plan. Pure: no I/O, no clock.

Used by ``balancerd plan`` / ``apply``, the daemon and the simulator alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from balancerd.model import Placement, Plan, Snapshot
from balancerd.plan import make_plan, power_changes
from balancerd.policy.model import Policy
from balancerd.solve import HostCapacity, SolveResult, solve
from balancerd.solve.problem import build_problem

__all__ = ["HostCapacity", "decide"]


def decide(
    snapshot: Snapshot,
    policy: Policy,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    last_moved_s: Mapping[str, float] | None = None,
    now_s: float = 0.0,
    use_ilp: bool = True,
) -> Plan:
    """Solve, verify, apply hysteresis, and order the moves into capacity-safe waves.

    ``capacity`` overrides a host's CPUs / memory; ``last_moved_s`` (guest -> time of its
    last move, same clock as ``now_s``) keeps recently moved guests still for the policy's
    cooldown unless a hard rule (e.g. maintenance) forces them off their host.
    """
    res = solve(
        snapshot,
        policy,
        capacity=capacity,
        last_moved_s=last_moved_s,
        now_s=now_s,
        use_ilp=use_ilp,
    )
    p = res.problem or build_problem(
        snapshot, policy, capacity=capacity, last_moved_s=last_moved_s, now_s=now_s
    )
    notes = tuple(res.notes) + tuple(str(v) for v in res.violations)
    if res.reasons:
        return _no_moves(
            snapshot, policy, res, p, "no valid placement: " + "; ".join(res.reasons), notes
        )
    improvement = res.score_before - res.score_after
    if not res.forced and improvement < policy.hysteresis.min_improvement:
        return _no_moves(
            snapshot,
            policy,
            res,
            p,
            f"improvement {improvement:.3f} is below min_improvement "
            f"{policy.hysteresis.min_improvement:.3f}",
            notes,
        )
    return make_plan(
        snapshot,
        policy,
        res.target,
        res.report,
        capacity=capacity,
        score_before=res.score_before,
        score_after=res.score_after,
        notes=notes,
        problem=p,
    )


def _no_moves(
    snapshot: Snapshot,
    policy: Policy,
    res: SolveResult,
    p: object,
    reason: str,
    notes: tuple[str, ...],
) -> Plan:
    from balancerd.solve.problem import Problem

    assert isinstance(p, Problem)
    current = Placement({p.guests[g]: p.hosts[p.cur[g]] for g in range(p.n_guests)})
    power_off, power_on = power_changes(p, current)
    del snapshot
    return Plan(
        policy=policy.name,
        objective=policy.objective,
        moves=(),
        current=current,
        target=current,
        solver=res.report,
        score_before=res.score_before,
        score_after=res.score_before,
        power_off=power_off,
        power_on=power_on,
        reason=reason,
        notes=notes,
    )
