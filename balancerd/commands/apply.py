"""``balancerd apply --config FILE [--policy FILE] [--json]``: one full cycle on the live
hosts: reconcile -> snapshot -> decide -> execute the plan's moves.

Progress goes to stderr; the per-move results go to stdout (``--json``: a list of
``{"vm", "from", "to", "result", "mode", "reason", "seconds", "downtime_ms", ...}``).
A policy in ``recommend`` mode is planned and shown, never executed.
Exit status: 0 when no move failed (skips are not failures), 1 otherwise, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from balancerd.commands.migrate import (
    build_engine,
    print_results,
    progress_printer,
    report_reconciliations,
)
from balancerd.config import load_config
from balancerd.decide import decide
from balancerd.duplicates import set_aside_duplicates
from balancerd.execute.executor import execute
from balancerd.execute.journal import Journal
from balancerd.execute.reconcile import reconcile
from balancerd.outcomes import MoveOutcome
from balancerd.policy.load import load_policy
from balancerd.statelock import StateLock
from balancerd.wiring import open_hypervisor, sample_snapshot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon config file (YAML)")
    parser.add_argument("--policy", help="policy file (default: the config's policy)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--samples", type=int, default=3, help="samples to smooth over (>= 2)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    policy = load_policy(args.policy or config.policy_path())
    lock = StateLock(config.state_dir, "apply")
    lock.acquire()  # one acting process per cluster: not beside the daemon or another CLI
    hv = open_hypervisor(config)
    journal = Journal(config.state_dir)
    err = sys.stderr
    try:
        report_reconciliations(reconcile(hv, journal), err)
        snapshot = sample_snapshot(hv, config, max(2, args.samples), args.interval)
        planning, planning_policy, notes = set_aside_duplicates(snapshot, policy)
        plan = decide(planning, planning_policy)
        plan = replace(plan, notes=(*plan.notes, *notes))
        if not plan.moves:
            print(f"no moves: {plan.reason or 'placement is already good'}", file=err)
            print_results([], args.json, sys.stdout)
            return 0
        for m in plan.moves:
            print(
                f"plan: wave {m.wave}: {m.vm} {m.src} -> {m.dst} (~{m.expected_s:.0f} s)", file=err
            )
        if policy.mode == "recommend":
            print(f"policy {policy.name} is in recommend mode: nothing executed", file=err)
            print_results([], args.json, sys.stdout)
            return 0
        engine = build_engine(config, policy, hv, journal, progress_printer(err))
        results = execute(plan.moves, engine)
        print_results(results, args.json, sys.stdout)
        return 1 if any(r.outcome is MoveOutcome.FAILED for r in results) else 0
    finally:
        journal.close()
        hv.close()
        lock.release()
