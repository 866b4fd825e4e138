"""Target placement -> ordered, capacity-safe migration steps in waves.

Accounting (the rule every prefix is checked against): a guest being migrated occupies
BOTH hosts — its CPU, memory and vCPUs are reserved on the destination when the step
starts and released on the source only when the step ends. Steps of one wave run
together; a wave starts when the previous one has ended. Hence every prefix of the plan
(any set of finished waves plus any subset of the running one) keeps each destination
within its hard limits, and anti-affinity holds continuously: a guest never lands on a
host where a member of its group still is, or is arriving.

Swaps and cycles (A needs B's room while B needs A's) are broken through a staging host
with room: the guest goes there first and on to its target in a later wave (one extra
step). A move that cannot be ordered safely at all is left out and the plan says so; its
``target`` is then the placement the steps really reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from balancerd.model import Move, Placement, Plan, Snapshot, SolverReport
from balancerd.policy.model import Migration, Policy
from balancerd.predict import link_of, predict
from balancerd.solve.problem import HostCapacity, Problem, build_problem, power_weight


def expected_seconds(mem_bytes: int, dirty_rate_bytes_s: float | None, m: Migration) -> float:
    """The predicted migration time (predict.py: the pre-copy series; a guest that does not
    converge ends by on_stall), capped by max_time_s. Unknown dirty rate counts as none."""
    return predict(mem_bytes, dirty_rate_bytes_s, link_of(m)).seconds


@dataclass
class _Step:
    vm: int
    src: int
    dst: int
    final_dst: int  # differs from dst when staged
    done: bool = False


RESORT_SHARE = 0.05  # re-rank the pending steps when this share of them has finished


def order_moves(
    snapshot: Snapshot,
    policy: Policy,
    current: Placement,
    target: Placement,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    problem: Problem | None = None,
    uncounted_sources: frozenset[str] = frozenset(),
) -> tuple[tuple[Move, ...], Placement, tuple[str, ...]]:
    """The steps, the placement they reach, and notes (staging, left-out moves).
    Steps out of ``uncounted_sources`` (e.g. a pool of guests waiting to start) do not
    count against the per-host concurrency of their source."""
    p = problem or build_problem(snapshot, policy, capacity=capacity)
    o = _Orderer(p, snapshot, policy, uncounted_sources)
    o.add_steps(current, target)
    while o.n_pending > 0:
        running = o.next_wave()
        if running:
            o.finish(running)
            continue
        if not o.stage():
            o.leave_out_the_rest()
            break
    return o.result()


class _Orderer:
    """Reserved loads (a step holds its guest on both hosts while it runs), anti-affinity
    occupancy, and the pending steps, ranked: first the moves that free room others wait
    for, then those of the hosts with the longest queues (they bound the number of waves),
    then the longest predicted migrations (a wave lasts as long as its longest step: long
    steps share waves, short ones do not wait behind them). The ranking is refreshed
    whenever a twentieth of the steps has finished (or no wave could be formed), not after
    every wave: plans of thousands of moves are ordered in about linear time."""

    def __init__(
        self, p: Problem, snapshot: Snapshot, policy: Policy, uncounted: frozenset[str]
    ) -> None:
        self.p = p
        self.mig = policy.migration
        self.per_host_limit = max(1, self.mig.max_concurrent_per_host)
        self.wave_limit = max(1, self.mig.max_concurrent)
        self.vms = {v.name: v for v in snapshot.vms}
        self.notes: list[str] = []
        self.cpu, self.mem, self.vcpu = p.loads(p.cur)
        self.anti_of: dict[int, list[int]] = {}
        self.occupied: list[dict[int, int]] = [{} for _ in p.anti]  # group -> host -> count
        for gid, grp in enumerate(p.anti):
            for g in grp:
                self.anti_of.setdefault(g, []).append(gid)
                self.occupied[gid][p.cur[g]] = self.occupied[gid].get(p.cur[g], 0) + 1
        self.free_src = {p.host_index[n] for n in uncounted if n in p.host_index}
        self.pending: list[_Step] = []
        self.n_pending = 0
        self.ranked_at = -1  # n_pending when the ranking was last refreshed
        self.staged_vms: set[int] = set()  # each guest is staged at most once: it ends
        self.staged = 0
        self.moves: list[Move] = []
        self.reached = list(p.cur)
        self.wave = 0

    def add_steps(self, current: Placement, target: Placement) -> None:
        p = self.p
        for vm, (_, dst) in target.moved_from(current).items():
            gi = p.guest_index.get(vm)
            if gi is None or dst not in p.host_index:
                self.notes.append(f"{vm}: unknown guest or host; left out")
                continue
            h = p.host_index[dst]
            self.pending.append(_Step(gi, p.cur[gi], h, h))
        self.n_pending = len(self.pending)

    def fits(self, g: int, h: int) -> bool:
        p = self.p
        if self.cpu[h] + p.cpu[g] > max(p.cpu_cap[h], 0.0) + 1e-9:
            return False
        if self.mem[h] + p.mem[g] > p.mem_cap[h] + 0.5 or self.vcpu[h] + p.vcpus[g] > p.vcpu_cap[h]:
            return False
        return all(self.occupied[gid].get(h, 0) == 0 for gid in self.anti_of.get(g, ()))

    def reserve(self, g: int, h: int, sign: int) -> None:
        p = self.p
        self.cpu[h] += sign * p.cpu[g]
        self.mem[h] += sign * p.mem[g]
        self.vcpu[h] += sign * p.vcpus[g]
        for gid in self.anti_of.get(g, ()):
            self.occupied[gid][h] = self.occupied[gid].get(h, 0) + sign

    def rank(self) -> None:
        """Drop finished steps and order the rest (see the class docstring)."""
        self.pending = [s for s in self.pending if not s.done]
        awaited = {t.dst for t in self.pending}
        queue: dict[int, int] = {}
        for t in self.pending:
            queue[t.src] = queue.get(t.src, 0) + 1
            queue[t.dst] = queue.get(t.dst, 0) + 1
        secs = self.p.move_s  # predicted duration: long steps share waves, short ones too
        self.pending.sort(
            key=lambda s: (s.src not in awaited, -max(queue[s.src], queue[s.dst]), -secs[s.vm])
        )
        self.ranked_at = self.n_pending

    def next_wave(self) -> list[_Step]:
        """Steps that may start together now, best ranked first; each reserves its
        destination at once."""
        if self.ranked_at < 0 or self.n_pending <= self.ranked_at * (1 - RESORT_SHARE):
            self.rank()
        running = self._fill()
        if not running and self.ranked_at != self.n_pending:
            self.rank()  # a stale ranking may hide a step that can start
            running = self._fill()
        return running

    def _fill(self) -> list[_Step]:
        busy: dict[int, int] = {}
        running: list[_Step] = []
        for s in self.pending:
            if len(running) >= self.wave_limit:
                break
            if s.done or busy.get(s.dst, 0) >= self.per_host_limit:
                continue
            if s.src not in self.free_src and busy.get(s.src, 0) >= self.per_host_limit:
                continue
            if not self.fits(s.vm, s.dst):
                continue
            self.reserve(s.vm, s.dst, +1)
            busy[s.src] = busy.get(s.src, 0) + 1
            busy[s.dst] = busy.get(s.dst, 0) + 1
            running.append(s)
        return running

    def finish(self, running: list[_Step]) -> None:
        """The wave ends: sources are released, moves recorded, staged guests go on."""
        p = self.p
        for s in running:
            s.done = True
            self.n_pending -= 1
            self.reserve(s.vm, s.src, -1)
            self.reached[s.vm] = s.dst
            v = self.vms[p.guests[s.vm]]
            self.moves.append(
                Move(
                    vm=v.name,
                    src=p.hosts[s.src],
                    dst=p.hosts[s.dst],
                    mem_bytes=v.mem_bytes,
                    expected_s=p.move_s[s.vm],
                    wave=self.wave,
                )
            )
            if s.dst != s.final_dst:
                self.pending.append(_Step(s.vm, s.dst, s.final_dst, s.final_dst))
                self.n_pending += 1
        self.wave += 1

    def stage(self) -> bool:
        """Deadlock: send the smallest blocked guest to the roomiest host that takes it
        (on to its target in a later wave)."""
        p = self.p
        for s in sorted((s for s in self.pending if not s.done), key=lambda s: p.mem[s.vm]):
            if s.dst != s.final_dst or s.vm in self.staged_vms:
                continue
            best = -1
            best_room = -1e18
            for h in range(p.n_hosts):
                if h in (s.src, s.final_dst) or not p.can_host(s.vm, h) or not self.fits(s.vm, h):
                    continue
                room = min(
                    (p.mem_cap[h] - self.mem[h]) / (p.mem_total[h] or 1.0),
                    (p.cpu_cap[h] - self.cpu[h]) / (p.cpu_total[h] or 1.0),
                )
                if room > best_room:
                    best, best_room = h, room
            if best >= 0:
                s.dst = best
                self.staged_vms.add(s.vm)
                self.staged += 1
                self.notes.append(
                    f"{p.guests[s.vm]} staged through {p.hosts[best]} on its way to "
                    f"{p.hosts[s.final_dst]}"
                )
                self.ranked_at = -1
                return True
        return False

    def leave_out_the_rest(self) -> None:
        p = self.p
        for t in self.pending:
            if not t.done:
                self.notes.append(
                    f"{p.guests[t.vm]}: {p.hosts[t.src]} -> {p.hosts[t.final_dst]} cannot be "
                    "ordered safely (no room on the way, no staging host); left out"
                )
        self.pending = []

    def result(self) -> tuple[tuple[Move, ...], Placement, tuple[str, ...]]:
        p = self.p
        if self.staged:
            self.notes.append(f"{self.staged} swap(s)/cycle(s) broken through a staging host")
        placement = Placement({p.guests[g]: p.hosts[self.reached[g]] for g in range(p.n_guests)})
        return tuple(self.moves), placement, tuple(self.notes)


def power_changes(p: Problem, target: Placement) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(power_off, power_on) for the target: powered-off hosts it uses go on; in
    power-save, hosts left empty go off beyond the reserve and min_active_hosts."""
    used = {p.host_index[h] for h in target.host_of.values() if h in p.host_index}
    power_on = tuple(p.hosts[h] for h in sorted(used) if p.powered_off[h])
    if p.objective != "power-save":
        return (), power_on
    pw = p.policy.power
    maint = set(p.policy.constraints.maintenance)
    empty = [
        h for h in range(p.n_hosts) if p.balanced[h] and h not in used and p.hosts[h] not in maint
    ]
    # the cheapest empty hosts stay on: up to min_active_hosts, then the reserve on top
    empty.sort(key=lambda h: power_weight(p, h))
    keep = max(pw.min_active_hosts - len(used), 0) + max(pw.reserve_hosts, 0)
    return tuple(p.hosts[h] for h in sorted(empty[keep:])), power_on


def make_plan(
    snapshot: Snapshot,
    policy: Policy,
    target: Placement,
    solver: SolverReport,
    *,
    capacity: Mapping[str, HostCapacity] | None = None,
    score_before: float | None = None,
    score_after: float | None = None,
    notes: tuple[str, ...] = (),
    problem: Problem | None = None,
    uncounted_sources: frozenset[str] = frozenset(),
) -> Plan:
    p = problem or build_problem(snapshot, policy, capacity=capacity)
    current = Placement({p.guests[g]: p.hosts[p.cur[g]] for g in range(p.n_guests)})
    moves, reached, order_notes = order_moves(
        snapshot,
        policy,
        current,
        target,
        capacity=capacity,
        problem=p,
        uncounted_sources=uncounted_sources,
    )
    power_off, power_on = power_changes(p, reached)
    extra: tuple[str, ...] = ()
    if dict(reached.host_of) != dict(target.host_of):
        # only part of the target is reachable safely: say what the reached state breaks
        from balancerd.solve.verify import verify

        extra = tuple(
            f"reached placement: {v}"
            for v in verify(snapshot, policy, reached, capacity=capacity, current=current)
        )
    return Plan(
        policy=policy.name,
        objective=policy.objective,
        moves=moves,
        current=current,
        target=reached,
        solver=solver,
        score_before=score_before,
        score_after=score_after,
        power_off=power_off,
        power_on=power_on,
        reason="" if moves else "target equals the current placement",
        notes=tuple(notes) + order_notes + extra,
    )


def total_seconds(plan: Plan) -> float:
    """Wall time of the plan: waves one after another, each as long as its longest step."""
    longest: dict[int, float] = {}
    for m in plan.moves:
        longest[m.wave] = max(longest.get(m.wave, 0.0), m.expected_s)
    return sum(longest.values())
