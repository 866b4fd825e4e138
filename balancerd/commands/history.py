"""``balancerd history [--since DURATION] [--vm VM] [--limit N] [--json]``: the decisions the
daemon recorded, newest first: each cycle's policy, score before and after, and every
planned move with its reason, benefit, cost and what became of it.

Read through the running daemon; without one, from ``STATE_DIR/history.sqlite`` of
``--config`` (read-only; needs read access to the state directory).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from balancerd.control_client import NoDaemon, add_control_arguments, request, socket_for
from balancerd.errors import BalancerdError, ConfigError
from balancerd.history import HISTORY_FILE, History, clock_text, held_text
from balancerd.rationale import score_name

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="DURATION", help="only this far back: 90s, 30m, 2h, 1d")
    parser.add_argument("--vm", help="only cycles that moved, planned or held this guest")
    parser.add_argument("--limit", type=int, default=20, help="at most N cycles (default 20)")
    add_control_arguments(parser)


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d``, ``1w`` or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*", text)
    if m is None:
        raise ConfigError([f"--since: {text!r} is not a duration like 90s, 30m, 2h, 1d"])
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def query(args: argparse.Namespace, cmd: str, **params: Any) -> dict[str, Any]:
    """Ask the daemon; without one, read the history file of ``--config`` directly."""
    try:
        return request(socket_for(args), cmd, **params)
    except NoDaemon as exc:
        if not args.config:
            raise BalancerdError(f"{exc}; give --config to read its history file instead") from None
        from balancerd.config import load_config

        path = Path(load_config(args.config).state_dir) / HISTORY_FILE
        if not path.exists():
            raise BalancerdError(f"{exc}, and there is no history at {path}") from None
        try:
            store = History(path, readonly=True)
        except Exception as err:
            raise BalancerdError(f"cannot read the history {path}: {err}") from None
        try:
            if cmd == "explain":
                return store.explain(params["vm"], limit=params.get("limit", 10))
            return {"cycles": store.cycles(**params)}
        finally:
            store.close()


def run(args: argparse.Namespace) -> int:
    since_s = time.time() - parse_duration(args.since) if args.since else None
    out = query(args, "history", since_s=since_s, vm=args.vm, limit=max(1, args.limit))
    cycles = out["cycles"]
    if args.json:
        print(json.dumps(cycles, indent=2))
        return 0
    if not cycles:
        print("no decisions recorded" + (f" about {args.vm}" if args.vm else ""))
    now = time.time()
    for c in cycles:
        print(cycle_line(c, now))
        for m in c["moves"]:
            print("    " + move_line(m, c["objective"]))
        for vm, reason in sorted(c.get("holds", {}).items()):
            print(f"    {vm}: not moved: {reason}")
    return 0


def cycle_line(c: dict[str, Any], now_s: float) -> str:
    at = clock_text(float(c["at_s"]), now_s)
    head = f"{at}  {c['kind']:<8} {c['policy']} ({c['objective']}, {c['mode']})"
    before, after = c["score_before"], c["score_after"]
    if before is not None and after is not None:
        head += f"  {score_name(c['objective'])} {before:.2f} -> {after:.2f}"
    if not c["planned"]:
        return f"{head}  no moves: {c['reason'] or 'placement is already good'}"
    if c["held_back"]:
        return f"{head}  {c['planned']} planned, not executed: {held_text(c['held_back'])}"
    return (
        f"{head}  {c['planned']} planned: {c['migrated']} migrated, {c['skipped']} skipped, "
        f"{c['failed']} failed"
    )


def move_line(m: dict[str, Any], objective: str) -> str:
    cost = m["cost"]
    benefit = ""
    if m["benefit"] is not None:
        benefit = (
            f"benefit {m['benefit']:+.3f} ({score_name(objective)} {m['score_before']:.2f} -> "
            f"{m['score_after']:.2f}); "
        )
    done = m["outcome"]
    if m["outcome"] == "migrated":
        done += f" ({m['mode']}, {m['seconds']} s)"
    elif m["reason"]:
        done += f": {m['reason']}"
    return (
        f"{m['vm']} {m['from']} -> {m['to']} {done}; {benefit}cost {cost['gib']:.2f} GiB, "
        f"~{cost['expected_s']:.0f} s, downtime <= {cost['downtime_ms']:.0f} ms; why: {m['why']}"
    )
