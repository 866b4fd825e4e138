"""solve(): best effort -> greedy candidates -> (reduced) ILP -> independent verification.

Stages, each pure:
1. ``build_problem`` indexes the snapshot under the policy (limits, rules, cooldowns).
2. ``best_effort``: what cannot all hold becomes the first thing to minimize instead of a
   refusal (guests that fit nowhere stay and are named; over-subscribed CPU is spread
   evenly). Only a policy that contradicts itself stops here, and says why.
3. Greedy candidates: shed what breaks the hard limits with the fewest moves, then
   (balance) walk the water level down towards the bound, or (power-save) empty hosts.
4. The ILP over the *free* units: all of them on small clusters (the exact problem), else
   the units around the hot spots and the hosts with the most room, warm-started from the
   incumbent, time-limited. Its status and bound are read from the solver itself.
5. The best placement by one objective function computed here (not the solver's word);
   those within ``solver.gap`` (relative, on the score) of the best count as equally good
   and the one with the fewest moves wins. It is re-checked by ``verify``; a placement
   with a blocking violation is never returned.

The objective, in tiers (each far above the next):
  hard rules left broken (PENALTY each) and load above a cap (PENALTY per host capacity);
  balance: the highest weighted utilization ``z`` plus SPREAD x each resource's own highest,
  then the load above the balanced level summed over hosts (in host capacities, divided by
  the number of hosts: lowering many equal maxima is progress even when ``z`` cannot move);
  power-save: the idle power of the hosts left on, in host-equivalents;
  then ``migration_cost`` per GiB-equivalent moved (the predicted migration time at the
  policy's bandwidth, predict.py: a dirtying guest costs more than a quiet one of its size),
  counted in host-points (1/100 of one host's capacity; for balance, of the whole cluster's
  ``z`` scale), so that at any cluster size it orders equally good placements by what
  their moves cost and never blocks balancing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from balancerd.model import Placement, Snapshot, SolverReport
from balancerd.policy.model import Policy
from balancerd.solve.explain import Effort, best_effort
from balancerd.solve.heuristic import (
    Candidate,
    Unit,
    balance_search,
    balanced_level,
    build_units,
    consolidate,
    limit_caps,
    moves_and_bytes,
    quieter,
    repair,
)
from balancerd.solve.ilp import (
    PENALTY,
    POWER_ON_COST,
    SPREAD,
    IlpResult,
    migration_weight,
    n_balanced,
    solve_ilp,
)
from balancerd.solve.problem import (
    GIB,
    HostCapacity,
    Problem,
    balance_lower_bound,
    balance_score,
    build_problem,
    max_utils,
    move_lower_bound,
    power_weight,
    shed_bytes_lower_bound,
    util_lower_bounds,
)
from balancerd.solve.verify import Violation, blocking, verify

FULL_ILP_MAX_VARS = 20_000  # above this the ILP frees only the units around the hot spots
REDUCED_ILP_MAX_VARS = 4_000
REDUCED_TARGET_HOSTS = 12

Ranked = list[tuple["Measure", str, list[int]]]  # best first
REFERENCES = ("current", "repair")  # what other candidates must improve on (hysteresis)


@dataclass(frozen=True)
class SolveResult:
    target: Placement
    report: SolverReport
    score_before: float  # balance: highest weighted util; power-save: host-equivalents on
    score_after: float
    forced: bool  # the target lowers a hard-rule violation: moves are not optional
    reasons: tuple[str, ...] = ()  # why nothing can be planned (a self-contradicting policy)
    violations: tuple[Violation, ...] = ()  # carried ones on the returned target
    notes: tuple[str, ...] = ()
    util_bound: float | None = None  # balance: lower bound on the highest weighted util
    move_bound: int | None = None  # fewest moves any placement as good as the target needs
    stages: tuple[str, ...] = field(default=())
    problem: Problem | None = field(default=None, repr=False, compare=False)
    improvement: float = 0.0  # what hysteresis.min_improvement is compared with
    unfixed: tuple[str, ...] = ()  # what the target leaves broken, named
    held: str = ""  # why today's placement was kept although others were found


# --- the objective and the measures built on it ------------------------------------------


@dataclass(frozen=True)
class Measure:
    """Everything the ranking needs about one placement, from one pass over it."""

    objective: float  # what candidates are ranked by (the ILP's terms)
    violation: float  # hard rules left broken + load above the caps (host capacities)
    score: float  # balance: highest weighted util; power-save: host-equivalents on
    excess: float  # balance: weighted load above the bound (host capacities)
    hot: float  # balance: the same above bound + min_improvement (hysteresis)
    moves: int
    moved_bytes: float


def measure(p: Problem, host_of: list[int], lb: tuple[float, float] | None = None) -> Measure:
    """``lb``: the balanced level per resource (``balanced_level``), if already known."""
    lbc, lbm = lb if lb is not None else balanced_level(p)
    margin = p.policy.hysteresis.min_improvement
    cpu, mem, vcpu = p.loads(host_of)
    viol = 0.0
    excess = hot = 0.0
    uc = um = 0.0
    for h in range(p.n_hosts):
        tc, tm = p.cpu_total[h] or 1.0, p.mem_total[h] or 1.0
        viol += max(0.0, cpu[h] - p.cpu_cap[h]) / tc + max(0.0, mem[h] - p.mem_cap[h]) / tm
        viol += max(0.0, vcpu[h] - p.vcpu_cap[h]) / (p.vcpu_cap[h] or 1.0)
        if p.balanced[h]:
            c, m = cpu[h] / tc, mem[h] / tm
            uc, um = max(uc, c), max(um, m)
            excess += p.w_cpu * max(0.0, c - lbc) + p.w_mem * max(0.0, m - lbm)
            hot += p.w_cpu * max(0.0, c - lbc - margin) + p.w_mem * max(0.0, m - lbm - margin)
    moves = 0
    moved_bytes = soft = cost = 0.0
    for g in range(p.n_guests):
        h = host_of[g]
        if h != p.cur[g]:
            moves += 1
            moved_bytes += p.mem[g]
            cost += p.move_cost[g]
        elif p.must_move[g]:
            viol += 1.0
        bad, w = p.soft[g]
        if w and h in bad:
            soft += w
    for grp in p.affinity:
        if len({host_of[g] for g in grp}) > 1:
            viol += 1.0
    for grp in p.anti:
        viol += len(grp) - len({host_of[g] for g in grp})
    obj = PENALTY * viol + soft + migration_weight(p) * cost
    if p.objective == "power-save":
        sc = power_on(p, host_of)
        for h in set(host_of):
            obj += power_weight(p, h) + (POWER_ON_COST if p.powered_off[h] else 0.0)
    else:
        wc, wm = p.w_cpu * uc, p.w_mem * um
        sc = max(wc, wm)
        obj += sc + SPREAD * (wc + wm) + excess / n_balanced(p)
    return Measure(obj, viol, sc, excess, hot, moves, moved_bytes)


def excess_above(p: Problem, host_of: list[int], margin: float = 0.0) -> float:
    """Weighted load above (balanced level_r + margin), summed over balanced hosts and
    resources, in host capacities (0.5 = half of one host)."""
    lbc, lbm = balanced_level(p)
    cpu, mem, _ = p.loads(host_of)
    tc, tm = lbc + margin, lbm + margin
    total = 0.0
    for h in range(p.n_hosts):
        if not p.balanced[h]:
            continue
        total += p.w_cpu * max(0.0, cpu[h] / p.cpu_total[h] - tc)
        total += p.w_mem * max(0.0, mem[h] / p.mem_total[h] - tm)
    return total


def violation(p: Problem, host_of: list[int]) -> float:
    """Hard rules left broken (each forced move undone, each broken group) plus load above
    the caps, in host capacities."""
    return measure(p, host_of).violation


def objective_value(p: Problem, host_of: list[int]) -> float:
    """The one objective every candidate is ranked by (same terms as the ILP)."""
    return measure(p, host_of).objective


def power_on(p: Problem, host_of: list[int]) -> float:
    """Power-save's score: idle power of the hosts that stay (or go) on, in
    host-equivalents (1.0 = one host of the default power model)."""
    return sum(
        power_weight(p, h)
        for h in set(host_of)
        if p.balanced[h] or (p.powered_off[h] and p.usable[h])
    )


def score(p: Problem, host_of: list[int]) -> float:
    return power_on(p, host_of) if p.objective == "power-save" else balance_score(p, host_of)


def improvement(p: Problem, before: list[int], after: list[int]) -> float:
    """What ``min_improvement`` is compared with, independent of the cluster's size.

    balance: the larger of the drop of the highest weighted utilization and the drop of
    the load above (balanced level + min_improvement), in host capacities: moving 5 % of
    a host off the hottest hosts counts 0.05 even when they were many at the same maximum.
    power-save: host-equivalents of idle power switched off."""
    if p.objective == "power-save":
        return power_on(p, before) - power_on(p, after)
    margin = p.policy.hysteresis.min_improvement
    return max(
        balance_score(p, before) - balance_score(p, after),
        excess_above(p, before, margin) - excess_above(p, after, margin),
    )


def _objective_bound(p: Problem) -> float:
    """A lower bound on ``objective_value`` of any placement within the hard limits."""
    if p.objective == "power-save":
        return _power_bound(p)
    lbc, lbm = util_lower_bounds(p)
    # utilization can't beat its bound, and the hot hosts must shed some bytes
    return (
        max(p.w_cpu * lbc, p.w_mem * lbm)
        + SPREAD * (p.w_cpu * lbc + p.w_mem * lbm)
        + migration_weight(p) * shed_bytes_lower_bound(p)
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


# --- solve, stage by stage ---------------------------------------------------------------


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
    effort = best_effort(snapshot, policy, p)
    notes = list(p.notes) + effort.notes
    if effort.reasons:
        return _refused(p, current, effort, notes, t0)
    units, unit_of = build_units(p)
    stages: list[str] = []
    lb = balanced_level(p)
    ranked = _greedy_stage(p, units, unit_of, effort, stages, t0, lb)
    checked: dict[str, list[Violation] | None] = {}  # verify's answer per candidate
    kept, held = _worth_their_moves(p, _prefer_fewer_moves(p, ranked))
    incumbent, carried = _first_verified(
        snapshot, policy, capacity, p, current, kept, notes, checked
    )
    bound: float | None = _objective_bound(p)
    ilp, full = _ilp_stage(p, units, incumbent, bound, use_ilp, stages)
    if ilp is not None and ilp.host_of is not None:
        ranked.append((measure(p, ilp.host_of, lb), "ilp", ilp.host_of))
        ranked.sort(key=lambda t: (t[0].objective, t[1] != "ilp"))
        kept, held = _worth_their_moves(p, _prefer_fewer_moves(p, ranked))
        incumbent, carried = _first_verified(
            snapshot, policy, capacity, p, current, kept, notes, checked
        )
    m, label, host_of = incumbent
    m0 = measure(p, p.cur, lb)
    if ilp is not None and full and ilp.bound is not None:
        bound = max(bound, ilp.bound) if bound is not None else ilp.bound
    report = _report(p, m.objective, label, ilp, full, bound, t0)
    if ilp is not None and label != "ilp":
        notes.append(f"ilp ({ilp.backend}) {ilp.status}: kept the {label} placement")
    unfixed = _unfixed(p, host_of)
    util_bound: float | None = None
    move_bound: int | None = None
    if p.objective == "balance":
        util_bound = balance_lower_bound(p)
        move_bound = move_lower_bound(p, *max_utils(p, host_of))
    return SolveResult(
        target=Placement({p.guests[g]: p.hosts[host_of[g]] for g in range(p.n_guests)}),
        report=report,
        score_before=m0.score,
        score_after=m.score,
        forced=m.violation < m0.violation - 1e-9,
        violations=tuple(carried),
        notes=tuple(notes + unfixed),
        util_bound=util_bound,
        move_bound=move_bound,
        stages=tuple(stages),
        problem=p,
        improvement=_gain(p, m0, m),
        unfixed=tuple(unfixed),
        held=held if label == "current" else "",
    )


def _refused(
    p: Problem, current: Placement, effort: Effort, notes: list[str], t0: float
) -> SolveResult:
    before = score(p, p.cur)
    return SolveResult(
        target=current,
        report=SolverReport("none", "infeasible", time.perf_counter() - t0, None, None, None),
        score_before=before,
        score_after=before,
        forced=False,
        reasons=tuple(effort.reasons),
        notes=tuple(notes),
        problem=p,
    )


def _greedy_stage(
    p: Problem,
    units: list[Unit],
    unit_of: list[int],
    effort: Effort,
    stages: list[str],
    t0: float,
    lb: tuple[float, float],
) -> Ranked:
    """Today's placement (zero moves) and the greedy candidates, best first."""
    bud = p.policy.budget
    cands: list[Candidate] = []
    if p.objective == "balance":
        # when one more move of the smallest guest costs more than the whole gap between
        # today and the bound, no balancing target can pay for itself: shed only
        movable_mem = [p.mem[g] for g in range(p.n_guests) if p.movable[g]]
        cheapest = migration_weight(p) * min(movable_mem, default=0.0)
        cands = balance_search(
            p,
            units,
            unit_of,
            max_moves=bud.max_moves,
            max_bytes=float(bud.max_bytes),
            search=cheapest < max(balance_score(p, p.cur) - balance_lower_bound(p), 0.0),
        )
    else:
        cands = _power_candidates(p, units, unit_of, effort)
    stages.append(f"greedy:{len(cands)} candidates {time.perf_counter() - t0:.2f}s")
    ranked: Ranked = [(measure(p, p.cur, lb), "current", p.cur)]
    for c in cands:
        ranked.append((measure(p, c.host_of, lb), c.label, c.host_of))
    ranked.sort(key=lambda t: t[0].objective)
    if p.objective == "balance":
        # the best, with guests that dirty memory swapped for equally good quiet ones
        quiet = quieter(p, units, ranked[0][2], lb)
        if quiet is not None:
            ranked.append((measure(p, quiet, lb), ranked[0][1] + "+quieter", quiet))
            ranked.sort(key=lambda t: t[0].objective)
    return _prefer_fewer_moves(p, ranked)


def _power_candidates(
    p: Problem, units: list[Unit], unit_of: list[int], effort: Effort
) -> list[Candidate]:
    """Shed what breaks a limit (as far as room and budget allow), then empty hosts."""
    bud = p.policy.budget
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
        settle=True,
    )
    if base is None:
        raise RuntimeError("internal error: base is None")
    out = [
        Candidate(
            base.host_of,
            power_on(p, base.host_of),
            base.moves,
            base.moved_bytes,
            base.complete,
            "repair",
        )
    ]
    if effort.cpu_level is None:  # over-subscribed CPU: every host is needed
        out.append(
            consolidate(
                p, units, base.host_of, max_moves=bud.max_moves, max_bytes=float(bud.max_bytes)
            )
        )
    return out


def _ilp_stage(
    p: Problem,
    units: list[Unit],
    best: tuple[Measure, str, list[int]],
    bound: float | None,
    use_ilp: bool,
    stages: list[str],
) -> tuple[IlpResult | None, bool]:
    """The ILP from the best verified placement, unless that is already within the gap of
    the bound. Returns its result and whether it covered the whole problem."""
    pol = p.policy
    inc_m, _, incumbent = best
    inc_obj = inc_m.objective
    if bound is not None and inc_obj - bound <= pol.solver.gap * max(abs(inc_obj), 1e-9):
        stages.append("ilp: skipped, the greedy placement is within the gap of the bound")
        return None, False
    if not use_ilp or pol.solver.backend not in ("cbc", "highs"):
        return None, False
    free, cand_hosts, full = _ilp_scope(p, units, incumbent)
    if not free:
        return None, False
    polish = not full and p.objective == "balance"
    ilp = solve_ilp(
        p,
        units,
        free,
        cand_hosts,
        incumbent,
        backend=pol.solver.backend,
        time_limit_s=pol.solver.time_limit_s,
        gap=pol.solver.gap,
        max_moves=pol.budget.max_moves,
        max_bytes=float(pol.budget.max_bytes),
        # too big for the whole problem: keep the incumbent's balance, fewer moves
        z_cap=balance_score(p, incumbent) if polish else None,
    )
    stages.append(
        f"ilp:{ilp.backend} {ilp.status} vars={ilp.n_vars} "
        f"{'full' if full else 'reduced'} {ilp.seconds:.2f}s"
    )
    return ilp, full


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
        for keep in (u.cur, inc[u.members[0]]):
            # staying put is always an option (at a penalty if forced), and so is the
            # incumbent's choice: the warm start is feasible
            if keep >= 0 and keep not in hs:
                hs.append(keep)
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


def _prefer_fewer_moves(p: Problem, ranked: Ranked) -> Ranked:
    """Placements within the policy's relative gap (solver.gap, on the score) of the best
    one, and (balance) with no more load above the balanced level than the gap allows,
    are equally good: among them the fewest moves go first."""
    if not ranked:
        return ranked
    gap = p.policy.solver.gap
    best = ranked[0][0]
    tol = gap * max(best.score, 1e-9)
    near: Ranked = []
    rest: Ranked = []
    for t in ranked:
        ok = t[0].objective <= best.objective + tol
        if p.objective != "power-save":
            ok = ok and t[0].excess <= best.excess * (1 + gap) + tol
        (near if ok else rest).append(t)
    near.sort(key=lambda t: (t[0].moves, t[0].objective))
    return near + rest


def _gain(p: Problem, before: Measure, after: Measure) -> float:
    """``improvement`` from two measures."""
    if p.objective == "power-save":
        return before.score - after.score
    return max(before.score - after.score, before.hot - after.hot)


def _worth_their_moves(p: Problem, ranked: Ranked) -> tuple[Ranked, str]:
    """Hysteresis against the two reference placements, today's and the plain repair of
    what is broken (shed: forced moves and limits only): a candidate that moves more
    guests than one of them, without lowering the violation further, must improve on it
    by ``min_improvement`` (see ``improvement``); else it is dropped. So a forced drain
    does not drag a rebalancing of the whole cluster along unless that rebalancing is
    worth it on its own. Among the candidates worth it, the objective decides."""
    need = p.policy.hysteresis.min_improvement
    unit = "host-equivalents" if p.objective == "power-save" else "utilization"
    refs = [(m, label) for m, label, _ in ranked if label in REFERENCES]
    keep: Ranked = []
    held = ""
    for entry in ranked:
        m = entry[0]
        short = [
            (r, label)
            for r, label in refs
            if r.moves < m.moves and r.violation <= m.violation + 1e-9 and _gain(p, r, m) < need
        ]
        if not short:
            keep.append(entry)
        elif not held and short[0][1] == "current":
            held = (
                f"improvement {_gain(p, short[0][0], m):.3f} is below min_improvement "
                f"{need:.3f} ({unit})"
            )
    return keep, held


def _first_verified(
    snapshot: Snapshot,
    policy: Policy,
    capacity: Mapping[str, HostCapacity] | None,
    p: Problem,
    current: Placement,
    ranked: Ranked,
    notes: list[str],
    checked: dict[str, list[Violation] | None],
) -> tuple[tuple[Measure, str, list[int]], list[Violation]]:
    """The best candidate within the budget that the verifier does not block, with the
    violations it carries. Today's placement always qualifies. ``checked`` remembers
    verify's answer per candidate (None: blocked) across calls."""
    bud = policy.budget
    for m, label, host_of in ranked:
        if m.moves > bud.max_moves or m.moved_bytes > bud.max_bytes:
            if label not in checked:
                notes.append(f"{label}: over the migration budget; dropped")
                checked[label] = None
            continue
        if label not in checked:
            target = Placement({p.guests[g]: p.hosts[host_of[g]] for g in range(p.n_guests)})
            viol = verify(snapshot, policy, target, capacity=capacity, current=current)
            bad = blocking(viol)
            if bad:
                notes.append(f"{label}: rejected by verify: {bad[0]}")
            checked[label] = None if bad else viol
        viol_ok = checked[label]
        if viol_ok is None:
            continue
        return (m, label, host_of), viol_ok
    raise AssertionError("today's placement always verifies: it carries what it has")


def _report(
    p: Problem,
    obj: float,
    label: str,
    ilp: IlpResult | None,
    full: bool,
    bound: float | None,
    t0: float,
) -> SolverReport:
    """Backend and status as the solver really ended, the bound and the gap."""
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
    return SolverReport(
        backend=backend,
        status=status,
        seconds=time.perf_counter() - t0,
        objective=obj,
        bound=bound,
        gap=gap,
    )


def _unfixed(p: Problem, host_of: list[int]) -> list[str]:
    """Forced moves the target leaves undone and hosts it leaves over a cap, named."""
    out: list[str] = []
    n, b = moves_and_bytes(p, host_of)
    bud = p.policy.budget
    why = (
        "the migration budget is spent"
        if n >= bud.max_moves or b >= bud.max_bytes
        else "no host has room for it under the limits"
    )
    left: dict[int, list[str]] = {}
    for g in range(p.n_guests):
        if p.must_move[g] and p.movable[g] and host_of[g] == p.cur[g]:
            left.setdefault(p.cur[g], []).append(p.guests[g])
    for h, names in left.items():
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        out.append(
            f"host {p.hosts[h]}: {len(names)} guest(s) must leave it but stay this cycle, "
            f"{why}: {shown}"
        )
    cpu, mem, _ = p.loads(host_of)
    for h in range(p.n_hosts):
        for what, load, cap, total, unit, scale in (
            ("CPU", cpu[h], p.cpu_cap[h], p.cpu_total[h], "cores", 1.0),
            ("memory", mem[h], p.mem_cap[h], p.mem_total[h], "GiB", float(GIB)),
        ):
            if load > cap * (1 + 1e-9) + (0.5 if unit == "GiB" else 1e-9) and total > 0:
                out.append(
                    f"host {p.hosts[h]} stays over its {what} limit: "
                    f"{load / scale:.1f} > {cap / scale:.1f} {unit} "
                    f"({100 * load / total:.0f} % of its capacity)"
                )
    return out
