"""systemd notifications (sd_notify) over a raw AF_UNIX datagram to ``$NOTIFY_SOCKET``.

No-op when not started by systemd (no ``NOTIFY_SOCKET``). Abstract sockets (``@name``)
are supported. The watchdog interval comes from ``$WATCHDOG_USEC`` (honouring
``$WATCHDOG_PID``); ping at half of it from the main loop:

    notifier = Notifier.from_env()
    notifier.ready("collected 3 hosts, 12 guests")
    every notifier.watchdog_ping_s seconds: notifier.watchdog()
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(path: str) -> str | bytes:
    """``@name`` is an abstract socket: a leading NUL byte on the wire."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def watchdog_interval_s(env: Mapping[str, str] | None = None, pid: int | None = None) -> float:
    """The watchdog timeout systemd set for this process, 0.0 when disabled."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return 0.0
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return 0.0  # meant for another process (e.g. our parent)
    return int(usec) / 1e6


class Notifier:
    """Sends ``KEY=VALUE`` lines to systemd. Sending never raises: a failed send is logged
    once and returns False (as sd_notify's callers ignore its result)."""

    def __init__(self, socket_path: str = "", watchdog_s: float = 0.0) -> None:
        self.socket_path = socket_path
        self.watchdog_s = watchdog_s
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET", ""), watchdog_interval_s(env))

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    @property
    def watchdog_ping_s(self) -> float:
        """How often to send WATCHDOG=1 (half the timeout); 0.0 when there is no watchdog."""
        return self.watchdog_s / 2

    def send(self, **fields: str) -> bool:
        """``send(READY="1", STATUS="...")``: one datagram with one line per field."""
        if not self.socket_path:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(_address(self.socket_path))
                # Never block the daemon on a receiver that is not reading: drop instead.
                sock.send(payload, socket.MSG_DONTWAIT)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", self.socket_path, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """After the first good collection (and after each reload)."""
        return self.send(READY="1", **({"STATUS": _line(status)} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=_line(text))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def reloading(self, status: str = "reloading configuration") -> bool:
        """Before re-reading config; send ``ready()`` when done (good or rejected)."""
        usec = str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        return self.send(RELOADING="1", MONOTONIC_USEC=usec, STATUS=_line(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING="1", STATUS=_line(status))


def _line(text: str) -> str:
    """STATUS is one line; newlines would start new fields."""
    return " ".join(text.split())
