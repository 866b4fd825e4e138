"""IPMI over LAN with ``ipmitool`` (argument list, password from a file, never a shell)."""

from __future__ import annotations

from balancerd.power.base import PowerError, run_argv


class IpmiDriver:
    def __init__(
        self,
        address: str,
        user: str,
        password_file: str,
        ipmitool: str = "ipmitool",
        timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self.user = user
        self.password_file = password_file
        self.ipmitool = ipmitool
        self.timeout_s = timeout_s

    def argv(self, action: str) -> list[str]:
        """``action``: on | off | status."""
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

    def power_on(self, host: str) -> None:
        run_argv(self.argv("on"), host, "on", self.timeout_s)

    def power_off(self, host: str) -> None:
        run_argv(self.argv("off"), host, "off", self.timeout_s)

    def is_on(self, host: str) -> bool | None:
        out = run_argv(self.argv("status"), host, "status", self.timeout_s)
        # "Chassis Power is on" / "Chassis Power is off"
        words = out.strip().lower().split()
        if words[-1:] == ["on"]:
            return True
        if words[-1:] == ["off"]:
            return False
        raise PowerError(f"{host}: power status: unexpected ipmitool output {out.strip()!r}")
