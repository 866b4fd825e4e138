"""The daemon in-process (no root, no libvirt): a real Daemon wired to the simulated
hypervisor runs collect and cycle jobs; plans, moves, metrics and the status file follow."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancerd.config import Config
from balancerd.daemon import Daemon
from balancerd.daemon_state import STATUS_FILE
from balancerd.hypervisor.base import Hypervisor
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.notify import Notifier
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.units import GIB

POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: inproc}
spec:
  objective: balance
  mode: MODE
  limits: {max_cpu_util: 0.9, max_mem_util: 0.9, mem_headroom_mib: 0}
  hysteresis: {min_improvement: 0.01, cooldown_s: 0}
  migration: {max_concurrent: 2, max_concurrent_per_host: 1}
  forecast: {quantile: 0.5, window_s: 600}
"""


def write_config(folder: Path, mode: str = "automatic") -> Path:
    (folder / "policy.yaml").write_text(POLICY.replace("MODE", mode))
    hosts = "".join(f"  - {{name: h{i}, uri: 'qemu+tcp://10.0.0.{i}/system'}}\n" for i in (1, 2, 3))
    config = folder / "balancerd.yaml"
    config.write_text(
        "hosts:\n"
        + hosts
        + textwrap.dedent(
            f"""\
            policy: policy.yaml
            state_dir: {folder / "state"}
            collect_interval_s: 10
            cycle_interval_s: 60
            smoothing_window: 2
            """
        )
    )
    return config


def cluster() -> SimHypervisor:
    """Four busy guests all on h1 of three 4-core hosts."""
    hosts = [SimHost(f"h{i}", cpus=4, cpu_mhz=2000, mem_bytes=16 * GIB) for i in (1, 2, 3)]
    hv = SimHypervisor(hosts)
    for i in range(4):
        hv.add_vm("h1", SimVm(f"vm{i}", vcpus=2, mem_bytes=1 * GIB))
    return hv


BUSY = {f"vm{i}": 1.5 for i in range(4)}


class Harness:
    def __init__(self, folder: Path, mode: str = "automatic") -> None:
        self.hv = cluster()
        self.registry = CollectorRegistry()
        self.notes: list[str] = []

        def factory(_config: Config) -> Hypervisor:
            return self.hv

        self.daemon = Daemon(
            str(write_config(folder, mode)),
            hypervisor_factory=factory,
            notifier=Notifier(),
            registry=self.registry,
            serve_metrics=False,
            clock=lambda: self.hv.clock_s + 1_000_000.0,
        )
        self.state = folder / "state"

    def collect(self, times: int) -> None:
        for _ in range(times):
            self.hv.advance(10.0, BUSY)
            self.daemon.collect_once()

    def metric(self, name: str, **labels: str) -> float:
        text = generate_latest(self.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        raise AssertionError(f"no sample {name}{labels}")

    def where(self) -> dict[str, list[str]]:
        return {name: sorted(h.vms) for name, h in self.hv.hosts.items()}


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    h = Harness(tmp_path)
    h.daemon.start(schedule_jobs=False)
    yield h
    h.daemon.shutdown()


def test_a_cycle_plans_moves_records_metrics_and_status(harness: Harness) -> None:
    harness.collect(3)
    assert harness.daemon.ready
    report = harness.daemon.cycle_once()
    assert report is not None and report.executed
    assert report.plan.moves, report.plan.reason
    migrated = [r for r in report.results if r.outcome is MoveOutcome.MIGRATED]
    assert len(migrated) == len(report.plan.moves)
    # The guests really moved: h1 no longer holds all four, and each runs on one host only.
    where = harness.where()
    assert len(where["h1"]) < 4
    assert sorted(vm for vms in where.values() for vm in vms) == [f"vm{i}" for i in range(4)]
    # Every move carries a migration ID that the status file and the journal also show.
    ids = [r.migration_id for r in migrated]
    assert all(ids) and len(set(ids)) == len(ids)
    status = json.loads((harness.state / STATUS_FILE).read_text())
    assert status["last_cycle"]["migrated"] == len(migrated)
    assert status["last_cycle"]["migration_ids"] == ids
    assert {e.migration_id for e in harness.daemon.journal.entries()} >= set(ids)
    # Metrics: the moves are counted under their enum labels, nothing is left in flight.
    live = harness.metric("balancerd_migrations_total", mode="live", result="migrated")
    assert live == len(migrated)
    assert harness.metric("balancerd_migrations_in_flight") == 0.0
    assert harness.metric("balancerd_cycles_total", result="ok") == 1.0
    assert harness.metric("balancerd_plan_moves") == len(report.plan.moves)


def test_a_migration_in_flight_shows_in_status_and_metrics(harness: Harness) -> None:
    """While a move runs, the status file and the gauge show it with its ID."""
    harness.collect(3)
    seen: list[tuple[float, list[dict[str, object]]]] = []
    original = harness.hv.migrate

    def observing_migrate(req: object) -> None:
        status = json.loads((harness.state / STATUS_FILE).read_text())
        seen.append((harness.metric("balancerd_migrations_in_flight"), status["in_flight"]))
        original(req)  # type: ignore[arg-type]

    harness.hv.migrate = observing_migrate  # type: ignore[method-assign]
    report = harness.daemon.cycle_once()
    assert report is not None and report.results
    assert seen, "no migration started"
    gauge, in_flight = seen[0]
    assert gauge >= 1.0
    assert in_flight and in_flight[0]["migration_id"] in {r.migration_id for r in report.results}


def test_recommend_mode_plans_and_counts_skips_but_moves_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path, mode="recommend")
    h.daemon.start(schedule_jobs=False)
    try:
        h.collect(3)
        report = h.daemon.cycle_once()
        assert report is not None
        assert report.held_back is SkipKind.RECOMMEND
        assert report.plan.moves and not report.results
        assert h.where()["h1"] == [f"vm{i}" for i in range(4)]
        skipped = h.metric("balancerd_skipped_total", reason="recommend")
        assert skipped == len(report.plan.moves)
    finally:
        h.daemon.shutdown()


def test_a_cycle_before_two_samples_does_nothing(harness: Harness) -> None:
    harness.collect(1)
    assert not harness.daemon.ready
    assert harness.daemon.cycle_once() is None
    assert harness.where()["h1"] == [f"vm{i}" for i in range(4)]


def test_reload_with_a_bad_policy_keeps_the_running_one(harness: Harness, tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY.replace("MODE", "sometimes"))
    assert harness.daemon.reload() is False
    assert harness.metric("balancerd_reload_failures_total") == 1.0
    _, policy = harness.daemon.active()
    assert policy.mode == "automatic"
    (tmp_path / "policy.yaml").write_text(POLICY.replace("MODE", "recommend"))
    assert harness.daemon.reload() is True
    _, policy = harness.daemon.active()
    assert policy.mode == "recommend"


def test_a_stale_snapshot_is_never_planned_from(harness: Harness) -> None:
    """Collection that keeps failing must not let cycles act on an old view."""
    harness.collect(3)
    assert harness.daemon._snapshot_at_mono is not None
    harness.daemon._snapshot_at_mono -= 3600.0  # the last good collection was an hour ago
    assert harness.daemon.cycle_once() is None
    assert harness.where()["h1"] == [f"vm{i}" for i in range(4)]
    assert harness.metric("balancerd_cycles_total", result="error") == 1.0


def test_a_second_daemon_on_the_same_state_directory_refuses_to_start(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from balancerd.daemon import core
    from balancerd.statelock import StateLocked

    monkeypatch.setattr(core, "LOCK_WAIT_S", 0.2)
    second = Daemon(
        str(tmp_path / "balancerd.yaml"),
        hypervisor_factory=lambda _c: harness.hv,
        notifier=Notifier(),
        registry=CollectorRegistry(),
        serve_metrics=False,
    )
    with pytest.raises(StateLocked, match=r"pid=.* command=daemon"):
        second.start(schedule_jobs=False)


def test_power_save_does_not_switch_off_a_host_that_got_a_guest_since_the_plan(
    tmp_path: Path,
) -> None:
    """The plan saw h3 empty; a guest defined there since cancels the power-off."""
    h = Harness(tmp_path)
    (tmp_path / "policy.yaml").write_text(
        POLICY.replace("MODE", "automatic").replace("objective: balance", "objective: power-save")
        + "  power: {min_active_hosts: 1, grace_period_s: 0, reserve_hosts: 0}\n"
    )
    cfg = tmp_path / "balancerd.yaml"
    cfg.write_text(
        cfg.read_text().replace(
            "uri: 'qemu+tcp://10.0.0.3/system'",
            "uri: 'qemu+tcp://10.0.0.3/system', power: {driver: command, "
            "on_command: [/bin/true], off_command: [/bin/true]}",
        )
    )
    h.daemon.reload()
    h.daemon.start(schedule_jobs=False)
    try:
        h.collect(3)
        original = h.hv.domains

        def domains(host: str) -> dict[str, str]:
            if host == "h3":  # someone defined a guest on h3 after the snapshot
                h.hv.add_vm("h3", SimVm("late", vcpus=1, mem_bytes=GIB, state="shutoff"))
            return original(host)

        h.hv.domains = domains  # type: ignore[method-assign]
        report = h.daemon.cycle_once()
        assert report is not None
        offs = [p for p in report.power if p.action == "off" and p.host == "h3"]
        assert offs and not offs[0].ok, report.power
        assert "late (shutoff)" in offs[0].error
        assert "h3" not in h.daemon.power.powered_off()
    finally:
        h.daemon.shutdown()


def test_same_named_guests_on_two_hosts_are_left_where_they_are(harness: Harness) -> None:
    """An operator recreated vm0 on h2: the cycle goes on, neither copy moves, the plan says
    why."""
    harness.hv.add_vm("h2", SimVm("vm0", vcpus=2, mem_bytes=GIB))
    harness.collect(3)
    report = harness.daemon.cycle_once()
    assert report is not None, "the cycle failed"
    assert all(not m.vm.startswith("vm0") for m in report.plan.moves)
    assert any("vm0 is on h1, h2" in n for n in report.plan.notes), report.plan.notes
    assert "vm0" in harness.hv.hosts["h1"].vms and "vm0" in harness.hv.hosts["h2"].vms


def test_a_guest_preflight_refuses_backs_off_instead_of_failing_every_cycle(
    harness: Harness, tmp_path: Path
) -> None:
    from balancerd.hypervisor.base import DiskFacts

    drain = POLICY.replace("MODE", "automatic") + "  constraints: {maintenance: [h1]}\n"
    (tmp_path / "policy.yaml").write_text(drain)
    assert harness.daemon.reload()

    wb = harness.hv.hosts["h1"].vms["vm0"]
    wb.disks = (DiskFacts("vda", "/shared/vm0.qcow2", "writeback", "disk", False),)
    harness.collect(3)
    first = harness.daemon.cycle_once()
    assert first is not None
    refused = [r for r in first.results if r.vm == "vm0"]
    assert refused and refused[0].skip_kind is SkipKind.CACHE_MODE
    harness.collect(1)
    second = harness.daemon.cycle_once()
    assert second is not None
    assert all(m.vm != "vm0" for m in second.plan.moves)
    assert any(n.startswith("vm0 backs off") for n in second.plan.notes), second.plan.notes
    status = json.loads((harness.state / STATUS_FILE).read_text())
    assert [b["vm"] for b in status["backing_off"]] == ["vm0"]
    assert "cache='writeback'" in status["backing_off"][0]["reason"]


def test_state_files_written_from_many_threads_are_never_torn(tmp_path: Path) -> None:
    """Was: one fixed temporary name, so two writers could rename each other's file away."""
    import threading

    from balancerd.statefiles import atomic_write

    target = tmp_path / "status.json"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(200):
                atomic_write(target, json.dumps({"writer": n, "i": i}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_a_solve_longer_than_the_stall_timeout_is_refused_at_start_and_reload(
    harness: Harness, tmp_path: Path
) -> None:
    """Was: accepted, then systemd killed every cycle whose solve ran past the watchdog."""
    from balancerd.errors import ConfigError

    slow = POLICY.replace("MODE", "automatic") + "  solver: {time_limit_s: 120}\n"
    (tmp_path / "policy.yaml").write_text(slow)
    assert harness.daemon.reload() is False
    with pytest.raises(ConfigError, match="stall_timeout_s"):
        Daemon(str(tmp_path / "balancerd.yaml"), hypervisor_factory=lambda _c: harness.hv)


def test_an_unmovable_guest_stays_with_its_reason_in_the_plan_and_metrics(
    harness: Harness,
) -> None:
    from balancerd.model import Blocker
    from balancerd.outcomes import BlockerKind

    gpu = Blocker(BlockerKind.HOSTDEV, "pci 0000:03:00.0")
    harness.hv.hosts["h1"].vms["vm0"].blockers = (gpu,)
    for _ in range(2):  # planned around, cycle after cycle: never attempted
        harness.collect(3)
        report = harness.daemon.cycle_once()
        assert report is not None
        assert all(m.vm != "vm0" for m in report.plan.moves)
        assert all(r.vm != "vm0" for r in report.results)
        assert any(
            "guest vm0 stays on host h1 but cannot be live-migrated (hostdev: pci" in n
            for n in report.plan.notes
        ), report.plan.notes
    assert "vm0" in harness.hv.hosts["h1"].vms
    assert harness.metric("balancerd_guests_unmovable", kind="hostdev") == 1.0


def test_a_drain_moves_a_stopped_guest_cold_to_exactly_one_host(
    harness: Harness, tmp_path: Path
) -> None:
    drain = POLICY.replace("MODE", "automatic") + "  constraints: {maintenance: [h1]}\n"
    (tmp_path / "policy.yaml").write_text(drain)
    assert harness.daemon.reload()
    harness.hv.add_vm("h1", SimVm("off", vcpus=2, mem_bytes=2 * GIB, state="shutoff"))
    harness.collect(3)
    assert harness.metric("balancerd_host_vms_stopped", host="h1") == 1.0
    report = harness.daemon.cycle_once()
    assert report is not None
    (cold,) = [r for r in report.results if r.vm == "off"]
    assert cold.outcome is MoveOutcome.MIGRATED, cold.reason
    assert str(cold.mode) == "definition"
    holders = [h for h, vms in harness.where().items() if "off" in vms]
    assert len(holders) == 1 and holders[0] != "h1"
    assert harness.hv.hosts[holders[0]].vms["off"].state == "shutoff"
    assert harness.where()["h1"] == []  # the running guests left too


@pytest.mark.parametrize("allowed", [False, True])
def test_power_save_keeps_a_host_with_a_stopped_guest_on_unless_the_policy_allows(
    tmp_path: Path, allowed: bool
) -> None:
    h = Harness(tmp_path)
    (tmp_path / "policy.yaml").write_text(
        POLICY.replace("MODE", "automatic").replace("objective: balance", "objective: power-save")
        + "  power: {min_active_hosts: 1, grace_period_s: 0, reserve_hosts: 0, "
        + f"allow_off_with_stopped_guests: {str(allowed).lower()}}}\n"
    )
    cfg = tmp_path / "balancerd.yaml"
    cfg.write_text(
        cfg.read_text().replace(
            "uri: 'qemu+tcp://10.0.0.3/system'",
            "uri: 'qemu+tcp://10.0.0.3/system', power: {driver: command, "
            "on_command: [/bin/true], off_command: [/bin/true]}",
        )
    )
    h.hv.add_vm("h3", SimVm("off", vcpus=1, mem_bytes=GIB, state="shutoff"))
    h.daemon.reload()
    h.daemon.start(schedule_jobs=False)
    try:
        h.collect(3)
        report = h.daemon.cycle_once()
        assert report is not None
        offs = [p for p in report.power if p.action == "off" and p.host == "h3" and p.ok]
        assert bool(offs) is allowed, report.power
        assert ("h3" in h.daemon.power.powered_off()) is allowed
    finally:
        h.daemon.shutdown()


def test_no_dirty_rate_calculation_starts_on_a_guest_being_moved(harness: Harness) -> None:
    """libvirt makes such a call wait on the domain's job lock past the host timeout (lab:
    a post-copy lost its guest when the timeout closed the shared connection)."""
    harness.daemon.stats.migration_started("vm0", "h1", "h2", "abc")
    harness.collect(1)
    harness.daemon.collect_once()
    assert harness.hv.dirty_calcs > 0  # others were measured (vm0 is first in turn)
    assert harness.hv.hosts["h1"].vms["vm0"].dirty_measured is None


def test_a_standby_starts_no_dirty_rate_calculation(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader may be moving any guest (HA lab: a standby's calculation on the leader's
    migrating guest waited past the host timeout and dropped its connection)."""
    monkeypatch.setattr(harness.daemon.coord, "not_leading", lambda: "standby: node-a leads")
    harness.collect(1)
    harness.daemon.collect_once()
    assert harness.hv.dirty_calcs == 0


def test_collect_measures_dirty_rates_and_metrics_show_them(harness: Harness) -> None:
    harness.hv.hosts["h1"].vms["vm0"].dirty_rate_bytes_s = 40.0 * 2**20
    harness.collect(1)  # starts calculations on two guests; the next collect reads them
    snap = harness.daemon.collect_once()
    rates = {v.name: v.dirty_rate_bytes_s for v in snap.vms}
    assert rates["vm0"] == 40.0 * 2**20 and rates["vm1"] == 0.0
    assert rates["vm2"] is None  # its turn is now (two per collect)
    assert harness.metric("balancerd_vm_dirty_rate_bytes_per_second", vm="vm0") == 40.0 * 2**20
    assert harness.hv.dirty_calcs == 4
