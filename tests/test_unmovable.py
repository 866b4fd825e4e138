"""Guests that cannot move (issue 12): blockers read from the domain XML, carried through
collection, fixed in place by the decision core with the reason in the plan's notes, and
refused by preflight if a move is planned anyway."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from balancerd.collect import build_snapshot
from balancerd.commands.status import render_table, snapshot_json
from balancerd.config import load_config_text
from balancerd.decide import decide
from balancerd.errors import ConfigError
from balancerd.execute.preflight import check
from balancerd.hypervisor.base import DomainFacts, HostFacts
from balancerd.hypervisor.libvirt import migration_blockers
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.metrics import DaemonStats, register, render
from balancerd.model import Blocker, Host, Move, Snapshot, Vm
from balancerd.outcomes import BlockerKind, SkipKind
from balancerd.policy.model import Constraints, Hysteresis, Limits, Migration, Policy
from balancerd.solve import verify

GIB = 1024**3
SHARED = ("/srv/shared",)


def blockers(devices: str, shared: tuple[str, ...] = SHARED) -> list[tuple[str, str]]:
    xml = f"<domain type='kvm'><name>g</name>{devices}</domain>"
    return [(str(b.kind), b.detail) for b in migration_blockers(ET.fromstring(xml), shared)]


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        (
            "<devices><hostdev mode='subsystem' type='pci' managed='yes'><source>"
            "<address domain='0x0000' bus='0x03' slot='0x00' function='0x1'/>"
            "</source></hostdev></devices>",
            [("hostdev", "pci 0000:03:00.1")],
        ),
        (
            "<devices><hostdev mode='subsystem' type='usb'><source>"
            "<vendor id='0x046d'/><product id='0xc52b'/></source></hostdev></devices>",
            [("hostdev", "usb 046d:c52b")],
        ),
        (
            "<devices><hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
            "<address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source></hostdev>"
            "</devices>",
            [("mdev", "mdev c2177883-f1bb-47f0-914d-32a22e3a8804")],
        ),
        (
            "<devices><interface type='hostdev'><source><address type='pci' bus='0x05'/>"
            "</source></interface></devices>",
            [("hostdev", "SR-IOV interface (type='hostdev')")],
        ),
        ("<devices><shmem name='ivsh'/></devices>", [("shmem", "shmem ivsh")]),
        (
            "<devices><filesystem type='mount'><driver type='virtiofs'/>"
            "<source dir='/data'/><target dir='data'/></filesystem></devices>",
            [("virtiofs", "virtiofs data")],
        ),
        (
            "<cpu mode='host-passthrough' migratable='off'/>",
            [("non-migratable-cpu", "host-passthrough migratable='off'")],
        ),
        (
            "<cpu mode='host-passthrough'><feature policy='require' name='invtsc'/></cpu>",
            [("non-migratable-cpu", "invtsc required")],
        ),
        (
            "<devices><disk type='file' device='disk'><source file='/var/lib/libvirt/images/"
            "a.qcow2'/><target dev='vda'/></disk></devices>",
            [("local-disk", "disk vda /var/lib/libvirt/images/a.qcow2 (not on shared storage)")],
        ),
        (
            "<devices><disk type='file' device='cdrom'><source file='/root/tools.iso'/>"
            "<target dev='sda'/><readonly/></disk></devices>",
            [("host-cdrom", "cdrom sda /root/tools.iso (not on shared storage)")],
        ),
    ],
)
def test_each_blocker_is_read_from_the_xml(xml: str, expected: list[tuple[str, str]]) -> None:
    assert blockers(xml) == expected


def test_what_does_not_block() -> None:
    movable = (
        "<cpu mode='host-passthrough'/>"  # migratable by default
        "<devices>"
        "<disk type='file' device='disk'><source file='/srv/shared/vm/a.qcow2'/>"
        "<target dev='vda'/></disk>"
        "<disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>"  # empty
        "<disk type='network' device='disk'><source protocol='rbd' name='pool/a'/>"
        "<target dev='vdb'/></disk>"
        "<filesystem type='mount'><driver type='path'/><target dir='x'/></filesystem>"
        "</devices>"
    )
    assert blockers(movable) == []
    # a folder that merely starts with the shared folder's name is not under it
    local = "<devices><disk type='file'><source file='/srv/shared2/a.qcow2'/></disk></devices>"
    assert [k for k, _ in blockers(local)] == ["local-disk"]
    # no shared storage declared: disks are not judged here (preflight checks the path)
    assert blockers(local, shared=()) == []


PCI = Blocker(BlockerKind.HOSTDEV, "pci 0000:03:00.0")


def host(name: str) -> Host:
    return Host(name=name, uri=f"test:///{name}", up=True, cpus=8, mem_bytes=32 * GIB)


def vm(name: str, on: str, cores: float, blocked: bool = False) -> Vm:
    return Vm(name, name, on, "running", 4, 2 * GIB, cores / 4, blockers=(PCI,) if blocked else ())


def policy(**constraints: object) -> Policy:
    return Policy(
        name="t",
        limits=Limits(max_cpu_util=0.9, max_mem_util=0.9, mem_headroom_bytes=0),
        hysteresis=Hysteresis(min_improvement=0.01, cooldown_s=0.0),
        constraints=Constraints(**constraints),  # type: ignore[arg-type]
    )


def test_an_unmovable_guest_stays_counted_and_named_and_the_rest_balances() -> None:
    """The busiest guest of host a has a PCI device: the plan moves the others instead
    and says why gpu stays."""
    s = Snapshot(
        0.0,
        (host("a"), host("b")),
        (vm("gpu", "a", 4.0, blocked=True), vm("x1", "a", 2.0), vm("x2", "a", 1.0)),
    )
    plan = decide(s, policy())
    assert plan.target.host_of["gpu"] == "a"
    assert plan.moves and all(m.vm != "gpu" for m in plan.moves)
    assert any(
        "guest gpu stays on host a but cannot be live-migrated (hostdev: pci 0000:03:00.0)" in n
        for n in plan.notes
    ), plan.notes
    # the verifier refuses a target that moves it
    moved = replace(plan.target, host_of={**plan.target.host_of, "gpu": "b"})
    assert any(v.kind == "unmovable" for v in verify(s, policy(), moved))


def test_a_drain_names_the_guest_it_cannot_move() -> None:
    s = Snapshot(
        0.0, (host("a"), host("b")), (vm("gpu", "a", 1.0, blocked=True), vm("x", "a", 1.0))
    )
    plan = decide(s, policy(maintenance=("a",)))
    assert plan.target.host_of == {"gpu": "a", "x": "b"}
    assert any(
        "guest gpu must leave host a but cannot be live-migrated (hostdev:" in n for n in plan.notes
    ), plan.notes


def test_collection_carries_blockers_and_lists_stopped_guests_apart() -> None:
    hv = SimHypervisor(
        [
            SimHost(
                "a",
                cpus=8,
                cpu_mhz=2000,
                mem_bytes=32 * GIB,
                vms={
                    "gpu": SimVm("gpu", 2, 2 * GIB, blockers=(PCI,)),
                    "off": SimVm("off", 4, 8 * GIB, state="shutoff"),
                },
            )
        ]
    )
    s = build_snapshot([hv.sample_all()])
    assert [v.name for v in s.vms] == ["gpu"]
    assert s.vms[0].blockers == (PCI,)
    assert [(v.name, v.host, v.vcpus, v.mem_bytes) for v in s.stopped] == [("off", "a", 4, 8 * GIB)]
    assert s.unmovable() == (s.vms[0],)
    # a stopped guest uses no memory now: the host's planning memory leaves it out
    assert s.host_usage()["a"][1] == pytest.approx(2 / 32)


def test_preflight_refuses_a_device_blocker_and_leaves_disks_to_the_path_check() -> None:
    facts = DomainFacts("gpu", "u", "running", GIB, 1, "", (), (), True, False, blockers=(PCI,))
    src = HostFacts("a", "ha", "ua", 9_000_000, 7_002_000, 8 * GIB, (), ())
    dst = replace(src, name="b", hostname="hb", host_uuid="ub")
    move = Move("gpu", "a", "b", GIB, 1.0)

    def run(f: DomainFacts) -> object:
        return check(
            move, f, src, dst, mig=Migration(), headroom_bytes=0, cpu_ok=True, path_visible={}
        )

    refusal = run(facts)
    assert refusal is not None
    assert refusal.kind is SkipKind.UNMOVABLE  # type: ignore[attr-defined]
    assert "hostdev: pci 0000:03:00.0" in refusal.reason  # type: ignore[attr-defined]
    local = Blocker(BlockerKind.LOCAL_DISK, "disk vda /x.qcow2 (not on shared storage)")
    assert run(replace(facts, blockers=(local,))) is None  # the destination has no disks


def test_metrics_count_unmovable_guests_by_kind_and_stopped_guests_per_host() -> None:
    mdev = Blocker(BlockerKind.MDEV, "mdev u-1")
    s = Snapshot(
        0.0,
        (host("a"), host("b")),
        (
            vm("gpu", "a", 1.0, blocked=True),
            replace(vm("vgpu", "b", 1.0), blockers=(mdev, PCI)),
            vm("x", "b", 1.0),
        ),
        stopped=(replace(vm("off", "b", 0.0), state="shutoff"),),
    )
    stats = DaemonStats()
    stats.set_snapshot(s)
    registry = CollectorRegistry()
    register(registry, stats)
    got = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(render(registry).decode())
        for sample in family.samples
        if sample.name in ("balancerd_guests_unmovable", "balancerd_host_vms_stopped")
    }
    assert got[("balancerd_guests_unmovable", (("kind", "hostdev"),))] == 1.0
    assert got[("balancerd_guests_unmovable", (("kind", "mdev"),))] == 1.0
    assert got[("balancerd_guests_unmovable", (("kind", "local-disk"),))] == 0.0
    assert got[("balancerd_host_vms_stopped", (("host", "a"),))] == 0.0
    assert got[("balancerd_host_vms_stopped", (("host", "b"),))] == 1.0


def test_status_shows_why_a_guest_is_fixed_and_the_stopped_guests() -> None:
    s = Snapshot(
        0.0,
        (host("a"),),
        (vm("gpu", "a", 1.0, blocked=True),),
        stopped=(replace(vm("off", "a", 0.0), state="shutoff"),),
    )
    text = render_table(s)
    assert "1 (+1 stopped)" in text
    assert "gpu" in text and "unmovable (hostdev: pci 0000:03:00.0)" in text
    assert "off" in text and "shutoff" in text
    (a,) = snapshot_json(s)["hosts"]
    assert a["vms"][0]["blockers"] == [{"kind": "hostdev", "detail": "pci 0000:03:00.0"}]
    assert [v["name"] for v in a["stopped_vms"]] == ["off"]


def test_config_shared_storage_is_read_and_a_bad_entry_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("")
    src = str(tmp_path / "c.yaml")
    base = "hosts:\n  - {name: h1, uri: 'qemu+tcp://10.0.0.1/system'}\npolicy: p.yaml\n"
    cfg = load_config_text(base + "shared_storage: [/srv/images, /mnt/nfs]\n", src)
    assert cfg.shared_storage == ("/srv/images", "/mnt/nfs")
    with pytest.raises(ConfigError, match=r"c\.yaml:5: shared_storage\[0\]"):
        load_config_text(base + "shared_storage:\n  - relative/dir\n", src)


def test_the_blocker_cache_reads_xml_only_when_needed() -> None:
    """Through libvirt's test driver: a guest's XML is read once, again when its state
    changes or after REFRESH_SAMPLES samples, and a gone guest is forgotten."""
    import libvirt

    from balancerd.hypervisor.libvirt import GuestXmlCache

    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")
        cache = GuestXmlCache(("/guest",))  # where the test driver's disk is
        for _ in range(5):
            assert cache.blockers(dom, libvirt.VIR_DOMAIN_RUNNING) == ()
        assert cache.reads == 1
        cache.blockers(dom, libvirt.VIR_DOMAIN_PAUSED)
        assert cache.reads == 2
        for _ in range(GuestXmlCache.REFRESH_SAMPLES):
            cache.blockers(dom, libvirt.VIR_DOMAIN_PAUSED)
        assert cache.reads == 3
        cache.keep_only(set())
        cache.blockers(dom, libvirt.VIR_DOMAIN_PAUSED)
        assert cache.reads == 4
    finally:
        conn.close()
