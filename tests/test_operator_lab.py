"""Operator control on a real lab, through the running daemon and the real CLI:
``drain --wait`` empties a host of three guests, ``undrain`` lets them come back under
balance, ``plan --save`` then ``apply --plan`` runs the saved moves and skips the step an
operator made stale by moving its guest by hand, ``history`` and ``explain`` show the
moves with their benefit and cost, and the control socket refuses a user outside its group.

Lab "bop" on 10.77.13.0/24, three hosts, three quiet 128 MiB guests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancerd.control_client import ControlError, request
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.lab.faults import DaemonProcess, free_port, wait_until
from balancerd.lab.system import run

pytestmark = pytest.mark.lab

LAB_NAME, LAB_SUBNET = "bop", "10.77.13"
GUESTS = ("d1", "d2", "d3")
NOBODY = 65534

POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {{name: {name}}}
spec:
  objective: balance
  limits: {{max_cpu_util: 1.0, max_mem_util: 0.9, mem_headroom_mib: 64}}
  hysteresis: {{min_improvement: {min_improvement}, cooldown_s: 0}}
  migration: {{bandwidth_mib_s: 300, max_downtime_ms: 300, max_concurrent: 2,
              max_concurrent_per_host: 1, max_time_s: 120}}
  solver: {{time_limit_s: 5}}
"""


@pytest.fixture(scope="module")
def lab(lab_factory_module: Any) -> Lab:
    spec = LabSpec(hosts=3, guests=tuple(GuestSpec(g, "host2") for g in GUESTS))
    made: Lab = lab_factory_module(LAB_NAME, LAB_SUBNET)(spec)
    for g in GUESTS:
        made.wait_booted(g)
    return made


class Operator:
    """A running daemon on the lab and the CLI an operator types, with one work folder."""

    def __init__(self, lab: Lab, work: Path, sock_dir: Path, min_improvement: float) -> None:
        self.lab = lab
        self.work = work
        self.policy = work / "policy.yaml"
        self.write_policy("calm", min_improvement)
        cfg: dict[str, Any] = yaml.safe_load(lab.config_path.read_text())
        cfg.update(
            policy=str(self.policy),
            metrics={"listen": f"127.0.0.1:{free_port()}"},
            state_dir=str(work / "state"),
            collect_interval_s=1,
            cycle_interval_s=3600,  # cycles come when asked: drain, `balancerd cycle`
            smoothing_window=2,
            host_timeout_s=5,
        )
        self.config = work / "balancerd.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.sock = sock_dir / "control.sock"
        self.env = {**os.environ, "BALANCERD_CONTROL_SOCKET": str(self.sock)}
        self.daemon = DaemonProcess(self.config, work / "daemon.log", env=self.env)
        self.daemon.wait_ready()
        wait_until(lambda: self.cli("drain").returncode == 0, 30, "the control socket")

    def write_policy(self, name: str, min_improvement: float) -> None:
        self.policy.write_text(POLICY.format(name=name, min_improvement=min_improvement))

    def cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "balancerd.cli", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=self.env,
        )

    def ok(self, *args: str, timeout_s: float = 300) -> str:
        done = self.cli(*args, timeout_s=timeout_s)
        assert done.returncode == 0, (args, done.stdout, done.stderr, self.daemon.output()[-3000:])
        return done.stdout

    def placement(self) -> dict[str, str]:
        where: dict[str, str] = {}
        for g in self.lab.guests():
            if g.state == "running":
                assert g.name not in where, f"{g.name} runs on {where[g.name]} and {g.host}"
                where[g.name] = g.host
        return where

    def stop(self) -> None:
        rc = self.daemon.stop()
        assert rc == 0, self.daemon.output()[-3000:]
        assert "Traceback" not in self.daemon.output(), self.daemon.output()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bop"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_drain_wait_empties_a_host_and_undrain_lets_guests_back(
    lab: Lab, tmp_path: Path, sock_dir: Path
) -> None:
    # min_improvement 0.5: balance alone moves nothing; a drain is forced anyway.
    op = Operator(lab, tmp_path, sock_dir, min_improvement=0.5)
    try:
        assert op.placement() == dict.fromkeys(GUESTS, "host2")
        assert op.ok("drain").strip() == "no host is drained"

        started = time.monotonic()
        done = op.cli("drain", "host2", "--wait", "--timeout", "300", "--reason", "lab test")
        took = time.monotonic() - started
        assert done.returncode == 0, (done.stdout, done.stderr, op.daemon.output()[-4000:])
        assert done.stdout.startswith("host2 is empty (waited "), done.stdout
        assert "host2 drained: 3 guest(s) to move (d1, d2, d3)" in done.stderr
        progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
        assert progress and "host2: " in progress[0] and "left" in progress[0], done.stderr
        assert any("migrating to host" in line for line in progress), done.stderr
        where = op.placement()
        assert set(where) == set(GUESTS) and "host2" not in where.values(), where
        print(f"\ndrain --wait took {took:.0f} s; progress lines:\n" + "\n".join(progress))

        # Shown in status (the daemon's state) and in the drain list.
        status = json.loads(op.ok("status", "--json", "--samples", "2", "--interval", "0.2"))
        assert status["daemon"]["drains"]["host2"]["reason"] == "lab test"
        assert op.ok("drain").startswith("host2: drained by root (uid 0) since ")

        # Undrain, with a policy that balances: a guest comes back to host2.
        op.write_policy("balance", 0.02)
        op.daemon.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded config=" in op.daemon.output(), 30, "the reload")
        assert op.ok("undrain", "host2").startswith("host2 undrained (drained by root")
        out = op.ok("cycle", "--timeout", "300")
        assert "migrated" in out and "0 failed" in out, out
        where = op.placement()
        assert "host2" in where.values() and set(where) == set(GUESTS), where

        # History and explain: the drain moves with their reason, benefit and cost.
        cycles = json.loads(op.ok("history", "--json", "--since", "1h"))
        moves = [m for c in cycles for m in c["moves"] if m["outcome"] == "migrated"]
        drained = [m for m in moves if m["from"] == "host2" and "drained" in m["why"]]
        assert len(drained) >= 3, cycles
        for m in drained:
            assert m["why"] == "host2 is drained by the operator"
            assert m["cost"]["gib"] == 0.125 and m["cost"]["expected_s"] > 0
            assert m["cost"]["downtime_ms"] == 300 and m["migration_id"]
            assert m["benefit"] is not None
        back = [m for m in moves if m["to"] == "host2"]
        assert back and back[0]["benefit"] > 0, back
        text = op.ok("history", "--since", "1h")
        assert "benefit" in text and "cost 0.12 GiB" in text, text
        vm = back[0]["vm"]
        explained = op.ok("explain", vm)
        assert "from host2 to " in explained and "host2 is drained by the operator" in explained
        assert "to host2: " in explained and "at a cost of 0.12 GiB" in explained, explained
        print(f"\n$ balancerd explain {vm}\n{explained}")
        print("$ balancerd history --since 1h\n" + text)
    finally:
        op.stop()


def test_plan_save_then_apply_plan_skips_the_step_moved_by_hand(
    lab: Lab, tmp_path: Path, sock_dir: Path
) -> None:
    op = Operator(lab, tmp_path, sock_dir, min_improvement=0.5)
    try:
        before = op.placement()
        # A plan that gathers every guest on host3 (the others in maintenance).
        gather = tmp_path / "gather.yaml"
        gather.write_text(
            POLICY.format(name="gather", min_improvement=0.0).replace(
                "  solver:", "  constraints: {maintenance: [host1, host2]}\n  solver:"
            )
        )
        if sum(h != "host3" for h in before.values()) < 2:
            # (after the first test the guests may sit anywhere: make two leave host3)
            for vm in [v for v, h in before.items() if h == "host3"][:2]:
                hand_migrate(lab, vm, "host3", "host1")
            before = op.placement()
        saved = tmp_path / "plan.json"
        plan_out = op.cli(
            "plan", "--policy", str(gather), "--save", str(saved), "--samples", "2", "--json"
        )
        assert plan_out.returncode == 0, plan_out.stderr
        plan = json.loads(plan_out.stdout)
        assert plan["saved"] == str(saved) and "approve it with" in plan_out.stderr
        moves = plan["moves"]
        assert len(moves) >= 2 and all(m["to"] == "host3" for m in moves), moves
        for m in moves:  # plan --json carries each move's benefit and cost
            assert m["why"].endswith("is in maintenance (policy gather)"), m
            assert m["cost"]["gib"] == 0.125 and m["benefit"] is not None
        doc = json.loads(saved.read_text())
        assert doc["kind"] == "balancerd-plan" and len(doc["snapshot"]["vms"]) == 3

        # An operator moves the first planned guest by hand, to the host it did not plan.
        stale = moves[0]
        other = next(h for h in ("host1", "host2") if h != stale["from"])
        hand_migrate(lab, stale["vm"], stale["from"], other)
        wait_until(lambda: op.placement().get(stale["vm"]) == other, 60, "the hand move")

        done = op.cli("apply", "--plan", str(saved), "--json")
        assert done.returncode == 0, (done.stdout, done.stderr, op.daemon.output()[-4000:])
        results = {r["vm"]: r for r in json.loads(done.stdout)}
        assert results[stale["vm"]]["result"] == "skipped"
        assert results[stale["vm"]]["skip_kind"] == "gone"
        assert results[stale["vm"]]["reason"] == (
            f"stale step: {stale['vm']} is on {other} now, not on {stale['from']} where the "
            "plan found it (moved since)"
        )
        assert f"{stale['vm']} {stale['from']}->host3: stale, skipped:" in done.stderr
        for m in moves[1:]:
            assert results[m["vm"]]["result"] == "migrated", results[m["vm"]]
        where = op.placement()
        assert where[stale["vm"]] == other
        assert all(where[m["vm"]] == "host3" for m in moves[1:]), where

        # The approval is in the history; explain tells the approved move and the skip.
        cycles = json.loads(op.ok("history", "--json", "--since", "1h"))
        approved = [c for c in cycles if c["kind"] == "approved"]
        assert len(approved) == 1 and approved[0]["skipped"] == 1, approved
        explained = op.ok("explain", moves[1]["vm"])
        assert "(approved plan)" in explained and "at a cost of 0.12 GiB" in explained
        print(f"\n$ balancerd explain {moves[1]['vm']}\n{explained}")
        skipped = op.ok("explain", stale["vm"])
        assert "skipped: stale step:" in skipped, skipped
    finally:
        op.stop()


def test_the_control_socket_refuses_a_user_outside_its_group(
    lab: Lab, tmp_path: Path, sock_dir: Path
) -> None:
    op = Operator(lab, tmp_path, sock_dir, min_improvement=0.5)
    try:
        os.chmod(sock_dir, 0o755)
        st = os.stat(op.sock)
        assert oct(st.st_mode & 0o777) == "0o660"
        reply = as_nobody(op.sock, [])
        assert reply["kind"] == "refused" and "permission denied" in reply["error"], reply
        os.chmod(op.sock, 0o666)  # a mistake: the daemon still checks who connects
        reply = as_nobody(op.sock, [])
        assert reply["kind"] == "refused", reply
        assert "nobody (uid 65534) may not control balancerd" in reply["error"]
        assert "control: refused" in op.daemon.output()
        assert as_nobody(op.sock, [st.st_gid]) == {"ok": True, "paused": None}
        # Nothing was changed by the refused peer; root still may.
        assert request(op.sock, "status")["paused"] is None
    finally:
        op.stop()


def hand_migrate(lab: Lab, vm: str, src: str, dst: str) -> None:
    """What an operator does with virsh: a live peer-to-peer migration."""
    run(
        [
            "virsh", "-q", "-c", lab.host_uri(src), "migrate", "--live", "--p2p",
            "--persistent", "--undefinesource", vm, lab.host_uri(dst),
            "--migrateuri", lab.migration_uri(dst),
        ],
        timeout_s=120,
    )  # fmt: skip


def as_nobody(sock: Path, groups: list[int]) -> dict[str, Any]:
    """``status`` from a forked child running as uid/gid 65534 with ``groups``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_fd)
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = request(sock, "status", timeout_s=20)
                reply: dict[str, Any] = {"ok": True, "paused": out["paused"]}
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
