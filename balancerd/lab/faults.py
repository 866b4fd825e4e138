"""The fault matrix: faults injected into a running balancerd on a real lab, each at a
precise moment, each checked by one invariant checker.

Used by ``tests/test_faults_lab.py`` (``pytest -m faults``) and by
``scripts/fault_matrix.py``, which prints the table (docs/faults.md).

Every row ends the same way: the acting daemon is stopped (SIGTERM), a *checker* daemon
starts on the same state directory in recommend mode (it reconciles, collects, plans, and
moves nothing), and the invariant is checked:
  * each guest (by UUID) that existed runs on exactly one host and is defined on at most
    one; none is paused unless it was paused before;
  * no journal entry is left open;
  * the daemon under test was running, or exited with one clear line and a non-zero status
    where that is the right answer (the row says which).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balancerd.execute.journal import JOURNAL_FILE
from balancerd.lab.cluster import GuestSpec, Lab
from balancerd.lab.system import run

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"

DRAIN = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {{name: {name}}}
spec:
  objective: balance
  mode: {mode}
  constraints: {{maintenance: [host1]}}
  limits: {{max_cpu_util: 1.0, max_mem_util: 0.95, mem_headroom_mib: 32}}
  hysteresis: {{min_improvement: 0.0, cooldown_s: 0}}
  migration: {{bandwidth_mib_s: {bandwidth}, max_downtime_ms: 50, downtime_steps_ms: [100],
              auto_converge: false, stall_samples: {stall_samples}, max_time_s: {max_time_s},
              on_stall: {on_stall}, max_concurrent: 1, allow_cold: {allow_cold}}}
  solver: {{time_limit_s: 5}}
"""

POWER_SAVE = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: save}
spec:
  objective: power-save
  limits: {max_cpu_util: 1.0, max_mem_util: 0.95, mem_headroom_mib: 32}
  hysteresis: {min_improvement: 0.0, cooldown_s: 0}
  power: {min_active_hosts: 1, grace_period_s: 2, min_off_s: 5, reserve_hosts: 0}
  solver: {time_limit_s: 5}
"""

DIRTY = GuestSpec("dirty", "host1", mem_mib=256, dirty_mib=96)
QUIET = GuestSpec("quiet", "host1", mem_mib=128)


def drain_policy(
    *,
    mode: str = "automatic",
    stall_samples: int = 30,
    max_time_s: int = 240,
    on_stall: str = "pause",
    bandwidth: int = 50,
    allow_cold: bool = False,
) -> str:
    return DRAIN.format(
        name=f"drain-{mode}",
        mode=mode,
        stall_samples=stall_samples,
        max_time_s=max_time_s,
        on_stall=on_stall,
        bandwidth=bandwidth,
        allow_cold=str(allow_cold).lower(),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], object], timeout_s: float, what: str, step_s: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FaultRowError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


def scrape_metric(port: int, name: str, labels: str = "", timeout_s: float = 3.0) -> float | None:
    """One sample of a daemon's metrics endpoint on 127.0.0.1:``port`` whose labels contain
    ``labels``; None when the endpoint does not answer or has no such sample."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s)
    except OSError:
        return None
    for line in body.read().decode().splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            head = line.rsplit(" ", 1)[0]
            if head == name or head.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


class FaultRowError(AssertionError):
    """A row could not reach the moment of its fault, or its invariant broke."""


class DaemonProcess:
    """``balancerd run`` as a child process; its log in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancerd.cli", "run", "--config", str(config)],
            env=full_env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        wait_until(
            lambda: "ready hosts_up" in self.output() or not self.alive(),
            timeout_s,
            "READY",
        )
        if not self.alive():
            raise FaultRowError(f"daemon exited before READY: {self.output()[-2000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout_s: float = 130.0) -> int:
        """SIGTERM and wait (the unit's TimeoutStopSec is 120 s); SIGKILL after."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return int(self.proc.returncode)

    def wait_exit(self, timeout_s: float) -> int | None:
        try:
            return int(self.proc.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            return None


@dataclass
class RowResult:
    name: str
    fault: str
    moment: str
    behaviour: str  # what balancerd did
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # a failure libvirt causes and balancerd cannot prevent (the problems say what was seen)
    known_issue: str = ""

    @property
    def holds(self) -> bool:
        return not self.problems


class Env:
    """One row's surroundings: the lab, a fresh work folder, config and policy writers."""

    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.state_dir = work / "state"
        self.port = free_port()
        self.notes: list[str] = []
        self.daemons: list[DaemonProcess] = []

    # --- files -----------------------------------------------------------------------

    def write_policy(self, text: str, name: str = "policy.yaml") -> Path:
        path = self.work / name
        path.write_text(text)
        return path

    def write_config(
        self,
        policy: Path,
        hosts: tuple[str, ...] = ("host1", "host2"),
        name: str = "balancerd.yaml",
        **overrides: Any,
    ) -> Path:
        cfg: dict[str, Any] = yaml.safe_load(self.lab.config_path.read_text())
        cfg["hosts"] = [h for h in cfg["hosts"] if h["name"] in hosts]
        cfg.update(
            policy=str(policy),
            metrics={"listen": f"127.0.0.1:{self.port}"},
            state_dir=str(self.state_dir),
            collect_interval_s=1,
            cycle_interval_s=4,
            smoothing_window=2,
            host_timeout_s=5,
        )
        cfg.update(overrides)
        path = self.work / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start(
        self, config: Path, env: dict[str, str] | None = None, log: str = ""
    ) -> DaemonProcess:
        log_path = self.work / (log or f"daemon{len(self.daemons) + 1}.log")
        d = DaemonProcess(config, log_path, env)
        self.daemons.append(d)
        return d

    # --- what the hosts and the journal say -------------------------------------------

    def virsh(self, host: str, *args: str, check: bool = True) -> str:
        uri = self.lab.host_uri(host)
        return run(["virsh", "-q", "-c", uri, *args], timeout_s=30, check=check).stdout

    def domains(self) -> list[tuple[str, str, str, str]]:
        """(uuid, name, host, state) of every domain on every answering host."""
        out = []
        for g in self.lab.guests():
            uuid = self.virsh(g.host, "domuuid", g.name, check=False).strip()
            out.append((uuid, g.name, g.host, g.state))
        return out

    def job_active(self, host: str, vm: str, min_iteration: int = 1) -> bool:
        text = self.virsh(host, "domjobinfo", vm, check=False)
        if "Unbounded" not in text and "Migration" not in text:
            return False
        m = re.search(r"Iteration:\s+(\d+)", text)
        return m is None or int(m.group(1)) >= min_iteration

    def open_entries(self) -> list[tuple[str, str, str]]:
        """(vm, phase, migration_id) of open journal entries (read-only)."""
        path = self.state_dir / JOURNAL_FILE
        if not path.exists():
            return []
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                rows = db.execute(
                    "SELECT vm, phase, migration_id FROM migrations WHERE outcome IS NULL"
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error:
            return []
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def metric(self, name: str, labels: str = "") -> float | None:
        return scrape_metric(self.port, name, labels)

    def boot(self, *guests: GuestSpec) -> None:
        for g in guests:
            self.lab.start_guest(g)
        for g in guests:
            self.lab.wait_booted(g.name)

    def cleanup_guests(self) -> None:
        for g in self.lab.guests():
            with contextlib.suppress(Exception):
                self.lab.destroy_guest(g.name)
        for host in self.lab.host_names():  # same-named leftovers (recreated guests)
            with contextlib.suppress(Exception):
                for line in self.virsh(host, "list", "--all", "--name", check=False).split():
                    self.virsh(host, "destroy", line, check=False)
                    self.virsh(host, "undefine", line, check=False)


def check_invariants(
    env: Env, before: list[tuple[str, str, str, str]], *, allow_paused: set[str] | None = None
) -> list[str]:
    """The one invariant checker (see the module docstring)."""
    problems: list[str] = []
    now = env.domains()
    paused_before = {u for u, _n, _h, s in before if s == "paused"} | (allow_paused or set())
    for uuid, name, _host, state in before:
        mine = [(h, s) for u, _n, h, s in now if u == uuid]
        alive = [(h, s) for h, s in mine if s in ("running", "paused", "idle")]
        want_alive = 0 if state == "shut off" else 1  # a stopped guest stays stopped
        if len(alive) != want_alive:
            problems.append(f"{name} ({uuid[:8]}) runs on {len(alive)} hosts: {mine}")
        if not mine:
            problems.append(f"{name} ({uuid[:8]}) is defined nowhere any more")
        if len(mine) > 1:
            problems.append(f"{name} ({uuid[:8]}) is defined on {len(mine)} hosts: {mine}")
        if any(s == "paused" for _h, s in alive) and uuid not in paused_before:
            problems.append(f"{name} left paused: {mine}")
    entries = env.open_entries()
    if entries:
        problems.append(f"open journal entries after the daemon ran again: {entries}")
    return problems


def checker_pass(env: Env, config_text_policy: Path | None = None) -> list[str]:
    """Start a recommend-mode daemon on the row's state dir: it reconciles, collects and
    plans; then stop it. Returns problems with that run itself."""
    policy = config_text_policy or env.write_policy(drain_policy(mode="recommend"), "check.yaml")
    config = env.write_config(policy, name="check.yaml.cfg")
    d = env.start(config, log="checker.log")
    problems: list[str] = []
    try:
        d.wait_ready(90)
        wait_until(lambda: "plan not executed" in d.output(), 60, "the checker's first cycle")
    except FaultRowError as exc:
        problems.append(f"checker: {exc}")
    rc = d.stop()
    if rc != 0:
        problems.append(f"checker exited {rc}: {d.output()[-1500:]}")
    if "Traceback" in d.output():
        problems.append(f"checker traceback: {d.output()[-2000:]}")
    return problems


def result_line(d: DaemonProcess, vm: str) -> str:
    """The daemon's 'move vm=...' line for ``vm`` ("" while there is none)."""
    for line in d.output().splitlines():
        if f"move vm={vm} " in line and " result=" in line and "planned" not in line:
            return line
    return ""


def outcome_of(line: str) -> str:
    m = re.search(r"result=(\w+) mode=([\w-]+)", line)
    return f"{m.group(1)} ({m.group(2)})" if m else "no result"


# --- the rows ------------------------------------------------------------------------


Row = Callable[[Env], RowResult]


def _finish(
    env: Env, r: RowResult, before: list[tuple[str, str, str, str]], *, checker: bool = True
) -> RowResult:
    for d in env.daemons:
        if d.alive():
            rc = d.stop()
            if rc != 0:
                r.problems.append(f"daemon exited {rc} on SIGTERM: {d.output()[-1500:]}")
        if "Traceback" in d.output():
            r.problems.append(f"traceback in {d.log.name}: {d.output()[-1500:]}")
    if checker:
        r.problems += checker_pass(env)
    r.problems += check_invariants(env, before)
    return r


def _drain_until_job(
    env: Env, guest: GuestSpec, **policy: Any
) -> tuple[DaemonProcess, list[tuple[str, str, str, str]]]:
    env.boot(guest)
    before = env.domains()
    config = env.write_config(env.write_policy(drain_policy(**policy)))
    d = env.start(config)
    d.wait_ready()
    wait_until(lambda: env.job_active("host1", guest.name, 2), 90, "a pre-copy job")
    return d, before


def row_sigkill_precopy(env: Env) -> RowResult:
    d, before = _drain_until_job(env, DIRTY)
    d.kill9()
    r = RowResult(
        "sigkill-precopy",
        "SIGKILL of the daemon",
        "pre-copy, iteration >= 2",
        "the orphaned job went on in libvirtd; the next start aborted it and kept the guest "
        "on its source",
    )
    return _finish(env, r, before)


def row_sigkill_pause(env: Env) -> RowResult:
    # 10 MiB/s: even a guest starved of CPU by a busy machine cannot converge live.
    d, before = _drain_until_job(env, DIRTY, stall_samples=3, bandwidth=10)
    wait_until(
        lambda: any(p == "paused" for _v, p, _i in env.open_entries()),
        120,
        "pause-and-complete",
        step_s=0.1,
    )
    d.kill9()
    where = env.lab.guest_host("dirty")
    r = RowResult(
        "sigkill-pause",
        "SIGKILL of the daemon",
        "pause-and-complete (journal phase paused)",
        f"the next start settled the guest (found on {where} right after the kill)",
    )
    return _finish(env, r, before)


def row_sigterm_migrating(env: Env) -> RowResult:
    d, before = _drain_until_job(env, DIRTY)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(125)
    r = RowResult(
        "sigterm-migrating",
        "systemctl stop (SIGTERM)",
        "pre-copy",
        f"aborted and settled the move, exited {rc} after {time.monotonic() - t0:.0f} s; "
        f"{outcome_of(result_line(d, 'dirty'))}",
    )
    if rc != 0:
        r.problems.append(f"exit status {rc} (want 0 within the stop timeout)")
    if env.open_entries():
        r.problems.append(f"open entries right after stop: {env.open_entries()}")
    return _finish(env, r, before)


def row_dst_libvirtd_killed(env: Env) -> RowResult:
    d, before = _drain_until_job(env, DIRTY)
    env.lab.kill_libvirtd("host2")
    line = wait_until(lambda: result_line(d, "dirty"), 180, "the move's result")
    env.lab.start_libvirtd("host2")
    r = RowResult(
        "dst-libvirtd-killed",
        "destination libvirtd SIGKILL",
        "pre-copy",
        f"{outcome_of(line)}; guest kept on host1",
    )
    if not d.alive():
        r.problems.append("daemon died")
    return _finish(env, r, before)


def row_dst_libvirtd_killed_postcopy(env: Env) -> RowResult:
    """The destination's libvirtd dies while QEMU is in post-copy (source paused in
    post-copy, guest running on the destination); it comes back 10 s later."""
    # 10 MiB/s: the rest after the switch (up to the guest's 96 MiB) takes seconds.
    d, before = _drain_until_job(env, DIRTY, stall_samples=3, bandwidth=10, on_stall="postcopy")
    wait_until(
        lambda: "post-copy" in env.virsh("host1", "domstate", "--reason", "dirty", check=False),
        180,
        "the source paused in post-copy",
        step_s=0.1,
    )
    env.lab.kill_libvirtd("host2")
    time.sleep(10)
    env.lab.start_libvirtd("host2")
    line = wait_until(lambda: result_line(d, "dirty"), 240, "the move's result")
    r = RowResult(
        "dst-libvirtd-killed-postcopy",
        "destination libvirtd SIGKILL, back after 10 s",
        "post-copy (source paused in post-copy)",
        f"{outcome_of(line)}; guest on {env.lab.guest_host('dirty')}",
    )
    if not d.alive():
        r.problems.append("daemon died")
    r = _finish(env, r, before)
    # libvirt 9.0's source libvirtd stops the source QEMU once the destination's libvirtd is
    # gone (README, post-copy): when that loses the guest, balancerd can only report it
    # (move failed, entry left open), which is all the problems may say then.
    lost = [p for p in r.problems if p.startswith("dirty (") and "runs on 0 hosts" in p]
    if lost and all(p in lost or p.startswith("open journal entries") for p in r.problems):
        r.known_issue = "libvirt stopped the source QEMU after the destination libvirtd died"
    return r


def row_src_libvirtd_restarted(env: Env) -> RowResult:
    d, before = _drain_until_job(env, DIRTY)
    env.lab.kill_libvirtd("host1")
    time.sleep(1)
    env.lab.start_libvirtd("host1")
    line = wait_until(lambda: result_line(d, "dirty"), 180, "the move's result")
    r = RowResult(
        "src-libvirtd-restarted",
        "source libvirtd killed and restarted",
        "pre-copy",
        outcome_of(line),
    )
    if not d.alive():
        r.problems.append("daemon died")
    return _finish(env, r, before)


def _iptables(env: Env, host: str, action: str, peer: str) -> None:
    ns = f"{env.lab.name}-{host}"
    addr = env.lab.host_address(peer)
    for chain, flag in (("OUTPUT", "-d"), ("INPUT", "-s")):
        run(["ip", "netns", "exec", ns, "iptables", action, chain, flag, addr, "-j", "DROP"])


def row_link_cut(env: Env) -> RowResult:
    d, before = _drain_until_job(env, DIRTY, max_time_s=30)
    _iptables(env, "host1", "-A", "host2")
    try:
        line = wait_until(lambda: result_line(d, "dirty"), 200, "the move's result", step_s=1)
    finally:
        _iptables(env, "host1", "-D", "host2")
    r = RowResult(
        "link-cut",
        "migration link cut (iptables DROP host1<->host2)",
        "pre-copy",
        outcome_of(line),
    )
    return _finish(env, r, before)


def row_link_squeezed(env: Env) -> RowResult:
    env.boot(DIRTY)
    before = env.domains()
    with env.lab.squeezed_link("host1", "40mbit", burst="64kb", latency="200ms"):
        policy = drain_policy(stall_samples=3, bandwidth=200, max_time_s=200)
        d = env.start(env.write_config(env.write_policy(policy)))
        d.wait_ready()
        line = wait_until(lambda: result_line(d, "dirty"), 260, "the move's result", step_s=1)
    r = RowResult(
        "link-squeezed",
        "migration link squeezed to 40 Mbit/s (tc tbf)",
        "before the move",
        outcome_of(line),
    )
    return _finish(env, r, before)


def row_libvirtd_frozen(env: Env) -> RowResult:
    d, before = _drain_until_job(env, DIRTY, max_time_s=30)
    pid = env.lab.libvirtd_pid("host2")
    if pid is None:
        raise FaultRowError("host2 libvirtd not running")
    os.kill(pid, signal.SIGSTOP)
    try:
        line = wait_until(lambda: result_line(d, "dirty"), 240, "the move's result", step_s=1)
    finally:
        os.kill(pid, signal.SIGCONT)
    r = RowResult(
        "libvirtd-frozen",
        "destination libvirtd frozen (SIGSTOP)",
        "pre-copy",
        outcome_of(line),
    )
    if not d.alive():
        r.problems.append("daemon died")
    return _finish(env, r, before)


def row_sighup_late_failure(env: Env) -> RowResult:
    env.boot(QUIET)
    before = env.domains()
    policy = env.write_policy(drain_policy(mode="recommend"))
    config = env.write_config(policy)
    d = env.start(config)
    d.wait_ready()
    # Parses, but cannot run: an IPMI host without user or password file, and a policy
    # with a control byte.
    good_config, good_policy = config.read_text(), policy.read_text()
    cfg = yaml.safe_load(good_config)
    cfg["hosts"][1]["power"] = {"driver": "ipmi", "address": "192.0.2.1"}
    config.write_text(yaml.safe_dump(cfg))
    d.signal(signal.SIGHUP)
    wait_until(lambda: (env.metric("balancerd_reload_failures_total") or 0) >= 1, 30, "rejection")
    config.write_text(good_config)
    policy.write_text(good_policy.replace("drain-recommend", "drain\x07bell"))
    d.signal(signal.SIGHUP)
    wait_until(lambda: (env.metric("balancerd_reload_failures_total") or 0) >= 2, 30, "rejection")
    policy.write_text(good_policy)
    time.sleep(2)
    r = RowResult(
        "sighup-late-failure",
        "SIGHUP: IPMI host without credentials; a policy with a control byte",
        "idle",
        "both reloads rejected with FILE:LINE; kept running on the old configuration",
    )
    if not d.alive():
        r.problems.append(f"daemon died on reload: {d.output()[-1500:]}")
    if "reload rejected" not in d.output():
        r.problems.append("no 'reload rejected' line")
    return _finish(env, r, before)


def row_sighup_hosts_change(env: Env) -> RowResult:
    d, before = _drain_until_job(env, DIRTY, stall_samples=3)
    env.write_config(env.work / "policy.yaml", hosts=("host1", "host2", "host3"))
    d.signal(signal.SIGHUP)
    line = wait_until(lambda: result_line(d, "dirty"), 240, "the move's result", step_s=1)
    r = RowResult(
        "sighup-hosts-change",
        "SIGHUP adding host3 to the host list",
        "pre-copy",
        f"reloaded; the running move kept its connections: {outcome_of(line)}",
    )
    if "unexpected error" in d.output():
        r.problems.append("a move hit an unexpected error after the reload")
    if "result=migrated" not in line and "result=failed" not in line:
        r.problems.append(f"no result: {line}")
    return _finish(env, r, before)


def row_journal_corrupt(env: Env) -> RowResult:
    env.boot(QUIET)
    before = env.domains()
    env.state_dir.mkdir(parents=True, exist_ok=True)
    (env.state_dir / JOURNAL_FILE).write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    d = env.start(env.write_config(env.write_policy(drain_policy(mode="recommend"))))
    d.wait_ready()
    corrupt = wait_until(lambda: env.metric("balancerd_journal_corrupt_total"), 20, "metric")
    r = RowResult(
        "journal-corrupt",
        "journal file overwritten with garbage",
        "before start",
        "moved aside with an error line naming both files; counted; daemon runs",
    )
    if corrupt != 1.0:
        r.problems.append(f"balancerd_journal_corrupt_total = {corrupt}")
    if "is corrupt" not in d.output():
        r.problems.append("no log line about the corrupt journal")
    return _finish(env, r, before)


def row_state_dir_full(env: Env) -> RowResult:
    env.boot(QUIET)
    before = env.domains()
    env.state_dir.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(env.state_dir)])
    try:
        filler = env.state_dir / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        d = env.start(env.write_config(env.write_policy(drain_policy())))
        rc = d.wait_exit(60)
        last = d.output().strip().splitlines()[-1:]
        r = RowResult(
            "state-dir-full",
            "state directory full (a filled 256 KiB tmpfs)",
            "before start",
            f"refused to run without a journal: exit {rc}, {last}",
        )
        if rc in (None, 0):
            r.problems.append(f"exit status {rc}: {d.output()[-1500:]}")
        if "cannot open the migration journal" not in d.output():
            r.problems.append("no clear line about the journal")
        if "Traceback" in d.output():
            r.problems.append("traceback")
        filler.unlink()
        # With room again it starts and drains as usual.
        d2 = env.start(env.write_config(env.write_policy(drain_policy())))
        d2.wait_ready()
        line = wait_until(lambda: result_line(d2, "quiet"), 90, "the move's result")
        r.behaviour += f"; with room again: {outcome_of(line)}"
        d2.stop()
    finally:
        for dd in env.daemons:
            dd.stop()
        run(["umount", str(env.state_dir)], check=False)
    env.daemons.remove(d)  # its non-zero exit is the expected answer
    return _finish(env, r, before)


def row_second_daemon(env: Env) -> RowResult:
    env.boot(QUIET)
    before = env.domains()
    config = env.write_config(env.write_policy(drain_policy(mode="recommend")))
    first = env.start(config)
    first.wait_ready()
    second = env.start(config, log="second.log")
    rc = second.wait_exit(60)
    r = RowResult(
        "second-daemon",
        "a second daemon on the same state directory",
        "while the first runs",
        f"the second exited {rc}: {second.output().strip().splitlines()[-1:]}",
    )
    if rc in (None, 0):
        r.problems.append(f"second daemon exit status {rc}")
    if "another balancerd" not in second.output():
        r.problems.append("no clear line naming the other process")
    if not first.alive():
        r.problems.append("first daemon died")
    return _finish(env, r, before)


def row_guest_recreated(env: Env) -> RowResult:
    env.boot(QUIET)
    uuid_before = env.virsh("host1", "domuuid", "quiet").strip()
    # An open entry for quiet host1->host2 whose owner is gone (a crashed daemon)...
    code = (
        "import sys\nfrom balancerd.execute.journal import Journal\n"
        "Journal(sys.argv[1]).begin('quiet', sys.argv[2], 'host1', 'host2', 'running',"
        " migration_id='deadbeef0001')\n"
    )
    env.state_dir.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-c", code, str(env.state_dir / JOURNAL_FILE), uuid_before])
    # ...and an operator recreated a guest of the same name on host2 (a new UUID).
    xml = env.lab.root / "domains" / "quiet.xml"
    text = re.sub(r"<uuid>.*?</uuid>", "", xml.read_text())
    other = env.work / "quiet-new.xml"
    other.write_text(text.replace("quiet.log", "quiet-new.log"))
    env.virsh("host2", "define", str(other))
    env.virsh("host2", "start", "quiet")
    before = env.domains()
    problems = checker_pass(env)
    r = RowResult(
        "guest-recreated",
        "same-named guest with a new UUID on the destination",
        "before reconcile of an open entry",
        "reconcile left the other guest alone (UUID differs) and closed the entry",
    )
    r.problems += problems
    r.problems += check_invariants(env, before)
    out = (env.work / "checker.log").read_text()
    if "alone" not in out:
        r.problems.append("no log line about leaving the recreated guest alone")
    return r


def row_stopped_guest_holds_host(env: Env) -> RowResult:
    """A guest defined (stopped) on an otherwise empty host under power-save. The snapshot
    lists stopped guests, so the plan keeps the host on (spec.power.
    allow_off_with_stopped_guests is false by default); before, the snapshot saw the host
    empty and only the re-check right before the power-off kept it on (that re-check stays,
    tested in tests/test_power.py and tests/test_daemon_inprocess.py)."""
    env.boot(QUIET)
    xml = env.lab.root / "domains" / "quiet.xml"
    parked = env.work / "parked.xml"
    text = re.sub(r"<uuid>.*?</uuid>", "", xml.read_text())
    parked.write_text(text.replace("<name>quiet</name>", "<name>parked</name>"))
    env.virsh("host2", "define", str(parked))
    before = env.domains()
    d = env.start(env.write_config(env.write_policy(POWER_SAVE)))
    d.wait_ready()
    # power-save's grace period is 2 s and a cycle 4 s: five cycles would have switched it off
    wait_until(lambda: d.output().count("plan policy=") >= 5, 90, "five power-save cycles")
    r = RowResult(
        "stopped-guest-holds-host",
        "a stopped guest defined on an otherwise empty host",
        "power-save cycles",
        "host kept on: the snapshot lists the stopped guest, the policy keeps its host on",
    )
    if not env.lab.is_powered("host2"):
        r.problems.append("host2 was powered off with a stopped guest defined on it")
    offs = env.metric("balancerd_power_actions_total", 'action="off",result="success"')
    if offs:
        r.problems.append(f"{offs:.0f} power-off(s) counted")
    stopped = env.metric("balancerd_host_vms_stopped", 'host="host2"')
    if stopped != 1:
        r.problems.append(f"balancerd_host_vms_stopped{{host2}} = {stopped}, not 1")
    return _finish(env, r, before)


def row_clock_step(env: Env) -> RowResult:
    env.boot(QUIET)
    before = env.domains()
    stamp = env.work / "faketime"
    stamp.write_text("+0\n")
    faketime = {
        "LD_PRELOAD": FAKETIME_LIB,
        "FAKETIME_TIMESTAMP_FILE": str(stamp),
        "FAKETIME_CACHE_DURATION": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    d = env.start(env.write_config(env.write_policy(drain_policy(mode="recommend"))), faketime)
    d.wait_ready()
    wait_until(lambda: d.output().count("plan policy=") >= 1, 60, "a first cycle")
    for step in ("-1h", "+1h"):
        plans = d.output().count("plan policy=")
        stamp.write_text(f"{step}\n")
        wait_until(
            lambda n=plans: d.output().count("plan policy=") >= n + 2,  # type: ignore[misc]
            60,
            f"cycles after a {step} step",
        )
    steps = env.metric("balancerd_clock_steps_total") or 0
    r = RowResult(
        "clock-step",
        "wall clock stepped -1 h, then +1 h (libfaketime)",
        "between cycles",
        f"jobs rescheduled from the new time ({steps:.0f} steps counted); cycles went on",
    )
    if steps < 2:
        r.problems.append(f"clock steps counted: {steps}")
    return _finish(env, r, before)


ROWS: dict[str, Row] = {
    "sigkill-precopy": row_sigkill_precopy,
    "sigkill-pause": row_sigkill_pause,
    "sigterm-migrating": row_sigterm_migrating,
    "dst-libvirtd-killed": row_dst_libvirtd_killed,
    "dst-libvirtd-killed-postcopy": row_dst_libvirtd_killed_postcopy,
    "src-libvirtd-restarted": row_src_libvirtd_restarted,
    "link-cut": row_link_cut,
    "link-squeezed": row_link_squeezed,
    "libvirtd-frozen": row_libvirtd_frozen,
    "sighup-late-failure": row_sighup_late_failure,
    "sighup-hosts-change": row_sighup_hosts_change,
    "journal-corrupt": row_journal_corrupt,
    "state-dir-full": row_state_dir_full,
    "second-daemon": row_second_daemon,
    "guest-recreated": row_guest_recreated,
    "stopped-guest-holds-host": row_stopped_guest_holds_host,
    "clock-step": row_clock_step,
}


def run_row(lab: Lab, name: str, work: Path) -> RowResult:
    """Run one row on ``lab`` (3 hosts, no guests); guests are removed afterwards."""
    env = Env(lab, work)
    t0 = time.monotonic()
    try:
        r = ROWS[name](env)
    except FaultRowError as exc:
        logs = {d.log.name: d.output()[-1500:] for d in env.daemons}
        r = RowResult(name, "", "", "row did not complete", [f"{exc}; logs: {logs}"])
    finally:
        for d in env.daemons:
            if d.alive():
                d.kill9()
        env.cleanup_guests()
    r.seconds = time.monotonic() - t0
    return r


def table(results: list[RowResult]) -> str:
    lines = [
        "| row | fault | injected at | what balancerd did | invariant | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = "holds" if r.holds else "BROKEN: " + "; ".join(r.problems)[:300]
        lines.append(
            f"| {r.name} | {r.fault} | {r.moment} | {r.behaviour} | {verdict} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)
