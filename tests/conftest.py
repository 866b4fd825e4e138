"""Shared test fixtures.

Lab fixtures (real multi-host libvirt clusters, see balancerd/lab):

    pytestmark = pytest.mark.lab

    def test_something(lab_factory):
        make = lab_factory("bx1", "10.77.5")          # YOUR lab name and subnet
        lab = make(LabSpec(hosts=2, guests=(GuestSpec("g1", "host1"),)))
        lab.wait_booted("g1")
        ...                                           # torn down (and checked) at the end

``lab_factory`` is function scoped; ``lab_factory_module`` is the same per test module (one
lab shared by the module's tests: ``lab up`` costs ~5-10 s). ``make`` skips the test only
when the machine cannot run a lab (not root / packages missing, see ``require_lab``); any
other failure of the lab fails the test. Leftovers of an earlier crashed run with the same
name are removed before ``up``. Each lab lives in BALANCERD_TEST_LAB_BASE/NAME
(default /tmp/balancerd-test-labs/NAME).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balancerd.lab.cluster import Lab, LabSpec
from balancerd.lab.system import missing_requirements

TEST_LAB_BASE = Path(os.environ.get("BALANCERD_TEST_LAB_BASE", "/tmp/balancerd-test-labs"))

LabMaker = Callable[[LabSpec], Lab]


def require_lab() -> None:
    """Skip the calling test, with the reason, when this machine cannot run a lab."""
    missing = missing_requirements()
    if missing:
        pytest.skip("the lab needs: " + "; ".join(missing))


class LabFactory:
    """Makes labs by name and subnet; ``teardown`` brings every one of them down."""

    def __init__(self) -> None:
        self.labs: list[Lab] = []

    def __call__(self, name: str, subnet: str) -> LabMaker:
        def make(spec: LabSpec) -> Lab:
            require_lab()
            root = TEST_LAB_BASE / name
            if (root / "lab.json").exists():
                Lab(root).down()  # an earlier run crashed before its teardown
            lab = Lab(root, name, subnet)
            if lab.leftovers():
                lab.down()  # an earlier run crashed before its teardown
            self.labs.append(lab)
            lab.up(spec)
            return lab

        return make

    def teardown(self) -> None:
        errors = []
        for lab in reversed(self.labs):
            try:
                lab.down()
            except Exception as exc:
                errors.append(f"{lab.name}: {exc}")
        self.labs.clear()
        if errors:
            pytest.fail("lab teardown failed: " + "; ".join(errors))


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    factory = LabFactory()
    yield factory
    factory.teardown()


@pytest.fixture(scope="module")
def lab_factory_module() -> Iterator[LabFactory]:
    factory = LabFactory()
    yield factory
    factory.teardown()
