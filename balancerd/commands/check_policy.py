"""``balancerd check-policy FILE...``: validate policy documents, report every problem.

Prints ``FILE: ok (name, objective)`` for each valid file and every problem of each
invalid one as ``FILE:LINE: field.path: message``. Exit status 0 when all are valid,
1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from balancerd.errors import PolicyError
from balancerd.policy.load import load_policy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")


def run(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            failed += 1
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{path}: ok ({policy.name}, {policy.objective})")
    if failed and len(args.files) > 1:
        print(f"{failed} of {len(args.files)} policy files are invalid", file=sys.stderr)
    return 1 if failed else 0
