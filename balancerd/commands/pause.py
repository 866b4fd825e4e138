"""``balancerd pause [--reason TEXT]``: the daemon keeps observing and planning, and starts
no migration (nor power switch) until ``balancerd resume``; migrations already running
finish. Kept across restarts. Without a daemon: one line, exit 1."""

from __future__ import annotations

import argparse
import json

from balancerd.control_client import add_control_arguments, request, socket_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", default="", help="why (shown in status and logs)")
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = request(socket_for(args), "pause", reason=args.reason)
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k not in ("v", "ok")}, indent=2))
        return 0
    mark = out["paused"]
    if out["already"]:
        print(f"balancerd was already paused (by {mark['by']} since {mark['since']})")
    else:
        print(
            "balancerd paused: it keeps observing and planning; nothing moves until "
            "`balancerd resume`"
        )
    running = out.get("in_flight") or []
    if running:
        names = ", ".join(f"{m['vm']} {m['src']}->{m['dst']}" for m in running)
        print(f"{len(running)} migration(s) in flight finish first: {names}")
    return 0
