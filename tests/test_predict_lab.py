"""Planning with measured dirty rates on the real lab (libvirtd + QEMU in namespaces).

Lab "bpt" on 10.77.22.0/24, two hosts. host1 holds a quiet 272 MiB guest and a 256 MiB one
rewriting a 128 MiB buffer at half the migration bandwidth; host2 is empty. Under a
memory-only balance policy moving either balances equally: the collector's dirty-rate
calculations (libvirt calc-dirty-rate through the adapter) tell them apart, the plan moves
the quiet one, and the engine moves it.

Run: flock /tmp/balancerd-lab.lock .venv/bin/pytest -m lab tests/test_predict_lab.py -s
"""

from __future__ import annotations

import gc
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from balancerd.collect import SampleHistory, build_snapshot, capacity_from_config
from balancerd.config import Config, load_config
from balancerd.decide import decide
from balancerd.execute.journal import Journal
from balancerd.execute.move import MIGRATED, Engine, run_move
from balancerd.hypervisor.libvirt import LibvirtHypervisor
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.lab.system import missing_requirements
from balancerd.model import Snapshot
from balancerd.policy.model import Hysteresis, Migration, Policy, Resources
from balancerd.units import MIB
from balancerd.wiring import open_hypervisor

pytestmark = pytest.mark.lab

MIG = Migration(bandwidth_mib_s=32, max_downtime_ms=300, max_time_s=120)
# Memory-only balance: 272 + 256 MiB on host1, either move leaves 272 MiB on one host.
# By bytes alone the smaller, dirtying guest is the cheaper move; by predicted time the
# quiet one is.
GUESTS = (
    GuestSpec("busy", "host1", mem_mib=256, dirty_mib=128, dirty_mib_s=16),
    GuestSpec("quiet", "host1", mem_mib=272, fill_mib=96),
)
POLICY = Policy(
    name="lab-predict",
    resources=Resources(cpu_weight=0.0, memory_weight=1.0),  # the dirtying guest burns CPU
    hysteresis=Hysteresis(min_improvement=0.0),
    migration=MIG,
)


@dataclass
class Ctx:
    lab: Lab
    config: Config
    hv: LibvirtHypervisor


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    missing = missing_requirements()
    if missing:
        pytest.skip("lab cannot run here: " + "; ".join(missing))
    lab = Lab(tmp_path_factory.mktemp("bpt") / "lab", "bpt", "10.77.22")
    try:
        config_path = lab.up(LabSpec(hosts=2, guests=GUESTS, metrics_listen="127.0.0.1:9292"))
        for g in GUESTS:
            lab.wait_booted(g.name)
        for h in lab.host_names():
            subprocess.run(
                ["virsh", "-q", "-c", lab.host_uri(h), "capabilities"],
                capture_output=True,
                timeout=120,
                check=True,
            )
        deadline = time.monotonic() + 90
        for vm, mark in (("busy", "dirtied"), ("quiet", "filled")):
            log = lab.console_log(vm)
            while mark not in log.read_text(errors="replace") and time.monotonic() < deadline:
                time.sleep(0.5)
        config = load_config(config_path)
        hv = open_hypervisor(config)
        yield Ctx(lab, config, hv)
        hv.close()
        gc.collect()  # free leftover libvirt objects while the hosts still answer
    finally:
        lab.down()


def collect_with_dirty_rates(c: Ctx) -> Snapshot:
    """Collect as the daemon does until every guest has its short and long calculation."""
    history = SampleHistory(2, dirty_pending_s=0.0)  # we wait for each calculation here
    for _ in range(8):
        history.add(c.hv.sample_all())
        due = history.due_for_dirty_rate()
        if not due and all(d.spanned for d in history.dirty.values()) and len(history.dirty) == 2:
            break
        for vm, (host, seconds) in due.items():
            c.hv.start_dirty_rate(host, vm, seconds)
        time.sleep(max((s for _, s in due.values()), default=0) + 1.5)
    return build_snapshot(history.samples(), dirty=history.dirty)


def test_the_plan_moves_the_quiet_guest_and_the_engine_moves_it(ctx: Ctx) -> None:
    snap = collect_with_dirty_rates(ctx)
    rate = {v.name: v.dirty_rate_bytes_s for v in snap.vms}
    print(f"\ndirty rates MiB/s: { {k: None if r is None else r / MIB for k, r in rate.items()} }")
    assert rate["busy"] is not None and rate["busy"] > 8 * MIB, rate
    # page sampling counts 512 pages per GiB: a quiet guest's kernel reads 0-2 MiB/s
    assert rate["quiet"] is not None and rate["quiet"] <= 4 * MIB < rate["busy"], rate
    plan = decide(snap, POLICY, capacity=capacity_from_config(ctx.config.hosts))
    print("plan:", [(m.vm, m.dst, round(m.expected_s, 1)) for m in plan.moves])
    assert [(m.vm, m.dst) for m in plan.moves] == [("quiet", "host2")]
    r = run_move(Engine(hv=ctx.hv, mig=MIG, journal=Journal(ctx.config.state_dir)), plan.moves[0])
    print(r.line(), f"predicted {r.predicted_s:.1f} s")
    assert r.outcome == MIGRATED
    assert ctx.lab.guest_host("quiet") == "host2" and ctx.lab.guest_host("busy") == "host1"
