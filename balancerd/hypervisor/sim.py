"""An in-memory cluster behind the Hypervisor protocol, for simulation and benchmarks.

Sampling is the real thing: ``sample_all()`` returns ``HostSample``s with cumulative CPU
counters, so ``collect.build_snapshot`` turns them into rates exactly as for libvirt.
Whoever drives the simulation advances the counters with ``advance()``.

Migrations are modelled, not performed: ``migrate()`` moves the guest at once (the
simulation engine accounts the duration and its cost itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from balancerd.errors import HypervisorError
from balancerd.hypervisor.base import (
    DomainFacts,
    HostFacts,
    JobStats,
    MigrationRequest,
)
from balancerd.model import HostSample, VmSample

NS = 1_000_000_000


@dataclass
class SimVm:
    name: str
    vcpus: int
    mem_bytes: int
    cpu_time_ns: int = 0
    state: str = "running"


@dataclass
class SimHost:
    name: str
    cpus: int
    cpu_mhz: int
    mem_bytes: int
    up: bool = True
    cpu_busy_ns: int = 0
    cpu_total_ns: int = 0
    vms: dict[str, SimVm] = field(default_factory=dict)


class SimHypervisor:
    """Hosts and guests in memory; a clock in seconds that only ``advance`` moves."""

    def __init__(self, hosts: Sequence[SimHost]) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.clock_s = 0.0

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
                    hostname=h.name,
                    host_uuid=h.name,
                    cpus=h.cpus,
                    cpu_mhz=h.cpu_mhz,
                    mem_total_bytes=h.mem_bytes,
                    mem_free_bytes=max(0, h.mem_bytes - used),
                    cpu_busy_ns=h.cpu_busy_ns,
                    cpu_total_ns=h.cpu_total_ns,
                    vms=tuple(
                        VmSample(
                            name=v.name,
                            uuid=v.name,
                            state=v.state,
                            vcpus=v.vcpus,
                            mem_bytes=v.mem_bytes,
                            cpu_time_ns=v.cpu_time_ns,
                        )
                        for v in h.vms.values()
                    ),
                )
            )
        return tuple(out)

    def domain_facts(self, host: str, vm: str) -> DomainFacts:
        v = self._vm(host, vm, "domain facts")
        return DomainFacts(
            name=v.name,
            uuid=v.name,
            state=v.state,
            mem_bytes=v.mem_bytes,
            vcpus=v.vcpus,
            cpu_xml="",
            disks=(),
            interfaces=(),
            persistent=True,
            in_job=False,
        )

    def host_facts(self, host: str) -> HostFacts:
        h = self._host(host, "host facts")
        used = sum(v.mem_bytes for v in h.vms.values())
        return HostFacts(
            name=h.name,
            hostname=h.name,
            host_uuid=h.name,
            libvirt_version=0,
            hypervisor_version=0,
            mem_free_bytes=max(0, h.mem_bytes - used),
            networks=(),
            bridges=(),
        )

    def cpu_compatible(self, host: str, cpu_xml: str, virt_type: str = "kvm") -> bool:
        self._host(host, "cpu compare")
        return True

    def path_visible(self, host: str, path: str) -> bool:
        self._host(host, "storage lookup")
        return True

    def migrate(self, req: MigrationRequest) -> None:
        src = self._host(req.src, "migrate")
        dst = self._host(req.dst, "migrate")
        vm = src.vms.pop(req.vm, None)
        if vm is None:
            raise HypervisorError(req.src, "migrate", f"no guest {req.vm}")
        dst.vms[vm.name] = vm

    def job_stats(self, host: str, vm: str, completed: bool = False) -> JobStats | None:
        self._vm(host, vm, "job stats")
        return None  # migrations complete at once: never a running job to sample

    def set_max_downtime(self, host: str, vm: str, downtime_ms: int) -> None:
        self._vm(host, vm, "set max downtime")

    def suspend(self, host: str, vm: str) -> None:
        self._vm(host, vm, "suspend").state = "paused"

    def resume(self, host: str, vm: str) -> None:
        self._vm(host, vm, "resume").state = "running"

    def abort_job(self, host: str, vm: str) -> None:
        self._vm(host, vm, "abort job")

    def domain_state(self, host: str, vm: str) -> str | None:
        v = self._host(host, "domain state").vms.get(vm)
        return None if v is None else v.state

    def destroy(self, host: str, vm: str) -> None:
        self._host(host, "destroy").vms.pop(vm, None)

    def close(self) -> None:
        pass
