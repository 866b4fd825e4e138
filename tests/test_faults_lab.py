"""The fault matrix on a real lab (``pytest -m faults``): each row injects one fault into a
running balancerd at a precise moment and checks the one invariant (balancerd.lab.faults).
``scripts/fault_matrix.py`` runs the same rows and prints the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balancerd.lab.cluster import Lab, LabSpec
from balancerd.lab.faults import ROWS, run_row

pytestmark = [pytest.mark.lab, pytest.mark.faults, pytest.mark.slow]

LAB_NAME, LAB_SUBNET = "bf1", "10.77.9"


@pytest.fixture(scope="module")
def lab(lab_factory_module: Any) -> Lab:
    made: Lab = lab_factory_module(LAB_NAME, LAB_SUBNET)(LabSpec(hosts=3, guests=(), host_cpus=2))
    return made


@pytest.mark.parametrize("row", list(ROWS))
def test_fault_row_holds_the_invariant(lab: Lab, row: str, tmp_path: Path) -> None:
    result = run_row(lab, row, tmp_path)
    print(f"\n{row}: {result.behaviour} ({result.seconds:.0f} s)")
    if result.known_issue:
        # reported, not hidden: a known libvirt failure that balancerd cannot prevent
        pytest.xfail(f"{result.known_issue}: {'; '.join(result.problems)}")
    assert result.holds, "\n".join(result.problems)
