"""solve(): greedy incumbent -> (reduced) ILP -> independent verification.

Stages, each pure:
1. ``build_problem`` indexes the snapshot under the policy (limits, rules, cooldowns).
2. Cheap necessary conditions (``explain_infeasible``); if one fails, stop and say why.
3. A greedy incumbent: repair to the hard limits with the fewest moves, then (balance)
   binary-search the lowest target above the LP bound it reaches within the budget, or
   (power-save) empty hosts one by one.
4. The ILP over the *free* units: all of them on small clusters (the exact problem), else
   the units around the hot spots and the hosts with the most room, warm-started from the
   incumbent, time-limited. Its status and bound are read from the solver itself.
5. The best placement by one objective function computed here (not the solver's word);
   those within ``solver.gap`` (relative, on the score) of the best count as equally good
   and the one with the fewest moves wins. It is re-checked by ``verify``; a placement
   with a blocking violation is never returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from balancerd.model import Placement, Snapshot, SolverReport
from balancerd.policy.model import Policy
from balancerd.solve.explain import explain_infeasible
from balancerd.solve.heuristic import (
    Candidate,
    Unit,
    balance_search,
    build_units,
    consolidate,
    limit_caps,
    moves_and_bytes,
    repair,
)
from balancerd.solve.ilp import PENALTY, POWER_ON_COST, SPREAD, IlpResult, solve_ilp
from balancerd.solve.problem import (
    GIB,
    HostCapacity,
    Problem,
    balance_lower_bound,
    balance_score,
    build_problem,
    max_utils,
    move_lower_bound,
    power_score,
    power_weight,
    shed_bytes_lower_bound,
    util_lower_bounds,
)
from balancerd.solve.verify import Violation, blocking, verify

FULL_ILP_MAX_VARS = 20_000  # above this the ILP frees only the units around the hot spots
REDUCED_ILP_MAX_VARS = 4_000
REDUCED_TARGET_HOSTS = 12


@dataclass(frozen=True)
class SolveResult:
    target: Placement
    report: SolverReport
    score_before: float  # balance: highest weighted util; power-save: share of power on
    score_after: float
    forced: bool  # the current placement breaks a hard rule: moves are not optional
    reasons: tuple[str, ...] = ()  # why there is no placement (infeasible)
    violations: tuple[Violation, ...] = ()  # carried ones on the returned target
    notes: tuple[str, ...] = ()
    util_bound: float | None = None  # balance: lower bound on the highest weighted util
    move_bound: int | None = None  # fewest moves any placement as good as the target needs
    stages: tuple[str, ...] = field(default=())
    problem: Problem | None = field(default=None, repr=False, compare=False)


def objective_value(p: Problem, host_of: list[int]) -> float:
    """The one objective every candidate is ranked by (same terms as the ILP)."""
    mc = p.policy.solver.migration_cost
    total = 0.0
    moved_bytes = 0.0
    for g in range(p.n_guests):
        h = host_of[g]
        if h != p.cur[g]:
            moved_bytes += p.mem[g]
        elif p.must_move[g]:
            total += PENALTY
        bad, w = p.soft[g]
        if w and h in bad:
            total += w
    total += mc * moved_bytes / GIB
    # hard group rules broken (only ever carried from today): each costs like a forced move
    for grp in p.affinity:
        if len({host_of[g] for g in grp}) > 1:
            total += PENALTY
    for grp in p.anti:
        total += PENALTY * (len(grp) - len({host_of[g] for g in grp}))
    if p.objective == "power-save":
        used = set(host_of)
        for h in used:
            total += power_weight(p, h) + (POWER_ON_COST if p.powered_off[h] else 0.0)
    else:
        uc, um = max_utils(p, host_of)
        wc, wm = p.w_cpu * uc, p.w_mem * um
        total += max(wc, wm) + SPREAD * (wc + wm)
    cpu, mem, _ = p.loads(host_of)
    for h in range(p.n_hosts):
        total += PENALTY * max(0.0, cpu[h] - p.cpu_cap[h]) / (p.cpu_total[h] or 1.0)
        total += PENALTY * max(0.0, mem[h] - p.mem_cap[h]) / (p.mem_total[h] or 1.0)
    return total


def score(p: Problem, host_of: list[int]) -> float:
    return power_score(p, host_of) if p.objective == "power-save" else balance_score(p, host_of)


def _forced(p: Problem) -> bool:
    if any(p.must_move[g] and p.movable[g] for g in range(p.n_guests)):
        return True
    cpu, mem, vcpu = p.loads(p.cur)
    for h in range(p.n_hosts):
        if p.balanced[h] and (
            cpu[h] > p.cpu_cap[h] + 1e-9 or mem[h] > p.mem_cap[h] + 0.5 or vcpu[h] > p.vcpu_cap[h]
        ):
            return True
    for grp in p.anti:
        hosts = [p.cur[g] for g in grp]
        if len(set(hosts)) < len(hosts):
            return True
    return any(len({p.cur[g] for g in grp}) > 1 for grp in p.affinity)


def _ilp_scope(
    p: Problem, units: list[Unit], inc: list[int]
) -> tuple[list[int], dict[int, list[int]], bool]:
    """Free units and their candidate hosts; True when that is the whole problem."""
    cur_c, cur_m, _ = p.loads(p.cur)
    over = {
        h
        for h in range(p.n_hosts)
        if cur_c[h] > p.cpu_cap[h] + 1e-9 or cur_m[h] > p.mem_cap[h] + 0.5
    }

    def hosts_for(u: Unit, pool: list[int]) -> list[int]:
        hs = [
            h
            for h in pool
            if p.usable[h]
            and (u.allowed is None or h in u.allowed)
            and (h not in over or h == u.cur)
        ]
        if u.cur >= 0 and u.cur not in hs:
            hs.append(u.cur)  # staying put is always an option (at a penalty if forced)
        return hs

    movable = [i for i, u in enumerate(units) if u.movable]
    all_hosts = list(range(p.n_hosts))
    total = sum(
        (len(u.allowed) if u.allowed is not None else p.n_hosts)
        for u in (units[i] for i in movable)
    )
    if total <= FULL_ILP_MAX_VARS:
        return movable, {i: hosts_for(units[i], all_hosts) for i in movable}, True
    # reduced: the hosts the incumbent takes guests from, busiest first, with all their
    # units free to go home, to the incumbent's choice or to the hosts with most room
    cpu, mem, _ = p.loads(inc)
    util = [
        max(
            p.w_cpu * cpu[h] / (p.cpu_total[h] or 1.0),
            p.w_mem * mem[h] / (p.mem_total[h] or 1.0),
        )
        for h in range(p.n_hosts)
    ]
    roomy = sorted((h for h in range(p.n_hosts) if p.usable[h]), key=lambda h: util[h])
    pool_base = roomy[:REDUCED_TARGET_HOSTS]
    out_count: dict[int, int] = {}
    for i in movable:
        u = units[i]
        if u.cur >= 0 and inc[u.members[0]] != u.cur:
            out_count[u.cur] = out_count.get(u.cur, 0) + 1
    sources = sorted(out_count, key=lambda h: -out_count[h])
    if not sources:  # nothing moved: look at the hottest hosts instead
        sources = sorted(range(p.n_hosts), key=lambda h: -util[h])[:REDUCED_TARGET_HOSTS]
    by_cur: dict[int, list[int]] = {}
    for i in movable:
        by_cur.setdefault(units[i].cur, []).append(i)
    free: list[int] = []
    cands: dict[int, list[int]] = {}
    budget = REDUCED_ILP_MAX_VARS
    for h in sources:
        for i in by_cur.get(h, []):
            u = units[i]
            pool = list(pool_base)
            dest = inc[u.members[0]]
            if dest not in pool:
                pool.append(dest)
            cands[i] = hosts_for(u, pool)
            free.append(i)
            budget -= len(cands[i])
        if budget <= 0:
            break
    # the units left out stay on their incumbent host
    return free, cands, False


def _objective_bound(p: Problem) -> float:
    """A lower bound on ``objective_value`` of any placement within the hard limits."""
    if p.objective == "power-save":
        return _power_bound(p)
    lbc, lbm = util_lower_bounds(p)
    # utilization can't beat its bound, and the hot hosts must shed some bytes
    return (
        max(p.w_cpu * lbc, p.w_mem * lbm)
        + SPREAD * (p.w_cpu * lbc + p.w_mem * lbm)
        + p.policy.solver.migration_cost * shed_bytes_lower_bound(p) / GIB
    )


def _power_bound(p: Problem) -> float:
    """Power-save: at least as many hosts as the total demand needs at the largest caps
    (and min_active_hosts), each costing at least the cheapest idle power."""
    usable = [h for h in range(p.n_hosts) if p.usable[h]]
    if not usable:
        return 0.0
    need = max(
        p.policy.power.min_active_hosts,
        math.ceil(sum(p.mem) / max(max(p.mem_cap[h] for h in usable), 1.0) - 1e-9),
        math.ceil(sum(p.cpu) / max(max(p.cpu_cap[h] for h in usable), 1e-9) - 1e-9),
        1 if p.n_guests else 0,
    )
    weights = sorted(power_weight(p, h) for h in usable)
    return sum(weights[: min(need, len(weights))])


def _prefer_fewer_moves(
    p: Problem, ranked: list[tuple[float, str, list[int]]]
) -> list[tuple[float, str, list[int]]]:
    """Placements within the policy's relative gap (solver.gap, on the score) of the best
    one are equally good: among them the fewest moves go first."""
    if not ranked:
        return ranked
    best_obj = ranked[0][0]
    tol = p.policy.solver.gap * max(score(p, ranked[0][2]), 1e-9)
    near = [t for t in ranked if t[0] <= best_obj + tol]
    rest = [t for t in ranked if t[0] > best_obj + tol]
    near.sort(key=lambda t: (moves_and_bytes(p, t[2])[0], t[0]))
    return near + rest


def solve(
    snapshot: Snapshot,
    policy: Policy,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    last_moved_s: Mapping[str, float] | None = None,
    now_s: float = 0.0,
    use_ilp: bool = True,
) -> SolveResult:
    t0 = time.perf_counter()
    p = build_problem(snapshot, policy, capacity=capacity, last_moved_s=last_moved_s, now_s=now_s)
    current = Placement({p.guests[g]: p.hosts[p.cur[g]] for g in range(p.n_guests)})
    before = score(p, p.cur)
    forced = _forced(p)
    notes = list(p.notes)
    reasons = explain_infeasible(snapshot, policy, capacity=capacity, problem=p)
    if reasons:
        return SolveResult(
            target=current,
            report=SolverReport("none", "infeasible", time.perf_counter() - t0, None, None, None),
            score_before=before,
            score_after=before,
            forced=forced,
            reasons=tuple(reasons),
            notes=tuple(notes),
            problem=p,
        )
    units, unit_of = build_units(p)
    bud = policy.budget
    stages: list[str] = []
    cands: list[Candidate] = []
    if p.objective == "balance":
        # when one more move of the smallest guest costs more than the whole gap between
        # today and the bound, no balancing target can pay for itself: repair only
        lb = balance_lower_bound(p)
        movable_mem = [p.mem[g] for g in range(p.n_guests) if p.movable[g]]
        cheapest = policy.solver.migration_cost * min(movable_mem, default=0.0) / GIB
        cands = balance_search(
            p,
            units,
            unit_of,
            max_moves=bud.max_moves,
            max_bytes=float(bud.max_bytes),
            search=cheapest < max(before - lb, 0.0),
        )
    else:
        cap_c, cap_m = limit_caps(p)
        base = repair(
            p,
            units,
            unit_of,
            cap_c,
            cap_m,
            max_moves=bud.max_moves,
            max_bytes=float(bud.max_bytes),
            partial=True,
        )
        if base is not None:
            cands.append(
                Candidate(
                    base.host_of,
                    score(p, base.host_of),
                    base.moves,
                    base.moved_bytes,
                    base.complete,
                    "repair",
                )
            )
            if base.complete:
                cands.append(
                    consolidate(
                        p,
                        units,
                        base.host_of,
                        max_moves=bud.max_moves,
                        max_bytes=float(bud.max_bytes),
                    )
                )
    stages.append(f"greedy:{len(cands)} candidates {time.perf_counter() - t0:.2f}s")
    # the current placement is a candidate too (zero moves)
    ranked: list[tuple[float, str, list[int]]] = [(objective_value(p, p.cur), "current", p.cur)]
    for c in cands:
        ranked.append((objective_value(p, c.host_of), c.label, c.host_of))
    ranked.sort(key=lambda t: t[0])
    ranked = _prefer_fewer_moves(p, ranked)
    incumbent = ranked[0][2]

    bound: float | None = _objective_bound(p)
    ilp: IlpResult | None = None
    full = False
    inc_obj = ranked[0][0]
    if bound is not None and inc_obj - bound <= policy.solver.gap * max(abs(inc_obj), 1e-9):
        stages.append("ilp: skipped, the greedy placement is within the gap of the bound")
    elif use_ilp and policy.solver.backend in ("cbc", "highs"):
        free, cand_hosts, full = _ilp_scope(p, units, incumbent)
        if free:
            polish = not full and p.objective == "balance"
            ilp = solve_ilp(
                p,
                units,
                free,
                cand_hosts,
                incumbent,
                backend=policy.solver.backend,
                time_limit_s=policy.solver.time_limit_s,
                gap=policy.solver.gap,
                max_moves=bud.max_moves,
                max_bytes=float(bud.max_bytes),
                # too big for the whole problem: keep the incumbent's balance, fewer moves
                z_cap=balance_score(p, incumbent) if polish else None,
            )
            stages.append(
                f"ilp:{ilp.backend} {ilp.status} vars={ilp.n_vars} "
                f"{'full' if full else 'reduced'} {ilp.seconds:.2f}s"
            )
            if ilp.host_of is not None:
                ranked.append((objective_value(p, ilp.host_of), "ilp", ilp.host_of))
                ranked.sort(key=lambda t: (t[0], t[1] != "ilp"))

    ranked = _prefer_fewer_moves(p, ranked)
    # verify, best first; never return a placement with a blocking violation
    chosen: tuple[float, str, list[int]] | None = None
    carried: list[Violation] = []
    for obj, label, host_of in ranked:
        target = Placement({p.guests[g]: p.hosts[host_of[g]] for g in range(p.n_guests)})
        n, b = moves_and_bytes(p, host_of)
        if n > bud.max_moves or b > bud.max_bytes:
            notes.append(f"{label}: over the migration budget; dropped")
            continue
        viol = verify(snapshot, policy, target, capacity=capacity, current=current)
        bad = blocking(viol)
        if bad:
            notes.append(f"{label}: rejected by verify: {bad[0]}")
            continue
        chosen = (obj, label, host_of)
        carried = viol
        break
    assert chosen is not None  # "current" always verifies: it carries what it has
    obj, label, host_of = chosen
    target = Placement({p.guests[g]: p.hosts[host_of[g]] for g in range(p.n_guests)})
    after = score(p, host_of)

    util_bound: float | None = None
    move_bound: int | None = None
    if p.objective == "balance":
        util_bound = balance_lower_bound(p)
        uc, um = max_utils(p, host_of)
        move_bound = move_lower_bound(p, uc, um)
    if ilp is not None and full and ilp.bound is not None:
        bound = max(bound, ilp.bound) if bound is not None else ilp.bound
    if label == "ilp" and ilp is not None:
        backend, status = ilp.backend, ilp.status
        if not full and status == "optimal":
            status = "feasible"  # optimal only for the units it was free to move
    else:
        backend = "greedy"
        status = "feasible"
        if ilp is not None and full and ilp.status == "optimal" and ilp.objective is not None:
            # the exact problem was solved and the greedy one is as good
            status = "optimal" if obj <= ilp.objective + 1e-9 else "feasible"
    if bound is not None and obj - bound <= 1e-9 * max(1.0, abs(obj)):
        status = "optimal"
    gap = max(0.0, (obj - bound) / max(abs(obj), 1e-9)) if bound is not None else None
    report = SolverReport(
        backend=backend,
        status=status,
        seconds=time.perf_counter() - t0,
        objective=obj,
        bound=bound,
        gap=gap,
    )
    if ilp is not None and label != "ilp":
        notes.append(f"ilp ({ilp.backend}) {ilp.status}: kept the {label} placement")
    return SolveResult(
        target=target,
        report=report,
        score_before=before,
        score_after=after,
        forced=forced,
        violations=tuple(carried),
        notes=tuple(notes),
        util_bound=util_bound,
        move_bound=move_bound,
        stages=tuple(stages),
        problem=p,
    )
