"""The simulation loop: demand from the trace, CPU granted up to capacity, migrations with
a duration, and energy / SLA accounting exactly as CloudSim 3.0.3's ``PowerDatacenter``,
``HostDynamicWorkload`` and ``VmSchedulerTimeSharedOverSubscription`` do it:

- the cluster is updated at ``k * interval + 0.1`` s (k = 1 .. samples-1) and whenever a
  migration ends; between two updates every host's state is constant for the SLA metrics,
  and its energy is the mean of the power at both ends times the time (0 if the host had no
  CPU load at the start: an idle, empty host is off);
- a VM's demand at time t is its trace value linearly interpolated between samples;
- a host grants each VM its demand, capped at one core per vCPU; if the sum exceeds the
  host, every VM gets the same share (floored); a VM migrating out gets 90 % of that
  (the 10 % performance degradation PDM measures), a VM migrating in costs its target 10 %
  of its demand; the host's request still counts the full demand of a VM migrating in
  (so a migration target is "at 100 %" for SLATAH while it lasts, as in CloudSim);
- optionally (CloudSim) a VM whose demand is exactly 0 at an update is finished and removed.

Controllers (the THR-MMT baseline, our decide() pipeline) only *describe* migrations; the
engine performs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from balancerd.simulate.metrics import SlaAccumulator
from balancerd.simulate.scenario import Cluster
from balancerd.simulate.traces import Workload
from balancerd.units import MIB

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

UPDATE_OFFSET_S = 0.1  # CloudSim's datacenter events fall at k * interval + 0.1
ROLE_NORMAL, ROLE_OUT, ROLE_IN = 0, 1, 2


@dataclass
class State:
    """Every host and VM at one instant (after all changes at that instant)."""

    t_s: float
    util_mips: FloatArray  # [host] granted MIPS (a VM migrating out counts its full share)
    req_mips: FloatArray  # [host] requested MIPS (uncapped, incl. VMs migrating in)
    avail_mips: FloatArray  # [host] scheduler's free MIPS (0 when over-subscribed)
    vm_req: FloatArray  # [vm] requested MIPS (0 for absent VMs)
    vm_alloc: FloatArray  # [vm] granted MIPS on its (source) host
    vm_present: BoolArray  # [vm] running somewhere (not finished / not placed)
    vm_in_migration: BoolArray
    util_frac: FloatArray = field(default_factory=lambda: np.zeros(0))  # [host] 0..1
    incoming: BoolArray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))  # [host]

    def active_hosts(self) -> int:
        return int(np.count_nonzero(self.util_mips > 0))


@dataclass(frozen=True)
class Migration:
    vm: int
    src: int
    dst: int
    start_s: float
    end_s: float


@dataclass
class View:
    """What a controller sees at one scheduling instant (read-only by convention)."""

    k: int  # update number (1 ..)
    t_s: float
    interval_s: float
    cluster: Cluster
    state: State
    vm_host: IntArray  # [vm] host index, -1 if gone
    host_vms: list[list[int]]  # VMs of each host in arrival order (CloudSim's vmList)
    history: FloatArray  # [vm, k+1] observed CPU utilization (0..1 of the VM) up to now
    mem_used_mb: FloatArray | None  # [vm] memory in use now (Bitbrains), None if unknown


class Controller(Protocol):
    name: str

    def initial_placement(self, cluster: Cluster, workload: Workload) -> IntArray: ...

    def decide(self, view: View) -> Sequence[tuple[int, ...]]:
        """Migrations to start, in order: (vm, destination host) or (vm, host, wave)."""
        ...


@dataclass
class Result:
    scenario: str
    controller: str
    n_hosts: int
    n_vms: int
    energy_kwh: float
    slatah: float  # 0..1
    pdm: float  # 0..1
    slatah_incoming: float  # the part of SLATAH spent on hosts receiving a migration
    migrations: int
    mem_overcommit_events: int  # host-intervals a decision left a host over its memory
    mem_growth_events: int  # host-intervals guests had grown past their host's memory
    mem_unrelieved_events: int  # host-intervals still over after a decision (nothing moved in)
    vms_finished: int
    unplaced_vms: int
    interval_times_s: list[float]
    active_hosts: list[int]
    energy_kwh_per_interval: list[float]
    migrations_per_interval: list[int]
    decision_s: list[float]
    wall_s: float
    controller_failures: int = 0  # decisions abandoned (e.g. decide() past its deadline)

    @property
    def slav(self) -> float:
        return self.slatah * self.pdm

    @property
    def esv(self) -> float:
        return self.energy_kwh * self.slav

    def as_json(self) -> dict[str, object]:
        dec = sorted(self.decision_s) or [0.0]
        return {
            "scenario": self.scenario,
            "policy": self.controller,
            "hosts": self.n_hosts,
            "vms": self.n_vms,
            "energy_kwh": round(self.energy_kwh, 4),
            "slatah_pct": round(self.slatah * 100, 4),
            "pdm_pct": round(self.pdm * 100, 5),
            "slav": self.slav,
            "esv": self.esv,
            "migrations": self.migrations,
            "slatah_incoming_pct": round(self.slatah_incoming * 100, 4),
            "mem_overcommit_events": self.mem_overcommit_events,
            "mem_growth_events": self.mem_growth_events,
            "mem_unrelieved_events": self.mem_unrelieved_events,
            "vms_finished": self.vms_finished,
            "unplaced_vms": self.unplaced_vms,
            "active_hosts_mean": round(float(np.mean(self.active_hosts)), 2)
            if self.active_hosts
            else 0,
            "active_hosts": self.active_hosts,
            "decision_s_mean": round(float(np.mean(dec)), 5),
            "decision_s_p95": round(dec[int(0.95 * (len(dec) - 1))], 5),
            "decision_s_max": round(dec[-1], 5),
            "decide_timeouts": self.controller_failures,
            "wall_s": round(self.wall_s, 2),
        }


class Simulation:
    def __init__(self, cluster: Cluster, workload: Workload, *, intervals: int = 0) -> None:
        self.c = cluster
        self.w = workload
        n_samples = workload.n_samples
        # CloudSim keeps one extra sample (a copy of the last) for interpolation.
        self.util = np.concatenate([workload.cpu_util, workload.cpu_util[:, -1:]], axis=1)
        self.n_updates = n_samples - 1 if intervals <= 0 else min(intervals, n_samples - 1)
        self.interval_s = workload.interval_s
        self.vm_host = np.full(cluster.n_vms, -1, dtype=np.int64)
        self.host_vms: list[list[int]] = [[] for _ in range(cluster.n_hosts)]
        self.in_flight: list[Migration] = []
        self.sla = SlaAccumulator(cluster.n_hosts, cluster.n_vms)
        self.energy_j = 0.0
        self.migrations = 0
        self.finished = 0
        self.mem_overcommit = 0  # after decisions: the chosen placement over host memory
        self.mem_grown = 0  # before decisions: guests grew past their host since the last
        self.mem_unrelieved = 0  # after decisions: still over, though nothing moved there
        # memory each guest holds now (MB): provisioned, or its usage per sample (Bitbrains)
        self.use_mem_usage = cluster.spec.mem_from_usage and workload.mem_used_bytes.size > 0
        self.vm_mem_now = cluster.vm_mem_mb.copy()
        self._now = 0.0

    # --- demand and state ------------------------------------------------------------

    def demand_util(self, t_s: float) -> FloatArray:
        """UtilizationModelPlanetLabInMemory.getUtilization at ``t_s`` for every VM."""
        i1 = int(np.floor(t_s / self.interval_s))
        i1 = min(i1, self.util.shape[1] - 2)
        u1 = self.util[:, i1]
        u2 = self.util[:, i1 + 1]
        delta = (u2 - u1) / self.interval_s
        out: FloatArray = u1 + delta * (t_s - i1 * self.interval_s)
        return out

    def state(self, t_s: float) -> State:
        c = self.c
        req_v = self.demand_util(t_s) * c.vm_mips
        present = self.vm_host >= 0
        in_mig = np.zeros(c.n_vms, dtype=np.bool_)
        running = [m for m in self.in_flight if m.start_s <= t_s and self.vm_host[m.vm] >= 0]
        mig_vm = np.array([m.vm for m in running], dtype=np.int64)
        mig_dst = np.array([m.dst for m in running], dtype=np.int64)
        if len(mig_vm):
            in_mig[mig_vm] = True
        src_vm = np.flatnonzero(present)
        ent_vm = np.concatenate([src_vm, mig_vm])
        ent_host = np.concatenate([self.vm_host[src_vm], mig_dst])
        role = np.concatenate(
            [np.where(in_mig[src_vm], ROLE_OUT, ROLE_NORMAL), np.full(len(mig_vm), ROLE_IN)]
        )
        pes = c.vm_pes[ent_vm]
        per_pe = req_v[ent_vm] / pes
        capped_pe = np.minimum(per_pe, c.host_pe_mips[ent_host])
        capped = capped_pe * pes
        weight = np.where(role == ROLE_IN, capped * 0.1, capped)
        demand = np.bincount(ent_host, weights=weight, minlength=c.n_hosts)
        over = demand > c.host_cap_mips
        scale = np.where(over, c.host_cap_mips / np.where(demand > 0, demand, 1.0), 1.0)
        over_e = over[ent_host]
        s_e = scale[ent_host]
        alloc_fit = np.where(
            role == ROLE_OUT, capped_pe * 0.9, np.where(role == ROLE_IN, capped_pe * 0.1, capped_pe)
        )
        alloc_over = np.where(
            role == ROLE_OUT,
            np.floor(capped_pe * s_e * 0.9),
            np.where(role == ROLE_IN, np.floor(capped_pe * 0.1 * s_e), np.floor(capped_pe * s_e)),
        )
        alloc = np.where(over_e, alloc_over, alloc_fit) * pes
        contrib = np.where(role == ROLE_OUT, alloc / 0.9, alloc)
        util_mips = np.bincount(ent_host, weights=contrib, minlength=c.n_hosts).astype(np.float64)
        req_h = np.bincount(ent_host, weights=req_v[ent_vm], minlength=c.n_hosts).astype(np.float64)
        avail = np.where(over, 0.0, c.host_cap_mips - demand)
        vm_alloc = np.zeros(c.n_vms)
        not_in = role != ROLE_IN
        vm_alloc[ent_vm[not_in]] = alloc[not_in]
        frac = util_mips / c.host_cap_mips
        frac = np.where((frac > 1) & (frac < 1.01), 1.0, frac)
        return State(
            t_s=t_s,
            util_mips=util_mips,
            req_mips=req_h,
            avail_mips=avail,
            vm_req=np.where(present, req_v, 0.0),
            vm_alloc=vm_alloc,
            vm_present=present,
            vm_in_migration=in_mig,
            util_frac=frac,
            incoming=np.bincount(mig_dst, minlength=c.n_hosts) > 0,
        )

    # --- accounting ------------------------------------------------------------------

    def account(self, prev: State, cur: State) -> float:
        """Energy (J) and SLA time between two instants; ``cur`` is before its changes."""
        dt = cur.t_s - prev.t_s
        if dt <= 0:
            return 0.0
        p_prev = self.c.power.power_w(prev.util_frac)
        p_cur = self.c.power.power_w(cur.util_frac)
        on = prev.util_frac != 0
        e = float(np.sum(np.where(on, (p_prev + (p_cur - p_prev) / 2) * dt, 0.0)))
        self.energy_j += e
        self.sla.add_segment(prev, dt)
        return e

    # --- changes ---------------------------------------------------------------------

    def remove_finished(self, st: State) -> int:
        if not self.c.spec.remove_idle_vms:
            return 0
        done = np.flatnonzero(st.vm_present & ~st.vm_in_migration & (st.vm_req == 0))
        for v in done:
            h = int(self.vm_host[v])
            self.host_vms[h].remove(int(v))
            self.vm_host[v] = -1
        self.finished += len(done)
        return len(done)

    def place(self, vm: int, host: int) -> None:
        self.vm_host[vm] = host
        self.host_vms[host].append(vm)

    def start(self, moves: Sequence[tuple[int, ...]], t_s: float) -> int:
        """Start ``(vm, dst)`` moves now, or ``(vm, dst, wave)``: wave w starts when the
        longest migration of wave w-1 ends (the plan's capacity-safe order)."""
        by_wave: dict[int, list[tuple[int, int]]] = {}
        for mv in moves:
            vm, dst = int(mv[0]), int(mv[1])
            wave = int(mv[2]) if len(mv) > 2 else 0
            src = int(self.vm_host[vm])
            if src < 0 or dst == src or not 0 <= dst < self.c.n_hosts:
                continue
            if any(m.vm == vm for m in self.in_flight):
                continue  # already moving: CloudSim never selects such a VM either
            by_wave.setdefault(wave, []).append((vm, dst))
        started = 0
        at = t_s
        for wave in sorted(by_wave):
            longest = 0.0
            for vm, dst in by_wave[wave]:
                dur = self.c.migration_s(vm, float(self.vm_mem_now[vm]))
                self.in_flight.append(Migration(vm, int(self.vm_host[vm]), dst, at, at + dur))
                longest = max(longest, dur)
                started += 1
            at += longest
        self.migrations += started
        return started

    def complete(self, t_s: float) -> None:
        done = [m for m in self.in_flight if m.end_s <= t_s]
        self.in_flight = [m for m in self.in_flight if m.end_s > t_s]
        for m in done:
            src = int(self.vm_host[m.vm])
            if src < 0:
                continue  # finished while waiting for its wave
            self.host_vms[src].remove(m.vm)
            self.place(m.vm, m.dst)

    def _event_times(self, before: float) -> list[float]:
        """Ends of migrations and starts of later waves, before ``before``."""
        times = {m.end_s for m in self.in_flight} | {m.start_s for m in self.in_flight}
        now = self._now
        return sorted(x for x in times if now < x < before)

    def mem_over(self, *, final: bool) -> npt.NDArray[np.bool_]:
        """Hosts whose guests hold more memory than the host has, counting each guest on
        its current host, or (``final``) where the migrations started for it will leave it:
        the placement a decision chose, at the memory use it saw."""
        host_of = self.vm_host.copy()
        if final:
            for m in self.in_flight:
                if host_of[m.vm] >= 0:
                    host_of[m.vm] = m.dst
        alive = host_of >= 0
        mem = np.bincount(host_of[alive], weights=self.vm_mem_now[alive], minlength=self.c.n_hosts)
        over: npt.NDArray[np.bool_] = mem > self.c.host_mem_mb + 1e-6
        return over

    # --- the loop --------------------------------------------------------------------

    def run(
        self,
        controller: Controller,
        progress: Callable[[int, int], None] | None = None,
    ) -> Result:
        wall0 = time.perf_counter()
        initial = controller.initial_placement(self.c, self.w)
        for v, h in enumerate(initial):
            if h >= 0:
                self.place(v, int(h))
        unplaced = int(np.count_nonzero(initial < 0))
        prev: State | None = None
        times: list[float] = []
        active: list[int] = []
        energy_iv: list[float] = []
        mig_iv: list[int] = []
        decision: list[float] = []
        for k in range(1, self.n_updates + 1):
            t = k * self.interval_s + UPDATE_OFFSET_S
            e_iv = 0.0
            # migrations that end before this update
            for te in self._event_times(before=t):
                pre = self.state(te)
                if prev is not None:
                    e_iv += self.account(prev, pre)
                self.remove_finished(pre)
                self.complete(te)
                self._now = te
                prev = self.state(te)
                self.remove_finished(prev)
            if self.use_mem_usage:
                col = min(k, self.w.n_samples - 1)
                self.vm_mem_now = self.w.mem_used_bytes[:, col] / MIB
            pre = self.state(t)
            if prev is not None:
                e_iv += self.account(prev, pre)
            self.remove_finished(pre)
            pre = self.state(t)
            self.mem_grown += int(np.count_nonzero(self.mem_over(final=False)))
            k_hist = min(k, self.w.n_samples - 1)
            view = View(
                k=k,
                t_s=t,
                interval_s=self.interval_s,
                cluster=self.c,
                state=pre,
                vm_host=self.vm_host.copy(),
                host_vms=[list(h) for h in self.host_vms],
                history=self.w.cpu_util[:, : k_hist + 1],
                mem_used_mb=self.vm_mem_now.copy() if self.use_mem_usage else None,
            )
            t0 = time.perf_counter()
            moves = controller.decide(view)
            decision.append(time.perf_counter() - t0)
            n = self.start(moves, t)
            self._now = t
            prev = self.state(t) if n else pre
            over = self.mem_over(final=True)
            targets = np.zeros(self.c.n_hosts, dtype=np.bool_)
            targets[[m.dst for m in self.in_flight if m.start_s >= t]] = True
            # a decision that moves memory onto a host and leaves it over: must never happen
            self.mem_overcommit += int(np.count_nonzero(over & targets))
            # over and nothing moved in: growth the decision did not (or could not) relieve
            self.mem_unrelieved += int(np.count_nonzero(over & ~targets))
            times.append(t)
            active.append(prev.active_hosts())
            energy_iv.append(e_iv / 3.6e6)
            mig_iv.append(n)
            if progress is not None:
                progress(k, self.n_updates)
        # migrations started at the last update still end (and use energy) before the cut-off
        for te in self._event_times(before=float("inf")):
            pre = self.state(te)
            if prev is not None:
                e = self.account(prev, pre)
                if energy_iv:
                    energy_iv[-1] += e / 3.6e6
            self.remove_finished(pre)
            self.complete(te)
            self._now = te
            prev = self.state(te)
        return Result(
            scenario=self.c.spec.name,
            controller=controller.name,
            n_hosts=self.c.n_hosts,
            n_vms=self.c.n_vms,
            energy_kwh=self.energy_j / 3.6e6,
            slatah=self.sla.slatah(),
            pdm=self.sla.pdm(),
            slatah_incoming=self.sla.slatah_incoming(),
            migrations=self.migrations,
            mem_overcommit_events=self.mem_overcommit,
            mem_growth_events=self.mem_grown,
            mem_unrelieved_events=self.mem_unrelieved,
            vms_finished=self.finished,
            unplaced_vms=unplaced,
            interval_times_s=times,
            active_hosts=active,
            energy_kwh_per_interval=energy_iv,
            migrations_per_interval=mig_iv,
            decision_s=decision,
            wall_s=time.perf_counter() - wall0,
            controller_failures=int(getattr(controller, "decide_timeouts", 0)),
        )
