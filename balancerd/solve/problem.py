"""Snapshot + policy -> an indexed placement problem (plain lists, built once per cycle).

Every solver stage (greedy repair, ILP, power-save consolidation) works on ``Problem``;
``verify`` deliberately does NOT: it re-derives everything from the snapshot and policy.

Utilization of a host for resource r (cpu, mem) is load_r / raw capacity_r; the balance
objective is ``max over hosts and resources of weight_r * util_r``. Limits
(max_cpu_util, max_mem_util, mem_headroom_bytes, cpu_overcommit) are hard caps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from balancerd.model import Capacity, Snapshot
from balancerd.policy.model import Policy
from balancerd.units import GIB as GIB  # re-exported: ilp.py, explain.py import it here

EPS = 1e-9

HostCapacity = Capacity  # the one capacity type (balancerd.model); the old name still works


@dataclass
class Problem:
    hosts: list[str]
    cpu_total: list[float]  # raw cores (utilization denominator)
    mem_total: list[float]  # raw bytes
    cpu_cap: list[float]  # hard limit on guest CPU demand (cores)
    mem_cap: list[float]  # hard limit on guest memory (bytes)
    vcpu_cap: list[float]  # hard limit on guest vCPUs
    usable: list[bool]  # may receive guests (up, not excluded, not in maintenance)
    powered_off: list[bool]
    balanced: list[bool]  # counted in the objective (up and not excluded)
    guests: list[str]
    cpu: list[float]  # demand, cores
    mem: list[float]  # demand, bytes
    vcpus: list[int]
    cur: list[int]  # current host index
    movable: list[bool]
    must_move: list[bool]  # current host breaks a hard placement rule
    allowed: list[frozenset[int] | None]  # None = every usable host
    anti: list[list[int]]  # anti-affinity groups (guest indices)
    affinity: list[list[int]]
    soft: list[tuple[frozenset[int], float]]  # per guest: (hosts that cost, cost)
    w_cpu: float
    w_mem: float
    objective: str
    policy: Policy
    host_index: dict[str, int] = field(default_factory=dict)
    guest_index: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _cur_loads: tuple[list[float], list[float], list[float]] | None = None

    @property
    def n_hosts(self) -> int:
        return len(self.hosts)

    @property
    def n_guests(self) -> int:
        return len(self.guests)

    def loads(self, host_of: list[int]) -> tuple[list[float], list[float], list[float]]:
        """Per-host CPU, memory and vCPU demand (fresh lists; today's are cached)."""
        if host_of is self.cur:
            cached = self._cur_loads
            if cached is None:
                cached = self._compute_loads(host_of)
                self._cur_loads = cached
            return list(cached[0]), list(cached[1]), list(cached[2])
        return self._compute_loads(host_of)

    def _compute_loads(self, host_of: list[int]) -> tuple[list[float], list[float], list[float]]:
        cpu = [0.0] * self.n_hosts
        mem = [0.0] * self.n_hosts
        vcpu = [0.0] * self.n_hosts
        for g, h in enumerate(host_of):
            cpu[h] += self.cpu[g]
            mem[h] += self.mem[g]
            vcpu[h] += self.vcpus[g]
        return cpu, mem, vcpu

    def fixed(self, g: int) -> bool:
        return not self.movable[g]

    def can_host(self, g: int, h: int) -> bool:
        """Placement rules only (pin, must/must_not, maintenance, excluded, down)."""
        if not self.usable[h]:
            return False
        a = self.allowed[g]
        return a is None or h in a


def build_problem(
    snapshot: Snapshot,
    policy: Policy,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    last_moved_s: Mapping[str, float] | None = None,
    now_s: float = 0.0,
) -> Problem:
    capacity = capacity or {}
    last_moved_s = last_moved_s or {}
    lim = policy.limits
    c = policy.constraints
    maint = set(c.maintenance)
    excl_hosts = set(c.exclude_hosts)
    excl_vms = set(c.exclude_vms)
    power_save = policy.objective == "power-save"

    hosts: list[str] = []
    cpu_total: list[float] = []
    mem_total: list[float] = []
    cpu_cap: list[float] = []
    mem_cap: list[float] = []
    vcpu_cap: list[float] = []
    usable: list[bool] = []
    powered_off: list[bool] = []
    balanced: list[bool] = []
    for h in snapshot.hosts:
        over = capacity.get(h.name)
        cpus = float(over.cpus) if over and over.cpus > 0 else float(h.cpus)
        mem = float(over.mem_bytes) if over and over.mem_bytes > 0 else float(h.mem_bytes)
        hosts.append(h.name)
        cpu_total.append(cpus)
        mem_total.append(mem)
        cpu_cap.append(cpus * lim.max_cpu_util)
        mem_cap.append(max(0.0, min(mem * lim.max_mem_util, mem - lim.mem_headroom_bytes)))
        vcpu_cap.append(cpus * lim.cpu_overcommit)
        off = h.powered_off
        powered_off.append(off)
        # A powered-off host does not answer, but it is known empty and can be switched on.
        ok = (h.up or off) and h.name not in excl_hosts and cpus > 0 and mem > 0
        balanced.append(ok and not off)
        usable.append(ok and h.name not in maint and (power_save or not off))
    host_index = {n: i for i, n in enumerate(hosts)}

    def host_set(names: tuple[str, ...]) -> frozenset[int]:
        return frozenset(host_index[n] for n in names if n in host_index)

    guests: list[str] = []
    cpu: list[float] = []
    memd: list[float] = []
    vcpus: list[int] = []
    cur: list[int] = []
    movable: list[bool] = []
    notes: list[str] = []
    for v in snapshot.vms:
        hi = host_index.get(v.host)
        if hi is None:
            notes.append(f"guest {v.name} is on unknown host {v.host}; ignored")
            continue
        guests.append(v.name)
        cpu.append(max(0.0, v.cpu_cores))
        memd.append(float(v.mem_bytes))
        vcpus.append(v.vcpus)
        cur.append(hi)
        movable.append(True)
    guest_index = {n: i for i, n in enumerate(guests)}
    n = len(guests)

    allowed: list[frozenset[int] | None] = [None] * n

    def restrict(g: int, hs: frozenset[int]) -> None:
        a = allowed[g]
        allowed[g] = hs if a is None else a & hs

    all_hosts = frozenset(range(len(hosts)))
    for vm, names in c.pin.items():
        gi = guest_index.get(vm)
        if gi is not None:
            restrict(gi, host_set(names))
    soft: list[tuple[frozenset[int], float]] = [(frozenset(), 0.0)] * n
    for rule in c.host_rules:
        hs = host_set(rule.hosts)
        for vm in rule.vms:
            gi = guest_index.get(vm)
            if gi is None:
                continue
            if rule.kind == "must":
                restrict(gi, hs)
            elif rule.kind == "must_not":
                restrict(gi, all_hosts - hs)
            else:
                bad = all_hosts - hs if rule.kind == "should" else hs
                prev_bad, prev_w = soft[gi]
                # one cost per guest; several soft rules on one guest add up per host set
                soft[gi] = (prev_bad | bad, prev_w + rule.weight)

    must_move = [False] * n
    for g in range(n):
        hi = cur[g]
        a = allowed[g]
        if hosts[hi] in maint or (a is not None and hi not in a):
            must_move[g] = True
        name = guests[g]
        if name in excl_vms or hosts[hi] in excl_hosts or not snapshot.hosts[hi].up:
            movable[g] = False
        elif not must_move[g]:
            t = last_moved_s.get(name)
            if t is not None and now_s - t < policy.hysteresis.cooldown_s:
                movable[g] = False

    def groups(raw: tuple[tuple[str, ...], ...]) -> list[list[int]]:
        out = []
        for grp in raw:
            idx = sorted({guest_index[v] for v in grp if v in guest_index})
            if len(idx) >= 2:
                out.append(idx)
        return out

    return Problem(
        hosts=hosts,
        cpu_total=cpu_total,
        mem_total=mem_total,
        cpu_cap=cpu_cap,
        mem_cap=mem_cap,
        vcpu_cap=vcpu_cap,
        usable=usable,
        powered_off=powered_off,
        balanced=balanced,
        guests=guests,
        cpu=cpu,
        mem=memd,
        vcpus=vcpus,
        cur=cur,
        movable=movable,
        must_move=must_move,
        allowed=allowed,
        anti=groups(c.anti_affinity),
        affinity=groups(c.affinity),
        soft=soft,
        w_cpu=policy.resources.cpu_weight,
        w_mem=policy.resources.memory_weight,
        objective=policy.objective,
        policy=policy,
        host_index=host_index,
        guest_index=guest_index,
        notes=notes,
    )


# --- scores and bounds ------------------------------------------------------------------


def max_utils(p: Problem, host_of: list[int]) -> tuple[float, float]:
    """Highest CPU and memory utilization over balanced hosts."""
    cpu, mem, _ = p.loads(host_of)
    uc = um = 0.0
    for h in range(p.n_hosts):
        if not p.balanced[h]:
            continue
        uc = max(uc, cpu[h] / p.cpu_total[h])
        um = max(um, mem[h] / p.mem_total[h])
    return uc, um


def balance_score(p: Problem, host_of: list[int]) -> float:
    """The balance objective without migration cost: highest weighted host utilization."""
    uc, um = max_utils(p, host_of)
    return max(p.w_cpu * uc, p.w_mem * um)


def util_lower_bounds(p: Problem) -> tuple[float, float]:
    """Per resource: no placement has every balanced host below total demand / capacity,
    nor a host below the load its fixed guests put on it."""
    dc = dm = cc = cm = 0.0
    fixed_c = [0.0] * p.n_hosts
    fixed_m = [0.0] * p.n_hosts
    for g in range(p.n_guests):
        h = p.cur[g]
        if not p.balanced[h] and not p.movable[g]:
            continue
        dc += p.cpu[g]
        dm += p.mem[g]
        if not p.movable[g]:
            fixed_c[h] += p.cpu[g]
            fixed_m[h] += p.mem[g]
    lbc = lbm = 0.0
    for h in range(p.n_hosts):
        if p.balanced[h] and (p.usable[h] or p.objective != "power-save"):
            cc += p.cpu_total[h]
            cm += p.mem_total[h]
            lbc = max(lbc, fixed_c[h] / p.cpu_total[h])
            lbm = max(lbm, fixed_m[h] / p.mem_total[h])
    if cc > 0:
        lbc = max(lbc, dc / cc)
    if cm > 0:
        lbm = max(lbm, dm / cm)
    return lbc, lbm


def balance_lower_bound(p: Problem) -> float:
    lbc, lbm = util_lower_bounds(p)
    return max(p.w_cpu * lbc, p.w_mem * lbm)


def move_lower_bound(p: Problem, cpu_util: float, mem_util: float) -> int:
    """Fewest moves any placement needs to bring every balanced host to at most
    ``cpu_util`` / ``mem_util``: per host, the fewest movable guests (largest first) whose
    removal brings each resource under, the larger count of the two; plus guests that
    must leave their host."""
    per_host: list[list[int]] = [[] for _ in range(p.n_hosts)]
    forced = 0
    for g in range(p.n_guests):
        if p.must_move[g] and p.movable[g]:
            forced += 1
        else:
            per_host[p.cur[g]].append(g)
    total = forced
    for h in range(p.n_hosts):
        if not p.balanced[h]:
            continue
        need = 0
        for demand, limit in (
            (p.cpu, cpu_util * p.cpu_total[h]),
            (p.mem, mem_util * p.mem_total[h]),
        ):
            load = sum(demand[g] for g in per_host[h])
            if load <= limit * (1 + 1e-9) + EPS:
                continue
            k = 0
            for d in sorted((demand[g] for g in per_host[h] if p.movable[g]), reverse=True):
                load -= d
                k += 1
                if load <= limit * (1 + 1e-9) + EPS:
                    break
            need = max(need, k)
        total += need
    return total


def shed_bytes_lower_bound(p: Problem) -> float:
    """Bytes any placement within the hard limits must move: per host over a limit, the
    fewest guests that can bring it under (largest first) moved at their smallest sizes,
    plus every guest that must leave its host."""
    per_host: list[list[int]] = [[] for _ in range(p.n_hosts)]
    total = 0.0
    for g in range(p.n_guests):
        if p.must_move[g] and p.movable[g]:
            total += p.mem[g]
        else:
            per_host[p.cur[g]].append(g)
    for h in range(p.n_hosts):
        gs = [g for g in per_host[h] if p.movable[g]]
        need = 0
        for demand, cap in ((p.cpu, p.cpu_cap[h]), (p.mem, p.mem_cap[h])):
            load = sum(demand[g] for g in per_host[h])
            k = 0
            for d in sorted((demand[g] for g in gs), reverse=True):
                if load <= cap * (1 + 1e-9) + EPS:
                    break
                load -= d
                k += 1
            need = max(need, k)
        if need:
            total += sum(sorted(p.mem[g] for g in gs)[:need])
    return total


def power_weight(p: Problem, h: int) -> float:
    """Relative cost of keeping host h on (idle watts; 1.0 without a power model)."""
    pw = p.policy.power
    model = pw.host_models.get(p.hosts[h], pw.default_model)
    base = pw.default_model.idle_watts or 1.0
    return model.idle_watts / base if base > 0 else 1.0


def power_score(p: Problem, host_of: list[int]) -> float:
    """Share of the usable hosts' idle power that stays on (0..1)."""
    used = {h for h in host_of}
    total = on = 0.0
    for h in range(p.n_hosts):
        if not p.balanced[h] and not (p.powered_off[h] and p.usable[h]):
            continue
        w = power_weight(p, h)
        total += w
        if h in used:
            on += w
    return on / total if total > 0 else 0.0
