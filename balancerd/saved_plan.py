"""Approving a plan: ``plan --save FILE`` writes a plan with the snapshot facts it was
computed from; ``apply --plan FILE`` / ``apply --latest`` execute exactly its moves after
checking that each is still valid. Pure: documents and snapshots in, checks out.

A step is still valid when its guest runs on the step's source (the same guest: same UUID),
the destination answers and the active policy (with the operator's drains) lets it take
the guest, and the destination has room under the policy's limits with the valid steps
before it applied (a step reserves room on its destination when its wave starts and frees
its source when the wave ends: the planner's own accounting). A stale step is skipped
with its reason; the others run as planned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from balancerd.errors import ConfigError
from balancerd.execute.move import MoveResult
from balancerd.model import Move, Placement, Plan, Snapshot, SolverReport
from balancerd.outcomes import MigrationMode, MoveOutcome, SkipKind
from balancerd.policy.model import Policy
from balancerd.rationale import MoveWhy
from balancerd.solve.problem import build_problem
from balancerd.units import GIB

KIND = "balancerd-plan"
VERSION = 1
MAX_FILE_BYTES = 64 * 1024 * 1024


def plan_document(
    plan: Plan,
    snapshot: Snapshot,
    policy: Policy,
    whys: Sequence[MoveWhy],
    *,
    created_at_s: float,
    drained: Sequence[str] = (),
    source: str = "plan",
) -> dict[str, Any]:
    """The saved form of ``plan``: its moves with reasons, benefit and cost, and the
    snapshot it was computed from (``snapshot``: what the hosts ran)."""
    uuids = {v.name: v.uuid for v in snapshot.vms}
    usage = snapshot.host_usage()
    s = plan.solver
    return {
        "kind": KIND,
        "version": VERSION,
        "source": source,
        "created_at": datetime.fromtimestamp(created_at_s)
        .astimezone()
        .isoformat(timespec="seconds"),
        "created_at_s": created_at_s,
        "policy": plan.policy,
        "objective": plan.objective,
        "mode": str(policy.mode),
        "policy_file": policy.source,
        "drained": list(drained),
        "score_before": plan.score_before,
        "score_after": plan.score_after,
        "reason": plan.reason,
        "notes": list(plan.notes),
        "solver": {
            "backend": s.backend,
            "status": s.status,
            "seconds": round(s.seconds, 3),
            "objective": s.objective,
            "bound": s.bound,
            "gap": s.gap,
        },
        "moves": [
            {
                **w.to_json(),
                "uuid": uuids.get(w.vm, ""),
                "mem_bytes": w.mem_bytes,
                "expected_s": round(w.expected_s, 2),
            }
            for w in whys
        ],
        "snapshot": {
            "taken_at_s": snapshot.taken_at_s,
            "hosts": [
                {
                    "name": h.name,
                    "up": h.up,
                    "cpus": h.cpus,
                    "mem_bytes": h.mem_bytes,
                    "mem_free_bytes": h.mem_free_bytes,
                    "cpu_util": round(h.cpu_util, 4),
                    "guest_cpu_util": round(usage.get(h.name, (0.0, 0.0))[0], 4),
                    "guest_mem_util": round(usage.get(h.name, (0.0, 0.0))[1], 4),
                }
                for h in snapshot.hosts
            ],
            "vms": [
                {
                    "name": v.name,
                    "uuid": v.uuid,
                    "host": v.host,
                    "state": v.state,
                    "vcpus": v.vcpus,
                    "mem_bytes": v.mem_bytes,
                    "cpu_util": round(v.cpu_util, 4),
                }
                for v in snapshot.vms
            ],
        },
    }


@dataclass(frozen=True)
class SavedMove:
    vm: str
    uuid: str
    src: str
    dst: str
    wave: int
    mem_bytes: int
    expected_s: float
    why: MoveWhy
    offline: bool = False  # a stopped guest's definition


@dataclass(frozen=True)
class SavedPlan:
    doc: Mapping[str, Any]
    moves: tuple[SavedMove, ...]

    @property
    def policy(self) -> str:
        return str(self.doc.get("policy", ""))

    @property
    def created_at_s(self) -> float:
        return float(self.doc.get("created_at_s", 0.0))

    def as_plan(self) -> Plan:
        """The plan's summary as a ``Plan`` (for the history)."""
        solver = dict(self.doc.get("solver") or {})
        return Plan(
            policy=self.policy,
            objective=str(self.doc.get("objective", "balance")),
            moves=tuple(
                Move(m.vm, m.src, m.dst, m.mem_bytes, m.expected_s, m.wave, m.offline)
                for m in self.moves
            ),
            current=Placement({}),
            target=Placement({}),
            solver=SolverReport(
                str(solver.get("backend", "none")),
                str(solver.get("status", "not-run")),
                float(solver.get("seconds", 0.0)),
                solver.get("objective"),
                solver.get("bound"),
                solver.get("gap"),
            ),
            score_before=self.doc.get("score_before"),
            score_after=self.doc.get("score_after"),
            reason=str(self.doc.get("reason", "")),
            notes=tuple(str(n) for n in self.doc.get("notes", ())),
        )


def read_plan_file(path: str | Path) -> SavedPlan:
    """Load a file written by ``plan --save``; raises ConfigError (exit 2) if it is not one."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError([f"{p}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB"])
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read the plan: {exc.strerror or exc}"]) from None
    except ValueError as exc:
        raise ConfigError([f"{p}: not a saved plan (invalid JSON: {exc})"]) from None
    return parse_plan(data, str(p))


def parse_plan(data: Any, source: str) -> SavedPlan:
    """A saved plan from its JSON; ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: not a saved plan (expected a JSON object)"])
    if data.get("kind") != KIND:
        problems.append(f"{source}: kind: expected '{KIND}' (a file written by plan --save)")
    if data.get("version") != VERSION:
        problems.append(f"{source}: version: expected {VERSION}, got {data.get('version')!r}")
    raw = data.get("moves")
    if not isinstance(raw, list):
        problems.append(f"{source}: moves: expected a list")
        raw = []
    moves: list[SavedMove] = []
    for i, m in enumerate(raw):
        where = f"{source}: moves[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where}: expected an object")
            continue
        bad = [k for k in ("vm", "from", "to") if not isinstance(m.get(k), str) or not m.get(k)]
        if bad:
            problems.append(f"{where}: missing or empty {', '.join(bad)}")
            continue
        try:
            mem_bytes = int(m.get("mem_bytes", 0))
            expected_s = float(m.get("expected_s", 0.0))
            wave = int(m.get("wave", 0))
            why = move_why_from_json(m)
        except (TypeError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        moves.append(
            SavedMove(
                m["vm"],
                str(m.get("uuid", "")),
                m["from"],
                m["to"],
                wave,
                mem_bytes,
                expected_s,
                why,
                offline=m.get("offline") is True,
            )
        )
    if problems:
        raise ConfigError(problems)
    return SavedPlan(data, tuple(moves))


def move_why_from_json(m: Mapping[str, Any]) -> MoveWhy:
    cost = dict(m.get("cost") or {})
    src_util = dict(m.get("src_util") or {})
    dst_util = dict(m.get("dst_util_after") or {})
    before, after = m.get("score_before"), m.get("score_after")
    return MoveWhy(
        offline=m.get("offline") is True,
        vm=str(m["vm"]),
        src=str(m["from"]),
        dst=str(m["to"]),
        wave=int(m.get("wave", 0)),
        why=str(m.get("why", "")),
        mem_bytes=int(m.get("mem_bytes", cost.get("mem_bytes", 0))),
        expected_s=float(m.get("expected_s", cost.get("expected_s", 0.0))),
        downtime_ms=float(cost.get("downtime_ms", 0.0)),
        downtime_note=str(cost.get("downtime_note", "live")),
        score_before=None if before is None else float(before),
        score_after=None if after is None else float(after),
        src_cpu_util=float(src_util.get("cpu", 0.0)),
        src_mem_util=float(src_util.get("mem", 0.0)),
        dst_cpu_util=float(dst_util.get("cpu", 0.0)),
        dst_mem_util=float(dst_util.get("mem", 0.0)),
    )


@dataclass(frozen=True)
class StepCheck:
    move: SavedMove
    kind: SkipKind | None  # None: still valid
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.kind is None

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.move.vm,
            "from": self.move.src,
            "to": self.move.dst,
            "valid": self.ok,
            "skip_kind": None if self.kind is None else str(self.kind),
            "reason": self.reason,
        }


def check_steps(saved: SavedPlan, snapshot: Snapshot, policy: Policy) -> list[StepCheck]:
    """Each saved step, valid or stale with its reason, against ``snapshot`` (now) and the
    active ``policy`` (drains merged). Cooldowns do not apply: the operator approved."""
    p = build_problem(snapshot, policy)
    copies: dict[str, list[str]] = {}
    for v in snapshot.vms:
        copies.setdefault(v.name, []).append(v.host)
    vm_of = {(v.name, v.host): v for v in snapshot.vms}
    cpu, mem, vcpu = p.loads(p.cur)
    at: dict[str, str | None] = {}  # guest -> where the valid steps so far leave it
    checks: list[StepCheck] = []
    waves = sorted({m.wave for m in saved.moves})
    for wave in waves:
        leaving: list[tuple[int, int]] = []  # (guest, source) freed when the wave ends
        for m in (m for m in saved.moves if m.wave == wave):
            if m.offline:  # uses no capacity while stopped
                checks.append(StepCheck(m, *_check_stopped(m, snapshot, policy)))
                continue
            kind, reason = _check(m, snapshot, policy, p, copies, vm_of, at, cpu, mem, vcpu)
            checks.append(StepCheck(m, kind, reason))
            if kind is not None:
                at[m.vm] = None  # the guest's later steps depend on this one
                continue
            g, h = p.guest_index[m.vm], p.host_index[m.dst]
            cpu[h] += p.cpu[g]
            mem[h] += p.mem[g]
            vcpu[h] += p.vcpus[g]
            leaving.append((g, p.host_index[m.src]))
            at[m.vm] = m.dst
        for g, h in leaving:
            cpu[h] -= p.cpu[g]
            mem[h] -= p.mem[g]
            vcpu[h] -= p.vcpus[g]
    order = {id(m): i for i, m in enumerate(saved.moves)}
    return sorted(checks, key=lambda c: order[id(c.move)])


def _check_stopped(m: SavedMove, snapshot: Snapshot, policy: Policy) -> tuple[SkipKind | None, str]:
    """A stopped guest's saved step: still stopped on its source, destination fit."""
    if not any(v.name == m.vm and v.host == m.src for v in snapshot.stopped):
        return SkipKind.GONE, f"{m.vm} is no longer a stopped guest on {m.src}"
    host = snapshot.host(m.dst)
    if host is None or not host.up:
        return SkipKind.HOST_DOWN, f"{m.dst} does not answer"
    c = policy.constraints
    if m.dst in c.maintenance or m.dst in c.exclude_hosts:
        return SkipKind.STALE, f"{m.dst} is in maintenance or excluded now"
    return None, ""


def _check(  # noqa: C901 (one branch per staleness reason of a saved step)
    m: SavedMove,
    snapshot: Snapshot,
    policy: Policy,
    p: Any,
    copies: Mapping[str, list[str]],
    vm_of: Mapping[tuple[str, str], Any],
    at: Mapping[str, str | None],
    cpu: list[float],
    mem: list[float],
    vcpu: list[float],
) -> tuple[SkipKind | None, str]:
    if m.vm in at:  # a later step of a guest the plan moves twice (staging)
        if at[m.vm] is None:
            return SkipKind.DEPENDENCY, f"the earlier step of {m.vm} was skipped"
        if at[m.vm] != m.src:
            return SkipKind.STALE, f"the earlier step left {m.vm} on {at[m.vm]}, not {m.src}"
    else:
        hosts = copies.get(m.vm, [])
        if not hosts:
            return SkipKind.GONE, f"{m.vm} no longer runs on any host"
        if len(hosts) > 1:
            return SkipKind.GONE, f"{m.vm} is on {', '.join(sorted(hosts))} under one name"
        if hosts[0] != m.src:
            return SkipKind.GONE, (
                f"{m.vm} is on {hosts[0]} now, not on {m.src} where the plan found it (moved since)"
            )
        v = vm_of[(m.vm, m.src)]
        if m.uuid and v.uuid != m.uuid:
            return SkipKind.GONE, f"{m.vm} was recreated since the plan (UUID {v.uuid})"
    host = snapshot.host(m.dst)
    if host is None or m.dst not in p.host_index:
        return SkipKind.HOST_DOWN, f"{m.dst} is not a configured host"
    if not host.up:
        return SkipKind.HOST_DOWN, f"{m.dst} does not answer ({host.error or 'down'})"
    g, h = p.guest_index.get(m.vm), p.host_index[m.dst]
    if g is None:
        return SkipKind.GONE, f"{m.vm} is not in the snapshot"
    c = policy.constraints
    if m.dst in c.maintenance:
        return SkipKind.STALE, f"{m.dst} is in maintenance now"
    if m.vm in c.exclude_vms:
        return SkipKind.STALE, f"policy {policy.name} excludes {m.vm} from moves now"
    if m.src in c.exclude_hosts or m.dst in c.exclude_hosts:
        return SkipKind.STALE, f"policy {policy.name} excludes {m.src} or {m.dst} now"
    if not p.can_host(g, h):
        return SkipKind.STALE, f"the placement rules of policy {policy.name} keep it off {m.dst}"
    need = []
    if cpu[h] + p.cpu[g] > p.cpu_cap[h] + 1e-9:
        need.append(
            f"CPU {cpu[h] + p.cpu[g]:.2f} of {p.cpu_cap[h]:.2f} cores allowed "
            f"(max_cpu_util {policy.limits.max_cpu_util:g})"
        )
    if mem[h] + p.mem[g] > p.mem_cap[h] + 0.5:
        need.append(
            f"memory {(mem[h] + p.mem[g]) / GIB:.2f} of {p.mem_cap[h] / GIB:.2f} GiB allowed"
        )
    if vcpu[h] + p.vcpus[g] > p.vcpu_cap[h]:
        need.append(f"vCPUs {vcpu[h] + p.vcpus[g]:.0f} of {p.vcpu_cap[h]:.0f} allowed")
    if need:
        return SkipKind.STALE, f"{m.dst} has no room for it now: " + "; ".join(need)
    return None, ""


def valid_moves(checks: Sequence[StepCheck], snapshot: Snapshot) -> list[Move]:
    """The valid steps as moves (memory as it is now), in plan order."""
    mem = {v.name: v.mem_bytes for v in snapshot.vms}
    return [
        Move(
            c.move.vm,
            c.move.src,
            c.move.dst,
            mem.get(c.move.vm, c.move.mem_bytes),
            c.move.expected_s,
            c.move.wave,
            c.move.offline,
        )
        for c in checks
        if c.ok
    ]


def merge_results(checks: Sequence[StepCheck], executed: Sequence[MoveResult]) -> list[MoveResult]:
    """One result per saved step, in plan order: stale steps skipped with their reason,
    the others as executed."""
    it = iter(executed)
    out = []
    for c in checks:
        if c.ok:
            out.append(next(it))
        else:
            if c.kind is None:
                raise RuntimeError("internal error: c.kind is None")
            out.append(
                MoveResult(
                    c.move.vm,
                    c.move.src,
                    c.move.dst,
                    MoveOutcome.SKIPPED,
                    MigrationMode.NONE,
                    f"stale step: {c.reason}",
                    0.0,
                    skip_kind=c.kind,
                )
            )
    return out
