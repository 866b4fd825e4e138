"""Daemon settings (YAML): hosts and their URIs, policy files, intervals, metrics, state.

``load_config(path)`` validates the whole file and raises ``ConfigError`` listing every
problem as ``FILE:LINE: field.path: message``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PowerDriverConfig:
    """How to switch one host on and off. ``driver``: ipmi | wol | command | lab | none."""

    driver: str = "none"
    # ipmi
    ipmi_address: str = ""
    ipmi_user: str = ""
    ipmi_password_file: str = ""
    # wol
    mac: str = ""
    broadcast: str = "255.255.255.255"
    # command: argument lists with {host} substituted, never run through a shell
    on_command: tuple[str, ...] = ()
    off_command: tuple[str, ...] = ()
    # lab: the lab state directory holding the host
    lab_dir: str = ""


@dataclass(frozen=True)
class HostConfig:
    name: str
    uri: str  # e.g. qemu+tcp://10.77.0.11/system or qemu+tls://host1/system
    migration_uri: str = ""  # e.g. tcp://10.77.0.11 (where the migration stream goes)
    power: PowerDriverConfig = field(default_factory=PowerDriverConfig)
    # Capacity to plan with instead of what the host reports (0 = use the host's).
    # The lab uses it: its hosts share one machine's CPUs and memory.
    cpus: int = 0
    mem_bytes: int = 0


@dataclass(frozen=True)
class ScheduleEntry:
    """From ``cron`` (a 5-field crontab expression marking when the window starts) for
    ``duration_s``, ``policy`` is active; ``freeze`` windows forbid migrations."""

    cron: str
    duration_s: float
    policy: str = ""  # path; "" for a freeze window
    freeze: bool = False


@dataclass(frozen=True)
class Config:
    hosts: tuple[HostConfig, ...]
    policy: str  # path of the default policy file
    schedule: tuple[ScheduleEntry, ...] = ()
    metrics_listen: str = "127.0.0.1:9177"
    state_dir: str = "/var/lib/balancerd"
    collect_interval_s: float = 15.0
    cycle_interval_s: float = 300.0
    smoothing_window: int = 4  # samples averaged for utilization
    host_timeout_s: float = 5.0  # per call to one host
    source: str = ""  # the file it was loaded from

    def policy_path(self) -> Path:
        """The default policy, relative paths taken from the config file's folder."""
        return resolve_relative(self.source, self.policy)


def resolve_relative(config_file: str, path: str) -> Path:
    p = Path(path)
    if p.is_absolute() or not config_file:
        return p
    return Path(config_file).resolve().parent / p
