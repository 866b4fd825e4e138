"""Daemon settings (YAML): hosts and their URIs, policy files, intervals, metrics, state.

``load_config(path)`` validates the whole file and raises ``ConfigError`` listing every
problem as ``FILE:LINE: field.path: message``. Whatever it accepts can run: every number
has an upper bound, the daemon can reach READY within the unit's start timeout, each
host's power section builds its driver, URIs use known transports. Rules between the
config and the policies it names are ``cross_check_policies``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import stat
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import unquote, urlsplit

from balancerd.errors import ConfigError
from balancerd.units import MIB
from balancerd.validate import (
    DAY_S,
    HOUR_S,
    INVALID,
    NAME,
    YEAR_S,
    Flag,
    ListOf,
    MapOf,
    Problems,
    Text,
    amount,
    count,
    fld,
    format_number,
    obj,
    seconds,
)
from balancerd.yamlpos import (
    Document,
    FieldPath,
    YamlError,
    format_path,
    line_of,
    load_file,
    load_text,
    show,
)

if TYPE_CHECKING:
    from balancerd.policy.model import Policy

# TimeoutStartSec= of systemd/balancerd.service (a test keeps the two equal): READY must
# come within it, and READY needs READY_SAMPLES samples of the hosts.
START_TIMEOUT_S = 180.0
READY_SAMPLES = 2

# libvirt URI transports balancerd connects with unless the config allows more.
KNOWN_URI_TRANSPORTS = ("qemu", "qemu+tcp", "qemu+tls", "qemu+ssh", "qemu+unix", "test")
# URI query parameters that make libvirt run a program (ext: command=; ssh: netcat=).
PROGRAM_URI_PARAMS = ("command", "netcat")
# What libvirt's client reads from a ?pkipath= folder (``pki_dir``).
PKI_FILES = ("cacert.pem", "clientcert.pem", "clientkey.pem")


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
    # Per-core speed in MHz of a reference core (0 = the nominal frequency libvirt reports):
    # set it where host generations differ in work per clock (balancerd/speed.py).
    cpu_speed_mhz: float = 0.0
    # Client PKI folder for qemu+tls URIs (cacert.pem, clientcert.pem, clientkey.pem):
    # balancerd connects with ?pkipath= naming it. "" = the config's pki_dir, else
    # libvirt's default (~/.pki/libvirt, then /etc/pki).
    pki_dir: str = ""
    # Labels policies select hosts by ({hosts: {labels: {gen: g4}}}, balancerd/selectors.py)
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsTls:
    """TLS for the metrics endpoint (prometheus-client's own): off unless cert_file is set;
    with client_ca_file, scrapers must present a certificate that CA signed."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class CoordinationTls:
    """Client TLS towards etcd (https endpoints): the CA that signed the members'
    certificates, and this client's certificate and key where etcd asks for one."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class CoordinationConfig:
    """``coordination:``. Absent (backend ``none``): one balancerd, the state-directory lock.
    ``etcd``: several instances; the one holding the leader lock (a tooz lock with a lease
    of ``lock_ttl_s``) acts, the others stand by (see balancerd/coord)."""

    backend: str = "none"  # none | etcd
    endpoints: tuple[str, ...] = ()  # http(s)://HOST:PORT of the etcd members
    lock_ttl_s: int = 10
    cluster: str = "default"  # names the lock and the journal: instances of one cluster
    node: str = ""  # this instance's name in status, metrics and etcd ("": the host name)
    tls: CoordinationTls = field(default_factory=CoordinationTls)


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
    metrics_tls: MetricsTls = field(default_factory=MetricsTls)
    pki_dir: str = ""  # client PKI folder for every qemu+tls host without its own
    state_dir: str = "/var/lib/balancerd"
    collect_interval_s: float = 15.0
    cycle_interval_s: float = 300.0
    smoothing_window: int = 4  # samples averaged for utilization
    host_timeout_s: float = 5.0  # per call to one host
    # No progress from the collect/cycle jobs for this long (a call hung past every
    # timeout): stop feeding the systemd watchdog, so systemd restarts the daemon.
    stall_timeout_s: float = 60.0
    # URI transports allowed besides KNOWN_URI_TRANSPORTS (and with them, for their URIs,
    # the query parameters that run programs): the operator's explicit choice.
    allow_uri_transports: tuple[str, ...] = ()
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    # Folders every host sees at the same path (NFS, Ceph FS, ...): a guest disk or CD-ROM
    # outside them is local to its host and fixes the guest in place. Empty: not judged.
    shared_storage: tuple[str, ...] = ()
    source: str = ""  # the file it was loaded from
    lines: Mapping[FieldPath, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, path: FieldPath) -> str:
        """``FILE:LINE`` of a field (of its nearest written ancestor if not written)."""
        return f"{self.source}:{line_of(self.lines, path)}"

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
    "wol": ("mac", "broadcast", "off_command"),
    "command": ("on_command", "off_command"),
    "lab": ("lab_dir",),
    "none": (),
}
# Keys a driver cannot be built without (``power.make_driver`` asks the same).
DRIVER_NEEDS = {
    "ipmi": ("address", "user", "password_file"),
    "wol": ("mac",),
    "command": ("on_command", "off_command"),
    "lab": ("lab_dir",),
}

_ARGV = ListOf(Text(max_len=1024), min_items=1)
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
        "broadcast": fld(Text(max_len=15), "wol: IPv4 broadcast address the magic packet goes to"),
        "on_command": fld(_ARGV, "command: argv that powers the host on ({host} substituted)"),
        "off_command": fld(
            _ARGV, "command, wol: argv that powers the host off ({host} substituted)"
        ),
        "lab_dir": fld(Text(), "lab: the lab state directory holding the host"),
    },
    cls=PowerDriverConfig,
)
_HOST = obj(
    {
        "name": fld(NAME, "host name used in policies, logs and metrics", required=True),
        "uri": fld(Text(), "libvirt URI, e.g. qemu+tcp://10.77.0.11/system", required=True),
        "migration_uri": fld(Text(), "where the migration stream goes, e.g. tcp://10.77.0.11"),
        "cpus": fld(
            count(2**20), "CPUs to plan with instead of what the host reports (0: the host's)"
        ),
        "mem_mib": fld(
            amount(2**32),
            "MiB of memory to plan with instead of what the host reports (0: the host's)",
            "mem_bytes",
            scale=MIB,
            as_int=True,
        ),
        "cpu_speed_mhz": fld(
            amount(10**6),
            "per-core speed, in MHz of a reference core, to compare hosts whose cores differ "
            "(0: the nominal frequency libvirt reports)",
        ),
        "power": fld(_POWER, "power driver"),
        "labels": fld(
            MapOf(NAME, key_doc="label", key=NAME),
            "labels policies select the host by, e.g. {gen: g4, rack: r1}",
        ),
        "pki_dir": fld(
            Text(),
            "qemu+tls: client PKI folder (cacert.pem, clientcert.pem, clientkey.pem) "
            "balancerd connects with (default: the config's pki_dir)",
        ),
    },
    cls=HostConfig,
)
_METRICS_TLS = obj(
    {
        "cert_file": fld(Text(), "PEM certificate (chain) the endpoint presents", required=True),
        "key_file": fld(Text(), "PEM private key of cert_file", required=True),
        "client_ca_file": fld(
            Text(), "PEM CA bundle: scrapers must present a certificate it signed"
        ),
    },
    cls=MetricsTls,
)
_SCHEDULE = obj(
    {
        "cron": fld(Text(), "5-field crontab expression: when the window opens", required=True),
        "duration_h": fld(
            amount(YEAR_S // HOUR_S, positive=True, doc="1 year"),
            "hours the window stays open",
            "duration_s",
            scale=HOUR_S,
        ),
        "duration_s": fld(seconds(YEAR_S), "seconds the window stays open"),
        "policy": fld(Text(), "policy file in force during the window"),
        "freeze": fld(Flag(), "true: no migrations during the window"),
    },
    cls=ScheduleEntry,
)
_COORDINATION = obj(
    {
        "backend": fld(
            Text(enum=("none", "etcd")), "none: one balancerd; etcd: instances elect a leader"
        ),
        "endpoints": fld(
            ListOf(
                Text(
                    pattern=r"https?://[A-Za-z0-9_.:\[\]-]+",
                    pattern_doc="an etcd client URL like http://10.0.0.5:2379",
                    max_len=300,
                ),
                unique=True,
            ),
            "etcd client URLs (tried in turn when one does not answer)",
        ),
        "lock_ttl_s": fld(
            count(3600, low=2, doc="1 hour"),
            "lease of the leader lock: a standby takes over about this long after the "
            "leader dies; a leader cut off from etcd stops acting within it",
        ),
        "cluster": fld(NAME, "names the leader lock and the journal in etcd"),
        "node": fld(NAME, "this instance's name (default: the host name)"),
        "tls": fld(
            obj(
                {
                    "ca_file": fld(Text(), "PEM CA bundle that signed the etcd members"),
                    "cert_file": fld(Text(), "PEM client certificate for etcd"),
                    "key_file": fld(Text(), "PEM private key of cert_file"),
                },
                cls=CoordinationTls,
            ),
            "TLS towards https endpoints",
        ),
    },
    cls=CoordinationConfig,
)
CONFIG = obj(
    {
        "hosts": fld(ListOf(_HOST, min_items=1), "the cluster's hosts", required=True),
        "policy": fld(Text(), "default policy file", required=True),
        "schedule": fld(ListOf(_SCHEDULE), "policies and freeze windows by time"),
        "metrics": fld(
            obj(
                {
                    "listen": fld(Text(), "HOST:PORT of the Prometheus endpoint", "metrics_listen"),
                    "tls": fld(_METRICS_TLS, "serve the endpoint over HTTPS", "metrics_tls"),
                },
                defaults=Config,
            ),
            "Prometheus metrics",
            inline=True,
        ),
        "pki_dir": fld(
            Text(),
            "qemu+tls: client PKI folder (cacert.pem, clientcert.pem, clientkey.pem) for "
            "hosts without their own pki_dir",
        ),
        "state_dir": fld(Text(), "directory for the daemon's state"),
        "coordination": fld(_COORDINATION, "several balancerd instances, one acting (etcd)"),
        "shared_storage": fld(
            ListOf(
                Text(pattern=r"/\S*", pattern_doc="an absolute folder like /srv/vm-images"),
                unique=True,
            ),
            "folders every host sees at the same path; a guest disk or CD-ROM outside them "
            "is local and keeps the guest on its host (empty: disks are not judged)",
        ),
        "collect_interval_s": fld(
            seconds(DAY_S),
            f"seconds between samples of the hosts (READY needs {READY_SAMPLES} samples "
            f"within the unit's start timeout, {format_number(START_TIMEOUT_S)} s)",
        ),
        "cycle_interval_s": fld(seconds(YEAR_S), "seconds between balancing cycles"),
        "smoothing_window": fld(count(1000, low=1), "samples averaged for utilization"),
        "host_timeout_s": fld(seconds(HOUR_S), "seconds allowed for one call to one host"),
        "stall_timeout_s": fld(
            seconds(DAY_S),
            "seconds without job progress before the systemd watchdog is starved",
        ),
        "allow_uri_transports": fld(
            ListOf(
                Text(
                    pattern=r"[a-z][a-z0-9.-]*(\+[a-z0-9.-]+)?",
                    pattern_doc="a libvirt URI scheme like qemu+libssh2",
                    max_len=64,
                ),
                unique=True,
            ),
            "libvirt URI transports allowed besides "
            + ", ".join(KNOWN_URI_TRANSPORTS)
            + " (their URIs may also use command= / netcat=, which run programs)",
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
    config: Config = dataclasses.replace(built, source=doc.source, lines=doc.lines)
    if config.pki_dir:
        hosts = tuple(
            h if h.pki_dir else dataclasses.replace(h, pki_dir=config.pki_dir) for h in config.hosts
        )
        config = dataclasses.replace(config, hosts=hosts)
    return config


def _cross_check_config(data: dict[Any, Any], out: Problems) -> None:  # noqa: C901 (a flat list of independent config checks)
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
    allowed = data.get("allow_uri_transports")
    allowed = [a for a in allowed if isinstance(a, str)] if isinstance(allowed, list) else []
    for index, host in enumerate(hosts if isinstance(hosts, list) else []):
        power = host.get("power") if isinstance(host, dict) else None
        if isinstance(power, dict):
            _check_power_driver(power, ("hosts", index, "power"), out)
        uri = host.get("uri") if isinstance(host, dict) else None
        if isinstance(uri, str) and uri:
            problem = uri_problem(uri, allowed)
            if problem:
                out.add(("hosts", index, "uri"), problem)
        pki = host.get("pki_dir") if isinstance(host, dict) else None
        if isinstance(pki, str) and pki:
            problem = pki_dir_problem(pki)
            if not problem and isinstance(uri, str) and not is_tls_uri(uri):
                problem = "only qemu+tls URIs use a PKI folder; this host's uri does not"
            if problem:
                out.add(("hosts", index, "pki_dir"), problem)
    pki = data.get("pki_dir")
    if isinstance(pki, str) and pki:
        problem = pki_dir_problem(pki)
        if problem:
            out.add(("pki_dir",), problem)
    metrics = data.get("metrics")
    listen = metrics.get("listen") if isinstance(metrics, dict) else None
    if isinstance(listen, str) and listen:
        problem = _listen_problem(listen)
        if problem:
            out.add(("metrics", "listen"), problem)
    tls = metrics.get("tls") if isinstance(metrics, dict) else None
    if isinstance(tls, dict):
        for key in ("cert_file", "key_file", "client_ca_file"):
            value = tls.get(key)
            if isinstance(value, str) and value:
                problem = tls_file_problem(value, private=key == "key_file")
                if problem:
                    out.add(("metrics", "tls", key), problem)
    source = out.doc.source
    policy = data.get("policy")
    if isinstance(policy, str) and policy:
        _check_file(source, policy, ("policy",), out)
    schedule = data.get("schedule")
    for index, entry in enumerate(schedule if isinstance(schedule, list) else []):
        if isinstance(entry, dict):
            _check_schedule_entry(entry, ("schedule", index), out)
    coordination = data.get("coordination")
    if isinstance(coordination, dict):
        _check_coordination(coordination, out)
    collect, cycle = data.get("collect_interval_s"), data.get("cycle_interval_s")
    if _is_number(collect) and _is_number(cycle) and 0 < cycle < collect:
        out.add(
            ("cycle_interval_s",),
            f"{cycle} is shorter than collect_interval_s {collect}: a cycle needs fresh samples",
        )
    if _is_number(collect) and READY_SAMPLES * collect > START_TIMEOUT_S:
        out.add(
            ("collect_interval_s",),
            f"{format_number(collect)} s: READY needs {READY_SAMPLES} samples "
            f"({format_number(READY_SAMPLES * collect)} s), longer than the start timeout "
            f"TimeoutStartSec={format_number(START_TIMEOUT_S)} s of balancerd.service: "
            "systemd would stop the daemon before it is ready",
        )


def _check_coordination(coord: dict[Any, Any], out: Problems) -> None:
    endpoints = coord.get("endpoints")
    urls = [e for e in endpoints if isinstance(e, str)] if isinstance(endpoints, list) else []
    backend = coord.get("backend", "none")
    if backend == "etcd" and not urls and "endpoints" not in coord:
        out.add(("coordination", "backend"), "etcd needs coordination.endpoints")
    if len({u.split("://")[0] for u in urls}) > 1:
        out.add(("coordination", "endpoints"), "mixes http:// and https://: use one scheme")
    if backend == "none" and urls:
        out.add(("coordination", "endpoints"), "not used with backend none (set backend: etcd)")
    tls = coord.get("tls")
    if isinstance(tls, dict):
        for key in ("ca_file", "cert_file", "key_file"):
            value = tls.get(key)
            if isinstance(value, str) and value:
                shown = show(value, 4096)
                if not os.path.isabs(value):
                    out.add(("coordination", "tls", key), f"must be an absolute path: {shown}")
                elif not os.path.isfile(value) or not os.access(value, os.R_OK):
                    out.add(("coordination", "tls", key), f"not a readable file: {shown}")
        if bool(tls.get("cert_file")) != bool(tls.get("key_file")):
            out.add(("coordination", "tls"), "cert_file and key_file go together")
        if urls and not any(u.startswith("https://") for u in urls):
            out.add(("coordination", "tls"), "set, but no endpoint is https://")


def _check_power_driver(power: dict[Any, Any], path: FieldPath, out: Problems) -> None:
    driver = power.get("driver", "none")
    if not isinstance(driver, str) or driver not in _DRIVER_KEYS:
        return  # reported by the field check
    used = _DRIVER_KEYS[driver]
    for key in power:
        if key != "driver" and key in _POWER.fields and key not in used:
            out.add((*path, key), f"not used by driver {driver}")
    # What building the driver would find (the same check as power.make_driver), on the
    # section's valid fields (the others are reported by the field check).
    built = _POWER.check(
        {k: v for k, v in power.items() if k in used or k == "driver"}, path, Problems(out.doc)
    )
    if built is INVALID:
        return
    for rel, message in power_problems(built):
        out.add((*path, *rel), message)


def power_problems(cfg: PowerDriverConfig) -> list[tuple[FieldPath, str]]:
    """What keeps ``cfg``'s driver from being built and run, as (path under ``power``,
    message): keys the driver needs, command templates, the password file's mode. The
    config loader and ``power.make_driver`` both ask this."""
    out: list[tuple[FieldPath, str]] = []
    values = {key: getattr(cfg, spec.attr or key) for key, spec in _POWER.fields.items()}
    for key in DRIVER_NEEDS.get(cfg.driver, ()):
        if not values[key]:
            out.append(((key,), f"required by driver {cfg.driver}"))
    if cfg.driver == "ipmi" and cfg.ipmi_password_file:
        problem = secret_file_problem(cfg.ipmi_password_file)
        if problem:
            out.append((("password_file",), problem))
    used = _DRIVER_KEYS.get(cfg.driver, ())
    for key in ("on_command", "off_command"):
        if key not in used:
            continue
        for index, arg in enumerate(values[key]):
            problem = argv_template_problem(arg)
            if problem:
                out.append(((key, index), problem))
    if cfg.driver == "wol" and cfg.broadcast:
        try:
            ipaddress.IPv4Address(cfg.broadcast)
        except ValueError:
            out.append((("broadcast",), f"must be an IPv4 address, got '{show(cfg.broadcast)}'"))
    return out


def secret_file_problem(path: str) -> str:
    """Why the file holding a password must not be used ("" if it may, or does not exist
    yet): a relative path (read from wherever the daemon runs), not a regular file, or
    group / others may read or write it."""
    shown = show(path, 4096)  # a path is shown whole (a Text is at most 4096 characters)
    if not os.path.isabs(path):
        return f"must be an absolute path, got '{shown}'"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ""  # checked again when the driver is built and used
    except (OSError, ValueError) as exc:
        return f"cannot check {shown}: {getattr(exc, 'strerror', None) or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{shown} is not a regular file"
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        return (
            f"{shown} is open to group or others (mode {mode:04o}): a password file "
            f"must be readable by its owner only (chmod 600 {shown})"
        )
    return ""


def is_tls_uri(uri: str) -> bool:
    """Whether libvirt reaches ``uri`` over TLS (and so reads a client PKI folder)."""
    # The scheme is what precedes the first colon (urlsplit would raise on "qemu+tls://[::1",
    # which uri_problem reports).
    return uri.partition(":")[0].lower().endswith("+tls")


def tls_file_problem(path: str, private: bool = False) -> str:
    """Why a certificate or key file cannot be used ("" if it can): a relative path, not
    a readable regular file, or (``private``) a key that others may read (group may: the
    key is often root:balancerd 0640)."""
    shown = show(path, 4096)
    if not os.path.isabs(path):
        return f"must be an absolute path, got '{shown}'"
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        return f"cannot use {shown}: {getattr(exc, 'strerror', None) or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{shown} is not a regular file"
    if private and st.st_mode & 0o007:
        mode = stat.S_IMODE(st.st_mode)
        return (
            f"{shown} is open to others (mode {mode:04o}): a private key must not be "
            f"(chmod o-rwx {shown})"
        )
    if not os.access(path, os.R_OK):
        return f"{shown} is not readable by this user (uid {os.geteuid()})"
    return ""


def pki_dir_problem(path: str) -> str:
    """Why ``path`` cannot serve as a libvirt client PKI folder ("" if it can): every file
    of PKI_FILES present and readable, the key closed to others."""
    shown = show(path, 4096)
    if not os.path.isabs(path):
        return f"must be an absolute path, got '{shown}'"
    if not os.path.isdir(path):
        return f"{shown} is not a directory"
    for name in PKI_FILES:
        problem = tls_file_problem(os.path.join(path, name), private=name == "clientkey.pem")
        if problem:
            return problem
    return ""


def argv_template_problem(arg: str) -> str:
    """Why an argument template of a power command cannot be expanded ("" if it can):
    ``{host}`` is the only field, without format spec or conversion (``{{`` ``}}`` for
    braces), so expanding never fails, reads attributes or builds a huge string."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(arg) if f is not None]
        specs = [(spec, conv) for _, f, spec, conv in string.Formatter().parse(arg) if f]
    except ValueError as exc:
        return f"bad command template '{show(arg)}': {exc} (write {{{{ and }}}} for braces)"
    if any(f != "host" for f in fields) or any(spec or conv for spec, conv in specs):
        return (
            f"bad command template '{show(arg)}': only {{host}} may be substituted "
            "(write {{ and }} for braces)"
        )
    return ""


def uri_problem(uri: str, allowed: Sequence[str] = ()) -> str:
    """Why balancerd will not connect to ``uri`` ("" if it will): a transport outside
    ``KNOWN_URI_TRANSPORTS`` and ``allowed``, or a query parameter that runs a program
    (``command=``, ``netcat=``) on a transport the operator did not allow explicitly."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        return f"not a libvirt URI ({exc}), e.g. qemu+tls://host1/system"
    scheme = parts.scheme.lower()
    if not scheme or not uri.lower().startswith(scheme + ":"):
        return f"not a libvirt URI: '{show(uri)}' has no transport, e.g. qemu+tls://host1/system"
    if scheme not in KNOWN_URI_TRANSPORTS and scheme not in allowed:
        return (
            f"transport '{show(scheme)}' is not allowed (known: "
            + ", ".join(KNOWN_URI_TRANSPORTS)
            + "); list it in allow_uri_transports to use it"
        )
    if scheme in allowed:
        return ""
    for param in re.split(r"[&;]", parts.query):
        name = unquote(param.partition("=")[0]).strip().lower()
        if name in PROGRAM_URI_PARAMS:
            return (
                f"query parameter {name}= makes libvirt run a program: refused (list "
                f"'{scheme}' in allow_uri_transports if you mean it)"
            )
    return ""


def cross_check_policies(config: Config, policies: Mapping[str, Policy]) -> list[str]:
    """Rules between the config and the policies it names (both already valid on their
    own), as ``FILE:LINE: field.path: message`` lines; empty when they fit together.
    ``daemon.reload.load_all`` runs it before a swap, as at start."""
    out: list[str] = []
    stall = config.stall_timeout_s
    stall_where = config.where(("stall_timeout_s",))
    for policy in policies.values():
        limit = policy.solver.time_limit_s
        # CBC is given whole seconds (at least 1); HiGHS the limit itself.
        runs = max(1.0, math.ceil(limit)) if policy.solver.backend == "cbc" else limit
        if runs >= stall:
            path: FieldPath = ("spec", "solver", "time_limit_s")
            cbc = f" (CBC runs {format_number(runs)} s)" if runs != limit else ""
            out.append(
                f"{policy.source}:{line_of(policy.lines, path)}: {format_path(path)}: "
                f"{format_number(limit)} s{cbc} is not below stall_timeout_s "
                f"{format_number(stall)} s ({stall_where}): the systemd watchdog would "
                "restart balancerd during a solve"
            )
    return out


def _check_schedule_entry(entry: dict[Any, Any], path: FieldPath, out: Problems) -> None:
    cron = entry.get("cron")
    if isinstance(cron, str) and cron:
        problem = cron_problem(cron)
        if problem:
            out.add((*path, "cron"), problem)
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


def cron_problem(expr: str) -> str:
    """Why ``expr`` cannot open a window ("" if it can): not a crontab expression, or one
    that never fires (the 30th of February)."""
    try:
        trigger = cron_trigger(expr, timezone=UTC)
    except ValueError as exc:
        return f"not a valid crontab expression '{show(expr)}': {show(str(exc), 200)}"
    # Any expression that fires at all does within 28 years (weekdays of a date repeat);
    # searching from far ahead stops at year 9999 quickly when it never does.
    if trigger.get_next_fire_time(None, _NEVER_FROM) is None:
        return f"'{show(expr)}' never fires (no such date)"
    return ""


_NEVER_FROM = datetime(9950, 1, 1, tzinfo=UTC)


def _check_file(source: str, path: str, field_path: FieldPath, out: Problems) -> None:
    resolved = resolve_relative(source, path)
    try:
        found = resolved.is_file()
    except OSError as exc:  # a name too long, a loop of links, ...
        out.add(field_path, f"policy file cannot be read: {exc.strerror or exc}")
        return
    if not found:
        out.add(field_path, f"policy file not found: {resolved}")


def _listen_problem(listen: str) -> str:
    shown = show(listen)
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        return f"must be HOST:PORT (e.g. 127.0.0.1:9177), got '{shown}'"
    if host.startswith("[") != host.endswith("]"):
        return f"an IPv6 address must be written [ADDR]:PORT, got '{shown}'"
    if ":" in host and not host.startswith("["):
        return f"an IPv6 address must be written [ADDR]:PORT, got '{shown}'"
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        return f"port must be 1..65535, got '{show(port)}'"
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"not an IPv6 address: '{show(host)}'"
    elif not _HOSTNAME.fullmatch(host):
        return f"not an IP address or host name: '{show(host)}'"
    return ""


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
