"""The SQLite journal: intents survive a crash of the writing process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from balancerd.execute.journal import JOURNAL_FILE, Journal, process_start


def test_intent_then_outcome(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    assert j.path == tmp_path / JOURNAL_FILE
    a = j.begin("web-1", "u1", "host1", "host2", "running")
    b = j.begin("web-2", "u2", "host2", "host1", "paused")
    j.phase(a, "paused")
    assert [(e.vm, e.phase) for e in j.open_entries()] == [("web-1", "paused"), ("web-2", "intent")]
    j.finish(a, "migrated", "paused-fallback", "")
    assert [e.id for e in j.open_entries()] == [b]
    newest = j.entries()[1]
    assert (newest.vm, newest.outcome, newest.mode) == ("web-1", "migrated", "paused-fallback")
    j.close()


def test_entries_written_by_a_killed_process_are_open_and_orphaned(tmp_path: Path) -> None:
    # A child writes an intent and dies without a word (os._exit: no cleanup, no commit hooks).
    code = (
        "import os, sys\n"
        "from balancerd.execute.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "j.begin('web-9', 'u9', 'host1', 'host2', 'running')\n"
        "os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert proc.returncode == 9
    j = Journal(tmp_path)
    (entry,) = j.open_entries()
    assert (entry.vm, entry.src, entry.dst, entry.phase) == ("web-9", "host1", "host2", "intent")
    assert not j.owner_alive(entry)
    j.close()


def test_a_live_owner_is_recognised(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from balancerd.execute.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "j.begin('web-8', 'u8', 'host1', 'host2', 'running')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        j = Journal(tmp_path)
        (entry,) = j.open_entries()
        assert entry.pid == child.pid
        assert j.owner_alive(entry)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert not j.owner_alive(entry)
    j.close()


def test_own_entries_are_not_in_progress_and_reconciliations_count(tmp_path: Path) -> None:
    j = Journal(tmp_path / "state")
    e = j.begin("web-1", "u1", "host1", "host2", "running")
    (entry,) = j.open_entries()
    assert entry.id == e and not j.owner_alive(entry)
    assert j.reconciliation_count() == 0
    j.record_reconciliation(e, "web-1", "resumed on host1", "web-1 is running on host1")
    assert j.reconciliation_count() == 1
    j.close()


def test_process_start() -> None:
    assert process_start(os.getpid()) != ""
    assert process_start(2**22 + 12345) == ""


def test_a_corrupt_journal_is_moved_aside_loudly_and_a_new_one_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    j = Journal(tmp_path)
    assert j.moved_aside.startswith(str(tmp_path / f"{JOURNAL_FILE}.corrupt-"))
    assert Path(j.moved_aside).read_bytes().startswith(b"SQLite format 3")
    assert "is corrupt" in caplog.text and j.moved_aside in caplog.text
    e = j.begin("web-1", "u1", "host1", "host2", "running", migration_id="abc")
    assert [x.migration_id for x in j.open_entries()] == ["abc"]
    assert e
    j.close()


def test_a_journal_from_before_migration_ids_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / JOURNAL_FILE)
    db.executescript(
        "CREATE TABLE migrations (id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL,"
        " vm_uuid TEXT NOT NULL DEFAULT '', src TEXT NOT NULL, dst TEXT NOT NULL,"
        " vm_state TEXT NOT NULL DEFAULT '', pid INTEGER NOT NULL,"
        " pid_start TEXT NOT NULL DEFAULT '', phase TEXT NOT NULL, started_at REAL NOT NULL,"
        " outcome TEXT, mode TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '',"
        " finished_at REAL);"
        "INSERT INTO migrations (vm, src, dst, pid, phase, started_at)"
        " VALUES ('old', 'h1', 'h2', 1, 'live', 0);"
    )
    db.commit()
    db.close()
    j = Journal(tmp_path)
    assert [(e.vm, e.migration_id) for e in j.open_entries()] == [("old", "")]
    assert not j.moved_aside
    j.close()
