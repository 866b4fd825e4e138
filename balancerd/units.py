"""Unit constants, defined once: binary sizes in bytes and nanoseconds per second.

Values keep their unit in their name (``mem_bytes``, ``elapsed_s``); these convert at the
edges (a policy's ``mem_headroom_mib``, a libvirt counter in ns, a trace in KiB).
"""

from __future__ import annotations

from typing import Final

KIB: Final = 1024  # bytes in a KiB
MIB: Final = 1024**2  # bytes in a MiB
GIB: Final = 1024**3  # bytes in a GiB

NS: Final = 1_000_000_000  # nanoseconds in a second
