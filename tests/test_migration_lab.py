"""The migration engine on the real lab (libvirtd + QEMU in network namespaces).

Lab "bl2" on 10.77.2.0/24, two hosts. Guests that dirty memory burn a whole vCPU under
TCG, so each test that needs one starts it and destroys it again.

Run: sudo .venv/bin/pytest -m lab tests/test_migration_lab.py -s   (-s shows the numbers)
"""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from balancerd.commands.migrate import progress_printer
from balancerd.config import Config, load_config
from balancerd.execute.journal import Journal
from balancerd.execute.move import FAILED, MIGRATED, SKIPPED, Engine, MoveResult, run_move
from balancerd.execute.reconcile import reconcile
from balancerd.hypervisor.libvirt import LibvirtHypervisor
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.lab.system import missing_requirements
from balancerd.model import Move
from balancerd.policy.model import Migration, MigrationCompression, OnStall
from balancerd.wiring import open_hypervisor

pytestmark = pytest.mark.lab

LAB_NAME, LAB_SUBNET = "bl2", "10.77.2"
REPO = Path(__file__).resolve().parents[1]
COUNTER_RE = re.compile(r"guestload: dirtied \d+ MiB (\d+) times")
# Non-converging guest of the issue: rewrites 96 of its 256 MiB; bandwidth capped at 50 MiB/s.
DIRTY = {"mem_mib": 256, "dirty_mib": 96}
STALLING = Migration(
    bandwidth_mib_s=50,
    # Small allowances (50 MiB/s x 50 ms = 2.5 MiB): on a loaded machine the starved guest
    # sometimes dirtied little enough to slip under a 100-200 ms limit.
    max_downtime_ms=50,
    downtime_steps_ms=(100,),
    auto_converge=False,  # TCG guests can be throttled; keep the ladder to downtime + pause
    stall_samples=3,
    max_time_s=240,
)


@dataclass
class Ctx:
    lab: Lab
    config_path: Path
    config: Config
    hv: LibvirtHypervisor


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    missing = missing_requirements()
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    if missing:
        pytest.skip("lab cannot run here: " + "; ".join(missing))
    lab = Lab(tmp_path_factory.mktemp("bl2") / "lab", LAB_NAME, LAB_SUBNET)
    spec = LabSpec(
        hosts=2,
        guests=(
            GuestSpec("quiet", "host1", mem_mib=256),
            GuestSpec("wb", "host1", disk="shared", disk_cache="writeback"),
            GuestSpec("localdisk", "host1", disk="local"),
        ),
        metrics_listen="127.0.0.1:9282",
    )
    try:
        config_path = lab.up(spec)
        for g in spec.guests:
            lab.wait_booted(g.name)
        # The first call to a fresh libvirtd probes QEMU (seconds): do it before timing out.
        for h in lab.host_names():
            subprocess.run(
                ["virsh", "-q", "-c", lab.host_uri(h), "capabilities"],
                capture_output=True,
                timeout=120,
                check=True,
            )
        config = load_config(config_path)
        hv = open_hypervisor(config)
        yield Ctx(lab, config_path, config, hv)
        hv.close()
        gc.collect()  # free leftover libvirt objects while the hosts still answer
    finally:
        lab.down()


def engine(c: Ctx, mig: Migration, **kw: object) -> Engine:
    return Engine(
        hv=c.hv,
        mig=mig,
        journal=Journal(c.config.state_dir),
        progress=progress_printer(sys.stdout),  # shown with -s
        **kw,  # type: ignore[arg-type]
    )


def active_hosts(c: Ctx, vm: str) -> dict[str, str]:
    """Host -> state for every host where the guest is defined and not shut off."""
    return {g.host: g.state for g in c.lab.guests() if g.name == vm and g.state != "shut off"}


def counter(c: Ctx, vm: str) -> int:
    found = COUNTER_RE.findall(c.lab.console_log(vm).read_text(errors="replace"))
    return int(found[-1]) if found else -1


def guest_health(c: Ctx, vm: str) -> str:
    """ "" if the dirtying guest keeps making progress and did not panic, else the problem.

    Known lab issue: under TCG (QEMU 7.2) a guest that dirties memory through many
    precopy passes sometimes comes out of a migration with a corrupted kernel (timer-list
    oopses), whichever way the migration ends (also with QEMU's own stop-and-copy); never
    seen after cold migrations or short live ones. The engine cannot prevent it, so the
    tests report it as an expected failure instead of hiding it."""
    before = counter(c, vm)
    deadline = time.monotonic() + 60
    while counter(c, vm) <= before and time.monotonic() < deadline:
        if "Kernel panic" in c.lab.console_log(vm).read_text(errors="replace"):
            break
        time.sleep(1)
    log = c.lab.console_log(vm).read_text(errors="replace")
    if "Kernel panic" in log:
        oops = [line for line in log.splitlines() if "RIP:" in line or "BUG:" in line][:2]
        return f"{vm}'s kernel panicked after the migration ({'; '.join(oops)})"
    if counter(c, vm) <= before:
        return f"{vm} stopped dirtying memory after the migration"
    return ""


def xfail_if_unhealthy(problems: list[str]) -> None:
    problems = [p for p in problems if p]
    if problems:
        print("GUEST HEALTH: " + "; ".join(problems))
        pytest.xfail("; ".join(problems) + " (QEMU/TCG issue, see guest_health)")


def start_dirty_guest(c: Ctx, vm: str) -> None:
    c.lab.start_guest(GuestSpec(vm, "host1", **DIRTY))  # type: ignore[arg-type]
    c.lab.wait_booted(vm)
    deadline = time.monotonic() + 60
    while counter(c, vm) < 1000 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counter(c, vm) >= 1000, "the dirtying guest never got going"


def wait_job(c: Ctx, host: str, vm: str, min_iteration: int = 1) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            stats = c.hv.job_stats(host, vm)
        except Exception:
            stats = None
        if stats is not None and stats.active and stats.iteration >= min_iteration:
            return
        time.sleep(0.5)
    raise AssertionError(f"no migration job of {vm} on {host}")


def test_quiet_guest_live_migrates_within_max_downtime(ctx: Ctx) -> None:
    mig = Migration(bandwidth_mib_s=100, max_downtime_ms=300)
    r = run_move(engine(ctx, mig), Move("quiet", "host1", "host2", 0, 0.0))
    print(f"\nquiet live: {r.line()}")
    assert r.outcome == MIGRATED, r.reason
    assert r.mode == "live"
    assert r.downtime_ms is not None and 0 < r.downtime_ms <= mig.max_downtime_ms
    assert r.bytes_sent > 0 and r.iterations >= 1
    assert active_hosts(ctx, "quiet") == {"host2": "running"}
    (entry, *_) = Journal(ctx.config.state_dir).entries()
    assert (entry.vm, entry.outcome, entry.mode) == ("quiet", "migrated", "live")


def test_non_converging_guest_ends_running_on_destination_via_pause(ctx: Ctx) -> None:
    start_dirty_guest(ctx, "dirty")
    try:
        r = run_move(engine(ctx, STALLING), Move("dirty", "host1", "host2", 0, 0.0))
        print(f"\ndirty live: {r.line()}")
        assert r.outcome == MIGRATED, r.reason
        assert r.mode == "paused-fallback"
        assert active_hosts(ctx, "dirty") == {"host2": "running"}
        assert r.downtime_ms is not None and r.downtime_ms > 0
        health = [guest_health(ctx, "dirty")]
        # The same guest, cold, back: all memory goes while it is paused.
        cold = run_move(engine(ctx, STALLING, live=False), Move("dirty", "host2", "host1", 0, 0.0))
        print(f"dirty cold: {cold.line()}")
        assert cold.outcome == MIGRATED, cold.reason
        assert cold.mode == "offline"
        assert active_hosts(ctx, "dirty") == {"host1": "running"}
        assert cold.downtime_ms is not None
        health.append(guest_health(ctx, "dirty"))
        print(
            f"downtime pause-and-complete {r.downtime_ms:.0f} ms vs cold {cold.downtime_ms:.0f} ms:"
            f" ratio {r.downtime_ms / cold.downtime_ms:.2f}"
        )
        xfail_if_unhealthy(health)
    finally:
        ctx.lab.destroy_guest("dirty")


@pytest.mark.parametrize(
    ("vm", "expected"),
    [
        ("wb", "has cache='writeback'"),
        ("localdisk", "disk /var/lib/libvirt/images/localdisk.qcow2 not found on host2"),
    ],
)
def test_preflight_skips_with_the_reason(ctx: Ctx, vm: str, expected: str) -> None:
    journal = Journal(ctx.config.state_dir)
    before = len(journal.entries(1000))
    r = run_move(engine(ctx, Migration()), Move(vm, "host1", "host2", 0, 0.0))
    print(f"\n{r.line()}")
    assert r.outcome == SKIPPED
    assert expected in r.reason, r.reason
    assert active_hosts(ctx, vm) == {"host1": "running"}  # nothing attempted
    assert len(journal.entries(1000)) == before


def test_a_guest_moved_by_an_operator_is_skipped(ctx: Ctx) -> None:
    where = ctx.lab.guest_host("quiet")
    assert where is not None
    other = "host1" if where == "host2" else "host2"
    r = run_move(engine(ctx, Migration()), Move("quiet", other, where, 0, 0.0))
    assert r.outcome == SKIPPED
    assert f"guest is no longer on {other} (already on {where})" in r.reason
    assert active_hosts(ctx, "quiet") == {where: "running"}


def test_reconcile_resumes_a_guest_we_left_paused(ctx: Ctx) -> None:
    where = ctx.lab.guest_host("quiet")
    assert where is not None
    other = "host1" if where == "host2" else "host2"
    journal = Journal(ctx.config.state_dir)
    # As if we died right after pausing it for pause-and-complete, the job already gone.
    entry = journal.begin("quiet", "", where, other, "running")
    journal.phase(entry, "paused")
    ctx.hv.suspend(where, "quiet")
    assert active_hosts(ctx, "quiet") == {where: "paused"}
    recs = [r for r in reconcile(ctx.hv, journal) if r.entry_id == entry]
    assert [r.actions for r in recs] == [(f"resumed on {where}",)]
    assert active_hosts(ctx, "quiet") == {where: "running"}
    assert entry not in [e.id for e in journal.open_entries()]


def test_sigkill_mid_migration_then_reconcile_leaves_one_copy(ctx: Ctx, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: slow}\n"
        "spec:\n  objective: balance\n  migration:\n"
        "    bandwidth_mib_s: 50\n    max_downtime_ms: 100\n    downtime_steps_ms: [200]\n"
        "    auto_converge: false\n    stall_samples: 60\n    max_time_s: 600\n"
    )
    start_dirty_guest(ctx, "crashme")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "balancerd.cli",
                "migrate",
                "--config",
                str(ctx.config_path),
                "--policy",
                str(policy),
                "--json",
                "crashme",
                "host2",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_job(ctx, "host1", "crashme", min_iteration=2)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            _out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        journal = Journal(ctx.config.state_dir)
        (entry,) = [e for e in journal.open_entries() if e.vm == "crashme"]
        assert entry.pid == proc.pid and not journal.owner_alive(entry)
        # The job outlived its client inside the source libvirtd; the destination holds a
        # paused incoming copy meanwhile (LAB-NOTES). Now "start again": reconcile.
        states_before = active_hosts(ctx, "crashme")
        recs = [r for r in reconcile(ctx.hv, journal) if r.vm == "crashme"]
        print(f"\nbefore reconcile: {states_before}; reconcile: {recs}")
        assert len(recs) == 1 and recs[0].settled, recs
        after = active_hosts(ctx, "crashme")
        assert len(after) == 1 and next(iter(after.values())) == "running", after
        assert not [e for e in journal.open_entries() if e.vm == "crashme"]
        assert journal.reconciliation_count() >= 1
        xfail_if_unhealthy([guest_health(ctx, "crashme")])
    finally:
        ctx.lab.destroy_guest("crashme")


def test_destination_libvirtd_killed_mid_migration(ctx: Ctx) -> None:
    start_dirty_guest(ctx, "victim")
    mig = Migration(bandwidth_mib_s=50, max_downtime_ms=100, stall_samples=60, max_time_s=300)
    box: list[MoveResult] = []
    worker = threading.Thread(
        target=lambda: box.append(
            run_move(engine(ctx, mig), Move("victim", "host1", "host2", 0, 0.0))
        )
    )
    try:
        worker.start()
        wait_job(ctx, "host1", "victim", min_iteration=2)
        ctx.lab.kill_libvirtd("host2")
        worker.join(timeout=300)
        assert not worker.is_alive()
        (r,) = box
        print(f"\n{r.line()}")
        assert r.outcome == FAILED
        assert "live migration of victim host1->host2 failed" in r.reason
        assert "guest" in r.reason or "host2 does not answer" in r.reason
        assert ctx.hv.domain_state("host1", "victim") == "running"
        health = guest_health(ctx, "victim")
    finally:
        worker.join(timeout=300)
        ctx.lab.start_libvirtd("host2")
        subprocess.run(
            ["virsh", "-q", "-c", ctx.lab.host_uri("host2"), "capabilities"],
            capture_output=True,
            timeout=120,
            check=False,
        )
    # Once host2's libvirtd is back, the guest still runs only on host1.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and active_hosts(ctx, "victim") != {"host1": "running"}:
        time.sleep(1)
    assert active_hosts(ctx, "victim") == {"host1": "running"}
    ctx.lab.destroy_guest("victim")
    xfail_if_unhealthy([health])


def hosts_answer(c: Ctx, timeout_s: float = 120.0) -> None:
    """Wait until both hosts answer through the shared adapter (an earlier test killed and
    restarted a libvirtd: the adapter reconnects after its back-off)."""
    deadline = time.monotonic() + timeout_s
    for host in c.lab.host_names():
        while True:
            try:
                c.hv.host_facts(host)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


# The side-by-side's link: host1's veth squeezed to 400 Mbit/s (Lab.squeezed_link). The
# libvirt bandwidth cap alone is no link: QEMU's final stop-and-copy stage ignores it, so
# pause-and-complete's last pass ran at loopback speed (56-83 ms) and the comparison with
# post-copy came out either way. A real slow link limits both.
SLOW_LINK = {"rate": "400mbit", "burst": "256kb", "latency": "20ms"}


def test_non_converging_guest_via_postcopy_and_via_pause_side_by_side(ctx: Ctx) -> None:
    """Two fresh non-converging guests of the same size, in the same run, each host1 -> host2
    over the same slow link (SLOW_LINK, 50 MB/s): one by pause-and-complete (stopped while
    its remaining dirty memory crosses the link), one by post-copy (stopped only for the
    switch). Fresh guests, not one guest there and back: a TCG guest that came out of a long
    precopy sometimes stops dirtying (see guest_health), and a quiet guest converges without
    ever needing post-copy."""
    hosts_answer(ctx)
    health: list[str] = []
    start_dirty_guest(ctx, "pcpause")
    try:
        with ctx.lab.squeezed_link("host1", **SLOW_LINK):
            paused = run_move(engine(ctx, STALLING), Move("pcpause", "host1", "host2", 0, 0.0))
        print(f"\npause-and-complete: {paused.line()}")
        assert paused.outcome == MIGRATED, paused.reason
        assert paused.mode == "paused-fallback"
        health.append(guest_health(ctx, "pcpause"))
    finally:
        ctx.lab.destroy_guest("pcpause")
    start_dirty_guest(ctx, "pcdirty")
    try:
        postcopy = replace(STALLING, on_stall=OnStall.POSTCOPY)
        with ctx.lab.squeezed_link("host1", **SLOW_LINK):
            pc = run_move(engine(ctx, postcopy), Move("pcdirty", "host1", "host2", 0, 0.0))
        print(f"post-copy: {pc.line()}")
        assert pc.outcome == MIGRATED, pc.reason
        assert pc.mode == "postcopy", pc
        assert active_hosts(ctx, "pcdirty") == {"host2": "running"}
        # libvirt 9.0 reports no downtime for a post-copy job: the engine's own upper bound
        # (source last seen running -> destination seen running) stands in; for
        # pause-and-complete libvirt's figure is QEMU's own stop -> resume.
        assert paused.downtime_ms is not None
        assert pc.downtime_ms is not None and pc.paused_ms == pc.downtime_ms
        print(
            f"downtime over the same link: pause-and-complete {paused.downtime_ms:.0f} ms "
            f"(libvirt) vs post-copy <= {pc.downtime_ms:.0f} ms (source last running -> "
            "running on host2)"
        )
        assert pc.downtime_ms < paused.downtime_ms
        (entry, *_) = Journal(ctx.config.state_dir).entries()
        assert (entry.vm, entry.outcome, entry.mode) == ("pcdirty", "migrated", "postcopy")
        health.append(guest_health(ctx, "pcdirty"))
        xfail_if_unhealthy(health)
    finally:
        ctx.lab.destroy_guest("pcdirty")


def test_parallel_and_compressed_streams_side_by_side(ctx: Ctx) -> None:
    """The quiet guest with 1 vs 4 connections and compression off vs on (libvirt 9.0
    offers mt, not zstd: a zstd request is recorded as not used)."""
    hosts_answer(ctx)
    rows = []
    cases = [
        ("1 connection", Migration(bandwidth_mib_s=100)),
        ("4 connections", Migration(bandwidth_mib_s=100, parallel_connections=4)),
        ("1 conn + mt", Migration(bandwidth_mib_s=100, compression=MigrationCompression.MT)),
        (
            "4 conn + zstd",
            Migration(
                bandwidth_mib_s=100,
                parallel_connections=4,
                compression=MigrationCompression.ZSTD,
            ),
        ),
    ]
    for label, mig in cases:
        where = ctx.lab.guest_host("quiet")
        assert where is not None
        other = "host1" if where == "host2" else "host2"
        r = run_move(engine(ctx, mig), Move("quiet", where, other, 0, 0.0))
        assert r.outcome == MIGRATED, r.reason
        assert r.parallel_connections == (4 if mig.parallel_connections else 0)
        rows.append((label, r))
    print("\nstreams (quiet 256 MiB guest, cap 100 MiB/s):")
    for label, r in rows:
        print(
            f"  {label:14s} {r.seconds:5.1f} s  downtime {r.downtime_ms or 0:5.0f} ms  "
            f"{r.bytes_sent / 2**20:5.0f} MiB  conns={r.parallel_connections} "
            f"compression={r.compression or 'none'}  {r.reason}"
        )
    assert rows[2][1].compression == "mt"
    assert rows[3][1].compression == "" and "zstd" in rows[3][1].reason
