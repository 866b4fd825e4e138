"""Convergence rules: table-driven over synthetic job-progress histories (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from balancerd.execute.converge import (
    MIB,
    Action,
    Ladder,
    Mode,
    StallRules,
    decide,
    mode_of,
    stall_reason,
)
from balancerd.hypervisor.base import JobStats
from balancerd.policy.model import Migration

PAGE = 4096
BW = 50 * MIB  # bandwidth cap in these tests


def s(remaining_mib: float, iteration: int = 2, dirty_mib_s: float = 0.0, **kw: object) -> JobStats:
    base = JobStats(
        active=True,
        elapsed_s=0.0,
        data_total_bytes=256 * MIB,
        data_processed_bytes=0,
        data_remaining_bytes=int(remaining_mib * MIB),
        mem_bandwidth_bytes_s=BW,
        dirty_rate_pages_s=dirty_mib_s * MIB / PAGE,
        page_size_bytes=PAGE,
        iteration=iteration,
        expected_downtime_ms=0.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def rules(**kw: object) -> StallRules:
    mig = Migration(bandwidth_mib_s=50, max_downtime_ms=300, stall_samples=3, max_time_s=600)
    return replace(StallRules.for_vm(mig, "vm1"), **kw)  # type: ignore[arg-type]


FIRST_PASS = [s(r, iteration=1) for r in (250, 200, 150, 100, 50)]
# Later iterations: a sawtooth whose lows keep falling -> converging.
SAWTOOTH_DOWN = [
    s(r, iteration=i) for i, r in [(2, 60), (2, 40), (3, 50), (3, 30), (4, 35), (4, 20)]
]
# Lows stop falling: 16 MiB low, then it grows again (what the lab saw: 16 -> 91 MiB).
GROWING = [s(r, iteration=i) for i, r in [(2, 40), (3, 16), (4, 40), (5, 60), (6, 91)]]
# New lows each sample, but the guest dirties faster than the link.
DIRTY = [s(r, iteration=3, dirty_mib_s=80) for r in (90, 89, 88, 87)]


@pytest.mark.parametrize(
    ("name", "history", "stalled"),
    [
        ("first pass always shrinks", FIRST_PASS, False),
        ("falling sawtooth converges", SAWTOOTH_DOWN, False),
        ("no new low for 3 samples", GROWING, True),
        ("dirty rate above bandwidth", DIRTY, True),
        (
            "dirty above bandwidth in the first pass is not counted",
            [s(r, iteration=1, dirty_mib_s=80) for r in (250, 200, 150, 100)],
            False,
        ),
        (
            "dirty below bandwidth",
            [s(r, iteration=3, dirty_mib_s=30) for r in (90, 89, 88, 87)],
            False,
        ),
        ("too few samples", GROWING[:3], False),
        ("inactive samples ignored", [s(40), s(16), replace(s(40), active=False), s(50)], False),
        ("flat remaining is not progress", [s(50), s(50), s(50), s(50)], True),
    ],
)
def test_stall_reason(name: str, history: list[JobStats], stalled: bool) -> None:
    assert (stall_reason(history, 0, 3, BW) is not None) == stalled, name


def test_stall_reason_names_the_numbers() -> None:
    why = stall_reason(GROWING, 0, 3, BW)
    assert why is not None
    assert "remaining 91 MiB" in why and "16 MiB" in why
    why = stall_reason(DIRTY, 0, 3, BW)
    assert why is not None and "dirty 80 MiB/s > 50 MiB/s" in why


def test_window_restarts_after_a_rung() -> None:
    history = [*GROWING, s(95, iteration=7), s(96, iteration=8)]
    assert stall_reason(history, 0, 3, BW) is not None
    # counting restarts at index 5: only 2 samples since
    assert stall_reason(history, 5, 3, BW) is None


L0 = Ladder(downtime_ms=300)
# On the pause rung since job time 2 s (10 MiB = 0.2 s at 50 MiB/s is "end of a pass").
ARMED = Ladder(downtime_ms=2000, downtime_raises=3, auto_converge_waited=True, pause_from_s=2.0)


@pytest.mark.parametrize(
    ("name", "history", "ladder", "rules_kw", "elapsed_s", "action", "downtime_ms"),
    [
        ("converging waits", SAWTOOTH_DOWN, L0, {}, 10, Action.WAIT, 0),
        ("stall raises to the first step", GROWING, L0, {}, 10, Action.RAISE_DOWNTIME, 500),
        (
            "steps not above the current max are passed over",
            GROWING,
            Ladder(downtime_ms=800),
            {},
            10,
            Action.RAISE_DOWNTIME,
            1000,
        ),
        (
            "after the last step: auto-converge patience",
            GROWING,
            Ladder(downtime_ms=2000, downtime_raises=3),
            {},
            10,
            Action.AUTO_CONVERGE,
            0,
        ),
        (
            "auto-converge off: get ready to pause",
            GROWING,
            Ladder(downtime_ms=2000, downtime_raises=3),
            {"auto_converge": False},
            10,
            Action.PREPARE_PAUSE,
            0,
        ),
        (
            "throttle at its ceiling: no patience",
            [*GROWING[:-1], replace(GROWING[-1], auto_converge_throttle_pct=99)],
            Ladder(downtime_ms=2000, downtime_raises=3),
            {},
            10,
            Action.PREPARE_PAUSE,
            0,
        ),
        (
            "auto-converge already waited: pause next",
            GROWING,
            Ladder(downtime_ms=2000, downtime_raises=3, auto_converge_waited=True),
            {},
            10,
            Action.PREPARE_PAUSE,
            0,
        ),
        (
            "pausing forbidden: abort",
            GROWING,
            Ladder(downtime_ms=2000, downtime_raises=3, auto_converge_waited=True),
            {"may_pause": False, "abort_why": "on_stall=abort"},
            10,
            Action.ABORT,
            0,
        ),
        ("time cap aborts even while converging", SAWTOOTH_DOWN, L0, {}, 600, Action.ABORT, 0),
        (
            "at the pause rung with little left of the pass: pause at once",
            [s(r, iteration=2 + k) for k, r in enumerate((40, 1, 40, 60, 91, 8))],
            Ladder(downtime_ms=2000, downtime_raises=3, auto_converge_waited=True),
            {},
            10,
            Action.PAUSE,
            0,
        ),
        ("armed, mid-pass: wait", [s(40, elapsed_s=3)], ARMED, {}, 10, Action.WAIT, 0),
        ("armed, end of a pass: pause", [s(9, elapsed_s=3)], ARMED, {}, 10, Action.PAUSE, 0),
        ("armed, waited 6 s: pause", [s(40, elapsed_s=8)], ARMED, {}, 10, Action.PAUSE, 0),
        ("paused: wait for the rest", GROWING, replace(L0, paused=True), {}, 10, Action.WAIT, 0),
        (
            "paused but past the cap: abort",
            GROWING,
            replace(L0, paused=True),
            {},
            601,
            Action.ABORT,
            0,
        ),
        ("cold rules never stall", GROWING, L0, {"stall_samples": 0}, 10, Action.WAIT, 0),
        ("no samples yet", [], L0, {}, 3, Action.WAIT, 0),
    ],
)
def test_decide(
    name: str,
    history: list[JobStats],
    ladder: Ladder,
    rules_kw: dict[str, object],
    elapsed_s: float,
    action: Action,
    downtime_ms: int,
) -> None:
    d = decide(history, ladder, rules(**rules_kw), elapsed_s)
    assert d.action is action, name
    assert d.downtime_ms == downtime_ms, name
    if action is not Action.WAIT:
        assert d.reason, name


def test_abort_reason_says_why_and_why_not_pause() -> None:
    mig = Migration(bandwidth_mib_s=50, stall_samples=3, downtime_steps_ms=(), auto_converge=False)
    no_pause = StallRules.for_vm(replace(mig, no_pause_vms=("db-1",)), "db-1")
    d = decide(GROWING, L0, no_pause, 42)
    assert d.action is Action.ABORT
    assert "db-1 is in no_pause_vms" in d.reason and "remaining 91 MiB" in d.reason
    on_abort = StallRules.for_vm(replace(mig, on_stall="abort"), "web-1")
    assert "on_stall=abort" in decide(GROWING, L0, on_abort, 42).reason
    assert StallRules.for_vm(mig, "web-1").may_pause


def walk(samples: list[JobStats], r: StallRules) -> list[tuple[Action, int]]:
    """Feed samples one by one as the monitor does; the actions taken, in order."""
    history: list[JobStats] = []
    ladder = Ladder(downtime_ms=r.max_downtime_ms)
    taken = []
    for i, sample in enumerate(samples):
        history.append(replace(sample, elapsed_s=float(i)))
        d = decide(history, ladder, r, float(i))
        if d.action is not Action.WAIT:
            taken.append((d.action, d.downtime_ms))
        ladder = d.ladder
    return taken


def test_a_guest_that_never_converges_climbs_the_whole_ladder_once() -> None:
    never = [FIRST_PASS[0], FIRST_PASS[2]] + [
        s(16 + 10 * (i % 5), iteration=2 + i) for i in range(40)
    ]
    assert walk(never, rules()) == [
        (Action.RAISE_DOWNTIME, 500),
        (Action.RAISE_DOWNTIME, 1000),
        (Action.RAISE_DOWNTIME, 2000),
        (Action.AUTO_CONVERGE, 0),
        (Action.PREPARE_PAUSE, 0),
        (Action.PAUSE, 0),  # never below 10 MiB: after 6 s anyway
    ]


def test_the_pause_waits_for_the_end_of_a_pass() -> None:
    # stalled sawtooth: passes of 4 samples, 90 -> 60 -> 30 -> 5 MiB
    samples = [
        s(r, iteration=2 + i // 4) for i, r in enumerate([90, 60, 30, 20] + [90, 60, 30, 5] * 10)
    ]
    r = rules(downtime_steps_ms=(), auto_converge=False)
    history: list[JobStats] = []
    ladder = Ladder(downtime_ms=300)
    actions = []
    for i, sample in enumerate(samples):
        history.append(replace(sample, elapsed_s=i * 0.1))
        d = decide(history, ladder, r, i * 0.1)
        ladder = d.ladder
        if d.action is not Action.WAIT:
            actions.append((d.action, sample.data_remaining_bytes // MIB))
        if d.action is Action.PAUSE:
            break
    assert actions[0][0] is Action.PREPARE_PAUSE
    assert actions[-1] == (Action.PAUSE, 5)


def test_a_converging_guest_is_left_alone() -> None:
    falling = [s(250 - 5 * i, iteration=1 + i // 10) for i in range(45)]
    assert walk(falling, rules()) == []


def test_a_raise_that_helps_stops_the_climb() -> None:
    # stalls once, then (after the raise) makes new lows again
    samples = [*GROWING, *(s(r, iteration=7) for r in (80, 70, 60, 50, 40, 30, 20, 10))]
    assert walk(samples, rules()) == [(Action.RAISE_DOWNTIME, 500)]


@pytest.mark.parametrize(
    ("ladder", "history", "live", "mode"),
    [
        (L0, [s(10)], True, Mode.LIVE),
        (Ladder(downtime_ms=500, downtime_raises=1), [s(10)], True, Mode.LIVE_DOWNTIME_RAISE),
        (
            Ladder(downtime_ms=2000, downtime_raises=3, auto_converge_waited=True),
            [],
            True,
            Mode.AUTO_CONVERGE,
        ),
        (L0, [s(10, auto_converge_throttle_pct=30)], True, Mode.AUTO_CONVERGE),
        (Ladder(downtime_ms=2000, downtime_raises=3, paused=True), [], True, Mode.PAUSED_FALLBACK),
        (L0, [], False, Mode.OFFLINE),
    ],
)
def test_mode_of(ladder: Ladder, history: list[JobStats], live: bool, mode: Mode) -> None:
    assert mode_of(ladder, history, live) is mode
