"""An in-memory cluster behind the Hypervisor protocol, for simulation and benchmarks.

Sampling is the real thing: ``sample_all()`` returns ``HostSample``s with cumulative CPU
counters, so ``collect.build_snapshot`` turns them into rates exactly as for libvirt.
Whoever drives the simulation advances the counters with ``advance()``.

Migrations are modelled, not performed: ``migrate()`` moves the guest at once (the
simulation engine accounts the duration and its cost itself).

What preflight reads (disks, interfaces, CPU, versions, networks, visible paths) is set per
guest and per host; the defaults pass every check. ``hypervisor.scripted`` builds on this
class for tests that need calls to fail, hang, or migrations to run a script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from balancerd.errors import HypervisorError
from balancerd.hypervisor.base import (
    DestinationFacts,
    DiskFacts,
    DomainFacts,
    HostFacts,
    InterfaceFacts,
    JobStats,
    MigrationRequest,
)
from balancerd.model import Blocker, HostSample, VmSample
from balancerd.units import NS


@dataclass
class SimVm:
    name: str
    vcpus: int
    mem_bytes: int
    cpu_time_ns: int = 0
    state: str = "running"
    # What preflight reads (DomainFacts); the defaults pass every check.
    uuid: str = ""  # "" means the guest's name
    disks: tuple[DiskFacts, ...] = ()
    interfaces: tuple[InterfaceFacts, ...] = ()
    cpu_xml: str = ""
    virt_type: str = "kvm"
    persistent: bool = True
    in_job: bool = False  # some other job (save, snapshot, ...) runs on the domain
    incoming: bool = False  # the paused target end of an incoming migration
    tags: tuple[str, ...] = ()  # as libvirt's balancerd metadata would give them
    # what in its definition blocks a live migration (the adapter reads it from the XML)
    blockers: tuple[Blocker, ...] = ()
    dirty_rate_bytes_s: float = 0.0  # how fast the guest dirties memory
    dirty_working_set_bytes: int = 0  # how much of it it keeps rewriting (0: all of it)
    # the last start_dirty_rate result: (rate, measurement id, period); a migration drops it
    dirty_measured: tuple[float, int, int] | None = None


@dataclass
class SimHost:
    name: str
    cpus: int
    cpu_mhz: int
    mem_bytes: int
    up: bool = True
    core_speed_mhz: int = 0  # nominal per-core speed reported (0: none, like TCG hosts)
    cpu_busy_ns: int = 0
    cpu_total_ns: int = 0
    vms: dict[str, SimVm] = field(default_factory=dict)
    # What preflight reads (HostFacts); the defaults pass every check.
    hostname: str = ""  # "" means the host's name
    host_uuid: str = ""  # "" means the host's name
    libvirt_version: int = 0
    hypervisor_version: int = 0
    networks: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    visible_paths: frozenset[str] | None = None  # None: every path is visible
    cpu_models: frozenset[str] | None = None  # guest <cpu> XML that runs here; None: any
    postcopy_problem: str = ""  # why this host cannot take part in a post-copy ("": it can)
    compression_methods: tuple[str, ...] = ("zstd", "zlib", "mt", "xbzrle")
    labels: dict[str, str] = field(default_factory=dict)  # as the daemon config gives them


class SimHypervisor:
    """Hosts and guests in memory; a clock in seconds that only ``advance`` moves."""

    def __init__(self, hosts: Sequence[SimHost]) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.clock_s = 0.0
        self.dirty_calcs = 0

    # --- driving the simulation ------------------------------------------------------

    def add_vm(self, host: str, vm: SimVm) -> None:
        self._host(host, "define").vms[vm.name] = vm

    def remove_vm(self, host: str, vm: str) -> None:
        self._host(host, "undefine").vms.pop(vm, None)

    def advance(self, elapsed_s: float, vm_busy_cores: dict[str, float]) -> None:
        """Let ``elapsed_s`` pass with each guest using ``vm_busy_cores`` (absent: idle)."""
        self.clock_s += elapsed_s
        for h in self.hosts.values():
            busy = 0.0
            for vm in h.vms.values():
                cores = min(float(vm.vcpus), max(0.0, vm_busy_cores.get(vm.name, 0.0)))
                vm.cpu_time_ns += int(cores * elapsed_s * NS)
                busy += cores
            h.cpu_total_ns += int(h.cpus * elapsed_s * NS)
            h.cpu_busy_ns += int(min(float(h.cpus), busy) * elapsed_s * NS)

    def _host(self, name: str, op: str) -> SimHost:
        h = self.hosts.get(name)
        if h is None:
            raise HypervisorError(name, op, "no such simulated host")
        return h

    def _vm(self, host: str, vm: str, op: str) -> SimVm:
        v = self._host(host, op).vms.get(vm)
        if v is None:
            raise HypervisorError(host, op, f"no guest {vm}")
        return v

    # --- the Hypervisor protocol -----------------------------------------------------

    def host_names(self) -> Sequence[str]:
        return list(self.hosts)

    def sample_all(self) -> tuple[HostSample, ...]:
        out = []
        for h in self.hosts.values():
            if not h.up:
                out.append(
                    HostSample(
                        name=h.name,
                        uri=f"sim:///{h.name}",
                        up=False,
                        sampled_at_s=self.clock_s,
                        error="powered off",
                        labels=h.labels,
                    )
                )
                continue
            used = sum(v.mem_bytes for v in h.vms.values())
            out.append(
                HostSample(
                    name=h.name,
                    uri=f"sim:///{h.name}",
                    up=True,
                    sampled_at_s=self.clock_s,
                    hostname=h.hostname or h.name,
                    host_uuid=h.host_uuid or h.name,
                    cpus=h.cpus,
                    cpu_mhz=h.cpu_mhz,
                    core_speed_mhz=h.core_speed_mhz,
                    mem_total_bytes=h.mem_bytes,
                    mem_free_bytes=max(0, h.mem_bytes - used),
                    cpu_busy_ns=h.cpu_busy_ns,
                    cpu_total_ns=h.cpu_total_ns,
                    libvirt_version=h.libvirt_version,
                    hypervisor_version=h.hypervisor_version,
                    vms=tuple(
                        VmSample(
                            name=v.name,
                            uuid=v.uuid or v.name,
                            state=v.state,
                            vcpus=v.vcpus,
                            mem_bytes=v.mem_bytes,
                            cpu_time_ns=v.cpu_time_ns,
                            in_job=v.in_job,
                            incoming=v.incoming,
                            tags=v.tags,
                            blockers=v.blockers,
                            dirty_rate_bytes_s=v.dirty_measured[0] if v.dirty_measured else None,
                            dirty_calc_id=v.dirty_measured[1] if v.dirty_measured else 0,
                            dirty_calc_s=v.dirty_measured[2] if v.dirty_measured else 0,
                        )
                        for v in h.vms.values()
                    ),
                    labels=h.labels,
                )
            )
        return tuple(out)

    def domain_facts(self, host: str, vm: str) -> DomainFacts:
        v = self._vm(host, vm, "domain facts")
        return DomainFacts(
            name=v.name,
            uuid=v.uuid or v.name,
            state=v.state,
            mem_bytes=v.mem_bytes,
            vcpus=v.vcpus,
            cpu_xml=v.cpu_xml,
            disks=v.disks,
            interfaces=v.interfaces,
            persistent=v.persistent,
            in_job=v.in_job,
            virt_type=v.virt_type,
            blockers=v.blockers,
        )

    def host_facts(self, host: str) -> HostFacts:
        h = self._host(host, "host facts")
        used = sum(v.mem_bytes for v in h.vms.values())
        return HostFacts(
            name=h.name,
            hostname=h.hostname or h.name,
            host_uuid=h.host_uuid or h.name,
            libvirt_version=h.libvirt_version,
            hypervisor_version=h.hypervisor_version,
            mem_free_bytes=max(0, h.mem_bytes - used),
            networks=h.networks,
            bridges=h.bridges,
            postcopy_problem=h.postcopy_problem,
            compression_methods=h.compression_methods,
        )

    def cpu_compatible(self, host: str, cpu_xml: str, virt_type: str = "kvm") -> bool:
        h = self._host(host, "cpu compare")
        return h.cpu_models is None or virt_type == "qemu" or cpu_xml in h.cpu_models

    def path_visible(self, host: str, path: str) -> bool:
        h = self._host(host, "storage lookup")
        return h.visible_paths is None or path in h.visible_paths

    def destination_facts(
        self, host: str, vm: str, cpu_xml: str, virt_type: str, paths: Sequence[str]
    ) -> DestinationFacts:
        return DestinationFacts(
            host=SimHypervisor.host_facts(self, host),
            cpu_ok=SimHypervisor.cpu_compatible(self, host, cpu_xml, virt_type),
            path_visible=tuple((p, SimHypervisor.path_visible(self, host, p)) for p in paths),
            existing_state=SimHypervisor.domain_state(self, host, vm),
        )

    def migrate(self, req: MigrationRequest) -> None:
        src = self._host(req.src, "migrate")
        dst = self._host(req.dst, "migrate")
        vm = src.vms.get(req.vm)
        if vm is None:
            raise HypervisorError(req.src, "migrate", f"no guest {req.vm}")
        if req.offline != (vm.state == "shutoff"):  # as libvirt: offline <=> not active
            what = "offline migration of an active" if req.offline else "migration of a stopped"
            raise HypervisorError(req.src, "migrate", f"{what} domain {req.vm}")
        src.vms.pop(req.vm)
        vm.dirty_measured = None  # a new QEMU on the destination has measured nothing
        dst.vms[vm.name] = vm

    def job_stats(self, host: str, vm: str, completed: bool = False) -> JobStats | None:
        self._vm(host, vm, "job stats")
        return None  # migrations complete at once: never a running job to sample

    def set_max_downtime(self, host: str, vm: str, downtime_ms: int) -> None:
        self._vm(host, vm, "set max downtime")

    def start_postcopy(self, host: str, vm: str) -> None:
        self._vm(host, vm, "start post-copy")

    def postcopy_state(self, host: str, vm: str) -> str:
        self._vm(host, vm, "post-copy state")
        return ""

    def start_dirty_rate(self, host: str, vm: str, seconds: int) -> None:
        """Measured at once, as QEMU counts: distinct pages dirtied over ``seconds`` (at
        most the working set) per second; the id counts measurements."""
        v = self._vm(host, vm, "start dirty-rate calculation")
        self.dirty_calcs += 1
        ws = v.dirty_working_set_bytes or v.mem_bytes
        rate = min(float(ws), v.dirty_rate_bytes_s * seconds) / seconds
        v.dirty_measured = (rate, self.dirty_calcs, seconds)

    def suspend(self, host: str, vm: str) -> None:
        self._vm(host, vm, "suspend").state = "paused"

    def resume(self, host: str, vm: str) -> None:
        self._vm(host, vm, "resume").state = "running"

    def abort_job(self, host: str, vm: str) -> None:
        self._vm(host, vm, "abort job")

    def domains(self, host: str) -> dict[str, str]:
        return {v.name: v.state for v in self._host(host, "list domains").vms.values()}

    def domain_state(self, host: str, vm: str) -> str | None:
        v = self._host(host, "domain state").vms.get(vm)
        return None if v is None else v.state

    def destroy(self, host: str, vm: str) -> None:
        self._host(host, "destroy").vms.pop(vm, None)

    def close(self) -> None:
        pass
