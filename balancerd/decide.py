"""The one entry point of a decision: snapshot + policy -> Plan. Pure: no I/O, no clock.

Used by ``balancerd plan`` / ``apply``, the daemon and the simulator alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from balancerd.model import Move, Placement, Plan, Snapshot
from balancerd.plan import make_plan, power_changes
from balancerd.policy.model import Policy
from balancerd.selectors import resolve_policy
from balancerd.solve import HostCapacity, SolveResult, solve
from balancerd.solve.problem import Problem, build_problem

__all__ = ["HostCapacity", "decide", "hysteresis_holds"]

STOPPED_MOVE_S = 1.0  # expected time of a stopped guest's move: only its definition moves


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

    Limits that cannot all hold are not a reason to do nothing: the solver lowers the
    violation first and everything else still progresses; what it cannot fix is named in
    the plan's notes. Only a policy that contradicts itself yields no plan.

    Selectors in the policy's constraints are resolved against ``snapshot`` first (callers
    that explain the plan resolve too, so they read the same names).
    """
    policy = resolve_policy(policy, snapshot)
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
        plan = _no_moves(policy, res, p, "no valid placement: " + "; ".join(res.reasons), notes)
        return with_stopped_moves(plan, snapshot, p)
    held = hysteresis_holds(res, policy)
    if held:
        return with_stopped_moves(_no_moves(policy, res, p, held, notes), snapshot, p)
    plan = make_plan(
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
    if not plan.moves and res.held:
        plan = replace(plan, reason=res.held)
    elif not plan.moves and res.unfixed:
        plan = replace(plan, reason="nothing can be improved this cycle: " + "; ".join(res.unfixed))
    return with_stopped_moves(plan, snapshot, p)


def with_stopped_moves(plan: Plan, snapshot: Snapshot, p: Problem) -> Plan:
    """Stopped guests on hosts in maintenance leave with a cold (offline) move of their
    definition, in a wave after the running guests' moves. They use no CPU or memory
    while stopped, but need room when started: each goes to the allowed host (usable,
    on, within its pin) with the most memory left at the target, counting the stopped
    guests already sent there."""
    maint = set(p.policy.constraints.maintenance)
    leaving = [v for v in snapshot.stopped if v.host in maint]
    if not leaving:
        return plan
    notes: list[str] = []
    runs_on = {v.name: v.host for v in snapshot.vms}
    for v in [v for v in leaving if v.name in runs_on]:
        # a stale definition of a guest that runs elsewhere: moving it spreads the copies
        notes.append(
            f"stopped guest {v.name} on host {v.host} is not moved: a guest of that name "
            f"runs on {runs_on[v.name]} (a stale definition? undefine one of them)"
        )
    leaving = [v for v in leaving if v.name not in runs_on]
    host_of = [
        p.host_index.get(plan.target.host_of.get(name, ""), p.cur[g])
        for g, name in enumerate(p.guests)
    ]
    _, mem, _ = p.loads(host_of)
    room = {
        p.hosts[h]: p.mem_total[h] - mem[h]
        for h in range(p.n_hosts)
        if p.usable[h] and not p.powered_off[h]
    }
    for v in snapshot.stopped:
        if v.host in room:
            room[v.host] -= v.mem_bytes
    wave = max((m.wave for m in plan.moves), default=-1) + 1
    moves: list[Move] = []
    for v in sorted(leaving, key=lambda v: -v.mem_bytes):
        pin = p.policy.constraints.pin.get(v.name)
        options = [h for h in room if pin is None or h in pin]
        if not options:
            notes.append(f"stopped guest {v.name} must leave host {v.host}: no usable host")
            continue
        dst = max(options, key=lambda h: (room[h], h))
        room[dst] -= v.mem_bytes
        moves.append(Move(v.name, v.host, dst, 0, STOPPED_MOVE_S, wave=wave, offline=True))
    return replace(
        plan,
        moves=plan.moves + tuple(moves),
        reason="" if moves else plan.reason,
        notes=plan.notes + tuple(notes),
    )


def hysteresis_holds(res: SolveResult, policy: Policy) -> str:
    """Why the target is not worth its moves ("" when it is): a target that lowers a
    hard-rule violation always is; otherwise its improvement (see
    ``balancerd.solve.core.improvement``: points of the highest utilization or of load
    above the balanced level for balance, host-equivalents of idle power for power-save)
    must reach ``min_improvement``."""
    if res.forced or res.target == _current(res):
        return ""
    need = policy.hysteresis.min_improvement
    if res.improvement + 1e-12 >= need:
        return ""
    unit = "host-equivalents" if policy.objective == "power-save" else "utilization"
    return f"improvement {res.improvement:.3f} is below min_improvement {need:.3f} ({unit})"


def _current(res: SolveResult) -> Placement | None:
    p = res.problem
    if p is None:
        return None
    return Placement({p.guests[g]: p.hosts[p.cur[g]] for g in range(p.n_guests)})


def _no_moves(
    policy: Policy,
    res: SolveResult,
    p: Problem,
    reason: str,
    notes: tuple[str, ...],
) -> Plan:
    current = Placement({p.guests[g]: p.hosts[p.cur[g]] for g in range(p.n_guests)})
    power_off, power_on = power_changes(p, current)
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
