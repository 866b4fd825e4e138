"""Back-off of guests whose moves fail or are refused (pure)."""

from __future__ import annotations

from balancerd.backoff import FIRST_S, MAX_S, BackoffTable
from balancerd.execute.move import MoveResult
from balancerd.outcomes import MigrationMode, MoveOutcome, SkipKind
from balancerd.policy.model import Policy


def result(
    vm: str, outcome: MoveOutcome, kind: SkipKind | None = None, dst: str = "h2"
) -> MoveResult:
    return MoveResult(vm, "h1", dst, outcome, MigrationMode.NONE, "why", 1.0, skip_kind=kind)


def test_a_guest_that_keeps_failing_backs_off_exponentially_then_is_cleared() -> None:
    t = BackoffTable()
    t.record(result("db", MoveOutcome.FAILED), 0.0)
    guests, _ = t.active(1.0)
    assert guests["db"].until_s == FIRST_S
    t.record(result("db", MoveOutcome.FAILED), FIRST_S + 1)
    assert t.active(FIRST_S + 2)[0]["db"].until_s == FIRST_S + 1 + 2 * FIRST_S
    for i in range(20):
        t.record(result("db", MoveOutcome.FAILED), 10_000.0 * i)
    assert t.active(190_000.0)[0]["db"].until_s == 190_000.0 + MAX_S
    t.record(result("db", MoveOutcome.MIGRATED), 200_000.0)
    assert t.active(200_001.0) == ({}, {})


def test_refusals_back_off_the_guest_or_the_pair_and_orchestration_skips_do_not() -> None:
    t = BackoffTable()
    t.record(result("wb", MoveOutcome.SKIPPED, SkipKind.CACHE_MODE), 0.0)
    t.record(result("big", MoveOutcome.SKIPPED, SkipKind.NO_MEMORY, dst="h3"), 0.0)
    t.record(result("web", MoveOutcome.SKIPPED, SkipKind.FREEZE), 0.0)
    t.record(result("web", MoveOutcome.SKIPPED, SkipKind.DEPENDENCY), 0.0)
    guests, pairs = t.active(1.0)
    assert set(guests) == {"wb"}
    assert set(pairs) == {("big", "h3")}
    assert t.active(FIRST_S + 1) == ({}, {})


def test_the_policy_excludes_backed_off_guests_and_forbids_pairs() -> None:
    t = BackoffTable()
    t.record(result("wb", MoveOutcome.SKIPPED, SkipKind.CACHE_MODE), 0.0)
    t.record(result("big", MoveOutcome.SKIPPED, SkipKind.NO_MEMORY, dst="h3"), 0.0)
    policy, notes = t.apply(Policy(name="p"), 10.0)
    assert "wb" in policy.constraints.exclude_vms
    rules = [(r.vms, r.hosts, r.kind) for r in policy.constraints.host_rules]
    assert ((("big",), ("h3",), "must_not")) in rules
    assert any(n.startswith("wb backs off") for n in notes)
    assert any(n.startswith("big -> h3 backs off") for n in notes)
    assert t.apply(Policy(name="p"), FIRST_S + 1) == (Policy(name="p"), [])
