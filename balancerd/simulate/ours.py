"""Our policy in the simulator: the daemon's own pipeline, fed from a simulated cluster.

Each interval: the engine's granted CPU advances the counters of a ``SimHypervisor``;
``sample_all()`` -> ``collect.build_snapshot`` (the real collect path) gives each guest's
utilization over the last interval; a per-guest forecast replaces it as the planning demand;
``decide(snapshot, policy)`` returns a Plan whose moves the engine performs.

The forecast lives here, on the policy-input side: the planner sees a demand that covers
what the guest is likely to need until the next cycle (a high quantile of its recent
history, never below its latest reading), so a packed host rarely tips over 100 %.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from balancerd.collect import SampleHistory, build_snapshot
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.model import Plan, Snapshot
from balancerd.policy.model import Policy
from balancerd.simulate.cloudsim import initial_for
from balancerd.simulate.engine import View
from balancerd.simulate.scenario import Cluster
from balancerd.simulate.traces import Workload
from balancerd.units import MIB

IntArray = npt.NDArray[np.int64]
log = logging.getLogger(__name__)

# Hosts and guests have their real cores (CloudSim's PEs); a host reports its PE MIPS as
# its nominal core speed, so the decision core counts CPU in reference cores and keeps a
# guest off cores too slow for its vCPUs (balancerd/speed.py), as it would on libvirt.

UNENFORCED_MEM_SCALE = 100.0  # scenario without memory limits: hosts look this much bigger

DecideFn = Callable[..., Plan]


@dataclass(frozen=True)
class Forecast:
    """Planning demand of one guest: max(latest, quantile q of the last ``window`` readings)
    plus ``margin`` (absolute utilization), capped at 1."""

    window: int = 24  # readings (2 h at 300 s)
    quantile: float = 0.9
    margin: float = 0.0
    latest_floor: bool = False  # never plan below the latest reading

    def __call__(self, readings: npt.NDArray[np.float64]) -> float:
        if readings.size == 0:
            return 0.0
        q = float(np.quantile(readings[-self.window :], self.quantile))
        if self.latest_floor:
            q = max(q, float(readings[-1]))
        return min(1.0, q + self.margin)

    def many(
        self, window: npt.NDArray[np.float64], latest: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """The same for many guests: ``window`` is [guest, readings], oldest first."""
        if window.size == 0:
            return np.zeros(len(latest))
        q = np.quantile(window, self.quantile, axis=1)
        if self.latest_floor:
            q = np.maximum(q, latest)
        out: npt.NDArray[np.float64] = np.minimum(1.0, q + self.margin)
        return out


def host_type_labels(type_name: str) -> dict[str, str]:
    """Labels of a simulated host, as a daemon config would give them: its host type and
    the generation that ends the type's name (``hp-ml110-g4`` -> ``gen: g4``), so a policy
    selects hosts by ``{hosts: {labels: {gen: g4}}}``."""
    return {"type": type_name, "gen": type_name.rpartition("-")[2]}


class DecideTimeout(Exception):
    """decide() did not return within the controller's deadline."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """SIGALRM-based deadline (main thread, Unix); a no-op elsewhere."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: object) -> None:
        raise DecideTimeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def default_decide() -> DecideFn:
    """``balancerd.decide.decide``: the daemon's collect -> solve -> plan pipeline."""
    module = importlib.import_module("balancerd.decide")
    fn: DecideFn = module.decide
    return fn


class PolicyController:
    def __init__(
        self,
        policy: Policy,
        *,
        decide: DecideFn | None = None,
        forecast: Forecast | None = None,
        decide_kwargs: dict[str, Any] | None = None,
        decide_timeout_s: float = 60.0,
    ) -> None:
        self.policy = policy
        self.name = f"policy:{policy.name}"
        self._decide = decide
        self.forecast = forecast or Forecast()
        self.decide_kwargs = decide_kwargs or {}
        self.decide_timeout_s = decide_timeout_s
        self.decide_timeouts = 0
        self.hv: SimHypervisor | None = None
        self.samples = SampleHistory(window=1)
        self.readings: dict[str, deque[float]] = {}
        self.mem_readings: dict[str, deque[int]] = {}
        self.last_moved_s: dict[str, float] = {}
        self.host_index: dict[str, int] = {}
        self.vm_index: dict[str, int] = {}
        self.where: dict[str, str] = {}  # vm -> host as the sim hypervisor has it
        self.plans: list[Plan] = []
        self.keep_plans = False

    def initial_placement(self, cluster: Cluster, workload: Workload) -> IntArray:
        """The same start as the baseline (CloudSim's creation-time placement)."""
        host_of = initial_for(cluster, workload)
        mem_scale = 1.0 if cluster.spec.enforce_memory else UNENFORCED_MEM_SCALE
        hosts = [
            SimHost(
                name=cluster.host_names[h],
                cpus=int(cluster.host_pes[h]),
                cpu_mhz=int(cluster.host_pe_mips[h]),
                core_speed_mhz=int(cluster.host_pe_mips[h]),
                mem_bytes=int(cluster.host_mem_mb[h] * MIB * mem_scale),
                labels=host_type_labels(cluster.spec.host_types[int(cluster.host_type[h])].name),
            )
            for h in range(cluster.n_hosts)
        ]
        self.hv = SimHypervisor(hosts)
        self.host_index = {n: i for i, n in enumerate(cluster.host_names)}
        self.vm_index = {n: i for i, n in enumerate(cluster.vm_names)}
        for v, h in enumerate(host_of):
            if h >= 0:
                name = cluster.vm_names[v]
                self.hv.add_vm(cluster.host_names[h], self._sim_vm(cluster, v))
                self.where[name] = cluster.host_names[h]
        return host_of

    @staticmethod
    def _sim_vm(cluster: Cluster, v: int) -> SimVm:
        return SimVm(
            name=cluster.vm_names[v],
            vcpus=int(cluster.vm_pes[v]),
            mem_bytes=int(cluster.vm_mem_mb[v] * MIB),
        )

    def _sync(self, view: View) -> None:
        """Mirror the engine's placement (finished guests, completed migrations)."""
        if self.hv is None:
            raise RuntimeError("internal error: self.hv is None")
        c = view.cluster
        for v, name in enumerate(c.vm_names):
            h = int(view.vm_host[v])
            have = self.where.get(name)
            want = c.host_names[h] if h >= 0 else None
            if have == want:
                continue
            vm = self.hv.hosts[have].vms.pop(name) if have is not None else self._sim_vm(c, v)
            if want is None:
                del self.where[name]
                continue
            self.hv.hosts[want].vms[name] = vm
            self.where[name] = want

    def observe(self, view: View) -> Snapshot:
        """Advance the counters by one interval of granted CPU and collect a snapshot."""
        if self.hv is None:
            raise RuntimeError("internal error: self.hv is None")
        self._sync(view)
        c = view.cluster
        st = view.state
        # granted MIPS in cores of the host the guest runs on
        busy = {
            c.vm_names[v]: float(st.vm_alloc[v]) / float(c.host_pe_mips[view.vm_host[v]])
            for v in np.flatnonzero(st.vm_present)
            if view.vm_host[v] >= 0
        }
        if view.mem_used_mb is not None:
            # the guest's resident memory, as the hypervisor would report it
            for v in np.flatnonzero(st.vm_present):
                name = c.vm_names[v]
                host = self.where.get(name)
                if host is not None:
                    self.hv.hosts[host].vms[name].mem_bytes = int(view.mem_used_mb[v] * MIB)
        if len(self.samples) == 0:
            self.samples.add(self.hv.sample_all())
        self.hv.advance(view.interval_s, busy)
        self.samples.add(self.hv.sample_all())
        return build_snapshot(self.samples.samples(), window=1)

    def plan_input(self, snap: Snapshot) -> Snapshot:
        """The snapshot with each guest's CPU replaced by its forecast (and its memory by
        the recent peak of what it held)."""
        w = self.forecast.window
        cpu = np.empty(len(snap.vms))
        mem = np.empty(len(snap.vms))
        for i, vm in enumerate(snap.vms):
            hist = self.readings.setdefault(vm.name, deque(maxlen=w))
            hist.append(vm.cpu_util)
            mhist = self.mem_readings.setdefault(vm.name, deque(maxlen=w))
            mhist.append(vm.mem_bytes)
            cpu[i] = vm.cpu_util
            mem[i] = max(mhist)
        # one vectorized quantile over a [guest, window] matrix (short histories padded
        # with their latest reading, which the forecast takes anyway)
        mat = np.empty((len(snap.vms), w))
        for i, vm in enumerate(snap.vms):
            hist = self.readings[vm.name]
            mat[i, :] = hist[-1]
            mat[i, w - len(hist) :] = list(hist)
        plan_cpu = self.forecast.many(mat, cpu)
        vms = tuple(
            replace(vm, cpu_util=float(plan_cpu[i]), mem_bytes=int(mem[i]))
            for i, vm in enumerate(snap.vms)
        )
        return replace(snap, vms=vms)

    def decide(self, view: View) -> list[tuple[int, int, int]]:
        snap = self.plan_input(self.observe(view))
        fn = self._decide or default_decide()
        try:
            with _deadline(self.decide_timeout_s):
                plan = fn(
                    snap,
                    self.policy,
                    last_moved_s=self.last_moved_s,
                    now_s=view.t_s,
                    **self.decide_kwargs,
                )
        except DecideTimeout:
            # like a failed daemon cycle: logged, counted, nothing moves, the next one runs
            self.decide_timeouts += 1
            log.warning(
                "decide() gave no plan within %.0f s at t=%.1f s", self.decide_timeout_s, view.t_s
            )
            return []
        if self.keep_plans:
            self.plans.append(plan)
        moves = []
        for mv in plan.moves:
            v = self.vm_index.get(mv.vm)
            h = self.host_index.get(mv.dst)
            if v is None or h is None:
                continue
            moves.append((v, h, mv.wave))
            self.last_moved_s[mv.vm] = view.t_s
        return moves
