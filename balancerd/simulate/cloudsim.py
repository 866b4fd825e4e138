"""THR-MMT: CloudSim 3.0.3's ``PowerVmAllocationPolicyMigrationStaticThreshold`` with
``PowerVmSelectionPolicyMinimumMigrationTime``, re-implemented on the simulator's arrays.

Faithful to ``PowerVmAllocationPolicyMigrationAbstract``, quirks included:

- initial placement: power-aware best fit over all hosts in host order, each VM asking for
  its full MIPS; host power "before" is read from the host's last update (idle at creation),
  so creation spreads VMs over empty hosts; RAM and bandwidth bind only here (afterwards
  PlanetLab cloudlets request 0 RAM / 0 bandwidth);
- over-utilized host: requested MIPS > threshold x capacity; MMT takes the VM with the least
  RAM (first in the host's VM list on ties) until the host is no longer over;
- new placement: VMs sorted by current MIPS, descending (stable), power-aware best fit
  (least power increase) over hosts that suit the VM (one core can serve its demand, the
  scheduler has the MIPS free) and, for a host with load, stay under the threshold; only
  the over-utilized hosts are excluded here, so empty (switched-off) hosts may be woken;
- under-utilized hosts: every active host in ascending utilization (not over-utilized, not a
  target already chosen by this step) is emptied if all its VMs fit on other active hosts
  (the same best fit); the targets of the over-utilization step are *not* excluded (the
  code builds that set from an empty map), so a VM can be moved twice in one interval.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from balancerd.simulate.engine import View
from balancerd.simulate.scenario import Cluster
from balancerd.simulate.traces import Workload
from balancerd.units import MIB

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class _WhatIf:
    """The allocation policy's tentative view of the hosts during one optimization."""

    def __init__(self, c: Cluster, view: View, threshold: float) -> None:
        st = view.state
        self.c = c
        self.thr = threshold
        self.req = st.vm_req
        self.alloc_sum = st.util_mips.copy()  # getUtilizationOfCpuMips(host)
        self.req_sum = st.req_mips.copy()
        self.avail = st.avail_mips.copy()
        self.util_snap = st.util_frac
        self.p_snap = c.power.power_w(st.util_frac)  # host.getPower()
        self.lists = [list(h) for h in view.host_vms]

    def find_host(self, vm: int, excluded: npt.NDArray[np.bool_]) -> int:
        c = self.c
        r = float(self.req[vm])
        ok = ~excluded & (c.host_pe_mips >= r / c.vm_pes[vm]) & (self.avail >= r)
        loaded = self.alloc_sum != 0
        ok &= ~(loaded & ((self.req_sum + r) / c.host_cap_mips > self.thr))
        if not ok.any():
            return -1
        diff = c.power.power_w((self.alloc_sum + r) / c.host_cap_mips) - self.p_snap
        diff = np.where(ok, diff, np.inf)
        return int(np.argmin(diff))

    def create(self, vm: int, host: int) -> None:
        r = float(self.req[vm])
        self.avail[host] -= r
        self.alloc_sum[host] += r
        self.req_sum[host] += r
        self.lists[host].append(vm)

    def destroy(self, vm: int, host: int) -> None:
        r = float(self.req[vm])
        self.avail[host] += r
        self.alloc_sum[host] -= r
        self.req_sum[host] -= r
        self.lists[host].remove(vm)


def pabfd_initial(c: Cluster, threshold: float = 1.0) -> IntArray:
    """VM creation as PowerVmAllocationPolicyMigrationAbstract.findHostForVm at time 0."""
    host_of = np.full(c.n_vms, -1, dtype=np.int64)
    avail = c.host_cap_mips.copy()
    alloc_sum = np.zeros(c.n_hosts)
    ram_free = c.host_mem_mb.copy()
    bw_free = np.full(c.n_hosts, c.spec.host_bw_kbit_s)
    p_idle = c.power.power_w(np.zeros(c.n_hosts))
    for v in range(c.n_vms):
        m = float(c.vm_mips[v])
        ok = (
            (c.host_pe_mips >= m / c.vm_pes[v])
            & (avail >= m)
            & (ram_free >= c.vm_mem_mb[v])
            & (bw_free >= c.spec.vm_bw_kbit_s)
        )
        # isHostOverUtilizedAfterAllocation: only the new VM requests MIPS at creation
        ok &= ~((alloc_sum != 0) & (m / c.host_cap_mips > threshold))
        if not ok.any():
            continue
        diff = np.where(ok, c.power.power_w((alloc_sum + m) / c.host_cap_mips) - p_idle, np.inf)
        h = int(np.argmin(diff))
        host_of[v] = h
        avail[h] -= m
        alloc_sum[h] += m
        ram_free[h] -= c.vm_mem_mb[v]
        bw_free[h] -= c.spec.vm_bw_kbit_s
    return host_of


def spread_initial(c: Cluster, workload: Workload) -> IntArray:
    """A neutral start for traces without creation semantics (Bitbrains): guests by
    decreasing memory in use, each on the host with the most free memory where its CPU
    demand still fits (any host with the most free memory if none)."""
    host_of = np.full(c.n_vms, -1, dtype=np.int64)
    mem = workload.mem_used_bytes[:, 0] / MIB if workload.mem_used_bytes.size else c.vm_mem_mb
    cpu = workload.cpu_util[:, 0] * c.vm_mips
    mem_free = c.host_mem_mb.copy()
    cpu_free = c.host_cap_mips.copy()
    for v in np.argsort(-mem, kind="stable"):
        fits = cpu_free >= cpu[v]
        score = np.where(fits, mem_free, mem_free - 1e12)
        h = int(np.argmax(score))
        host_of[v] = h
        mem_free[h] -= mem[v]
        cpu_free[h] -= cpu[v]
    return host_of


def initial_for(c: Cluster, workload: Workload, threshold: float = 1.0) -> IntArray:
    """CloudSim's creation-time placement for PlanetLab, a spread for Bitbrains."""
    if workload.kind == "bitbrains":
        return spread_initial(c, workload)
    return pabfd_initial(c, threshold)


class ThrMmt:
    """Static-threshold over-load detection + minimum-migration-time VM selection."""

    def __init__(self, threshold: float = 0.8) -> None:
        self.threshold = threshold
        self.name = f"thr-mmt-{threshold:g}"

    def initial_placement(self, cluster: Cluster, workload: Workload) -> IntArray:
        return initial_for(cluster, workload, self.threshold)

    def _over(self, w: _WhatIf, host: int) -> bool:
        total = 0.0
        for v in w.lists[host]:
            total += float(w.req[v])
        return total / float(w.c.host_cap_mips[host]) > self.threshold

    def decide(self, view: View) -> list[tuple[int, int]]:
        c = view.cluster
        w = _WhatIf(c, view, self.threshold)
        n = c.n_hosts
        over_hosts = [h for h in range(n) if w.lists[h] and self._over(w, h)]
        excluded_over = np.zeros(n, dtype=np.bool_)
        excluded_over[over_hosts] = True
        # VM selection (MMT): least RAM first, until the host is no longer over
        to_migrate: list[int] = []
        for h in over_hosts:
            while w.lists[h]:
                vm = min(w.lists[h], key=lambda v: c.vm_mem_mb[v])
                to_migrate.append(vm)
                w.lists[h].remove(vm)
                w.req_sum[h] -= w.req[vm]
                if not self._over(w, h):
                    break
        moves: list[tuple[int, int]] = []
        for vm in sorted(to_migrate, key=lambda v: -w.req[v]):
            h = w.find_host(vm, excluded_over)
            if h >= 0:
                w.create(vm, h)
                moves.append((vm, h))
        # consolidation of under-utilized hosts
        off = w.util_snap == 0
        excl_under = excluded_over | off
        excl_place = excluded_over | off
        while not excl_under.all():
            cand = np.where(
                excl_under | (w.util_snap <= 0) | (w.util_snap >= 1), np.inf, w.util_snap
            )
            u = int(np.argmin(cand))
            if not np.isfinite(cand[u]):
                break
            excl_under[u] = True
            excl_place[u] = True
            vms = list(w.lists[u])
            if not vms:
                continue
            placed: list[tuple[int, int]] = []
            for vm in sorted(vms, key=lambda v: -w.req[v]):
                h = w.find_host(vm, excl_place)
                if h < 0:
                    for pv, ph in placed:
                        w.destroy(pv, ph)
                    placed = []
                    break
                w.create(vm, h)
                placed.append((vm, h))
            for _, ph in placed:
                excl_under[ph] = True
            moves.extend(placed)
        return moves
