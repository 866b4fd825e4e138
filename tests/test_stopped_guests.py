"""Defined-but-stopped guests (issue 12): a drain moves them cold (their definition only)
in a wave after the running guests, the move ends with the guest defined on exactly one
host (also after a move that stopped half way), and power-save does not switch off a host
that holds them unless the policy says so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from balancerd.commands.plan import plan_json, render_plan
from balancerd.decide import decide
from balancerd.errors import HypervisorError
from balancerd.execute.journal import Journal
from balancerd.execute.move import Engine, run_move
from balancerd.execute.reconcile import reconcile
from balancerd.hypervisor.base import DiskFacts, MigrationRequest
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.model import Host, Move, Plan, Snapshot, SolverReport, Vm
from balancerd.outcomes import MigrationMode, MoveOutcome, SkipKind
from balancerd.policy.load import load_policy_text
from balancerd.policy.model import Constraints, Hysteresis, Migration, Policy, Power
from balancerd.power import decide_power
from balancerd.power.manager import HostPower
from balancerd.rationale import explain_moves
from balancerd.saved_plan import check_steps, parse_plan, plan_document, valid_moves

GIB = 1024**3
IMG = "/srv/shared/off.qcow2"


def host(name: str, mem_gib: int = 32) -> Host:
    return Host(name=name, uri=f"test:///{name}", up=True, cpus=8, mem_bytes=mem_gib * GIB)


def running(name: str, on: str) -> Vm:
    return Vm(name, name, on, "running", 2, 4 * GIB, 0.25)


def stopped(name: str, on: str, mem_gib: int = 4) -> Vm:
    return Vm(name, name, on, "shutoff", 2, mem_gib * GIB, 0.0)


def policy(**constraints: object) -> Policy:
    return Policy(
        name="t",
        hysteresis=Hysteresis(min_improvement=0.05, cooldown_s=0.0),
        constraints=Constraints(**constraints),  # type: ignore[arg-type]
    )


def test_a_drain_moves_stopped_guests_cold_after_the_running_ones() -> None:
    s = Snapshot(
        0.0,
        (host("a"), host("b"), host("c", mem_gib=64)),
        (running("r", "a"), running("x", "c")),
        stopped=(stopped("off1", "a", 8), stopped("off2", "a", 2), stopped("stay", "b")),
    )
    plan = decide(s, policy(maintenance=("a",)))
    live = [m for m in plan.moves if not m.offline]
    cold = {m.vm: m for m in plan.moves if m.offline}
    assert [m.vm for m in live] == ["r"]
    assert set(cold) == {"off1", "off2"}  # "stay" is on a host that is not drained
    assert all(m.src == "a" and m.dst != "a" and m.wave > live[0].wave for m in cold.values())
    # the largest goes where most memory is left (c: 64 GiB), the next by what is left
    assert cold["off1"].dst == "c"
    assert not any(m.offline for m in decide(s, policy()).moves)  # no drain: nothing cold


def test_a_pin_is_honoured_and_no_usable_host_is_named() -> None:
    s = Snapshot(0.0, (host("a"), host("b"), host("c")), (), stopped=(stopped("off", "a"),))
    (m,) = decide(s, policy(maintenance=("a",), pin={"off": ("a", "b")})).moves
    assert (m.vm, m.dst, m.offline) == ("off", "b", True)
    plan = decide(s, policy(maintenance=("a",), pin={"off": ("a",)}))
    assert not plan.moves
    assert "stopped guest off must leave host a: no usable host" in plan.notes


def sim(**vm: object) -> SimHypervisor:
    hv = SimHypervisor([SimHost(h, cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB) for h in "abc"])
    disks = (DiskFacts("vda", IMG, "none", "disk", False),)
    hv.add_vm("a", SimVm("off", 1, GIB, state="shutoff", disks=disks, **vm))  # type: ignore[arg-type]
    return hv


def engine(hv: SimHypervisor, tmp_path: Path) -> Engine:
    return Engine(hv, Migration(), journal=Journal(tmp_path / "state"), sample_interval_s=0.01)


def where(hv: SimHypervisor, vm: str = "off") -> dict[str, str]:
    return {h: s for h in hv.host_names() if (s := hv.domain_state(h, vm)) is not None}


def test_a_stopped_guest_moves_offline_and_ends_defined_on_the_destination_only(
    tmp_path: Path,
) -> None:
    hv = sim()
    e = engine(hv, tmp_path)
    r = run_move(e, Move("off", "a", "b", 0, 1.0, offline=True))
    assert (r.outcome, r.mode) == (MoveOutcome.MIGRATED, MigrationMode.DEFINITION), r.reason
    assert where(hv) == {"b": "shutoff"}
    assert e.journal is not None and not e.journal.open_entries()


def test_a_stopped_guest_move_is_refused_when_the_destination_lacks_its_disk(
    tmp_path: Path,
) -> None:
    hv = sim()
    hv.hosts["b"].visible_paths = frozenset()
    r = run_move(engine(hv, tmp_path), Move("off", "a", "b", 0, 1.0, offline=True))
    assert (r.outcome, r.skip_kind) == (MoveOutcome.SKIPPED, SkipKind.DISK_MISSING)
    assert f"disk {IMG} not found on b" in r.reason
    assert where(hv) == {"a": "shutoff"}


def test_a_guest_started_since_the_plan_is_not_moved_offline(tmp_path: Path) -> None:
    hv = sim()
    hv.hosts["a"].vms["off"].state = "running"
    r = run_move(engine(hv, tmp_path), Move("off", "a", "b", 0, 1.0, offline=True))
    assert (r.outcome, r.skip_kind) == (MoveOutcome.SKIPPED, SkipKind.STALE)
    assert where(hv) == {"a": "running"}


class HalfDone(SimHypervisor):
    """The definition reached the destination, then the client lost the source: the
    source still has its copy (the undefine never ran)."""

    def migrate(self, req: MigrationRequest) -> None:
        vm = self.hosts[req.src].vms[req.vm]
        self.hosts[req.dst].vms[req.vm] = replace(vm)
        raise HypervisorError(req.src, "offline migration", "client socket is closed")


def test_a_half_done_move_is_settled_to_one_definition(tmp_path: Path) -> None:
    hv = HalfDone([SimHost(h, cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB) for h in "ab"])
    hv.add_vm("a", SimVm("off", 1, GIB, state="shutoff"))
    r = run_move(engine(hv, tmp_path), Move("off", "a", "b", 0, 1.0, offline=True))
    assert r.outcome is MoveOutcome.FAILED
    assert "client socket is closed" in r.reason
    assert "undefined the shut-off copy on a" in r.reason
    assert where(hv) == {"b": "shutoff"}


def test_reconcile_after_a_crash_leaves_one_definition(tmp_path: Path) -> None:
    """The daemon died between the intent and the end of a stopped guest's move."""
    hv = sim()
    hv.hosts["b"].vms["off"] = replace(hv.hosts["a"].vms["off"])  # defined on both now
    journal = Journal(tmp_path / "state")
    journal.begin("off", "off", "a", "b", "shutoff", migration_id="m-1")
    (r,) = reconcile(hv, journal, in_flight=(), now_s=None)
    assert r.settled and r.actions == ("undefined the shut-off copy on a",)
    assert "off is defined on b, not running" in r.detail
    assert where(hv) == {"b": "shutoff"}
    assert not journal.open_entries()


def power_plan(snap: Snapshot, off: tuple[str, ...]) -> Plan:
    report = SolverReport("none", "not-run", 0.0, None, None, None)
    placement = snap.placement()
    return Plan("p", "power-save", (), placement, placement, report, power_off=off)


@pytest.mark.parametrize(("allowed", "want_off"), [(False, ()), (True, ("b",))])
def test_power_save_keeps_a_host_with_stopped_guests_on_unless_allowed(
    allowed: bool, want_off: tuple[str, ...]
) -> None:
    snap = Snapshot(
        100.0, (host("a"), host("b")), (running("r", "a"),), stopped=(stopped("off", "b"),)
    )
    power = Power(min_active_hosts=1, grace_period_s=0.0, allow_off_with_stopped_guests=allowed)
    history = {"b": HostPower(on=True, empty_since_s=0.0)}
    d = decide_power(power_plan(snap, ("b",)), snap, power, history, 100.0)
    assert d.power_off == want_off
    if not allowed:
        assert "holds stopped guest(s) off" in d.held["b"], d.held


def test_the_policy_key_is_read_and_validated() -> None:
    doc = """apiVersion: balancerd/v1
kind: Policy
metadata: {name: p}
spec:
  objective: power-save
  power:
    allow_off_with_stopped_guests: {value}
"""
    assert load_policy_text(
        doc.replace("{value}", "true"), "p.yaml"
    ).power.allow_off_with_stopped_guests
    assert not load_policy_text(
        doc.replace("{value}", "false"), "p.yaml"
    ).power.allow_off_with_stopped_guests
    with pytest.raises(Exception, match=r"p\.yaml:7.*allow_off_with_stopped_guests"):
        load_policy_text(doc.replace("{value}", "maybe"), "p.yaml")


def test_plan_output_and_a_saved_plan_carry_the_cold_move() -> None:
    s = Snapshot(0.0, (host("a"), host("b")), (running("r", "a"),), stopped=(stopped("off", "a"),))
    pol = policy(maintenance=("a",))
    plan = decide(s, pol)
    whys = explain_moves(s, pol, plan)
    text = render_plan(plan_json(plan, s, pol, whys))
    assert "off a -> b (~1.0 s) (stopped guest, cold)" in text
    assert "why: stopped guest: a is in maintenance; only its definition moves" in text
    saved = parse_plan(plan_document(plan, s, pol, whys, created_at_s=1.0), "p.json")
    assert [(m.vm, m.offline) for m in saved.moves] == [("r", False), ("off", True)]
    checks = check_steps(saved, s, pol)
    assert all(c.ok for c in checks), [c.reason for c in checks]
    assert [m.offline for m in valid_moves(checks, s)] == [False, True]
    # started since: the saved cold step is stale
    now = replace(s, vms=(*s.vms, replace(s.stopped[0], state="running")), stopped=())
    assert [c.kind for c in check_steps(saved, now, pol)][1] is SkipKind.GONE


def test_a_stale_stopped_copy_of_a_running_guest_is_not_moved_but_named() -> None:
    s = Snapshot(
        0.0,
        (host("a"), host("b"), host("c")),
        (running("web", "b"),),
        stopped=(stopped("web", "a"),),
    )
    plan = decide(s, policy(maintenance=("a",)))
    assert not [m for m in plan.moves if m.offline]
    assert any("stopped guest web on host a is not moved" in n for n in plan.notes), plan.notes


def test_migrate_finds_a_stopped_guest_and_moves_it_cold(tmp_path: Path) -> None:
    """``balancerd migrate`` of a guest that is defined but stopped on one host: a cold
    move (its definition only), not "not running on any configured host"."""
    from balancerd.commands.migrate import find_guest
    from balancerd.errors import MigrationError
    from balancerd.execute.executor import execute

    hv = sim()
    assert find_guest(hv, "off") == ("a", True)
    (r,) = execute([Move("off", "a", "b", 0, 0.0, offline=True)], engine(hv, tmp_path))
    assert (r.outcome, r.mode) == (MoveOutcome.MIGRATED, MigrationMode.DEFINITION)
    assert where(hv) == {"b": "shutoff"}
    hv.add_vm("c", SimVm("off", 1, GIB, state="shutoff"))  # a second definition elsewhere
    with pytest.raises(MigrationError, match="defined, stopped, on b, c"):
        find_guest(hv, "off")
    with pytest.raises(MigrationError, match="not running or defined on any"):
        find_guest(hv, "nosuch")
