"""The in-memory hypervisor: its counters go through the real collect path; the scripted
one fails, hangs and runs migration scripts as the move-engine tests need."""

from __future__ import annotations

import threading
import time

import pytest

from balancerd.collect import build_snapshot
from balancerd.errors import HypervisorError
from balancerd.hypervisor.base import DiskFacts, InterfaceFacts, MigrationRequest
from balancerd.hypervisor.scripted import (
    INCOMING,
    ClientLost,
    Complete,
    Fail,
    Hang,
    HostDies,
    Script,
    ScriptedHypervisor,
    Stall,
    Unreachable,
    converging,
    stalling,
)
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.units import GIB, MIB

WAIT_S = 10.0  # a safety net against a hung test; never reached when it passes


def cluster() -> SimHypervisor:
    hv = SimHypervisor(
        [
            SimHost("a", cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB),
            SimHost("b", cpus=8, cpu_mhz=2000, mem_bytes=16 * GIB),
        ]
    )
    hv.add_vm("a", SimVm("web", vcpus=2, mem_bytes=2 * GIB))
    hv.add_vm("a", SimVm("db", vcpus=2, mem_bytes=4 * GIB))
    return hv


def test_counters_become_utilizations_through_collect() -> None:
    hv = cluster()
    history = [hv.sample_all()]
    hv.advance(300.0, {"web": 1.0, "db": 2.0})  # web at half its 2 vCPUs, db flat out
    history.append(hv.sample_all())
    hv.advance(300.0, {"web": 0.5, "db": 5.0})  # db cannot use more than its 2 vCPUs
    history.append(hv.sample_all())
    snap = build_snapshot(history, window=1)
    util = {v.name: v.cpu_util for v in snap.vms}
    assert util["web"] == pytest.approx(0.25)
    assert util["db"] == pytest.approx(1.0)
    a = snap.host("a")
    assert a is not None
    # host a: 2.5 of 4 cores busy in the last interval; 6 of 8 GiB held by guests
    assert a.cpu_util == pytest.approx(2.5 / 4)
    assert a.mem_free_bytes == 2 * GIB
    two = build_snapshot(history, window=2)
    assert {v.name: v.cpu_util for v in two.vms}["web"] == pytest.approx((0.5 + 0.25) / 2)


def test_migrate_moves_the_guest_and_errors_name_host_and_operation() -> None:
    hv = cluster()
    req = MigrationRequest(
        vm="web",
        src="a",
        dst="b",
        live=True,
        bandwidth_mib_s=100.0,
        max_downtime_ms=300,
        auto_converge=True,
    )
    hv.migrate(req)
    assert hv.domain_state("b", "web") == "running"
    assert hv.domain_state("a", "web") is None
    with pytest.raises(HypervisorError) as err:
        hv.migrate(req)  # web is no longer on a
    assert err.value.host == "a" and err.value.operation == "migrate"
    with pytest.raises(HypervisorError, match="nowhere"):
        hv.host_facts("nowhere")


def test_powered_off_host_samples_down() -> None:
    hv = cluster()
    hv.hosts["b"].up = False
    samples = {s.name: s for s in hv.sample_all()}
    assert samples["a"].up and not samples["b"].up


# --- the scripted hypervisor ---------------------------------------------------------


def scripted() -> ScriptedHypervisor:
    hv = ScriptedHypervisor(
        [SimHost(h, cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB) for h in ("a", "b", "c")]
    )
    hv.add_vm("a", SimVm("web", vcpus=2, mem_bytes=2 * GIB))
    return hv


def request(live: bool = True, dst: str = "b") -> MigrationRequest:
    return MigrationRequest("web", "a", dst, live, 100.0, 300, False)


class Migrating:
    """``migrate()`` on a thread, as the monitor runs it."""

    def __init__(self, hv: ScriptedHypervisor, req: MigrationRequest) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(hv, req), daemon=True)
        self.thread.start()

    def _run(self, hv: ScriptedHypervisor, req: MigrationRequest) -> None:
        try:
            hv.migrate(req)
        except BaseException as exc:
            self.error = exc

    def running(self) -> bool:
        self.thread.join(timeout=0.02)  # long enough for a returning migrate() to return
        return self.thread.is_alive()

    def ended(self) -> BaseException | None:
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "migrate() did not return"
        return self.error


def wait_for_job(hv: ScriptedHypervisor, vm: str = "web") -> None:
    deadline = time.monotonic() + WAIT_S
    while vm not in hv.active_jobs():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.001)


def test_preflight_facts_are_set_per_guest_and_host() -> None:
    hv = scripted()
    disk = DiskFacts("vda", "/img/web.qcow2", "writeback", "disk", False)
    web = hv.hosts["a"].vms["web"]
    web.disks, web.cpu_xml = (disk,), "<cpu mode='host-model'/>"
    web.interfaces = (InterfaceFacts("bridge", "br0"),)
    b = hv.hosts["b"]
    b.libvirt_version, b.networks, b.bridges = 8_000_000, ("default",), ("br0",)
    b.visible_paths, b.cpu_models = frozenset({"/img/other.qcow2"}), frozenset()
    facts = hv.domain_facts("a", "web")
    assert (facts.disks, facts.cpu_xml, facts.interfaces) == (
        (disk,),
        web.cpu_xml,
        web.interfaces,
    )
    host = hv.host_facts("b")
    assert (host.libvirt_version, host.networks, host.bridges) == (
        8_000_000,
        ("default",),
        ("br0",),
    )
    assert not hv.path_visible("b", "/img/web.qcow2") and hv.path_visible("b", "/img/other.qcow2")
    assert not hv.cpu_compatible("b", web.cpu_xml) and hv.cpu_compatible("a", web.cpu_xml)
    assert hv.cpu_compatible("b", web.cpu_xml, virt_type="qemu")  # TCG: any host CPU


def test_failures_hit_the_next_n_calls_of_named_operations_and_are_logged() -> None:
    hv = scripted()
    hv.fail("a", times=2, ops=["domain_state"])
    hv.fail("b", error=RuntimeError("a bug in the adapter"))
    assert hv.host_facts("a").name == "a"  # another operation: not affected
    for _ in range(2):
        with pytest.raises(HypervisorError) as err:
            hv.domain_state("a", "web")
        assert (err.value.host, err.value.operation) == ("a", "domain_state")
    assert hv.domain_state("a", "web") == "running"
    with pytest.raises(RuntimeError, match="bug"):
        hv.domain_state("b", "web")
    assert hv.domain_state("b", "web") is None
    assert [(c.host, c.op, c.vm) for c in hv.calls_to("domain_state")] == [
        ("a", "domain_state", "web"),
        ("a", "domain_state", "web"),
        ("a", "domain_state", "web"),
        ("b", "domain_state", "web"),
        ("b", "domain_state", "web"),
    ]
    hv.fail("a", ops=["domain_state"], skip=1)
    assert hv.domain_state("a", "web") == "running"
    with pytest.raises(HypervisorError):
        hv.domain_state("a", "web")
    hv.fail("a", ops=["sample_all"])
    samples = {s.name: s for s in hv.sample_all()}
    assert not samples["a"].up and samples["b"].up
    assert {s.name: s.up for s in hv.sample_all()}["a"]  # that was one call


def test_a_hang_blocks_until_released_or_times_out() -> None:
    hv = scripted()
    hv.hang("b", ops=["host_facts"], timeout_s=0.02)
    t0 = time.monotonic()
    with pytest.raises(HypervisorError, match="no answer within"):
        hv.host_facts("b")
    assert time.monotonic() - t0 >= 0.02
    hv.hang("b", timeout_s=WAIT_S)
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(hv.host_facts("b").name))
    t.start()
    t.join(timeout=0.05)
    assert t.is_alive() and not box  # hanging
    hv.release_hangs()
    t.join(timeout=WAIT_S)
    assert box == ["b"]


def test_a_script_runs_one_sample_per_poll_with_a_paused_incoming_copy() -> None:
    hv = scripted()
    hv.script("web", converging(passes=3))
    job = Migrating(hv, request())
    wait_for_job(hv)
    assert job.running()
    # While the job runs the destination lists the incoming domain as paused.
    assert hv.domain_state("b", "web") == "paused" and hv.placement("web") == {
        "a": "running",
        "b": INCOMING,
    }
    a, b, _ = hv.sample_all()
    assert [(v.name, v.incoming, v.in_job) for v in b.vms] == [("web", True, True)]
    assert [(v.name, v.incoming, v.in_job) for v in a.vms] == [("web", False, True)]
    assert hv.domain_facts("a", "web").in_job
    with pytest.raises(HypervisorError, match="incoming"):
        hv.resume("b", "web")
    remaining = []
    for _ in range(3):
        stats = hv.job_stats("a", "web")
        assert stats is not None and stats.active
        remaining.append(stats.data_remaining_bytes // MIB)
        assert job.running()
    assert remaining == [128, 64, 32]
    stats_b = hv.job_stats("b", "web")  # the incoming end: seen, not advanced
    assert stats_b is not None and stats_b.data_remaining_bytes // MIB == 32
    assert hv.job_stats("a", "web") is None  # the poll that reaches Complete
    assert job.ended() is None
    assert hv.placement("web") == {"b": "running"} and hv.guest_problems("web") == []
    done = hv.job_stats("b", "web", completed=True)
    assert done is not None and not done.active and done.downtime_ms == 30.0
    (record,) = hv.jobs
    assert record.result == "completed" and record.ended_at_s is not None


@pytest.mark.parametrize("how", ["suspend", "downtime", "abort"])
def test_a_stalled_job_reacts_to_suspend_downtime_and_abort(how: str) -> None:
    hv = scripted()
    hv.script("web", [*stalling(), Stall(until_downtime_ms=2000), Complete()])
    job = Migrating(hv, request())
    wait_for_job(hv)
    polls = [hv.job_stats("a", "web") for _ in range(6)]
    assert all(s is not None and s.active for s in polls)
    assert len({s.data_remaining_bytes for s in polls[1:] if s}) == 1  # stuck
    assert [s.elapsed_s for s in polls if s] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert job.running()
    if how == "suspend":  # pause-and-complete: the rest goes across at once
        hv.suspend("a", "web")
        assert job.ended() is None
        assert hv.placement("web") == {"b": "running"}
    elif how == "downtime":
        hv.set_max_downtime("a", "web", 1000)
        assert hv.job_stats("a", "web") is not None and job.running()  # not enough yet
        hv.set_max_downtime("a", "web", 2000)
        assert hv.job_stats("a", "web") is None  # QEMU completes at its next check
        assert job.ended() is None
        assert hv.job_downtimes("web") == [1000, 2000]
        assert hv.placement("web") == {"b": "running"}
    else:
        hv.abort_job("a", "web")
        error = job.ended()
        assert isinstance(error, HypervisorError) and "canceled by client" in str(error)
        assert "live migration of web a->b" in str(error)
        assert hv.placement("web") == {"a": "running"}
    assert hv.guest_problems("web") == []


def test_a_stall_can_last_until_the_guest_is_suspended() -> None:
    hv = scripted()
    hv.script("web", Script((*stalling(), Stall(until_suspended=True), Fail()), on_suspend="pause"))
    job = Migrating(hv, request())
    wait_for_job(hv)
    for _ in range(4):
        assert hv.job_stats("a", "web") is not None
    hv.suspend("a", "web")
    assert job.running()  # on_suspend="pause": the guest only stops
    assert hv.job_stats("a", "web") is None  # the next poll goes on: Fail
    assert isinstance(job.ended(), HypervisorError)
    assert hv.placement("web") == {"a": "paused"}  # libvirt does not resume what we paused


def test_a_hanging_job_ignores_everything_until_released() -> None:
    hv = scripted()
    hv.script("web", [*stalling(), Hang()])
    job = Migrating(hv, request())
    wait_for_job(hv)
    for _ in range(4):
        hv.job_stats("a", "web")
    hv.abort_job("a", "web")
    hv.set_max_downtime("a", "web", 60_000)
    assert job.running()
    assert hv.guest_problems("web", job_left=True) == []
    assert hv.guest_problems("web") == [
        "web has an incoming copy on b",
        "a migration job of web still runs",
    ]
    hv.release("web", complete=False)
    assert isinstance(job.ended(), HypervisorError)
    assert hv.placement("web") == {"a": "running"}


def test_an_orphaned_job_runs_on_without_a_client() -> None:
    hv = scripted()
    hv.start_job(request(), [*stalling(), Stall()])
    assert hv.active_jobs() == ["web"] and hv.placement("web") == {"a": "running", "b": INCOMING}
    assert hv.job_stats("a", "web") is not None
    hv.abort_job("a", "web")
    assert hv.job_stats("a", "web") is None and hv.placement("web") == {"a": "running"}
    with pytest.raises(HypervisorError, match="no job"):
        hv.abort_job("a", "web")


def test_a_client_lost_mid_job_raises_while_the_job_goes_on() -> None:
    hv = scripted()
    hv.script("web", [*converging(passes=1)[:1], ClientLost(), *converging(passes=2)])
    job = Migrating(hv, request())
    wait_for_job(hv)
    assert hv.job_stats("a", "web") is not None
    assert hv.job_stats("a", "web") is not None  # ClientLost, then the next sample
    error = job.ended()
    assert isinstance(error, HypervisorError) and "End of file" in str(error)
    assert hv.active_jobs() == ["web"]
    while hv.job_stats("a", "web") is not None:  # someone else polls it to its end
        pass
    assert hv.placement("web") == {"b": "running"}


@pytest.mark.parametrize(
    ("step", "where"),
    [
        (HostDies("dst"), {"a": "running"}),
        (HostDies("src"), {}),
        (HostDies("src", after_handover=True), {"b": "running"}),
    ],
)
def test_a_host_dies_mid_job(step: HostDies, where: dict[str, str]) -> None:
    hv = scripted()
    hv.script("web", [*converging()[:2], step])
    job = Migrating(hv, request())
    wait_for_job(hv)
    hv.job_stats("a", "web")
    hv.job_stats("a", "web")
    dead = "a" if step.role == "src" else "b"
    if step.role == "src":
        with pytest.raises(HypervisorError, match="does not answer"):
            hv.job_stats("a", "web")
    else:
        assert hv.job_stats("a", "web") is None
    assert isinstance(job.ended(), HypervisorError)
    assert hv.placement("web") == where
    with pytest.raises(HypervisorError, match="does not answer"):
        hv.domain_state(dead, "web")
    assert not {s.name: s.up for s in hv.sample_all()}[dead]
    assert hv.active_jobs() == []


def test_a_partitioned_source_keeps_its_job_and_guest() -> None:
    hv = scripted()
    hv.script("web", [*converging()[:1], Unreachable("src"), *converging(passes=2)])
    job = Migrating(hv, request())
    wait_for_job(hv)
    hv.job_stats("a", "web")
    with pytest.raises(HypervisorError, match="does not answer"):
        hv.job_stats("a", "web")
    assert isinstance(job.ended(), HypervisorError)
    assert hv.placement("web") == {"a": "running", "b": INCOMING}
    hv.heal("a")
    while hv.job_stats("a", "web") is not None:
        pass
    assert hv.placement("web") == {"b": "running"}


def test_cold_migration_pauses_the_source_and_a_failure_resumes_it() -> None:
    hv = scripted()
    hv.script("web", [*converging(passes=1)[:1], Fail("disk full")])
    job = Migrating(hv, request(live=False))
    wait_for_job(hv)
    assert hv.domain_state("a", "web") == "paused"
    hv.job_stats("a", "web")
    assert hv.job_stats("a", "web") is None
    error = job.ended()
    assert isinstance(error, HypervisorError) and "cold migration of web a->b" in str(error)
    assert "disk full" in str(error)
    assert hv.placement("web") == {"a": "running"}


def test_scripts_are_used_in_turn_then_migrations_complete_at_once() -> None:
    hv = scripted()
    hv.script("web", [Fail("first")])
    job = Migrating(hv, request())
    wait_for_job(hv)
    assert hv.job_stats("a", "web") is None
    assert isinstance(job.ended(), HypervisorError)
    hv.migrate(request())  # no script left: at once, as SimHypervisor
    assert hv.placement("web") == {"b": "running"}
    done = hv.job_stats("b", "web", completed=True)
    assert done is not None and done.data_processed_bytes == 2 * GIB
    with pytest.raises(HypervisorError, match="already exists"):
        hv.add_vm("c", SimVm("web", vcpus=1, mem_bytes=GIB))
        hv.migrate(MigrationRequest("web", "c", "b", True, 100.0, 300, False))
