"""Frozen values passed through one cycle: collect -> solve -> plan -> execute.

Units are in the names: ``*_bytes``, ``*_s`` (seconds), ``*_util`` (0..1),
``*_cores`` (host CPU cores' worth of work).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from balancerd.outcomes import BlockerKind
from balancerd.speed import speed_factors


@dataclass(frozen=True)
class Blocker:
    """One reason a guest cannot be live-migrated: a bounded kind and what it names."""

    kind: BlockerKind
    detail: str  # e.g. "pci 0000:03:00.0", "disk vda /var/lib/libvirt/images/a.qcow2"

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def blockers_text(blockers: tuple[Blocker, ...]) -> str:
    """``hostdev: pci 0000:03:00.0; local-disk: vda /x.qcow2`` (for notes and status)."""
    return "; ".join(str(b) for b in blockers)


# --- raw samples, as read from a hypervisor (counters, not rates) ---------------------


@dataclass(frozen=True, slots=True)  # slots: 20,000 a sample at 1,000 hosts
class VmSample:
    """One guest as libvirt reports it at one instant."""

    name: str
    uuid: str
    state: str  # running | paused | shutoff | crashed | pmsuspended | blocked | other
    vcpus: int
    mem_bytes: int
    cpu_time_ns: int  # cumulative guest CPU time (counter)
    dirty_rate_bytes_s: float | None = None  # where libvirt reports one (calc-dirty-rate)
    dirty_calc_id: int = 0  # identifies that measurement (libvirt: its start time)
    dirty_calc_s: int = 0  # the period it measured over
    in_job: bool = False  # a libvirt job (e.g. migration) is running on this domain
    incoming: bool = False  # the domain is the paused target of an incoming migration
    tags: tuple[str, ...] = ()  # from the domain's balancerd metadata (policy selectors)
    # why it cannot be migrated (host device, mdev, local-only disk, ...); empty: movable
    blockers: tuple[Blocker, ...] = ()


@dataclass(frozen=True)
class HostSample:
    """One host at one instant. ``up`` false means every other field may be empty."""

    name: str
    uri: str
    up: bool
    sampled_at_s: float  # monotonic clock of the collector
    error: str = ""
    hostname: str = ""
    host_uuid: str = ""
    cpus: int = 0
    cpu_mhz: int = 0
    core_speed_mhz: int = 0  # nominal per-core frequency (TSC), 0 = not reported
    mem_total_bytes: int = 0
    mem_free_bytes: int = 0
    cpu_busy_ns: int = 0  # node CPU counters summed over all CPUs (counters)
    cpu_total_ns: int = 0
    libvirt_version: int = 0  # libvirt's integer encoding: major*1e6 + minor*1e3 + micro
    hypervisor_version: int = 0
    vms: tuple[VmSample, ...] = ()
    # the host's labels as the adapter knows them (libvirt: the daemon config), up or down
    labels: Mapping[str, str] = field(default_factory=dict)


# --- the collected snapshot: rates, smoothed ------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: 20,000 a sample at 1,000 hosts
class Vm:
    name: str
    uuid: str
    host: str
    state: str
    vcpus: int
    mem_bytes: int
    cpu_util: float  # 0..1 of its own vCPUs (smoothed)
    dirty_rate_bytes_s: float | None = None  # last measured (dirty-rate calc or migration)
    dirty_rate_age_s: float | None = None  # how old that measurement is
    # what it keeps rewriting, where a long measurement showed it (None: not seen; whole mem)
    dirty_working_set_bytes: float | None = None
    tags: tuple[str, ...] = ()  # from the domain's balancerd metadata (policy selectors)
    # why it cannot be migrated (host device, mdev, local-only disk, ...); empty: movable
    blockers: tuple[Blocker, ...] = ()

    @property
    def cpu_cores(self) -> float:
        """CPU demand in host cores (cpu_util x vcpus)."""
        return self.cpu_util * self.vcpus


@dataclass(frozen=True)
class Host:
    name: str
    uri: str
    up: bool
    cpus: int = 0
    cpu_mhz: int = 0
    mem_bytes: int = 0
    mem_free_bytes: int = 0
    cpu_util: float = 0.0  # 0..1 of all host CPUs (smoothed), from node counters
    error: str = ""
    hostname: str = ""
    host_uuid: str = ""
    libvirt_version: int = 0
    hypervisor_version: int = 0
    powered_off: bool = False  # switched off by us (power-save), not failed
    labels: Mapping[str, str] = field(default_factory=dict)  # from the daemon config
    # per-core speed (config cpu_speed_mhz, else the nominal frequency; 0 = unknown):
    # compared between hosts only (balancerd/speed.py)
    core_speed_mhz: float = 0.0

    @property
    def mem_util(self) -> float:
        if self.mem_bytes <= 0:
            return 0.0
        return 1.0 - self.mem_free_bytes / self.mem_bytes


@dataclass(frozen=True)
class Capacity:
    """A host's CPUs and memory to plan with instead of what it reports (0 = use the
    reported value); from the daemon config, or last seen while the host was up."""

    cpus: int = 0
    mem_bytes: int = 0
    core_speed_mhz: float = 0.0  # per-core speed to plan with (0 = what the host reports)


@dataclass(frozen=True)
class Snapshot:
    taken_at_s: float
    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...]  # guests that run (or are paused): they use CPU and memory
    # Defined-but-stopped guests (shut off / crashed): no CPU or memory while stopped, so
    # not in the placement problem; a drain moves them cold, power-save keeps their host on.
    stopped: tuple[Vm, ...] = ()

    def stopped_on(self, host: str) -> tuple[Vm, ...]:
        return tuple(v for v in self.stopped if v.host == host)

    def unmovable(self) -> tuple[Vm, ...]:
        """Running guests with something that blocks a live migration."""
        return tuple(v for v in self.vms if v.blockers)

    def host(self, name: str) -> Host | None:
        return next((h for h in self.hosts if h.name == name), None)

    def vm(self, name: str) -> Vm | None:
        return next((v for v in self.vms if v.name == name), None)

    def vms_on(self, host: str) -> tuple[Vm, ...]:
        return self._vms_by_host.get(host, ())

    @cached_property
    def _vms_by_host(self) -> dict[str, tuple[Vm, ...]]:
        """Guests grouped by host once (vms_on per host was a scan of every guest)."""
        groups: dict[str, list[Vm]] = {}
        for v in self.vms:
            groups.setdefault(v.host, []).append(v)
        return {host: tuple(vms) for host, vms in groups.items()}

    def placement(self) -> Placement:
        return Placement({v.name: v.host for v in self.vms})

    def host_usage(self, placement: Placement | None = None) -> dict[str, tuple[float, float]]:
        """Guest demand per up host as (cpu, mem) fractions of its capacity, with guests
        where ``placement`` puts them (default: where they are). CPU is counted in
        reference cores where host cores differ in speed (balancerd/speed.py)."""
        host_of = (placement or self.placement()).host_of
        factor = speed_factors(self.hosts)
        cpu_ref: dict[str, float] = {h.name: 0.0 for h in self.hosts if h.up}
        mem_bytes: dict[str, int] = {h.name: 0 for h in self.hosts if h.up}
        for v in self.vms:
            host = host_of.get(v.name, v.host)
            if host in cpu_ref:
                cpu_ref[host] += v.cpu_cores * factor.get(v.host, 1.0)
                mem_bytes[host] += v.mem_bytes
        return {
            h.name: (
                cpu_ref[h.name] / (h.cpus * factor[h.name]) if h.cpus else 0.0,
                mem_bytes[h.name] / h.mem_bytes if h.mem_bytes else 0.0,
            )
            for h in self.hosts
            if h.up
        }


# --- decisions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where every guest is (or should be): guest name -> host name."""

    host_of: Mapping[str, str]

    def moved_from(self, current: Placement) -> dict[str, tuple[str, str]]:
        """Guests whose host differs from ``current``: name -> (from, to)."""
        return {
            vm: (current.host_of[vm], host)
            for vm, host in self.host_of.items()
            if vm in current.host_of and current.host_of[vm] != host
        }


@dataclass(frozen=True)
class SolverReport:
    backend: str  # cbc | highs | greedy | none
    status: str  # optimal | feasible | time-limit | infeasible | not-run
    seconds: float
    objective: float | None
    bound: float | None
    gap: float | None  # (objective - bound) / max(|objective|, eps), None if unknown


@dataclass(frozen=True)
class Move:
    vm: str
    src: str
    dst: str
    mem_bytes: int
    expected_s: float  # from memory size, bandwidth and dirty rate
    wave: int = 0  # steps of one wave may run together
    # a stopped guest: only its definition moves (VIR_MIGRATE_OFFLINE), nothing runs
    offline: bool = False


@dataclass(frozen=True)
class Plan:
    policy: str
    objective: str  # balance | power-save
    moves: tuple[Move, ...]
    current: Placement
    target: Placement
    solver: SolverReport
    score_before: float | None = None  # the policy's objective on current / target
    score_after: float | None = None
    power_off: tuple[str, ...] = ()  # hosts left empty that power-save may switch off
    power_on: tuple[str, ...] = ()  # powered-off hosts the target placement needs
    reason: str = ""  # why nothing moves, when moves is empty
    notes: tuple[str, ...] = field(default=())
