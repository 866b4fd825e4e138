"""Dirty-rate sampling: a few guests per collect through the Hypervisor protocol (the
simulated hypervisor measures each guest's rate), cached with an age, small guests skipped,
the rate a finished migration measured taking over."""

from __future__ import annotations

from balancerd.collect import (
    DIRTY_CALC_S,
    DIRTY_SPAN_S,
    SampleHistory,
    build_snapshot,
    merge_dirty_rates,
)
from balancerd.execute.move import measured_dirty_rate
from balancerd.hypervisor.base import JobStats, MigrationRequest
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.model import HostSample, Snapshot, VmSample

MIB = 2**20


def cluster() -> SimHypervisor:
    hv = SimHypervisor([SimHost("h1", 8, 2000, 64 << 30), SimHost("h2", 8, 2000, 64 << 30)])
    for i, rate in enumerate((0.0, 20.0, 40.0)):
        hv.add_vm("h1", SimVm(f"g{i}", 2, 1 << 30, dirty_rate_bytes_s=rate * MIB))
    # g2 keeps rewriting one 64 MiB buffer: 40 MiB/s over 1 s, 8 MiB/s over 8 s
    hv.hosts["h1"].vms["g2"].dirty_working_set_bytes = 64 * MIB
    hv.add_vm("h2", SimVm("tiny", 1, 128 * MIB, dirty_rate_bytes_s=99 * MIB))
    return hv


def collect(hv: SimHypervisor, history: SampleHistory, step_s: float = 10.0) -> Snapshot:
    """One collect as the daemon does it: sample, snapshot, start the calculations due."""
    history.add(hv.sample_all())
    snap = build_snapshot(history.samples(), dirty=history.dirty)
    for vm, (host, seconds) in history.due_for_dirty_rate().items():
        hv.start_dirty_rate(host, vm, seconds)
    hv.advance(step_s, {})
    return snap


def rates(snap: Snapshot) -> dict[str, tuple[float | None, float | None]]:
    return {
        v.name: (
            None if v.dirty_rate_bytes_s is None else v.dirty_rate_bytes_s / MIB,
            v.dirty_rate_age_s,
        )
        for v in snap.vms
    }


def test_two_guests_per_collect_are_measured_in_rotation_and_small_ones_never() -> None:
    hv = cluster()
    h = SampleHistory(4)
    first = collect(hv, h, 40.0)
    assert all(r == (None, None) for r in rates(first).values())
    second = rates(collect(hv, h, 40.0))  # the calculations started last time are read now
    assert second["g0"] == (0.0, 0.0) and second["g1"] == (20.0, 0.0)
    assert second["g2"] == (None, None)
    collect(hv, h, 40.0)  # g0 and g1 get their long calculation
    fourth = rates(collect(hv, h, 40.0))
    assert fourth["g2"] == (40.0, 0.0)
    assert fourth["g0"] == (0.0, 80.0)  # the same measurement, older
    assert fourth["tiny"] == (None, None)  # below 256 MiB: not worth a calculation
    for _ in range(3):
        collect(hv, h, 40.0)
    assert hv.dirty_calcs == 6  # short + long each, nothing re-measured within its max age


def test_a_long_calculation_shows_the_working_set_of_a_guest_rewriting_a_buffer() -> None:
    hv = cluster()
    h = SampleHistory(4)
    for _ in range(6):
        snap = collect(hv, h, 40.0)
    ws = {v.name: v.dirty_working_set_bytes for v in snap.vms}
    assert ws["g2"] == 64 * MIB  # 8 MiB/s over 8 s: it saturated
    assert ws["g1"] is None  # 20 MiB/s over 8 s too: it did not
    assert DIRTY_SPAN_S * 20 * MIB < 1 << 30


def test_a_migration_measurement_replaces_an_older_calculation() -> None:
    hv = cluster()
    h = SampleHistory(4)
    for _ in range(3):
        collect(hv, h)
    hv.migrate(MigrationRequest("g1", "h1", "h2", True, 100, 300, False))
    h.record_dirty_rate("g1", 33 * MIB)
    snap = rates(collect(hv, h))
    assert snap["g1"] == (33.0, 10.0)  # the destination reports no calculation of its own


def test_guests_that_left_the_cluster_are_forgotten() -> None:
    hv = cluster()
    h = SampleHistory(4)
    for _ in range(3):
        collect(hv, h)
    hv.remove_vm("h1", "g0")
    assert "g0" not in merge_dirty_rates(h.dirty, hv.sample_all())


def job(iteration: int, dirty_mib_s: float) -> JobStats:
    return JobStats(True, 1.0, 0, 0, 0, 0.0, dirty_mib_s * MIB / 4096, 4096, iteration, 0.0)


def test_a_migration_measures_the_dirty_rate_after_the_first_sync() -> None:
    assert measured_dirty_rate([job(1, 0.0)]) is None
    seen = [job(1, 0.0), job(2, 30.0), job(3, 34.0), job(4, 32.0)]
    assert measured_dirty_rate(seen) == 32 * MIB


def test_an_unsaturated_long_calculation_refines_a_coarse_short_one() -> None:
    def sample(rate_mib_s: float, calc_id: int, seconds: int) -> tuple[HostSample, ...]:
        v = VmSample("g", "g", "running", 1, 256 * MIB, 0, rate_mib_s * MIB, calc_id, seconds)
        return (HostSample("h1", "sim:///h1", True, float(calc_id), vms=(v,)),)

    # page sampling on a small guest over 1 s: one page is 2 MiB/s (lab: 2.0 for 6.4)
    cache = merge_dirty_rates({}, sample(2.0, 1, DIRTY_CALC_S))
    cache = merge_dirty_rates(cache, sample(6.4, 2, DIRTY_SPAN_S))
    assert cache["g"].rate_bytes_s == 6.4 * MIB and cache["g"].working_set_bytes is None
    assert cache["g"].at_s == 1.0  # aged from the first measurement of the pair
