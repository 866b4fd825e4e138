"""The daemon in operation on a real lab: systemd notify socket, balancing, SIGHUP reload,
real Prometheus scraping every dashboard panel, promtool, and power-save on lab hosts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import cli_json
from prom import Prometheus, panels_without_data

from balancerd.lab.cluster import GuestSpec, Lab, LabSpec

pytestmark = pytest.mark.lab

LAB_NAME, LAB_SUBNET = "bl3", "10.77.3"
REPO = Path(__file__).resolve().parent.parent

GOOD_POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: NAME}
spec:
  objective: OBJECTIVE
  mode: MODE
  limits: {max_cpu_util: 0.9, max_mem_util: 0.9, mem_headroom_mib: 64}
  hysteresis: {min_improvement: 0.02, cooldown_s: 5}
  budget: {max_moves: 6}
  power: {min_active_hosts: 1, grace_period_s: 3, min_off_s: 5}
  migration: {bandwidth_mib_s: 300, max_downtime_ms: 300, max_concurrent: 2,
              max_concurrent_per_host: 1, max_time_s: 120}
  solver: {time_limit_s: 3}  # below the watchdog test's stall_timeout_s (4)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifySocket:
    """A real AF_UNIX datagram socket, as systemd gives a Type=notify service."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        # Read all the time, as systemd does (a full socket would drop messages).
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data)

    def drain(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in m for m in self.drain()):
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class DaemonProc:
    def __init__(self, config: Path, notify: NotifySocket, log: Path) -> None:
        env = dict(os.environ)
        env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancerd.cli", "run", "--config", str(config)],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_config(lab: Lab, work: Path, policy: Path, metrics_port: int, **overrides: float) -> Path:
    cfg: dict[str, Any] = yaml.safe_load(lab.config_path.read_text())
    cfg.update(
        policy=str(policy),
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        state_dir=str(work / "state"),
        collect_interval_s=1,
        cycle_interval_s=6,
        smoothing_window=3,
        host_timeout_s=5,
    )
    cfg.update(overrides)
    path = work / "balancerd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def boot(lab_factory: Any, spec: LabSpec) -> Lab:
    """A lab of this module's name with every guest of ``spec`` booted."""
    lab: Lab = lab_factory(LAB_NAME, LAB_SUBNET)(spec)
    for g in spec.guests:
        lab.wait_booted(g.name)
    return lab


def start(
    lab: Lab, work: Path, name: str, objective: str, mode: str = "automatic", **overrides: float
) -> tuple[Path, Path, int, NotifySocket, DaemonProc]:
    """Policy, config, notify socket and a running daemon: (policy, config, port, ...)."""
    policy = write_policy(work / "policy.yaml", name, objective, mode)
    port = free_port()
    config = write_config(lab, work, policy, port, **overrides)
    notify = NotifySocket(work / "notify.sock")
    return policy, config, port, notify, DaemonProc(config, notify, work / "daemon.log")


def write_policy(path: Path, name: str, objective: str, mode: str = "automatic") -> Path:
    text = GOOD_POLICY.replace("NAME", name).replace("OBJECTIVE", objective)
    path.write_text(text.replace("MODE", mode))
    return path


def placement(lab: Lab) -> dict[str, str | None]:
    """Guest -> the one host it runs on (fails if a guest runs on two)."""
    running: dict[str, str | None] = {}
    for g in lab.guests():
        if g.state == "running":
            assert g.name not in running, f"{g.name} runs on {running[g.name]} and {g.host}"
            running[g.name] = g.host
    return running


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


def test_daemon_balances_reloads_exports_and_feeds_systemd(lab_factory: Any, work: Path) -> None:
    guests = tuple(
        GuestSpec(f"vm{i}", "host1", burn_pct=burn) for i, burn in enumerate((50, 40, 30, 20), 1)
    )
    lab = boot(lab_factory, LabSpec(hosts=3, guests=guests, host_cpus=1))
    policy, config, port, notify, daemon = start(lab, work, "balance-test", "balance")
    try:
        assert notify.wait_for("READY=1", 60), daemon.output()
        count_before = sum("WATCHDOG=1" in m for m in notify.drain())
        time.sleep(3)
        assert sum("WATCHDOG=1" in m for m in notify.drain()) > count_before
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in notify.messages)

        # Balanced within a few cycles: guests spread over more than one host.
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            where = placement(lab)
            hosts_used = {h for h in where.values() if h}
            # (a guest in the middle of a move is not "running" anywhere for a moment)
            if len(hosts_used) >= 2 and len(where) == len(guests):
                break
            time.sleep(2)
        where = placement(lab)
        assert len({h for h in where.values() if h}) >= 2, (where, daemon.output()[-3000:])
        assert set(where) == {g.name for g in guests}, where  # every guest runs somewhere

        # `balancerd status` shows the running daemon's policy and last cycle.
        deadline = time.monotonic() + 60
        while True:  # (the cycle that moved the guests may still be finishing)
            args = ("status", "--config", str(config), "--samples", "2", "--interval", "0.2")
            status = cli_json(*args)["daemon"]
            if status["last_cycle"] or time.monotonic() > deadline:
                break
        assert status["pid"] == daemon.proc.pid and status["policy"] == "balance-test"
        assert status["last_cycle"]["policy"] == "balance-test"
        assert status["last_cycle"]["migrated"] >= 1

        # Real Prometheus scrapes it; every dashboard panel query returns data.
        with Prometheus([f"127.0.0.1:{port}"], work / "prom", scrape_interval_s=1.0) as prom:
            prom.wait_for_scrapes(4)
            assert panels_without_data(prom) == []
            # The placement series follows the guest (the daemon may still be moving it).
            now_on = placement(lab)["vm1"]
            assert prom.wait_for(
                'balancerd_vm_host_info{vm="vm1"}',
                timeout_s=20,
                predicate=lambda rows: len(rows) == 1 and rows[0]["metric"]["host"] == now_on,
            )
        # promtool check metrics on the live endpoint.
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr

        # SIGHUP with a broken policy: keeps running on the old one, counts the failure.
        policy.write_text(policy.read_text().replace("objective: balance", "objective: balanse"))
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_metric(port, "balancerd_reload_failures_total", lambda v: v >= 1, 30), (
            os.kill(daemon.proc.pid, signal.SIGUSR1),
            time.sleep(1),
            daemon.output()[-6000:],
        )
        assert daemon.proc.poll() is None
        assert "reload rejected" in daemon.output()
        assert f"{policy}:" in daemon.output()  # the FILE:LINE error is logged
        assert wait_metric(
            port, "balancerd_policy_info{", lambda v: v == 1, 5, label='policy="balance-test"'
        )
        # With a good one it switches.
        write_policy(policy, "balance-two", "balance")
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_metric(
            port, "balancerd_policy_info{", lambda v: v == 1, 30, label='policy="balance-two"'
        ), daemon.output()[-2000:]
    finally:
        rc = daemon.stop()
        notify.close()
    assert rc == 0, daemon.output()[-3000:]
    assert "Traceback" not in daemon.output(), daemon.output()


def test_power_save_empties_a_host_powers_it_off_and_on_again(lab_factory: Any, work: Path) -> None:
    guests = (GuestSpec("p1", "host1", burn_pct=10), GuestSpec("p2", "host2", burn_pct=10))
    # 512 MiB hosts: with 64 MiB headroom and 90 % max memory, 448 MiB of guests fit one.
    lab = boot(lab_factory, LabSpec(hosts=2, guests=guests, host_cpus=1, host_mem_mib=512))
    _policy, _config, _port, notify, daemon = start(lab, work, "save-test", "power-save")
    try:
        assert notify.wait_for("READY=1", 60), daemon.output()
        deadline = time.monotonic() + 180
        off: list[str] = []
        while time.monotonic() < deadline and not off:
            off = [h for h in lab.host_names() if not lab.is_powered(h)]
            time.sleep(2)
        assert len(off) == 1, daemon.output()[-3000:]
        where = placement(lab)
        assert set(where.values()) == {h for h in lab.host_names() if h not in off}, where
        # Load returns: 256 MiB more than the one active host can hold (memory binds
        # deterministically; CPU readings depend on how busy this machine is).
        active = where["p1"]
        assert active is not None
        lab.start_guest(GuestSpec("p3", active, mem_mib=256))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not lab.is_powered(off[0]):
            time.sleep(2)
        assert lab.is_powered(off[0]), daemon.output()[-3000:]
    finally:
        rc = daemon.stop()
        notify.close()
    assert rc == 0


def wait_metric(port: int, prefix: str, ok: Any, timeout_s: float, label: str = "") -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for line in body.decode().splitlines():
            if line.startswith(prefix) and label in line and ok(float(line.rsplit(" ", 1)[1])):
                return True
        time.sleep(1)
    return False


def test_a_hung_libvirt_call_starves_the_watchdog_until_progress_returns(
    lab_factory: Any, work: Path
) -> None:
    lab = boot(lab_factory, LabSpec(hosts=2, guests=(GuestSpec("w1", "host1"),)))
    # Calls may hang for 120 s (no per-call timeout to save us); 4 s without progress
    # is a stall. libvirt's keepalive (5 s x 3) eventually drops the frozen connection.
    *_, notify, daemon = start(lab, work, "watch", "balance", host_timeout_s=120, stall_timeout_s=4)
    pid = lab.libvirtd_pid("host2")
    assert pid is not None
    try:
        assert notify.wait_for("READY=1", 60), daemon.output()
        os.kill(pid, signal.SIGSTOP)  # host2's libvirtd hangs: every call to it blocks
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "withholding" not in daemon.output():
            time.sleep(0.5)
        assert "withholding the systemd watchdog" in daemon.output(), daemon.output()[-3000:]
        starved_at = len(notify.drain())
        time.sleep(2)
        assert not any("WATCHDOG=1" in m for m in notify.drain()[starved_at:])
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "progress again" not in daemon.output():
            time.sleep(0.5)
        assert "progress again" in daemon.output(), daemon.output()[-3000:]
        fed_at = len(notify.drain())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any("WATCHDOG=1" in m for m in notify.drain()[fed_at:]):
                break
            time.sleep(0.2)
        assert any("WATCHDOG=1" in m for m in notify.drain()[fed_at:])
        assert daemon.proc.poll() is None
    finally:
        os.kill(pid, signal.SIGCONT)
        rc = daemon.stop()
        notify.close()
    assert rc == 0, daemon.output()[-3000:]


def test_recommend_mode_plans_and_exports_but_moves_nothing(lab_factory: Any, work: Path) -> None:
    guests = (GuestSpec("r1", "host1", burn_pct=60), GuestSpec("r2", "host1", burn_pct=60))
    lab = boot(lab_factory, LabSpec(hosts=2, guests=guests, host_cpus=1))
    *_, port, notify, daemon = start(lab, work, "advice", "balance", mode="recommend")
    try:
        assert notify.wait_for("READY=1", 60), daemon.output()
        # The plan is computed and exported (two guests on one host, one empty host)...
        assert wait_metric(port, "balancerd_plan_moves", lambda v: v >= 1, 60), daemon.output()
        assert wait_metric(
            port, "balancerd_skipped_total{", lambda v: v >= 1, 30, label='reason="recommend"'
        )
        assert "plan not executed (recommend mode)" in daemon.output()
        # ...but nothing moves.
        assert placement(lab) == {"r1": "host1", "r2": "host1"}
        assert "result=migrated" not in daemon.output()
    finally:
        rc = daemon.stop()
        notify.close()
    assert rc == 0


DRAIN_STALLING_POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: drain-dirty}
spec:
  objective: balance
  constraints: {maintenance: [host1]}
  limits: {max_cpu_util: 1.0, max_mem_util: 0.9, mem_headroom_mib: 64}
  hysteresis: {min_improvement: 0.0, cooldown_s: 0}
  migration: {bandwidth_mib_s: 50, max_downtime_ms: 50, downtime_steps_ms: [100],
              auto_converge: false, stall_samples: 3, max_time_s: 240, on_stall: pause,
              max_concurrent: 1}
  solver: {time_limit_s: 5}
"""


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def test_pause_and_complete_in_flight_with_its_id_and_labels_the_dashboard_queries(
    lab_factory: Any, work: Path
) -> None:
    """A drain of a guest that cannot converge: while it runs, `status` and the in-flight
    gauge show it with its migration ID; afterwards the real pause-and-complete is counted
    under the enum label values that the dashboard's queries group by."""
    from balancerd.outcomes import FallbackKind, MigrationMode, MoveOutcome, SkipKind

    lab = boot(
        lab_factory,
        LabSpec(hosts=2, guests=(GuestSpec("dirty", "host1", mem_mib=256, dirty_mib=96),)),
    )
    policy = work / "policy.yaml"
    policy.write_text(DRAIN_STALLING_POLICY)
    port = free_port()
    config = write_config(lab, work, policy, port, cycle_interval_s=5)
    notify = NotifySocket(work / "notify.sock")
    daemon = DaemonProc(config, notify, work / "daemon.log")
    try:
        assert notify.wait_for("READY=1", 60), daemon.output()
        # In flight: the status file (through `balancerd status`) and the gauge.
        in_flight: list[dict[str, Any]] = []
        gauge = 0.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (in_flight and gauge >= 1):
            args = ("status", "--config", str(config), "--samples", "1", "--interval", "0.1")
            in_flight = in_flight or cli_json(*args)["daemon"]["in_flight"]
            gauge = max(gauge, scrape(port)[("balancerd_migrations_in_flight", ())])
        assert in_flight and gauge >= 1, daemon.output()[-4000:]
        assert in_flight[0]["vm"] == "dirty" and in_flight[0]["dst"] == "host2"
        migration_id = in_flight[0]["migration_id"]
        assert len(migration_id) == 12, in_flight

        # Done: running on host2 only, via pause-and-complete, under the same ID.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and placement(lab).get("dirty") != "host2":
            time.sleep(2)
        assert placement(lab) == {"dirty": "host2"}, daemon.output()[-4000:]
        assert wait_metric(
            port,
            "balancerd_migrations_total{",
            lambda v: v >= 1,
            60,
            label='mode="paused-fallback",result="migrated"',
        ), daemon.output()[-4000:]
        assert f"id={migration_id}" in daemon.output()
        samples = scrape(port)
        assert samples[("balancerd_fallbacks_total", (("kind", "pause"),))] == 1.0
        assert samples[("balancerd_migrations_in_flight", ())] == 0.0
        # Every label value the daemon exported is one the enums (and so the dashboard)
        # know: nothing drifted into a free-text or legacy value.
        declared = {
            "mode": {m.value for m in MigrationMode},
            "result": {o.value for o in MoveOutcome},
            "kind": {k.value for k in FallbackKind},
            "reason": {k.value for k in SkipKind},
        }
        for (name, labels), _v in samples.items():
            if name in ("balancerd_migrations_total", "balancerd_fallbacks_total") or (
                name == "balancerd_skipped_total"
            ):
                for key, val in labels:
                    assert val in declared[key], (name, key, val)
        # The dashboard's own queries, run by a real Prometheus, show these values.
        dashboard = (REPO / "dashboards" / "balancerd.json").read_text()
        queries = (
            "sum by (mode, result) (increase(balancerd_migrations_total[5m]))",
            "sum by (kind) (increase(balancerd_fallbacks_total[5m]))",
        )
        for q in queries:
            assert q in dashboard, q
        with Prometheus([f"127.0.0.1:{port}"], work / "prom", scrape_interval_s=1.0) as prom:
            prom.wait_for_scrapes(3)
            rows = prom.wait_for(
                f"({queries[0]}) >= 0",
                predicate=lambda rows: any(
                    r["metric"].get("mode") == "paused-fallback" for r in rows
                ),
            )
            assert {r["metric"]["mode"] for r in rows} <= declared["mode"]
            kinds = prom.wait_for(f"({queries[1]}) >= 0")
            assert "pause" in {r["metric"]["kind"] for r in kinds}
    finally:
        rc = daemon.stop()
        notify.close()
    assert rc == 0, daemon.output()[-3000:]


def test_the_first_decision_comes_once_the_smoothing_window_is_full(
    lab_factory: Any, work: Path
) -> None:
    """With a 300 s cycle interval, the first plan still comes right after the smoothing
    window (3 samples, 1 s apart) is full, not five minutes later."""
    guests = (GuestSpec("f1", "host1"), GuestSpec("f2", "host1"))
    lab = boot(lab_factory, LabSpec(hosts=2, guests=guests, host_cpus=1))
    *_, notify, daemon = start(
        lab, work, "first", "balance", mode="recommend", cycle_interval_s=300
    )
    try:
        assert notify.wait_for("READY=1", 60), daemon.output()
        ready_at = time.monotonic()
        deadline = ready_at + 60
        while "plan policy=" not in daemon.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        waited_s = time.monotonic() - ready_at
        assert "plan policy=" in daemon.output(), daemon.output()[-2000:]
        # READY comes at 2 samples; the window is full one collect interval (1 s) later.
        assert waited_s <= 1.0 + 5.0, waited_s
    finally:
        rc = daemon.stop()
        notify.close()
    assert rc == 0
