"""Reconcile (execute/reconcile.py) on the scripted hypervisor: each open-entry state from its
docstring's table, with the journal, checking the outcome enum, the entry and where the
guest ends up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from balancerd.execute.journal import Journal
from balancerd.execute.reconcile import MAX_RESUME_AGE_S, reconcile
from balancerd.hypervisor.base import MigrationRequest
from balancerd.hypervisor.scripted import (
    INCOMING,
    Script,
    ScriptedHypervisor,
    SimHost,
    SimVm,
    Stall,
    stalling,
)
from balancerd.outcomes import ReconcileOutcome
from balancerd.units import GIB

VM = "g"
WAIT_S = 10.0  # reconcile's wait for an aborted job; never reached when the test passes
SETTLED, CLEANED, UNKNOWN = (
    ReconcileOutcome.SETTLED,
    ReconcileOutcome.CLEANED,
    ReconcileOutcome.UNKNOWN,
)
ACTIONS = ("migrate", "suspend", "resume", "abort_job", "destroy")
REQ = MigrationRequest(VM, "a", "b", True, 100.0, 300, False)


def guest(state: str = "running", incoming: bool = False, uuid: str = "") -> SimVm:
    return SimVm(VM, vcpus=1, mem_bytes=GIB, state=state, incoming=incoming, uuid=uuid)


def on(a: SimVm | None = None, b: SimVm | None = None) -> Callable[[ScriptedHypervisor], None]:
    def setup(hv: ScriptedHypervisor) -> None:
        if a is not None:
            hv.add_vm("a", a)
        if b is not None:
            hv.add_vm("b", b)

    return setup


def orphaned_job(
    script: Script, live: bool = True, suspended: bool = False
) -> Callable[[ScriptedHypervisor], None]:
    """The state a client that crashed mid-migration leaves: the job goes on in the
    source, the destination holds the incoming copy, paused (``suspended``: the client
    had suspended the guest to complete it)."""

    def setup(hv: ScriptedHypervisor) -> None:
        hv.add_vm("a", guest())
        hv.start_job(replace(REQ, live=live), script)
        if suspended:
            hv.suspend("a", VM)

    return setup


def incoming_without_source(hv: ScriptedHypervisor) -> None:
    """The source already handed over and undefined its copy; the destination is still
    finishing the incoming job (paused)."""
    orphaned_job(Script((*stalling(), Stall())))(hv)
    del hv.hosts["a"].vms[VM]


STALLED = Script((*stalling(), Stall()))


@dataclass(frozen=True)
class Row:
    name: str
    setup: Callable[[ScriptedHypervisor], None]
    outcome: ReconcileOutcome
    where: dict[str, str]  # ground truth afterwards: host -> state
    actions: tuple[str, ...] = ()  # parts of the actions, in order
    vm_state: str = "running"  # the guest's state when the move began (journal)
    invariant: bool = True
    age_s: float = 0.0  # how old the entry is


ROWS = [
    Row(
        "running/running: the destination copy goes",
        on(guest(), guest()),
        SETTLED,
        {"a": "running"},
        ("destroyed the running copy on b",),
    ),
    Row(
        "running/paused leftover incoming domain: destroyed",
        on(guest(), guest("paused", incoming=True)),
        SETTLED,
        {"a": "running"},
        ("destroyed the paused copy on b",),
    ),
    Row(
        "paused/running: the destination finished, the source copy goes",
        on(guest("paused"), guest()),
        SETTLED,
        {"b": "running"},
        ("destroyed the paused copy on a",),
    ),
    Row(
        "paused/paused: destination destroyed, source resumed",
        on(guest("paused"), guest("paused")),
        SETTLED,
        {"a": "running"},
        ("destroyed the paused copy on b", "resumed on a"),
    ),
    Row(
        "paused/absent: we left it paused, resumed",
        on(guest("paused")),
        SETTLED,
        {"a": "running"},
        ("resumed on a",),
    ),
    Row(
        "paused/absent, paused before we started: left paused",
        on(guest("paused")),
        CLEANED,
        {"a": "paused"},
        vm_state="paused",
    ),
    Row(
        "paused/absent, an entry over an hour old: never resumed",
        on(guest("paused")),
        CLEANED,
        {"a": "paused"},
        age_s=MAX_RESUME_AGE_S + 60.0,
        invariant=False,  # paused by us long ago, perhaps by an operator since: left so
    ),
    Row(
        "absent/paused, no job: resumed on the destination",
        on(None, guest("paused")),
        SETTLED,
        {"b": "running"},
        ("resumed on b",),
    ),
    Row(
        "absent/paused incoming, its job still running: left alone, entry open",
        incoming_without_source,
        UNKNOWN,
        {"b": INCOMING},
        invariant=False,  # nobody may touch it until the job ends
    ),
    Row(
        "orphaned job still running: aborted, the source keeps it",
        orphaned_job(STALLED),
        SETTLED,
        {"a": "running"},
        ("aborted the orphaned migration job of g on a",),
    ),
    Row(
        "orphaned job after our suspend: aborted, resumed on the source",
        orphaned_job(Script((*stalling(), Stall()), on_suspend="pause"), suspended=True),
        SETTLED,
        {"a": "running"},
        ("aborted the orphaned migration job of g on a", "resumed on a"),
    ),
    Row(
        "orphaned cold job: aborted, libvirt resumes what it paused",
        orphaned_job(STALLED, live=False),
        SETTLED,
        {"a": "running"},
        ("aborted the orphaned migration job of g on a",),
    ),
    Row(
        "orphaned job completing, abort refused: it ends on the destination",
        orphaned_job(Script((*stalling(), Stall()), on_abort="complete")),
        CLEANED,
        {"b": "running"},
    ),
    Row("running/absent: nothing to do", on(guest()), CLEANED, {"a": "running"}),
    Row("absent/running: nothing to do", on(None, guest()), CLEANED, {"b": "running"}),
    Row(
        "a same-named other guest on the destination is left alone",
        on(guest(), guest(uuid="someone-else")),
        SETTLED,  # the note counts as an action
        {"a": "running", "b": "running"},
        ("left g on b alone",),
        invariant=False,  # two guests of one name, by the setup
    ),
    Row(
        "source does not answer: entry stays open",
        lambda hv: on(guest(), guest("paused"))(hv) or hv.partition("a"),
        UNKNOWN,
        {"a": "running", "b": "paused"},
        invariant=False,
    ),
]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path)
    yield j
    j.close()


def cluster() -> ScriptedHypervisor:
    return ScriptedHypervisor(
        [SimHost(h, cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB) for h in ("a", "b", "c")]
    )


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_reconcile(row: Row, journal: Journal) -> None:
    hv = cluster()
    try:
        row.setup(hv)
        entry = journal.begin(VM, VM, "a", "b", row.vm_state, migration_id="m-1")
        journal.phase(entry, "live")
        (rec,) = reconcile(hv, journal, wait_s=WAIT_S, now_s=time.time() + row.age_s)

        assert isinstance(rec.outcome, ReconcileOutcome)
        assert rec.outcome is row.outcome, rec
        assert (rec.entry_id, rec.migration_id) == (entry, "m-1")
        assert len(rec.actions) == len(row.actions), rec.actions
        for done, want in zip(rec.actions, row.actions, strict=True):
            assert want in done, rec.actions
        (e,) = journal.entries()
        if row.outcome is UNKNOWN:
            assert e.outcome is None and journal.reconciliation_count() == 0
            assert "not settled" in rec.detail
        else:
            assert e.outcome == "settled" and journal.reconciliation_count() == 1
            assert rec.detail in e.detail
        if not rec.actions:
            assert [c.op for c in hv.calls if c.op in ACTIONS and c.op != "abort_job"] == []
        assert hv.placement(VM) == row.where
        if row.invariant:
            assert hv.guest_problems(VM, paused_before=row.vm_state == "paused") == []
    finally:
        hv.release_all()


def test_an_entry_in_flight_or_of_a_live_process_is_not_touched(journal: Journal) -> None:
    hv = cluster()
    on(guest("paused"))(hv)
    journal.begin(VM, VM, "a", "b", "running", migration_id="m-1")
    assert reconcile(hv, journal, in_flight={"m-1"}) == []
    assert hv.calls == [] and journal.open_entries()


def test_an_open_entry_is_settled_once_its_incoming_job_ended(journal: Journal) -> None:
    hv = cluster()
    incoming_without_source(hv)
    journal.begin(VM, VM, "a", "b", "running", migration_id="m-1")
    (first,) = reconcile(hv, journal, wait_s=WAIT_S)
    assert first.outcome is UNKNOWN and hv.placement(VM) == {"b": INCOMING}
    hv.release(VM, complete=True)  # the destination finished the incoming job
    (second,) = reconcile(hv, journal, wait_s=WAIT_S)
    assert second.outcome is CLEANED and journal.open_entries() == []
    assert hv.placement(VM) == {"b": "running"} and hv.guest_problems(VM) == []
