"""SLA metrics of the CloudSim consolidation experiments (``Helper.java``):

- SLATAH: of all the time hosts were active (granting some CPU), the share during which a
  host granted less than was requested (it sat at 100 %);
- PDM: of all the CPU requested by all VMs over time, the share not granted because the
  VM was migrating (the 10 % degradation while a VM migrates out);
- SLAV = SLATAH x PDM; ESV = energy x SLAV.

Both are computed from state histories: a list of (time, allocated, requested, flag) per
host or VM; each entry holds until the next entry of the same host / VM.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from balancerd.simulate.engine import State

# (time_s, allocated_mips, requested_mips, active / in_migration)
HistoryEntry = tuple[float, float, float, bool]


def slatah(host_histories: Sequence[Sequence[HistoryEntry]]) -> float:
    """Helper.getSlaTimePerActiveHost: violation time / active time, over all hosts."""
    violation_s = 0.0
    active_s = 0.0
    for history in host_histories:
        for (t0, alloc, req, active), (t1, _, _, _) in pairwise(history):
            if not active:
                continue
            active_s += t1 - t0
            if alloc < req:
                violation_s += t1 - t0
    return violation_s / active_s if active_s > 0 else 0.0


def pdm(vm_histories: Sequence[Sequence[HistoryEntry]]) -> float:
    """Helper.getSlaMetrics' "underallocated_migration": MIPS·s not granted while a VM
    migrates / all MIPS·s requested."""
    requested = 0.0
    lost = 0.0
    for history in vm_histories:
        for (t0, alloc, req, migrating), (t1, _, _, _) in pairwise(history):
            dt = t1 - t0
            requested += req * dt
            if migrating and alloc < req:
                lost += (req - alloc) * dt
    return lost / requested if requested > 0 else 0.0


class SlaAccumulator:
    """The same two sums, accumulated segment by segment during a simulation."""

    def __init__(self, n_hosts: int, n_vms: int) -> None:
        self.active_s = 0.0
        self.violation_s = 0.0
        self.violation_incoming_s = 0.0
        self.requested_mips_s = 0.0
        self.lost_mips_s = 0.0
        self.n_hosts = n_hosts
        self.n_vms = n_vms

    def add_segment(self, st: State, dt: float) -> None:
        """``st`` holds for ``dt`` seconds."""
        active = st.util_mips > 0
        self.active_s += dt * int(np.count_nonzero(active))
        violated = active & (st.util_mips < st.req_mips)
        self.violation_s += dt * int(np.count_nonzero(violated))
        if st.incoming.size:
            self.violation_incoming_s += dt * int(np.count_nonzero(violated & st.incoming))
        present = st.vm_present
        self.requested_mips_s += float(np.sum(st.vm_req[present])) * dt
        lost = present & st.vm_in_migration & (st.vm_alloc < st.vm_req)
        self.lost_mips_s += float(np.sum(st.vm_req[lost] - st.vm_alloc[lost])) * dt

    def slatah(self) -> float:
        return self.violation_s / self.active_s if self.active_s > 0 else 0.0

    def slatah_incoming(self) -> float:
        """The share of SLATAH on hosts receiving a migration (CloudSim counts a migration
        target as over-loaded: it requests the guest's full demand, is granted 10 %)."""
        return self.violation_incoming_s / self.active_s if self.active_s > 0 else 0.0

    def pdm(self) -> float:
        return self.lost_mips_s / self.requested_mips_s if self.requested_mips_s > 0 else 0.0
