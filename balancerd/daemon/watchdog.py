"""Liveness: which jobs run and when each last showed progress; feeds systemd's watchdog."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from balancerd.notify import Notifier

log = logging.getLogger(__name__)


class Watchdog:
    """Per-job progress, not a global timestamp: a quick cycle must not mask a hung collect.

    Start-up is left to systemd's start timeout; after READY a job without progress for
    ``stall_timeout_s`` (a call hung past every timeout) starves the watchdog, so systemd
    restarts the daemon.
    """

    def __init__(self, notifier: Notifier, clock: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self._clock = clock
        self._lock = threading.Lock()
        self._busy: dict[int, float] = {}  # thread id -> last progress (monotonic)
        self.starving = False  # the watchdog is being withheld

    def heartbeat(self) -> None:
        """Called from a job's thread whenever the job makes progress."""
        ident = threading.get_ident()
        with self._lock:
            if ident in self._busy:
                self._busy[ident] = self._clock()

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Marks the current thread as running a job whose progress is followed."""
        ident = threading.get_ident()
        with self._lock:
            self._busy[ident] = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._busy.pop(ident, None)

    def stalled_s(self) -> float:
        """How long the most stuck running job has gone without progress (0: none)."""
        now = self._clock()
        with self._lock:
            return max((now - t for t in self._busy.values()), default=0.0)

    def tick(self, *, ready: bool, stall_timeout_s: float) -> bool:
        """Feed systemd unless a job is stuck; returns whether it was fed."""
        stalled_s = self.stalled_s()
        if ready and stalled_s >= stall_timeout_s:
            if not self.starving:
                log.error(
                    "a job made no progress for %.0f s; withholding the systemd watchdog",
                    stalled_s,
                )
            self.starving = True
            return False
        self._notifier.watchdog()
        if self.starving:
            log.warning("progress again; feeding the systemd watchdog")
            self.starving = False
        return True
