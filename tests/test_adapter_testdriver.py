"""The libvirt adapter on libvirt's test driver (``test:///node.xml``): real libvirt-python
calls, no libvirtd, no root. The driver has no keepalive and no node memory stats."""

from __future__ import annotations

import socket
import time
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


def test_a_tag_set_later_reaches_the_next_sample_through_libvirts_event(
    hypervisor: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tags come from the cached domain XML (no metadata call per guest per sample); a
    metadata change makes libvirt send an event that has that guest's XML read again."""
    import libvirt

    from balancerd.hypervisor.libvirt import TAGS_NS_KEY, TAGS_NS_URI, GuestXmlCache

    monkeypatch.setattr(GuestXmlCache, "REFRESH_SAMPLES", 10_000)  # no backstop re-read

    def tags_of(name: str) -> tuple[str, ...]:
        return next(v.tags for v in hypervisor.sample_host("h0000").vms if v.name == name)

    assert tags_of("h0000-g01") == ()
    reads = hypervisor._xml_cache["h0000"].reads
    assert tags_of("h0000-g01") == () and hypervisor._xml_cache["h0000"].reads == reads
    # the test driver's state lives in the adapter's connection: set the tag through it
    dom = hypervisor._hosts["h0000"].conn.lookupByName("h0000-g01")
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        "<tags><tag>db</tag></tags>",
        TAGS_NS_KEY,
        TAGS_NS_URI,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    deadline = time.monotonic() + 5.0
    while tags_of("h0000-g01") != ("db",) and time.monotonic() < deadline:
        time.sleep(0.05)  # the event arrives on libvirt's event-loop thread
    assert tags_of("h0000-g01") == ("db",)
    assert hypervisor._xml_cache["h0000"].reads == reads + 1  # that guest only


def test_reads_that_keep_the_interpreter_busy_run_fewer_at_once(tmp_path: Path) -> None:
    """In-process test-driver reads only contend for the GIL when many run at once: the
    rounds settle at fewer workers than the most (32 took 4x as long as 1 at 1,000 hosts)."""
    nodes = write_nodes(tmp_path, hosts=200, guests=5)
    hv = LibvirtHypervisor([HostConfig(name, uri) for name, uri in nodes], timeout_s=5.0)
    try:
        for _ in range(6):
            assert all(s.up for s in hv.sample_all())
        assert hv._sample_concurrency.workers <= SAMPLE_WORKERS // 4
    finally:
        hv.close()


def test_sample_concurrency_follows_how_busy_the_reads_kept_the_interpreter() -> None:
    from balancerd.hypervisor.libvirt import SampleConcurrency

    c = SampleConcurrency(most=32)
    c.after_round(32, cpu_s=1.5, wall_s=1.0)  # busy 1.5: contention
    assert c.workers == 16
    c.after_round(16, cpu_s=0.5, wall_s=1.0)  # busy 0.5: between the bounds, held
    assert c.workers == 16
    c.after_round(16, cpu_s=0.1, wall_s=1.0)  # mostly waiting on the network
    assert c.workers == 32
    c.after_round(32, cpu_s=0.0, wall_s=1.0)
    assert c.workers == 32  # never above the most
    for _ in range(8):
        c.after_round(c.workers, cpu_s=2.0, wall_s=1.0)
    assert c.workers == 1  # never below one
    # mid-round: slow reads double it at once; too early (under SAMPLE_SLOW_S) or busy: kept
    assert c.grown(1, cpu_s=0.01, elapsed_s=0.5) == 2
    assert c.grown(1, cpu_s=0.0, elapsed_s=0.1) == 1
    assert c.grown(4, cpu_s=0.45, elapsed_s=0.5) == 4
