"""Why each planned move is in a plan, what it gains and what it costs; why a guest was
left where it was. Pure: values in, values out (used by ``plan``, the daemon's history and
``explain``).

Benefit is the policy's score (balance: the highest weighted host utilization;
power-save: host-equivalents of idle power left on) before and after the move, with the
plan's moves applied one after another in plan order on the snapshot the plan was computed
from. A move that only pays off together with later ones (the second of two equally hot
hosts) shows no change of its own; the plan's total is in ``score_before/after``.

Cost: the guest's memory (what crosses the link), the planner's expected seconds, and the
predicted downtime (predict.py): ``max_downtime_ms`` for a guest that converges live, else
what its fallback (pause-and-complete, post-copy, abort) stops it for.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from balancerd.model import Plan, Snapshot, Vm
from balancerd.policy.model import Migration, Policy
from balancerd.predict import fallback, predict_vm
from balancerd.solve.core import score
from balancerd.solve.problem import build_problem
from balancerd.units import GIB


@dataclass(frozen=True)
class MoveWhy:
    """One planned move with its reason, benefit and cost."""

    vm: str
    src: str
    dst: str
    wave: int
    why: str  # what drives it: a drain, a rule, the hottest host, emptying a host
    mem_bytes: int
    expected_s: float
    downtime_ms: float  # predicted
    downtime_note: str  # "live" or how it may end (pause-and-complete)
    score_before: float | None  # the policy's score before / after this move (plan order)
    score_after: float | None
    src_cpu_util: float  # guest demand on the source / its capacity, before the move
    src_mem_util: float
    dst_cpu_util: float  # on the destination, after the move
    dst_mem_util: float
    offline: bool = False  # a stopped guest's definition moves (nothing runs)

    @property
    def benefit(self) -> float | None:
        if self.score_before is None or self.score_after is None:
            return None
        return self.score_before - self.score_after

    def cost_text(self) -> str:
        down = f"downtime <= {self.downtime_ms:.0f} ms"
        if self.downtime_note != "live":
            down += f", {self.downtime_note}"
        return f"{self.mem_bytes / GIB:.2f} GiB, ~{self.expected_s:.0f} s, {down}"

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "from": self.src,
            "to": self.dst,
            "wave": self.wave,
            "offline": self.offline,
            "why": self.why,
            "benefit": _round(self.benefit),
            "score_before": _round(self.score_before),
            "score_after": _round(self.score_after),
            "cost": {
                "gib": round(self.mem_bytes / GIB, 3),
                "mem_bytes": self.mem_bytes,
                "expected_s": round(self.expected_s, 2),
                "downtime_ms": round(self.downtime_ms, 1),
                "downtime_note": self.downtime_note,
            },
            "src_util": {"cpu": round(self.src_cpu_util, 4), "mem": round(self.src_mem_util, 4)},
            "dst_util_after": {
                "cpu": round(self.dst_cpu_util, 4),
                "mem": round(self.dst_mem_util, 4),
            },
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def score_name(objective: str) -> str:
    """What the score measures, in words."""
    return "hosts on (idle power)" if objective == "power-save" else "highest host"


def predicted_downtime(vm: Vm | None, mig: Migration) -> tuple[float, str]:
    """(milliseconds, note): the downtime a move of ``vm`` is predicted to cause
    (predict.py): at most ``max_downtime_ms`` for a guest that converges live, else what
    its fallback (on_stall; abort for no_pause_vms) stops it for."""
    if vm is None:
        return float(mig.max_downtime_ms), "live"
    e = predict_vm(vm, mig)
    if e.converges:
        return float(mig.max_downtime_ms), "live"
    return e.downtime_ms, f"does not converge: ends by {fallback(mig, vm.name)}"


def explain_moves(
    planning: Snapshot,
    policy: Policy,
    plan: Plan,
    *,
    drained: Collection[str] = (),
    last_moved_s: Mapping[str, float] | None = None,
    now_s: float = 0.0,
) -> list[MoveWhy]:
    """One ``MoveWhy`` per move of ``plan`` (same order). ``planning`` and ``policy`` are
    what the plan was decided on (forecast demand, drains merged); ``drained``: the hosts
    an operator drained (to tell them from the policy's own maintenance)."""
    if not plan.moves:
        return []
    p = build_problem(planning, policy, last_moved_s=last_moved_s, now_s=now_s)
    host_of = list(p.cur)
    vms = {v.name: v for v in planning.vms}
    maintenance = set(policy.constraints.maintenance)
    hottest = _hottest(p, host_of)
    out: list[MoveWhy] = []
    for m in plan.moves:
        g = p.guest_index.get(m.vm)
        h_src, h_dst = p.host_index.get(m.src), p.host_index.get(m.dst)
        downtime_ms, note = predicted_downtime(vms.get(m.vm), policy.migration)
        if m.offline:
            drain = "drained by the operator" if m.src in drained else "in maintenance"
            why = f"stopped guest: {m.src} is {drain}; only its definition moves"
            out.append(
                MoveWhy(
                    m.vm, m.src, m.dst, m.wave, why, m.mem_bytes, m.expected_s,
                    0.0, "stopped", None, None, 0.0, 0.0, 0.0, 0.0, offline=True,
                )
            )  # fmt: skip
            continue
        if g is None or h_src is None or h_dst is None:
            out.append(
                MoveWhy(
                    m.vm,
                    m.src,
                    m.dst,
                    m.wave,
                    "not in the snapshot the plan was made from",
                    m.mem_bytes,
                    m.expected_s,
                    downtime_ms,
                    note,
                    None,
                    None,
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                )
            )
            continue
        cpu, mem, _ = p.loads(host_of)
        src_cpu = cpu[h_src] / (p.cpu_total[h_src] or 1.0)
        src_mem = mem[h_src] / (p.mem_total[h_src] or 1.0)
        before = score(p, host_of)
        host_of[g] = h_dst
        after = score(p, host_of)
        cpu, mem, _ = p.loads(host_of)
        if m.src in drained:
            why = f"{m.src} is drained by the operator"
        elif m.src in maintenance:
            why = f"{m.src} is in maintenance (policy {policy.name})"
        elif p.must_move[g] and p.cur[g] == h_src:
            why = f"its placement rules do not allow {m.src}"
        elif plan.target.host_of.get(m.vm, m.dst) != m.dst:
            why = f"a staging step: it waits on {m.dst} until room opens for it"
        elif policy.objective == "power-save":
            if m.src in plan.power_off:
                why = f"emptying {m.src} so that it can be switched off"
            else:
                why = "packing guests onto fewer hosts"
        else:
            why = f"{m.src} was at {100 * src_cpu:.0f} % CPU and {100 * src_mem:.0f} % memory"
            if m.src == hottest:
                why += " (the highest)"
        out.append(
            MoveWhy(
                vm=m.vm,
                src=m.src,
                dst=m.dst,
                wave=m.wave,
                why=why,
                mem_bytes=m.mem_bytes,
                expected_s=m.expected_s,
                downtime_ms=downtime_ms,
                downtime_note=note,
                score_before=before,
                score_after=after,
                src_cpu_util=src_cpu,
                src_mem_util=src_mem,
                dst_cpu_util=cpu[h_dst] / (p.cpu_total[h_dst] or 1.0),
                dst_mem_util=mem[h_dst] / (p.mem_total[h_dst] or 1.0),
            )
        )
    return out


def _hottest(p: Any, host_of: list[int]) -> str:
    cpu, mem, _ = p.loads(host_of)
    best, name = -1.0, ""
    for h in range(p.n_hosts):
        if not p.balanced[h]:
            continue
        u = max(p.w_cpu * cpu[h] / (p.cpu_total[h] or 1.0), p.w_mem * mem[h] / p.mem_total[h])
        if u > best:
            best, name = u, p.hosts[h]
    return name


_GUEST_NOTE = re.compile(r"^guest (\S+) ")


def holds(
    planning: Snapshot,
    policy: Policy,
    *,
    notes: Iterable[str] = (),
    last_moved_s: Mapping[str, float] | None = None,
    now_s: float = 0.0,
) -> dict[str, str]:
    """Guest -> why it could not move this cycle, for reasons that change from cycle to
    cycle: its cooldown, and what the solver named (a guest that must leave a host but
    fits nowhere, a name found on two hosts). Standing rules (exclusions, pins) are read
    from the policy when asked (``standing_rules``)."""
    out: dict[str, str] = {}
    maintenance = set(policy.constraints.maintenance)
    cooldown_s = policy.hysteresis.cooldown_s
    for v in planning.vms:
        t = (last_moved_s or {}).get(v.name)
        if t is not None and now_s - t < cooldown_s and v.host not in maintenance:
            out[v.name] = (
                f"cooldown: moved {human_duration(now_s - t)} ago "
                f"(cooldown {human_duration(cooldown_s)})"
            )
    for note in notes:
        match = _GUEST_NOTE.match(note)
        if match:
            out[match.group(1)] = note
    return out


def standing_rules(vm: str, policy: Policy) -> list[str]:
    """The policy's rules that keep ``vm`` still or bound to some hosts, in words."""
    c = policy.constraints
    out = []
    if vm in c.exclude_vms:
        out.append(f"policy {policy.name} excludes it from moves (constraints.exclude_vms)")
    if vm in c.pin:
        out.append(f"policy {policy.name} pins it to {', '.join(c.pin[vm])}")
    for rule in c.host_rules:
        if vm in rule.vms:
            kind = rule.kind.replace("_", " ")
            out.append(f"policy {policy.name}: it {kind} run on {', '.join(rule.hosts)}")
    for group in c.affinity:
        if vm in group:
            others = ", ".join(g for g in group if g != vm)
            out.append(f"policy {policy.name}: affinity with {others}")
    for group in c.anti_affinity:
        if vm in group:
            others = ", ".join(g for g in group if g != vm)
            out.append(f"policy {policy.name}: anti-affinity with {others}")
    return out


def human_duration(seconds: float) -> str:
    """``45 s``, ``3 min``, ``2 h 5 min``, ``3 d 4 h``."""
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        h, rest = divmod(int(s), 3600)
        return f"{h} h {rest // 60} min" if rest >= 60 else f"{h} h"
    d, rest = divmod(int(s), 86400)
    return f"{d} d {rest // 3600} h" if rest >= 3600 else f"{d} d"
