"""Raw samples -> Snapshot: counter deltas become rates, rates are smoothed. Pure.

The caller (daemon or CLI) keeps a short history of ``sample_all()`` results and passes
it in; nothing here reads a clock or a host.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

from balancerd.config import HostConfig
from balancerd.model import Capacity as Capacity  # re-exported: daemon.py imports it here
from balancerd.model import Host, HostSample, Snapshot, Vm, VmSample
from balancerd.predict import DirtySample, pick_for_sampling
from balancerd.units import MIB, NS

STOPPED_STATES = ("shutoff", "crashed")  # defined, not running: Snapshot.stopped
ClusterSample = tuple[HostSample, ...]  # one sample_all(): every host at about one instant


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# One cluster sample indexed for lookups: host name -> (sample, guest uuid -> guest).
_Indexed = dict[str, tuple[HostSample, dict[str, VmSample]]]


def _index(history: Sequence[ClusterSample]) -> list[_Indexed]:
    """Each cluster sample keyed by host and guest, so that a lookup costs O(1), not a
    scan of the cluster (1,000 hosts x 20 guests took seconds per snapshot). The first of
    two same-named entries wins, as a scan would have it (hence reversed)."""
    return [
        {h.name: (h, {v.uuid: v for v in reversed(h.vms)}) for h in reversed(cluster)}
        for cluster in history
    ]


def _host_cpu_utils(history: Sequence[_Indexed], host: str) -> list[float]:
    """Node CPU utilization (0..1) between each pair of consecutive up samples."""
    utils = []
    prev: HostSample | None = None
    for cluster in history:
        entry = cluster.get(host)
        cur = entry[0] if entry else None
        if cur is None or not cur.up:
            prev = None
            continue
        if prev is not None:
            total_ns = cur.cpu_total_ns - prev.cpu_total_ns
            busy_ns = cur.cpu_busy_ns - prev.cpu_busy_ns
            if total_ns > 0 and busy_ns >= 0:
                utils.append(min(1.0, busy_ns / total_ns))
        prev = cur
    return utils


def _vm_cpu_utils(history: Sequence[_Indexed], host: str, uuid: str) -> list[float]:
    """Guest CPU utilization (0..1 of its vCPUs) between consecutive samples on ``host``."""
    utils = []
    prev: tuple[float, VmSample] | None = None
    for cluster in history:
        entry = cluster.get(host)
        hs = entry[0] if entry and entry[0].up else None
        vm = entry[1].get(uuid) if entry and hs else None
        if hs is None or vm is None or vm.state != "running":
            prev = None  # a gap, a migration or a pause restarts the delta
            continue
        if prev is not None:
            prev_at_s, prev_vm = prev
            elapsed_ns = (hs.sampled_at_s - prev_at_s) * NS
            cpu_ns = vm.cpu_time_ns - prev_vm.cpu_time_ns
            if elapsed_ns > 0 and cpu_ns >= 0 and vm.vcpus > 0:
                utils.append(min(1.0, cpu_ns / (elapsed_ns * vm.vcpus)))
        prev = (hs.sampled_at_s, vm)
    return utils


def build_snapshot(
    history: Sequence[ClusterSample],
    *,
    window: int = 4,
    capacity: Mapping[str, Capacity] | None = None,
    powered_off: Collection[str] = (),
    dirty: Mapping[str, DirtySample] | None = None,
) -> Snapshot:
    """The latest cluster sample, with utilizations averaged over the last ``window``
    intervals of ``history`` (oldest first). Hosts that are down keep ``up=False`` and
    contribute no guests: their guests are unknown, not gone. ``dirty``: each guest's
    last measured dirty rate (``SampleHistory.dirty``); without it, what the hypervisor
    reports (age unknown)."""
    if not history:
        return Snapshot(taken_at_s=0.0, hosts=(), vms=())
    recent = _index(list(history)[-(window + 1) :])
    latest = list(history)[-1]
    taken_at_s = max(h.sampled_at_s for h in latest)
    capacity = capacity or {}
    dirty = dirty or {}
    hosts: list[Host] = []
    vms: list[Vm] = []
    stopped: list[Vm] = []
    for hs in latest:
        cap = capacity.get(hs.name, Capacity())
        if not hs.up:
            hosts.append(
                Host(
                    name=hs.name,
                    uri=hs.uri,
                    up=False,
                    error=hs.error,
                    powered_off=hs.name in powered_off,
                    cpus=cap.cpus,
                    mem_bytes=cap.mem_bytes,
                    core_speed_mhz=cap.core_speed_mhz,
                    labels=hs.labels,
                )
            )
            continue
        host_vms: list[Vm] = []
        for v in hs.vms:
            if v.incoming:
                continue  # an incoming migration target is counted at its source
            d = dirty.get(v.name)
            vm = Vm(
                name=v.name,
                uuid=v.uuid,
                host=hs.name,
                state=v.state,
                vcpus=v.vcpus,
                mem_bytes=v.mem_bytes,
                cpu_util=_mean(_vm_cpu_utils(recent, hs.name, v.uuid)[-window:]),
                dirty_rate_bytes_s=d.rate_bytes_s if d else v.dirty_rate_bytes_s,
                dirty_rate_age_s=taken_at_s - d.at_s if d else None,
                dirty_working_set_bytes=d.working_set_bytes if d else None,
                tags=v.tags,
                blockers=v.blockers,
            )
            # stopped guests use nothing now: listed apart, not in the host's load
            (stopped if v.state in STOPPED_STATES else host_vms).append(vm)
        vms.extend(host_vms)
        mem_bytes = cap.mem_bytes or hs.mem_total_bytes
        if cap.mem_bytes:
            # The host's own free-memory reading belongs to the real machine: derive it.
            mem_free_bytes = max(0, cap.mem_bytes - sum(v.mem_bytes for v in host_vms))
        else:
            mem_free_bytes = hs.mem_free_bytes
        hosts.append(
            Host(
                name=hs.name,
                uri=hs.uri,
                up=True,
                cpus=cap.cpus or hs.cpus,
                cpu_mhz=hs.cpu_mhz,
                core_speed_mhz=cap.core_speed_mhz or float(hs.core_speed_mhz),
                mem_bytes=mem_bytes,
                mem_free_bytes=mem_free_bytes,
                cpu_util=_mean(_host_cpu_utils(recent, hs.name)[-window:]),
                hostname=hs.hostname,
                host_uuid=hs.host_uuid,
                libvirt_version=hs.libvirt_version,
                hypervisor_version=hs.hypervisor_version,
                labels=hs.labels,
            )
        )
    return Snapshot(
        taken_at_s=taken_at_s, hosts=tuple(hosts), vms=tuple(vms), stopped=tuple(stopped)
    )


class SampleHistory:
    """A bounded history of cluster samples (the one piece of state collection needs)."""

    def __init__(self, window: int, dirty_pending_s: float | None = None) -> None:
        """``dirty_pending_s``: how long a started dirty-rate calculation is awaited
        before the guest may be picked again (default DIRTY_CALC_PENDING_S)."""
        self.window = window
        self.dirty_pending_s = DIRTY_CALC_PENDING_S if dirty_pending_s is None else dirty_pending_s
        self._samples: deque[ClusterSample] = deque(maxlen=window + 1)
        self.dirty: dict[str, DirtySample] = {}  # guest -> its last measured dirty rate
        self._dirty_started: dict[str, float] = {}  # guest -> when its calc was started

    def add(self, sample: ClusterSample) -> None:
        self._samples.append(sample)
        self.dirty = merge_dirty_rates(self.dirty, sample)

    def latest_at_s(self) -> float:
        return max((h.sampled_at_s for h in self._samples[-1]), default=0.0) if self else 0.0

    def record_dirty_rate(self, vm: str, rate_bytes_s: float) -> None:
        """What a finished migration measured (as of the latest sample). The executor's
        thread calls this while collect may run: the dict is replaced, never changed."""
        old = self.dirty.get(vm) or DirtySample(0.0, 0.0)
        sample = replace(old, rate_bytes_s=rate_bytes_s, at_s=self.latest_at_s())
        self.dirty = {**self.dirty, vm: sample}

    def due_for_dirty_rate(self) -> dict[str, tuple[str, int]]:
        """Guest -> (host, seconds) of the few running guests to measure now, none whose
        calculation is under way: first a long one (DIRTY_SPAN_S) after each new short
        one, to see the working set; then the rotation of predict.pick_for_sampling."""
        if not self:
            return {}
        now_s = self.latest_at_s()
        where: dict[str, str] = {}
        mem: dict[str, int] = {}
        for hs in self._samples[-1]:
            for v in hs.vms if hs.up else ():
                started = self._dirty_started.get(v.name)
                if (
                    v.state == "running"
                    and not v.in_job
                    and not v.incoming
                    and (started is None or now_s - started >= self.dirty_pending_s)
                ):
                    where[v.name] = hs.name
                    mem[v.name] = v.mem_bytes
        span = sorted(vm for vm in where if vm in self.dirty and not self.dirty[vm].spanned)
        out = {vm: (where[vm], DIRTY_SPAN_S) for vm in span[:DIRTY_PER_CYCLE]}
        rest = {vm: m for vm, m in mem.items() if vm not in out}
        for vm in pick_for_sampling(
            rest,
            self.dirty,
            now_s,
            per_cycle=DIRTY_PER_CYCLE - len(out),
            max_age_s=DIRTY_MAX_AGE_S,
            min_mem_bytes=DIRTY_MIN_MEM_BYTES,
        ):
            out[vm] = (where[vm], DIRTY_CALC_S)
        for vm in out:
            self._dirty_started[vm] = now_s
        return out

    def __len__(self) -> int:
        return len(self._samples)

    def samples(self) -> tuple[ClusterSample, ...]:
        return tuple(self._samples)


# Dirty-rate sampling (libvirt calc-dirty-rate): a 1 s calculation on at most two guests
# per collect, each re-measured after 10 min, none below 256 MiB (quick to move anyway);
# each followed by an 8 s one: a guest that rewrites a small buffer shows a lower rate
# over the longer span, and the distinct pages it dirtied are its working set.
DIRTY_CALC_S = 1
DIRTY_SPAN_S = 8
SATURATED = 0.8  # the long rate below this share of the short one: the working set is full
DIRTY_PER_CYCLE = 2
DIRTY_MAX_AGE_S = 600.0
DIRTY_MIN_MEM_BYTES = 256 * MIB
DIRTY_CALC_PENDING_S = 30.0  # a calculation started this recently is still awaited


def merge_dirty_rates(
    cache: Mapping[str, DirtySample], cluster: ClusterSample
) -> dict[str, DirtySample]:
    """``cache`` with the measurements ``cluster`` reports that it has not seen yet (a new
    calculation id), stamped with the sample's time: a short one is the rate; a long one
    after it gives the working set where it saturated (distinct pages over the span).
    Guests no up host reports are dropped once every host is up (a down host's guests
    are unknown, not gone)."""
    out = dict(cache)
    seen: set[str] = set()
    for hs in cluster:
        for v in hs.vms if hs.up else ():
            seen.add(v.name)
            old = out.get(v.name)
            rate = v.dirty_rate_bytes_s
            if rate is None or (old is not None and old.calc_id == v.dirty_calc_id):
                continue
            if old is not None and v.dirty_calc_s > DIRTY_CALC_S:
                # saturated: the distinct pages are the working set; else the long span
                # counted more pages than the short one: the better rate
                saturated = rate < SATURATED * old.rate_bytes_s
                out[v.name] = replace(
                    old,
                    rate_bytes_s=old.rate_bytes_s if saturated else rate,
                    calc_id=v.dirty_calc_id,
                    working_set_bytes=rate * v.dirty_calc_s if saturated else None,
                    spanned=True,
                )
            else:
                prev_ws = old.working_set_bytes if old is not None else None
                out[v.name] = DirtySample(rate, hs.sampled_at_s, v.dirty_calc_id, prev_ws)
    if all(hs.up for hs in cluster):
        out = {vm: d for vm, d in out.items() if vm in seen}
    return out


def capacity_from_config(hosts: Sequence[HostConfig]) -> dict[str, Capacity]:
    """Capacity overrides from the daemon config's host entries."""
    return {
        h.name: Capacity(cpus=h.cpus, mem_bytes=h.mem_bytes, core_speed_mhz=h.cpu_speed_mhz)
        for h in hosts
        if h.cpus or h.mem_bytes or h.cpu_speed_mhz
    }


def merge_capacity(
    last_seen: Mapping[str, Capacity], configured: Mapping[str, Capacity]
) -> dict[str, Capacity]:
    """Per host and field: the configured value where set, else what was last seen."""
    out = dict(last_seen)
    for name, cfg in configured.items():
        seen = last_seen.get(name, Capacity())
        out[name] = Capacity(
            cpus=cfg.cpus or seen.cpus,
            mem_bytes=cfg.mem_bytes or seen.mem_bytes,
            core_speed_mhz=cfg.core_speed_mhz or seen.core_speed_mhz,
        )
    return out
