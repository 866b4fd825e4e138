"""``balancerd cycle [--timeout S]``: the running daemon decides (and, unless paused, frozen
or recommending, acts) now instead of at its next interval; after the cycle that is
running, if one is. Moves are followed on stderr; the cycle's summary goes to stdout.
Exit status: 0 when the cycle ran and no move failed, 1 otherwise."""

from __future__ import annotations

import argparse
import json
from typing import Any

from balancerd.control_client import add_control_arguments, print_progress, request, socket_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="give up when the daemon says nothing for S seconds (default 120)",
    )
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = request(
        socket_for(args),
        "cycle",
        timeout_s=args.timeout,
        on_progress=None if args.json else print_progress,
    )
    c = out["cycle"]
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k not in ("v", "ok")}, indent=2))
    else:
        print(render(out))
    return 1 if c["failed"] else 0


def render(out: dict[str, Any]) -> str:
    c = out["cycle"]
    lines = [f"cycle at {c['at']} with policy {c['policy']}: {c['planned_moves']} move(s) planned"]
    if c["held_back"]:
        lines.append(f"not executed: {out['held_back_text']}")
        lines += [f"  planned: {m['vm']} {m['from']} -> {m['to']}" for m in out["moves"]]
    elif c["planned_moves"]:
        lines.append(f"{c['migrated']} migrated, {c['skipped']} skipped, {c['failed']} failed")
        for r in out["results"]:
            extra = f" ({r['mode']}, {r['seconds']} s)" if r["result"] == "migrated" else ""
            reason = f": {r['reason']}" if r["reason"] else ""
            lines.append(f"  {r['vm']} {r['from']} -> {r['to']} {r['result']}{extra}{reason}")
    else:
        lines.append(f"no moves: {c['reason'] or 'placement is already good'}")
    lines += [f"note: {n}" for n in out.get("notes", [])]
    return "\n".join(lines)
