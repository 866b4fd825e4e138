"""What an operator asked of the running daemon and that must outlive a restart: hosts
drained (``balancerd drain``) and a pause (``balancerd pause``).

Kept in ``STATE_DIR/operator.json`` (written atomically). Drains are merged into the
active policy's ``constraints.maintenance`` every cycle (``apply_to``), so a drained host is
emptied exactly like a host the policy lists; a pause keeps the daemon observing and
planning while nothing is executed.

A file that cannot be read is not a reason to move guests back onto a drained host: the
daemon refuses to start with it (one line saying which file and why).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from balancerd.errors import BalancerdError
from balancerd.policy.model import Policy
from balancerd.statefiles import atomic_write

OPERATOR_FILE = "operator.json"
VERSION = 1


class OperatorStateError(BalancerdError):
    """The operator state file cannot be read or written."""


@dataclass(frozen=True)
class Mark:
    """Who set a drain or the pause, when, and why."""

    since_s: float  # unix time
    by: str  # "alice (uid 1000)"
    reason: str = ""

    @property
    def since(self) -> str:
        return datetime.fromtimestamp(self.since_s, UTC).astimezone().isoformat(timespec="seconds")

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "since_s": self.since_s, "by": self.by, "reason": self.reason}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Mark:
        return Mark(float(data["since_s"]), str(data.get("by", "")), str(data.get("reason", "")))


class OperatorState:
    """Drains and pause, thread-safe; every change is on disk before it returns."""

    def __init__(self, path: Path | None, drains: dict[str, Mark], paused: Mark | None) -> None:
        self.path = path  # None: in memory only (read-only copies, tests)
        self._lock = threading.Lock()
        self._drains = dict(drains)
        self._paused = paused

    @classmethod
    def load(cls, state_dir: str | Path, *, create: bool = True) -> OperatorState:
        """The state in ``state_dir`` (empty when the file does not exist yet)."""
        path = Path(state_dir) / OPERATOR_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path if create else None, {}, None)
        except OSError as exc:
            raise OperatorStateError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(f"expected a version {VERSION} document")
            drains = {str(h): Mark.from_json(m) for h, m in dict(data.get("drains", {})).items()}
            paused = data.get("paused")
            mark = Mark.from_json(paused) if paused else None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise OperatorStateError(
                f"{path} is not a balancerd operator state file ({exc}); fix or remove it "
                "(it lists the hosts drained with `balancerd drain`)"
            ) from None
        return cls(path if create else None, drains, mark)

    # --- reading ---------------------------------------------------------------------

    def drains(self) -> dict[str, Mark]:
        with self._lock:
            return dict(self._drains)

    def drained(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._drains))

    def paused(self) -> Mark | None:
        with self._lock:
            return self._paused

    def apply_to(self, policy: Policy) -> Policy:
        """``policy`` with the drained hosts added to its maintenance list."""
        drained = self.drained()
        if not drained:
            return policy
        c = policy.constraints
        merged = tuple(dict.fromkeys((*c.maintenance, *drained)))
        if merged == tuple(c.maintenance):
            return policy
        return replace(policy, constraints=replace(c, maintenance=merged))

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "drains": {h: m.to_json() for h, m in sorted(self._drains.items())},
                "paused": None if self._paused is None else self._paused.to_json(),
            }

    # --- changes (each written before it returns) -------------------------------------

    def drain(self, host: str, by: str, reason: str = "", now_s: float | None = None) -> bool:
        """Drain ``host``; False if it already was (its first mark is kept)."""
        with self._lock:
            if host in self._drains:
                return False
            new = {**self._drains, host: Mark(now_s or time.time(), by, reason)}
            self._save(new, self._paused)
            self._drains = new
            return True

    def undrain(self, host: str) -> Mark | None:
        """Undrain ``host``; its mark, or None if it was not drained."""
        with self._lock:
            mark = self._drains.get(host)
            if mark is None:
                return None
            new = {h: m for h, m in self._drains.items() if h != host}
            self._save(new, self._paused)
            self._drains = new
            return mark

    def pause(self, by: str, reason: str = "", now_s: float | None = None) -> Mark | None:
        """Pause; the earlier mark if it already was paused (kept), else None."""
        with self._lock:
            if self._paused is not None:
                return self._paused
            mark = Mark(now_s or time.time(), by, reason)
            self._save(self._drains, mark)
            self._paused = mark
            return None

    def resume(self) -> Mark | None:
        """Resume; the pause's mark, or None if it was not paused."""
        with self._lock:
            mark = self._paused
            if mark is None:
                return None
            self._save(self._drains, None)
            self._paused = None
            return mark

    def _save(self, drains: dict[str, Mark], paused: Mark | None) -> None:
        if self.path is None:
            return
        doc = {
            "version": VERSION,
            "drains": {h: m.to_json() for h, m in sorted(drains.items())},
            "paused": None if paused is None else paused.to_json(),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            raise OperatorStateError(
                f"cannot write {self.path}: {exc.strerror or exc} (nothing was changed)"
            ) from None
