"""The alerting rules shipped with the dashboard (dashboards/alerts.yml): promtool checks and
unit-tests them on fixture series, every alert has a case that fires and one that must not,
every series they read is one a daemon exports, and a real Prometheus loads and evaluates
them against a running daemon's metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prom import Prometheus, prometheus_binary
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_control import Harness

from balancerd.metrics import serve

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "dashboards" / "alerts.yml"
ALERT_TESTS = REPO / "dashboards" / "alerts.test.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent")


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rule with a changed threshold fails its unit test: the tests really check."""
    (tmp_path / "alerts.yml").write_text(
        ALERTS.read_text().replace("increase(balancerd_fallbacks_total[1h])) >= 3", ">= 30")
    )
    (tmp_path / "alerts.test.yml").write_text(ALERT_TESTS.read_text())
    done = promtool("test", "rules", str(tmp_path / "alerts.test.yml"))
    assert done.returncode != 0
    assert "BalancerdFallbacksRising" in done.stdout + done.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in rules()}
    assert len(names) >= 10
    assert names - fires == set(), "alerts never seen firing"
    assert names - quiet == set(), "alerts never seen quiet"
    for r in rules():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Harness]:
    sock_dir = Path(tempfile.mkdtemp(prefix="balert"))
    h = Harness(tmp_path, sock_dir)
    h.daemon.start(schedule_jobs=False)
    h.collect(3)
    assert h.daemon.cycle_once() is not None
    yield h
    h.daemon.shutdown()
    shutil.rmtree(sock_dir, ignore_errors=True)


def exported(h: Harness) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(generate_latest(h.registry).decode()):
        names.update(s.name for s in family.samples)
    return names


def test_every_series_the_alerts_read_is_exported_by_a_daemon(daemon: Harness) -> None:
    have = exported(daemon)
    for r in rules():
        for name in re.findall(r"\bbalancerd_[a-z_]+", r["expr"]):
            assert name in have, f"{r['alert']}: {name} is not exported"


class RulesPrometheus(Prometheus):
    """The test Prometheus, with the alert rules loaded."""

    def config_text(self) -> str:
        doc = yaml.safe_load(super().config_text())
        doc["rule_files"] = [str(ALERTS)]
        return yaml.safe_dump(doc)


@pytest.mark.slow
@pytest.mark.skipif(prometheus_binary() is None, reason="Debian package prometheus absent")
def test_a_real_prometheus_evaluates_the_rules_on_a_daemon(daemon: Harness) -> None:
    server = serve("127.0.0.1:0", daemon.registry)
    try:
        with RulesPrometheus(
            [f"127.0.0.1:{server.port}"], daemon.folder / "prom", scrape_interval_s=1.0
        ) as prom:
            prom.wait_for_scrapes(3)
            deadline = time.monotonic() + 60
            while True:
                groups = prom.api("rules", {})["groups"]
                loaded = [r for g in groups for r in g["rules"]]
                if loaded and all(r["health"] == "ok" for r in loaded):
                    break
                assert time.monotonic() < deadline, loaded
                time.sleep(0.5)
            assert {r["name"] for r in loaded} == {r["alert"] for r in rules()}
            # A fresh, healthy daemon raises nothing.
            assert prom.api("alerts", {})["alerts"] == []
            # Paused, it is pending towards BalancerdPausedLong; a drain shows up.
            daemon.ask("pause", reason="test")
            daemon.ask("drain", host="h3")
            rows = prom.wait_for(
                'ALERTS{alertname="BalancerdPausedLong", alertstate="pending"}', timeout_s=30
            )
            assert rows[0]["metric"]["severity"] == "info"
            prom.wait_for(
                "sum(balancerd_host_maintenance) or vector(0)",
                predicate=lambda rows: float(rows[0]["value"][1]) == 1.0,
            )
    finally:
        server.close()
