"""The libvirt adapter on libvirt's test driver (``test:///node.xml``): real libvirt-python
calls, no libvirtd, no root. The driver has no keepalive and no node memory stats."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancerd.collect import build_snapshot
from balancerd.config import HostConfig
from balancerd.errors import HypervisorError
from balancerd.hypervisor.libvirt import SAMPLE_WORKERS, LibvirtHypervisor
from balancerd.units import GIB, MIB
from benchmarks.bench_collect import run_collect
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


def test_a_call_on_a_closed_adapter_is_a_hypervisor_error(tmp_path: Path) -> None:
    """A job that still holds an adapter a reload closed gets the adapter's own error (the
    daemon logs it per host), not a RuntimeError traceback from the closed pool."""
    hosts = [HostConfig(name, uri) for name, uri in write_nodes(tmp_path, hosts=1, guests=1)]
    hv = LibvirtHypervisor(hosts, timeout_s=5.0)
    hv.close()
    with pytest.raises(HypervisorError, match="the adapter is closed"):
        hv.start_dirty_rate("h0000", "h0000-g00", 1)


def test_many_hosts_through_the_fixed_pool(tmp_path: Path) -> None:
    """More hosts than workers: every one is read (the queue drains), each once."""
    nodes = write_nodes(tmp_path, hosts=SAMPLE_WORKERS * 2 + 3, guests=1)
    hv = LibvirtHypervisor([HostConfig(name, uri) for name, uri in nodes], timeout_s=5.0)
    try:
        samples = hv.sample_all()
    finally:
        hv.close()
    assert [s.name for s in samples] == [name for name, _ in nodes]
    assert all(s.up for s in samples)
    assert sorted(v.name for s in samples for v in s.vms) == [f"{n}-g00" for n, _ in nodes]


def test_hung_hosts_do_not_hold_up_the_others(tmp_path: Path) -> None:
    """More hung hosts (a listener that never answers) than workers, queued first: the
    healthy hosts are read before any hung one reaches its time limit, and each hung host
    is reported down with that limit."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(128)  # never accepted: the client's first RPC waits for ever
    port = hung.getsockname()[1]
    n_hung = SAMPLE_WORKERS + 8
    hosts = [HostConfig(f"hung{i}", f"qemu+tcp://127.0.0.1:{port}/system") for i in range(n_hung)]
    hosts += [HostConfig(name, uri) for name, uri in write_nodes(tmp_path, hosts=2, guests=1)]
    hv = LibvirtHypervisor(hosts, timeout_s=1.0)
    try:
        samples = {s.name: s for s in hv.sample_all()}
    finally:
        hung.close()  # resets the queued connections: the stuck reads return
        hv.close()
    down = [samples[f"hung{i}"] for i in range(n_hung)]
    assert all(not s.up and "no answer within 3.0 s" in s.error for s in down)
    healthy = [samples["h0000"], samples["h0001"]]
    assert all(s.up for s in healthy)
    assert max(s.sampled_at_s for s in healthy) < min(s.sampled_at_s for s in down)


def test_bench_collect_smoke() -> None:
    """The benchmark's measurement, tiny: a daemon config of test:/// hosts loads and the
    daemon's collect job sees every host and guest."""
    out = run_collect(hosts=2, guests=2, cycles=2, interval_s=30.0)
    assert (out["up"], out["up_end"], out["guests"]) == (2, 2, 4)
