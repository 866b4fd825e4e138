"""`balancerd migrate` of a guest preflight must refuse, on the real lab (the CLI in a
subprocess, as an operator runs it). Timings are not asserted: see
benchmarks/bench_preflight.py.

Lab "bpr" on 10.77.42.0/24, two hosts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancerd.execute.preflight import STEP_SOURCE_CHECKS, STEP_SOURCE_GUEST
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec

pytestmark = pytest.mark.lab

SOURCE_ONLY = [STEP_SOURCE_GUEST, STEP_SOURCE_CHECKS]


@pytest.fixture(scope="module")
def lab(lab_factory_module: Any) -> Iterator[tuple[Lab, Path]]:
    make = lab_factory_module("bpr", "10.77.42")
    spec = LabSpec(
        hosts=2,
        guests=(GuestSpec("wb", "host1", disk="shared", disk_cache="writeback"),),
        metrics_listen="127.0.0.1:9292",
    )
    lab = make(spec)
    lab.wait_booted("wb")
    yield lab, lab.config_path


def migrate(config: Path, vm: str, host: str) -> tuple[int, dict[str, Any]]:
    argv = [sys.executable, "-m", "balancerd.cli", "migrate", "--config", str(config)]
    out = subprocess.run(
        [*argv, vm, host, "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.stdout, out.stderr[-3000:]
    return out.returncode, json.loads(out.stdout)[0]


def assert_refused_on_the_source(code: int, result: dict[str, Any]) -> None:
    assert code == 1
    assert (result["result"], result["skip_kind"]) == ("skipped", "cache-mode"), result
    assert "cache='writeback'" in result["reason"]
    assert list(result["preflight_s"]) == SOURCE_ONLY  # the destination was never asked


def test_migrate_of_a_writeback_guest_returns_the_refusal(lab: tuple[Lab, Path]) -> None:
    the_lab, config = lab
    code, result = migrate(config, "wb", "host2")  # first contact with both libvirtds
    assert_refused_on_the_source(code, result)
    assert the_lab.guest_host("wb") == "host1"


def test_refusal_on_the_source_does_not_wait_for_a_dead_destination(
    lab: tuple[Lab, Path],
) -> None:
    the_lab, config = lab
    the_lab.kill_libvirtd("host2")
    try:
        code, result = migrate(config, "wb", "host2")
    finally:
        the_lab.start_libvirtd("host2")
    assert_refused_on_the_source(code, result)  # not "destination host2 does not answer"
    assert the_lab.guest_host("wb") == "host1"
