"""``balancerd run``: the daemon (foreground; systemd runs it as Type=notify)."""

from __future__ import annotations

import argparse

from balancerd.daemon import Daemon


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon config file (YAML)")


def run(args: argparse.Namespace) -> int:
    daemon = Daemon(args.config)
    daemon.install_signal_handlers()
    return daemon.run()
