"""Fast greedy stages: repair to per-host targets with few moves, balance by searching the
lowest reachable target, and power-save consolidation. They give the ILP its incumbent and
carry the large instances alone when the ILP has no time left.

Guests of one affinity group move together as one *unit*.
"""

from __future__ import annotations

import bisect
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


def build_units(p: Problem) -> tuple[list[Unit], list[int]]:
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
            )
        )
        for g in members:
            unit_of[g] = len(units) - 1
    return units, unit_of


class State:
    """Host loads and anti-affinity counts under a changing guest -> host map."""

    def __init__(self, p: Problem, units: list[Unit], host_of: list[int]) -> None:
        self.p = p
        self.units = units
        self.host_of = list(host_of)
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
    left = list(cands)
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
) -> RepairResult | None:
    """Move as few units as it can so every balanced host is under cap_c / cap_m and every
    forced move is done. ``partial``: within the budget, do what fits and keep the rest
    where it is (complete=False); otherwise None when it cannot finish."""
    st = State(p, units, p.cur)
    unit_on: list[list[int]] = [[] for _ in range(p.n_hosts)]
    for i, u in enumerate(units):
        if u.cur >= 0:
            unit_on[u.cur].append(i)
    forced: list[int] = [i for i, u in enumerate(units) if u.must_move and u.movable]
    chosen = set(forced)
    # a second member of an anti-affinity group on one host must leave
    for grp in p.anti:
        seen: set[int] = set()
        for g in sorted(grp, key=lambda g: p.cpu[g] + p.mem[g] / GIB_F):
            h = p.cur[g]
            if h in seen:
                i = unit_of[g]
                if units[i].movable and i not in chosen:
                    forced.append(i)
                    chosen.add(i)
            else:
                seen.add(h)
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
        cands = [i for i in unit_on[h] if i not in chosen and units[i].movable]
        pick = _pick_evictions(p, units, cands, ec, em, h)
        excess = max(ec / (p.cpu_total[h] or 1.0), em / (p.mem_total[h] or 1.0))
        by_host.append((excess, pick))
        chosen.update(pick)
    order = list(forced)
    by_host.sort(key=lambda t: -t[0])
    for _, pick in by_host:
        order.extend(pick)
    # budget
    n = 0
    b = 0.0
    kept: list[int] = []
    complete = True
    for i in order:
        u = units[i]
        dn = len(u.members)
        if n + dn > max_moves or b + u.mem_bytes > max_bytes:
            if not partial:
                return None
            complete = False
            continue
        n += dn
        b += u.mem_bytes
        kept.append(i)
    for i in kept:
        st.lift(units[i])
    avg_c, avg_m = _avg(p.cpu_total), _avg(p.mem_total)
    kept.sort(key=lambda i: -(units[i].cpu / avg_c + units[i].mem / avg_m))
    placer = _Placer(p, st, cap_c, cap_m, best_fit)
    misses = 0
    for i in kept:
        u = units[i]
        h = placer.place(u)
        if h >= 0:
            st.drop(u, h)
            placer.touched(h)
        elif (partial or misses < max(20, len(kept) // 8)) and placer.make_room(
            u, units, unit_on
        ) >= 0:
            misses += 1
        elif not partial or u.cur < 0:
            return None
        else:
            st.drop(u, u.cur)  # stays where it is: carried, reported by verify
            complete = False
        h = st.host_of[u.members[0]]
        if u.cur >= 0 and u.cur != h:
            unit_on[u.cur].remove(i)
            unit_on[h].append(i)
    # a guest whose home has room again goes back (one move fewer)
    for i in kept:
        u = units[i]
        h = st.host_of[u.members[0]]
        if u.cur >= 0 and h != u.cur:
            st.lift(u)
            st.drop(u, u.cur if st.fits(u, u.cur, cap_c, cap_m) else h)
    moves, moved_bytes = moves_and_bytes(p, st.host_of)
    return RepairResult(st.host_of, moves, moved_bytes, complete)


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
            return -1
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
        hosts = (
            list(u.allowed)
            if u.allowed is not None
            else [h for _, h in itertools.islice(reversed(self.sorted), 48)]
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
    steps: int = 5,
    resolution: float = 0.0005,
    search: bool = True,
) -> list[Candidate]:
    """Repair to the hard limits, then search the lowest target (above the LP bound) the
    greedy repair reaches within the budget. Returns every result found."""
    out: list[Candidate] = []
    cap_c, cap_m = limit_caps(p)
    base = repair(
        p, units, unit_of, cap_c, cap_m, max_moves=max_moves, max_bytes=max_bytes, partial=True
    )
    if base is None:
        return out
    out.append(
        Candidate(
            base.host_of,
            balance_score(p, base.host_of),
            base.moves,
            base.moved_bytes,
            base.complete,
            "repair",
        )
    )
    if not base.complete or not search:
        return out
    lbc, lbm = util_lower_bounds(p)
    wc, wm = p.w_cpu, p.w_mem
    lb = max(wc * lbc, wm * lbm)
    top = max(out[0].score - lb, 0.0)

    def attempt(delta: float) -> bool:
        # every resource under the same weighted target: bound + delta (weight 0: limits)
        tc = (lb + delta) / wc if wc > 0 else 1e9
        tm = (lb + delta) / wm if wm > 0 else 1e9
        cc, cm = target_caps(p, tc, tm)
        # least room first, exact on the scarcer resource: packs tight targets
        r = repair(
            p,
            units,
            unit_of,
            cc,
            cm,
            max_moves=max_moves,
            max_bytes=max_bytes,
            partial=False,
            best_fit=True,
        )
        if r is None:
            return False
        out.append(
            Candidate(
                r.host_of,
                balance_score(p, r.host_of),
                r.moves,
                r.moved_bytes,
                True,
                f"target+{delta:.4f}",
            )
        )
        return True

    # find a reachable target near the bound (doubling from 1 point), then bisect down
    lo, hi = 0.0, min(0.01, top)
    while hi < top and not attempt(hi):
        lo, hi = hi, min(2 * hi, top)
    for _ in range(steps):
        if hi - lo < resolution:
            break
        mid = (lo + hi) / 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    # a few looser targets too: fewer moves, or room to honour soft rules
    for frac in (0.5, 0.25, 0.125):
        if top * frac > 2 * hi:
            attempt(top * frac)
    return out


def consolidate(
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
