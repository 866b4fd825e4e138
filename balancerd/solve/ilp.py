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
from dataclasses import dataclass, field

import pulp

from balancerd.solve.heuristic import Unit, balanced_level
from balancerd.solve.problem import GIB, Problem, power_weight

PENALTY = 1000.0  # objective units per forced move left undone / per host-capacity of overflow
SPREAD = 0.05  # balance: weight of each resource's own highest utilization (spread term)
POWER_ON_COST = 0.5  # extra host-equivalents for switching a powered-off host on
HOST_POINTS = 100.0  # migration_cost is charged in points: 1/100 of one host's capacity


def n_balanced(p: Problem) -> int:
    return max(1, sum(p.balanced))


def migration_weight(p: Problem) -> float:
    """Objective units per byte moved: ``migration_cost`` per GiB, in host-points. Balance
    counts ``z`` once for the whole cluster, so there a point is 1/100 of the cluster's
    hosts' worth; power-save counts each host on, so there it is 1/100 of a host."""
    scale = HOST_POINTS * (n_balanced(p) if p.objective != "power-save" else 1)
    return p.policy.solver.migration_cost / GIB / scale


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


Terms = list[tuple[pulp.LpVariable, float]]


@dataclass
class _Model:
    """The ILP under construction: the problem, its variables and objective terms."""

    p: Problem
    units: list[Unit]
    free: list[int]
    cands: dict[int, list[int]]
    start: list[int]
    z_cap: float | None
    prob: pulp.LpProblem
    fc: list[float] = field(default_factory=list)  # load of the units not free, per host
    fm: list[float] = field(default_factory=list)
    fv: list[float] = field(default_factory=list)
    x: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)
    on_host: dict[int, list[tuple[pulp.LpVariable, int]]] = field(default_factory=dict)
    active: dict[int, pulp.LpVariable] = field(default_factory=dict)
    objective: Terms = field(default_factory=list)
    const: float = 0.0

    @property
    def power(self) -> bool:
        return self.p.objective == "power-save"


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
    m = _Model(p, units, free, cands, start, z_cap, pulp.LpProblem("placement", pulp.LpMinimize))
    _fixed_loads(m)
    _assignment(m, max_moves, max_bytes)
    if m.power:
        _power_terms(m)
    else:
        _balance_terms(m)
    _capacity(m)
    _anti_affinity(m)
    m.prob += pulp.LpAffineExpression(m.objective) + m.const, "objective"
    for (i, h), v in m.x.items():  # warm start from the incumbent
        v.setInitialValue(1 if start[units[i].members[0]] == h else 0)
    res = _run(m.prob, backend, time_limit_s, gap)
    return IlpResult(
        host_of=_read(m, res),
        backend=backend,
        status=res.status,
        seconds=time.perf_counter() - t0,
        objective=res.objective,
        bound=res.bound,
        gap=res.gap,
        n_vars=len(m.x),
        detail=res.detail,
    )


def _fixed_loads(m: _Model) -> None:
    """Constants: the load of every unit that is not free, on its incumbent host."""
    p = m.p
    m.fc, m.fm, m.fv = [0.0] * p.n_hosts, [0.0] * p.n_hosts, [0.0] * p.n_hosts
    free = set(m.free)
    for i, u in enumerate(m.units):
        if i in free:
            continue
        for g in u.members:
            h = m.start[g]
            m.fc[h] += p.cpu[g]
            m.fm[h] += p.mem[g]
            m.fv[h] += p.vcpus[g]


def _assignment(m: _Model, max_moves: int, max_bytes: float) -> None:
    """x[u, h]: each free unit on exactly one candidate host; what moving costs (bytes,
    and in a polish one unit per guest moved), forced moves left undone, soft rules; the
    migration budget."""
    p = m.p
    mw = migration_weight(p)
    polish = m.z_cap is not None
    moves: Terms = []
    moved_bytes: Terms = []
    for i in m.free:
        u = m.units[i]
        row = []
        for h in m.cands[i]:
            v = _var(m.prob, f"x_{i}_{h}", cat="Binary")
            m.x[i, h] = v
            row.append(v)
            m.on_host.setdefault(h, []).append((v, i))
            moved = [g for g in u.members if p.cur[g] != h]
            if moved:
                b = sum(p.mem[g] for g in moved)
                cost = sum(p.move_cost[g] for g in moved)  # predicted time, in bytes
                m.objective.append((v, mw * cost + (len(moved) if polish else 0.0)))
                moves.append((v, float(len(moved))))
                moved_bytes.append((v, b))
            bad = sum(1 for g in u.members if p.must_move[g] and p.cur[g] == h)
            soft = sum(p.soft[g][1] for g in u.members if h in p.soft[g][0])
            if bad or soft:
                m.objective.append((v, PENALTY * bad + soft))
        m.prob += pulp.lpSum(row) == 1, f"one_{i}"
    if moves:
        m.prob += pulp.LpAffineExpression(moves) <= max_moves, "budget_moves"
        m.prob += pulp.LpAffineExpression(moved_bytes) <= max_bytes, "budget_bytes"


def _power_terms(m: _Model) -> None:
    """Power-save: a[h] = host h on (for hosts empty apart from free units), weighted by
    its idle power; at least min_active_hosts on."""
    p = m.p
    on = [h for h in range(p.n_hosts) if m.fc[h] > 0 or m.fm[h] > 0 or m.fv[h] > 0]
    for h in sorted(m.on_host):
        if m.fc[h] > 0 or m.fm[h] > 0 or m.fv[h] > 0:
            continue  # already on: constant
        a = _var(m.prob, f"a_{h}", cat="Binary")
        m.active[h] = a
        m.objective.append((a, power_weight(p, h) + (POWER_ON_COST if p.powered_off[h] else 0.0)))
    m.const += sum(power_weight(p, h) for h in on)
    m.prob += (
        pulp.lpSum(m.active.values())
        >= min(p.policy.power.min_active_hosts, len(on) + len(m.active)) - len(on),
        "min_active",
    )


def _balance_terms(m: _Model) -> None:
    """Balance: z = highest weighted utilization (or at most z_cap in a polish); zc / zm
    each resource's own highest (the spread term); e[h, r] the weighted utilization above
    the bound, summed over hosts and divided by their number (many equal maxima lowered
    is progress)."""
    p = m.p
    z = _var(m.prob, "z", low=0.0)
    zc = _var(m.prob, "zc", low=0.0)
    zm = _var(m.prob, "zm", low=0.0)
    if m.z_cap is None:
        m.objective.append((z, 1.0))
    else:
        m.prob += z <= m.z_cap, "z_cap"
    m.objective += [(zc, SPREAD), (zm, SPREAD)]
    m.prob += z >= zc, "z_c"
    m.prob += z >= zm, "z_m"
    zc_const = zm_const = 0.0
    for h in range(p.n_hosts):
        if p.balanced[h] and h not in m.on_host:
            zc_const = max(zc_const, p.w_cpu * m.fc[h] / p.cpu_total[h])
            zm_const = max(zm_const, p.w_mem * m.fm[h] / p.mem_total[h])
    m.prob += zc >= zc_const, "zc_rest"
    m.prob += zm >= zm_const, "zm_rest"
    lbc, lbm = balanced_level(p)
    per_host = 1.0 / n_balanced(p)
    for h in sorted(m.on_host):
        if not p.balanced[h]:
            continue
        terms = m.on_host[h]
        for name, w, zr, total, fixed, lb, size in (
            ("c", p.w_cpu, zc, p.cpu_total[h], m.fc[h], lbc, _cpu),
            ("m", p.w_mem, zm, p.mem_total[h], m.fm[h], lbm, _mem),
        ):
            if w <= 0:
                continue
            load = pulp.LpAffineExpression([(v, size(m.units[i])) for v, i in terms])
            m.prob += zr >= (w / total) * (load + fixed), f"z{name}_{h}"
            e = _var(m.prob, f"e{name}_{h}", low=0.0)
            m.prob += e >= (w / total) * (load + fixed) - w * lb, f"e{name}_{h}"
            m.objective.append((e, per_host))


def _cpu(u: Unit) -> float:
    return u.cpu


def _mem(u: Unit) -> float:
    return u.mem


def _capacity(m: _Model) -> None:
    """Hard caps per host. A host over a cap today may shed, may not grow; what it keeps
    above the cap is penalized. Power-save: a host that is off holds nothing."""
    p = m.p
    cur_c, cur_m, _ = p.loads(p.cur)
    for h in sorted(m.on_host):
        terms = m.on_host[h]
        lc = pulp.LpAffineExpression([(v, m.units[i].cpu) for v, i in terms])
        lm = pulp.LpAffineExpression([(v, m.units[i].mem) for v, i in terms])
        lv = pulp.LpAffineExpression([(v, m.units[i].vcpus) for v, i in terms])
        scale = m.active.get(h)
        for name, load, fixed, cap, total, cur in (
            ("c", lc, m.fc[h], p.cpu_cap[h], p.cpu_total[h], cur_c[h]),
            ("m", lm, m.fm[h], p.mem_cap[h], p.mem_total[h], cur_m[h]),
        ):
            if cur > cap + 1e-9:
                o = _var(m.prob, f"o{name}_{h}", low=0.0, up=cur - cap)
                m.objective.append((o, PENALTY / (total or 1.0)))
                m.prob += load + fixed <= cap + o, f"cap{name}_{h}"
            elif scale is not None:
                m.prob += load + fixed <= cap * scale, f"cap{name}_{h}"
            else:
                m.prob += load + fixed <= cap, f"cap{name}_{h}"
        m.prob += lv + m.fv[h] <= max(p.vcpu_cap[h], m.fv[h]), f"capv_{h}"


def _anti_affinity(m: _Model) -> None:
    """At most one member of a group per host (or today's count where already broken)."""
    p = m.p
    if not p.anti:
        return
    free = set(m.free)
    unit_index = {g: i for i, u in enumerate(m.units) for g in u.members}
    for gid, grp in enumerate(p.anti):
        fixed_cnt: dict[int, int] = {}
        cur_cnt: dict[int, int] = {}
        for g in grp:
            cur_cnt[p.cur[g]] = cur_cnt.get(p.cur[g], 0) + 1
        unit_k: dict[int, int] = {}
        for g in grp:
            i = unit_index[g]
            if i in free:
                unit_k[i] = unit_k.get(i, 0) + 1
            else:
                fixed_cnt[m.start[g]] = fixed_cnt.get(m.start[g], 0) + 1
        if not unit_k:
            continue
        hosts = {h for i in unit_k for h in m.cands[i]}
        for h in hosts:
            terms = [(m.x[i, h], float(k)) for i, k in unit_k.items() if (i, h) in m.x]
            if len(terms) + fixed_cnt.get(h, 0) <= 1 and all(k <= 1 for _, k in terms):
                continue
            limit = max(1, cur_cnt.get(h, 0)) - fixed_cnt.get(h, 0)
            m.prob += pulp.LpAffineExpression(terms) <= limit, f"anti_{gid}_{h}"


def _read(m: _Model, res: _Run) -> list[int] | None:
    if res.status not in ("optimal", "feasible", "time-limit") or not res.has_solution:
        return None
    host_of = list(m.start)
    for (i, h), v in m.x.items():
        val = v.value()
        if val is not None and val > 0.5:
            for g in m.units[i].members:
                host_of[g] = h
    return host_of


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
        t0 = time.perf_counter()
        try:
            prob.solve(solver)
        except pulp.PulpSolverError as e:
            return _Run("error", False, None, None, None, str(e))
        ran_out = time.perf_counter() - t0 >= time_limit_s
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
    elif ran_out:
        status = "time-limit"  # stopped (on a busy machine, still in its first LP) on time
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
