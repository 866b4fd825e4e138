"""Host speed (issue 12): CPU is counted in reference cores where hosts' cores differ, and
a guest whose vCPUs need more than a host's core can give is never placed there."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from balancerd.collect import Capacity, build_snapshot, capacity_from_config, merge_capacity
from balancerd.config import ConfigError, load_config
from balancerd.decide import decide
from balancerd.hypervisor.libvirt import _nominal_mhz
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.model import Host, Placement, Snapshot, Vm
from balancerd.policy.model import Hysteresis, Limits, Policy
from balancerd.solve import blocking, verify
from balancerd.speed import speed_factors

GIB = 1024**3


def host(name: str, mhz: float, cpus: int = 8) -> Host:
    return Host(
        name=name, uri="test:///", up=True, cpus=cpus, mem_bytes=64 * GIB, core_speed_mhz=mhz
    )


def vm(name: str, on: str, vcpus: int, util: float) -> Vm:
    return Vm(name, name, on, "running", vcpus, 2 * GIB, util)


def policy() -> Policy:
    return Policy(
        name="t",
        limits=Limits(max_cpu_util=0.9, max_mem_util=0.9, mem_headroom_bytes=0),
        hysteresis=Hysteresis(min_improvement=0.02, cooldown_s=0.0),
    )


def test_factors_are_relative_to_the_fastest_known_host() -> None:
    f = speed_factors([host("a", 3000), host("b", 1500), host("c", 0), host("d", 2990)])
    assert f == {"a": 1.0, "b": 0.5, "c": 1.0, "d": 1.0}
    assert speed_factors([host("a", 0), host("b", 0)]) == {"a": 1.0, "b": 1.0}


def test_a_guest_with_fast_vcpus_is_never_placed_on_slow_cores() -> None:
    """fast is overloaded (8 guests x 1 vCPU at 100 % of an 3 GHz core = 8 cores on 8);
    slow has half-speed cores and is empty. Guests whose vCPU needs 0.9 of a fast core may
    not go there (a 1.5 GHz core gives at most 0.5); guests needing 0.3 may."""
    hosts = [host("fast", 3000), host("slow", 1500), host("fast2", 3000, cpus=2)]
    vms = [vm(f"hot{i}", "fast", 1, 0.9) for i in range(6)]
    vms += [vm(f"cool{i}", "fast", 1, 0.3) for i in range(6)]
    s = Snapshot(0.0, tuple(hosts), tuple(vms))
    plan = decide(s, policy())
    to_slow = {m.vm for m in plan.moves if m.dst == "slow"}
    assert to_slow, plan.reason or plan.notes
    assert all(name.startswith("cool") for name in to_slow), to_slow
    assert not blocking(verify(s, policy(), plan.target))


def test_the_verifier_blocks_a_move_onto_too_slow_cores() -> None:
    s = Snapshot(0.0, (host("fast", 3000), host("slow", 1500)), (vm("hot", "fast", 1, 0.9),))
    bad = Placement({"hot": "slow"})
    found = blocking(verify(s, policy(), bad))
    assert any("too slow" in v.message for v in found), found
    # the same move between equal hosts is fine
    same = replace(s, hosts=(host("fast", 3000), host("slow", 3000)))
    assert not blocking(verify(same, policy(), bad))


def test_capacity_is_counted_in_reference_cores() -> None:
    """Two 8-core hosts, one with half-speed cores: 6 fast cores of demand fill the slow
    one to 6 / (8 x 0.5) = 150 %, so balancing sends it a third, not half."""
    hosts = [host("fast", 3000), host("slow", 1500)]
    vms = [vm(f"g{i}", "fast", 1, 0.25) for i in range(24)]  # 6 reference cores
    s = Snapshot(0.0, tuple(hosts), tuple(vms))
    plan = decide(s, policy())
    usage = s.host_usage(plan.target)
    on_slow = sum(1 for m in plan.moves if m.dst == "slow")
    assert 6 <= on_slow <= 10, on_slow  # even in reference cores: 8 of 24
    assert abs(usage["fast"][0] - usage["slow"][0]) < 0.2, usage


def test_uniform_hosts_plan_as_before() -> None:
    """Speeds equal (or unknown) change nothing: same plan as without speeds."""
    vms = tuple(vm(f"g{i}", "a", 2, 0.5) for i in range(8))
    with_speed = Snapshot(0.0, (host("a", 2400), host("b", 2400)), vms)
    without = Snapshot(0.0, (host("a", 0), host("b", 0)), vms)
    assert decide(with_speed, policy()).target == decide(without, policy()).target


def test_nominal_frequency_comes_from_the_tsc_counter() -> None:
    caps = ET.fromstring(
        "<capabilities><host><uuid>u</uuid><cpu><arch>x86_64</arch>"
        "<counter name='tsc' frequency='2394454000' scaling='no'/></cpu></host></capabilities>"
    )
    assert _nominal_mhz(caps) == 2394
    assert _nominal_mhz(ET.fromstring("<capabilities><host><cpu/></host></capabilities>")) == 0


def test_config_speed_overrides_and_survives_a_powered_off_host(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    (tmp_path / "p.yaml").write_text("")
    cfg.write_text(
        "policy: p.yaml\nhosts:\n"
        "  - {name: a, uri: 'qemu+tcp://10.0.0.1/system', cpu_speed_mhz: 1860}\n"
        "  - {name: b, uri: 'qemu+tcp://10.0.0.2/system'}\n"
    )
    config = load_config(cfg)
    configured = capacity_from_config(config.hosts)
    assert configured == {"a": Capacity(core_speed_mhz=1860)}
    merged = merge_capacity({"a": Capacity(cpus=4, mem_bytes=GIB)}, configured)
    assert merged["a"] == Capacity(cpus=4, mem_bytes=GIB, core_speed_mhz=1860)
    hv = SimHypervisor(
        [
            SimHost("a", cpus=2, cpu_mhz=3000, mem_bytes=8 * GIB, core_speed_mhz=3000),
            SimHost("b", cpus=2, cpu_mhz=2660, mem_bytes=8 * GIB, core_speed_mhz=2660),
        ]
    )
    hv.add_vm("a", SimVm("v", vcpus=1, mem_bytes=GIB))
    snap = build_snapshot([hv.sample_all(), hv.sample_all()], capacity=merged)
    speeds = {h.name: h.core_speed_mhz for h in snap.hosts}
    assert speeds == {"a": 1860, "b": 2660}  # the config wins over the reported frequency


def test_a_bad_speed_is_refused_with_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    (tmp_path / "p.yaml").write_text("")
    cfg.write_text(
        "policy: p.yaml\nhosts:\n  - name: a\n    uri: qemu+tcp://10.0.0.1/system\n"
        "    cpu_speed_mhz: -3\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "c.yaml:5" in str(err.value) and "cpu_speed_mhz" in str(err.value)
