"""Simulated clusters: host types, VM sizes, and the built-in scenarios.

``cloudsim-planetlab`` is the setup of the CloudSim 3.0.3 dynamic-consolidation experiments
(``org.cloudbus.cloudsim.examples.power.planetlab``): 800 hosts, alternately HP ProLiant
ML110 G4 and G5 (host i has type i % 2), four VM types assigned by position in the sorted
file list, 300 s interval, 1 Gbit/s hosts of which half carries migrations.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from balancerd.errors import ConfigError
from balancerd.simulate.power import (
    HP_ML110_G4,
    HP_ML110_G5,
    IBM_X3550_X5675,
    PowerTable,
    SpecPowerModel,
)
from balancerd.simulate.traces import Workload
from balancerd.units import MIB


@dataclass(frozen=True)
class HostType:
    name: str
    count: int
    cores: int
    core_mips: float  # per core (MIPS for PlanetLab, MHz for Bitbrains)
    mem_mb: int
    power: SpecPowerModel


@dataclass(frozen=True)
class VmType:
    mips: float  # per VM (all its cores)
    cores: int
    mem_mb: int


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster description: host types and how VMs are sized."""

    name: str
    host_types: tuple[HostType, ...]
    interleave: bool = True  # host i gets type i % n_types (CloudSim's Helper.createHostList)
    vm_types: tuple[VmType, ...] = ()  # PlanetLab: type = index // ceil(n / n_types)
    bandwidth_mbit_s: float = 1000.0
    migration_share: float = 0.5  # CloudSim: half the host bandwidth carries migrations
    vm_bw_kbit_s: float = 100_000.0  # CloudSim VM_BW, binds only at VM creation
    host_bw_kbit_s: float = 1_000_000.0
    remove_idle_vms: bool = True  # CloudSim drops a VM whose demand is exactly 0
    # CloudSim's PlanetLab cloudlets request no RAM after creation (UtilizationModelNull), so
    # its policies overcommit memory freely. False: our planner is told the same (host memory
    # shown 100x larger); overcommit events are still counted against the real memory.
    enforce_memory: bool = True
    # Memory a guest holds = its memory *usage* per sample (Bitbrains), not its provisioned
    # size: overcommit events and migration times use it, the planner sees it.
    mem_from_usage: bool = False


CLOUDSIM_PLANETLAB = ClusterSpec(
    name="cloudsim-planetlab",
    host_types=(
        HostType("hp-ml110-g4", 400, 2, 1860.0, 4096, HP_ML110_G4),
        HostType("hp-ml110-g5", 400, 2, 2660.0, 4096, HP_ML110_G5),
    ),
    interleave=True,
    enforce_memory=False,
    vm_types=(
        VmType(2500.0, 1, 870),
        VmType(2000.0, 1, 1740),
        VmType(1000.0, 1, 1740),
        VmType(500.0, 1, 613),
    ),
)

# Bitbrains: IBM x3550 M3 hosts (12 x 3067 MHz, CloudSim's X5675 SPECpower table) with
# 32 GiB: the trace's guests use far more memory per GHz than that, so memory binds.
BITBRAINS_HOST = HostType("ibm-x3550-m3", 0, 12, 3067.0, 32768, IBM_X3550_X5675)

BUILTIN = {"cloudsim-planetlab": CLOUDSIM_PLANETLAB}


@dataclass
class Cluster:
    """Hosts and VMs as arrays (index = id); what the simulation engine runs on."""

    spec: ClusterSpec
    host_names: list[str]
    host_type: npt.NDArray[np.int64]
    host_pes: npt.NDArray[np.int64]
    host_pe_mips: npt.NDArray[np.float64]
    host_cap_mips: npt.NDArray[np.float64]
    host_mem_mb: npt.NDArray[np.float64]
    power: PowerTable
    vm_names: list[str]
    vm_mips: npt.NDArray[np.float64]
    vm_pes: npt.NDArray[np.int64]
    vm_mem_mb: npt.NDArray[np.float64]

    @property
    def n_hosts(self) -> int:
        return len(self.host_names)

    @property
    def n_vms(self) -> int:
        return len(self.vm_names)

    def migration_s(self, vm: int, mem_mb: float | None = None) -> float:
        """CloudSim: RAM / (bandwidth / 2); 870 MB over 1 Gbit/s -> 13.92 s."""
        bw_mb_s = self.spec.bandwidth_mbit_s * self.spec.migration_share / 8.0
        return (float(self.vm_mem_mb[vm]) if mem_mb is None else mem_mb) / bw_mb_s


def _hosts(spec: ClusterSpec, counts: list[int]) -> list[int]:
    """Type index of every host, interleaved (i % n) or grouped."""
    if spec.interleave:
        order: list[int] = []
        left = list(counts)
        while any(left):
            for t in range(len(counts)):
                if left[t]:
                    order.append(t)
                    left[t] -= 1
        return order
    return [t for t, c in enumerate(counts) for _ in range(c)]


def build_cluster(
    spec: ClusterSpec, workload: Workload, host_counts: list[int] | None = None
) -> Cluster:
    counts = host_counts or [ht.count for ht in spec.host_types]
    types = _hosts(spec, counts)
    hts = spec.host_types
    models = [ht.power for ht in hts]
    n = workload.n_vms
    if workload.kind == "bitbrains":
        # a VM provisioned with nothing (off for the whole trace) still needs a size
        vm_mips = np.maximum(1.0, np.array(workload.vm_cpu_mhz, dtype=np.float64))
        vm_pes = np.maximum(1, np.array(workload.vm_cores, dtype=np.int64))
        vm_mem = np.array(workload.vm_mem_bytes, dtype=np.float64) / MIB
    else:
        if not spec.vm_types:
            raise ConfigError([f"cluster {spec.name}: no vm_types for a PlanetLab trace"])
        per_type = math.ceil(n / len(spec.vm_types))
        vt = [spec.vm_types[i // per_type] for i in range(n)]
        vm_mips = np.array([v.mips for v in vt])
        vm_pes = np.array([v.cores for v in vt], dtype=np.int64)
        vm_mem = np.array([float(v.mem_mb) for v in vt])
    type_arr = np.array(types, dtype=np.int64)
    pes = np.array([hts[t].cores for t in types], dtype=np.int64)
    pe_mips = np.array([hts[t].core_mips for t in types])
    return Cluster(
        spec=spec,
        host_names=[f"{hts[t].name}-{i:04d}" for i, t in enumerate(types)],
        host_type=type_arr,
        host_pes=pes,
        host_pe_mips=pe_mips,
        host_cap_mips=pes * pe_mips,
        host_mem_mb=np.array([float(hts[t].mem_mb) for t in types]),
        power=PowerTable(models, types),
        vm_names=list(workload.names),
        vm_mips=vm_mips,
        vm_pes=vm_pes,
        vm_mem_mb=vm_mem,
    )


def bitbrains_cluster(workload: Workload, *, headroom: float = 2.0) -> ClusterSpec:
    """IBM x3550 M3 hosts, as many as ``headroom`` x the peak memory in use (and never fewer
    than the peak CPU demand needs): memory, not CPU, decides how many are needed."""
    ht = BITBRAINS_HOST
    host_mem = ht.mem_mb * MIB
    host_cpu = ht.cores * ht.core_mips
    mem_peak = float(workload.mem_used_bytes.sum(axis=0).max()) if workload.n_samples else 0.0
    cpu_mhz = np.asarray(workload.vm_cpu_mhz)[:, None] * workload.cpu_util
    cpu_peak = float(cpu_mhz.sum(axis=0).max()) if workload.n_samples else 0.0
    count = max(
        math.ceil(headroom * mem_peak / host_mem), math.ceil(headroom * cpu_peak / host_cpu), 2
    )
    return ClusterSpec(
        name="bitbrains",
        host_types=(replace(ht, count=count),),
        interleave=False,
        vm_types=(),
        remove_idle_vms=False,
        enforce_memory=True,
        mem_from_usage=True,
        vm_bw_kbit_s=0.0,
    )


def _get(doc: dict[str, Any], key: str, where: str, problems: list[str], kind: type) -> Any:
    if key not in doc:
        problems.append(f"{where}: missing {key}")
        return None
    val = doc[key]
    if kind is float and isinstance(val, int):
        val = float(val)
    if not isinstance(val, kind) or isinstance(val, bool):
        problems.append(f"{where}.{key}: expected {kind.__name__}, got {val!r}")
        return None
    return val


def load_cluster_spec(path: str | os.PathLike[str]) -> ClusterSpec:
    """A YAML cluster description::

    name: my-cluster
    interleave: false
    bandwidth_mbit_s: 10000
    migration_share: 0.5
    host_types:
      - {name: r640, count: 20, cores: 32, core_mips: 2600, mem_mb: 262144,
         power_w: [58, 98, 109, 118, 128, 140, 153, 170, 189, 205, 222]}
    vm_types:   # PlanetLab traces only
      - {mips: 2500, cores: 1, mem_mb: 870}
    """
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{p}: cannot read cluster description: {exc}"]) from exc
    if not isinstance(doc, dict):
        raise ConfigError([f"{p}: expected a mapping at the top"])
    problems: list[str] = []
    hts: list[HostType] = []
    raw_hosts = doc.get("host_types")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        problems.append(f"{p}: host_types: need a non-empty list")
        raw_hosts = []
    for i, h in enumerate(raw_hosts):
        where = f"{p}: host_types[{i}]"
        if not isinstance(h, dict):
            problems.append(f"{where}: expected a mapping")
            continue
        name = _get(h, "name", where, problems, str)
        count = _get(h, "count", where, problems, int)
        cores = _get(h, "cores", where, problems, int)
        mips = _get(h, "core_mips", where, problems, float)
        mem = _get(h, "mem_mb", where, problems, int)
        watts = h.get("power_w")
        if not isinstance(watts, list) or len(watts) != 11:
            problems.append(f"{where}.power_w: need 11 readings (0 %, 10 %, ..., 100 % CPU)")
            continue
        if None in (name, count, cores, mips, mem):
            continue
        hts.append(
            HostType(
                name, count, cores, mips, mem, SpecPowerModel(name, tuple(float(w) for w in watts))
            )
        )
    vts: list[VmType] = []
    for i, v in enumerate(doc.get("vm_types") or []):
        where = f"{p}: vm_types[{i}]"
        if not isinstance(v, dict):
            problems.append(f"{where}: expected a mapping")
            continue
        mips = _get(v, "mips", where, problems, float)
        mem = _get(v, "mem_mb", where, problems, int)
        cores = v.get("cores", 1)
        if mips is not None and mem is not None:
            vts.append(VmType(mips, int(cores), mem))
    if problems:
        raise ConfigError(problems)
    return ClusterSpec(
        name=str(doc.get("name", p.stem)),
        host_types=tuple(hts),
        interleave=bool(doc.get("interleave", True)),
        vm_types=tuple(vts),
        bandwidth_mbit_s=float(doc.get("bandwidth_mbit_s", 1000.0)),
        migration_share=float(doc.get("migration_share", 0.5)),
        remove_idle_vms=bool(doc.get("remove_idle_vms", False)),
        enforce_memory=bool(doc.get("enforce_memory", True)),
        vm_bw_kbit_s=0.0,
    )
