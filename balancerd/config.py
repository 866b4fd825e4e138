"""Daemon settings (YAML): hosts and their URIs, policy files, intervals, metrics, state.

``load_config(path)`` validates the whole file and raises ``ConfigError`` listing every
problem as ``FILE:LINE: field.path: message``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from balancerd.errors import ConfigError
from balancerd.units import MIB
from balancerd.validate import (
    COUNT,
    INVALID,
    NAME,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_COUNT,
    Flag,
    ListOf,
    Problems,
    Text,
    fld,
    obj,
)
from balancerd.yamlpos import Document, FieldPath, YamlError, load_file, load_text


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
    # No progress from the collect/cycle jobs for this long (a call hung past every
    # timeout): stop feeding the systemd watchdog, so systemd restarts the daemon.
    stall_timeout_s: float = 60.0
    source: str = ""  # the file it was loaded from

    def policy_path(self) -> Path:
        """The default policy, relative paths taken from the config file's folder."""
        return resolve_relative(self.source, self.policy)


def resolve_relative(config_file: str, path: str) -> Path:
    p = Path(path)
    if p.is_absolute() or not config_file:
        return p
    return Path(config_file).resolve().parent / p


# --------------------------------------------------------------------------------------
# Loading (same error style as policies: every problem at once, FILE:LINE: field: message)

_CRON_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def cron_trigger(expr: str, timezone: Any = None) -> Any:
    """An APScheduler ``CronTrigger`` for a standard 5-field crontab expression.

    Unlike ``CronTrigger.from_crontab`` (APScheduler 3.x counts day-of-week from Monday
    = 0, so its ``1-5`` means Tuesday..Saturday), day-of-week numbers here follow cron:
    0 and 7 are Sunday, 1 is Monday. Raises ``ValueError`` on a bad expression.
    Note: when both day-of-month and day-of-week are restricted, APScheduler requires
    both to match (cron fires when either does).
    """
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(fields)}")
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_cron_weekdays(weekday),
        timezone=timezone,
    )


def _cron_weekdays(field_text: str) -> str:
    """Cron day-of-week numbers -> day names APScheduler reads the same way."""
    out: list[str] = []
    for token in field_text.split(","):
        m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", token)
        if m is None:  # names (mon-fri) mean the same in both
            out.append(token)
            continue
        if m.group(1) == "*":
            if m.group(4) is None:
                out.append("*")
                continue
            first, last = 0, 6
        else:
            first = int(m.group(2))
            last = int(m.group(3)) if m.group(3) is not None else first
            if m.group(3) is None and m.group(4) is not None:
                last = 7  # "1/2": from 1 to the end
        step = int(m.group(4)) if m.group(4) is not None else 1
        if not (0 <= first <= 7 and 0 <= last <= 7) or first > last or step < 1:
            raise ValueError(f"bad day-of-week '{token}' (0-7, 0 and 7 = Sunday)")
        days = sorted(
            {_CRON_DAY_NAMES[d] for d in range(first, last + 1, step)}, key=_CRON_DAY_NAMES.index
        )
        out.extend(days)
    return ",".join(out)


_DRIVER_KEYS = {  # power driver -> keys it uses (besides "driver")
    "ipmi": ("address", "user", "password_file"),
    "wol": ("mac", "broadcast"),
    "command": ("on_command", "off_command"),
    "lab": ("lab_dir",),
    "none": (),
}
_DRIVER_NEEDS = {
    "ipmi": ("address",),
    "wol": ("mac",),
    "command": ("on_command", "off_command"),
    "lab": ("lab_dir",),
}

_ARGV = ListOf(Text(), min_items=1)
_POWER = obj(
    {
        "driver": fld(Text(enum=tuple(_DRIVER_KEYS)), "how the host is switched on and off"),
        "address": fld(Text(), "ipmi: BMC address", "ipmi_address"),
        "user": fld(Text(), "ipmi: BMC user", "ipmi_user"),
        "password_file": fld(Text(), "ipmi: file holding the BMC password", "ipmi_password_file"),
        "mac": fld(
            Text(
                pattern=r"[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}",
                pattern_doc="a MAC address like 52:54:00:12:34:56",
            ),
            "wol: the host's MAC address",
        ),
        "broadcast": fld(Text(), "wol: broadcast address the magic packet goes to"),
        "on_command": fld(_ARGV, "command: argv that powers the host on ({host} substituted)"),
        "off_command": fld(_ARGV, "command: argv that powers the host off ({host} substituted)"),
        "lab_dir": fld(Text(), "lab: the lab state directory holding the host"),
    },
    cls=PowerDriverConfig,
)
_HOST = obj(
    {
        "name": fld(NAME, "host name used in policies, logs and metrics", required=True),
        "uri": fld(Text(), "libvirt URI, e.g. qemu+tcp://10.77.0.11/system", required=True),
        "migration_uri": fld(Text(), "where the migration stream goes, e.g. tcp://10.77.0.11"),
        "cpus": fld(COUNT, "CPUs to plan with instead of what the host reports (0: the host's)"),
        "mem_mib": fld(
            NON_NEGATIVE,
            "MiB of memory to plan with instead of what the host reports (0: the host's)",
            "mem_bytes",
            scale=MIB,
            as_int=True,
        ),
        "power": fld(_POWER, "power driver"),
    },
    cls=HostConfig,
)
_SCHEDULE = obj(
    {
        "cron": fld(Text(), "5-field crontab expression: when the window opens", required=True),
        "duration_h": fld(POSITIVE, "hours the window stays open", "duration_s", scale=3600),
        "duration_s": fld(POSITIVE, "seconds the window stays open"),
        "policy": fld(Text(), "policy file in force during the window"),
        "freeze": fld(Flag(), "true: no migrations during the window"),
    },
    cls=ScheduleEntry,
)
CONFIG = obj(
    {
        "hosts": fld(ListOf(_HOST, min_items=1), "the cluster's hosts", required=True),
        "policy": fld(Text(), "default policy file", required=True),
        "schedule": fld(ListOf(_SCHEDULE), "policies and freeze windows by time"),
        "metrics": fld(
            obj(
                {"listen": fld(Text(), "HOST:PORT of the Prometheus endpoint", "metrics_listen")},
                defaults=Config,
            ),
            "Prometheus metrics",
            inline=True,
        ),
        "state_dir": fld(Text(), "directory for the daemon's state"),
        "collect_interval_s": fld(POSITIVE, "seconds between samples of the hosts"),
        "cycle_interval_s": fld(POSITIVE, "seconds between balancing cycles"),
        "smoothing_window": fld(POSITIVE_COUNT, "samples averaged for utilization"),
        "host_timeout_s": fld(POSITIVE, "seconds allowed for one call to one host"),
        "stall_timeout_s": fld(
            POSITIVE, "seconds without job progress before the systemd watchdog is starved"
        ),
    },
    cls=Config,
)


def load_config(path: str | Path) -> Config:
    """Read and validate the daemon config; raises ``ConfigError`` with every problem."""
    try:
        doc = load_file(path)
    except YamlError as exc:
        raise ConfigError(exc.problems) from exc
    return _validate_config(doc)


def load_config_text(text: str, source: str) -> Config:
    """Like ``load_config`` for text already read; relative paths are taken from
    ``source``'s folder."""
    try:
        doc = load_text(text, source)
    except YamlError as exc:
        raise ConfigError(exc.problems) from exc
    return _validate_config(doc)


def _validate_config(doc: Document) -> Config:
    out = Problems(doc)
    if doc.data is None:
        raise ConfigError([f"{doc.source}:1: the file is empty (expected hosts and policy)"])
    built = CONFIG.check(doc.data, (), out)
    if isinstance(doc.data, dict):
        _cross_check_config(doc.data, out)
    if built is INVALID and not out.lines:
        out.add((), "invalid config")  # not reached: every INVALID records its problem
    if out.lines:
        raise ConfigError(out.lines)
    config: Config = dataclasses.replace(built, source=doc.source)
    return config


def _cross_check_config(data: dict[Any, Any], out: Problems) -> None:
    """Rules over several fields, on the written values (each checked for its type)."""
    hosts = data.get("hosts")
    for key in ("name", "uri"):
        first: dict[str, int] = {}
        for index, host in enumerate(hosts if isinstance(hosts, list) else []):
            value = host.get(key) if isinstance(host, dict) else None
            if not isinstance(value, str):
                continue
            if value in first:
                out.add(
                    ("hosts", index, key),
                    f"'{value}' is used by hosts[{first[value]}] too: each host needs its own",
                )
            else:
                first[value] = index
    for index, host in enumerate(hosts if isinstance(hosts, list) else []):
        power = host.get("power") if isinstance(host, dict) else None
        if isinstance(power, dict):
            _check_power_driver(power, ("hosts", index, "power"), out)
    metrics = data.get("metrics")
    listen = metrics.get("listen") if isinstance(metrics, dict) else None
    if isinstance(listen, str) and listen:
        problem = _listen_problem(listen)
        if problem:
            out.add(("metrics", "listen"), problem)
    source = out.doc.source
    policy = data.get("policy")
    if isinstance(policy, str) and policy:
        _check_file(source, policy, ("policy",), out)
    schedule = data.get("schedule")
    for index, entry in enumerate(schedule if isinstance(schedule, list) else []):
        if isinstance(entry, dict):
            _check_schedule_entry(entry, ("schedule", index), out)
    collect, cycle = data.get("collect_interval_s"), data.get("cycle_interval_s")
    if _is_number(collect) and _is_number(cycle) and 0 < cycle < collect:
        out.add(
            ("cycle_interval_s",),
            f"{cycle} is shorter than collect_interval_s {collect}: a cycle needs fresh samples",
        )


def _check_power_driver(power: dict[Any, Any], path: FieldPath, out: Problems) -> None:
    driver = power.get("driver", "none")
    if driver not in _DRIVER_KEYS:
        return  # reported by the field check
    used = _DRIVER_KEYS[driver]
    for key in power:
        if key != "driver" and key in _POWER.fields and key not in used:
            out.add((*path, key), f"not used by driver {driver}")
    for key in _DRIVER_NEEDS.get(driver, ()):
        if key not in power:
            out.add((*path, key), f"required by driver {driver}")


def _check_schedule_entry(entry: dict[Any, Any], path: FieldPath, out: Problems) -> None:
    cron = entry.get("cron")
    if isinstance(cron, str) and cron:
        try:
            cron_trigger(cron)
        except ValueError as exc:
            out.add((*path, "cron"), f"not a valid crontab expression '{cron}': {exc}")
    has_h, has_s = "duration_h" in entry, "duration_s" in entry
    if has_h and has_s:
        out.add((*path, "duration_s"), "give duration_h or duration_s, not both")
    elif not has_h and not has_s:
        out.add(path, "missing duration_h or duration_s (how long the window stays open)")
    freeze = entry.get("freeze") is True
    policy = entry.get("policy")
    if freeze and "policy" in entry:
        out.add((*path, "policy"), "a freeze window has no policy (it forbids migrations)")
    elif not freeze and "policy" not in entry:
        out.add(path, "missing policy (or freeze: true for a window without migrations)")
    if isinstance(policy, str) and policy and not freeze:
        _check_file(out.doc.source, policy, (*path, "policy"), out)


def _check_file(source: str, path: str, field_path: FieldPath, out: Problems) -> None:
    resolved = resolve_relative(source, path)
    if not resolved.is_file():
        out.add(field_path, f"policy file not found: {resolved}")


def _listen_problem(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        return f"must be HOST:PORT (e.g. 127.0.0.1:9177), got '{listen}'"
    if host.startswith("[") != host.endswith("]"):
        return f"an IPv6 address must be written [ADDR]:PORT, got '{listen}'"
    if ":" in host and not host.startswith("["):
        return f"an IPv6 address must be written [ADDR]:PORT, got '{listen}'"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port must be 1..65535, got '{port}'"
    return ""


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
