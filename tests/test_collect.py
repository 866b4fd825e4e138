"""Counter deltas -> rates and smoothing (pure; no hosts needed)."""

from __future__ import annotations

from balancerd.collect import Capacity, SampleHistory, build_snapshot
from balancerd.model import HostSample, VmSample

NS = 1_000_000_000


def host(
    name: str, at_s: float, busy_s: float, total_s: float, vms: tuple[VmSample, ...] = ()
) -> HostSample:
    return HostSample(
        name=name,
        uri=f"qemu+tcp://{name}/system",
        up=True,
        sampled_at_s=at_s,
        cpus=4,
        mem_total_bytes=8 * 2**30,
        mem_free_bytes=6 * 2**30,
        cpu_busy_ns=int(busy_s * NS),
        cpu_total_ns=int(total_s * NS),
        vms=vms,
    )


def vm(cpu_s: float, state: str = "running", vcpus: int = 2) -> VmSample:
    return VmSample(
        name="web-1",
        uuid="u1",
        state=state,
        vcpus=vcpus,
        mem_bytes=2**30,
        cpu_time_ns=int(cpu_s * NS),
    )


def test_guest_util_is_cpu_time_delta_over_elapsed_and_vcpus() -> None:
    # 2 vCPUs, 1 s of CPU per 1 s elapsed -> 0.5 of its vCPUs, 1 core of the host.
    history = [
        (host("h1", 0.0, 0, 0, (vm(0.0),)),),
        (host("h1", 1.0, 2, 4, (vm(1.0),)),),
    ]
    snap = build_snapshot(history, window=4)
    assert snap.vms[0].cpu_util == 0.5
    assert snap.vms[0].cpu_cores == 1.0
    assert snap.hosts[0].cpu_util == 0.5  # 2 busy of 4 total CPU-seconds


def test_smoothing_averages_the_window_and_drops_older_spikes() -> None:
    cpu_s = [0.0, 2.0, 2.2, 2.4, 2.6, 2.8]  # first interval is a spike (2 s of 2 vCPUs)
    history = [(host("h1", float(i), 0, 0, (vm(c),)),) for i, c in enumerate(cpu_s)]
    assert abs(build_snapshot(history, window=5).vms[0].cpu_util - (1.0 + 4 * 0.1) / 5) < 1e-9
    assert abs(build_snapshot(history, window=4).vms[0].cpu_util - 0.1) < 1e-9


def test_down_host_keeps_its_name_and_error_and_loses_no_other_host() -> None:
    down = HostSample(name="h2", uri="u", up=False, sampled_at_s=1.0, error="refused")
    history = [
        (host("h1", 0.0, 0, 0, (vm(0.0),)), down),
        (host("h1", 1.0, 1, 4, (vm(0.5),)), down),
    ]
    snap = build_snapshot(history)
    assert [(h.name, h.up) for h in snap.hosts] == [("h1", True), ("h2", False)]
    assert snap.host("h2") is not None and snap.host("h2").error == "refused"  # type: ignore[union-attr]
    assert [v.host for v in snap.vms] == ["h1"]


def test_paused_interval_restarts_the_delta() -> None:
    history = [
        (host("h1", 0.0, 0, 0, (vm(0.0),)),),
        (host("h1", 1.0, 0, 0, (vm(5.0, state="paused"),)),),
        (host("h1", 2.0, 0, 0, (vm(5.2),)),),
        (host("h1", 3.0, 0, 0, (vm(5.4),)),),
    ]
    assert abs(build_snapshot(history).vms[0].cpu_util - 0.1) < 1e-9


def test_capacity_override_derives_free_memory_from_guests() -> None:
    history = [(host("h1", 0.0, 0, 0, (vm(0.0),)),)]
    snap = build_snapshot(history, capacity={"h1": Capacity(cpus=2, mem_bytes=4 * 2**30)})
    h = snap.hosts[0]
    assert (h.cpus, h.mem_bytes, h.mem_free_bytes) == (2, 4 * 2**30, 3 * 2**30)
    assert h.mem_util == 0.25


def test_incoming_migration_target_is_not_counted_twice() -> None:
    incoming = VmSample(
        name="web-1",
        uuid="u1",
        state="paused",
        vcpus=2,
        mem_bytes=2**30,
        cpu_time_ns=0,
        incoming=True,
    )
    history = [(host("h1", 0.0, 0, 0, (vm(0.0),)), host("h2", 0.0, 0, 0, (incoming,)))]
    assert [v.host for v in build_snapshot(history).vms] == ["h1"]


def test_history_is_bounded() -> None:
    h = SampleHistory(window=2)
    for i in range(5):
        h.add((host("h1", float(i), 0, 0),))
    assert len(h) == 3
    assert h.samples()[0][0].sampled_at_s == 2.0
