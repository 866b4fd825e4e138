"""The placement ILP (PuLP; CBC or HiGHS). The only module that imports pulp.

Binaries x[u, h] exist only for *free* units (affinity groups move as one) and their
candidate hosts; every other guest is a constant on its incumbent host. Small clusters
make every unit free (the exact problem); large ones free the units around the hot spots.

Hosts already above a hard limit get an overflow variable (penalized, and never above
today's load): the solver may shed load there but never add to it. A guest on a host it
must leave may stay only at a penalty, so a drain bigger than the budget still progresses.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pulp

from balancerd.solve.heuristic import Unit
from balancerd.solve.problem import GIB, Problem, power_weight

PENALTY = 1000.0  # objective units per forced move left undone / per unit of overflow
SPREAD = 0.05  # balance: weight of each resource's own highest utilization (spread term)
POWER_ON_COST = 0.5  # extra host-equivalents for switching a powered-off host on


@dataclass
class IlpResult:
    host_of: list[int] | None  # None: no integer solution
    backend: str
    status: str  # optimal | feasible | time-limit | infeasible | error
    seconds: float
    objective: float | None
    bound: float | None
    gap: float | None
    n_vars: int
    detail: str = ""


def solve_ilp(
    p: Problem,
    units: list[Unit],
    free: list[int],
    cands: dict[int, list[int]],
    start: list[int],
    *,
    backend: str,
    time_limit_s: float,
    gap: float,
    max_moves: int,
    max_bytes: float,
    z_cap: float | None = None,
) -> IlpResult:
    """``z_cap`` (balance): keep the highest weighted utilization at or below it and
    minimize the number of moves instead (then migration cost) - the polish of an
    incumbent on a cluster too big for the whole problem."""
    t0 = time.perf_counter()
    pol = p.policy
    mc = pol.solver.migration_cost
    power = p.objective == "power-save"
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    free_set = set(free)

    # constants: load of every non-free unit on its incumbent host
    fc = [0.0] * p.n_hosts
    fm = [0.0] * p.n_hosts
    fv = [0.0] * p.n_hosts
    for i, u in enumerate(units):
        if i in free_set:
            continue
        for g in u.members:
            h = start[g]
            fc[h] += p.cpu[g]
            fm[h] += p.mem[g]
            fv[h] += p.vcpus[g]
    cur_c, cur_m, _ = p.loads(p.cur)

    x: dict[tuple[int, int], pulp.LpVariable] = {}
    cost_terms: list[tuple[pulp.LpVariable, float]] = []
    move_terms: list[tuple[pulp.LpVariable, float]] = []
    byte_terms: list[tuple[pulp.LpVariable, float]] = []
    on_host: dict[int, list[tuple[int, pulp.LpVariable]]] = {}
    for i in free:
        u = units[i]
        row = []
        for h in cands[i]:
            v = _var(prob, f"x_{i}_{h}", cat="Binary")
            x[i, h] = v
            row.append(v)
            on_host.setdefault(h, []).append((i, v))
            moved = [g for g in u.members if p.cur[g] != h]
            if moved:
                gib = sum(p.mem[g] for g in moved) / GIB
                cost_terms.append((v, mc * gib + (len(moved) if z_cap is not None else 0.0)))
                move_terms.append((v, float(len(moved))))
                byte_terms.append((v, sum(p.mem[g] for g in moved)))
            bad = sum(1 for g in u.members if p.must_move[g] and p.cur[g] == h)
            soft = sum(p.soft[g][1] for g in u.members if h in p.soft[g][0])
            if bad or soft:
                cost_terms.append((v, PENALTY * bad + soft))
        prob += pulp.lpSum(row) == 1, f"one_{i}"
    if move_terms:
        prob += pulp.LpAffineExpression(move_terms) <= max_moves, "budget_moves"
        prob += pulp.LpAffineExpression(byte_terms) <= max_bytes, "budget_bytes"

    penalty_terms: list[tuple[pulp.LpVariable, float]] = []
    objective_terms: list[tuple[pulp.LpVariable, float]] = []
    const = 0.0
    involved = sorted(on_host)
    active: dict[int, pulp.LpVariable] = {}
    if power:
        for h in involved:
            if fc[h] > 0 or fm[h] > 0 or fv[h] > 0:
                continue  # already on: constant
            a = _var(prob, f"a_{h}", cat="Binary")
            active[h] = a
            w = power_weight(p, h) + (POWER_ON_COST if p.powered_off[h] else 0.0)
            objective_terms.append((a, w))
        const_on = [h for h in range(p.n_hosts) if (fc[h] > 0 or fm[h] > 0 or fv[h] > 0)]
        const += sum(power_weight(p, h) for h in const_on)
        prob += (
            pulp.lpSum(active.values())
            >= min(p.policy.power.min_active_hosts, len(const_on) + len(active)) - len(const_on),
            "min_active",
        )
    # balance: z = highest weighted utilization; zc / zm = per resource (the spread term)
    z = _var(prob, "z", low=0.0)
    zc = _var(prob, "zc", low=0.0)
    zm = _var(prob, "zm", low=0.0)
    if not power:
        if z_cap is None:
            objective_terms.append((z, 1.0))
        else:
            prob += z <= z_cap, "z_cap"
        objective_terms += [(zc, SPREAD), (zm, SPREAD)]
        prob += z >= zc, "z_c"
        prob += z >= zm, "z_m"
        zc_const = zm_const = 0.0
        for h in range(p.n_hosts):
            if p.balanced[h] and h not in on_host:
                zc_const = max(zc_const, p.w_cpu * fc[h] / p.cpu_total[h])
                zm_const = max(zm_const, p.w_mem * fm[h] / p.mem_total[h])
        prob += zc >= zc_const, "zc_rest"
        prob += zm >= zm_const, "zm_rest"

    for h in involved:
        terms = on_host[h]
        lc = pulp.LpAffineExpression([(v, units[i].cpu) for i, v in terms])
        lm = pulp.LpAffineExpression([(v, units[i].mem) for i, v in terms])
        lv = pulp.LpAffineExpression([(v, units[i].vcpus) for i, v in terms])
        scale_c = 1.0 if active.get(h) is None else active[h]
        cap_c = p.cpu_cap[h]
        cap_m = p.mem_cap[h]
        # hosts over a limit today: may shed, may not grow, overflow is penalized
        for name, load, fixed, cap, total, cur in (
            ("c", lc, fc[h], cap_c, p.cpu_total[h], cur_c[h]),
            ("m", lm, fm[h], cap_m, p.mem_total[h], cur_m[h]),
        ):
            if cur > cap + 1e-9:
                o = _var(prob, f"o{name}_{h}", low=0.0, up=cur - cap)
                penalty_terms.append((o, PENALTY / (total or 1.0)))
                prob += load + fixed <= cap + o, f"cap{name}_{h}"
            elif isinstance(scale_c, pulp.LpVariable):
                prob += load + fixed <= cap * scale_c, f"cap{name}_{h}"
            else:
                prob += load + fixed <= cap, f"cap{name}_{h}"
        prob += lv + fv[h] <= max(p.vcpu_cap[h], fv[h]), f"capv_{h}"
        if not power and p.balanced[h]:
            if p.w_cpu > 0:
                prob += zc >= (p.w_cpu / p.cpu_total[h]) * (lc + fc[h]), f"zc_{h}"
            if p.w_mem > 0:
                prob += zm >= (p.w_mem / p.mem_total[h]) * (lm + fm[h]), f"zm_{h}"

    # anti-affinity: at most one per host (or today's count where already broken)
    unit_index = {g: i for i, u in enumerate(units) for g in u.members} if p.anti else {}
    for gid, grp in enumerate(p.anti):
        fixed_cnt: dict[int, int] = {}
        cur_cnt: dict[int, int] = {}
        for g in grp:
            cur_cnt[p.cur[g]] = cur_cnt.get(p.cur[g], 0) + 1
        unit_k: dict[int, int] = {}
        for g in grp:
            i = unit_index[g]
            if i in free_set:
                unit_k[i] = unit_k.get(i, 0) + 1
            else:
                fixed_cnt[start[g]] = fixed_cnt.get(start[g], 0) + 1
        if not unit_k:
            continue
        hosts = {h for i in unit_k for h in cands[i]}
        for h in hosts:
            terms2 = [(x[i, h], float(k)) for i, k in unit_k.items() if (i, h) in x]
            if len(terms2) + fixed_cnt.get(h, 0) <= 1 and all(k <= 1 for _, k in terms2):
                continue
            limit = max(1, cur_cnt.get(h, 0)) - fixed_cnt.get(h, 0)
            prob += pulp.LpAffineExpression(terms2) <= limit, f"anti_{gid}_{h}"

    prob += (
        pulp.LpAffineExpression(objective_terms + cost_terms + penalty_terms) + const,
        "objective",
    )

    # warm start from the incumbent
    for (i, h), v in x.items():
        v.setInitialValue(1 if start[units[i].members[0]] == h else 0)

    res = _run(prob, backend, time_limit_s, gap)
    host_of: list[int] | None = None
    if res.status in ("optimal", "feasible", "time-limit") and res.has_solution:
        host_of = list(start)
        for (i, h), v in x.items():
            val = v.value()
            if val is not None and val > 0.5:
                for g in units[i].members:
                    host_of[g] = h
    return IlpResult(
        host_of=host_of,
        backend=backend,
        status=res.status,
        seconds=time.perf_counter() - t0,
        objective=res.objective,
        bound=res.bound,
        gap=res.gap,
        n_vars=len(x),
        detail=res.detail,
    )


def _var(
    prob: pulp.LpProblem,
    name: str,
    *,
    low: float | None = None,
    up: float | None = None,
    cat: str = "Continuous",
) -> pulp.LpVariable:
    add = getattr(prob, "add_variable", None)  # PuLP >= 3.3; LpVariable() before
    if add is not None:
        return add(name, low, up, cat)
    return pulp.LpVariable(name, low, up, cat)


@dataclass
class _Run:
    status: str
    has_solution: bool
    objective: float | None
    bound: float | None
    gap: float | None
    detail: str


def _finite(v: object) -> float | None:
    if isinstance(v, int | float) and math.isfinite(v) and abs(v) < 1e29:
        return float(v)
    return None


def _gap(obj: float | None, bound: float | None) -> float | None:
    if obj is None or bound is None:
        return None
    return max(0.0, (obj - bound) / max(abs(obj), 1e-9))


def _run(prob: pulp.LpProblem, backend: str, time_limit_s: float, gap: float) -> _Run:
    if backend == "highs":
        return _run_highs(prob, time_limit_s, gap)
    return _run_cbc(prob, time_limit_s, gap)


def _run_cbc(prob: pulp.LpProblem, time_limit_s: float, gap: float) -> _Run:
    """CBC's status word is not trusted: the log says whether it stopped on time."""
    fd, log_path = tempfile.mkstemp(prefix="balancerd-cbc-", suffix=".log")
    os.close(fd)
    try:
        # Debian's cbc when present (PuLP 4 drops its bundled one), else PuLP's
        cmd = pulp.COIN_CMD if pulp.COIN_CMD().available() else pulp.PULP_CBC_CMD
        solver = cmd(
            msg=False,
            timeLimit=max(1, math.ceil(time_limit_s)),
            gapRel=gap,
            warmStart=True,
            logPath=log_path,
            threads=1,
        )
        try:
            prob.solve(solver)
        except pulp.PulpSolverError as e:
            return _Run("error", False, None, None, None, str(e))
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()
    finally:
        os.unlink(log_path)
    result = re.search(r"^Result - (.*)$", log, re.M)
    result_text = result.group(1).strip() if result else ""
    obj_m = re.search(r"^Objective value:\s*(\S+)", log, re.M)
    bound_m = re.search(r"^Lower bound:\s*(\S+)", log, re.M)
    objective = _finite(float(obj_m.group(1))) if obj_m else None
    bound = _finite(float(bound_m.group(1))) if bound_m else None
    sol = prob.sol_status  # pulp: 1 optimal, 2 integer feasible, 0 none, -1 infeasible
    has_solution = sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    low = result_text.lower()
    if "infeasible" in low:
        status = "infeasible"
    elif "time" in low or "stopped" in low:
        status = "time-limit"
    elif "optimal" in low:
        # CBC stops at gapRel with "Optimal solution found"; the gap says how close
        status = "optimal"
    elif has_solution:
        status = "feasible"
    else:
        status = "error"
    if objective is None and has_solution:
        objective = _finite(pulp.value(prob.objective))
    if status == "optimal" and bound is None:
        bound = objective
    if bound is not None and objective is not None and bound > objective:
        # CBC prints the bound rounded ("Lower bound: 0.165" for 0.164625); a lower bound
        # never exceeds a found solution's objective.
        bound = objective
    return _Run(status, has_solution, objective, bound, _gap(objective, bound), result_text)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _run_highs(prob: pulp.LpProblem, time_limit_s: float, gap: float) -> _Run:
    solver = pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap, threads=1)
    try:
        with _quiet_stdout():  # HiGHS prints a banner before output_flag takes effect
            prob.solve(solver)
    except pulp.PulpSolverError as e:
        return _Run("error", False, None, None, None, str(e))
    h = prob.solverModel
    info = h.getInfo()
    model_status = h.modelStatusToString(h.getModelStatus())
    objective = _finite(info.objective_function_value)
    bound = _finite(info.mip_dual_bound)
    has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    low = model_status.lower()
    if "infeasible" in low:
        status = "infeasible"
        has_solution = False
    elif "time" in low:
        status = "time-limit"
    elif "optimal" in low:
        status = "optimal"
    elif has_solution:
        status = "feasible"
    else:
        status = "error"
    if not has_solution:
        objective = None
    return _Run(status, has_solution, objective, bound, _gap(objective, bound), model_status)
