"""Guests that cannot move and stopped guests on a real lab (issue 12): a guest with a
disk only its host has is fixed in place cycle after cycle with its reason in ``status``
and ``plan``; a drain moves a stopped guest cold so that it ends defined on the other host
only; power-save keeps a host that holds only a stopped guest on unless the policy allows
switching it off. One lab, the daemon in-process (real adapter, real lab power driver)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import cli_json
from prometheus_client import CollectorRegistry

from balancerd.daemon import Daemon
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.notify import Notifier
from balancerd.outcomes import MigrationMode, MoveOutcome

pytestmark = pytest.mark.lab

LAB_NAME, LAB_SUBNET = "bu7", "10.77.57"
POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: unmov}
spec:
  objective: OBJECTIVE
  limits: {max_cpu_util: 0.9, max_mem_util: 0.9, mem_headroom_mib: 0}
  hysteresis: {min_improvement: 0.01, cooldown_s: 0}
  power: {min_active_hosts: 1, grace_period_s: 0, min_off_s: 0, ALLOW}
  constraints: {maintenance: [MAINT]}
  solver: {time_limit_s: 3}
"""
LOCAL_NOTE = (
    "guest localdisk must leave host host1 but cannot be live-migrated (local-disk: disk vda "
    "/var/lib/libvirt/images/localdisk.qcow2 (not on shared storage))"
)


class Ctx:
    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab = lab
        self.policy = work / "policy.yaml"
        self.config = work / "balancerd.yaml"
        cfg = yaml.safe_load(lab.config_path.read_text())
        cfg["policy"] = str(self.policy)
        self.config.write_text(yaml.safe_dump(cfg))

    def write_policy(self, objective: str, maint: str, allow_off: bool = False) -> None:
        text = POLICY.replace("OBJECTIVE", objective).replace("MAINT", maint)
        text = text.replace("ALLOW", f"allow_off_with_stopped_guests: {str(allow_off).lower()}")
        self.policy.write_text(text)

    def defined(self, vm: str) -> dict[str, str]:
        return {g.host: g.state for g in self.lab.guests() if g.name == vm}


@pytest.fixture(scope="module")
def ctx(lab_factory_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    spec = LabSpec(
        hosts=2,
        guests=(
            GuestSpec("localdisk", "host1", mem_mib=96, disk="local"),
            GuestSpec("off", "host1", mem_mib=96, disk="shared"),
            GuestSpec("shm", "host1", mem_mib=96, shmem=True),
        ),
        metrics_listen="127.0.0.1:9287",
    )
    lab = lab_factory_module(LAB_NAME, LAB_SUBNET)(spec)
    lab.wait_booted("localdisk")
    lab.wait_booted("shm")
    # "off": a defined guest that does not run (its disk is on the shared folder)
    subprocess.run(
        ["virsh", "-q", "-c", lab.host_uri("host1"), "destroy", "off"], check=True, timeout=60
    )
    yield Ctx(lab, tmp_path_factory.mktemp("unmov"))


def daemon(c: Ctx) -> Daemon:
    d = Daemon(
        str(c.config), notifier=Notifier(), registry=CollectorRegistry(), serve_metrics=False
    )
    d.start(schedule_jobs=False)
    return d


def test_status_and_plan_name_the_blocker_and_the_stopped_guest(ctx: Ctx) -> None:
    ctx.write_policy("balance", "host1")
    status = cli_json("status", "--config", str(ctx.config), "--samples", "2")
    host1 = next(h for h in status["hosts"] if h["name"] == "host1")
    (local,) = [v for v in host1["vms"] if v["name"] == "localdisk"]
    assert [b["kind"] for b in local["blockers"]] == ["local-disk"], local
    assert [v["name"] for v in host1["stopped_vms"]] == ["off"]
    (shm,) = [v for v in host1["vms"] if v["name"] == "shm"]
    assert shm["blockers"] == [{"kind": "shmem", "detail": "shmem shm-shm"}], shm
    plan = cli_json("plan", "--config", str(ctx.config), "--samples", "2")
    assert LOCAL_NOTE in plan["notes"], plan["notes"]
    assert any("guest shm must leave host host1 but cannot" in n for n in plan["notes"])
    assert [(m["vm"], m["to"], m["offline"]) for m in plan["moves"]] == [("off", "host2", True)]


def test_a_drain_moves_the_stopped_guest_cold_and_never_the_local_disk_one(ctx: Ctx) -> None:
    ctx.write_policy("balance", "host1")
    d = daemon(ctx)
    try:
        for cycle in range(2):
            for _ in range(4):  # smoothing_window 3: ready after 4 samples
                d.collect_once()
            report = d.cycle_once()
            assert report is not None
            assert not {"localdisk", "shm"} & {r.vm for r in report.results}, report.results
            assert LOCAL_NOTE in report.plan.notes, report.plan.notes
            if cycle == 0:
                (cold,) = report.results
                assert (cold.vm, cold.outcome) == ("off", MoveOutcome.MIGRATED), cold.reason
                assert cold.mode is MigrationMode.DEFINITION
            else:
                assert not report.results  # nothing left to try: no retry every cycle
    finally:
        d.shutdown()
    assert ctx.defined("off") == {"host2": "shut off"}
    assert ctx.defined("localdisk") == {"host1": "running"}
    assert ctx.defined("shm") == {"host1": "running"}


def test_libvirt_itself_refuses_to_migrate_the_shmem_guest(ctx: Ctx) -> None:
    """The blocker is real: a hand-made live migration of shm fails in libvirt."""
    dst = ctx.lab.host_uri("host2")
    out = subprocess.run(
        ["virsh", "-c", ctx.lab.host_uri("host1"), "migrate", "--live", "--p2p", "shm", dst],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "shmem" in out.stderr, out.stderr
    assert ctx.defined("shm") == {"host1": "running"}


@pytest.mark.parametrize("allow_off", [False, True])
def test_power_save_keeps_a_host_with_a_stopped_guest_on_unless_allowed(
    ctx: Ctx, allow_off: bool
) -> None:
    """host2 runs nothing and holds the stopped guest moved there above."""
    assert ctx.defined("off") == {"host2": "shut off"}
    ctx.write_policy("power-save", "", allow_off)
    d = daemon(ctx)
    try:
        for _ in range(4):
            d.collect_once()
        report = d.cycle_once()
        assert report is not None
        assert "host2" in report.plan.power_off, report.plan
        offs = [p for p in report.power if p.action == "off" and p.host == "host2" and p.ok]
        assert bool(offs) is allow_off, report.power
    finally:
        d.shutdown()
    assert ctx.lab.is_powered("host2") is not allow_off
