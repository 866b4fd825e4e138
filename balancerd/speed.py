"""Per-core speed of heterogeneous hosts (pure).

A guest's CPU demand is measured in cores of the host it runs on. Between hosts whose
cores differ in speed, the decision core counts CPU in *reference cores*: cores of the
fastest known host. A host's factor is its core speed / the fastest one's (1.0 when its
speed is unknown, so a cluster without speeds plans exactly as before):

- a host's capacity is ``cpus * factor``;
- a guest's demand is ``cpu_util * vcpus * factor(host it is measured on)``;
- one vCPU can use at most one core, so a guest whose demand per vCPU
  (``cpu_util * factor(its host)``) is above a host's factor would never get its demand
  there: that host is not a destination for it.

Speeds come from the daemon config (``cpu_speed_mhz``) or from the nominal frequency libvirt
reports (the TSC frequency in the host capabilities); the current frequency from node info
is not used, since frequency scaling makes it change from one reading to the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # model.py uses this module
    from balancerd.model import Host, Vm

# Factors this close to a host's are the same speed (rounding in reported frequencies).
_SAME_SPEED = 0.02


def speed_factors(hosts: Iterable[Host]) -> dict[str, float]:
    """Host name -> core speed / the fastest host's (1.0 where unknown)."""
    hosts = list(hosts)
    known = [h.core_speed_mhz for h in hosts if h.core_speed_mhz > 0]
    if not known:
        return {h.name: 1.0 for h in hosts}
    fastest = max(known)
    out: dict[str, float] = {}
    for h in hosts:
        f = h.core_speed_mhz / fastest if h.core_speed_mhz > 0 else 1.0
        out[h.name] = 1.0 if f >= 1.0 - _SAME_SPEED else f
    return out


def demand_per_vcpu(vm: Vm, factors: Mapping[str, float]) -> float:
    """What one of the guest's vCPUs needs, in reference cores."""
    return max(0.0, vm.cpu_util) * factors.get(vm.host, 1.0)


def too_slow(need_per_vcpu: float, host_factor: float) -> bool:
    """A host whose cores cannot give one vCPU what it needs."""
    return need_per_vcpu > host_factor * (1.0 + _SAME_SPEED)


def uniform(factors: Mapping[str, float]) -> bool:
    return all(f == 1.0 for f in factors.values())
