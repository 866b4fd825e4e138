"""``balancerd drain [HOST] [--wait] [--timeout S] [--reason TEXT]``: put a host into
maintenance through the running daemon (kept across restarts, merged with the policy's own
``maintenance``); without HOST, list the drained hosts and the pause.

``--wait`` follows the drain on stderr and returns when the host is empty (exit 0), or
says what keeps each guest there: at once when every guest left is one that cannot move
(exit 1), or at ``--timeout`` (exit 1). Without a daemon: one line, exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from balancerd.control_client import (
    add_control_arguments,
    print_progress,
    request,
    socket_for,
)

POLL_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", metavar="HOST", nargs="?", help="host to drain (none: list)")
    parser.add_argument("--reason", default="", help="why (shown in status and history)")
    parser.add_argument(
        "--wait", action="store_true", help="wait until the host is empty (progress on stderr)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="with --wait: give up after S seconds (default 1800)",
    )
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    path = socket_for(args)
    if not args.host:
        return _list(request(path, "status"), args.json)
    started = time.monotonic()
    out = request(path, "drain", host=args.host, reason=args.reason)
    if not args.wait:
        if args.json:
            print(json.dumps(_strip(out), indent=2))
        else:
            print(_drained_line(out))
            _notes(out)
        return 0
    if not args.json:
        print_progress(_drained_line(out))
        _notes(out)
    return _wait(path, args, started)


def _drained_line(out: dict[str, Any]) -> str:
    mark = out["drain"]
    host = out["host"]
    if out["already"]:
        head = f"{host} was already drained (by {mark['by']} since {mark['since']})"
    else:
        head = f"{host} drained"
    guests = out.get("guests") or []
    if guests:
        return f"{head}: {len(guests)} guest(s) to move ({', '.join(guests)})"
    return f"{head}: no guests on it in the latest snapshot"


def _notes(out: dict[str, Any]) -> None:
    if out.get("warning"):
        print(f"warning: {out['warning']}", file=sys.stderr)
    if out.get("paused"):
        print("note: balancerd is paused: nothing moves until `balancerd resume`", file=sys.stderr)


def _wait(path: Any, args: argparse.Namespace, started: float) -> int:
    shown = ""
    status: dict[str, Any] = {}
    while True:
        status = request(path, "drain-status", host=args.host)
        waited = time.monotonic() - started
        if status["empty"]:
            result = "empty"
            break
        text = _left_line(status)
        if text != shown and not args.json:
            print_progress(f"[{waited:.0f} s] {text}")
            shown = text
        stuck = all(g["stuck"] for g in status["guests"]) and not status["in_flight"]
        if status["cycle_since_drain"] and stuck:
            result = "stuck"
            break
        if waited >= args.timeout:
            result = "timeout"
            break
        time.sleep(POLL_S)
    waited = time.monotonic() - started
    if args.json:
        print(json.dumps({**_strip(status), "result": result, "waited_s": round(waited, 1)}))
    elif result == "empty":
        print(f"{args.host} is empty (waited {waited:.0f} s)")
    else:
        why = "cannot be emptied" if result == "stuck" else f"is not empty after {waited:.0f} s"
        print(f"{args.host} {why}; what keeps its guests there:")
        for g in status["guests"]:
            print(f"  {g['vm']}: {g['why']}")
        for m in status["in_flight"]:
            print(f"  {m['vm']}: migrating to {m['dst']} (id {m['migration_id']})")
    return 0 if result == "empty" else 1


def _left_line(status: dict[str, Any]) -> str:
    guests = status["guests"]
    parts = [f"{g['vm']} ({g['why']})" for g in guests]
    names = {g["vm"] for g in guests}
    moving = [m for m in status["in_flight"] if m["vm"] not in names and m["src"] == status["host"]]
    parts += [f"{m['vm']} (migrating to {m['dst']} (id {m['migration_id']}))" for m in moving]
    return f"{status['host']}: {len(guests) + len(moving)} guest(s) left: " + "; ".join(parts)


def _list(out: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(
            json.dumps(
                {
                    "drains": out["drains"],
                    "paused": out["paused"],
                    "maintenance": out["maintenance"],
                },
                indent=2,
            )
        )
        return 0
    drains = out["drains"]
    if not drains:
        print("no host is drained")
    for host, mark in drains.items():
        reason = f": {mark['reason']}" if mark.get("reason") else ""
        print(f"{host}: drained by {mark['by']} since {mark['since']}{reason}")
    policy_only = [h for h in out["maintenance"] if h not in drains]
    if policy_only:
        print(f"in maintenance by policy {out['policy']}: {', '.join(policy_only)}")
    if out["paused"]:
        p = out["paused"]
        reason = f": {p['reason']}" if p.get("reason") else ""
        print(f"balancerd is paused by {p['by']} since {p['since']}{reason}")
    return 0


def _strip(out: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in out.items() if k not in ("v", "ok")}
