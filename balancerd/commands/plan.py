"""``balancerd plan``: one dry-run cycle on the live hosts: snapshot -> solve -> plan.

Hosts drained with ``balancerd drain`` count as in maintenance, as in the daemon. Each move
shows its reason, benefit (the policy's score before and after it) and cost (GiB, expected
seconds, predicted downtime). ``--save FILE`` writes the plan with the snapshot it was
computed from; ``balancerd apply --plan FILE`` executes exactly that plan later.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from balancerd.config import Config, load_config
from balancerd.decide import decide
from balancerd.duplicates import set_aside_duplicates
from balancerd.model import Plan, Snapshot
from balancerd.operator import OperatorState, OperatorStateError
from balancerd.policy.load import load_policy
from balancerd.policy.model import Policy
from balancerd.rationale import MoveWhy, explain_moves, score_name
from balancerd.saved_plan import plan_document
from balancerd.selectors import resolve_policy
from balancerd.statefiles import atomic_write
from balancerd.wiring import add_snapshot_arguments, cluster_snapshot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon config file (YAML)")
    parser.add_argument("--policy", help="policy file (default: the config's policy)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_snapshot_arguments(parser)
    parser.add_argument(
        "--save",
        metavar="FILE",
        help="write the plan and the snapshot it was computed from (apply --plan FILE runs it)",
    )


def operator_state(config: Config) -> OperatorState:
    """The daemon's drains and pause from its state directory (read only; empty with a
    warning when the file cannot be read)."""
    try:
        return OperatorState.load(config.state_dir, create=False)
    except OperatorStateError as exc:
        print(f"warning: drains not known: {exc}", file=sys.stderr)
        return OperatorState(None, {}, None)


def load_inputs(args: argparse.Namespace) -> tuple[Config, Policy]:
    config = load_config(args.config)
    policy = load_policy(args.policy or config.policy_path())
    return config, policy


def plan_json(
    plan: Plan, snapshot: Snapshot, policy: Policy, whys: Sequence[MoveWhy] = ()
) -> dict[str, Any]:
    why_of = {(w.vm, w.src, w.dst, w.wave): w for w in whys}
    before = snapshot.host_usage()
    after = snapshot.host_usage(plan.target)
    active_after = sorted(
        {plan.target.host_of.get(v.name, v.host) for v in snapshot.vms} | set(plan.power_on)
    )
    s = plan.solver
    return {
        "policy": policy.name,
        "objective": policy.objective,
        "mode": policy.mode,
        "moves": [
            {
                "vm": m.vm,
                "from": m.src,
                "to": m.dst,
                "wave": m.wave,
                "offline": m.offline,  # a stopped guest: its definition moves cold
                "mem_bytes": m.mem_bytes,
                "expected_s": round(m.expected_s, 2),
                **_why_json(why_of.get((m.vm, m.src, m.dst, m.wave))),
            }
            for m in plan.moves
        ],
        "hosts_before": {
            h: {"cpu": round(c, 4), "mem": round(m, 4)} for h, (c, m) in before.items()
        },
        "hosts_after": {h: {"cpu": round(c, 4), "mem": round(m, 4)} for h, (c, m) in after.items()},
        "active_hosts_after": len(active_after),
        "power_on": list(plan.power_on),
        "power_off": list(plan.power_off),
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
    }


def _why_json(w: MoveWhy | None) -> dict[str, Any]:
    if w is None:
        return {}
    j = w.to_json()
    return {k: j[k] for k in ("why", "benefit", "score_before", "score_after", "cost")}


def render_plan(out: dict[str, Any]) -> str:
    lines = [f"policy {out['policy']} ({out['objective']}, {out['mode']})"]
    if out.get("drained"):
        lines.append(f"drained with balancerd drain: {', '.join(out['drained'])}")
    lines.append("")
    lines.append(f"{'HOST':<12} {'CPU before':>10} {'after':>7} {'MEM before':>11} {'after':>7}")
    for host, b in out["hosts_before"].items():
        a = out["hosts_after"].get(host, {"cpu": 0.0, "mem": 0.0})
        lines.append(
            f"{host:<12} {100 * b['cpu']:>9.1f}% {100 * a['cpu']:>6.1f}% "
            f"{100 * b['mem']:>10.1f}% {100 * a['mem']:>6.1f}%"
        )
    lines.append("")
    if out["moves"]:
        lines.append(f"{len(out['moves'])} moves:")
        name = score_name(str(out["objective"]))
        for m in out["moves"]:
            stopped = " (stopped guest, cold)" if m.get("offline") else ""
            lines.append(
                f"  wave {m['wave']}: {m['vm']} {m['from']} -> {m['to']} "
                f"(~{m['expected_s']} s){stopped}"
            )
            if "why" in m:
                cost = m["cost"]
                down = f"downtime <= {cost['downtime_ms']:.0f} ms"
                if cost["downtime_note"] != "live":
                    down += f" ({cost['downtime_note']})"
                if m["benefit"] is not None:
                    lines.append(
                        f"      benefit {m['benefit']:+.3f}: {name} {m['score_before']:.2f} -> "
                        f"{m['score_after']:.2f}"
                    )
                lines.append(
                    f"      cost {cost['gib']:.2f} GiB, ~{cost['expected_s']:.0f} s, {down}"
                )
                lines.append(f"      why: {m['why']}")
    else:
        lines.append(f"no moves: {out['reason'] or 'placement is already good'}")
    s = out["solver"]
    lines.append(
        f"solver {s['backend']} {s['status']} in {s['seconds']} s; objective {s['objective']}, "
        f"bound {s['bound']}, gap {s['gap']}"
    )
    # What could not be fixed, guests held back, same-named guests: the operator reads it.
    lines += [f"note: {n}" for n in out.get("notes", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config, policy = load_inputs(args)
    operator = operator_state(config)
    drained = operator.drained()
    policy = operator.apply_to(policy)
    snapshot, source = cluster_snapshot(config, args.samples, args.interval)
    print(f"snapshot: {source.detail}", file=sys.stderr)
    policy = resolve_policy(policy, snapshot)  # selectors -> names, as decide() does
    planning, planning_policy, notes = set_aside_duplicates(snapshot, policy)
    plan = decide(planning, planning_policy)
    plan = replace(plan, notes=(*plan.notes, *notes))
    whys = explain_moves(planning, planning_policy, plan, drained=drained)
    out = plan_json(plan, snapshot, policy, whys)
    out["drained"] = list(drained)
    out["snapshot"] = source.to_json()
    if args.save:
        doc = plan_document(plan, snapshot, policy, whys, created_at_s=time.time(), drained=drained)
        path = Path(args.save)
        try:
            atomic_write(path, json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            print(f"error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        out["saved"] = str(path)
        print(
            f"plan saved to {path} ({len(plan.moves)} moves); approve it with "
            f"`balancerd apply --config {args.config} --plan {path}`",
            file=sys.stderr,
        )
    print(json.dumps(out, indent=2) if args.json else render_plan(out))
    return 0
