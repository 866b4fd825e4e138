"""Generic commands: argument templates with ``{host}`` substituted, run without a shell."""

from __future__ import annotations

from collections.abc import Sequence

from balancerd.config import argv_template_problem
from balancerd.power.base import PowerError, run_argv


def expand(template: Sequence[str], host: str) -> list[str]:
    """Each argument is formatted on its own, so a host name can never split into two.
    Only ``{host}`` is substituted (as the config loader checks): no attribute access,
    no format spec that could build a string of any size."""
    for arg in template:
        problem = argv_template_problem(arg)
        if problem:
            raise PowerError(f"{host}: {problem}")
    return [arg.format(host=host) for arg in template]


class CommandDriver:
    def __init__(
        self,
        on_command: Sequence[str],
        off_command: Sequence[str],
        status_command: Sequence[str] = (),
        timeout_s: float = 120.0,
    ) -> None:
        self.on_command = tuple(on_command)
        self.off_command = tuple(off_command)
        self.status_command = tuple(status_command)
        self.timeout_s = timeout_s

    def power_on(self, host: str) -> None:
        if not self.on_command:
            raise PowerError(f"{host}: power on: no on_command configured")
        run_argv(expand(self.on_command, host), host, "on", self.timeout_s)

    def power_off(self, host: str) -> None:
        if not self.off_command:
            raise PowerError(f"{host}: power off: no off_command configured")
        run_argv(expand(self.off_command, host), host, "off", self.timeout_s)

    def is_on(self, host: str) -> bool | None:
        """With a status command: exit 0 means on, any other exit means off."""
        if not self.status_command:
            return None
        try:
            run_argv(expand(self.status_command, host), host, "status", self.timeout_s)
        except PowerError as exc:
            if "exited" in str(exc):
                return False
            raise
        return True
