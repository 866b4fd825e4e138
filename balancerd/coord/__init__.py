"""Coordination: which balancerd instance acts, fencing of its actions, and the journal
that goes with it (see ``base.py``)."""

from __future__ import annotations

import socket
from pathlib import Path

from balancerd.config import CoordinationConfig
from balancerd.coord.base import CoordinationError, Coordinator, Leadership, NotLeader
from balancerd.coord.single import SingleNode

__all__ = [
    "CoordinationError",
    "Coordinator",
    "Leadership",
    "NotLeader",
    "SingleNode",
    "make_coordinator",
]


def make_coordinator(
    cfg: CoordinationConfig, state_dir: str | Path, holder: str = "daemon"
) -> Coordinator:
    """The coordinator the config asks for (tooz and etcd3gw are imported only for etcd)."""
    if cfg.backend == "etcd":
        from balancerd.coord.etcd import EtcdCoordinator

        return EtcdCoordinator(cfg, state_dir, holder)
    return SingleNode(state_dir, cfg.node or socket.gethostname(), holder)
