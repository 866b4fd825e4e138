"""Composition helpers shared by the CLI commands: real objects wired from a Config.

This is I/O territory (it opens connections and sleeps between samples); the pure
pipeline lives in collect/decide/plan.
"""

from __future__ import annotations

import time

from balancerd.collect import SampleHistory, build_snapshot, capacity_from_config
from balancerd.config import Config
from balancerd.hypervisor.libvirt import LibvirtHypervisor
from balancerd.model import Snapshot


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
