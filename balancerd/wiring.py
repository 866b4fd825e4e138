"""Composition helpers shared by the CLI commands: real objects wired from a Config.

This is I/O territory (it opens connections and sleeps between samples); the pure
pipeline lives in collect/decide/plan.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from balancerd.collect import SampleHistory, build_snapshot, capacity_from_config
from balancerd.config import Config
from balancerd.control_client import find_socket, request
from balancerd.errors import BalancerdError
from balancerd.hypervisor.libvirt import LibvirtHypervisor
from balancerd.model import Snapshot
from balancerd.snapshot_codec import SnapshotDecodeError, snapshot_from_json

# A one-shot sample: two reads this far apart give CPU rates from the counters.
ONE_SHOT_INTERVAL_S = 0.5
# How long plan/status wait for a running daemon's snapshot before sampling themselves.
DAEMON_SNAPSHOT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SnapshotSource:
    """Where a CLI's snapshot came from, said in its output."""

    kind: str  # "daemon" | "one-shot" | "sampled"
    detail: str  # e.g. "the running daemon's snapshot, 3.2 s old (smoothed over 4 samples)"
    age_s: float | None = None

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "detail": self.detail, "age_s": self.age_s}


def open_hypervisor(config: Config) -> LibvirtHypervisor:
    return LibvirtHypervisor(
        config.hosts, timeout_s=config.host_timeout_s, shared_storage=config.shared_storage
    )


def sample_snapshot(
    hypervisor: LibvirtHypervisor, config: Config, samples: int = 3, interval_s: float = 1.0
) -> Snapshot:
    """Take ``samples`` cluster samples ``interval_s`` apart and smooth over all of them."""
    history = SampleHistory(window=max(1, samples - 1))
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        history.add(hypervisor.sample_all())
    return build_snapshot(
        history.samples(), window=history.window, capacity=capacity_from_config(config.hosts)
    )


def add_snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    """--samples / --interval of the commands that read the cluster (plan, status)."""
    parser.add_argument(
        "--samples",
        type=int,
        help="sample the hosts this many times (>= 2) and smooth; default: the running "
        "daemon's latest snapshot, else one read of every host (a one-shot sample)",
    )
    parser.add_argument("--interval", type=float, help="seconds between samples (default 1)")


def cluster_snapshot(
    config: Config, samples: int | None = None, interval_s: float | None = None
) -> tuple[Snapshot, SnapshotSource]:
    """The snapshot for ``plan``/``status``: with ``samples`` given, sampled live as asked;
    else the running daemon's latest (through its control socket, no host is asked), else
    one read of every host ``ONE_SHOT_INTERVAL_S`` apart, not smoothed."""
    if samples is None:
        found = daemon_snapshot(config)
        if found is not None:
            return found
    n = 2 if samples is None else max(2, samples)
    gap_s = (
        interval_s if interval_s is not None else (ONE_SHOT_INTERVAL_S if samples is None else 1.0)
    )
    hypervisor = open_hypervisor(config)
    try:
        snapshot = sample_snapshot(hypervisor, config, n, gap_s)
    finally:
        hypervisor.close()
    if samples is None:
        detail = f"one-shot sample (no daemon answered): CPU over {gap_s:g} s, not smoothed"
        return snapshot, SnapshotSource("one-shot", detail)
    return snapshot, SnapshotSource("sampled", f"{n} samples {gap_s:g} s apart, smoothed")


def daemon_snapshot(config: Config) -> tuple[Snapshot, SnapshotSource] | None:
    """The running daemon's latest snapshot, or None (no daemon, or it has none yet)."""
    try:
        path = find_socket(None, config.state_dir)
        answer = request(path, "snapshot", timeout_s=DAEMON_SNAPSHOT_TIMEOUT_S)
        snapshot = snapshot_from_json(answer.get("snapshot"))
    except (BalancerdError, SnapshotDecodeError, OSError):
        return None
    age_s = float(answer.get("age_s", 0.0))
    detail = (
        f"the running daemon's snapshot, {age_s:.1f} s old (smoothed over "
        f"{answer.get('window')} samples {answer.get('interval_s')} s apart)"
    )
    return snapshot, SnapshotSource("daemon", detail, age_s)
