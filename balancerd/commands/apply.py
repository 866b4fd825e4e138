"""``balancerd apply --config FILE [--policy FILE] [--json]``: one full cycle on the live
hosts: reconcile -> snapshot -> decide -> execute the plan's moves.

``apply --plan FILE`` executes exactly the moves of a plan written by ``plan --save``;
``apply --latest`` approves the running daemon's latest plan (``mode: recommend``). Each
step is checked first (the guest still on its source, the destination allowed and with
room); a stale step is skipped with its reason, the others run. While a daemon runs it
executes the plan itself (it owns the cluster: the state lock); without one, ``--plan``
runs here, under the same lock. ``--latest`` needs the daemon.

Progress goes to stderr; the per-move results go to stdout (``--json``: a list of
``{"vm", "from", "to", "result", "mode", "reason", "seconds", "downtime_ms", ...}``).
A policy in ``recommend`` mode is planned and shown, never executed by plain ``apply``.
Exit status: 0 when no move failed (skips are not failures), 1 otherwise, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from balancerd.commands.migrate import (
    build_engine,
    print_results,
    progress_printer,
    report_reconciliations,
)
from balancerd.commands.plan import operator_state
from balancerd.config import Config, load_config
from balancerd.control_client import NoDaemon, find_socket, print_progress, request
from balancerd.decide import decide
from balancerd.duplicates import set_aside_duplicates
from balancerd.errors import BalancerdError
from balancerd.execute.executor import execute
from balancerd.execute.journal import Journal
from balancerd.execute.move import MoveResult
from balancerd.execute.reconcile import reconcile
from balancerd.history import HISTORY_FILE, History, build_record
from balancerd.model import Plan, Snapshot
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.policy.load import load_policy
from balancerd.policy.model import Policy
from balancerd.rationale import MoveWhy, explain_moves
from balancerd.saved_plan import (
    SavedPlan,
    check_steps,
    merge_results,
    read_plan_file,
    valid_moves,
)
from balancerd.selectors import resolve_policy
from balancerd.statelock import StateLock
from balancerd.wiring import open_hypervisor, sample_snapshot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon config file (YAML)")
    parser.add_argument("--policy", help="policy file (default: the config's policy)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--samples", type=int, default=3, help="samples to smooth over (>= 2)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--plan", metavar="FILE", help="execute this plan (written by plan --save), checked"
    )
    which.add_argument(
        "--latest", action="store_true", help="approve the running daemon's latest plan"
    )
    parser.add_argument("--socket", help="the daemon's control socket (default: see drain)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="give up when the daemon says nothing for S seconds (default 300)",
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.plan or args.latest:
        return run_approved(args, config)
    policy = load_policy(args.policy or config.policy_path())
    operator = operator_state(config)
    drained = operator.drained()
    policy = operator.apply_to(policy)
    lock = StateLock(config.state_dir, "apply")
    lock.acquire()  # one acting process per cluster: not beside the daemon or another CLI
    hv = open_hypervisor(config)
    journal = Journal(config.state_dir)
    err = sys.stderr
    try:
        report_reconciliations(reconcile(hv, journal), err)
        snapshot = sample_snapshot(hv, config, max(2, args.samples), args.interval)
        policy = resolve_policy(policy, snapshot)  # selectors -> names, as decide() does
        planning, planning_policy, notes = set_aside_duplicates(snapshot, policy)
        plan = decide(planning, planning_policy)
        plan = replace(plan, notes=(*plan.notes, *notes))
        whys = explain_moves(planning, planning_policy, plan, drained=drained)
        if not plan.moves:
            print(f"no moves: {plan.reason or 'placement is already good'}", file=err)
            record(config, "apply", plan, policy, planning, whys, [], drained)
            print_results([], args.json, sys.stdout)
            return 0
        for m in plan.moves:
            print(
                f"plan: wave {m.wave}: {m.vm} {m.src} -> {m.dst} (~{m.expected_s:.0f} s)", file=err
            )
        if policy.mode == "recommend":
            print(
                f"policy {policy.name} is in recommend mode: nothing executed (save it with "
                "`balancerd plan --save FILE`, run it with `balancerd apply --plan FILE`)",
                file=err,
            )
            record(config, "apply", plan, policy, planning, whys, [], drained, SkipKind.RECOMMEND)
            print_results([], args.json, sys.stdout)
            return 0
        engine = build_engine(config, policy, hv, journal, progress_printer(err))
        results = execute(plan.moves, engine)
        record(config, "apply", plan, policy, planning, whys, results, drained)
        print_results(results, args.json, sys.stdout)
        return 1 if any(r.outcome is MoveOutcome.FAILED for r in results) else 0
    finally:
        journal.close()
        hv.close()
        lock.release()


def run_approved(args: argparse.Namespace, config: Config) -> int:
    """``--plan FILE`` / ``--latest``: through the daemon when one runs, else (``--plan``)
    here under the state lock."""
    saved = read_plan_file(args.plan) if args.plan else None
    path = find_socket(args.socket, config.state_dir)
    try:
        out = request(
            path,
            "approve",
            timeout_s=args.timeout,
            on_progress=print_progress,
            latest=bool(args.latest),
            plan=None if saved is None else dict(saved.doc),
            source=args.plan or "",
        )
    except NoDaemon as exc:
        if saved is None:
            raise BalancerdError(
                f"apply --latest approves the running daemon's latest plan, and {exc}"
            ) from None
        print(f"no daemon answers on {path}: executing the plan here", file=sys.stderr)
        return apply_saved_here(args, config, saved)
    results: list[dict[str, Any]] = out["results"]
    if not out["checks"]:
        print(f"the plan ({out.get('policy')}) has no moves: nothing to do", file=sys.stderr)
    print_result_dicts(results, args.json)
    return 1 if any(r["result"] == "failed" for r in results) else 0


def apply_saved_here(args: argparse.Namespace, config: Config, saved: SavedPlan) -> int:
    policy = load_policy(args.policy or config.policy_path())
    operator = operator_state(config)
    if operator.paused() is not None:
        print(
            "note: the daemon was paused when it stopped; the pause holds the daemon, not an "
            "approved plan run here",
            file=sys.stderr,
        )
    drained = operator.drained()
    policy = operator.apply_to(policy)
    lock = StateLock(config.state_dir, "apply")
    lock.acquire()
    hv = open_hypervisor(config)
    journal = Journal(config.state_dir)
    err = sys.stderr
    try:
        report_reconciliations(reconcile(hv, journal), err)
        snapshot = sample_snapshot(hv, config, max(2, args.samples), args.interval)
        policy = resolve_policy(policy, snapshot)
        checks = check_steps(saved, snapshot, policy)
        for c in checks:
            if not c.ok:
                m = c.move
                print(f"{m.vm} {m.src}->{m.dst}: stale, skipped: {c.reason}", file=err)
        moves = valid_moves(checks, snapshot)
        executed: list[MoveResult] = []
        if moves:
            engine = build_engine(config, policy, hv, journal, progress_printer(err))
            executed = execute(moves, engine)
        results = merge_results(checks, executed)
        whys = [m.why for m in saved.moves]
        record(config, "apply", saved.as_plan(), policy, snapshot, whys, results, drained)
        print_results(results, args.json, sys.stdout)
        return 1 if any(r.outcome is MoveOutcome.FAILED for r in results) else 0
    finally:
        journal.close()
        hv.close()
        lock.release()


def record(
    config: Config,
    kind: str,
    plan: Plan,
    policy: Policy,
    planning: Snapshot,
    whys: Sequence[MoveWhy],
    results: Sequence[MoveResult],
    drained: Sequence[str],
    held_back: SkipKind | None = None,
) -> None:
    """Into the daemon's history (this process holds the state lock); a failure is a
    warning, never the command's failure."""
    try:
        store = History(Path(config.state_dir) / HISTORY_FILE)
    except Exception as exc:
        print(f"warning: not recorded in the history: {exc}", file=sys.stderr)
        return
    try:
        rec = build_record(
            at_s=time.time(),
            kind=kind,
            plan=plan,
            policy_mode=str(policy.mode),
            planning=planning,
            whys=whys,
            results=results,
            held_back=held_back,
            drained=drained,
        )
        if store.add(rec) is None:
            print("warning: not recorded in the history (see the log line above)", file=sys.stderr)
    finally:
        store.close()


def print_result_dicts(results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(results, indent=2))
        return
    for r in results:
        head = f"{r['vm']} {r['from']}->{r['to']} {r['result']}"
        if r["result"] != "migrated":
            print(f"{head}: {r['reason']}")
            continue
        down = "?" if r["downtime_ms"] is None else f"{r['downtime_ms']:.0f} ms"
        print(f"{head} ({r['mode']}, {r['seconds']:.1f} s, downtime {down})")
