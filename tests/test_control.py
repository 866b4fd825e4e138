"""The control socket in-process (no libvirt): a real Daemon on the simulated hypervisor,
driven through its Unix socket as ``balancerd drain``/``pause``/``cycle``/``apply`` would:
drains that persist and empty a host, pause that plans and moves nothing, approval of the
latest plan with a stale step, the protocol's errors, and who may connect."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancerd.config import Config, load_config
from balancerd.control_client import (
    ControlBadRequest,
    ControlError,
    NoDaemon,
    request,
)
from balancerd.daemon import Daemon
from balancerd.daemon.control import ControlServer, ControlUnavailable
from balancerd.daemon_state import STATUS_FILE
from balancerd.hypervisor.base import Hypervisor
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.notify import Notifier
from balancerd.operator import OPERATOR_FILE
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.units import GIB
from balancerd.wiring import daemon_snapshot

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534

POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: ctl}
spec:
  objective: balance
  mode: MODE
  limits: {max_cpu_util: 0.9, max_mem_util: 0.9, mem_headroom_mib: 0}
  hysteresis: {min_improvement: 0.01, cooldown_s: 0}
  migration: {max_concurrent: 1, max_concurrent_per_host: 1}
  forecast: {quantile: 0.5, window_s: 600}
EXTRA"""


def write_config(folder: Path, mode: str, extra: str = "") -> Path:
    (folder / "policy.yaml").write_text(POLICY.replace("MODE", mode).replace("EXTRA", extra))
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


BUSY = {f"vm{i}": 1.5 for i in range(4)}


class Harness:
    """A daemon on three simulated 4-core hosts, four busy guests on h1, and its control
    socket in a short temporary folder (AF_UNIX paths are limited to 108 bytes)."""

    def __init__(
        self, folder: Path, sock_dir: Path, mode: str = "automatic", extra: str = ""
    ) -> None:
        self.folder = folder
        self.config = write_config(folder, mode, extra)
        self.hv = SimHypervisor(
            [SimHost(f"h{i}", cpus=4, cpu_mhz=2000, mem_bytes=16 * GIB) for i in (1, 2, 3)]
        )
        for i in range(4):
            self.hv.add_vm("h1", SimVm(f"vm{i}", vcpus=2, mem_bytes=1 * GIB, uuid=f"u-vm{i}"))
        self.sock = sock_dir / "ctl.sock"
        self.registry = CollectorRegistry()
        self.daemon = self.make_daemon()

    def make_daemon(self) -> Daemon:
        def factory(_config: Config) -> Hypervisor:
            return self.hv

        self.registry = CollectorRegistry()
        return Daemon(
            str(self.config),
            hypervisor_factory=factory,
            notifier=Notifier(),
            registry=self.registry,
            serve_metrics=False,
            clock=lambda: self.hv.clock_s + 1_000_000.0,
            control_socket=self.sock,
        )

    def restart(self) -> None:
        self.daemon.shutdown()
        self.daemon = self.make_daemon()
        self.daemon.start(schedule_jobs=False)

    def collect(self, times: int = 1) -> None:
        for _ in range(times):
            self.hv.advance(10.0, BUSY)
            self.daemon.collect_once()

    def ask(self, cmd: str, **args: Any) -> dict[str, Any]:
        return request(self.sock, cmd, timeout_s=60, **args)

    def where(self) -> dict[str, list[str]]:
        return {name: sorted(h.vms) for name, h in self.hv.hosts.items()}

    def metric(self, name: str, **labels: str) -> float | None:
        for family in text_string_to_metric_families(generate_latest(self.registry).decode()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return None

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no requested cycle is pending or running."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.daemon._cycle_pending and self.daemon._act_lock.acquire(timeout=0.1):
                self.daemon._act_lock.release()
                return
            time.sleep(0.05)
        raise AssertionError("the daemon did not become idle")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bctl"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def started(tmp_path: Path, sock_dir: Path, mode: str = "automatic", extra: str = "") -> Harness:
    h = Harness(tmp_path, sock_dir, mode, extra)
    h.daemon.start(schedule_jobs=False)
    h.collect(3)
    return h


@pytest.fixture
def harness(tmp_path: Path, sock_dir: Path) -> Iterator[Harness]:
    h = started(tmp_path, sock_dir)
    yield h
    h.daemon.shutdown()


# --- drain / undrain ------------------------------------------------------------------------


def test_drain_empties_the_host_persists_and_shows_in_status_and_metrics(
    harness: Harness,
) -> None:
    out = harness.ask("drain", host="h1", reason="new DIMMs")
    assert out["host"] == "h1" and not out["already"]
    assert sorted(out["guests"]) == [f"vm{i}" for i in range(4)]
    assert out["drain"]["by"] == "root (uid 0)" and out["drain"]["reason"] == "new DIMMs"
    harness.wait_idle()  # the drain asked for a cycle at once
    assert harness.where()["h1"] == [], harness.where()
    harness.collect()
    status = harness.ask("drain-status", host="h1")
    assert status["empty"] and status["drained"] and status["cycle_since_drain"]
    # On disk, in the status file and in the metrics.
    saved = json.loads((harness.folder / "state" / OPERATOR_FILE).read_text())
    assert list(saved["drains"]) == ["h1"]
    daemon_status = json.loads((harness.folder / "state" / STATUS_FILE).read_text())
    assert "h1" in daemon_status["drains"]
    assert daemon_status["control_socket"] == str(harness.sock)
    assert harness.metric("balancerd_host_maintenance", host="h1", source="operator") == 1.0
    # A restarted daemon still keeps h1 empty: more load does not bring guests back.
    harness.restart()
    harness.collect(3)
    assert "h1" in harness.ask("status")["drains"]
    report = harness.daemon.cycle_once()
    assert report is not None
    assert all(m.dst != "h1" for m in report.plan.moves)
    assert harness.where()["h1"] == []


def test_undrain_lets_guests_return_under_balance(harness: Harness) -> None:
    harness.ask("drain", host="h1")
    harness.wait_idle()
    assert harness.where()["h1"] == []
    harness.collect(2)
    out = harness.ask("undrain", host="h1")
    assert out["was_drained"] and not out["policy_maintenance"]
    assert harness.ask("undrain", host="h1")["was_drained"] is False  # idempotent
    report = harness.daemon.cycle_once()
    assert report is not None and report.executed
    assert any(m.dst == "h1" for m in report.plan.moves), report.plan
    assert harness.where()["h1"], harness.where()
    assert harness.metric("balancerd_host_maintenance", host="h1", source="operator") is None


def test_drain_status_names_a_guest_that_cannot_leave(tmp_path: Path, sock_dir: Path) -> None:
    """vm0 may only run on h1: draining h1 leaves it there, and --wait can tell at once."""
    h = started(tmp_path, sock_dir, extra="  constraints: {pin: {vm0: [h1]}}\n")
    try:
        h.ask("drain", host="h1")
        h.wait_idle()
        h.collect()
        status = h.ask("drain-status", host="h1")
        assert not status["empty"]
        assert [g["vm"] for g in status["guests"]] == ["vm0"]
        (g,) = status["guests"]
        assert g["stuck"] and "vm0" in g["why"], g
        assert status["cycle_since_drain"] and not status["in_flight"]
    finally:
        h.daemon.shutdown()


def test_a_label_selector_drains_and_shows_in_status_and_metrics(
    tmp_path: Path, sock_dir: Path
) -> None:
    """maintenance by label: the daemon resolves it on its snapshot each cycle, and status
    and the maintenance metric name the host it matched."""
    extra = "  constraints: {maintenance: [{hosts: {labels: {gen: g4}}}]}\n"
    h = Harness(tmp_path, sock_dir, extra=extra)
    h.hv.hosts["h1"].labels = {"gen": "g4"}
    h.daemon.start(schedule_jobs=False)
    try:
        h.collect(3)
        report = h.daemon.cycle_once()
        assert report is not None and report.executed
        assert h.where()["h1"] == [], h.where()
        assert h.ask("status")["maintenance"] == ["h1"]
        assert h.metric("balancerd_host_maintenance", host="h1", source="policy") == 1.0
        assert h.metric("balancerd_host_maintenance", host="h2", source="policy") is None
    finally:
        h.daemon.shutdown()


def test_drain_of_an_unknown_host_is_bad_input(harness: Harness) -> None:
    with pytest.raises(ControlBadRequest, match=r"unknown host 'h9' \(configured: h1, h2, h3\)"):
        harness.ask("drain", host="h9")
    assert not (harness.folder / "state" / OPERATOR_FILE).exists()


# --- pause / resume -------------------------------------------------------------------------


def test_pause_plans_and_moves_nothing_across_a_restart_until_resume(harness: Harness) -> None:
    out = harness.ask("pause", reason="incident 42")
    assert not out["already"] and out["paused"]["reason"] == "incident 42"
    report = harness.daemon.cycle_once()
    assert report is not None and report.held_back is SkipKind.PAUSED
    assert report.plan.moves and not report.results  # planned, not executed
    assert harness.where()["h1"] == [f"vm{i}" for i in range(4)]
    assert harness.metric("balancerd_skipped_total", reason="paused") == len(report.plan.moves)
    assert harness.metric("balancerd_paused") == 1.0
    harness.restart()
    harness.collect(3)
    report = harness.daemon.cycle_once()
    assert report is not None and report.held_back is SkipKind.PAUSED
    assert harness.where()["h1"] == [f"vm{i}" for i in range(4)]
    resumed = harness.ask("resume")
    assert resumed["was_paused"] and resumed["paused"]["reason"] == "incident 42"
    report = harness.daemon.cycle_once()
    assert report is not None and report.executed and report.count(MoveOutcome.MIGRATED)
    assert len(harness.where()["h1"]) < 4


def test_a_pause_during_a_plan_stops_the_moves_not_yet_started(harness: Harness) -> None:
    original = harness.hv.migrate
    calls: list[str] = []

    def migrate_then_pause(req: Any) -> None:
        calls.append(req.vm)
        original(req)
        if len(calls) == 1:
            harness.daemon.operator.pause("test", "mid-plan")

    harness.hv.migrate = migrate_then_pause  # type: ignore[method-assign]
    report = harness.daemon.cycle_once()
    assert report is not None and len(report.plan.moves) >= 2, report.plan
    assert len(calls) == 1
    assert report.results[0].outcome is MoveOutcome.MIGRATED
    rest = report.results[1:]
    assert rest and all(r.skip_kind is SkipKind.PAUSED for r in rest), rest


# --- cycle --------------------------------------------------------------------------------


def test_cycle_now_streams_the_moves_and_returns_the_summary(harness: Harness) -> None:
    lines: list[str] = []
    out = request(harness.sock, "cycle", timeout_s=60, on_progress=lines.append)
    c = out["cycle"]
    assert c["planned_moves"] >= 1 and c["migrated"] == c["planned_moves"]
    assert any(line.startswith("plan ctl:") for line in lines), lines
    started_lines = [line for line in lines if ": started (id " in line]
    assert len(started_lines) == c["migrated"], lines
    assert [r["result"] for r in out["results"]] == ["migrated"] * c["migrated"]


# --- approving the latest plan --------------------------------------------------------------


def test_apply_latest_runs_the_recommended_plan_and_skips_a_stale_step(
    tmp_path: Path, sock_dir: Path
) -> None:
    h = started(tmp_path, sock_dir, mode="recommend")
    try:
        report = h.daemon.cycle_once()
        assert report is not None and report.held_back is SkipKind.RECOMMEND
        moves = report.plan.moves
        assert len(moves) >= 2, report.plan
        # An operator moves the first planned guest by hand to the third host.
        first = moves[0]
        other = next(n for n in ("h2", "h3") if n != first.dst)
        h.hv.hosts[other].vms[first.vm] = h.hv.hosts["h1"].vms.pop(first.vm)
        out = h.ask("approve", latest=True)
        checks = {c["vm"]: c for c in out["checks"]}
        assert not checks[first.vm]["valid"]
        assert checks[first.vm]["skip_kind"] == "gone"
        assert f"is on {other} now, not on h1" in checks[first.vm]["reason"]
        results = {r["vm"]: r for r in out["results"]}
        assert results[first.vm]["result"] == "skipped"
        assert results[first.vm]["reason"].startswith("stale step: ")
        for m in moves[1:]:
            assert results[m.vm]["result"] == "migrated", results[m.vm]
            assert m.vm in h.where()[m.dst]
        # The approval is in the history with its moves.
        approved = [c for c in h.ask("history")["cycles"] if c["kind"] == "approved"]
        assert len(approved) == 1 and approved[0]["migrated"] == len(moves) - 1
        # Approving the same plan again finds every step done or stale: nothing runs twice.
        again = h.ask("approve", latest=True)
        assert all(r["result"] == "skipped" for r in again["results"])
    finally:
        h.daemon.shutdown()


def test_apply_latest_is_refused_while_paused_and_after_an_executed_plan(
    harness: Harness,
) -> None:
    harness.ask("pause")
    with pytest.raises(ControlError, match=r"balancerd is paused .*`balancerd resume` first"):
        harness.ask("approve", latest=True)
    harness.ask("resume")
    report = harness.daemon.cycle_once()
    assert report is not None and report.results
    with pytest.raises(ControlError, match="was executed by its cycle"):
        harness.ask("approve", latest=True)


def test_an_approved_plan_document_is_checked_against_capacity(harness: Harness) -> None:
    """A saved plan sent over the socket: a step into a host that is full now is stale."""
    from balancerd.rationale import explain_moves
    from balancerd.saved_plan import plan_document

    harness.ask("pause")
    report = harness.daemon.cycle_once()
    harness.ask("resume")
    assert report is not None and report.plan.moves
    latest = harness.daemon.latest()
    assert latest.inputs is not None
    whys = explain_moves(latest.inputs.planning, latest.inputs.policy, report.plan)
    doc = plan_document(report.plan, latest.inputs.snapshot, latest.inputs.policy, whys,
                        created_at_s=time.time())  # fmt: skip
    # Fill the first move's destination with a 14 GiB guest (90 % of 16 GiB allowed).
    dst = report.plan.moves[0].dst
    harness.hv.add_vm(dst, SimVm("big", vcpus=1, mem_bytes=14 * GIB))
    out = harness.ask("approve", plan=doc, source="test")
    first = out["checks"][0]
    assert not first["valid"] and first["skip_kind"] == "stale"
    assert f"{dst} has no room for it now: memory" in first["reason"], first


# --- the protocol -------------------------------------------------------------------------


def raw(sock: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(payload)
        data = s.makefile("rb").readline()
    reply: dict[str, Any] = json.loads(data)
    return reply


def test_protocol_errors_are_answered_with_their_kind(harness: Harness) -> None:
    assert raw(harness.sock, b"not json\n")["kind"] == "bad-request"
    reply = raw(harness.sock, b'{"v": 2, "cmd": "status"}\n')
    assert reply["kind"] == "version" and "speaks 1" in reply["error"]
    reply = raw(harness.sock, b'{"v": 1, "cmd": "reboot"}\n')
    assert reply["kind"] == "bad-request" and "unknown command 'reboot'" in reply["error"]
    assert raw(harness.sock, b'{"v": 1, "cmd": "status"}\n')["ok"] is True
    assert harness.metric("balancerd_control_requests_total", command="other", result="error")


def test_commands_without_a_daemon_say_so_in_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    with pytest.raises(NoDaemon, match="no balancerd daemon answers on"):
        request(sock, "status")
    for argv in (["drain", "h1"], ["pause"], ["cycle"], ["undrain", "h1"], ["resume"]):
        done = subprocess.run(
            [sys.executable, "-m", "balancerd.cli", *argv, "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert done.returncode == 1, (argv, done.stderr)
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert done.stderr.startswith("error: no balancerd daemon answers on"), done.stderr


def test_a_second_server_on_the_same_socket_is_refused(harness: Harness) -> None:
    second = ControlServer(harness.sock, lambda *_a: {})
    with pytest.raises(ControlUnavailable, match="another balancerd serves"):
        second.start()
    assert harness.ask("status")["ok"]  # the first one still serves


# --- who may connect ------------------------------------------------------------------------


def as_user(sock: Path, groups: list[int]) -> dict[str, Any]:
    """``status`` from a forked child that runs as uid/gid 65534 with ``groups``.
    (Forked, not exec'd: the venv's interpreter lives where that user may not read.)"""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, ask, report through the pipe, exit
        code = 0
        try:
            os.close(read_fd)
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = request(sock, "status", timeout_s=20)
                reply: dict[str, Any] = {"ok": True, "policy": out["policy"]}
            except ControlError as exc:
                reply = {"ok": False, "kind": exc.kind, "error": str(exc)}
            os.write(write_fd, json.dumps(reply).encode())
        except BaseException as exc:
            os.write(write_fd, json.dumps({"child_error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    reply = json.loads(data)
    assert os.WEXITSTATUS(status) == 0, reply
    return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_the_socket_refuses_a_user_outside_the_service_group(harness: Harness) -> None:
    os.chmod(harness.sock.parent, 0o755)  # let the other user reach the folder
    st = os.stat(harness.sock)
    assert st.st_mode & 0o777 == 0o660 and st.st_uid == os.geteuid()
    # The file mode keeps the stranger out...
    reply = as_user(harness.sock, [])
    assert reply == {"ok": False, "kind": "refused", "error": reply["error"]}
    assert "permission denied" in reply["error"] and "member of group" in reply["error"]
    # ...and so do its kernel credentials when the mode was opened by mistake.
    os.chmod(harness.sock, 0o666)
    reply = as_user(harness.sock, [])
    assert reply["kind"] == "refused", reply
    assert "nobody (uid 65534) may not control balancerd" in reply["error"], reply
    assert harness.metric("balancerd_control_requests_total", command="other", result="refused")
    # A member of the socket's group may.
    os.chmod(harness.sock, 0o660)
    assert as_user(harness.sock, [st.st_gid]) == {"ok": True, "policy": "ctl"}


def test_a_standby_refuses_commands_that_act_and_answers_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With coordination, drains kept by a standby would never reach the leader."""
    monkeypatch.setattr(harness.daemon.coord, "not_leading", lambda: "mgmt2 leads")
    for cmd, args in (("drain", {"host": "h1"}), ("pause", {}), ("cycle", {})):
        with pytest.raises(ControlError, match=r"does not act: mgmt2 leads; run the command on"):
            harness.ask(cmd, **args)
    assert harness.ask("status")["drains"] == {}
    assert not (harness.folder / "state" / OPERATOR_FILE).exists()


def test_drain_moves_a_stopped_guest_and_names_an_unmovable_one(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A drain empties h1 of the stopped guest too (cold); the guest with a PCI device
    stays, and drain-status says why."""
    from balancerd.model import Blocker
    from balancerd.outcomes import BlockerKind

    h = started(tmp_path, sock_dir)
    try:
        h.hv.hosts["h1"].vms["vm0"].blockers = (Blocker(BlockerKind.HOSTDEV, "pci 0000:03:00.0"),)
        h.hv.add_vm("h1", SimVm("off", vcpus=1, mem_bytes=GIB, state="shutoff"))
        h.collect()
        out = h.ask("drain", host="h1")
        assert "off" in out["guests"]
        h.wait_idle()
        h.collect()
        assert h.where()["h1"] == ["vm0"], h.where()
        status = h.ask("drain-status", host="h1")
        assert not status["empty"]
        (g,) = status["guests"]
        assert g["vm"] == "vm0" and g["stuck"], g
        assert "cannot be live-migrated (hostdev: pci 0000:03:00.0)" in g["why"], g
    finally:
        h.daemon.shutdown()


# --- the snapshot for plan / status -------------------------------------------------------


def test_plan_and_status_take_the_running_daemons_snapshot(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BALANCERD_CONTROL_SOCKET", str(harness.sock))
    found = daemon_snapshot(load_config(harness.config))
    assert found is not None
    snapshot, source = found
    assert snapshot == harness.daemon.latest().snapshot  # every field, through JSON
    assert source.kind == "daemon" and source.age_s is not None
    assert "smoothed over 2 samples" in source.detail


def test_without_a_daemon_there_is_no_daemon_snapshot(
    tmp_path: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BALANCERD_CONTROL_SOCKET", str(sock_dir / "none.sock"))
    assert daemon_snapshot(load_config(write_config(tmp_path, "automatic"))) is None


def test_a_daemon_without_a_snapshot_yet_says_so(tmp_path: Path, sock_dir: Path) -> None:
    h = Harness(tmp_path, sock_dir)
    h.daemon.start(schedule_jobs=False)
    try:
        with pytest.raises(ControlError, match="no snapshot yet"):
            h.ask("snapshot")
    finally:
        h.daemon.shutdown()
