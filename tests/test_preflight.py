"""Preflight checks as a pure function over facts (the I/O half is covered by the lab tests)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from balancerd.execute.preflight import check
from balancerd.hypervisor.base import DiskFacts, DomainFacts, HostFacts, InterfaceFacts
from balancerd.model import Move
from balancerd.outcomes import SkipKind
from balancerd.policy.model import Migration

MIB = 1024 * 1024
IMG = "/var/lib/libvirt/images/web-3.qcow2"
ISO = "/var/lib/libvirt/images/tools.iso"

MOVE = Move(vm="web-3", src="host1", dst="host2", mem_bytes=512 * MIB, expected_s=5.0)
FACTS = DomainFacts(
    name="web-3",
    uuid="u-3",
    state="running",
    mem_bytes=512 * MIB,
    vcpus=1,
    cpu_xml="",
    disks=(
        DiskFacts("vda", IMG, "none", "disk", False),
        DiskFacts("sda", ISO, "default", "cdrom", True),
        DiskFacts("sdb", "", "default", "cdrom", True),
    ),
    interfaces=(InterfaceFacts("network", "default"), InterfaceFacts("bridge", "br0")),
    persistent=True,
    in_job=False,
)
SRC = HostFacts(
    name="host1",
    hostname="h1",
    host_uuid="uuid-1",
    libvirt_version=9_000_000,
    hypervisor_version=7_002_000,
    mem_free_bytes=4096 * MIB,
    networks=("default",),
    bridges=("br0", "virbr0"),
)
DST = replace(SRC, name="host2", hostname="h2", host_uuid="uuid-2", mem_free_bytes=2048 * MIB)
VISIBLE = {IMG: True, ISO: True}


def run(
    facts: DomainFacts = FACTS,
    dst: HostFacts = DST,
    mig: Migration | None = None,
    cpu_ok: bool = True,
    visible: dict[str, bool] | None = None,
    headroom_mib: int = 512,
) -> str | None:
    return check(
        MOVE,
        facts,
        SRC,
        dst,
        mig=mig or Migration(),
        headroom_bytes=headroom_mib * MIB,
        cpu_ok=cpu_ok,
        path_visible=VISIBLE if visible is None else visible,
    )


def test_all_good() -> None:
    assert run() is None


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("disk missing", {"visible": {ISO: True}}, f"disk {IMG} not found on host2"),
        ("cdrom image missing", {"visible": {IMG: True}}, f"disk {ISO} not found on host2"),
        (
            "writeback cache",
            {"facts": replace(FACTS, disks=(DiskFacts("vda", IMG, "writeback", "disk", False),))},
            f"disk {IMG} has cache='writeback'",
        ),
        (
            "default cache on a writable disk",
            {"facts": replace(FACTS, disks=(DiskFacts("vda", IMG, "default", "disk", False),))},
            "cache='default'",
        ),
        ("same host uuid", {"dst": replace(DST, host_uuid="uuid-1")}, "same host"),
        ("same host name", {"dst": replace(DST, hostname="h1")}, "same host name 'h1'"),
        ("same name", {"dst": replace(DST, name="host1")}, "same host"),
        (
            "older libvirt",
            {"dst": replace(DST, libvirt_version=8_000_000)},
            "libvirt on host2 (8.0.0)",
        ),
        (
            "older QEMU",
            {"dst": replace(DST, hypervisor_version=6_002_000)},
            "QEMU on host2 (6.2.0)",
        ),
        ("cpu", {"cpu_ok": False}, "not compatible with host2"),
        ("network", {"dst": replace(DST, networks=())}, "network 'default' not active on host2"),
        ("bridge", {"dst": replace(DST, bridges=("virbr0",))}, "bridge 'br0' not found on host2"),
        ("memory", {"dst": replace(DST, mem_free_bytes=1000 * MIB)}, "host2 has 1000 MiB free"),
        ("in a job", {"facts": replace(FACTS, in_job=True)}, "already in a job"),
        ("shut off", {"facts": replace(FACTS, state="shutoff")}, "guest is shutoff"),
    ],
)
def test_each_failed_check_says_what(name: str, kwargs: dict[str, object], expected: str) -> None:
    problem = run(**kwargs)  # type: ignore[arg-type]
    assert problem is not None, name
    assert expected in problem.reason, (name, problem)
    assert problem.kind is EXPECTED_KIND[name], (name, problem)


EXPECTED_KIND = {
    "disk missing": SkipKind.DISK_MISSING,
    "cdrom image missing": SkipKind.DISK_MISSING,
    "writeback cache": SkipKind.CACHE_MODE,
    "default cache on a writable disk": SkipKind.CACHE_MODE,
    "same host uuid": SkipKind.SAME_HOST,
    "same host name": SkipKind.SAME_HOST,
    "same name": SkipKind.SAME_HOST,
    "older libvirt": SkipKind.VERSION,
    "older QEMU": SkipKind.VERSION,
    "cpu": SkipKind.CPU_INCOMPATIBLE,
    "network": SkipKind.NETWORK,
    "bridge": SkipKind.NETWORK,
    "memory": SkipKind.NO_MEMORY,
    "in a job": SkipKind.IN_JOB,
    "shut off": SkipKind.NOT_RUNNING,
}


def test_policy_exemptions() -> None:
    writeback = replace(FACTS, disks=(DiskFacts("vda", IMG, "writeback", "disk", False),))
    assert run(facts=writeback, mig=Migration(unsafe_cache_vms=("web-3",))) is None
    assert run(facts=writeback, mig=Migration(unsafe_cache_vms=("other",))) is not None
    assert run(visible={}, mig=Migration(copy_storage_vms=("web-3",))) is None
    older = replace(DST, libvirt_version=8_000_000, hypervisor_version=6_000_000)
    assert run(dst=older, mig=Migration(allow_backward=True)) is None


def test_directsync_and_readonly_disks_pass_the_cache_check() -> None:
    disks = (
        DiskFacts("vda", IMG, "directsync", "disk", False),
        DiskFacts("vdb", ISO, "writeback", "disk", True),
    )
    assert run(facts=replace(FACTS, disks=disks)) is None


def test_memory_is_guest_plus_headroom() -> None:
    exactly = replace(DST, mem_free_bytes=(512 + 512) * MIB)
    assert run(dst=exactly) is None
    assert run(dst=replace(exactly, mem_free_bytes=exactly.mem_free_bytes - 1)) is not None
    assert run(dst=replace(exactly, mem_free_bytes=512 * MIB), headroom_mib=0) is None


def test_paused_guest_may_move() -> None:
    assert run(facts=replace(FACTS, state="paused")) is None
