"""History, reasons, approvals and the operator state as pure values and files: per-move
benefit and cost, the SQLite history and its bounds, ``explain``'s words, the checks of a
saved plan against a newer snapshot, and drains/pause on disk."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from balancerd.commands.history import parse_duration
from balancerd.decide import decide
from balancerd.errors import ConfigError
from balancerd.execute.move import MoveResult
from balancerd.history import History, build_record, explain_lines
from balancerd.model import Host, Move, Placement, Plan, Snapshot, SolverReport, Vm
from balancerd.operator import OPERATOR_FILE, OperatorState, OperatorStateError
from balancerd.outcomes import MigrationMode, MoveOutcome, SkipKind
from balancerd.policy.model import Constraints, Hysteresis, Migration, Policy
from balancerd.rationale import explain_moves, holds, predicted_downtime
from balancerd.saved_plan import (
    check_steps,
    merge_results,
    parse_plan,
    plan_document,
    valid_moves,
)
from balancerd.units import GIB, MIB

POLICY = Policy(name="t", hysteresis=Hysteresis(min_improvement=0.01, cooldown_s=600.0))
NOW = 1_800_000_000.0  # a fixed wall clock


def snap(
    placement: dict[str, str], busy: dict[str, float] | None = None, **mem_gib: int
) -> Snapshot:
    hosts = tuple(
        Host(h, f"qemu+tcp://{h}/system", True, cpus=4, mem_bytes=16 * GIB, mem_free_bytes=16 * GIB)
        for h in ("h1", "h2", "h3")
    )
    vms = tuple(
        Vm(
            name,
            f"u-{name}",
            host,
            "running",
            2,
            mem_gib.get(name, 1) * GIB,
            (busy or {}).get(name, 0.75),
        )
        for name, host in sorted(placement.items())
    )
    return Snapshot(0.0, hosts, vms)


ALL_ON_H1 = {f"vm{i}": "h1" for i in range(4)}


# --- reasons, benefit, cost -----------------------------------------------------------------


def test_benefits_chain_in_plan_order_from_the_plan_score_to_its_target() -> None:
    s = snap(ALL_ON_H1)
    plan = decide(s, POLICY)
    assert len(plan.moves) >= 2
    whys = explain_moves(s, POLICY, plan)
    assert [(w.vm, w.src, w.dst) for w in whys] == [(m.vm, m.src, m.dst) for m in plan.moves]
    assert whys[0].score_before == pytest.approx(plan.score_before)
    for a, b in itertools.pairwise(whys):
        assert b.score_before == pytest.approx(a.score_after)
    assert whys[-1].score_after == pytest.approx(plan.score_after)
    total = sum(w.benefit or 0.0 for w in whys)
    assert total == pytest.approx(plan.score_before - plan.score_after)
    first = whys[0]
    assert first.why == "h1 was at 150 % CPU and 25 % memory (the highest)"
    assert first.src_cpu_util == pytest.approx(1.5)
    assert first.cost_text() == "1.00 GiB, ~11 s, downtime <= 300 ms"


def test_a_drained_host_and_the_policy_maintenance_are_told_apart() -> None:
    s = snap({"a": "h1", "b": "h2"})
    policy = replace(POLICY, constraints=Constraints(maintenance=("h1", "h2")))
    plan = decide(s, policy)
    whys = {w.vm: w.why for w in explain_moves(s, policy, plan, drained=("h1",))}
    assert whys == {
        "a": "h1 is drained by the operator",
        "b": "h2 is in maintenance (policy t)",
    }


def test_predicted_downtime_follows_the_dirty_rate_and_the_fallback() -> None:
    mig = Migration(bandwidth_mib_s=100, max_downtime_ms=300, downtime_steps_ms=(500, 2000))
    quiet = Vm("q", "u", "h1", "running", 1, GIB, 0.1, dirty_rate_bytes_s=10 * MIB)
    slow = replace(quiet, name="s", dirty_rate_bytes_s=70 * MIB)  # converges, many passes
    dirty = replace(quiet, name="d", dirty_rate_bytes_s=150 * MIB)
    assert predicted_downtime(quiet, mig) == (300.0, "live")
    assert predicted_downtime(slow, mig) == (300.0, "live")
    ms, note = predicted_downtime(dirty, mig)
    # paused while the last pass (what 150 MiB/s dirties in one, capped by its memory) goes
    assert ms == pytest.approx(GIB / (100 * MIB) * 1000) and note.endswith("pause-and-complete")
    no_pause = replace(mig, no_pause_vms=("d",))
    assert predicted_downtime(dirty, no_pause)[1].endswith("ends by abort")


def test_holds_name_the_cooldown_and_the_solver_notes() -> None:
    s = snap({"a": "h1", "b": "h1", "c": "h2"})
    out = holds(
        s,
        POLICY,
        notes=["guest c has no usable host (pinned to ['h9']): left on h2", "unrelated note"],
        last_moved_s={"a": 900.0, "b": 100.0},
        now_s=1000.0,
    )
    assert out == {
        "a": "cooldown: moved 100 s ago (cooldown 10 min)",
        "c": "guest c has no usable host (pinned to ['h9']): left on h2",
    }


# --- the history store ------------------------------------------------------------------------


def record_for(
    at_s: float, plan: Plan, s: Snapshot, results: list[MoveResult], **kw: object
) -> object:
    return build_record(
        at_s=at_s,
        kind="cycle",
        plan=plan,
        policy_mode="automatic",
        planning=s,
        whys=explain_moves(s, POLICY, plan),
        results=results,
        **kw,  # type: ignore[arg-type]
    )


def migrated(m: Move, mid: str) -> MoveResult:
    return MoveResult(
        m.vm,
        m.src,
        m.dst,
        MoveOutcome.MIGRATED,
        MigrationMode.LIVE,
        "",
        7.2,
        downtime_ms=41.0,
        migration_id=mid,
    )


def test_history_records_moves_and_explain_tells_the_story(tmp_path: Path) -> None:
    store = History(tmp_path, clock=lambda: NOW)
    s = snap(ALL_ON_H1)
    plan = decide(s, POLICY)
    m0 = plan.moves[0]
    results = [migrated(m, f"id{i}") for i, m in enumerate(plan.moves)]
    store.add(record_for(NOW - 600, plan, s, results))  # type: ignore[arg-type]
    # Two cycles later the guest is in its cooldown; a third cycle plans nothing.
    after = snap({**ALL_ON_H1, **{m.vm: m.dst for m in plan.moves}})
    quiet = decide(after, POLICY)
    for at in (NOW - 300, NOW - 240):
        cooldown = {m0.vm: "cooldown: moved 5 min ago (cooldown 10 min)"}
        store.add(record_for(at, quiet, after, [], holds=cooldown))  # type: ignore[arg-type]
    store.add(record_for(NOW - 60, quiet, after, []))  # type: ignore[arg-type]

    cycles = store.cycles()
    assert [c["at_s"] for c in cycles] == [NOW - 60, NOW - 240, NOW - 300, NOW - 600]
    first = cycles[-1]
    assert first["migrated"] == len(plan.moves) and first["moves"][0]["migration_id"] == "id0"
    assert first["moves"][0]["benefit"] == pytest.approx(0.375)
    assert store.cycles(vm=m0.vm, since_s=NOW - 400)[0]["holds"] == cooldown
    assert [len(c["moves"]) for c in store.cycles(vm=m0.vm)] == [0, 0, 1]

    doc = store.explain(m0.vm)
    lines = explain_lines(doc, NOW)
    assert lines[0].startswith("not moved in the 1 cycle(s) since ")
    assert "no moves:" in lines[0]
    assert lines[1].startswith("not moved at ") and "(2 cycles): cooldown: moved" in lines[1]
    assert (
        lines[2].startswith("moved at ") and f"from h1 to {m0.dst}: h1 was at 150 % CPU" in lines[2]
    )
    assert "the move lowered the highest host from 1.50 to 1.12 at a cost of 1.00 GiB" in lines[2]
    assert "(live, 7.2 s, downtime 41 ms, id id0)" in lines[2]
    assert explain_lines(store.explain("nobody"), NOW) == [
        "no decision about nobody in the history (4 cycles recorded)"
    ]
    stayed = next(vm for vm in sorted(ALL_ON_H1) if vm not in {m.vm for m in plan.moves})
    known = {**store.explain(stayed), "now_on": "h1"}  # the daemon knows where it is
    assert explain_lines(known, NOW) == [
        "on h1, never planned in the 4 cycle(s) recorded; latest: no moves: target equals "
        "the current placement"
    ]
    store.close()


def test_history_is_bounded_by_age_and_by_size(tmp_path: Path) -> None:
    now = [NOW]
    store = History(tmp_path, max_age_s=3600.0, clock=lambda: now[0])
    s = snap(ALL_ON_H1)
    plan = decide(s, POLICY)
    store.add(record_for(NOW - 7200, plan, s, []))  # type: ignore[arg-type]
    store.add(record_for(NOW - 60, plan, s, []))  # type: ignore[arg-type]
    assert [c["at_s"] for c in store.cycles()] == [NOW - 60]  # the old one went
    store.close()

    small = History(tmp_path / "small.sqlite", max_bytes=256 * 1024, clock=lambda: NOW)
    notes = tuple(f"note {i} " + "x" * 400 for i in range(20))
    big = replace(plan, notes=notes)
    for i in range(300):
        small.add(record_for(NOW - 300 + i, big, s, []))  # type: ignore[arg-type]
    kept = small.cycles(limit=1000)
    assert 0 < len(kept) < 300
    assert kept[0]["at_s"] == NOW - 300 + 299  # the newest are kept
    assert small._used_bytes() <= 256 * 1024
    small.close()


def test_an_unreadable_history_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    store = History(path)
    assert store.cycles() == []
    assert list(tmp_path.glob("history.sqlite.corrupt-*"))
    store.close()


# --- approving a saved plan -----------------------------------------------------------------


def saved(plan: Plan, s: Snapshot, policy: Policy = POLICY) -> object:
    doc = plan_document(plan, s, policy, explain_moves(s, policy, plan), created_at_s=NOW)
    return parse_plan(json.loads(json.dumps(doc)), "test")


def hand_plan(*moves: Move) -> Plan:
    return Plan(
        "t",
        "balance",
        tuple(moves),
        Placement({}),
        Placement({}),
        SolverReport("none", "not-run", 0.0, None, None, None),
    )


def test_each_stale_step_is_skipped_with_its_reason() -> None:
    s = snap({"a": "h1", "b": "h1", "c": "h1", "d": "h1", "e": "h2"})
    plan = hand_plan(
        Move("a", "h1", "h2", GIB, 5.0),  # moved by hand since
        Move("b", "h1", "h2", GIB, 5.0),  # recreated since
        Move("c", "h1", "h3", GIB, 5.0),  # h3 down now
        Move("d", "h1", "h2", GIB, 5.0),  # still valid
        Move("e", "h2", "h1", GIB, 5.0, wave=1),  # h1 in maintenance now
    )
    sp = saved(plan, s)
    now = snap({"a": "h3", "b": "h1", "c": "h1", "d": "h1", "e": "h2"})
    vms = tuple(replace(v, uuid="u-new") if v.name == "b" else v for v in now.vms)
    hosts = tuple(
        replace(h, up=False, error="connection refused") if h.name == "h3" else h for h in now.hosts
    )
    now = replace(now, vms=vms, hosts=hosts)
    policy = replace(POLICY, constraints=Constraints(maintenance=("h1",)))
    checks = check_steps(sp, now, policy)  # type: ignore[arg-type]
    got = {c.move.vm: (c.kind, c.reason) for c in checks}
    assert got["a"] == (
        SkipKind.GONE,
        "a is on h3 now, not on h1 where the plan found it (moved since)",
    )
    assert got["b"] == (SkipKind.GONE, "b was recreated since the plan (UUID u-new)")
    assert got["c"] == (SkipKind.HOST_DOWN, "h3 does not answer (connection refused)")
    assert got["d"] == (None, "")
    assert got["e"] == (SkipKind.STALE, "h1 is in maintenance now")
    assert [m.vm for m in valid_moves(checks, now)] == ["d"]
    done = MoveResult("d", "h1", "h2", MoveOutcome.MIGRATED, MigrationMode.LIVE, "", 3.0)
    results = merge_results(checks, [done])
    assert [r.vm for r in results] == ["a", "b", "c", "d", "e"]
    assert results[3] is done
    assert results[0].outcome is MoveOutcome.SKIPPED and results[0].skip_kind is SkipKind.GONE
    assert results[0].reason.startswith("stale step: a is on h3 now")


def test_a_step_counts_on_room_only_an_earlier_valid_step_frees() -> None:
    """h2 is nearly full; the plan first moved big off h2, then x onto it. When big's step
    is stale (its destination is in maintenance now), x's step has no room either."""
    s = snap({"big": "h2", "x": "h1"}, big=13, x=2)
    plan = hand_plan(Move("big", "h2", "h3", 13 * GIB, 5.0), Move("x", "h1", "h2", 2 * GIB, 5.0, 1))
    sp = saved(plan, s)
    ok = check_steps(sp, s, POLICY)  # type: ignore[arg-type]
    assert [c.ok for c in ok] == [True, True]
    policy = replace(POLICY, constraints=Constraints(maintenance=("h3",)))
    checks = check_steps(sp, s, policy)  # type: ignore[arg-type]
    assert checks[0].kind is SkipKind.STALE and checks[0].reason == "h3 is in maintenance now"
    assert checks[1].kind is SkipKind.STALE
    assert checks[1].reason.startswith("h2 has no room for it now: memory 15.00 of 14.40 GiB")


def test_a_staged_guest_moves_twice_and_its_second_step_follows_the_first() -> None:
    s = snap({"a": "h1"})
    plan = hand_plan(Move("a", "h1", "h3", GIB, 5.0), Move("a", "h3", "h2", GIB, 5.0, wave=1))
    sp = saved(plan, s)
    assert [c.ok for c in check_steps(sp, s, POLICY)] == [True, True]  # type: ignore[arg-type]
    gone = snap({"a": "h2"})
    checks = check_steps(sp, gone, POLICY)  # type: ignore[arg-type]
    assert checks[0].kind is SkipKind.GONE
    assert (checks[1].kind, checks[1].reason) == (
        SkipKind.DEPENDENCY,
        "the earlier step of a was skipped",
    )


def test_a_file_that_is_not_a_saved_plan_names_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        parse_plan({"kind": "other", "version": 9, "moves": [{"vm": "a"}, 3]}, "f.json")
    assert err.value.problems == [
        "f.json: kind: expected 'balancerd-plan' (a file written by plan --save)",
        "f.json: version: expected 1, got 9",
        "f.json: moves[0]: missing or empty from, to",
        "f.json: moves[1]: expected an object",
    ]


# --- the operator state -------------------------------------------------------------------


def test_drains_and_pause_are_on_disk_and_merge_into_maintenance(tmp_path: Path) -> None:
    op = OperatorState.load(tmp_path)
    assert op.drain("h2", "alice (uid 1000)", "firmware") is True
    assert op.drain("h2", "bob (uid 1001)") is False  # the first mark is kept
    assert op.pause("alice (uid 1000)", "incident") is None
    again = OperatorState.load(tmp_path)
    assert again.drained() == ("h2",)
    assert again.drains()["h2"].by == "alice (uid 1000)"
    paused = again.paused()
    assert paused is not None and paused.reason == "incident"
    policy = replace(POLICY, constraints=Constraints(maintenance=("h1",)))
    assert again.apply_to(policy).constraints.maintenance == ("h1", "h2")
    assert again.apply_to(POLICY).constraints.maintenance == ("h2",)
    assert again.undrain("h2") is not None and again.undrain("h2") is None
    assert again.resume() is not None
    assert OperatorState.load(tmp_path).to_json() == {"drains": {}, "paused": None}


def test_an_unreadable_operator_file_stops_instead_of_forgetting_drains(tmp_path: Path) -> None:
    (tmp_path / OPERATOR_FILE).write_text("{not json")
    with pytest.raises(OperatorStateError, match="is not a balancerd operator state file"):
        OperatorState.load(tmp_path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0), ("45", 45.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_words() -> None:
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration("yesterday")


def test_history_and_explain_read_the_file_when_no_daemon_answers(tmp_path: Path) -> None:
    """The CLI falls back to STATE_DIR/history.sqlite of --config (read-only)."""
    import subprocess
    import sys

    state = tmp_path / "state"
    store = History(state)
    s = snap(ALL_ON_H1)
    plan = decide(s, POLICY)
    store.add(record_for(NOW, plan, s, [migrated(m, f"id{i}") for i, m in enumerate(plan.moves)]))  # type: ignore[arg-type]
    store.close()
    (tmp_path / "policy.yaml").write_text(
        "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: t}\nspec: {objective: balance}\n"
    )
    config = tmp_path / "balancerd.yaml"
    config.write_text(
        "hosts:\n  - {name: h1, uri: 'qemu+tcp://10.0.0.1/system'}\n"
        f"policy: policy.yaml\nstate_dir: {state}\n"
    )
    repo = Path(__file__).resolve().parent.parent
    common = ["--config", str(config), "--socket", str(tmp_path / "none.sock")]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "balancerd.cli", *args, *common],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        )

    done = cli("history", "--json")
    assert done.returncode == 0, done.stderr
    (cycle,) = json.loads(done.stdout)
    assert [m["migration_id"] for m in cycle["moves"]] == [f"id{i}" for i in range(len(plan.moves))]
    vm = plan.moves[0].vm
    done = cli("explain", vm)
    assert done.returncode == 0, done.stderr
    assert f"from h1 to {plan.moves[0].dst}: h1 was at 150 % CPU" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "balancerd.cli", "history", "--socket", str(tmp_path / "x.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1
    assert "give --config to read its history file instead" in done.stderr
