"""Raw samples -> Snapshot: counter deltas become rates, rates are smoothed. Pure.

The caller (daemon or CLI) keeps a short history of ``sample_all()`` results and passes
it in; nothing here reads a clock or a host.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence

from balancerd.config import HostConfig
from balancerd.model import Capacity as Capacity  # re-exported: daemon.py imports it here
from balancerd.model import Host, HostSample, Snapshot, Vm, VmSample
from balancerd.units import NS

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
) -> Snapshot:
    """The latest cluster sample, with utilizations averaged over the last ``window``
    intervals of ``history`` (oldest first). Hosts that are down keep ``up=False`` and
    contribute no guests: their guests are unknown, not gone."""
    if not history:
        return Snapshot(taken_at_s=0.0, hosts=(), vms=())
    recent = _index(list(history)[-(window + 1) :])
    latest = list(history)[-1]
    capacity = capacity or {}
    hosts: list[Host] = []
    vms: list[Vm] = []
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
                )
            )
            continue
        host_vms = [
            Vm(
                name=v.name,
                uuid=v.uuid,
                host=hs.name,
                state=v.state,
                vcpus=v.vcpus,
                mem_bytes=v.mem_bytes,
                cpu_util=_mean(_vm_cpu_utils(recent, hs.name, v.uuid)[-window:]),
                dirty_rate_bytes_s=v.dirty_rate_bytes_s,
            )
            for v in hs.vms
            # shut-off guests use nothing; an incoming migration target is counted at its source
            if v.state not in ("shutoff", "crashed") and not v.incoming
        ]
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
            )
        )
    taken_at_s = max(h.sampled_at_s for h in latest)
    return Snapshot(taken_at_s=taken_at_s, hosts=tuple(hosts), vms=tuple(vms))


class SampleHistory:
    """A bounded history of cluster samples (the one piece of state collection needs)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._samples: deque[ClusterSample] = deque(maxlen=window + 1)

    def add(self, sample: ClusterSample) -> None:
        self._samples.append(sample)

    def __len__(self) -> int:
        return len(self._samples)

    def samples(self) -> tuple[ClusterSample, ...]:
        return tuple(self._samples)


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
