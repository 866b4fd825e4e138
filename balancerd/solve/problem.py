"""Snapshot + policy -> an indexed placement problem (plain lists, built once per cycle).

Every solver stage (greedy repair, ILP, power-save consolidation) works on ``Problem``;
``verify`` deliberately does NOT: it re-derives everything from the snapshot and policy.

Utilization of a host for resource r (cpu, mem) is load_r / raw capacity_r; the balance
objective is ``max over hosts and resources of weight_r * util_r``. Limits
(max_cpu_util, max_mem_util, mem_headroom_bytes, cpu_overcommit) are hard caps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from balancerd.model import Capacity, Snapshot, Vm, blockers_text
from balancerd.policy.model import Policy
from balancerd.predict import Estimate, fallback, predict_vm
from balancerd.speed import demand_per_vcpu, speed_factors, too_slow, uniform
from balancerd.units import GIB as GIB  # re-exported: ilp.py, explain.py import it here
from balancerd.units import MIB

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
    # What moving each guest costs, in bytes at the policy's bandwidth: its predicted
    # migration time (predict.py), plus the downtime of one that does not converge.
    move_cost: list[float] = field(default_factory=list)
    # what its dirtying adds to move_cost (0 for a quiet or unmeasured guest)
    move_extra: list[float] = field(default_factory=list)
    move_s: list[float] = field(default_factory=list)  # predicted seconds
    converges: list[bool] = field(default_factory=list)  # pre-copy alone finishes
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


@dataclass
class _Hosts:
    names: list[str] = field(default_factory=list)
    cpu_total: list[float] = field(default_factory=list)
    mem_total: list[float] = field(default_factory=list)
    cpu_cap: list[float] = field(default_factory=list)
    mem_cap: list[float] = field(default_factory=list)
    vcpu_cap: list[float] = field(default_factory=list)
    usable: list[bool] = field(default_factory=list)
    powered_off: list[bool] = field(default_factory=list)
    balanced: list[bool] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)


@dataclass
class _Guests:
    names: list[str] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    mem: list[float] = field(default_factory=list)
    vcpus: list[int] = field(default_factory=list)
    cur: list[int] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Rules:
    allowed: list[frozenset[int] | None]
    soft: list[tuple[frozenset[int], float]]


def build_problem(
    snapshot: Snapshot,
    policy: Policy,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    last_moved_s: Mapping[str, float] | None = None,
    now_s: float = 0.0,
) -> Problem:
    """Index the snapshot under the policy, in stages: hosts (capacity, limits, who may
    receive guests), guests (demand, where they are), placement rules (one allowed-host
    set per distinct combination of rules, shared by every guest it applies to), and who
    may move this cycle (cooldown, exclusions, forced moves)."""
    factors = speed_factors(snapshot.hosts)
    hosts = _index_hosts(snapshot, policy, capacity or {}, factors)
    guests = _index_guests(snapshot, hosts.index, factors)
    rules = _placement_rules(policy, len(hosts.names), hosts.index, guests.index)
    if not uniform(factors):
        _keep_off_slow_hosts(snapshot, factors, hosts, guests, rules)
    movable, must_move = _movability(
        snapshot, policy, hosts, guests, rules.allowed, last_moved_s or {}, now_s
    )
    cost, extra, secs, converges = _predicted(snapshot, policy, guests)
    _hold_non_converging(policy, hosts, guests, converges, movable, must_move)
    c = policy.constraints
    return Problem(
        hosts=hosts.names,
        cpu_total=hosts.cpu_total,
        mem_total=hosts.mem_total,
        cpu_cap=hosts.cpu_cap,
        mem_cap=hosts.mem_cap,
        vcpu_cap=hosts.vcpu_cap,
        usable=hosts.usable,
        powered_off=hosts.powered_off,
        balanced=hosts.balanced,
        guests=guests.names,
        cpu=guests.cpu,
        mem=guests.mem,
        vcpus=guests.vcpus,
        cur=guests.cur,
        movable=movable,
        must_move=must_move,
        allowed=rules.allowed,
        anti=_groups(c.anti_affinity, guests.index),
        affinity=_groups(c.affinity, guests.index),
        soft=rules.soft,
        w_cpu=policy.resources.cpu_weight,
        w_mem=policy.resources.memory_weight,
        objective=policy.objective,
        policy=policy,
        move_cost=cost,
        move_extra=extra,
        move_s=secs,
        converges=converges,
        host_index=hosts.index,
        guest_index=guests.index,
        notes=guests.notes,
    )


def _index_hosts(
    snapshot: Snapshot,
    policy: Policy,
    capacity: Mapping[str, HostCapacity],
    factors: Mapping[str, float],
) -> _Hosts:
    """Capacity (overrides first; CPU in reference cores), hard caps from the limits,
    and each host's role."""
    lim = policy.limits
    c = policy.constraints
    maint = set(c.maintenance)
    excl_hosts = set(c.exclude_hosts)
    power_save = policy.objective == "power-save"
    out = _Hosts()
    for h in snapshot.hosts:
        over = capacity.get(h.name)
        cpus = float(over.cpus) if over and over.cpus > 0 else float(h.cpus)
        mem = float(over.mem_bytes) if over and over.mem_bytes > 0 else float(h.mem_bytes)
        ref_cores = cpus * factors.get(h.name, 1.0)
        out.index[h.name] = len(out.names)
        out.names.append(h.name)
        out.cpu_total.append(ref_cores)
        out.mem_total.append(mem)
        out.cpu_cap.append(ref_cores * lim.max_cpu_util)
        out.mem_cap.append(max(0.0, min(mem * lim.max_mem_util, mem - lim.mem_headroom_bytes)))
        out.vcpu_cap.append(cpus * lim.cpu_overcommit)
        off = h.powered_off
        out.powered_off.append(off)
        # A powered-off host does not answer, but it is known empty and can be switched on.
        ok = (h.up or off) and h.name not in excl_hosts and cpus > 0 and mem > 0
        out.balanced.append(ok and not off)
        out.usable.append(ok and h.name not in maint and (power_save or not off))
    return out


def _index_guests(
    snapshot: Snapshot, host_index: Mapping[str, int], factors: Mapping[str, float]
) -> _Guests:
    out = _Guests()
    for v in snapshot.vms:
        hi = host_index.get(v.host)
        if hi is None:
            out.notes.append(f"guest {v.name} is on unknown host {v.host}; ignored")
            continue
        out.index[v.name] = len(out.names)
        out.names.append(v.name)
        out.cpu.append(max(0.0, v.cpu_cores) * factors.get(v.host, 1.0))
        out.mem.append(float(v.mem_bytes))
        out.vcpus.append(v.vcpus)
        out.cur.append(hi)
    return out


def _placement_rules(  # noqa: C901 (one branch per placement rule kind)
    policy: Policy, n_hosts: int, host_index: Mapping[str, int], guest_index: Mapping[str, int]
) -> _Rules:
    """Per guest: the hosts it may use (pin, must, must_not) and the hosts a soft rule
    dislikes. Each rule's host set is built once; guests under the same combination of
    rules share one frozenset (a must_not over 400 hosts for 500 guests is one set, not
    500), which keeps this stage linear and lets later stages cache per set."""
    c = policy.constraints
    all_hosts = frozenset(range(n_hosts))
    sets: list[frozenset[int]] = []
    set_id: dict[frozenset[int], int] = {}

    def intern(hs: frozenset[int]) -> int:
        sid = set_id.get(hs)
        if sid is None:
            sid = set_id[hs] = len(sets)
            sets.append(hs)
        return sid

    def host_set(names: tuple[str, ...]) -> frozenset[int]:
        return frozenset(host_index[n] for n in names if n in host_index)

    hard: dict[int, set[int]] = {}  # guest -> ids of the sets it must stay within
    bad: dict[int, set[int]] = {}  # guest -> ids of the sets a soft rule dislikes
    weight: dict[int, float] = {}
    for vm, names in c.pin.items():
        gi = guest_index.get(vm)
        if gi is not None:
            hard.setdefault(gi, set()).add(intern(host_set(names)))
    for rule in c.host_rules:
        hs = host_set(rule.hosts)
        if rule.kind == "must":
            sid = intern(hs)
        elif rule.kind == "must_not":
            sid = intern(all_hosts - hs)
        else:
            sid = intern(all_hosts - hs if rule.kind == "should" else hs)
        for vm in rule.vms:
            gi = guest_index.get(vm)
            if gi is None:
                continue
            if rule.kind in ("must", "must_not"):
                hard.setdefault(gi, set()).add(sid)
            else:
                # one cost per guest; several soft rules on one guest add up per host set
                bad.setdefault(gi, set()).add(sid)
                weight[gi] = weight.get(gi, 0.0) + rule.weight

    n = len(guest_index)
    allowed: list[frozenset[int] | None] = [None] * n
    meet: dict[tuple[int, ...], frozenset[int]] = {}
    for gi, ids in hard.items():
        key = tuple(sorted(ids))
        got = meet.get(key)
        if got is None:
            got = frozenset.intersection(*(sets[i] for i in key))
            meet[key] = got
        allowed[gi] = got
    soft: list[tuple[frozenset[int], float]] = [(frozenset(), 0.0)] * n
    join: dict[tuple[int, ...], frozenset[int]] = {}
    for gi, ids in bad.items():
        key = tuple(sorted(ids))
        got = join.get(key)
        if got is None:
            got = frozenset().union(*(sets[i] for i in key))
            join[key] = got
        soft[gi] = (got, weight[gi])
    return _Rules(allowed, soft)


def _keep_off_slow_hosts(
    snapshot: Snapshot,
    factors: Mapping[str, float],
    hosts: _Hosts,
    guests: _Guests,
    rules: _Rules,
) -> None:
    """Narrow each guest's allowed hosts to those whose cores can give one of its vCPUs
    what it needs (balancerd/speed.py). Guests needing the same speed share one set."""
    vm_of = {v.name: v for v in snapshot.vms}
    fast_enough: dict[float, frozenset[int]] = {}
    narrowed: dict[tuple[int, float], frozenset[int]] = {}
    slowest = min(factors.values())
    for g, name in enumerate(guests.names):
        need = demand_per_vcpu(vm_of[name], factors)
        if not too_slow(need, slowest):
            continue
        level = round(need, 3)
        fast = fast_enough.get(level)
        if fast is None:
            fast = frozenset(
                h for h, n in enumerate(hosts.names) if not too_slow(level, factors.get(n, 1.0))
            )
            fast_enough[level] = fast
        a = rules.allowed[g]
        if a is None:
            rules.allowed[g] = fast
            continue
        key = (id(a), level)
        got = narrowed.get(key)
        if got is None:
            got = narrowed[key] = a & fast
        rules.allowed[g] = got


def _movability(
    snapshot: Snapshot,
    policy: Policy,
    hosts: _Hosts,
    guests: _Guests,
    allowed: list[frozenset[int] | None],
    last_moved_s: Mapping[str, float],
    now_s: float,
) -> tuple[list[bool], list[bool]]:
    """(movable, must_move) per guest: a guest on a drained host or outside its allowed
    hosts must move; excluded guests, guests of excluded or down hosts and (unless they
    must move) guests in their cooldown stay."""
    c = policy.constraints
    maint = set(c.maintenance)
    excl_hosts = set(c.exclude_hosts)
    excl_vms = set(c.exclude_vms)
    blocked = {v.name: v.blockers for v in snapshot.vms if v.blockers}
    n = len(guests.names)
    movable = [True] * n
    must_move = [False] * n
    for g in range(n):
        hi = guests.cur[g]
        a = allowed[g]
        if hosts.names[hi] in maint or (a is not None and hi not in a):
            must_move[g] = True
        name = guests.names[g]
        if name in blocked:
            # fixed in place: it still counts on its host, and the operator reads why
            movable[g] = False
            what = "must leave" if must_move[g] else "stays on"
            guests.notes.append(
                f"guest {name} {what} host {hosts.names[hi]} but cannot be live-migrated "
                f"({blockers_text(blocked[name])})"
            )
        elif name in excl_vms or hosts.names[hi] in excl_hosts or not snapshot.hosts[hi].up:
            movable[g] = False
        elif not must_move[g]:
            t = last_moved_s.get(name)
            if t is not None and now_s - t < policy.hysteresis.cooldown_s:
                movable[g] = False
    return movable, must_move


def _predicted(
    snapshot: Snapshot, policy: Policy, guests: _Guests
) -> tuple[list[float], list[float], list[float], list[bool]]:
    """(cost in bytes at the bandwidth, what dirtying adds to it, seconds, converges) per
    guest (predict.py)."""
    mig = policy.migration
    bw = max(mig.bandwidth_mib_s, 1e-3) * MIB
    vm_of = {v.name: v for v in snapshot.vms}
    no_pause = set(mig.no_pause_vms)
    seen: dict[tuple[int, float | None, float | None, bool], Estimate] = {}  # same inputs

    def estimate(v: Vm) -> Estimate:
        key = (v.mem_bytes, v.dirty_rate_bytes_s, v.dirty_working_set_bytes, v.name in no_pause)
        e = seen.get(key)
        if e is None:
            e = seen[key] = predict_vm(v, mig)
        return e

    cost, extra, secs, conv = [], [], [], []
    for name in guests.names:
        v = vm_of[name]
        e = estimate(v)
        unmeasured = v.dirty_rate_bytes_s is None and v.dirty_working_set_bytes is None
        quiet = (
            e
            if unmeasured
            else estimate(replace(v, dirty_rate_bytes_s=None, dirty_working_set_bytes=None))
        )
        cost.append(e.cost_s * bw)
        extra.append(max(0.0, e.cost_s - quiet.cost_s) * bw)
        secs.append(e.seconds)
        conv.append(e.converges)
    return cost, extra, secs, conv


def _hold_non_converging(
    policy: Policy,
    hosts: _Hosts,
    guests: _Guests,
    converges: list[bool],
    movable: list[bool],
    must_move: list[bool],
) -> None:
    """A guest predicted not to converge moves only when a hard rule needs it: it must
    move (drain, placement rule) or its host is over a hard limit today."""
    n_h = len(hosts.names)
    cpu, mem, vcpu = [0.0] * n_h, [0.0] * n_h, [0.0] * n_h
    for g, h in enumerate(guests.cur):
        cpu[h] += guests.cpu[g]
        mem[h] += guests.mem[g]
        vcpu[h] += guests.vcpus[g]
    over = [
        cpu[h] > hosts.cpu_cap[h] + EPS
        or mem[h] > hosts.mem_cap[h] + 0.5
        or vcpu[h] > hosts.vcpu_cap[h]
        for h in range(n_h)
    ]
    for g, ok in enumerate(converges):
        if ok or not movable[g] or must_move[g] or over[guests.cur[g]]:
            continue
        movable[g] = False
        guests.notes.append(
            f"guest {guests.names[g]} stays: predicted not to converge at "
            f"{policy.migration.bandwidth_mib_s:g} MiB/s (it would end by "
            f"{fallback(policy.migration, guests.names[g])}); moved only when a hard rule needs it"
        )


def _groups(raw: tuple[tuple[str, ...], ...], guest_index: Mapping[str, int]) -> list[list[int]]:
    out = []
    for grp in raw:
        idx = sorted({guest_index[v] for v in grp if v in guest_index})
        if len(idx) >= 2:
            out.append(idx)
    return out


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
