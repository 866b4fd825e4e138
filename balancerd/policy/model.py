"""The policy document as frozen values. The keys, types and help text of the file are in
policy/spec.py; loading is policy/load.py, rules across fields policy/rules.py.

Field names here are the YAML keys under ``spec`` (same nesting), so an error's
field path is also the path in this structure.

Words with a fixed set of values are ``StrEnum``s: the loader builds the members, and a
member equals its string (``policy.objective == "power-save"``), so plain strings given
by code and tests compare the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from balancerd.selectors import Selected
from balancerd.units import GIB, MIB


class Objective(StrEnum):
    BALANCE = "balance"  # even out host utilization
    POWER_SAVE = "power-save"  # pack guests on few hosts, power off the empty ones


class Mode(StrEnum):
    AUTOMATIC = "automatic"  # migrate
    RECOMMEND = "recommend"  # compute, report and export the plan; move nothing


class OnStall(StrEnum):
    """The last step when a migration stops converging."""

    PAUSE = "pause"  # pause the guest so the rest goes across
    ABORT = "abort"  # abort; the guest stays where it was
    # switch to post-copy: the guest runs on the destination at once and pulls the rest;
    # only where both hosts support it (else pause). Risk: a failure mid post-copy leaves
    # the only complete guest split across two hosts (recovery needs both hosts back).
    POSTCOPY = "postcopy"


class MigrationCompression(StrEnum):
    """Compression of the migration stream."""

    NONE = "none"
    # zstd per connection (multifd; needs parallel_connections >= 2 and a libvirt that
    # offers it, else preflight falls back to none with a warning)
    ZSTD = "zstd"
    ZLIB = "zlib"
    # QEMU's older multi-threaded zlib compression (libvirt < 9.4 offers only this and
    # xbzrle; QEMU 8.2 deprecates it)
    MT = "mt"


class MigrationTls(StrEnum):
    """Whether migration streams are encrypted (VIR_MIGRATE_TLS)."""

    AUTO = "auto"  # when the source can send and the destination receive TLS streams
    REQUIRED = "required"  # always; preflight skips a move between hosts that cannot
    DISABLED = "disabled"  # never (clear text)


class SolverBackend(StrEnum):
    CBC = "cbc"
    HIGHS = "highs"


@dataclass(frozen=True)
class Resources:
    cpu_weight: float = 1.0  # spec.resources.cpu.weight
    memory_weight: float = 1.0  # spec.resources.memory.weight


@dataclass(frozen=True)
class Limits:
    max_cpu_util: float = 0.85  # a host's CPU demand / capacity must stay at or below
    max_mem_util: float = 0.90  # a host's guest memory / total memory must stay at or below
    mem_headroom_bytes: int = 512 * MIB  # kept free on each host for the host itself
    cpu_overcommit: float = 4.0  # allowed vCPUs per host CPU


@dataclass(frozen=True)
class Hysteresis:
    min_improvement: float = 0.05  # act only if the objective improves by this (absolute util)
    cooldown_s: float = 600.0  # a guest moved is left alone this long


@dataclass(frozen=True)
class DemandForecast:
    """Each guest's CPU demand for planning: this quantile of its readings in the last
    ``window_s`` (plan for the busy moments, not the average)."""

    quantile: float = 0.9
    window_s: float = 7200.0


@dataclass(frozen=True)
class Budget:
    max_moves: int = 20  # per cycle
    max_bytes: int = 64 * GIB  # guest memory moved per cycle


@dataclass(frozen=True)
class HostRule:
    """Guests in ``vms`` must / should (not) run on ``hosts``."""

    vms: tuple[str, ...]
    hosts: tuple[str, ...]
    kind: str  # must | must_not | should | should_not
    weight: float = 1.0  # for should / should_not: cost per guest that breaks it


@dataclass(frozen=True)
class Constraints:
    pin: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # VM -> allowed hosts
    exclude_vms: tuple[str, ...] = ()  # never moved, still counted on their host
    exclude_hosts: tuple[str, ...] = ()  # neither source nor target of moves
    affinity: tuple[tuple[str, ...], ...] = ()  # each group on one host
    anti_affinity: tuple[tuple[str, ...], ...] = ()  # each group on distinct hosts
    host_rules: tuple[HostRule, ...] = ()
    maintenance: tuple[str, ...] = ()  # drain these hosts completely
    # Selectors written among the names above (balancerd/selectors.py): the fields hold
    # only the names written; ``resolve_policy`` adds what the selectors match each cycle.
    selectors: tuple[Selected, ...] = ()


@dataclass(frozen=True)
class PowerModel:
    idle_watts: float = 100.0
    max_watts: float = 250.0


@dataclass(frozen=True)
class Power:
    min_active_hosts: int = 1
    reserve_hosts: int = 0  # kept on and empty beyond what the placement needs
    grace_period_s: float = 300.0  # empty this long before it is powered off
    min_off_s: float = 900.0  # off at least this long (against flapping)
    # false: a host holding defined-but-stopped guests stays on (they could not be started)
    allow_off_with_stopped_guests: bool = False
    host_models: Mapping[str, PowerModel] = field(default_factory=dict)  # host -> watts
    default_model: PowerModel = field(default_factory=PowerModel)


@dataclass(frozen=True)
class Migration:
    bandwidth_mib_s: float = 100.0
    max_downtime_ms: int = 300
    max_concurrent: int = 2  # cluster-wide
    max_concurrent_per_host: int = 1  # in or out of one host
    on_stall: OnStall = OnStall.PAUSE
    # The stall ladder, climbed in order: downtime steps, then auto-converge, then on_stall.
    downtime_steps_ms: tuple[int, ...] = (500, 1000, 2000)
    auto_converge: bool = True
    stall_samples: int = 5  # remaining data not shrinking over this many 1 s samples
    max_time_s: float = 600.0  # hard cap on one migration
    allow_cold: bool = True  # cold migration when a live job fails for other reasons
    allow_backward: bool = False  # destination libvirt/QEMU older than the source
    copy_storage_vms: tuple[str, ...] = ()  # guests whose disks may be copied
    unsafe_cache_vms: tuple[str, ...] = ()  # guests accepting disks with cache != none
    no_pause_vms: tuple[str, ...] = ()  # guests never paused: on a stall they abort
    tls: MigrationTls = MigrationTls.AUTO  # encrypt the migration stream
    # VIR_MIGRATE_PARALLEL with this many connections; 0 or 1: one stream (off)
    parallel_connections: int = 0
    compression: MigrationCompression = MigrationCompression.NONE


@dataclass(frozen=True)
class Solver:
    backend: SolverBackend = SolverBackend.CBC
    time_limit_s: float = 10.0
    gap: float = 0.01  # relative gap at which the solver may stop
    migration_cost: float = 0.01  # objective units per GiB moved


@dataclass(frozen=True)
class Policy:
    name: str
    objective: Objective = Objective.BALANCE
    mode: Mode = Mode.AUTOMATIC
    resources: Resources = field(default_factory=Resources)
    limits: Limits = field(default_factory=Limits)
    hysteresis: Hysteresis = field(default_factory=Hysteresis)
    forecast: DemandForecast = field(default_factory=DemandForecast)
    budget: Budget = field(default_factory=Budget)
    constraints: Constraints = field(default_factory=Constraints)
    power: Power = field(default_factory=Power)
    migration: Migration = field(default_factory=Migration)
    solver: Solver = field(default_factory=Solver)
    source: str = ""  # file it was loaded from
    # Field path -> line in ``source`` (for rules checked against the daemon config).
    lines: Mapping[tuple[str | int, ...], int] = field(
        default_factory=dict, compare=False, repr=False
    )
