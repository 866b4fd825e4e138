"""One acting process per state directory: the daemon, ``apply`` and ``migrate`` each hold
an exclusive ``flock`` on ``STATE_DIR/balancerd.lock`` while they may move guests.

The kernel drops the lock when its holder dies (even on SIGKILL), so a stale lock file is
harmless; the file's content only names the holder for the error message. This also
replaces "is the journal's owner alive" guesses that a hidden /proc (the unit's
ProtectProc=invisible) can fool: whoever holds the lock owns every open journal entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from balancerd.errors import BalancerdError

LOCK_FILE = "balancerd.lock"


class StateLocked(BalancerdError):
    """Another balancerd process acts on the same cluster (state directory)."""


class StateLock:
    def __init__(self, state_dir: str | Path, holder: str) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.holder = holder  # "daemon", "apply", "migrate": for the other side's message
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock or raise StateLocked naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = _read_owner(fd)
                    os.close(fd)
                    raise StateLocked(
                        f"another balancerd ({owner or 'unknown process'}) is acting on this "
                        f"cluster (lock {self.path}); stop it or wait for it to finish"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} command={self.holder}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
