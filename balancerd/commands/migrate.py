"""``balancerd migrate --config FILE VM HOST [--policy FILE] [--json]``: move one guest with
the full engine (reconcile first, preflight, live with the stall ladder, cold fallback,
verify). Progress lines go to stderr while it runs; the result goes to stdout.

Exit status: 0 migrated, 1 skipped or failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from balancerd.collect import STOPPED_STATES
from balancerd.config import Config, load_config
from balancerd.errors import ConfigError, HypervisorError, MigrationError
from balancerd.execute.converge import describe_progress
from balancerd.execute.executor import execute
from balancerd.execute.journal import Journal
from balancerd.execute.move import Engine, MoveProgress, MoveResult
from balancerd.execute.reconcile import Reconciliation, reconcile
from balancerd.hypervisor.base import Hypervisor, JobStats
from balancerd.model import Move
from balancerd.outcomes import MigrationMode, MoveOutcome, SkipKind
from balancerd.policy.load import load_policy
from balancerd.policy.model import Policy
from balancerd.statelock import StateLock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon config file (YAML)")
    parser.add_argument("--policy", help="policy file (default: the config's policy)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("vm", metavar="VM", help="guest to move")
    parser.add_argument("host", metavar="HOST", help="destination host (name in the config)")


def progress_printer(out: TextIO) -> MoveProgress:
    """Progress lines ``VM SRC->DST: ...`` (thread-safe: moves run on worker threads)."""
    lock = threading.Lock()

    def show(move: Move, stats: JobStats | None, msg: str) -> None:
        text = describe_progress(stats) if stats is not None else msg
        with lock:
            print(f"{move.vm} {move.src}->{move.dst}: {text}", file=out, flush=True)

    return show


def build_engine(
    config: Config,
    policy: Policy,
    hv: Hypervisor,
    journal: Journal,
    progress: MoveProgress,
    heartbeat: Callable[[], None] = lambda: None,
) -> Engine:
    return Engine(
        hv=hv,
        mig=policy.migration,
        headroom_bytes=policy.limits.mem_headroom_bytes,
        journal=journal,
        heartbeat=heartbeat,
        progress=progress,
    )


def report_reconciliations(recs: list[Reconciliation], out: TextIO) -> None:
    for r in recs:
        actions = "; ".join(r.actions) or "nothing to do"
        state = "settled" if r.settled else "NOT settled"
        print(
            f"reconcile: unfinished migration {r.vm} {r.src}->{r.dst} {state}: "
            f"{actions}; {r.detail}",
            file=out,
            flush=True,
        )


def _state_or_error(hv: Hypervisor, host: str, vm: str) -> str | HypervisorError | None:
    try:
        return hv.domain_state(host, vm)
    except HypervisorError as exc:
        return exc


def find_guest(hv: Hypervisor, vm: str) -> tuple[str, bool]:
    """(host, stopped): where ``vm`` runs (or is paused), else the one host where it is
    defined but stopped (a cold move: its definition only); raises MigrationError if
    neither. The hosts are asked in parallel: each first contact opens a connection
    (seconds on a libvirtd that just started), and N hosts must not cost N of them in a
    row."""
    hosts = list(hv.host_names())
    found = []
    stopped = []
    unreachable = []
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        states = pool.map(lambda h: _state_or_error(hv, h, vm), hosts)
        answers = list(zip(hosts, states, strict=True))
    for host, state in answers:
        if isinstance(state, HypervisorError):
            unreachable.append(f"{host} ({state.detail})")
        elif state in ("running", "paused", "blocked"):
            found.append(host)
        elif state in STOPPED_STATES:
            stopped.append(host)
    if len(found) == 1:
        return found[0], False
    if found:
        raise MigrationError(f"{vm} is active on several hosts: {', '.join(found)}")
    more = f"; hosts not answering: {', '.join(unreachable)}" if unreachable else ""
    if len(stopped) == 1 and not unreachable:
        return stopped[0], True
    if stopped:
        # defined on several (or one, while a host that may run it does not answer)
        raise MigrationError(
            f"{vm} is not running; it is defined, stopped, on {', '.join(stopped)}{more}"
        )
    raise MigrationError(f"{vm} is not running or defined on any configured host{more}")


def print_results(results: list[MoveResult], as_json: bool, out: TextIO) -> None:
    if as_json:
        json.dump([r.to_json() for r in results], out, indent=2)
        out.write("\n")
    else:
        for r in results:
            print(r.line(), file=out)
    out.flush()


def run(args: argparse.Namespace) -> int:
    from balancerd.wiring import open_hypervisor

    config = load_config(args.config)
    policy = load_policy(args.policy or config.policy_path())
    if args.host not in {h.name for h in config.hosts}:
        raise ConfigError([f"{args.config}: host {args.host!r} is not in the config"])
    lock = StateLock(config.state_dir, "migrate")
    lock.acquire()  # one acting process per cluster: not beside the daemon or another CLI
    hv = open_hypervisor(config)
    journal = Journal(config.state_dir)
    try:
        report_reconciliations(reconcile(hv, journal), sys.stderr)
        src, stopped = find_guest(hv, args.vm)
        move = Move(args.vm, src, args.host, mem_bytes=0, expected_s=0.0, offline=stopped)
        engine = build_engine(config, policy, hv, journal, progress_printer(sys.stderr))
        if src == args.host:
            results = [
                MoveResult(
                    args.vm,
                    src,
                    args.host,
                    MoveOutcome.SKIPPED,
                    MigrationMode.NONE,
                    f"already on {src}",
                    0.0,
                    skip_kind=SkipKind.GONE,
                )
            ]
        else:
            results = execute([move], engine)
        print_results(results, args.json, sys.stdout)
        return 0 if results[0].outcome is MoveOutcome.MIGRATED else 1
    finally:
        journal.close()
        hv.close()
        lock.release()
