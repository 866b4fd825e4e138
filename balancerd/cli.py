"""Command line: ``balancerd COMMAND ...``. The only place that calls ``sys.exit``.

Each command lives in ``balancerd/commands/<name>.py`` with ``add_arguments(parser)``
and ``run(args) -> int``; they are registered explicitly in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from balancerd.errors import BalancerdError, ConfigError

# command name -> (module under balancerd.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "run the daemon (scheduler, metrics, migrations)"),
    "status": ("status", "show hosts, guests and utilization (and the daemon's state)"),
    "plan": ("plan", "one dry-run cycle: snapshot -> solve -> plan"),
    "apply": ("apply", "one full cycle: plan, then execute the moves"),
    "migrate": ("migrate", "migrate one guest to a host with the full engine"),
    "drain": ("drain", "put a host into maintenance via the daemon (--wait: until empty)"),
    "undrain": ("undrain", "take a host out of maintenance set with drain"),
    "cycle": ("cycle", "let the running daemon decide (and act) now"),
    "pause": ("pause", "the daemon keeps observing and planning, and moves nothing"),
    "resume": ("resume", "end a pause"),
    "history": ("history", "the daemon's decisions: moves, reasons, benefit and cost"),
    "explain": ("explain", "why a guest moved or did not"),
    "check-policy": ("check_policy", "validate policy files"),
    "simulate": ("simulate", "replay a workload trace on a simulated cluster"),
    "lab": ("lab", "a real multi-host libvirt cluster on this machine"),
}

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (a broken or heavy command
    never stops the others from running)."""
    parser = argparse.ArgumentParser(
        prog="balancerd",
        description="Policy-driven load balancing for KVM/libvirt clusters.",
        epilog="Exit status: 0 ok, 1 a failure, 2 bad input (config or policy file).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"balancerd.commands.{module_name}")
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    from balancerd.logs import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        code = int(args._run(args))
    except ConfigError as exc:
        print(f"error:\n{exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except BalancerdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
