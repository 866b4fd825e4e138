"""``balancerd resume``: end a ``balancerd pause``; the next cycle acts again. Resuming a
daemon that was not paused is not an error (exit 0, it says so)."""

from __future__ import annotations

import argparse
import json
import time

from balancerd.control_client import add_control_arguments, request, socket_for
from balancerd.rationale import human_duration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_control_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = request(socket_for(args), "resume")
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k not in ("v", "ok")}, indent=2))
        return 0
    mark = out["paused"]
    if mark is None:
        print("balancerd was not paused")
    else:
        took = human_duration(time.time() - float(mark["since_s"]))
        print(f"balancerd resumed (paused by {mark['by']} for {took}); the next cycle acts")
    return 0
