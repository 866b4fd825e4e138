"""``balancerd check-policy FILE... [--config CONFIG] [--json]``: validate policy documents,
report every problem.

Prints ``FILE: ok (name, objective)`` for each valid file and every problem of each
invalid one as ``FILE:LINE: field.path: message``. With ``--config``, host selectors are
matched against the config's hosts (names and ``labels``): one that matches no host is a
problem (a misspelt label drains nothing). Guest selectors cannot be checked there: guest
names and tags are known only from the running hosts (``balancerd plan`` resolves them);
they are listed as not checked. Exit status 0 when all are valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from balancerd.config import Config, load_config
from balancerd.errors import ConfigError, PolicyError
from balancerd.model import Host, Snapshot
from balancerd.policy.load import load_policy
from balancerd.policy.model import Policy
from balancerd.selectors import Over, matched
from balancerd.yamlpos import format_path, line_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    parser.add_argument(
        "--config", help="daemon config: report host selectors that match none of its hosts"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def config_snapshot(config: Config) -> Snapshot:
    """The config's hosts (names, labels) as a snapshot without guests."""
    hosts = tuple(Host(name=h.name, uri=h.uri, up=False, labels=h.labels) for h in config.hosts)
    return Snapshot(taken_at_s=0.0, hosts=hosts, vms=())


def selector_report(policy: Policy, hosts: Snapshot | None) -> list[dict[str, Any]]:
    """Every selector of ``policy``: where it is written and, for host selectors when
    ``hosts`` is given, the hosts it matches (``None``: not checked)."""
    found = matched(policy.constraints.selectors, hosts) if hosts is not None else {}
    out = []
    for s in policy.constraints.selectors:
        sel = s.selector
        checked = hosts is not None and sel.over is Over.HOSTS
        out.append(
            {
                "path": format_path(sel.path),
                "line": line_of(policy.lines, sel.path),
                "selector": sel.text(),
                "over": sel.over.value,
                "matches": list(found[sel]) if checked else None,
            }
        )
    return out


def check_file(path: str, config: Config | None, config_path: str) -> dict[str, Any]:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return {"file": path, "ok": False, "problems": list(exc.problems), "selectors": []}
    selectors = selector_report(policy, config_snapshot(config) if config else None)
    problems = [
        f"{path}:{s['line']}: {s['path']}: {s['selector']} matches no host in {config_path}"
        for s in selectors
        if s["matches"] == []
    ]
    return {
        "file": path,
        "ok": not problems,
        "name": policy.name,
        "objective": str(policy.objective),
        "problems": problems,
        "selectors": selectors,
    }


def run(args: argparse.Namespace) -> int:
    config = None
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 1
    results = [check_file(path, config, args.config or "") for path in args.files]
    failed = sum(not r["ok"] for r in results)
    if args.json:
        print(json.dumps({"files": results, "invalid": failed}, indent=2))
        return 1 if failed else 0
    for r in results:
        for problem in r["problems"]:
            print(problem, file=sys.stderr)
        if r["ok"]:
            print(f"{r['file']}: ok ({r['name']}, {r['objective']})")
        unchecked = [s for s in r["selectors"] if s["matches"] is None and config is not None]
        for s in unchecked:
            print(
                f"{r['file']}:{s['line']}: {s['path']}: {s['selector']} not checked: guest "
                "names and tags are known only on the running hosts (see balancerd plan)",
                file=sys.stderr,
            )
    if failed and len(args.files) > 1:
        print(f"{failed} of {len(args.files)} policy files are invalid", file=sys.stderr)
    return 1 if failed else 0
