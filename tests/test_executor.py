"""The executor's scheduling: limits, streaming, order, failure isolation.

The moves themselves are replaced by an in-test runner (pure scheduling logic); real
migrations are exercised in test_migration_lab.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from balancerd.execute.executor import Hold, blocked_by, execute
from balancerd.execute.move import FAILED, MIGRATED, SKIPPED, Engine, MoveResult
from balancerd.model import Move
from balancerd.outcomes import SkipKind
from balancerd.policy.model import Migration

WAIT_S = 10.0  # only a safety net against a hung test; never asserted on


def mv(vm: str, src: str, dst: str, wave: int = 0) -> Move:
    return Move(vm=vm, src=src, dst=dst, mem_bytes=1, expected_s=1.0, wave=wave)


class Recorder:
    """Runs moves as the executor asks, recording starts/ends and concurrency."""

    def __init__(
        self, fail: tuple[str, ...] = (), gates: dict[str, Callable[[], bool]] | None = None
    ):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.running_moves: list[Move] = []
        self.max_total = 0
        self.max_per_host: dict[str, int] = {}
        self.started: dict[str, threading.Event] = {}
        self.fail = fail
        self.gates = gates or {}
        self.gate_timeouts: list[str] = []

    def started_event(self, vm: str) -> threading.Event:
        with self.lock:
            return self.started.setdefault(vm, threading.Event())

    def __call__(self, _engine: Engine, m: Move) -> MoveResult:
        with self.lock:
            self.events.append(("start", m.vm))
            self.running_moves.append(m)
            self.max_total = max(self.max_total, len(self.running_moves))
            for h in (m.src, m.dst):
                n = sum(1 for r in self.running_moves if h in (r.src, r.dst))
                self.max_per_host[h] = max(self.max_per_host.get(h, 0), n)
        self.started_event(m.vm).set()
        gate = self.gates.get(m.vm)
        if gate is not None and not gate():
            self.gate_timeouts.append(m.vm)
        with self.lock:
            self.events.append(("end", m.vm))
            self.running_moves.remove(m)
        result = FAILED if m.vm in self.fail else MIGRATED
        return MoveResult(m.vm, m.src, m.dst, result, "live", "", 0.0)

    def order(self, kind: str) -> list[str]:
        return [vm for k, vm in self.events if k == kind]


def engine(heartbeat: Callable[[], None] = lambda: None, **mig: Any) -> Engine:
    return Engine(hv=None, mig=Migration(**mig), heartbeat=heartbeat)  # type: ignore[arg-type]


def test_limits_hold_cluster_wide_and_per_host() -> None:
    moves = [
        mv("a", "h1", "h2"),
        mv("b", "h1", "h3"),
        mv("c", "h2", "h4"),
        mv("d", "h3", "h4"),
        mv("e", "h5", "h6"),
        mv("f", "h7", "h8"),
        mv("g", "h5", "h8"),
    ]
    rec = Recorder()
    # a stays running until e has started: the second slot must really be used (by d, then
    # e), while b and c wait for a's hosts.
    rec.gates["a"] = lambda: rec.started_event("e").wait(WAIT_S)
    results = execute(moves, engine(max_concurrent=2, max_concurrent_per_host=1), run=rec)
    assert [r.outcome for r in results] == [MIGRATED] * 7
    assert [r.vm for r in results] == [m.vm for m in moves]
    assert rec.gate_timeouts == []
    assert rec.max_total == 2
    assert max(rec.max_per_host.values()) == 1


def test_streamed_the_next_starts_when_one_ends() -> None:
    # a is long: it ends only once c has started. With 2 slots, c can start only if the
    # executor starts it as soon as b ends (not waiting for the whole batch a+b).
    rec = Recorder()
    rec.gates["a"] = lambda: rec.started_event("c").wait(WAIT_S)
    moves = [mv("a", "h1", "h2"), mv("b", "h3", "h4"), mv("c", "h5", "h6")]
    results = execute(moves, engine(max_concurrent=2, max_concurrent_per_host=1), run=rec)
    assert rec.gate_timeouts == []
    assert [r.outcome for r in results] == [MIGRATED] * 3
    assert rec.max_total == 2


def test_two_moves_run_together_when_limits_allow() -> None:
    rec = Recorder()
    rec.gates["a"] = lambda: rec.started_event("b").wait(WAIT_S)
    rec.gates["b"] = lambda: rec.started_event("a").wait(WAIT_S)
    execute([mv("a", "h1", "h2"), mv("b", "h3", "h4")], engine(max_concurrent=2), run=rec)
    assert rec.gate_timeouts == []
    assert rec.max_total == 2


def test_later_wave_waits_only_for_earlier_moves_sharing_a_host() -> None:
    rec = Recorder()
    # x (wave 0, h1->h2) is held until z (wave 1, unrelated hosts) has started: z must not
    # wait for wave 0 as a whole. y (wave 1, into h1) must start only after x ended.
    rec.gates["x"] = lambda: rec.started_event("z").wait(WAIT_S)
    moves = [mv("x", "h1", "h2"), mv("y", "h3", "h1", wave=1), mv("z", "h5", "h6", wave=1)]
    results = execute(moves, engine(max_concurrent=3, max_concurrent_per_host=2), run=rec)
    assert rec.gate_timeouts == []
    assert [r.outcome for r in results] == [MIGRATED] * 3
    assert rec.events.index(("end", "x")) < rec.events.index(("start", "y"))
    assert blocked_by(moves, 1) == [0] and blocked_by(moves, 2) == []


def test_plan_order_among_free_moves() -> None:
    rec = Recorder()
    moves = [mv(f"v{i}", "h1", f"d{i}") for i in range(5)]
    execute(moves, engine(max_concurrent=1, max_concurrent_per_host=1), run=rec)
    assert rec.order("start") == [m.vm for m in moves]


def test_a_failure_skips_only_the_moves_that_needed_it() -> None:
    rec = Recorder(fail=("a",))
    moves = [
        mv("a", "h1", "h2"),  # fails: h1 is not freed
        mv("b", "h3", "h1", wave=1),  # needed the room on h1 -> skipped
        mv("c", "h4", "h5", wave=1),  # unrelated -> runs
        mv("d", "h2", "h6", wave=1),  # shares h2 with a, but does not need room from a
        mv("a", "h2", "h7", wave=2),  # the same guest again -> skipped
    ]
    results = execute(moves, engine(max_concurrent=2, max_concurrent_per_host=1), run=rec)
    assert [r.outcome for r in results] == [FAILED, SKIPPED, MIGRATED, MIGRATED, SKIPPED]
    assert "needs the room on h1 that a leaving it would free" in results[1].reason
    assert "earlier move of a h1->h2 was failed" in results[4].reason
    assert "b" not in rec.order("start")


def test_heartbeat_is_fed_and_stop_skips_what_has_not_started() -> None:
    beats = []
    stop = threading.Event()
    rec = Recorder()
    rec.gates["a"] = lambda: (stop.set(), True)[1]
    moves = [mv("a", "h1", "h2"), mv("b", "h1", "h3"), mv("c", "h1", "h4")]
    results = execute(
        moves,
        engine(heartbeat=lambda: beats.append(1), max_concurrent=1),
        run=rec,
        hold=lambda: Hold(SkipKind.STOPPING, "balancerd is stopping") if stop.is_set() else None,
    )
    assert results[0].outcome == MIGRATED
    assert [r.outcome for r in results[1:]] == [SKIPPED, SKIPPED]
    assert "stopping" in results[1].reason
    assert {r.skip_kind for r in results[1:]} == {SkipKind.STOPPING}
    assert beats


def test_a_freeze_that_opens_mid_plan_holds_the_rest_with_its_kind() -> None:
    """The plan is re-checked between moves: what has not started is skipped as FREEZE."""
    frozen = threading.Event()
    rec = Recorder()
    rec.gates["a"] = lambda: (frozen.set(), True)[1]
    moves = [mv("a", "h1", "h2"), mv("b", "h3", "h4")]
    results = execute(
        moves,
        engine(max_concurrent=1),
        run=rec,
        hold=lambda: Hold(SkipKind.FREEZE, "a freeze window opened") if frozen.is_set() else None,
    )
    assert [r.outcome for r in results] == [MIGRATED, SKIPPED]
    assert results[1].skip_kind is SkipKind.FREEZE
    assert "b" not in rec.order("start")


def test_a_runner_that_raises_fails_one_step_only() -> None:
    def runner(e: Engine, m: Move) -> MoveResult:
        if m.vm == "boom":
            raise RuntimeError("bug")
        return MoveResult(m.vm, m.src, m.dst, MIGRATED, "live", "", 0.0)

    results = execute([mv("boom", "h1", "h2"), mv("ok", "h3", "h4")], engine(), run=runner)
    assert [r.outcome for r in results] == [FAILED, MIGRATED]
    assert "bug" in results[0].reason
