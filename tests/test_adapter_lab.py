"""The libvirt adapter and collection against a real lab (libvirtd + QEMU hosts)."""

from __future__ import annotations

import time

import pytest
from cli_helpers import cli_json

from balancerd.collect import SampleHistory, build_snapshot, capacity_from_config
from balancerd.config import load_config
from balancerd.errors import HypervisorError
from balancerd.hypervisor.libvirt import LibvirtHypervisor
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec

pytestmark = pytest.mark.lab

LAB_NAME, LAB_SUBNET = "bl4", "10.77.4"


@pytest.fixture(scope="module")
def lab(lab_factory_module) -> Lab:  # type: ignore[no-untyped-def]
    make = lab_factory_module(LAB_NAME, LAB_SUBNET)
    lab = make(
        LabSpec(
            hosts=3,
            guests=(
                GuestSpec("burn50", "host1", burn_pct=50),
                GuestSpec("idle", "host2"),
                GuestSpec("wide", "host2", vcpus=2, mem_mib=192),
            ),
        )
    )
    for g in ("burn50", "idle", "wide"):
        lab.wait_booted(g)
    return lab


def test_collects_hosts_and_guests_with_a_burning_guest_near_half_a_vcpu(lab: Lab) -> None:
    config = load_config(lab.config_path)
    hv = LibvirtHypervisor(config.hosts, timeout_s=config.host_timeout_s)
    try:
        history = SampleHistory(window=5)
        for _ in range(6):
            history.add(hv.sample_all())
            time.sleep(1.0)
        snap = build_snapshot(
            history.samples(), window=5, capacity=capacity_from_config(config.hosts)
        )
    finally:
        hv.close()
    assert [h.name for h in snap.hosts] == ["host1", "host2", "host3"]
    assert all(h.up for h in snap.hosts)
    # Distinct hosts, as libvirt requires for migration.
    assert len({h.host_uuid for h in snap.hosts}) == 3
    assert len({h.hostname for h in snap.hosts}) == 3
    placement = snap.placement().host_of
    assert placement == {"burn50": "host1", "idle": "host2", "wide": "host2"}
    burn = snap.vm("burn50")
    assert burn is not None
    assert burn.vcpus == 1 and burn.mem_bytes == 128 * 2**20
    assert 0.35 <= burn.cpu_util <= 0.65, burn.cpu_util
    idle = snap.vm("idle")
    assert idle is not None and idle.cpu_util < 0.25
    wide = snap.vm("wide")
    assert wide is not None and wide.vcpus == 2 and wide.mem_bytes == 192 * 2**20
    host2 = snap.host("host2")
    assert host2 is not None
    # Capacity override from the lab config: memory free = capacity - guests.
    assert host2.mem_free_bytes == host2.mem_bytes - (128 + 192) * 2**20
    assert 0.0 < snap.hosts[0].cpu_util <= 1.0


def test_domain_and_host_facts_for_preflight(lab: Lab) -> None:
    config = load_config(lab.config_path)
    hv = LibvirtHypervisor(config.hosts, timeout_s=config.host_timeout_s)
    try:
        facts = hv.domain_facts("host1", "burn50")
        assert facts.name == "burn50" and facts.state == "running"
        assert facts.virt_type == "qemu" and facts.persistent and not facts.in_job
        host = hv.host_facts("host2")
        assert host.hostname and host.host_uuid and host.libvirt_version >= 9_000_000
        assert hv.cpu_compatible("host2", facts.cpu_xml, facts.virt_type)
        assert not hv.path_visible("host2", "/nonexistent/dir/disk.qcow2")
        assert hv.domain_state("host2", "burn50") is None
        with pytest.raises(HypervisorError, match="host1: read domain nosuch"):
            hv.domain_facts("host1", "nosuch")
    finally:
        hv.close()


def test_killed_libvirtd_is_reported_down_and_the_rest_still_collected(lab: Lab) -> None:
    config = load_config(lab.config_path)
    hv = LibvirtHypervisor(config.hosts, timeout_s=config.host_timeout_s)
    try:
        assert all(h.up for h in hv.sample_all())
        lab.kill_libvirtd("host3")
        started = time.monotonic()
        samples = {h.name: h for h in hv.sample_all()}
        elapsed_s = time.monotonic() - started
        assert samples["host3"].up is False
        assert samples["host3"].error
        assert samples["host1"].up and samples["host2"].up
        assert [v.name for v in samples["host1"].vms] == ["burn50"]
        assert elapsed_s <= config.host_timeout_s + 1.5
    finally:
        lab.start_libvirtd("host3")
        hv.close()


def test_status_json_cli_shape(lab: Lab) -> None:
    doc = cli_json(
        "status", "--config", str(lab.config_path), "--samples", "2", "--interval", "0.5"
    )
    hosts = {h["name"]: h for h in doc["hosts"]}
    assert set(hosts) == {"host1", "host2", "host3"}
    for h in hosts.values():
        assert {"name", "uri", "up", "cpus", "mem_bytes", "cpu_util", "mem_util", "vms"} <= set(h)
        assert 0.0 <= h["cpu_util"] <= 1.0 and 0.0 <= h["mem_util"] <= 1.0
    vm = hosts["host1"]["vms"][0]
    assert {"name", "uuid", "state", "vcpus", "mem_bytes", "cpu_util"} <= set(vm)
    assert vm["name"] == "burn50" and vm["state"] == "running"


def test_plan_json_on_the_live_lab(lab: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """plan --json: a dry run that moves nothing, in the documented shape."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: drain-host1}\n"
        "spec:\n  objective: balance\n  constraints: {maintenance: [host1]}\n"
    )
    before = {g.name: g.host for g in lab.guests()}
    doc = cli_json(
        "plan",
        "--config",
        str(lab.config_path),
        "--policy",
        str(policy),
        "--samples",
        "2",
        "--interval",
        "0.5",
    )
    assert doc["policy"] == "drain-host1" and doc["objective"] == "balance"
    # Maintenance drains host1: its one guest must go, to host2 or host3 (the solver may
    # also rebalance the others, but never onto host1).
    moves = {m["vm"]: (m["from"], m["to"]) for m in doc["moves"]}
    assert moves["burn50"][0] == "host1" and moves["burn50"][1] in ("host2", "host3")
    assert all(dst != "host1" for _src, dst in moves.values())
    assert set(doc["hosts_before"]) == {"host1", "host2", "host3"}
    assert doc["hosts_after"]["host1"]["cpu"] == 0.0 and doc["hosts_after"]["host1"]["mem"] == 0.0
    assert doc["hosts_before"]["host1"]["cpu"] > 0.0
    assert doc["active_hosts_after"] in (1, 2)
    assert {"backend", "status", "seconds", "objective", "bound", "gap"} <= set(doc["solver"])
    # A dry run: nothing moved.
    assert {g.name: g.host for g in lab.guests()} == before


def test_apply_json_drains_a_host_for_real(lab: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """apply: plan then execute; runs last in this module because it moves guests."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: drain-host1}\n"
        "spec:\n  objective: balance\n  constraints: {maintenance: [host1]}\n"
        "  migration: {bandwidth_mib_s: 200, max_downtime_ms: 300}\n"
    )
    results = cli_json(
        "apply",
        "--config",
        str(lab.config_path),
        "--policy",
        str(policy),
        "--samples",
        "2",
        "--interval",
        "0.5",
    )
    moves = results["moves"] if isinstance(results, dict) else results
    burn = next(m for m in moves if m["vm"] == "burn50")
    assert {"vm", "from", "to", "result", "mode", "reason", "seconds", "downtime_ms"} <= set(burn)
    assert burn["result"] == "migrated", burn
    assert burn["from"] == "host1" and burn["to"] in ("host2", "host3")
    assert burn["mode"].startswith("live") and burn["seconds"] > 0
    # The guest runs on the destination, and only there.
    running = [g.host for g in lab.guests() if g.name == "burn50" and g.state == "running"]
    assert running == [burn["to"]]
    assert not [g for g in lab.guests() if g.host == "host1"]
