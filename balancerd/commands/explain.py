"""``balancerd explain VM [--limit N] [--json]``: why a guest moved or did not, newest first,
from the daemon's history: "moved at 10:05 from host3 to host1: host3 was at 92 % CPU; the
move lowered the highest host from 0.92 to 0.71 at a cost of 4.00 GiB ...; not moved at
10:10: cooldown ...". Read through the running daemon; without one, from the history file
of ``--config``."""

from __future__ import annotations

import argparse
import json
import time

from balancerd.commands.history import query
from balancerd.control_client import add_control_arguments
from balancerd.history import explain_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vm", metavar="VM", help="the guest")
    parser.add_argument("--limit", type=int, default=10, help="at most N events (default 10)")
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    doc = query(args, "explain", vm=args.vm, limit=max(1, args.limit))
    if args.json:
        print(json.dumps({k: v for k, v in doc.items() if k not in ("v", "ok")}, indent=2))
        return 0
    where = doc.get("now_on")
    head = f"{args.vm}" + (f" (now on {where})" if where else "")
    print(head)
    for line in doc.get("lines") or explain_lines(doc, time.time()):
        print(f"  {line}")
    for rule in doc.get("standing_rules", []):
        print(f"  standing rule: {rule}")
    return 0
