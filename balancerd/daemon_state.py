"""The daemon's status file in its state directory, read by ``balancerd status``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from balancerd.statefiles import atomic_write

STATUS_FILE = "daemon-status.json"


def write_daemon_status(state_dir: str, status: dict[str, Any]) -> None:
    """Atomically replace the status file (write a temp file, then rename)."""
    path = Path(state_dir) / STATUS_FILE
    atomic_write(path, json.dumps({"pid": os.getpid(), **status}, indent=2, default=str))


def read_daemon_status(state_dir: str) -> dict[str, Any] | None:
    """The status the daemon last wrote, or None if absent or its process is gone."""
    path = Path(state_dir) / STATUS_FILE
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = int(status.get("pid", 0))
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return status
