"""The power driver protocol: how balancerd switches one host on and off."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

from balancerd.errors import BalancerdError


class PowerError(BalancerdError):
    """A power action failed; the message says which host and what was run."""


class PowerDriver(Protocol):
    """``is_on`` returns None when the driver cannot tell (Wake-on-LAN, plain commands)."""

    def power_on(self, host: str) -> None: ...

    def power_off(self, host: str) -> None: ...

    def is_on(self, host: str) -> bool | None: ...


def run_argv(argv: Sequence[str], host: str, action: str, timeout_s: float) -> str:
    """Run one command as an argument list (never a shell); stdout, or PowerError."""
    try:
        done = subprocess.run(  # noqa: S603 (an argument list from the config, never a shell)
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise PowerError(f"{host}: power {action}: {argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise PowerError(
            f"{host}: power {action}: {argv[0]} timed out after {timeout_s:g} s"
        ) from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        last = detail[-1] if detail else ""
        raise PowerError(
            f"{host}: power {action}: {argv[0]} exited {done.returncode}: {last}".rstrip(": ")
        )
    return done.stdout
