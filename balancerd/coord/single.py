"""One balancerd on one management node: the state-directory ``flock`` is leadership
(held from start to stop), fencing is that lock being held, and the journal is the SQLite
file in the state directory. This is the behaviour balancerd always had."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balancerd.coord.base import Leadership, NotLeader
from balancerd.errors import BalancerdError
from balancerd.execute.journal import JOURNAL_FILE, Journal, JournalStore
from balancerd.statelock import StateLock


class SingleNode:
    backend = "single"

    def __init__(self, state_dir: str | Path, node: str, holder: str = "daemon") -> None:
        self.node = node
        self.state_dir = Path(state_dir)
        self.state_lock = StateLock(state_dir, holder)
        self._journal: Journal | None = None
        self._fenced = 0
        self._refused = 0

    def start(self, *, wait_s: float, on_change: Callable[[Leadership], None]) -> None:
        self.state_lock.acquire(wait_s=wait_s)
        on_change(self.leadership())

    def stop(self) -> None:
        self.state_lock.release()

    def not_leading(self) -> str:
        return "" if self.state_lock.held else "the state directory lock is not held"

    def leadership(self) -> Leadership:
        leading = self.state_lock.held
        return Leadership(
            backend=self.backend,
            node=self.node,
            leading=leading,
            leader=self.node if leading else "",
            token=0,
            reason=self.not_leading(),
            epoch=1 if leading else 0,
            lease_left_s=None,
            fenced=self._fenced,
            refused=self._refused,
        )

    def fence(self, action: str, subject: str, detail: dict[str, Any]) -> None:
        why = self.not_leading()
        if why:
            self._refused += 1
            raise NotLeader(f"{action} {subject} refused: {why}")
        self._fenced += 1

    def journal(self) -> JournalStore:
        """The SQLite journal (opened once; a corrupt file is moved aside)."""
        if self._journal is None:
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                self._journal = Journal(self.state_dir / JOURNAL_FILE)
            except (OSError, sqlite3.Error) as exc:
                raise BalancerdError(
                    f"cannot open the migration journal in {self.state_dir}: {exc} "
                    "(balancerd does not migrate without a journal)"
                ) from None
        return self._journal
