"""The in-memory hypervisor: its counters go through the real collect path."""

from __future__ import annotations

import pytest

from balancerd.collect import build_snapshot
from balancerd.errors import HypervisorError
from balancerd.hypervisor.base import MigrationRequest
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm

GIB = 1024**3


def cluster() -> SimHypervisor:
    hv = SimHypervisor(
        [
            SimHost("a", cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB),
            SimHost("b", cpus=8, cpu_mhz=2000, mem_bytes=16 * GIB),
        ]
    )
    hv.add_vm("a", SimVm("web", vcpus=2, mem_bytes=2 * GIB))
    hv.add_vm("a", SimVm("db", vcpus=2, mem_bytes=4 * GIB))
    return hv


def test_counters_become_utilizations_through_collect() -> None:
    hv = cluster()
    history = [hv.sample_all()]
    hv.advance(300.0, {"web": 1.0, "db": 2.0})  # web at half its 2 vCPUs, db flat out
    history.append(hv.sample_all())
    hv.advance(300.0, {"web": 0.5, "db": 5.0})  # db cannot use more than its 2 vCPUs
    history.append(hv.sample_all())
    snap = build_snapshot(history, window=1)
    util = {v.name: v.cpu_util for v in snap.vms}
    assert util["web"] == pytest.approx(0.25)
    assert util["db"] == pytest.approx(1.0)
    a = snap.host("a")
    assert a is not None
    # host a: 2.5 of 4 cores busy in the last interval; 6 of 8 GiB held by guests
    assert a.cpu_util == pytest.approx(2.5 / 4)
    assert a.mem_free_bytes == 2 * GIB
    two = build_snapshot(history, window=2)
    assert {v.name: v.cpu_util for v in two.vms}["web"] == pytest.approx((0.5 + 0.25) / 2)


def test_migrate_moves_the_guest_and_errors_name_host_and_operation() -> None:
    hv = cluster()
    req = MigrationRequest(
        vm="web",
        src="a",
        dst="b",
        live=True,
        bandwidth_mib_s=100.0,
        max_downtime_ms=300,
        auto_converge=True,
    )
    hv.migrate(req)
    assert hv.domain_state("b", "web") == "running"
    assert hv.domain_state("a", "web") is None
    with pytest.raises(HypervisorError) as err:
        hv.migrate(req)  # web is no longer on a
    assert err.value.host == "a" and err.value.operation == "migrate"
    with pytest.raises(HypervisorError, match="nowhere"):
        hv.host_facts("nowhere")


def test_powered_off_host_samples_down() -> None:
    hv = cluster()
    hv.hosts["b"].up = False
    samples = {s.name: s for s in hv.sample_all()}
    assert samples["a"].up and not samples["b"].up
