"""A history of decisions and their reasons: SQLite in the state directory, read by
``balancerd history`` and ``balancerd explain``.

Each cycle (and each approved plan, each ``apply``) is one row: when, which policy, what
it saw (a summary of the hosts), the score before and after, the solver's report, why
nothing moved. Each planned move is a row with its reason, benefit, cost and what became
of it (migrated, skipped, failed, or held back: recommend mode, a freeze, a pause). Guests
that could not move for a reason of the moment (a cooldown, no host to take them) are
rows too, so ``explain`` can say "not moved at 10:10: cooldown".

Bounded: rows older than ``max_age_s`` go, and the oldest cycles go while the file is
larger than ``max_bytes``. Losing history is never a reason to stop balancing: a write
that fails is logged and counted, and the cycle goes on.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from balancerd.execute.move import MoveResult
from balancerd.model import Plan, Snapshot
from balancerd.outcomes import SkipKind
from balancerd.rationale import MoveWhy, score_name

log = logging.getLogger(__name__)

HISTORY_FILE = "history.sqlite"
MAX_AGE_S = 30 * 86400.0
MAX_BYTES = 64 * 1024 * 1024
TOP_HOSTS = 5  # hosts summarized per cycle besides those that moves touch
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_s REAL NOT NULL,              -- unix time
    kind TEXT NOT NULL,              -- cycle | approved | apply
    policy TEXT NOT NULL,
    objective TEXT NOT NULL,
    mode TEXT NOT NULL,
    held_back TEXT,                  -- a SkipKind (recommend, freeze, paused) or NULL
    reason TEXT NOT NULL DEFAULT '', -- why nothing moved
    score_before REAL,
    score_after REAL,
    solver TEXT NOT NULL DEFAULT '{}',
    inputs TEXT NOT NULL DEFAULT '{}',
    notes TEXT NOT NULL DEFAULT '[]',
    drained TEXT NOT NULL DEFAULT '[]',
    planned INTEGER NOT NULL DEFAULT 0,
    migrated INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS cycles_at ON cycles(at_s);
CREATE TABLE IF NOT EXISTS moves (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cycle_id INTEGER NOT NULL REFERENCES cycles(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    vm TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    wave INTEGER NOT NULL,
    why TEXT NOT NULL DEFAULT '',
    score_before REAL,
    score_after REAL,
    mem_bytes INTEGER NOT NULL DEFAULT 0,
    expected_s REAL NOT NULL DEFAULT 0,
    downtime_pred_ms REAL NOT NULL DEFAULT 0,
    downtime_note TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL,           -- migrated | skipped | failed | held
    mode TEXT NOT NULL DEFAULT '',
    skip_kind TEXT,
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL NOT NULL DEFAULT 0,
    downtime_ms REAL,
    migration_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS moves_vm ON moves(vm, cycle_id);
CREATE INDEX IF NOT EXISTS moves_cycle ON moves(cycle_id);
CREATE TABLE IF NOT EXISTS holds (
    cycle_id INTEGER NOT NULL REFERENCES cycles(id) ON DELETE CASCADE,
    vm TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_vm ON holds(vm, cycle_id);
CREATE INDEX IF NOT EXISTS holds_cycle ON holds(cycle_id);
"""

HELD = "held"  # a move's outcome when the plan was not executed


@dataclass(frozen=True)
class MoveRecord:
    why: MoveWhy
    outcome: str  # migrated | skipped | failed | held
    mode: str = ""
    skip_kind: str | None = None
    reason: str = ""
    seconds: float = 0.0
    downtime_ms: float | None = None
    migration_id: str = ""


@dataclass(frozen=True)
class CycleRecord:
    at_s: float
    kind: str  # cycle | approved | apply
    policy: str
    objective: str
    mode: str
    held_back: str | None
    reason: str
    score_before: float | None
    score_after: float | None
    solver: Mapping[str, Any]
    inputs: Mapping[str, Any]
    notes: Sequence[str] = ()
    drained: Sequence[str] = ()
    moves: Sequence[MoveRecord] = ()
    holds: Mapping[str, str] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return sum(m.outcome == outcome for m in self.moves)


def build_record(
    *,
    at_s: float,
    kind: str,
    plan: Plan,
    policy_mode: str,
    planning: Snapshot,
    whys: Sequence[MoveWhy],
    results: Sequence[MoveResult] = (),
    held_back: SkipKind | None = None,
    drained: Sequence[str] = (),
    holds: Mapping[str, str] | None = None,
) -> CycleRecord:
    """A cycle's record from its plan, the moves' reasons and what became of them
    (``results`` in plan order; empty when the plan was held back)."""
    by_move = {(r.vm, r.src, r.dst): r for r in results}
    moves = []
    for w in whys:
        r = by_move.get((w.vm, w.src, w.dst))
        if r is None:
            moves.append(MoveRecord(w, HELD if held_back is not None else "planned"))
            continue
        moves.append(
            MoveRecord(
                w,
                str(r.outcome),
                str(r.mode),
                None if r.skip_kind is None else str(r.skip_kind),
                r.reason,
                r.seconds,
                r.downtime_ms,
                r.migration_id,
            )
        )
    s = plan.solver
    return CycleRecord(
        at_s=at_s,
        kind=kind,
        policy=plan.policy,
        objective=plan.objective,
        mode=policy_mode,
        held_back=None if held_back is None else str(held_back),
        reason=plan.reason,
        score_before=plan.score_before,
        score_after=plan.score_after,
        solver={
            "backend": s.backend,
            "status": s.status,
            "seconds": round(s.seconds, 3),
            "objective": s.objective,
            "bound": s.bound,
            "gap": s.gap,
        },
        inputs=inputs_summary(planning, {h for w in whys for h in (w.src, w.dst)}),
        notes=tuple(plan.notes),
        drained=tuple(drained),
        moves=tuple(moves),
        holds=dict(holds or {}),
    )


def inputs_summary(snapshot: Snapshot, involved: set[str]) -> dict[str, Any]:
    """Counts, and the utilization of the hosts moves touch plus the busiest few."""
    usage = snapshot.host_usage()
    busiest = sorted(usage, key=lambda h: -max(usage[h]))[:TOP_HOSTS]
    shown = sorted(set(busiest) | (involved & set(usage)))
    on: dict[str, int] = {}
    for v in snapshot.vms:
        on[v.host] = on.get(v.host, 0) + 1
    return {
        "hosts": len(snapshot.hosts),
        "hosts_up": sum(h.up for h in snapshot.hosts),
        "guests": len(snapshot.vms),
        "host_util": {
            h: {
                "cpu": round(usage[h][0], 4),
                "mem": round(usage[h][1], 4),
                "guests": on.get(h, 0),
            }
            for h in shown
        },
    }


class History:
    """The store; one connection shared by the daemon's threads, guarded by a lock."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_age_s: float = MAX_AGE_S,
        max_bytes: int = MAX_BYTES,
        readonly: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        p = Path(path)
        if p.is_dir() or (not p.suffix and not readonly):  # a folder: the file in it
            p.mkdir(parents=True, exist_ok=True)
            p = p / HISTORY_FILE
        self.path = p
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.readonly = readonly
        self._clock = clock
        self._lock = threading.Lock()
        self.write_failures = 0
        if readonly:
            self._db = sqlite3.connect(
                f"file:{p}?mode=ro", uri=True, timeout=10, check_same_thread=False
            )
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open(p)
        except sqlite3.DatabaseError as exc:
            aside = p.with_name(f"{p.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            log.error("history %s unreadable (%s): moved aside to %s", p, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{p}{suffix}")
                if src.exists():
                    src.replace(Path(f"{aside}{suffix}"))
            self._db = self._open(p)

    @staticmethod
    def _open(p: Path) -> sqlite3.Connection:
        db = sqlite3.connect(p, timeout=10, check_same_thread=False)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.commit()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writing -----------------------------------------------------------------------

    def add(self, rec: CycleRecord) -> int | None:
        """Store one cycle; returns its id (None when the write failed: logged, counted)."""
        try:
            with self._lock:
                cycle_id = self._insert(rec)
                self._prune()
            return cycle_id
        except sqlite3.Error as exc:
            self.write_failures += 1
            log.error("history: cannot record the cycle in %s: %s", self.path, exc)
            return None

    def _insert(self, rec: CycleRecord) -> int:
        db = self._db
        with db:
            cur = db.execute(
                "INSERT INTO cycles (at_s, kind, policy, objective, mode, held_back, reason,"
                " score_before, score_after, solver, inputs, notes, drained, planned,"
                " migrated, skipped, failed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.at_s,
                    rec.kind,
                    rec.policy,
                    rec.objective,
                    rec.mode,
                    rec.held_back,
                    rec.reason,
                    rec.score_before,
                    rec.score_after,
                    json.dumps(rec.solver),
                    json.dumps(rec.inputs),
                    json.dumps(list(rec.notes)),
                    json.dumps(list(rec.drained)),
                    len(rec.moves),
                    rec.count("migrated"),
                    rec.count("skipped"),
                    rec.count("failed"),
                ),
            )
            cycle_id = cur.lastrowid
            if cycle_id is None:
                raise RuntimeError("internal error: cycle_id is None")
            db.executemany(
                "INSERT INTO moves (cycle_id, seq, vm, src, dst, wave, why, score_before,"
                " score_after, mem_bytes, expected_s, downtime_pred_ms, downtime_note, outcome,"
                " mode, skip_kind, reason, seconds, downtime_ms, migration_id)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        cycle_id,
                        i,
                        m.why.vm,
                        m.why.src,
                        m.why.dst,
                        m.why.wave,
                        m.why.why,
                        m.why.score_before,
                        m.why.score_after,
                        m.why.mem_bytes,
                        m.why.expected_s,
                        m.why.downtime_ms,
                        m.why.downtime_note,
                        m.outcome,
                        m.mode,
                        m.skip_kind,
                        m.reason,
                        m.seconds,
                        m.downtime_ms,
                        m.migration_id,
                    )
                    for i, m in enumerate(rec.moves)
                ],
            )
            db.executemany(
                "INSERT INTO holds (cycle_id, vm, reason) VALUES (?, ?, ?)",
                [(cycle_id, vm, reason) for vm, reason in sorted(rec.holds.items())],
            )
        return cycle_id

    def _prune(self) -> None:
        db = self._db
        cutoff = self._clock() - self.max_age_s
        with db:
            db.execute("DELETE FROM cycles WHERE at_s < ?", (cutoff,))
        for _ in range(20):  # each round drops a tenth of what is left
            if self._used_bytes() <= self.max_bytes:
                break
            (n,) = db.execute("SELECT COUNT(*) FROM cycles").fetchone()
            if n <= 1:
                break
            with db:
                db.execute(
                    "DELETE FROM cycles WHERE id IN (SELECT id FROM cycles ORDER BY id LIMIT ?)",
                    (max(1, n // 10),),
                )
            db.execute("PRAGMA incremental_vacuum")

    def _used_bytes(self) -> int:
        db = self._db
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * page

    # --- reading -----------------------------------------------------------------------

    def cycles(
        self, *, since_s: float | None = None, vm: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Cycles newest first with their moves (only ``vm``'s, and only cycles that
        moved, planned or held it, when ``vm`` is given) and ``vm``'s hold."""
        where: list[str] = ["1=1"]
        args: list[Any] = []
        if since_s is not None:
            where.append("c.at_s >= ?")
            args.append(since_s)
        if vm is not None:
            where.append(
                "(c.id IN (SELECT cycle_id FROM moves WHERE vm = ?)"
                " OR c.id IN (SELECT cycle_id FROM holds WHERE vm = ?))"
            )
            args.extend([vm, vm])
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, c.at_s, c.kind, c.policy, c.objective, c.mode, c.held_back,"  # noqa: S608 (constant clause chosen in code; values are bound parameters)
                " c.reason, c.score_before, c.score_after, c.solver, c.inputs, c.notes,"
                " c.drained, c.planned, c.migrated, c.skipped, c.failed FROM cycles c"
                f" WHERE {' AND '.join(where)} ORDER BY c.id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            out = []
            for row in rows:
                cycle = _cycle_row(row)
                move_where = "m.cycle_id = ?" + (" AND m.vm = ?" if vm is not None else "")
                move_args: tuple[Any, ...] = (row[0], vm) if vm is not None else (row[0],)
                cycle["moves"] = [
                    _move_row(m)
                    for m in self._db.execute(
                        f"SELECT {_MOVE_COLUMNS} FROM moves m WHERE {move_where} ORDER BY m.seq",  # noqa: S608 (constant clause chosen in code; values are bound parameters)
                        move_args,
                    )
                ]
                hold_sql = "SELECT vm, reason FROM holds WHERE cycle_id = ?"
                hold_args: tuple[Any, ...] = (row[0],)
                if vm is not None:
                    hold_sql += " AND vm = ?"
                    hold_args = (row[0], vm)
                cycle["holds"] = dict(self._db.execute(hold_sql, hold_args).fetchall())
                out.append(cycle)
        return out

    def explain(self, vm: str, *, limit: int = 10) -> dict[str, Any]:
        """What happened to ``vm``, newest first: its moves (planned, executed, skipped,
        failed, held back) and the cycles that could not move it, with their reasons;
        then how many cycles have passed since without touching it."""
        with self._lock:
            moves = self._db.execute(
                f"SELECT {_MOVE_COLUMNS}, c.at_s, c.kind, c.policy, c.objective, c.held_back,"  # noqa: S608 (constant clause chosen in code; values are bound parameters)
                " c.score_before, c.score_after, c.planned, c.id FROM moves m"
                " JOIN cycles c ON c.id = m.cycle_id WHERE m.vm = ?"
                " ORDER BY c.id DESC, m.seq DESC LIMIT ?",
                (vm, limit * 4),
            ).fetchall()
            holds = self._db.execute(
                "SELECT h.reason, c.at_s, c.kind, c.id FROM holds h"
                " JOIN cycles c ON c.id = h.cycle_id WHERE h.vm = ? ORDER BY c.id DESC LIMIT ?",
                (vm, limit * 4),
            ).fetchall()
            latest = self._db.execute(
                "SELECT id, at_s, planned, reason, held_back FROM cycles"
                " WHERE kind = 'cycle' ORDER BY id DESC LIMIT 1"
            ).fetchone()
            last_id = max([r[-1] for r in moves] + [r[-1] for r in holds] + [0])
            since = self._db.execute(
                "SELECT COUNT(*), MIN(at_s) FROM cycles WHERE kind = 'cycle' AND id > ?",
                (last_id,),
            ).fetchone()
            (total,) = self._db.execute("SELECT COUNT(*) FROM cycles").fetchone()
        events: list[dict[str, Any]] = []
        n_move_cols = len(_MOVE_COLUMNS.split(","))
        for row in moves:
            move = _move_row(row[:n_move_cols])
            at_s, kind, policy, objective, held_back, c_before, c_after, planned, cid = row[
                n_move_cols:
            ]
            events.append(
                {
                    "cycle_id": cid,
                    "at_s": at_s,
                    "at": _iso(at_s),
                    "event": move["outcome"],
                    "kind": kind,
                    "policy": policy,
                    "objective": objective,
                    "held_back": held_back,
                    "plan_score_before": c_before,
                    "plan_score_after": c_after,
                    "plan_moves": planned,
                    **move,
                }
            )
        for reason, at_s, kind, cid in holds:
            events.append(
                {
                    "cycle_id": cid,
                    "at_s": at_s,
                    "at": _iso(at_s),
                    "event": "not-moved",
                    "kind": kind,
                    "reason": reason,
                }
            )
        events.sort(key=lambda e: (-e["cycle_id"], e["event"] == "not-moved"))
        quiet: dict[str, Any] | None = None
        if (moves or holds) and since and since[0] and latest is not None:
            quiet = {
                "cycles": since[0],
                "since_s": since[1],
                "since": _iso(since[1]),
                "latest_at": _iso(latest[1]),
                "latest_reason": _quiet_reason(latest[2], latest[3], latest[4]),
            }
        return {
            "vm": vm,
            "events": _collapse(events)[:limit],
            "since_last_event": quiet,
            "cycles_recorded": total,
            "latest_reason": None
            if latest is None
            else _quiet_reason(latest[2], latest[3], latest[4]),
        }


_MOVE_COLUMNS = (
    "m.seq, m.vm, m.src, m.dst, m.wave, m.why, m.score_before, m.score_after, m.mem_bytes,"
    " m.expected_s, m.downtime_pred_ms, m.downtime_note, m.outcome, m.mode, m.skip_kind,"
    " m.reason, m.seconds, m.downtime_ms, m.migration_id"
)


def _cycle_row(row: Sequence[Any]) -> dict[str, Any]:
    (
        cid,
        at_s,
        kind,
        policy,
        objective,
        mode,
        held_back,
        reason,
        before,
        after,
        solver,
        inputs,
        notes,
        drained,
        planned,
        migrated,
        skipped,
        failed,
    ) = row
    return {
        "id": cid,
        "at_s": at_s,
        "at": _iso(at_s),
        "kind": kind,
        "policy": policy,
        "objective": objective,
        "mode": mode,
        "held_back": held_back,
        "reason": reason,
        "score_before": before,
        "score_after": after,
        "solver": json.loads(solver),
        "inputs": json.loads(inputs),
        "notes": json.loads(notes),
        "drained": json.loads(drained),
        "planned": planned,
        "migrated": migrated,
        "skipped": skipped,
        "failed": failed,
    }


def _move_row(row: Sequence[Any]) -> dict[str, Any]:
    (
        seq,
        vm,
        src,
        dst,
        wave,
        why,
        before,
        after,
        mem_bytes,
        expected_s,
        downtime_pred_ms,
        downtime_note,
        outcome,
        mode,
        skip_kind,
        reason,
        seconds,
        downtime_ms,
        migration_id,
    ) = row
    return {
        "seq": seq,
        "vm": vm,
        "from": src,
        "to": dst,
        "wave": wave,
        "why": why,
        "score_before": before,
        "score_after": after,
        "benefit": None if before is None or after is None else round(before - after, 4),
        "cost": {
            "gib": round(mem_bytes / 1024**3, 3),
            "mem_bytes": mem_bytes,
            "expected_s": round(expected_s, 2),
            "downtime_ms": round(downtime_pred_ms, 1),
            "downtime_note": downtime_note,
        },
        "outcome": outcome,
        "mode": mode,
        "skip_kind": skip_kind,
        "reason": reason,
        "seconds": round(seconds, 2),
        "downtime_ms": downtime_ms,
        "migration_id": migration_id,
    }


def _iso(at_s: float | None) -> str:
    if at_s is None:
        return ""
    return datetime.fromtimestamp(at_s).astimezone().isoformat(timespec="seconds")


def _quiet_reason(planned: int, reason: str, held_back: str | None) -> str:
    if planned:
        extra = f", not executed: {_HELD_TEXT.get(held_back or '', held_back)}" if held_back else ""
        return f"the plan moved {planned} other guest(s){extra}"
    return f"no moves: {reason or 'placement is already good'}"


_HELD_TEXT = {
    "recommend": "the policy only recommends (approve with `balancerd apply --latest`)",
    "freeze": "a freeze window was open",
    "paused": "balancerd was paused by an operator",
}


def held_text(kind: str | None) -> str:
    return _HELD_TEXT.get(kind or "", kind or "")


def _collapse(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive ``not-moved`` events with the same kind of reason become one, with the
    number of cycles and the earliest time."""
    out: list[dict[str, Any]] = []
    for e in events:
        prev = out[-1] if out else None
        if (
            prev is not None
            and e["event"] == "not-moved"
            and prev["event"] == "not-moved"
            and _reason_kind(prev["reason"]) == _reason_kind(e["reason"])
        ):
            prev["cycles"] = prev.get("cycles", 1) + 1
            prev["first_at_s"] = e["at_s"]
            prev["first_at"] = e["at"]
            continue
        out.append(dict(e))
    return out


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


# --- words for ``explain`` and ``history`` -----------------------------------------------


def clock_text(at_s: float, now_s: float) -> str:
    """``10:05`` today, ``2024-05-01 10:05`` otherwise (local time)."""
    t = datetime.fromtimestamp(at_s).astimezone()
    now = datetime.fromtimestamp(now_s).astimezone()
    return t.strftime("%H:%M:%S") if t.date() == now.date() else t.strftime("%Y-%m-%d %H:%M")


def effect_text(e: Mapping[str, Any]) -> str:
    """What a move did to the policy's score, in words."""
    name = score_name(str(e.get("objective", "balance")))
    before, after = e.get("score_before"), e.get("score_after")
    p_before, p_after = e.get("plan_score_before"), e.get("plan_score_after")
    if before is not None and after is not None and abs(before - after) >= 0.0005:
        verb = "lowered" if after < before else "raised"
        return f"the move {verb} the {name} from {before:.2f} to {after:.2f}"
    if p_before is not None and p_after is not None and abs(p_before - p_after) >= 0.0005:
        others = int(e.get("plan_moves", 1)) - 1
        return (
            f"with the plan's {others} other move(s) the {name} went from {p_before:.2f} "
            f"to {p_after:.2f}"
        )
    return f"the {name} stays as it was"


def event_text(e: Mapping[str, Any], now_s: float) -> str:
    """One line of ``explain``."""
    at = clock_text(float(e["at_s"]), now_s)
    if e["event"] == "not-moved":
        n = int(e.get("cycles", 1))
        when = at if n == 1 else f"{clock_text(float(e['first_at_s']), now_s)}..{at} ({n} cycles)"
        return f"not moved at {when}: {e['reason']}"
    cost = e["cost"]
    cost_text = f"{cost['gib']:.2f} GiB, ~{cost['expected_s']:.0f} s"
    cost_text += f", predicted downtime <= {cost['downtime_ms']:.0f} ms"
    route = f"from {e['from']} to {e['to']}"
    approved = " (approved plan)" if e.get("kind") in ("approved", "apply") else ""
    if e["event"] == "migrated":
        done = f"{e['mode']}, {e['seconds']:.1f} s"
        if e.get("downtime_ms") is not None:
            done += f", downtime {float(e['downtime_ms']):.0f} ms"
        if e.get("migration_id"):
            done += f", id {e['migration_id']}"
        return (
            f"moved at {at} {route}{approved}: {e['why']}; {effect_text(e)} at a cost of "
            f"{cost_text} ({done})"
        )
    if e["event"] == HELD:
        return (
            f"planned at {at} {route}: {e['why']}; {effect_text(e)} at a cost of {cost_text}; "
            f"not executed: {held_text(e.get('held_back'))}"
        )
    if e["event"] == "skipped":
        return f"planned at {at} {route}{approved} ({e['why']}), skipped: {e['reason']}"
    if e["event"] == "failed":
        return f"move at {at} {route}{approved} failed: {e['reason']}"
    return f"planned at {at} {route}: {e['why']}"


def explain_lines(doc: Mapping[str, Any], now_s: float) -> list[str]:
    """``explain``'s text: newest first, then the quiet cycles since."""
    lines = []
    quiet = doc.get("since_last_event")
    if quiet:
        lines.append(
            f"not moved in the {quiet['cycles']} cycle(s) since "
            f"{clock_text(float(quiet['since_s']), now_s)}; latest: {quiet['latest_reason']}"
        )
    lines.extend(event_text(e, now_s) for e in doc["events"])
    if not lines:
        n = doc.get("cycles_recorded", 0)
        if doc.get("now_on") and doc.get("latest_reason"):
            lines.append(
                f"on {doc['now_on']}, never planned in the {n} cycle(s) recorded; latest: "
                f"{doc['latest_reason']}"
            )
        else:
            lines.append(f"no decision about {doc['vm']} in the history ({n} cycles recorded)")
    return lines
