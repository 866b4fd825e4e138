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
from balancerd.solve.problem import HostCapacity, Problem, build_problem, power_weight
from balancerd.units import MIB


def expected_seconds(mem_bytes: int, dirty_rate_bytes_s: float | None, m: Migration) -> float:
    """Pre-copy estimate: memory / (bandwidth - dirty rate), plus 1 s setup. A dirty rate
    near or above the bandwidth only converges through throttling: count five passes,
    capped by the migration's max_time_s. Unknown dirty rate counts as none."""
    bw = max(m.bandwidth_mib_s, 1e-3) * MIB
    dirty = dirty_rate_bytes_s or 0.0
    seconds = mem_bytes / (bw - dirty) if dirty < 0.8 * bw else 5.0 * mem_bytes / bw
    return min(1.0 + seconds, m.max_time_s)


@dataclass
class _Step:
    vm: int
    src: int
    dst: int
    final_dst: int  # differs from dst when staged


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
    mig = policy.migration
    per_host_limit = max(1, mig.max_concurrent_per_host)
    wave_limit = max(1, mig.max_concurrent)
    vms = {v.name: v for v in snapshot.vms}
    notes: list[str] = []
    cpu, mem, vcpu = p.loads(p.cur)
    anti_of: dict[int, list[int]] = {}
    for gid, grp in enumerate(p.anti):
        for g in grp:
            anti_of.setdefault(g, []).append(gid)
    occupied: list[dict[int, int]] = [{} for _ in p.anti]  # group -> host -> members there
    for gid, grp in enumerate(p.anti):
        for g in grp:
            occupied[gid][p.cur[g]] = occupied[gid].get(p.cur[g], 0) + 1

    pending: list[_Step] = []
    for vm, (_, dst) in target.moved_from(current).items():
        gi = p.guest_index.get(vm)
        if gi is None or dst not in p.host_index:
            notes.append(f"{vm}: unknown guest or host; left out")
            continue
        h = p.host_index[dst]
        pending.append(_Step(gi, p.cur[gi], h, h))

    def fits(g: int, h: int) -> bool:
        if cpu[h] + p.cpu[g] > max(p.cpu_cap[h], 0.0) + 1e-9:
            return False
        if mem[h] + p.mem[g] > p.mem_cap[h] + 0.5 or vcpu[h] + p.vcpus[g] > p.vcpu_cap[h]:
            return False
        return all(occupied[gid].get(h, 0) == 0 for gid in anti_of.get(g, ()))

    def reserve(g: int, h: int, sign: int) -> None:
        cpu[h] += sign * p.cpu[g]
        mem[h] += sign * p.mem[g]
        vcpu[h] += sign * p.vcpus[g]
        for gid in anti_of.get(g, ()):
            occupied[gid][h] = occupied[gid].get(h, 0) + sign

    staged_vms: set[int] = set()  # each guest is staged at most once: the loop ends

    def stage() -> _Step | None:
        """Deadlock: send the smallest blocked guest to the roomiest host that takes it."""
        for s in sorted(pending, key=lambda s: p.mem[s.vm]):
            if s.dst != s.final_dst or s.vm in staged_vms:
                continue
            best = -1
            best_room = -1e18
            for h in range(p.n_hosts):
                if h in (s.src, s.final_dst) or not p.can_host(s.vm, h) or not fits(s.vm, h):
                    continue
                room = min(
                    (p.mem_cap[h] - mem[h]) / (p.mem_total[h] or 1.0),
                    (p.cpu_cap[h] - cpu[h]) / (p.cpu_total[h] or 1.0),
                )
                if room > best_room:
                    best, best_room = h, room
            if best >= 0:
                s.dst = best
                staged_vms.add(s.vm)
                return s
        return None

    free_src = {p.host_index[n] for n in uncounted_sources if n in p.host_index}
    moves: list[Move] = []
    reached = list(p.cur)
    wave = 0
    staged = 0
    while pending:
        # moves that free room others wait for, then the long ones, go first
        # first the moves that free room others wait for, then those of the hosts with
        # the longest queue (they bound the number of waves), then the long ones
        awaited = {t.dst for t in pending}
        queue: dict[int, int] = {}
        for t in pending:
            queue[t.src] = queue.get(t.src, 0) + 1
            queue[t.dst] = queue.get(t.dst, 0) + 1
        pending.sort(
            key=lambda s: (
                s.src not in awaited,
                -max(queue[s.src], queue[s.dst]),
                -p.mem[s.vm],
            )
        )
        busy: dict[int, int] = {}
        running: list[_Step] = []
        for s in pending:
            if len(running) >= wave_limit:
                break
            if busy.get(s.dst, 0) >= per_host_limit or (
                s.src not in free_src and busy.get(s.src, 0) >= per_host_limit
            ):
                continue
            if not fits(s.vm, s.dst):
                continue
            reserve(s.vm, s.dst, +1)
            busy[s.src] = busy.get(s.src, 0) + 1
            busy[s.dst] = busy.get(s.dst, 0) + 1
            running.append(s)
        if not running:
            staged_step = stage()
            if staged_step is None:
                for t in pending:
                    notes.append(
                        f"{p.guests[t.vm]}: {p.hosts[t.src]} -> {p.hosts[t.final_dst]} cannot be "
                        "ordered safely (no room on the way, no staging host); left out"
                    )
                break
            staged += 1
            notes.append(
                f"{p.guests[staged_step.vm]} staged through {p.hosts[staged_step.dst]} on its "
                f"way to {p.hosts[staged_step.final_dst]}"
            )
            continue
        running_ids = {id(s) for s in running}
        pending = [s for s in pending if id(s) not in running_ids]
        for s in running:
            reserve(s.vm, s.src, -1)
            reached[s.vm] = s.dst
            v = vms[p.guests[s.vm]]
            moves.append(
                Move(
                    vm=v.name,
                    src=p.hosts[s.src],
                    dst=p.hosts[s.dst],
                    mem_bytes=v.mem_bytes,
                    expected_s=expected_seconds(v.mem_bytes, v.dirty_rate_bytes_s, mig),
                    wave=wave,
                )
            )
            if s.dst != s.final_dst:
                pending.append(_Step(s.vm, s.dst, s.final_dst, s.final_dst))
        wave += 1
    if staged:
        notes.append(f"{staged} swap(s)/cycle(s) broken through a staging host")
    placement = Placement({p.guests[g]: p.hosts[reached[g]] for g in range(p.n_guests)})
    return tuple(moves), placement, tuple(notes)


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
