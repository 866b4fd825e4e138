"""Run the real CLI in a subprocess, as an operator would."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def cli_json(*args: str, timeout_s: float = 180) -> Any:
    """``balancerd ARGS... --json`` -> the parsed JSON (fails the test on a non-zero exit)."""
    out = subprocess.run(
        [sys.executable, "-m", "balancerd.cli", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)
