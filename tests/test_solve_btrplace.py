"""Real data: a BtrPlace TDSC'13 instance (../shared/traces/btrplace) repaired end to end —
viable end state at the per-node lower bound on moves, every plan step safe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "traces" / "btrplace"
sys.path.insert(0, str(ROOT))

from balancerd.plan import make_plan  # noqa: E402
from balancerd.solve import solve  # noqa: E402
from benchmarks.bench_btrplace import lower_bound, unsafe_steps, viable  # noqa: E402
from benchmarks.btrplace import READY, load, repair_policy  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not TRACES.is_dir(), reason=f"BtrPlace traces not found at {TRACES}")
@pytest.mark.parametrize("name", ["li-r3-c33", "nr-r3-c33"])
def test_btrplace_repair_is_viable_minimal_and_safe(name: str) -> None:
    inst = load(TRACES / f"{name}.json.gz")
    pol = repair_policy(inst, max_concurrent=200, per_host=1)
    res = solve(inst.snapshot, pol)
    plan = make_plan(
        inst.snapshot,
        pol,
        res.target,
        res.report,
        problem=res.problem,
        uncounted_sources=frozenset({READY}),
    )
    assert not any("left out" in n for n in plan.notes), plan.notes
    assert viable(inst, pol, plan.target)
    migrations = sum(m.src != READY for m in plan.moves)
    assert migrations == lower_bound(inst, pol)
    assert sum(m.src == READY for m in plan.moves) == inst.n_ready
    steps = [(m.vm, m.src, m.dst, m.wave) for m in plan.moves]
    assert unsafe_steps(inst, pol, steps) == 0
    assert (
        max(sum(1 for m in plan.moves if m.wave == w) for w in {m.wave for m in plan.moves}) <= 200
    )
