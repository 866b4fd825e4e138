"""``balancerd undrain HOST``: end a drain set with ``balancerd drain``; guests may come back
under balance from the next cycle on. Undraining a host that was not drained is not an
error (exit 0, it says so). Without a daemon: one line, exit 1."""

from __future__ import annotations

import argparse
import json
import sys

from balancerd.control_client import add_control_arguments, request, socket_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", metavar="HOST", help="host to take out of maintenance")
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = request(socket_for(args), "undrain", host=args.host)
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k not in ("v", "ok")}, indent=2))
        return 0
    if out["was_drained"]:
        mark = out["drain"]
        print(
            f"{args.host} undrained (drained by {mark['by']} since {mark['since']}); guests may "
            "return at the next cycle"
        )
    else:
        print(f"{args.host} was not drained")
    if out["policy_maintenance"]:
        print(
            f"note: {args.host} stays in maintenance: policy {out['policy']} lists it under "
            "spec.constraints.maintenance",
            file=sys.stderr,
        )
    return 0
