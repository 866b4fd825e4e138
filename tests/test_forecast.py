"""Planning demand from recent readings (pure)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from balancerd.forecast import DemandHistory, quantile
from balancerd.model import Host, Snapshot, Vm
from balancerd.policy.model import DemandForecast


@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.floats(0, 1))
def test_quantile_matches_numpy(values: list[float], q: float) -> None:
    assert abs(quantile(values, q) - float(np.quantile(values, q))) < 1e-9


def snap(util: float) -> Snapshot:
    vm = Vm(
        name="web", uuid="u1", host="h1", state="running", vcpus=2, mem_bytes=2**30, cpu_util=util
    )
    return Snapshot(taken_at_s=0.0, hosts=(Host(name="h1", uri="x", up=True, cpus=4),), vms=(vm,))


def test_planning_demand_is_the_quantile_of_the_window_only() -> None:
    history = DemandHistory(keep_s=100.0)
    # t=0: a spike that falls out of a 50 s window; then 0.1 .. 0.5 at t = 10 .. 50.
    history.record(snap(1.0), now_s=0.0)
    for i, u in enumerate([0.1, 0.2, 0.3, 0.4, 0.5], start=1):
        history.record(snap(u), now_s=10.0 * i)
    latest = snap(0.5)
    median = history.planning_snapshot(latest, DemandForecast(quantile=0.5, window_s=45), 50.0)
    assert abs(median.vms[0].cpu_util - 0.3) < 1e-9  # readings at 10..50 s
    peak = history.planning_snapshot(latest, DemandForecast(quantile=1.0, window_s=60), 50.0)
    assert peak.vms[0].cpu_util == 1.0  # the t=0 spike is inside a 60 s window
    assert latest.vms[0].cpu_util == 0.5  # the input is not changed


def test_history_forgets_readings_older_than_it_keeps_and_gone_guests() -> None:
    history = DemandHistory(keep_s=30.0)
    history.record(snap(0.9), now_s=0.0)
    history.record(snap(0.1), now_s=40.0)
    assert history.readings("u1", since_s=-1e9) == [0.1]
    empty = Snapshot(taken_at_s=0.0, hosts=(), vms=())
    history.record(empty, now_s=100.0)
    assert history.readings("u1", since_s=-1e9) == []


def test_a_guest_without_readings_keeps_its_snapshot_value() -> None:
    out = DemandHistory(keep_s=60.0).planning_snapshot(snap(0.42), DemandForecast(), 0.0)
    assert out.vms[0].cpu_util == 0.42
