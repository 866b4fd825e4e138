"""``balancerd run``: the daemon (foreground; systemd runs it as Type=notify)."""

from __future__ import annotations

import argparse

from balancerd.daemon import Daemon


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon config file (YAML)")
    parser.add_argument(
        "--cycles", type=int, default=0, help="stop after N decide-and-act cycles (demos, tests)"
    )


def run(args: argparse.Namespace) -> int:
    daemon = Daemon(args.config, max_cycles=args.cycles)
    daemon.install_signal_handlers()
    return daemon.run()
