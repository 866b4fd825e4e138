"""Crash-safety journal: SQLite in the state directory.

Each migration writes its intent (``begin``) before anything reaches a host, moves through
phases (``live`` -> ``paused`` -> ``cold``) as the engine acts, and gets its outcome
(``finish``) after the guest was verified. An entry without an outcome at start-up is a
migration some process did not see to the end: ``reconcile.py`` settles it.

WAL mode with ``synchronous=FULL``: an intent is on disk before ``begin`` returns.
One connection shared by the executor's threads, guarded by a lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

JOURNAL_FILE = "journal.sqlite"

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    vm_uuid TEXT NOT NULL DEFAULT '',
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    vm_state TEXT NOT NULL DEFAULT '',   -- guest state before we started: running | paused
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL DEFAULT '',  -- the process's start time, against pid reuse
    phase TEXT NOT NULL,                 -- intent | live | paused | cold
    started_at REAL NOT NULL,            -- unix time
    outcome TEXT,                        -- NULL while open; migrated | failed | settled
    mode TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    finished_at REAL,
    migration_id TEXT NOT NULL DEFAULT ''  -- the ID in logs, journald, JSON and status
);
CREATE INDEX IF NOT EXISTS migrations_open ON migrations(outcome);
CREATE TABLE IF NOT EXISTS reconciliations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id INTEGER,
    at REAL NOT NULL,
    vm TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    id: int
    vm: str
    vm_uuid: str
    src: str
    dst: str
    vm_state: str
    pid: int
    pid_start: str
    phase: str
    started_at: float
    outcome: str | None
    mode: str
    detail: str
    migration_id: str = ""


class JournalStore(Protocol):
    """What the move engine and reconcile need from a journal: this SQLite ``Journal``
    (one node), or the etcd journal of ``balancerd.coord`` (coordinated instances), whose
    writes are fenced: they raise ``balancerd.coord.NotLeader`` once we no longer lead."""

    moved_aside: str

    def close(self) -> None: ...

    def begin(
        self,
        vm: str,
        vm_uuid: str,
        src: str,
        dst: str,
        vm_state: str,
        *,
        migration_id: str = "",
    ) -> int: ...

    def phase(self, entry_id: int, phase: str) -> None: ...

    def finish(self, entry_id: int, outcome: str, mode: str = "", detail: str = "") -> None: ...

    def open_entries(self) -> list[Entry]: ...

    def entries(self, limit: int = 100) -> list[Entry]: ...

    def owner_alive(self, entry: Entry) -> bool: ...

    def record_reconciliation(
        self, migration_id: int | None, vm: str, action: str, detail: str
    ) -> None: ...

    def reconciliation_count(self) -> int: ...


def process_start(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot), "" if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces; fields after the last ')' are plain.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def _prepare(db: sqlite3.Connection) -> None:
    db.executescript(_SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(migrations)")}
    if "migration_id" not in columns:  # a journal written before migration IDs
        db.execute("ALTER TABLE migrations ADD COLUMN migration_id TEXT NOT NULL DEFAULT ''")
    db.commit()


class Journal:
    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p.mkdir(parents=True, exist_ok=True)
            p = p / JOURNAL_FILE
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self._lock = threading.Lock()
        # Where a corrupt journal was moved ("" if it was not): logged and counted.
        self.moved_aside = ""
        try:
            self._db = self._open(p)
        except sqlite3.DatabaseError as exc:
            aside = p.with_name(f"{p.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{p}{suffix}")
                if src.exists():
                    src.replace(Path(f"{aside}{suffix}"))
            self.moved_aside = str(aside)
            log.error(
                "migration journal %s is corrupt (%s): moved aside to %s; open intents in it "
                "cannot be reconciled: check guests with `balancerd status`",
                p,
                exc,
                aside,
            )
            self._db = self._open(p)
        self._pid = os.getpid()
        self._pid_start = process_start(self._pid)

    @staticmethod
    def _open(p: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(p), timeout=30.0, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError(f"quick_check: {check[:3]}")
            _prepare(db)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def begin(
        self,
        vm: str,
        vm_uuid: str,
        src: str,
        dst: str,
        vm_state: str,
        *,
        migration_id: str = "",
    ) -> int:
        """Record the intent to migrate; returns the entry id."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO migrations (vm, vm_uuid, src, dst, vm_state, pid, pid_start,"
                " phase, started_at, migration_id) VALUES (?, ?, ?, ?, ?, ?, ?, 'intent', ?, ?)",
                (
                    vm,
                    vm_uuid,
                    src,
                    dst,
                    vm_state,
                    self._pid,
                    self._pid_start,
                    time.time(),
                    migration_id,
                ),
            )
            self._db.commit()
            if cur.lastrowid is None:
                raise RuntimeError("internal error: cur.lastrowid is None")
            return cur.lastrowid

    def phase(self, entry_id: int, phase: str) -> None:
        with self._lock:
            self._db.execute("UPDATE migrations SET phase=? WHERE id=?", (phase, entry_id))
            self._db.commit()

    def finish(self, entry_id: int, outcome: str, mode: str = "", detail: str = "") -> None:
        with self._lock:
            self._db.execute(
                "UPDATE migrations SET outcome=?, mode=?, detail=?, finished_at=? WHERE id=?",
                (outcome, mode, detail, time.time(), entry_id),
            )
            self._db.commit()

    def open_entries(self) -> list[Entry]:
        """Entries without an outcome, oldest first."""
        return self._select("WHERE outcome IS NULL ORDER BY id")

    def entries(self, limit: int = 100) -> list[Entry]:
        """The latest entries, newest first."""
        return self._select("ORDER BY id DESC LIMIT ?", (limit,))

    def _select(self, where: str, args: tuple[object, ...] = ()) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, vm, vm_uuid, src, dst, vm_state, pid, pid_start, phase,"  # noqa: S608 (constant clause chosen in code; values are bound parameters)
                f" started_at, outcome, mode, detail, migration_id FROM migrations {where}",
                args,
            ).fetchall()
        return [Entry(*row) for row in rows]

    def owner_alive(self, entry: Entry) -> bool:
        """Whether the process that wrote ``entry`` is still running (and is not us)."""
        if entry.pid == self._pid and entry.pid_start == self._pid_start:
            return False  # our own leftovers cannot be in progress at start-up
        return bool(entry.pid_start) and process_start(entry.pid) == entry.pid_start

    def record_reconciliation(
        self, migration_id: int | None, vm: str, action: str, detail: str
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO reconciliations (migration_id, at, vm, action, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                (migration_id, time.time(), vm, action, detail),
            )
            self._db.commit()

    def reconciliation_count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM reconciliations").fetchone()
        return int(row[0])
