"""Host power: drivers (ipmi, wol, command, lab) and the power manager.

``make_driver(cfg)`` builds the driver a host's ``power:`` section describes;
``drivers_for(hosts)`` builds them all (hosts with ``driver: none`` are left out).
"""

from __future__ import annotations

from collections.abc import Iterable

from balancerd.config import HostConfig, PowerDriverConfig, power_problems
from balancerd.errors import ConfigError
from balancerd.power.base import PowerDriver, PowerError
from balancerd.power.command import CommandDriver
from balancerd.power.ipmi import IpmiDriver
from balancerd.power.lab import LabDriver
from balancerd.power.manager import (
    HostPower,
    PowerDecision,
    PowerResult,
    PowerTracker,
    apply_power,
    decide_power,
)
from balancerd.power.wol import WolDriver, parse_mac
from balancerd.yamlpos import format_path

DRIVERS = ("none", "ipmi", "wol", "command", "lab")

__all__ = [
    "DRIVERS",
    "CommandDriver",
    "HostPower",
    "IpmiDriver",
    "LabDriver",
    "PowerDecision",
    "PowerDriver",
    "PowerError",
    "PowerResult",
    "PowerTracker",
    "WolDriver",
    "apply_power",
    "decide_power",
    "drivers_for",
    "make_driver",
]


def _problems(cfg: PowerDriverConfig, where: str) -> list[str]:
    """What the config loader checks too (``config.power_problems``: needed keys, command
    templates, the password file's mode), and the MAC as the driver reads it."""
    if cfg.driver not in DRIVERS:
        return [f"{where}.driver: unknown driver {cfg.driver!r} (one of {', '.join(DRIVERS)})"]
    out = [f"{format_path((where, *rel))}: {message}" for rel, message in power_problems(cfg)]
    if cfg.driver == "wol" and cfg.mac:
        try:
            parse_mac(cfg.mac)
        except PowerError as exc:
            out.append(f"{where}.mac: {exc}")
    return out


def make_driver(cfg: PowerDriverConfig, where: str = "power") -> PowerDriver | None:
    """The driver for one host, None for ``driver: none``; ConfigError on bad settings."""
    problems = _problems(cfg, where)
    if problems:
        raise ConfigError(problems)
    if cfg.driver == "ipmi":
        return IpmiDriver(cfg.ipmi_address, cfg.ipmi_user, cfg.ipmi_password_file)
    if cfg.driver == "wol":
        return WolDriver(cfg.mac, cfg.broadcast, off_command=cfg.off_command)
    if cfg.driver == "command":
        return CommandDriver(cfg.on_command, cfg.off_command)
    if cfg.driver == "lab":
        return LabDriver(cfg.lab_dir)
    return None


def drivers_for(hosts: Iterable[HostConfig]) -> dict[str, PowerDriver]:
    """host name -> driver, every problem of every host reported at once."""
    drivers: dict[str, PowerDriver] = {}
    problems: list[str] = []
    for i, host in enumerate(hosts):
        try:
            driver = make_driver(host.power, f"hosts[{i}].power")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if driver is not None:
            drivers[host.name] = driver
    if problems:
        raise ConfigError(problems)
    return drivers
