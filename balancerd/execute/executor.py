"""Streamed, concurrent execution of a plan's moves.

Rules:
  * at most ``max_concurrent`` moves cluster-wide and ``max_concurrent_per_host`` moves
    touching one host (in or out) at once; the next move starts as soon as one ends;
  * order: a move waits for every earlier move of a lower wave that shares a host with it
    (or moves the same guest). Those are the only moves the planner's "every prefix is
    safe" capacity argument ties it to; moves of one wave are independent. Among the
    moves free to start, plan order wins;
  * a failed or skipped step never blocks unrelated ones. A later move INTO a host that a
    failed/skipped earlier-wave move was to free is skipped (the room it counted on is not
    there), and so is a later move of the same guest;
  * ``heartbeat`` is fed from this loop and from each move's polling loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from balancerd.execute.converge import Mode
from balancerd.execute.move import Engine, MoveResult, run_move
from balancerd.model import Move
from balancerd.outcomes import MoveOutcome, SkipKind

log = logging.getLogger(__name__)

POLL_S = 1.0


@dataclass(frozen=True)
class Hold:
    """Why no further move may start."""

    kind: SkipKind
    reason: str


def _shares(a: Move, b: Move) -> bool:
    return a.vm == b.vm or bool({a.src, a.dst} & {b.src, b.dst})


def blocked_by(moves: Sequence[Move], i: int) -> list[int]:
    """Indices of the earlier moves that move ``i`` must wait for."""
    m = moves[i]
    return [
        j
        for j in range(i)
        if (moves[j].wave < m.wave and _shares(moves[j], m)) or moves[j].vm == m.vm
    ]


def broken_dependency(moves: Sequence[Move], i: int, results: dict[int, MoveResult]) -> str:
    """Why move ``i`` cannot run because an earlier move it depends on did not happen."""
    m = moves[i]
    for j in blocked_by(moves, i):
        r = results.get(j)
        if r is None or r.outcome is MoveOutcome.MIGRATED:
            continue
        p = moves[j]
        if p.vm == m.vm:
            return f"the earlier move of {m.vm} {p.src}->{p.dst} was {r.outcome}"
        if p.src == m.dst:
            return (
                f"needs the room on {m.dst} that {p.vm} leaving it would free, "
                f"and that move was {r.outcome}"
            )
    return ""


def execute(  # noqa: C901 (the scheduling loop: start, skip, collect; split, it hides the invariant)
    moves: Sequence[Move],
    engine: Engine,
    *,
    run: Callable[[Engine, Move], MoveResult] = run_move,
    hold: Callable[[], Hold | None] = lambda: None,
) -> list[MoveResult]:
    """Run ``moves``; returns one result per move, in plan order. ``hold()`` is asked
    before each start: a reason not to start more (stopping, a freeze window that opened,
    a reload into recommend mode) skips every move not yet started, with that reason."""
    n_max = max(1, engine.mig.max_concurrent)
    per_host_max = max(1, engine.mig.max_concurrent_per_host)
    pending = list(range(len(moves)))
    running: dict[int, Move] = {}
    results: dict[int, MoveResult] = {}
    done: queue.Queue[tuple[int, MoveResult]] = queue.Queue()

    def worker(i: int) -> None:
        m = moves[i]
        try:
            r = run(engine, m)
        except Exception as exc:  # run_move never raises; a custom runner might
            log.exception("move %s failed unexpectedly", m.vm)
            r = MoveResult(
                m.vm, m.src, m.dst, MoveOutcome.FAILED, Mode.NONE, f"unexpected error: {exc!r}", 0.0
            )
        done.put((i, r))

    def per_host(host: str) -> int:
        return sum(1 for m in running.values() if host in (m.src, m.dst))

    def skip(i: int, kind: SkipKind, reason: str) -> None:
        m = moves[i]
        results[i] = MoveResult(
            m.vm, m.src, m.dst, MoveOutcome.SKIPPED, Mode.NONE, reason, 0.0, skip_kind=kind
        )
        log.warning("%s %s->%s skipped: %s", m.vm, m.src, m.dst, reason, extra={"VM": m.vm})

    while pending or running:
        held = hold() if pending else None
        if held is not None:
            for i in pending:
                skip(i, held.kind, f"not started: {held.reason}")
            pending = []
        for i in list(pending):
            if len(running) >= n_max:
                break
            if any(j not in results for j in blocked_by(moves, i)):
                continue
            why = broken_dependency(moves, i, results)
            if why:
                pending.remove(i)
                skip(i, SkipKind.DEPENDENCY, why)
                continue
            m = moves[i]
            if per_host(m.src) >= per_host_max or per_host(m.dst) >= per_host_max:
                continue
            pending.remove(i)
            running[i] = m
            threading.Thread(target=worker, args=(i,), name=f"move-{m.vm}", daemon=True).start()
        if not running:
            # Nothing runs, so the first pending move had nothing to wait for and started,
            # or everything left was just skipped. Anything else is a scheduling bug.
            for i in pending:
                skip(i, SkipKind.OTHER, "internal error: could not be scheduled")
            pending = []
            continue
        try:
            i, r = done.get(timeout=POLL_S)
        except queue.Empty:
            engine.heartbeat()
            continue
        engine.heartbeat()
        running.pop(i, None)
        results[i] = r
        # Collect every other move that ended meanwhile before scheduling again.
        while True:
            try:
                i, r = done.get_nowait()
            except queue.Empty:
                break
            running.pop(i, None)
            results[i] = r
    return [results[i] for i in range(len(moves))]
