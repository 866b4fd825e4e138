"""The Hypervisor protocol: the only way the rest of balancerd talks to hosts.

Implementations: ``hypervisor.libvirt.LibvirtHypervisor`` (real hosts) and
``hypervisor.sim.SimHypervisor`` (in memory, for simulation and benchmarks).
Every method that reaches a host raises ``HypervisorError`` naming host and operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from balancerd.model import Blocker, HostSample


@dataclass(frozen=True)
class DiskFacts:
    target: str  # vda, sda, ...
    path: str  # file or block device path; "" for network disks
    cache: str  # none | writeback | writethrough | directsync | unsafe | default
    device: str  # disk | cdrom | floppy
    readonly: bool


@dataclass(frozen=True)
class InterfaceFacts:
    kind: str  # network | bridge | direct | user | other
    source: str  # libvirt network name or bridge name


@dataclass(frozen=True)
class DomainFacts:
    """What preflight checks need to know about one guest on its source host."""

    name: str
    uuid: str
    state: str
    mem_bytes: int
    vcpus: int
    cpu_xml: str  # the <cpu> element, "" when the guest uses the hypervisor default
    disks: tuple[DiskFacts, ...]
    interfaces: tuple[InterfaceFacts, ...]
    persistent: bool
    in_job: bool
    virt_type: str = "kvm"  # <domain type=...>: kvm | qemu (TCG); CPU checks depend on it
    blockers: tuple[Blocker, ...] = ()  # what in its definition stops a live migration


@dataclass(frozen=True)
class HostFacts:
    """What preflight checks need to know about a destination (read now, not from a snapshot)."""

    name: str
    hostname: str
    host_uuid: str
    libvirt_version: int
    hypervisor_version: int
    mem_free_bytes: int
    networks: tuple[str, ...]  # active libvirt networks
    bridges: tuple[str, ...]  # bridge devices the host has
    # Certificates for TLS migration streams (VIR_MIGRATE_TLS) in the host's QEMU TLS folder
    # (/etc/pki/qemu): ca-cert.pem + server-cert.pem + server-key.pem to receive one,
    # ca-cert.pem to send one.
    migration_tls_server: bool = False
    migration_tls_client: bool = False
    # Post-copy: "" when the host can take part in one (see preflight), else why not.
    postcopy_problem: str = "postcopy support unknown"
    # Compression methods the host's libvirt accepts for VIR_MIGRATE_PARAM_COMPRESSION.
    compression_methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class DestinationFacts:
    """Everything preflight reads on a destination, read in one call (one connection, one
    timeout): the host, whether the guest's CPU runs there, which disk paths it sees, and
    the state of a domain of the guest's name already there (None: no such domain)."""

    host: HostFacts
    cpu_ok: bool
    path_visible: tuple[tuple[str, bool], ...]  # (path, seen there) per asked path
    existing_state: str | None


@dataclass(frozen=True)
class JobStats:
    """One sample of a running (or just finished) migration job on the source."""

    active: bool  # a job is running
    elapsed_s: float
    data_total_bytes: int
    data_processed_bytes: int
    data_remaining_bytes: int
    mem_bandwidth_bytes_s: float
    dirty_rate_pages_s: float
    page_size_bytes: int
    iteration: int
    expected_downtime_ms: float
    downtime_ms: float | None = None  # set by libvirt once the job completed
    auto_converge_throttle_pct: int = 0  # QEMU's auto-converge vCPU throttle, 0..99

    @property
    def dirty_rate_bytes_s(self) -> float:
        return self.dirty_rate_pages_s * self.page_size_bytes


@dataclass(frozen=True)
class MigrationRequest:
    vm: str
    src: str
    dst: str
    live: bool  # False: cold (guest paused while all memory is sent)
    bandwidth_mib_s: float
    max_downtime_ms: int
    auto_converge: bool
    copy_storage: bool = False
    tls: bool = False  # encrypt the migration stream (VIR_MIGRATE_TLS)
    postcopy: bool = False  # start with VIR_MIGRATE_POSTCOPY (switched by start_postcopy)
    parallel_connections: int = 0  # >= 2: VIR_MIGRATE_PARALLEL with this many streams
    compression: str = ""  # "": none; else a VIR_MIGRATE_PARAM_COMPRESSION method
    # Resume a failed post-copy (VIR_MIGRATE_POSTCOPY_RESUME, libvirt >= 8.5)
    postcopy_resume: bool = False
    # A stopped guest: move only its definition (VIR_MIGRATE_OFFLINE), it stays shut off
    offline: bool = False


class Hypervisor(Protocol):
    def host_names(self) -> Sequence[str]: ...

    def sample_all(self) -> tuple[HostSample, ...]:
        """Read every host in parallel; a host that fails or times out comes back ``up=False``."""
        ...

    def domain_facts(self, host: str, vm: str) -> DomainFacts: ...

    def host_facts(self, host: str) -> HostFacts: ...

    def cpu_compatible(self, host: str, cpu_xml: str, virt_type: str = "kvm") -> bool:
        """Whether the guest CPU described by ``cpu_xml`` runs on ``host``'s hypervisor
        (``virt_type`` as in DomainFacts: a TCG guest is not bound to the host CPU)."""
        ...

    def path_visible(self, host: str, path: str) -> bool:
        """Whether ``host`` sees a storage volume / file at exactly ``path``."""
        ...

    def destination_facts(
        self, host: str, vm: str, cpu_xml: str, virt_type: str, paths: Sequence[str]
    ) -> DestinationFacts:
        """host_facts, cpu_compatible, path_visible per path and domain_state of ``vm`` on
        ``host`` as one call: one connection and one timeout for the whole read."""
        ...

    def migrate(self, req: MigrationRequest) -> None:
        """Run one migration to completion (blocking). Call from a worker thread;
        use ``job_stats``/``suspend``/``set_max_downtime``/``abort_job`` meanwhile.
        ``req.max_downtime_ms`` is set on the domain before the job starts; the caller's
        monitor may raise it with ``set_max_downtime`` while the job runs.
        Live migrations are peer-to-peer, defined on the destination, undefined on the source."""
        ...

    def job_stats(self, host: str, vm: str, completed: bool = False) -> JobStats | None:
        """The running job on ``host`` (or, with ``completed``, the last finished one;
        libvirt keeps it on both ends, so the destination has it after ``migrate``)."""
        ...

    def set_max_downtime(self, host: str, vm: str, downtime_ms: int) -> None: ...

    def start_postcopy(self, host: str, vm: str) -> None:
        """Switch the running job (started with ``req.postcopy``) to post-copy: the guest
        runs on the destination from now on and pulls the rest of its memory."""
        ...

    def postcopy_state(self, host: str, vm: str) -> str:
        """The guest's post-copy state on ``host``: "" (none), "active" (running or
        paused in post-copy) or "failed" (post-copy broke: paused, needs recovery)."""
        ...

    def start_dirty_rate(self, host: str, vm: str, seconds: int) -> None:
        """Start measuring the guest's memory dirty rate over ``seconds`` (libvirt's
        calc-dirty-rate; returns at once). ``sample_all`` reports the result, with an id
        that changes with each new measurement, once it is done."""
        ...

    def suspend(self, host: str, vm: str) -> None: ...

    def resume(self, host: str, vm: str) -> None: ...

    def abort_job(self, host: str, vm: str) -> None: ...

    def domains(self, host: str) -> dict[str, str]:
        """Every domain ``host`` has, running or defined-but-stopped: name -> state."""
        ...

    def domain_state(self, host: str, vm: str) -> str | None:
        """running | paused | shutoff | ...; None if the host has no such domain."""
        ...

    def destroy(self, host: str, vm: str) -> None:
        """Stop the domain on ``host`` at once and drop its definition there."""
        ...

    def close(self) -> None: ...
