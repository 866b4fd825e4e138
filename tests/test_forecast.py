"""Planning demand from recent readings (pure)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from balancerd.forecast import READING_STEP, DemandHistory, quantile
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


def guests_snap(utils: dict[str, float]) -> Snapshot:
    vms = tuple(
        Vm(name=k, uuid=k, host="h1", state="running", vcpus=1, mem_bytes=2**30, cpu_util=u)
        for k, u in utils.items()
    )
    return Snapshot(taken_at_s=0.0, hosts=(Host(name="h1", uri="x", up=True, cpus=4),), vms=vms)


@given(
    st.lists(
        st.tuples(
            st.floats(0.5, 40.0),  # seconds since the previous record
            st.dictionaries(st.sampled_from("abc"), st.floats(0, 1)),  # who is there
        ),
        max_size=30,
    ),
    st.floats(5.0, 100.0),
)
def test_compact_history_keeps_what_a_list_per_guest_keeps(
    steps: list[tuple[float, dict[str, float]]], keep_s: float
) -> None:
    """Guests come and go (gaps in their readings): the aligned arrays answer as a plain
    list of (time, reading) per guest, pruned to the window, would."""
    history = DemandHistory(keep_s=keep_s)
    model: dict[str, list[tuple[float, float]]] = {}
    now_s = 0.0
    for gap_s, utils in steps:
        now_s += gap_s
        history.record(guests_snap(utils), now_s)
        for key, u in utils.items():
            model.setdefault(key, []).append((now_s, u))
        for key in list(model):
            model[key] = [(t, u) for t, u in model[key] if t >= now_s - keep_s]
        for key in "abc":
            expected = [u for t, u in model.get(key, []) if t >= now_s - keep_s / 2]
            got = history.readings(key, since_s=now_s - keep_s / 2)
            assert len(got) == len(expected)  # stored in READING_STEP steps
            pairs = zip(got, expected, strict=True)
            assert all(abs(g - e) <= READING_STEP / 2 + 1e-12 for g, e in pairs)
