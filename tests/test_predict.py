"""predict.py: the pre-copy series, its convergence flag and range, and the sampling rotation."""

from __future__ import annotations

import pytest

from balancerd.predict import DirtySample, Link, calibrate_setup, pick_for_sampling, predict

MIB = 2**20
LINK = Link(bandwidth_bytes_s=50 * MIB, max_downtime_ms=50, setup_s=1.0)


def test_a_quiet_guest_costs_its_memory_over_the_link() -> None:
    e = predict(256 * MIB, 0.0, LINK)
    assert e.converges and e.passes == 1
    assert e.seconds == pytest.approx(1.0 + 256 / 50)
    assert e.bytes_sent == 256 * MIB and e.downtime_ms == 0.0


def test_a_guest_dirtying_half_the_link_converges_geometrically() -> None:
    e = predict(256 * MIB, 25 * MIB, LINK)
    # 256/50 + 128/50 + 64/50 + ... until what is left fits 50 ms (2.5 MiB)
    assert e.converges and e.passes >= 5
    assert 1.0 + 2 * 256 / 50 * 0.95 < e.seconds < 1.0 + 2 * 256 / 50
    assert e.seconds_low < e.seconds < e.seconds_high


def test_the_lab_guest_that_does_not_converge_is_flagged_with_its_fallback_downtime() -> None:
    # rewrites 96 of 256 MiB faster than 50 MiB/s: every pass resends the working set
    e = predict(256 * MIB, 60 * MIB, LINK, working_set_bytes=96 * MIB)
    assert not e.converges
    assert e.downtime_ms == pytest.approx(96 / 50 * 1000)  # pause-and-complete
    pc = predict(
        256 * MIB, 60 * MIB, Link(50 * MIB, 50, on_stall="postcopy"), working_set_bytes=96 * MIB
    )
    assert not pc.converges and pc.downtime_ms <= 50
    assert e.cost_s > pc.cost_s > predict(256 * MIB, 0.0, LINK).cost_s


def test_an_unknown_dirty_rate_counts_as_quiet_with_a_wide_range() -> None:
    known = predict(256 * MIB, 0.0, LINK)
    unknown = predict(256 * MIB, None, LINK)
    assert unknown.seconds == known.seconds
    assert unknown.seconds_high > known.seconds_high


def test_the_time_cap_bounds_the_prediction() -> None:
    e = predict(256 * MIB, 60 * MIB, Link(50 * MIB, 50, max_time_s=3.0), working_set_bytes=96 * MIB)
    assert e.seconds == 3.0


def test_setup_is_calibrated_from_finished_migrations() -> None:
    assert calibrate_setup([(7.0, 2.6), (6.0, 2.6), (9.0, 2.6)]) == pytest.approx(4.4)
    assert calibrate_setup([]) == 1.0


def test_sampling_rotates_skips_tiny_guests_and_fresh_samples() -> None:
    mem = {"tiny": 64 * MIB, "a": GIB, "b": GIB, "c": GIB, "d": GIB}
    cache = {"a": DirtySample(1.0, at_s=0.0), "b": DirtySample(1.0, at_s=900.0)}
    # never measured first (c, d), then the oldest (a); b is fresh; tiny never
    assert pick_for_sampling(mem, cache, now_s=1000.0, per_cycle=3) == ["c", "d", "a"]
    assert pick_for_sampling(mem, cache, now_s=1000.0, per_cycle=1) == ["c"]


GIB = 1024 * MIB


def test_the_range_holds_the_estimate_where_a_lower_rate_takes_longer() -> None:
    # near the link's speed the measured rate stalls (and ends by pause), 30 % less
    # converges slowly: the range still runs from its shortest to its longest
    e = predict(384 * MIB, 38 * MIB, Link(32 * MIB, 300), working_set_bytes=128 * MIB)
    assert e.seconds_low <= e.seconds <= e.seconds_high
    assert e.seconds_low < e.seconds_high
