"""The libvirt adapter on libvirt's test driver (``test:///node.xml``): real libvirt-python
calls, no libvirtd, no root. The driver has no keepalive and no node memory stats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from balancerd.collect import build_snapshot
from balancerd.config import HostConfig
from balancerd.hypervisor.libvirt import LibvirtHypervisor
from balancerd.units import GIB, MIB
from benchmarks.testdriver import write_nodes


@pytest.fixture
def hypervisor(tmp_path: Path) -> Iterator[LibvirtHypervisor]:
    hosts = [HostConfig(name, uri) for name, uri in write_nodes(tmp_path, hosts=2, guests=3)]
    hv = LibvirtHypervisor(hosts, timeout_s=5.0)
    yield hv
    hv.close()


def test_collects_test_driver_hosts(hypervisor: LibvirtHypervisor) -> None:
    samples = hypervisor.sample_all()
    assert [(s.name, s.up, s.error) for s in samples] == [("h0000", True, ""), ("h0001", True, "")]
    h0 = samples[0]
    assert (h0.cpus, h0.cpu_mhz, h0.mem_total_bytes) == (32, 2400, 256 * GIB)
    # No node memory stats in this driver: free is what the running guests leave.
    assert h0.mem_free_bytes == 256 * GIB - 3 * 4096 * MIB
    assert sorted((v.name, v.state, v.vcpus, v.mem_bytes) for v in h0.vms) == [
        (f"h0000-g{i:02d}", "running", 2, 4096 * MIB) for i in range(3)
    ]
    assert len({v.uuid for s in samples for v in s.vms}) == 6


def test_snapshot_from_test_driver(hypervisor: LibvirtHypervisor) -> None:
    history = [hypervisor.sample_all(), hypervisor.sample_all()]
    snap = build_snapshot(history, window=1)
    assert [h.name for h in snap.hosts if h.up] == ["h0000", "h0001"]
    assert sorted(v.name for v in snap.vms_on("h0001")) == [f"h0001-g{i:02d}" for i in range(3)]
    facts = hypervisor.host_facts("h0000")
    assert facts.mem_free_bytes == 256 * GIB - 3 * 4096 * MIB
