"""The coordination seam: who may act on the cluster, and the journal that goes with it.

A ``Coordinator`` answers one question before every step the daemon starts: may this
process act now (``not_leading()`` returns "" or why not)? Every action that changes a
host (a migration intent, a power switch) goes through ``fence``: the write succeeds only
while this process still holds leadership, so a deposed leader's late action is refused by
the store, not only by its own bookkeeping.

Two implementations:

* ``SingleNode`` (``coord/single.py``): today's behaviour. The state-directory ``flock``
  is the leadership; the SQLite journal in the state directory is the journal.
* ``EtcdCoordinator`` (``coord/etcd.py``): a tooz lock (etcd3gw driver) held with a lease;
  the lock key's etcd create revision is the fencing token, and every fenced write is an
  etcd transaction that compares it. The journal lives in etcd too, so a new leader sees
  (and reconciles) the open intents of the one before it.

This module imports neither tooz nor etcd3gw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from balancerd.errors import BalancerdError
from balancerd.execute.journal import JournalStore
from balancerd.statelock import StateLock


class CoordinationError(BalancerdError):
    """The coordination store could not be asked (unreachable, no quorum, refused)."""


class NotLeader(CoordinationError):
    """This process does not (or no longer) lead: a fenced write was refused."""


@dataclass(frozen=True)
class Leadership:
    """What this process knows about leadership now (for status, metrics and logs)."""

    backend: str  # "single" | "etcd"
    node: str  # this process's node name
    leading: bool
    leader: str  # the leading node's name ("" when unknown)
    token: int  # our fencing token while leading (the lock's etcd revision), else 0
    reason: str  # why we do not lead ("" while leading)
    epoch: int  # how many times this process became leader
    lease_left_s: float | None  # local bound on the lease still held (None: no lease)
    fenced: int = 0  # fenced writes that succeeded
    refused: int = 0  # fenced writes refused (we did not lead) or not known to succeed

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "node": self.node,
            "leading": self.leading,
            "leader": self.leader,
            "token": self.token,
            "reason": self.reason,
            "epoch": self.epoch,
            "lease_left_s": None if self.lease_left_s is None else round(self.lease_left_s, 1),
            "fenced": self.fenced,
            "refused": self.refused,
        }


class Coordinator(Protocol):
    """Leadership, fencing and the journal store for one balancerd process."""

    backend: str
    node: str
    state_lock: StateLock  # this node's state directory (held while running, either way)

    def start(self, *, wait_s: float, on_change: Callable[[Leadership], None]) -> None:
        """Take the local state-directory lock, connect, begin trying to lead.
        ``on_change`` is called (from the coordinator's thread) whenever leadership
        changes. Raises ``StateLocked`` / ``CoordinationError``."""
        ...

    def stop(self) -> None:
        """Give leadership up (if held) and disconnect; releases the local lock."""
        ...

    def not_leading(self) -> str:
        """ "" while this process may act; otherwise why not. Local and cheap (no round
        trip): asked before every step and while migrations run."""
        ...

    def leadership(self) -> Leadership: ...

    def fence(self, action: str, subject: str, detail: dict[str, Any]) -> None:
        """Record ``action`` on ``subject`` (a host, a guest) so that the record is written
        only while we lead; raises ``NotLeader`` (refused) or ``CoordinationError``
        (unknown: treat as refused). Call right before acting."""
        ...

    def journal(self) -> JournalStore:
        """The migration journal that goes with this coordination."""
        ...
