"""Metrics rendered at scrape time: values, no stale series, promtool, HTTP, real Prometheus."""

from __future__ import annotations

import json
import math
import shutil
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prom import (
    DASHBOARD,
    Prometheus,
    panel_queries,
    panels_without_data,
    prometheus_binary,
    promtool_check,
    promtool_problems,
)
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from balancerd.errors import ConfigError
from balancerd.metrics import DaemonStats, parse_listen, register, render, serve
from balancerd.model import Host, Move, Placement, Plan, Snapshot, SolverReport, Vm
from balancerd.outcomes import (
    FallbackKind,
    PowerAction,
    ReconcileOutcome,
    SkipKind,
)
from balancerd.outcomes import MigrationMode as Mode
from balancerd.outcomes import MoveOutcome as Outcome

GIB = 1024**3


def snapshot(placement: dict[str, str], *, h3_off: bool = False) -> Snapshot:
    hosts = (
        Host("h1", "qemu+tcp://10.0.0.1/system", True, cpus=8, mem_bytes=32 * GIB,
             mem_free_bytes=8 * GIB, cpu_util=0.75),
        Host("h2", "qemu+tcp://10.0.0.2/system", True, cpus=8, mem_bytes=32 * GIB,
             mem_free_bytes=24 * GIB, cpu_util=0.25),
        Host("h3", "qemu+tcp://10.0.0.3/system", not h3_off, cpus=4, mem_bytes=16 * GIB,
             mem_free_bytes=16 * GIB, cpu_util=0.0, powered_off=h3_off),
    )  # fmt: skip
    vms = tuple(
        Vm(name, f"uuid-{name}", host, "running", 2, 2 * GIB, 0.1 * (i + 1))
        for i, (name, host) in enumerate(sorted(placement.items()))
    )
    return Snapshot(100.0, hosts, vms)


def plan_for(snap: Snapshot, gap: float | None = 0.004) -> Plan:
    cur = snap.placement()
    target = Placement({**cur.host_of, "web-1": "h2"})
    return Plan(
        policy="balance-weekdays",
        objective="balance",
        moves=(Move("web-1", "h1", "h2", 2 * GIB, 12.0),),
        current=cur,
        target=target,
        solver=SolverReport("cbc", "optimal", 0.42, 0.12, 0.1195, gap),
        score_before=0.5,
        score_after=0.12,
        power_off=("h3",),
    )


def full_stats() -> DaemonStats:
    """Every kind of state and event, as a daemon that has run a few cycles would hold."""
    stats = DaemonStats()
    snap = snapshot({"web-1": "h1", "web-2": "h1", "db-1": "h2"})
    stats.set_snapshot(snap)
    stats.set_policy("balance-weekdays", "balance", "automatic")
    stats.set_plan(plan_for(snap))
    stats.migration_started("web-1", "h1", "h2", "m-1")
    stats.migration_finished("web-1", Mode.LIVE, Outcome.MIGRATED, duration_s=12.5, downtime_s=0.08)
    stats.migration_finished("db-1", Mode.NONE, Outcome.FAILED)
    stats.record_fallback(FallbackKind.OFFLINE)
    stats.migration_finished(
        "db-1", Mode.OFFLINE, Outcome.MIGRATED, duration_s=40.0, downtime_s=35.0
    )
    stats.record_skip(SkipKind.DISK_MISSING)
    stats.record_skip(SkipKind.CACHE_MODE)
    stats.record_reconciliation(ReconcileOutcome.SETTLED)
    stats.record_reload(ok=False)
    stats.record_power_action(PowerAction.OFF, ok=True)
    stats.set_host_power("h3", on=False)
    stats.record_cycle(3.2, ok=True)
    stats.migration_started("web-2", "h1", "h3")
    return stats


def scrape(stats: DaemonStats) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)], parsed by prometheus_client's own parser."""
    registry = CollectorRegistry()
    register(registry, stats)
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    matches = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(matches) == 1, f"{name}{labels}: {samples.get(name)}"
    return matches[0]


# --- values ---------------------------------------------------------------------------


def test_host_and_vm_series_follow_the_snapshot() -> None:
    s = scrape(full_stats())
    assert value(s, "balancerd_host_utilization", host="h1", resource="cpu") == 0.75
    assert value(s, "balancerd_host_utilization", host="h1", resource="memory") == 0.75
    assert value(s, "balancerd_host_utilization", host="h2", resource="memory") == 0.25
    assert value(s, "balancerd_host_up", host="h3") == 1.0
    # The power manager's word (h3 switched off) wins over the snapshot's.
    assert value(s, "balancerd_host_powered_on", host="h3") == 0.0
    assert value(s, "balancerd_host_powered_on", host="h1") == 1.0
    assert value(s, "balancerd_hosts_powered_off") == 1.0
    assert value(s, "balancerd_hosts_active") == 2.0
    assert value(s, "balancerd_host_vms", host="h1") == 2.0
    assert value(s, "balancerd_vm_host_info", vm="db-1", host="h2") == 1.0
    assert value(s, "balancerd_vm_cpu_utilization", vm="db-1") == pytest.approx(0.1)
    assert value(s, "balancerd_migrations_in_flight") == 1.0


def test_plan_solver_and_policy_series() -> None:
    s = scrape(full_stats())
    assert value(s, "balancerd_plan_moves") == 1.0
    assert value(s, "balancerd_plan_objective", when="before") == 0.5
    assert value(s, "balancerd_plan_objective", when="after") == 0.12
    assert value(s, "balancerd_plan_power_hosts", action="off") == 1.0
    assert value(s, "balancerd_solver_last_seconds") == 0.42
    assert value(s, "balancerd_solver_gap_ratio") == 0.004
    assert value(s, "balancerd_solver_status", backend="cbc", status="optimal") == 1.0
    assert value(s, "balancerd_solver_status", backend="cbc", status="time-limit") == 0.0
    info = s["balancerd_policy_info"]
    assert info == [
        ({"policy": "balance-weekdays", "objective": "balance", "mode": "automatic"}, 1.0)
    ]
    assert value(s, "balancerd_solver_duration_seconds_count") == 1.0


def test_unknown_gap_and_scores_are_nan_not_missing() -> None:
    stats = DaemonStats()
    snap = snapshot({"a": "h1"})
    stats.set_plan(plan_for(snap, gap=None))
    s = scrape(stats)
    assert math.isnan(value(s, "balancerd_solver_gap_ratio"))


def test_counters_and_histograms() -> None:
    s = scrape(full_stats())
    assert value(s, "balancerd_migrations_total", mode="live", result="migrated") == 1.0
    assert value(s, "balancerd_migrations_total", mode="none", result="failed") == 1.0
    assert value(s, "balancerd_migrations_total", mode="offline", result="migrated") == 1.0
    assert value(s, "balancerd_migrations_total", mode="paused-fallback", result="failed") == 0.0
    assert value(s, "balancerd_fallbacks_total", kind="offline") == 1.0
    assert value(s, "balancerd_fallbacks_total", kind="pause") == 0.0
    assert value(s, "balancerd_skipped_total", reason="disk-missing") == 1.0
    assert value(s, "balancerd_skipped_total", reason="gone") == 0.0  # exists from the start
    assert value(s, "balancerd_reload_failures_total") == 1.0
    assert value(s, "balancerd_reconciliations_total", outcome="settled") == 1.0
    assert value(s, "balancerd_cycles_total", result="ok") == 1.0
    assert value(s, "balancerd_power_actions_total", action="off", result="success") == 1.0
    # Histogram buckets are cumulative: 12.5 s lands in le=20 and above, not in le=10.
    h = "balancerd_migration_duration_seconds_bucket"
    assert value(s, h, mode="live", le="10.0") == 0.0
    assert value(s, h, mode="live", le="20.0") == 1.0
    assert value(s, h, mode="live", le="+Inf") == 1.0
    assert value(s, "balancerd_migration_duration_seconds_sum", mode="live") == 12.5
    assert value(s, "balancerd_migration_downtime_seconds_bucket", mode="offline", le="+Inf") == 1.0
    assert value(s, "balancerd_cycle_duration_seconds_count") == 1.0
    assert value(s, "balancerd_last_success_timestamp_seconds") > 1.6e9


def test_every_outcome_the_engine_can_emit_is_a_series_from_the_start() -> None:
    """Label values are declared from the enums: none can drift from the dashboard."""
    s = scrape(DaemonStats())
    for mode in Mode:
        for outcome in Outcome:
            assert value(s, "balancerd_migrations_total", mode=mode, result=outcome) == 0.0
    for kind in SkipKind:
        assert value(s, "balancerd_skipped_total", reason=kind) == 0.0
    for fallback in FallbackKind:
        assert value(s, "balancerd_fallbacks_total", kind=fallback) == 0.0
    for rec in ReconcileOutcome:
        assert value(s, "balancerd_reconciliations_total", outcome=rec) == 0.0


# --- no stale series ------------------------------------------------------------------


def test_a_vm_that_moved_or_left_leaves_no_stale_series() -> None:
    stats = DaemonStats()
    stats.set_snapshot(snapshot({"web-1": "h1", "web-2": "h1"}))
    before = scrape(stats)["balancerd_vm_host_info"]
    assert ({"vm": "web-1", "host": "h1"}, 1.0) in before

    stats.set_snapshot(snapshot({"web-1": "h2"}))  # web-1 moved, web-2 deleted
    after = scrape(stats)
    assert after["balancerd_vm_host_info"] == [({"vm": "web-1", "host": "h2"}, 1.0)]
    assert [lab["vm"] for lab, _ in after["balancerd_vm_cpu_utilization"]] == ["web-1"]
    assert value(after, "balancerd_host_vms", host="h1") == 0.0


def test_down_host_has_no_utilization_series() -> None:
    stats = DaemonStats()
    stats.set_snapshot(snapshot({"a": "h1"}, h3_off=True))
    s = scrape(stats)
    assert {lab["host"] for lab, _ in s["balancerd_host_utilization"]} == {"h1", "h2"}
    assert value(s, "balancerd_host_up", host="h3") == 0.0
    assert value(s, "balancerd_host_powered_on", host="h3") == 0.0


# --- concurrency, registry, HTTP ------------------------------------------------------


def test_updates_from_threads_while_scraping_lose_nothing() -> None:
    stats = DaemonStats()
    registry = CollectorRegistry()
    register(registry, stats)
    per_thread = 500

    def work() -> None:
        for i in range(per_thread):
            stats.record_skip(SkipKind.IN_JOB)
            stats.migration_finished(
                f"vm{i}", Mode.LIVE, Outcome.MIGRATED, duration_s=1.0, downtime_s=0.01
            )

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        render(registry)  # scrapes interleaved with updates must not raise
    for t in threads:
        t.join()
    s = scrape(stats)
    assert value(s, "balancerd_skipped_total", reason="in-job") == 4 * per_thread
    assert value(s, "balancerd_migrations_total", mode="live", result="migrated") == 4 * per_thread
    assert value(s, "balancerd_migration_duration_seconds_count", mode="live") == 4 * per_thread


def test_the_global_registry_is_never_touched() -> None:
    stats = full_stats()
    register(CollectorRegistry(), stats)
    assert not any(m.name.startswith("balancerd") for m in REGISTRY.collect())


def test_serve_answers_http_scrapes() -> None:
    registry = CollectorRegistry()
    stats = full_stats()
    register(registry, stats)
    server = serve("127.0.0.1:0", registry)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as r:
            body = r.read().decode()
        assert 'balancerd_vm_host_info{host="h1",vm="web-2"} 1.0' in body
        stats.set_snapshot(snapshot({"web-2": "h2"}))
        with urllib.request.urlopen(server.url, timeout=10) as r:
            body = r.read().decode()
        assert 'balancerd_vm_host_info{host="h2",vm="web-2"} 1.0' in body
        assert 'host="h1",vm="web-2"' not in body
    finally:
        server.close()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:9177", ("127.0.0.1", 9177)), ("[::1]:9000", ("::1", 9000))],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9177", "127.0.0.1:", ":9177", "127.0.0.1:99999", "h:x"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(listen)


def test_summary_is_json_and_lists_in_flight() -> None:
    summary = full_stats().summary()
    text = json.dumps(summary)
    assert json.loads(text)["policy"]["name"] == "balance-weekdays"
    assert [m["vm"] for m in summary["in_flight"]] == ["web-2"]
    assert summary["plan"]["moves"] == [{"vm": "web-1", "src": "h1", "dst": "h2", "wave": 0}]


# --- promtool ---------------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent")


@needs_promtool
@pytest.mark.parametrize("kind", ["empty", "full"])
def test_promtool_check_metrics_is_clean(kind: str) -> None:
    registry = CollectorRegistry()
    register(registry, DaemonStats() if kind == "empty" else full_stats())
    done = promtool_check(render(registry))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == ""


@needs_promtool
def test_promtool_does_flag_bad_exposition() -> None:
    """The check above is a real one: promtool does reject a counter without _total."""
    bad = b"# HELP foo_count Things.\n# TYPE foo_count counter\nfoo_count 1\n"
    done = promtool_check(bad)
    assert done.returncode != 0
    assert 'should have "_total" suffix' in done.stdout + done.stderr


# --- the dashboard ------------------------------------------------------------------------


def test_dashboard_layout_and_queries() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    queries = panel_queries()
    exprs = " ".join(q.expr for q in queries)
    for needed in (
        "balancerd_vm_host_info",
        "balancerd_host_utilization",
        "balancerd_migrations_total",
        "balancerd_fallbacks_total",
        "balancerd_skipped_total",
        "balancerd_solver_status",
        "balancerd_solver_gap_ratio",
        "balancerd_cycle_duration_seconds",
        "balancerd_policy_info",
    ):
        assert needed in exprs, needed
    assert all("$" not in q.expr for q in queries), "unsubstituted dashboard variable"


@pytest.mark.slow
@pytest.mark.skipif(prometheus_binary() is None, reason="Debian package prometheus absent")
def test_real_prometheus_finds_data_for_every_dashboard_panel(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    stats = full_stats()
    register(registry, stats)
    server = serve("127.0.0.1:0", registry)
    try:
        with Prometheus([f"127.0.0.1:{server.port}"], tmp_path / "prom") as prom:
            prom.wait_for_scrapes(3)
            assert promtool_problems(server.url) == ""
            missing = panels_without_data(prom)
            assert missing == [], "\n".join(missing)

            # A guest that moves is shown on its new host only (staleness, no old series).
            stats.set_snapshot(snapshot({"web-1": "h2", "web-2": "h1", "db-1": "h2"}))
            rows = prom.wait_for(
                'balancerd_vm_host_info{vm="web-1"}',
                predicate=lambda rows: [r["metric"]["host"] for r in rows] == ["h2"],
            )
            assert len(rows) == 1
            # Counters move between scrapes and increase() sees it.
            stats.record_skip(SkipKind.NETWORK)
            prom.wait_for('increase(balancerd_skipped_total{reason="network"}[5m]) > 0')
    finally:
        server.close()


def test_prediction_against_measurement_and_dirty_rates() -> None:
    stats = DaemonStats()
    snap = snapshot({"web-1": "h1", "db-1": "h2"})
    vms = tuple(
        replace(v, dirty_rate_bytes_s=8.0 * 2**20, dirty_rate_age_s=30.0) if v.name == "db-1" else v
        for v in snap.vms
    )
    stats.set_snapshot(replace(snap, vms=vms))
    stats.migration_finished(
        "web-1", Mode.LIVE, Outcome.MIGRATED, duration_s=12.0, downtime_s=0.1, predicted_s=10.0
    )
    stats.migration_finished("db-1", Mode.LIVE, Outcome.MIGRATED, duration_s=5.0)  # no prediction
    s = scrape(stats)
    h = "balancerd_migration_prediction_ratio_bucket"
    assert value(s, h, le="1.1") == 0.0 and value(s, h, le="1.25") == 1.0  # 12 / 10 = 1.2
    assert value(s, "balancerd_migration_prediction_ratio_count") == 1.0
    assert value(s, "balancerd_migration_last_predicted_seconds", vm="web-1") == 10.0
    assert value(s, "balancerd_migration_last_measured_seconds", vm="web-1") == 12.0
    assert value(s, "balancerd_vm_dirty_rate_bytes_per_second", vm="db-1") == 8.0 * 2**20
    assert value(s, "balancerd_vm_dirty_rate_age_seconds", vm="db-1") == 30.0
    dirty = s["balancerd_vm_dirty_rate_bytes_per_second"]
    assert [lab["vm"] for lab, _ in dirty] == ["db-1"]  # web-1 was never measured
