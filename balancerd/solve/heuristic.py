"""Fast greedy stages: repair to per-host targets with few moves, balance by searching the
lowest reachable target, and power-save consolidation. They give the ILP its incumbent and
carry the large instances alone when the ILP has no time left.

Guests of one affinity group move together as one *unit*.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass

from balancerd.solve.problem import (
    EPS,
    Problem,
    balance_score,
    power_score,
    power_weight,
    util_lower_bounds,
)

GIB_F = float(1024**3)


@dataclass
class Unit:
    members: list[int]
    cpu: float
    mem: float
    vcpus: float
    mem_bytes: float
    cur: int  # -1 when the members are on different hosts
    movable: bool
    must_move: bool
    allowed: frozenset[int] | None
    anti: list[tuple[int, int]]  # (anti-affinity group id, members of this unit in it)
    avoid: frozenset[int] = frozenset()  # hosts a soft (should / should_not) rule dislikes
    move_cost: float = 0.0  # predicted cost of moving it (Problem.move_cost): ties go cheap
    move_extra: float = 0.0  # what its members' dirtying adds to that (Problem.move_extra)


def build_units(p: Problem) -> tuple[list[Unit], list[int]]:  # noqa: C901 (grouping rules (affinity, pins, exclusions) in one pass)
    parent = list(range(p.n_guests))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for grp in p.affinity:
        for g in grp[1:]:
            a, b = find(grp[0]), find(g)
            if a != b:
                parent[b] = a
    groups: dict[int, list[int]] = {}
    for g in range(p.n_guests):
        groups.setdefault(find(g), []).append(g)
    anti_of: dict[int, list[int]] = {}
    for gid, grp in enumerate(p.anti):
        for g in grp:
            anti_of.setdefault(g, []).append(gid)
    units: list[Unit] = []
    unit_of = [0] * p.n_guests
    no_avoid: frozenset[int] = frozenset()
    for members in groups.values():
        if len(members) == 1:  # the common case, kept cheap
            g = members[0]
            unit_of[g] = len(units)
            units.append(
                Unit(
                    members=members,
                    cpu=p.cpu[g],
                    mem=p.mem[g],
                    vcpus=float(p.vcpus[g]),
                    mem_bytes=p.mem[g],
                    cur=p.cur[g],
                    movable=p.movable[g],
                    must_move=p.must_move[g],
                    allowed=p.allowed[g],
                    anti=[(gid, 1) for gid in anti_of[g]] if g in anti_of else [],
                    avoid=p.soft[g][0] if p.soft[g][1] > 0 else no_avoid,
                    move_cost=p.move_cost[g],
                    move_extra=p.move_extra[g],
                )
            )
            continue
        hosts = {p.cur[g] for g in members}
        cur = next(iter(hosts)) if len(hosts) == 1 else -1
        allowed: frozenset[int] | None = None
        for g in members:
            ga = p.allowed[g]
            if ga is not None:
                allowed = ga if allowed is None else allowed & ga
        fixed_hosts = {p.cur[g] for g in members if not p.movable[g]}
        movable = not fixed_hosts
        if fixed_hosts and cur == -1 and len(fixed_hosts) == 1:
            # a split group with a fixed member: the rest may join it
            movable = True
            allowed = frozenset(fixed_hosts) if allowed is None else allowed & fixed_hosts
        anti_count: dict[int, int] = {}
        for g in members:
            for gid in anti_of.get(g, ()):
                anti_count[gid] = anti_count.get(gid, 0) + 1
        units.append(
            Unit(
                members=members,
                cpu=sum(p.cpu[g] for g in members),
                mem=sum(p.mem[g] for g in members),
                vcpus=float(sum(p.vcpus[g] for g in members)),
                mem_bytes=sum(p.mem[g] for g in members),
                cur=cur,
                movable=movable,
                must_move=cur == -1 or any(p.must_move[g] for g in members),
                allowed=allowed,
                anti=sorted(anti_count.items()),
                avoid=frozenset().union(*(p.soft[g][0] for g in members if p.soft[g][1] > 0)),
                move_cost=sum(p.move_cost[g] for g in members),
                move_extra=sum(p.move_extra[g] for g in members),
            )
        )
        for g in members:
            unit_of[g] = len(units) - 1
    return units, unit_of


class State:
    """Host loads and anti-affinity counts under a changing guest -> host map."""

    def __init__(
        self,
        p: Problem,
        units: list[Unit],
        host_of: list[int],
        closed: frozenset[int] = frozenset(),
    ) -> None:
        self.p = p
        self.units = units
        self.host_of = list(host_of)
        self.closed = closed  # hosts that may keep or lose guests, never gain one
        self.cpu, self.mem, self.vcpu = p.loads(host_of)
        self.anti: list[dict[int, int]] = [{} for _ in p.anti]
        for gid, grp in enumerate(p.anti):
            cnt = self.anti[gid]
            for g in grp:
                h = self.host_of[g]
                cnt[h] = cnt.get(h, 0) + 1
        self.anti_of: dict[int, list[int]] = {}
        for gid, grp in enumerate(p.anti):
            for g in grp:
                self.anti_of.setdefault(g, []).append(gid)

    def lift(self, u: Unit) -> None:
        p = self.p
        for g in u.members:
            h = self.host_of[g]
            self.cpu[h] -= p.cpu[g]
            self.mem[h] -= p.mem[g]
            self.vcpu[h] -= p.vcpus[g]
            for gid in self.anti_of.get(g, ()):
                self.anti[gid][h] -= 1
            self.host_of[g] = -1

    def drop(self, u: Unit, h: int) -> None:
        p = self.p
        for g in u.members:
            self.cpu[h] += p.cpu[g]
            self.mem[h] += p.mem[g]
            self.vcpu[h] += p.vcpus[g]
            for gid in self.anti_of.get(g, ()):
                self.anti[gid][h] = self.anti[gid].get(h, 0) + 1
            self.host_of[g] = h

    def fits(self, u: Unit, h: int, cap_c: list[float], cap_m: list[float]) -> bool:
        """u is lifted; would it fit h under the caps and anti-affinity?"""
        p = self.p
        if not p.usable[h] or (u.allowed is not None and h not in u.allowed):
            return False
        if h in self.closed and h != u.cur:
            return False
        if self.cpu[h] + u.cpu > cap_c[h] + EPS or self.mem[h] + u.mem > cap_m[h] + 0.5:
            return False
        if self.vcpu[h] + u.vcpus > p.vcpu_cap[h] + EPS:
            return False
        return all(self.anti[gid].get(h, 0) + k <= 1 for gid, k in u.anti)


@dataclass
class RepairResult:
    host_of: list[int]
    moves: int
    moved_bytes: float
    complete: bool  # every host under its cap and every forced move done


def moves_and_bytes(p: Problem, host_of: list[int]) -> tuple[int, float]:
    """Guests moved by ``host_of`` and the memory they carry (bytes)."""
    n = 0
    b = 0.0
    for g in range(p.n_guests):
        if host_of[g] != p.cur[g]:
            n += 1
            b += p.mem[g]
    return n, b


def _pick_evictions(
    p: Problem, units: list[Unit], cands: list[int], ec: float, em: float, h: int
) -> list[int]:
    """Fewest units whose removal takes ec cores and em bytes off host h."""
    chosen: list[int] = []
    left = sorted(cands, key=lambda i: units[i].move_cost)  # of equal ones, the cheapest
    tc = p.cpu_total[h] or 1.0
    tm = p.mem_total[h] or 1.0
    need_c, need_m = ec, em
    while (ec > EPS or em > 0.5) and left:
        best = -1
        best_size = float("inf")
        for i in left:
            u = units[i]
            if u.cpu >= ec - EPS and u.mem >= em - 0.5:
                size = u.cpu / tc + u.mem / tm
                if size < best_size:
                    best, best_size = i, size
        if best < 0:
            best_gain = -1.0
            for i in left:
                u = units[i]
                gain = min(u.cpu, max(ec, 0.0)) / tc + min(u.mem, max(em, 0.0)) / tm
                if gain > best_gain:
                    best, best_gain = i, gain
        chosen.append(best)
        left.remove(best)
        ec -= units[best].cpu
        em -= units[best].mem

    # same count, less volume: swap a chosen unit for a smaller one while still covering
    # (less to fit elsewhere, so tighter targets pack)
    def vol(i: int) -> float:
        return units[i].cpu / tc + units[i].mem / tm

    got_c = sum(units[i].cpu for i in chosen)
    got_m = sum(units[i].mem for i in chosen)
    for _ in range(2):
        improved = False
        for pos in sorted(range(len(chosen)), key=lambda k: -vol(chosen[k])):
            i = chosen[pos]
            for j in sorted(left, key=vol):
                if vol(j) >= vol(i):
                    break
                c2 = got_c - units[i].cpu + units[j].cpu
                m2 = got_m - units[i].mem + units[j].mem
                if c2 >= need_c - EPS and m2 >= need_m - 0.5:
                    chosen[pos] = j
                    left.remove(j)
                    left.append(i)
                    got_c, got_m = c2, m2
                    improved = True
                    break
        if not improved:
            break
    return chosen


@dataclass
class _Budget:
    """Moves and bytes left, counted against today's placement (a guest moved twice is one
    move; a guest sent home gives its move back)."""

    moves: int
    bytes: float

    def cost(self, p: Problem, u: Unit, src: int, dst: int) -> tuple[int, float]:
        n = 0
        b = 0.0
        for g in u.members:
            was = p.cur[g] != src
            now = p.cur[g] != dst
            if now and not was:
                n += 1
                b += p.mem[g]
            elif was and not now:
                n -= 1
                b -= p.mem[g]
        return n, b

    def allows(self, n: int, b: float) -> bool:
        return n <= self.moves and b <= self.bytes + 0.5

    def spend(self, n: int, b: float) -> None:
        self.moves -= n
        self.bytes -= b


def repair(
    p: Problem,
    units: list[Unit],
    unit_of: list[int],
    cap_c: list[float],
    cap_m: list[float],
    *,
    max_moves: int,
    max_bytes: float,
    partial: bool,
    best_fit: bool = True,
    start: list[int] | None = None,
    frozen: frozenset[int] = frozenset(),
    closed: frozenset[int] = frozenset(),
    settle: bool = False,
    wide: bool = True,
) -> RepairResult | None:
    """Move as few units as it can so every balanced host is under cap_c / cap_m and every
    forced move is done, starting from ``start`` (default: today's placement). ``frozen``
    units stay where they are; ``closed`` hosts may lose guests, never gain one.
    ``partial``: within the budget, do what fits and keep the rest where it is
    (complete=False); otherwise None when it cannot finish. ``settle``: when a unit fits
    nowhere, carry on and then fix the hosts left over their caps by single moves and
    swaps (worst host first) instead of giving up at once.

    Stages: forced units -> evictions from hosts over their caps (fewest units) -> the
    budget -> placement (largest first; a unit that fits nowhere makes room by moving one
    small unit to a third host) -> settle -> units whose home has room again go home."""
    base = p.cur if start is None else start
    st = State(p, units, base, closed)
    budget = _Budget(max_moves, max_bytes)
    n0, b0 = moves_and_bytes(p, base)
    budget.spend(n0, b0)
    unit_on = _units_on(p, units, st)
    forced = _forced_units(p, units, unit_of, st, frozen)
    order = forced + _evictions(p, units, st, unit_on, cap_c, cap_m, set(forced), frozen)
    kept, complete = _within_budget(p, units, st, order, budget)
    if not complete and not partial:
        return None
    ok = _place_all(
        p,
        units,
        st,
        unit_on,
        kept,
        cap_c,
        cap_m,
        best_fit,
        keep_going=partial or settle,
        make_room=not settle,
    )
    if not ok and not (partial or settle):
        return None
    if settle and not ok:
        n, b = moves_and_bytes(p, st.host_of)
        left = _Budget(max_moves - n, max_bytes - b)
        _settle(p, units, st, unit_on, cap_c, cap_m, frozen, left, wide=wide)
    away = [i for i, u in enumerate(units) if u.cur >= 0 and st.host_of[u.members[0]] != u.cur]
    _send_home(units, st, away, cap_c, cap_m)
    complete = complete and _all_within(p, units, st, cap_c, cap_m, frozen)
    if not complete and not partial:
        return None
    moves, moved_bytes = moves_and_bytes(p, st.host_of)
    return RepairResult(st.host_of, moves, moved_bytes, complete)


def _units_on(p: Problem, units: list[Unit], st: State) -> list[list[int]]:
    """Per host, the units wholly on it."""
    unit_on: list[list[int]] = [[] for _ in range(p.n_hosts)]
    for i, u in enumerate(units):
        h = st.host_of[u.members[0]]
        if h >= 0 and all(st.host_of[g] == h for g in u.members[1:]):
            unit_on[h].append(i)
    return unit_on


def _forced_units(
    p: Problem, units: list[Unit], unit_of: list[int], st: State, frozen: frozenset[int]
) -> list[int]:
    """Units on a host they must leave, and second members of an anti-affinity group on
    one host (the smallest of them leave)."""
    forced = [
        i
        for i, u in enumerate(units)
        if u.must_move
        and u.movable
        and i not in frozen
        and (u.cur < 0 or st.host_of[u.members[0]] == u.cur)
    ]
    chosen = set(forced)
    for grp in p.anti:
        seen: set[int] = set()
        for g in sorted(grp, key=lambda g: p.cpu[g] + p.mem[g] / GIB_F):
            h = st.host_of[g]
            if h in seen:
                i = unit_of[g]
                if units[i].movable and i not in chosen and i not in frozen:
                    forced.append(i)
                    chosen.add(i)
            else:
                seen.add(h)
    return forced


def _evictions(
    p: Problem,
    units: list[Unit],
    st: State,
    unit_on: list[list[int]],
    cap_c: list[float],
    cap_m: list[float],
    chosen: set[int],
    frozen: frozenset[int],
) -> list[int]:
    """Per balanced host over its caps (after the forced units leave), the fewest units
    whose removal brings it under; the hosts furthest over first."""
    by_host: list[tuple[float, list[int]]] = []
    for h in range(p.n_hosts):
        if not p.balanced[h]:
            continue
        lc = st.cpu[h] - sum(units[i].cpu for i in unit_on[h] if i in chosen)
        lm = st.mem[h] - sum(units[i].mem for i in unit_on[h] if i in chosen)
        ec = lc - cap_c[h]
        em = lm - cap_m[h]
        if ec <= EPS and em <= 0.5:
            continue
        excess = max(ec / (p.cpu_total[h] or 1.0), em / (p.mem_total[h] or 1.0))
        cands = [i for i in unit_on[h] if i not in chosen and units[i].movable and i not in frozen]
        # units already away from home move on at no extra move: they go first
        away = [i for i in cands if units[i].cur != h]
        pick = _pick_evictions(p, units, away, ec, em, h) if away else []
        ec -= sum(units[i].cpu for i in pick)
        em -= sum(units[i].mem for i in pick)
        if ec > EPS or em > 0.5:
            home = [i for i in cands if units[i].cur == h]
            pick += _pick_evictions(p, units, home, ec, em, h)
        by_host.append((excess, pick))
        chosen.update(pick)
    by_host.sort(key=lambda t: -t[0])
    return [i for _, pick in by_host for i in pick]


def _within_budget(
    p: Problem, units: list[Unit], st: State, order: list[int], budget: _Budget
) -> tuple[list[int], bool]:
    """The units of ``order`` the budget allows (in order; each counted as leaving its
    host now); False when some had to be left out."""
    kept: list[int] = []
    complete = True
    moves, left = budget.moves, budget.bytes
    for i in order:
        u = units[i]
        h = st.host_of[u.members[0]]
        dn = sum(1 for g in u.members if p.cur[g] == h)
        db = sum(p.mem[g] for g in u.members if p.cur[g] == h)
        if dn > moves or db > left + 0.5:
            complete = False
            continue
        moves -= dn
        left -= db
        kept.append(i)
    return kept, complete


def _place_all(
    p: Problem,
    units: list[Unit],
    st: State,
    unit_on: list[list[int]],
    kept: list[int],
    cap_c: list[float],
    cap_m: list[float],
    best_fit: bool,
    *,
    keep_going: bool,
    make_room: bool = True,
) -> bool:
    """Lift the kept units and place them largest first; one that fits nowhere even after
    making room goes back where it was. False when one did (or, unless ``keep_going``,
    at the first such unit)."""
    src = {i: st.host_of[units[i].members[0]] for i in kept}
    for i in kept:
        st.lift(units[i])
    avg_c, avg_m = _avg(p.cpu_total), _avg(p.mem_total)
    kept = sorted(kept, key=lambda i: -(units[i].cpu / avg_c + units[i].mem / avg_m))
    placer = _Placer(p, st, cap_c, cap_m, best_fit)
    misses = 0
    futile = 0  # make_room failures in a row: past a few, the cluster has no room left
    ok = True
    for i in kept:
        u = units[i]
        h = placer.place(u)
        if h >= 0:
            st.drop(u, h)
            placer.touched(h)
            futile = 0
        elif (
            (make_room or u.must_move)
            and futile < FUTILE_ROOM
            and (keep_going or misses < max(20, len(kept) // 8))
            and placer.make_room(u, units, unit_on) >= 0
        ):
            misses += 1
            futile = 0
        elif not keep_going or src[i] < 0:
            return False
        else:
            # back where it was, even if others took its room meanwhile: settle (or
            # the verifier, which drops such a candidate) deals with the host
            st.drop(u, src[i])
            ok = False
            futile += 1
        h = st.host_of[u.members[0]]
        if src[i] >= 0 and src[i] != h:
            unit_on[src[i]].remove(i)
            unit_on[h].append(i)
    return ok


FUTILE_ROOM = 8  # units in a row that fit nowhere, even making room: stop making room


def _send_home(
    units: list[Unit], st: State, kept: list[int], cap_c: list[float], cap_m: list[float]
) -> None:
    """A unit whose home has room again goes back (one move fewer)."""
    for i in kept:
        u = units[i]
        h = st.host_of[u.members[0]]
        if u.cur >= 0 and h != u.cur:
            st.lift(u)
            st.drop(u, u.cur if st.fits(u, u.cur, cap_c, cap_m) else h)


def _all_within(
    p: Problem,
    units: list[Unit],
    st: State,
    cap_c: list[float],
    cap_m: list[float],
    frozen: frozenset[int],
) -> bool:
    """Every balanced host under its caps and every forced move done."""
    for h in range(p.n_hosts):
        if p.balanced[h] and (st.cpu[h] > cap_c[h] + EPS or st.mem[h] > cap_m[h] + 0.5):
            return False
    return not any(
        u.must_move and u.movable and i not in frozen and st.host_of[u.members[0]] == u.cur
        for i, u in enumerate(units)
    )


class _Rooms:
    """Usable hosts ordered by their room (normalized) under the caps: CPU, memory, and
    the smaller of the two (hosts with room in both)."""

    def __init__(self, p: Problem, st: State, cap_c: list[float], cap_m: list[float]) -> None:
        self.p, self.st, self.cap_c, self.cap_m = p, st, cap_c, cap_m
        self.keys: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * p.n_hosts
        self.lists: tuple[list[tuple[float, int]], ...] = ([], [], [])
        for h in range(p.n_hosts):
            if p.usable[h] and h not in st.closed:
                self.keys[h] = self._room(h)
                for lst, key in zip(self.lists, self.keys[h], strict=True):
                    lst.append((key, h))
        for lst in self.lists:
            lst.sort()

    def _room(self, h: int) -> tuple[float, float, float]:
        p, st = self.p, self.st
        rc = (self.cap_c[h] - st.cpu[h]) / (p.cpu_total[h] or 1.0)
        rm = (self.cap_m[h] - st.mem[h]) / (p.mem_total[h] or 1.0)
        return rc, rm, min(rc, rm)

    def touched(self, h: int) -> None:
        if not self.p.usable[h] or h in self.st.closed:
            return
        new = self._room(h)
        for lst, old_key, new_key in zip(self.lists, self.keys[h], new, strict=True):
            i = bisect.bisect_left(lst, (old_key, h))
            if i < len(lst) and lst[i] == (old_key, h):
                del lst[i]
            bisect.insort(lst, (new_key, h))
        self.keys[h] = new

    def top(self, want_c: bool, want_m: bool, k: int) -> list[int]:
        """The k roomiest hosts in each wanted resource and in both (most room first, no
        repeats)."""
        out: list[int] = []
        seen: set[int] = set()
        for want, lst in zip((want_c, want_m, True), self.lists, strict=True):
            if not want:
                continue
            for _, h in itertools.islice(reversed(lst), k):
                if h not in seen:
                    seen.add(h)
                    out.append(h)
        return out


SETTLE_UNITS = 12  # units of an over host tried per step, the most useful first
SETTLE_HOSTS = 10  # destinations tried per resource, the roomiest first
SWAP_UNITS = 6
SWAP_HOSTS = 6
SETTLE_STEPS = 4  # steps per host over its caps at the start of a settle
WIDE = 5  # how much wider the second look at a hard host is


def _settle(
    p: Problem,
    units: list[Unit],
    st: State,
    unit_on: list[list[int]],
    cap_c: list[float],
    cap_m: list[float],
    frozen: frozenset[int],
    budget: _Budget,
    *,
    wide: bool = True,
) -> None:
    """Water-filling fix-up: take the host furthest over its caps; move the unit that takes
    most of its excess to a host with room in the resources it is over in, or else swap it
    with a smaller unit there; repeat until no host is over or none can be helped. Each
    step lowers that host's excess and keeps the other host within its caps."""
    rooms = _Rooms(p, st, cap_c, cap_m)

    def excess(h: int) -> float:
        return max(0.0, (st.cpu[h] - cap_c[h]) / (p.cpu_total[h] or 1.0)) + max(
            0.0, (st.mem[h] - cap_m[h] - 0.5) / (p.mem_total[h] or 1.0)
        )

    heap = [(-excess(h), h) for h in range(p.n_hosts) if p.balanced[h] and excess(h) > EPS]
    heapq.heapify(heap)
    steps = 0
    limit = SETTLE_STEPS * len(heap) + 64
    while heap and steps < limit:
        negx, h = heapq.heappop(heap)
        x = excess(h)
        if x <= EPS:
            continue
        if x < -negx - 1e-12:
            heapq.heappush(heap, (-x, h))  # stale entry
            continue
        steps += 1
        args = (p, units, st, unit_on, rooms, cap_c, cap_m, frozen, budget, h, x)
        if not (
            _settle_move(*args)
            or _settle_swap(*args)
            # a hard case: look much wider before giving up on this host
            or (wide and _settle_move(*args, k_units=2 * SETTLE_UNITS, k_hosts=WIDE * SETTLE_HOSTS))
            or (wide and _settle_swap(*args, k_units=2 * SWAP_UNITS, k_hosts=WIDE * SWAP_HOSTS))
        ):
            continue  # nothing helps this host: left over (the caller sees it)
        if excess(h) > EPS:
            heapq.heappush(heap, (-excess(h), h))


def _useful(
    p: Problem, st: State, u: Unit, h: int, cap_c: list[float], cap_m: list[float]
) -> float:
    """How much of host h's (normalized) excess leaving it would take."""
    ec = max(0.0, st.cpu[h] - cap_c[h])
    em = max(0.0, st.mem[h] - cap_m[h])
    return min(u.cpu, ec) / (p.cpu_total[h] or 1.0) + min(u.mem, em) / (p.mem_total[h] or 1.0)


def _movers(
    p: Problem,
    units: list[Unit],
    st: State,
    unit_on: list[list[int]],
    cap_c: list[float],
    cap_m: list[float],
    frozen: frozenset[int],
    h: int,
    k: int,
) -> list[int]:
    """Up to k movable units wholly on h, those taking most of its excess first."""
    ec = max(0.0, st.cpu[h] - cap_c[h])
    em = max(0.0, st.mem[h] - cap_m[h])
    tc = p.cpu_total[h] or 1.0
    tm = p.mem_total[h] or 1.0
    host_of = st.host_of
    scored = []
    for i in unit_on[h]:
        u = units[i]
        if u.movable and i not in frozen and host_of[u.members[0]] == h:
            c = u.cpu if u.cpu < ec else ec
            m = u.mem if u.mem < em else em
            # no cost tie-break here: it made the walk prefer small guests and pack worse
            # (bench_balance hetero-cpu130 at 1,000 hosts: memory +10 pts over the bound);
            # quieter() swaps dirtying guests for quicker ones on the walk's result instead
            scored.append((-(c / tc + m / tm), i))
    scored.sort()
    return [i for _, i in scored[:k]]


def _move_unit(
    st: State,
    units: list[Unit],
    unit_on: list[list[int]],
    rooms: _Rooms,
    budget: _Budget,
    i: int,
    src: int,
    dst: int,
    cost: tuple[int, float],
) -> None:
    u = units[i]
    st.lift(u)
    st.drop(u, dst)
    unit_on[src].remove(i)
    unit_on[dst].append(i)
    budget.spend(*cost)
    rooms.touched(src)
    rooms.touched(dst)


def _settle_move(
    p: Problem,
    units: list[Unit],
    st: State,
    unit_on: list[list[int]],
    rooms: _Rooms,
    cap_c: list[float],
    cap_m: list[float],
    frozen: frozenset[int],
    budget: _Budget,
    h: int,
    x: float,
    k_units: int = SETTLE_UNITS,
    k_hosts: int = SETTLE_HOSTS,
) -> bool:
    want_c = st.cpu[h] > cap_c[h] + EPS
    want_m = st.mem[h] > cap_m[h] + 0.5
    dests = rooms.top(want_c, want_m, k_hosts)
    # room per destination, for a cheap first test before the full one
    room = [
        (d, cap_c[d] - st.cpu[d] + EPS, cap_m[d] - st.mem[d] + 0.5, p.vcpu_cap[d] - st.vcpu[d])
        for d in dests
        if d != h
    ]
    best: tuple[float, int, float, int, int, tuple[int, float]] | None = None
    for i in _movers(p, units, st, unit_on, cap_c, cap_m, frozen, h, k_units):
        u = units[i]
        gain = _useful(p, st, u, h, cap_c, cap_m)
        if gain <= EPS:
            break
        size = u.cpu / (p.cpu_total[h] or 1.0) + u.mem / (p.mem_total[h] or 1.0)
        home = [u.cur] if u.cur >= 0 and u.cur != h else []
        fit = home + [
            d
            for d, rc, rm, rv in room
            if u.cpu <= rc and u.mem <= rm and u.vcpus <= rv + EPS and d not in home
        ]
        if not fit:
            continue
        st.lift(u)
        for d in fit:
            if not st.fits(u, d, cap_c, cap_m):
                continue
            cost = budget.cost(p, u, h, d)
            if not budget.allows(*cost):
                continue
            # most of the excess first, then fewer moves, then the smaller unit
            key = (round(min(gain, x), 9), -cost[0], -size, d, i, cost)
            if best is None or key[:3] > best[:3]:
                best = key
            break  # home first, then the roomiest: the first that fits is this unit's best
        st.drop(u, h)
    if best is None:
        return False
    _, _, _, d, i, cost = best
    _move_unit(st, units, unit_on, rooms, budget, i, h, d, cost)
    return True


def _settle_swap(  # noqa: C901 (a search with early exits per resource)
    p: Problem,
    units: list[Unit],
    st: State,
    unit_on: list[list[int]],
    rooms: _Rooms,
    cap_c: list[float],
    cap_m: list[float],
    frozen: frozenset[int],
    budget: _Budget,
    h: int,
    x: float,
    k_units: int = SWAP_UNITS,
    k_hosts: int = SWAP_HOSTS,
) -> bool:
    """Unit a leaves h for host d while a smaller unit b comes from d to h: h's excess
    drops, d stays within its caps. The first swap that clears h's excess with at most
    two moves is taken; else the one that lowers it most."""
    over_c = st.cpu[h] - cap_c[h]
    over_m = st.mem[h] - cap_m[h] - 0.5
    dests = rooms.top(over_c > EPS, over_m > 0.0, k_hosts)
    tc = p.cpu_total[h] or 1.0
    tm = p.mem_total[h] or 1.0
    vroom_h = p.vcpu_cap[h] - st.vcpu[h] + EPS
    # h takes b in: it must end within its hard limits (a step into a host over a limit
    # can never be ordered safely), whatever the target
    hard_c = p.cpu_cap[h] - st.cpu[h] + EPS
    hard_m = p.mem_cap[h] - st.mem[h] + 0.5
    # nor may a resource of h end higher than before where it is above its cap
    worse_c = max(cap_c[h] - st.cpu[h], 0.0) + EPS
    worse_m = max(cap_m[h] - st.mem[h], 0.0) + 0.5
    h_closed = h in st.closed
    movers = [
        (i, units[i]) for i in _movers(p, units, st, unit_on, cap_c, cap_m, frozen, h, k_units)
    ]
    host_of = st.host_of
    best: tuple[float, int, int, int, int] | None = None
    done = round(x, 9)
    for d in dests:
        if d == h:
            continue
        rc = cap_c[d] - st.cpu[d] + EPS
        rm = cap_m[d] - st.mem[d] + 0.5
        rv = p.vcpu_cap[d] - st.vcpu[d] + EPS
        here = [
            (i, a, a.cpu, a.mem, a.vcpus)
            for i, a in movers
            if (a.allowed is None or d in a.allowed) and (d not in st.closed or d == a.cur)
        ]
        if not here:
            continue
        for j in unit_on[d]:
            b = units[j]
            if not b.movable or j in frozen or (b.allowed is not None and h not in b.allowed):
                continue
            if (h_closed and h != b.cur) or host_of[b.members[0]] != d:
                continue
            bc, bm, bv = b.cpu, b.mem, b.vcpus
            for i, a, ac, am, av in here:
                dc = ac - bc  # what h loses and d gains
                dm = am - bm
                if dc > rc or dm > rm or av - bv > rv or bv - av > vroom_h:
                    continue
                if -dc > hard_c or -dm > hard_m:
                    continue
                if -dc > worse_c or -dm > worse_m:
                    continue  # trading one resource's excess for the other's is no gain
                nx = (over_c - dc if over_c > dc else 0.0) / tc + (
                    over_m - dm if over_m > dm else 0.0
                ) / tm
                if nx >= x - 1e-6:
                    continue
                if (a.anti or b.anti) and not _swap_keeps_anti(st, a, b, h, d):
                    continue
                ca = budget.cost(p, a, h, d)
                cb = budget.cost(p, b, d, h)
                n = ca[0] + cb[0]
                if not budget.allows(n, ca[1] + cb[1]):
                    continue
                key = (round(x - nx, 9), -n, i, j, d)
                if best is None or key[:2] > best[:2]:
                    best = key
            if best is not None and best[0] >= done:
                break  # clears h: good enough, stop looking
        if best is not None and best[0] >= done / 2:
            break  # half of h's excess with one swap: take it, the rest comes next step
    if best is None:
        return False
    _, _, i, j, d = best
    a, b = units[i], units[j]
    ca = budget.cost(p, a, h, d)
    cb = budget.cost(p, b, d, h)
    st.lift(a)
    st.lift(b)
    st.drop(a, d)
    st.drop(b, h)
    unit_on[h].remove(i)
    unit_on[d].append(i)
    unit_on[d].remove(j)
    unit_on[h].append(j)
    budget.spend(ca[0] + cb[0], ca[1] + cb[1])
    rooms.touched(h)
    rooms.touched(d)
    return True


def _swap_keeps_anti(st: State, a: Unit, b: Unit, h: int, d: int) -> bool:
    st.lift(a)
    st.lift(b)
    ok = all(st.anti[gid].get(d, 0) + k <= 1 for gid, k in a.anti) and all(
        st.anti[gid].get(h, 0) + k <= 1 for gid, k in b.anti
    )
    st.drop(a, h)
    st.drop(b, d)
    return ok


def _avg(xs: list[float]) -> float:
    return (sum(xs) / len(xs)) if xs and sum(xs) > 0 else 1.0


WALK = 256  # hosts tried per placement before giving up on it


class _Placer:
    """Picks a destination: least room that fits (best fit, packs tight targets) or most
    room first (worst fit). Hosts are kept sorted by their normalized room."""

    def __init__(
        self, p: Problem, st: State, cap_c: list[float], cap_m: list[float], best_fit: bool
    ) -> None:
        self.p, self.st, self.cap_c, self.cap_m, self.best_fit = p, st, cap_c, cap_m, best_fit
        # best fit is exact on the scarcer resource: its absolute room (cores or bytes)
        lbc, lbm = util_lower_bounds(p)
        self.by_cpu = p.w_cpu * lbc >= p.w_mem * lbm
        self.key = [self.room(h) for h in range(p.n_hosts)]
        self.sorted = sorted((self.key[h], h) for h in range(p.n_hosts) if p.usable[h])
        self.max_c = max(p.cpu_total) if p.cpu_total else 1.0
        self.max_m = max(p.mem_total) if p.mem_total else 1.0

    def room(self, h: int) -> float:
        p, st = self.p, self.st
        if self.best_fit:
            return self.cap_c[h] - st.cpu[h] if self.by_cpu else self.cap_m[h] - st.mem[h]
        return min(
            (self.cap_c[h] - st.cpu[h]) / (p.cpu_total[h] or 1.0),
            (self.cap_m[h] - st.mem[h]) / (p.mem_total[h] or 1.0),
        )

    def touched(self, h: int) -> None:
        if not self.p.usable[h]:
            return
        i = bisect.bisect_left(self.sorted, (self.key[h], h))
        if i < len(self.sorted) and self.sorted[i] == (self.key[h], h):
            del self.sorted[i]
        self.key[h] = self.room(h)
        bisect.insort(self.sorted, (self.key[h], h))

    def place(self, u: Unit, avoid: int = -1, walk: int = WALK) -> int:
        """A host for u, one a soft rule dislikes only when no other fits."""
        if u.avoid:
            h = self._place(u, avoid, u.avoid, walk)
            if h >= 0:
                return h
        return self._place(u, avoid, frozenset(), walk)

    def _place(self, u: Unit, avoid: int, skip: frozenset[int], walk: int) -> int:
        st = self.st
        if u.allowed is not None and len(u.allowed) <= 64:
            best = -1
            best_key = float("inf")
            for h in u.allowed:
                if h != avoid and h not in skip and st.fits(u, h, self.cap_c, self.cap_m):
                    r = self.key[h]
                    key = r if self.best_fit else -r
                    if key < best_key:
                        best, best_key = h, key
            return best
        if self.best_fit:
            need = (u.cpu if self.by_cpu else u.mem) - 1e-9
            i = bisect.bisect_left(self.sorted, (need, -1))
            for _, h in itertools.islice(self.sorted, i, i + walk):
                if h != avoid and h not in skip and st.fits(u, h, self.cap_c, self.cap_m):
                    return h
            # the least room that fits may lie past the walk (rules forbid many hosts,
            # or the other resource is short there): the roomiest hosts are a fallback
            walk = max(1, walk // 4)
        for _, h in itertools.islice(reversed(self.sorted), walk):
            if self.key[h] < 0:
                break
            if h != avoid and h not in skip and st.fits(u, h, self.cap_c, self.cap_m):
                return h
        return -1

    def make_room(self, u: Unit, units: list[Unit], unit_on: list[list[int]]) -> int:
        """u fits nowhere: find a host that takes u once one small unit leaves it for a
        third host. Does both moves and returns the host, or -1."""
        st, p = self.st, self.p
        if u.allowed is not None and len(u.allowed) <= 48:
            hosts = list(u.allowed)
        else:  # the 48 roomiest hosts it may use (not all 400 a must_not leaves open)
            a = u.allowed
            hosts = list(
                itertools.islice((h for _, h in reversed(self.sorted) if a is None or h in a), 48)
            )
        best: tuple[int, float, int, int, int] | None = None
        for h in hosts:
            if not p.usable[h]:
                continue
            for i in unit_on[h]:
                v = units[i]
                if v is u or not v.movable or any(st.host_of[g] != h for g in v.members):
                    continue
                # a unit already away from home moves again for free
                extra = 0 if v.cur != h else 1
                size = v.cpu / (p.cpu_total[h] or 1) + v.mem / (p.mem_total[h] or 1)
                if best is not None and (extra, size) >= (best[0], best[1]):
                    continue
                st.lift(v)
                ok = st.fits(u, h, self.cap_c, self.cap_m)
                d = -1
                if ok:
                    st.drop(u, h)
                    d = v.cur if v.cur >= 0 and st.fits(v, v.cur, self.cap_c, self.cap_m) else -1
                    if d < 0 or d == h:
                        d = self.place(v, avoid=h, walk=32)
                    st.lift(u)
                st.drop(v, h)
                if d >= 0:
                    best = (extra - (1 if d == v.cur else 0), size, h, i, d)
        if best is None:
            return -1
        _, _, h, i, d = best
        v = units[i]
        st.lift(v)
        st.drop(v, d)
        unit_on[h].remove(i)
        unit_on[d].append(i)
        st.drop(u, h)
        self.touched(h)
        self.touched(d)
        return h


# --- objectives -------------------------------------------------------------------------


def limit_caps(p: Problem) -> tuple[list[float], list[float]]:
    """Hard caps; a host already above one keeps its current load as its cap for now
    (it may shed guests, it may not take any: verify checks the same rule)."""
    cpu, mem, _ = p.loads(p.cur)
    cap_c = [
        max(p.cpu_cap[h], cpu[h]) if not p.usable[h] else p.cpu_cap[h] for h in range(p.n_hosts)
    ]
    cap_m = [
        max(p.mem_cap[h], mem[h]) if not p.usable[h] else p.mem_cap[h] for h in range(p.n_hosts)
    ]
    return cap_c, cap_m


def balanced_level(p: Problem) -> tuple[float, float]:
    """Per resource, the utilization a perfectly even spread reaches (water filling):
    the demand of the guests on balanced hosts (or free to leave the others) over the
    balanced hosts' capacity, leaving out hosts whose fixed guests alone sit above that
    level (with their load). Unlike ``util_lower_bounds`` it is not raised by such a
    host: the others are still balanced to it."""
    hosts = [
        h
        for h in range(p.n_hosts)
        if p.balanced[h] and (p.usable[h] or p.objective != "power-save")
    ]
    fixed_c = [0.0] * p.n_hosts
    fixed_m = [0.0] * p.n_hosts
    dc = dm = 0.0
    for g in range(p.n_guests):
        h = p.cur[g]
        if not p.balanced[h] and not p.movable[g]:
            continue
        dc += p.cpu[g]
        dm += p.mem[g]
        if not p.movable[g]:
            fixed_c[h] += p.cpu[g]
            fixed_m[h] += p.mem[g]
    return (
        _water_level(dc, [(fixed_c[h], p.cpu_total[h]) for h in hosts]),
        _water_level(dm, [(fixed_m[h], p.mem_total[h]) for h in hosts]),
    )


def _water_level(demand: float, hosts: list[tuple[float, float]]) -> float:
    """The level L with sum over hosts of max(L x capacity, fixed) = demand."""
    level = 0.0
    for _ in range(len(hosts) + 1):
        above = [(f, c) for f, c in hosts if c > 0 and f > level * c + EPS]
        cap = sum(c for f, c in hosts if c > 0) - sum(c for _, c in above)
        rest = demand - sum(f for f, _ in above)
        new = rest / cap if cap > 0 else 0.0
        if abs(new - level) <= 1e-12:
            break
        level = new
    return level


def target_caps(p: Problem, t_cpu: float, t_mem: float) -> tuple[list[float], list[float]]:
    base_c, base_m = limit_caps(p)
    cap_c = [min(base_c[h], t_cpu * p.cpu_total[h]) for h in range(p.n_hosts)]
    cap_m = [min(base_m[h], t_mem * p.mem_total[h]) for h in range(p.n_hosts)]
    return cap_c, cap_m


@dataclass
class Candidate:
    host_of: list[int]
    score: float
    moves: int
    moved_bytes: float
    complete: bool
    label: str


def balance_search(
    p: Problem,
    units: list[Unit],
    unit_of: list[int],
    *,
    max_moves: int,
    max_bytes: float,
    search: bool = True,
    resolution: float = 0.005,
) -> list[Candidate]:
    """Balance without stalling on a plateau, in two stages.

    1. *Shed*: bring every host under the hard limits and do the forced moves, as far as
       room and budget allow (what cannot be fixed stays where it is; the caller names it).
    2. *Water levels*: per resource r a target ``level_r + d_r / weight_r`` for every host
       (level_r: ``balanced_level``), lowered step by step (d halves each time) from the
       state the previous level reached: each level moves units off the hosts above it
       (fewest units first) onto hosts below it, then settles the leftovers by moves and
       swaps, worst host first. Many hosts at the same maximum are no obstacle: a level is
       reached when all of them are under it. When both resources cannot come down
       together, each tries alone; a few failed levels end the walk (a failed level is
       still a candidate: it lowered the hosts it could). One level above the lowest
       reached is then redone from stage 1's state directly, which often needs fewer
       moves than the walk down.

    Returns every result; the caller ranks them (objective, then fewest moves)."""
    walk = _Walk(p, units, unit_of, max_moves, max_bytes)
    shed = walk.shed()
    if search and shed.moves < max_moves:
        walk.prepare(shed)
        walk.finish(walk.down(resolution))
    return walk.out


def quieter(  # noqa: C901 (one swap search, a check per rule it must keep)
    p: Problem, units: list[Unit], host_of: list[int], lb: tuple[float, float]
) -> list[int] | None:
    """``host_of`` with each moved unit that dirties memory (move_extra > 0) swapped, where
    one fits, for a unit still on its source host that moves in less time (move_cost):
    that one moves instead and the dirtying one stays. A swap must leave both hosts within
    their caps (or no further over), neither above the fuller of the two before in any
    weighted resource and no more above the balanced level ``lb`` together: the balance
    is the same or better and the migrations are shorter. The walk's fewest-units and
    best-fit choices look only at size, so of two guests that balance equally they take
    the smaller even when it is the one that will not converge. None when no swap applies
    (always without measured dirty rates)."""
    moved = [
        i
        for i, u in enumerate(units)
        if u.move_extra > 0
        and u.movable
        and not u.must_move
        and not u.anti
        and u.cur >= 0
        and host_of[u.members[0]] != u.cur
        and all(host_of[g] == host_of[u.members[0]] for g in u.members)
    ]
    if not moved:
        return None
    home: dict[int, list[int]] = {}
    for j, u in enumerate(units):
        if u.movable and not u.anti and u.cur >= 0 and all(host_of[g] == u.cur for g in u.members):
            home.setdefault(u.cur, []).append(j)
    for js in home.values():
        js.sort(key=lambda j: units[j].move_cost)
    out = list(host_of)
    cpu, mem, vcpu = p.loads(out)
    _, moved_bytes = moves_and_bytes(p, out)
    max_bytes = float(p.policy.budget.max_bytes)
    lbc, lbm = lb
    changed = False

    def within(h: int, c: float, m: float, v: float) -> bool:
        return (
            c <= max(p.cpu_cap[h], cpu[h]) + EPS
            and m <= max(p.mem_cap[h], mem[h]) + 0.5
            and v <= max(p.vcpu_cap[h], vcpu[h]) + EPS
        )

    def utils(h: int, c: float, m: float) -> tuple[float, float]:
        return c / (p.cpu_total[h] or 1.0), m / (p.mem_total[h] or 1.0)

    def above(uc: float, um: float) -> float:
        return p.w_cpu * max(0.0, uc - lbc) + p.w_mem * max(0.0, um - lbm)

    for i in sorted(moved, key=lambda i: -units[i].move_extra):
        ui = units[i]
        src, dst = ui.cur, out[ui.members[0]]
        for j in home.get(src, []):
            uj = units[j]
            if uj.move_cost >= ui.move_cost:
                break  # the rest take as long or longer
            if len(uj.members) > len(ui.members) or (
                uj.allowed is not None and dst not in uj.allowed
            ):
                continue
            if any(p.soft[g][1] and dst in p.soft[g][0] for g in uj.members):
                continue
            if moved_bytes - ui.mem + uj.mem > max_bytes + 0.5:
                continue
            sc, sm, sv = (
                cpu[src] - uj.cpu + ui.cpu,
                mem[src] - uj.mem + ui.mem,
                vcpu[src] - uj.vcpus + ui.vcpus,
            )
            dc, dm, dv = (
                cpu[dst] - ui.cpu + uj.cpu,
                mem[dst] - ui.mem + uj.mem,
                vcpu[dst] - ui.vcpus + uj.vcpus,
            )
            if not (within(src, sc, sm, sv) and within(dst, dc, dm, dv)):
                continue
            old_s, old_d = utils(src, cpu[src], mem[src]), utils(dst, cpu[dst], mem[dst])
            new_s, new_d = utils(src, sc, sm), utils(dst, dc, dm)
            worse = any(
                w > 0 and max(new_s[r], new_d[r]) > max(old_s[r], old_d[r]) + 1e-9
                for r, w in enumerate((p.w_cpu, p.w_mem))
            )
            if worse or above(*new_s) + above(*new_d) > above(*old_s) + above(*old_d) + 1e-9:
                continue
            for g in ui.members:
                out[g] = src
            for g in uj.members:
                out[g] = dst
            cpu[src], mem[src], vcpu[src] = sc, sm, sv
            cpu[dst], mem[dst], vcpu[dst] = dc, dm, dv
            moved_bytes += uj.mem - ui.mem
            home[src].remove(j)
            changed = True
            break
    return out if changed else None


WALK_FAILS = 3  # failed levels that end the balance walk


class _Walk:
    """The state of one balance search: its candidates, and what stage 1 left fixed."""

    def __init__(
        self, p: Problem, units: list[Unit], unit_of: list[int], max_moves: int, max_bytes: float
    ) -> None:
        self.p, self.units, self.unit_of = p, units, unit_of
        self.max_moves, self.max_bytes = max_moves, max_bytes
        self.out: list[Candidate] = []
        self.frozen: frozenset[int] = frozenset()
        self.closed: frozenset[int] = frozenset()
        self.start: list[int] = p.cur
        self.ok_c: list[float] = []
        self.ok_m: list[float] = []
        self.fix_c = [0.0] * p.n_hosts
        self.fix_m = [0.0] * p.n_hosts
        self.lbc, self.lbm = balanced_level(p)
        self.top = 0.0
        self.fails = 0

    def shed(self) -> RepairResult:
        """Stage 1: the hard limits and the forced moves, as far as possible."""
        p = self.p
        cap_c, cap_m = limit_caps(p)
        shed = repair(
            p,
            self.units,
            self.unit_of,
            cap_c,
            cap_m,
            max_moves=self.max_moves,
            max_bytes=self.max_bytes,
            partial=True,
            settle=True,
        )
        if shed is None:  # partial repairs always return
            raise RuntimeError("internal error: a partial repair returned nothing")
        self.out.append(_candidate(p, shed, "repair"))
        self.ok_c, self.ok_m = cap_c, cap_m
        return shed

    def prepare(self, shed: RepairResult) -> None:
        """What stage 1 leaves fixed: stuck units, hosts still over a limit (closed, their
        reached load is their cap), hosts held above a level by fixed guests alone (that
        load is their floor), and how far the highest host is above the level."""
        p = self.p
        self.start = shed.host_of
        self.frozen, self.closed, self.ok_c, self.ok_m = _after_shed(
            p, self.units, shed.host_of, self.ok_c, self.ok_m
        )
        for i, u in enumerate(self.units):
            if not u.movable or i in self.frozen:
                for g in u.members:
                    self.fix_c[shed.host_of[g]] += p.cpu[g]
                    self.fix_m[shed.host_of[g]] += p.mem[g]
        uc, um = _max_above_fixed(p, shed.host_of, self.fix_c, self.fix_m)
        self.top = max(p.w_cpu * (uc - self.lbc), p.w_mem * (um - self.lbm), 0.0)

    def caps_at(self, dc: float, dm: float) -> tuple[list[float], list[float]]:
        p = self.p
        tc = self.lbc + dc / p.w_cpu if p.w_cpu > 0 else float("inf")
        tm = self.lbm + dm / p.w_mem if p.w_mem > 0 else float("inf")
        return (
            [min(self.ok_c[h], max(tc * p.cpu_total[h], self.fix_c[h])) for h in range(p.n_hosts)],
            [min(self.ok_m[h], max(tm * p.mem_total[h], self.fix_m[h])) for h in range(p.n_hosts)],
        )

    def level(
        self, dc: float, dm: float, start: list[int], label: str, wide: bool = True
    ) -> RepairResult:
        """Every host under the level (dc, dm) from ``start``, as far as it goes."""
        cc, cm = self.caps_at(dc, dm)
        r = repair(
            self.p,
            self.units,
            self.unit_of,
            cc,
            cm,
            max_moves=self.max_moves,
            max_bytes=self.max_bytes,
            partial=True,
            best_fit=False,
            start=start,
            frozen=self.frozen,
            closed=self.closed,
            settle=True,
            wide=wide,
        )
        if r is None:
            raise RuntimeError("internal error: r is None")
        self.out.append(_candidate(self.p, r, f"{label}+{dc:.4f}/{dm:.4f}"))
        return r

    def step(self, dc: float, dm: float, start: list[int]) -> bool:
        if self.fails >= WALK_FAILS:
            return False
        ok = self.level(dc, dm, start, "level").complete
        self.fails += 0 if ok else 1
        return ok

    def down(self, resolution: float) -> tuple[float, float] | None:
        """Joint steps (both resources' slack halves); when one fails, each resource
        alone. Returns the lowest level reached."""
        p = self.p
        reached: tuple[float, float] | None = None
        prev = self.start
        dc = dm = self.top / 2
        while max(dc, dm) >= resolution:
            if self.step(dc, dm, prev):
                reached = (dc, dm)
            elif reached is None:
                break
            elif dc < reached[0] and self.step(dc, reached[1], prev):
                reached = (dc, reached[1])
            elif dm < reached[1] and self.step(reached[0], dm, prev):
                reached = (reached[0], dm)
            else:
                break
            prev = self.out[-1].host_of
            dc, dm = reached[0] / 2, reached[1] / 2
            if dc < resolution / 2 or (p.w_cpu > 0 and self.lbc + dc / p.w_cpu <= self.lbc):
                dc = reached[0]
            if dm < resolution / 2 or (p.w_mem > 0 and self.lbm + dm / p.w_mem <= self.lbm):
                dm = reached[1]
            if (dc, dm) == reached:
                break
        return self.polish(reached, resolution)

    def polish(
        self, reached: tuple[float, float] | None, resolution: float
    ) -> tuple[float, float] | None:
        """After the walk: each resource alone a little further down (halving its slack,
        the other held where it is), from the last level reached, until a level fails.
        The joint walk stops where both cannot come down together, often with one of
        them (memory, on crowded heterogeneous hosts) well above where it alone could go."""
        if reached is None:
            return None
        for r in (1, 0):
            while reached[r] >= resolution:
                trial = (reached[0], reached[1] / 2) if r else (reached[0] / 2, reached[1])
                start = next(c.host_of for c in reversed(self.out) if c.complete)
                if not self.level(*trial, start, "polish").complete:
                    break
                reached = trial
        return reached

    def finish(self, reached: tuple[float, float] | None) -> None:
        top = self.top
        if reached is None:
            # not even halfway (budget, or a plateau the first level cannot clear): the
            # highest hosts still come down as far as the budget allows
            for frac in (0.75, 0.875):
                if self.level(top * frac, top * frac, self.start, "level").complete:
                    break
        elif max(reached) < top / 4 and not self.fails:
            # the walk down moves more guests than going straight to a level from stage
            # 1: redo one level above the lowest reached (within the gap, fewer moves
            # win); a quick look, without the wide settle, which is not worth its time,
            # and only after an easy walk (where a level failed, so does this, slowly)
            self.level(2 * reached[0], 2 * reached[1], self.start, "direct", wide=False)


def _max_above_fixed(
    p: Problem, host_of: list[int], fix_c: list[float], fix_m: list[float]
) -> tuple[float, float]:
    """Highest CPU and memory utilization over balanced hosts that have guests free to
    move beyond their fixed load (a host holding only fixed load cannot come down)."""
    cpu, mem, _ = p.loads(host_of)
    uc = um = 0.0
    for h in range(p.n_hosts):
        if not p.balanced[h]:
            continue
        if cpu[h] > fix_c[h] + EPS:
            uc = max(uc, cpu[h] / p.cpu_total[h])
        if mem[h] > fix_m[h] + 0.5:
            um = max(um, mem[h] / p.mem_total[h])
    return uc, um


def _candidate(p: Problem, r: RepairResult, label: str) -> Candidate:
    return Candidate(
        r.host_of, balance_score(p, r.host_of), r.moves, r.moved_bytes, r.complete, label
    )


def _after_shed(
    p: Problem, units: list[Unit], host_of: list[int], cap_c: list[float], cap_m: list[float]
) -> tuple[frozenset[int], frozenset[int], list[float], list[float]]:
    """After stage 1: units that had to move but could not (they stay, frozen), hosts
    still over a limit (closed: they may only shed, at most to the level they reached)
    and the caps that follow (a host over a limit keeps its reached load as its cap)."""
    frozen = frozenset(
        i
        for i, u in enumerate(units)
        if u.must_move and u.movable and u.cur >= 0 and host_of[u.members[0]] == u.cur
    )
    cpu, mem, _ = p.loads(host_of)
    ok_c = [max(cap_c[h], cpu[h]) for h in range(p.n_hosts)]
    ok_m = [max(cap_m[h], mem[h]) for h in range(p.n_hosts)]
    closed = frozenset(
        h for h in range(p.n_hosts) if cpu[h] > cap_c[h] + EPS or mem[h] > cap_m[h] + 0.5
    )
    return frozen, closed, ok_c, ok_m


def consolidate(  # noqa: C901 (the power-save greedy: empty, place, verify per host)
    p: Problem, units: list[Unit], start: list[int], *, max_moves: int, max_bytes: float
) -> Candidate:
    """Power-save: empty hosts one at a time (costliest, then least loaded first) into the
    other active hosts, best fit, within the hard limits and the budget."""
    cap_c, cap_m = limit_caps(p)
    st = State(p, units, start)
    moves, moved_bytes = moves_and_bytes(p, start)
    unit_on: list[list[int]] = [[] for _ in range(p.n_hosts)]
    for i, u in enumerate(units):
        hs = {st.host_of[g] for g in u.members}
        if len(hs) == 1:
            unit_on[next(iter(hs))].append(i)
    active = {h for h in range(p.n_hosts) if unit_on[h]}
    min_active = p.policy.power.min_active_hosts

    def load_frac(h: int) -> float:
        return st.cpu[h] / (p.cpu_total[h] or 1) + st.mem[h] / (p.mem_total[h] or 1)

    order = sorted(
        (h for h in active if p.balanced[h] or p.usable[h]),
        key=lambda h: (-power_weight(p, h), p.mem_total[h] + p.cpu_total[h] * GIB_F, load_frac(h)),
    )
    closed: set[int] = set()
    for h in order:
        if len(active) <= min_active:
            break
        us = unit_on[h]
        if any(not units[i].movable for i in us):
            continue
        dn = sum(1 for i in us for g in units[i].members if p.cur[g] == h)
        db = sum(units[i].mem_bytes for i in us)
        if moves + dn > max_moves or moved_bytes + db > max_bytes:
            continue
        for i in us:
            st.lift(units[i])
        placed: list[tuple[int, int]] = []
        ok = True
        for i in sorted(us, key=lambda i: -(units[i].cpu + units[i].mem / GIB_F)):
            u = units[i]
            best = -1
            best_room = float("inf")
            for d in active:
                if d == h or d in closed:
                    continue
                if st.fits(u, d, cap_c, cap_m):
                    room = min(
                        (cap_c[d] - st.cpu[d]) / (p.cpu_total[d] or 1),
                        (cap_m[d] - st.mem[d]) / (p.mem_total[d] or 1),
                    )
                    if room < best_room:
                        best, best_room = d, room
            if best < 0:
                ok = False
                break
            st.drop(u, best)
            placed.append((i, best))
        if not ok:
            for i, _ in placed:
                st.lift(units[i])
            for i in us:
                if all(st.host_of[g] == -1 for g in units[i].members):
                    st.drop(units[i], h)
            continue
        for i, d in placed:
            unit_on[d].append(i)
        unit_on[h] = []
        active.discard(h)
        closed.add(h)
        moves, moved_bytes = moves_and_bytes(p, st.host_of)
    return Candidate(
        st.host_of, power_score(p, st.host_of), moves, moved_bytes, True, "consolidate"
    )
