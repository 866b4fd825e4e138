"""The snapshot codec of the control socket: a round trip keeps every field."""

from __future__ import annotations

import json

import pytest

from balancerd.model import Blocker, Host, Snapshot, Vm
from balancerd.outcomes import BlockerKind
from balancerd.snapshot_codec import SnapshotDecodeError, snapshot_from_json, snapshot_to_json

SNAPSHOT = Snapshot(
    taken_at_s=12.5,
    hosts=(
        Host(
            "h1",
            "qemu+tcp://h1/system",
            True,
            cpus=4,
            mem_bytes=8 << 30,
            cpu_util=0.25,
            labels={"rack": "r1"},
            core_speed_mhz=2400.0,
        ),
        Host("h2", "qemu+tcp://h2/system", False, error="no answer"),
    ),
    vms=(
        Vm(
            "web",
            "u1",
            "h1",
            "running",
            2,
            1 << 30,
            0.5,
            dirty_rate_bytes_s=1e6,
            tags=("web",),
            blockers=(Blocker(BlockerKind.HOSTDEV, "pci 0000:03:00.0"),),
        ),
        Vm("db", "u2", "h1", "paused", 1, 1 << 29, 0.0),
    ),
    stopped=(Vm("old", "u3", "h2", "shutoff", 1, 1 << 29, 0.0),),
)


def test_round_trip_through_json_keeps_every_field() -> None:
    doc = json.loads(json.dumps(snapshot_to_json(SNAPSHOT)))
    assert snapshot_from_json(doc) == SNAPSHOT


def test_unknown_keys_are_ignored_and_missing_ones_default() -> None:
    doc = snapshot_to_json(SNAPSHOT)
    doc["hosts"][0]["from_a_newer_daemon"] = 1
    del doc["vms"][1]["tags"]
    assert snapshot_from_json(doc) == SNAPSHOT


@pytest.mark.parametrize("doc", [[], {"hosts": [1]}, {"vms": [{"name": "x"}]}])
def test_what_is_not_a_snapshot_is_refused(doc: object) -> None:
    with pytest.raises(SnapshotDecodeError):
        snapshot_from_json(doc)
