"""`balancerd plan` text output: the plan's notes are shown, not only in --json."""

from __future__ import annotations

from balancerd.commands.plan import render_plan


def test_notes_are_printed() -> None:
    out = {
        "policy": "p",
        "objective": "balance",
        "mode": "automatic",
        "hosts_before": {"h1": {"cpu": 0.9, "mem": 0.5}},
        "hosts_after": {"h1": {"cpu": 0.9, "mem": 0.5}},
        "moves": [],
        "reason": "nothing can be improved this cycle",
        "solver": {
            "backend": "cbc",
            "status": "optimal",
            "seconds": 0.1,
            "objective": 0.9,
            "bound": 0.9,
            "gap": 0.0,
        },
        "notes": ["db1 backs off for 120 s (failure 1): cache mode", "big fits on no host"],
    }
    text = render_plan(out)
    assert "note: db1 backs off for 120 s (failure 1): cache mode" in text
    assert text.rstrip().endswith("note: big fits on no host")
