"""IPMI over LAN with ``ipmitool`` (argument list, password from a file, never a shell).

The password file must be readable by its owner only: checked when the config is loaded
(if the file exists then), when the driver is built, and before every use.
"""

from __future__ import annotations

import logging
import time

from balancerd.config import secret_file_problem
from balancerd.power.base import PowerError, run_argv

log = logging.getLogger(__name__)

# A soft power-off (ACPI) gets this long to finish before a hard one. Kept under the
# daemon's default stall timeout (60 s): the cycle waits for it.
SOFT_OFF_TIMEOUT_S = 45.0
SOFT_OFF_POLL_S = 3.0


class IpmiDriver:
    def __init__(
        self,
        address: str,
        user: str,
        password_file: str,
        ipmitool: str = "ipmitool",
        timeout_s: float = 30.0,
        soft_off_timeout_s: float = SOFT_OFF_TIMEOUT_S,
        poll_s: float = SOFT_OFF_POLL_S,
    ) -> None:
        self.soft_off_timeout_s = soft_off_timeout_s
        self.poll_s = poll_s
        self.address = address
        self.user = user
        self.password_file = password_file
        self.ipmitool = ipmitool
        self.timeout_s = timeout_s

    def argv(self, action: str) -> list[str]:
        """``action``: on | off | soft | status."""
        return [
            self.ipmitool,
            "-I",
            "lanplus",
            "-H",
            self.address,
            "-U",
            self.user,
            "-f",
            self.password_file,
            "chassis",
            "power",
            action,
        ]

    def _run(self, host: str, action: str) -> str:
        problem = secret_file_problem(self.password_file)
        if problem:  # its mode changed since the driver was built
            raise PowerError(f"{host}: power {action}: password_file {problem}")
        return run_argv(self.argv(action), host, action, self.timeout_s)

    def power_on(self, host: str) -> None:
        self._run(host, "on")

    def power_off(self, host: str) -> None:
        """A soft (ACPI) power-off first, so the host's OS shuts down cleanly; a hard one
        only if it is still on after ``soft_off_timeout_s``."""
        self._run(host, "soft")
        deadline = time.monotonic() + self.soft_off_timeout_s
        while True:
            try:
                if self.is_on(host) is False:
                    return
            except PowerError as exc:
                log.info("%s: power status after soft off: %s", host, exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        log.warning(
            "%s still on %.0f s after a soft power-off; powering off hard",
            host,
            self.soft_off_timeout_s,
            extra={"HOST": host},
        )
        self._run(host, "off")

    def is_on(self, host: str) -> bool | None:
        out = self._run(host, "status")
        # "Chassis Power is on" / "Chassis Power is off"
        words = out.strip().lower().split()
        if words[-1:] == ["on"]:
            return True
        if words[-1:] == ["off"]:
            return False
        raise PowerError(f"{host}: power status: unexpected ipmitool output {out.strip()!r}")
