"""Snapshot <-> JSON, for the control socket's ``snapshot`` command (pure).

Field by field from the dataclasses, so a field added to ``Host`` or ``Vm`` travels
without a change here; a key the reader does not know is ignored and a missing one takes
its default (a CLI and a daemon of neighbouring versions still understand each other).
Lists become tuples again; ``labels`` stays a mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, TypeVar

from balancerd.model import Blocker, Host, Snapshot, Vm
from balancerd.outcomes import BlockerKind

T = TypeVar("T", Host, Vm)


class SnapshotDecodeError(ValueError):
    """The document is not a snapshot this version can read."""


def snapshot_to_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "taken_at_s": snapshot.taken_at_s,
        "hosts": [{**asdict(h), "labels": dict(h.labels)} for h in snapshot.hosts],
        "vms": [asdict(v) for v in snapshot.vms],
        "stopped": [asdict(v) for v in snapshot.stopped],
    }


def snapshot_from_json(doc: Any) -> Snapshot:
    if not isinstance(doc, Mapping):
        raise SnapshotDecodeError("a snapshot is an object")
    try:
        return Snapshot(
            taken_at_s=float(doc.get("taken_at_s", 0.0)),
            hosts=tuple(_decode(Host, h) for h in doc.get("hosts", ())),
            vms=tuple(_decode(Vm, v) for v in doc.get("vms", ())),
            stopped=tuple(_decode(Vm, v) for v in doc.get("stopped", ())),
        )
    except (TypeError, ValueError) as exc:
        raise SnapshotDecodeError(f"not a snapshot: {exc}") from exc


def _decode(cls: type[T], item: Any) -> T:
    if not isinstance(item, Mapping):
        raise SnapshotDecodeError(f"a {cls.__name__.lower()} is an object")
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in item:
            value = item[f.name]
            kw[f.name] = tuple(value) if isinstance(value, list) else value
    if "blockers" in kw:  # Vm.blockers: typed values, not the dicts asdict() made
        kw["blockers"] = tuple(_blocker(b) for b in kw["blockers"])
    return cls(**kw)


def _blocker(item: Any) -> Blocker:
    if not isinstance(item, Mapping):
        raise SnapshotDecodeError("a blocker is an object")
    return Blocker(BlockerKind(str(item.get("kind"))), str(item.get("detail", "")))
