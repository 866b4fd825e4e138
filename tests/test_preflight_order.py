"""Preflight's order on the scripted hypervisor: the guest on its source and the checks that
need nothing else run first, a refusal there never touches the destination, the destination
is read in one call, and every step run has a timing (timings themselves: the benchmark)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from balancerd.execute.preflight import (
    STEP_DESTINATION,
    STEP_HOST_CHECKS,
    STEP_SOURCE_CHECKS,
    STEP_SOURCE_GUEST,
    STEP_SOURCE_HOST,
    preflight,
)
from balancerd.hypervisor.base import DiskFacts
from balancerd.hypervisor.scripted import ScriptedHypervisor, SimHost, SimVm
from balancerd.model import Move
from balancerd.outcomes import SkipKind
from balancerd.policy.model import Migration
from balancerd.units import GIB, MIB

IMG = "/img/g.qcow2"
GOOD_DISK = DiskFacts("vda", IMG, "none", "disk", False)
MOVE = Move(vm="g", src="a", dst="b", mem_bytes=GIB, expected_s=1.0)
ALL_STEPS = (
    STEP_SOURCE_GUEST,
    STEP_SOURCE_CHECKS,
    STEP_DESTINATION,
    STEP_SOURCE_HOST,
    STEP_HOST_CHECKS,
)


def cluster(vm: SimVm) -> ScriptedHypervisor:
    hv = ScriptedHypervisor(
        [SimHost(h, cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB) for h in ("a", "b")]
    )
    hv.add_vm("a", vm)
    return hv


GUEST = SimVm("g", vcpus=1, mem_bytes=GIB, disks=(GOOD_DISK,))


@dataclass(frozen=True)
class Row:
    name: str
    vm: SimVm
    kind: SkipKind | None  # None: preflight passes
    steps: tuple[str, ...]  # the steps run, in order
    dst_calls: tuple[str, ...]  # the calls made to the destination, in order
    setup: Callable[[ScriptedHypervisor], None] = lambda _hv: None


ROWS = [
    Row("passes", GUEST, None, ALL_STEPS, ("destination_facts",)),
    Row(
        "writeback disk: refused on the source",
        replace(GUEST, disks=(replace(GOOD_DISK, cache="writeback"),)),
        SkipKind.CACHE_MODE,
        (STEP_SOURCE_GUEST, STEP_SOURCE_CHECKS),
        (),
    ),
    Row(
        "writeback disk and a dead destination: still the cache refusal",
        replace(GUEST, disks=(replace(GOOD_DISK, cache="writeback"),)),
        SkipKind.CACHE_MODE,
        (STEP_SOURCE_GUEST, STEP_SOURCE_CHECKS),
        (),
        setup=lambda hv: hv.kill_host("b"),
    ),
    Row(
        "guest in a job: refused on the source",
        replace(GUEST, in_job=True),
        SkipKind.IN_JOB,
        (STEP_SOURCE_GUEST, STEP_SOURCE_CHECKS),
        (),
    ),
    Row(
        "guest shut off: refused on the source",
        replace(GUEST, state="shutoff"),
        SkipKind.NOT_RUNNING,
        (STEP_SOURCE_GUEST, STEP_SOURCE_CHECKS),
        (),
    ),
    Row(
        "source does not answer: the destination is not asked",
        GUEST,
        SkipKind.HOST_DOWN,
        (STEP_SOURCE_GUEST,),
        (),
        setup=lambda hv: hv.fail("a", ops=["domain_state"]),
    ),
    Row(
        "destination does not answer: one call, then stop",
        GUEST,
        SkipKind.HOST_DOWN,
        (STEP_SOURCE_GUEST, STEP_SOURCE_CHECKS, STEP_DESTINATION),
        ("destination_facts",),
        setup=lambda hv: hv.fail("b", ops=["destination_facts"]),
    ),
    Row(
        "disk not on the destination: refused after the one destination call",
        GUEST,
        SkipKind.DISK_MISSING,
        ALL_STEPS,
        ("destination_facts",),
        setup=lambda hv: setattr(hv.hosts["b"], "visible_paths", frozenset()),
    ),
    Row(
        "a domain of that name on the destination: the source host is not read",
        GUEST,
        SkipKind.NAME_TAKEN,
        (STEP_SOURCE_GUEST, STEP_SOURCE_CHECKS, STEP_DESTINATION),
        ("destination_facts",),
        setup=lambda hv: hv.add_vm("b", SimVm("g", vcpus=1, mem_bytes=GIB, state="shutoff")),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_preflight_order(row: Row) -> None:
    hv = cluster(row.vm)
    row.setup(hv)
    hv.calls.clear()
    result = preflight(hv, MOVE, Migration(), headroom_bytes=256 * MIB)
    assert result.kind is row.kind, result.reason
    assert result.ok is (row.kind is None)
    assert tuple(c.check for c in result.timings) == row.steps
    assert all(c.elapsed_s >= 0 for c in result.timings)
    assert tuple(c.op for c in hv.calls if c.host == "b") == row.dst_calls


def test_timings_come_from_the_given_clock() -> None:
    ticks = iter(range(100))
    result = preflight(
        cluster(GUEST), MOVE, Migration(), headroom_bytes=0, clock=lambda: float(next(ticks))
    )
    assert result.ok
    assert [c.elapsed_s for c in result.timings] == [1.0] * len(ALL_STEPS)
