"""A simulated hypervisor that fails, hangs and runs scripted migrations: for tests of the
bad-day paths of the move engine, reconcile and the executor (house rule 16).

``ScriptedHypervisor`` is a ``SimHypervisor`` (same hosts, guests and preflight facts,
settable per guest and host) that also

  * logs every protocol call (``calls``: when, host, operation, guest, arguments);
  * fails or hangs a host's next N calls, optionally only named operations (``fail``,
    ``hang``); a hang blocks until ``release_hangs`` or its timeout, then raises like the
    adapter's timeout does;
  * kills a host (``kill_host``: its guests die with it) or cuts it off (``partition``: it
    stops answering, its guests and jobs go on);
  * runs a migration by a ``Script`` given per guest (``script``). ``migrate()`` blocks on
    its worker thread while each ``job_stats`` poll on the source returns the next step's
    sample, as libvirt's job does:

      JobStats       one sample (returned by one poll)
      Stall          repeat the last sample, job time going on, until the max downtime
                     reaches a bound (QEMU completes once the limit covers what is left)
      Complete       the guest runs on the destination; migrate() returns
      Fail           migrate() raises; the guest stays on the source
      Hang           the job stops answering: suspend, downtime and abort do nothing;
                     migrate() returns only on ``release``
      ClientLost     migrate() raises (our connection dropped) while the job goes on
      HostDies       the source or destination dies mid-job (or the source after handover)
      Unreachable    the source or destination stops answering; the job goes on
      PostcopyFails  the link breaks after the switch to post-copy: migrate() raises, the
                     guest stays paused on both ends in libvirt's post-copy-failed state
                     (the destination holds the newest state, the source the rest)

    ``start_postcopy`` (job started with ``req.postcopy``) switches the guest to the
    destination (running there, paused on the source); by default the rest then goes across
    and the job completes (``Script.on_postcopy``). A ``migrate`` with ``postcopy_resume``
    recovers a failed post-copy by the next script (no steps: it completes at once).
    A script reacts to ``suspend`` (pause-and-complete: the rest goes across at once and
    the guest ends running on the destination, as seen in the lab), ``set_max_downtime``
    (recorded; see Stall) and ``abort_job`` (the job ends with an error, the guest stays on
    the source; a script may ignore or refuse the abort). A guest without a script
    migrates at once, as in ``SimHypervisor``.

The libvirt states seen on real hosts are modelled: while a job runs the destination lists
the incoming domain as paused (and refuses resume/suspend on it); a job outlives a client
that crashed (``start_job`` leaves one behind without a client); a cold migration pauses
the source and libvirt resumes it if the job fails.

``placement`` and ``guest_problems`` read the ground truth (whatever the hosts answer) for
the tests' invariant checks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from balancerd.errors import HypervisorError
from balancerd.hypervisor.base import (
    DestinationFacts,
    DomainFacts,
    HostFacts,
    JobStats,
    MigrationRequest,
)
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.model import HostSample
from balancerd.units import MIB

PAGE_BYTES = 4096
ALIVE_STATES = ("running", "paused", "blocked")
INCOMING = "incoming"  # how ``placement`` shows the paused target end of a running job

# --- script steps ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stall:
    """Repeat the last sample (job time advancing by ``tick_s``) until the max downtime in
    force reaches ``until_downtime_ms`` or, with ``until_suspended``, until the client
    suspended the guest; then go on with the next step (neither: for ever)."""

    until_downtime_ms: int | None = None
    until_suspended: bool = False
    tick_s: float = 1.0
    until_postcopy: bool = False  # ... or until the client switched the job to post-copy

    def over(self, max_downtime_ms: int, suspended: bool, postcopy: bool = False) -> bool:
        if self.until_downtime_ms is not None and max_downtime_ms >= self.until_downtime_ms:
            return True
        if self.until_postcopy and postcopy:
            return True
        return self.until_suspended and suspended


@dataclass(frozen=True)
class Complete:
    downtime_ms: float = 30.0


@dataclass(frozen=True)
class Fail:
    detail: str = "internal error: qemu unexpectedly closed the monitor"


@dataclass(frozen=True)
class Hang:
    """The job stops: stats frozen, suspend/downtime/abort ignored, until ``release``."""


@dataclass(frozen=True)
class ClientLost:
    """Our connection to the source drops: migrate() raises, the job goes on."""

    detail: str = "End of file while reading data: Input/output error"


@dataclass(frozen=True)
class HostDies:
    """``role`` dies (its guests with it). ``after_handover``: the source dies once the guest
    already runs on the destination (the confirm step never happens)."""

    role: Literal["src", "dst"]
    after_handover: bool = False


@dataclass(frozen=True)
class Unreachable:
    """``role`` stops answering us; its guests and the job go on (a cut management link)."""

    role: Literal["src", "dst"]


@dataclass(frozen=True)
class PostcopyFails:
    """The migration link breaks during post-copy (a network failure)."""

    detail: str = "internal error: post-copy failed: connection reset"


Step = (
    JobStats | Stall | Complete | Fail | Hang | ClientLost | HostDies | Unreachable | PostcopyFails
)


@dataclass(frozen=True)
class Script:
    steps: tuple[Step, ...] = ()
    # suspend() of the source mid-job: "complete" sends the rest at once (the lab's libvirt);
    # "pause" only stops the guest (the job goes on by its steps)
    on_suspend: Literal["complete", "pause"] = "complete"
    suspend_downtime_ms: float = 150.0
    # the guest's state on the destination after a suspend-and-complete (libvirt resumes it)
    state_after_suspend: str = "running"
    # abort_job(): "fail" ends the job with an error; "ignore" does nothing (a job that
    # does not end); "refuse" raises (a job in its completion phase cannot be aborted);
    # "complete" raises and the job completes (it was past the point of no return)
    on_abort: Literal["fail", "ignore", "refuse", "complete"] = "fail"
    # start_postcopy(): "complete" pulls the rest at once; "steps" goes on by the steps;
    # "pending" accepts the request but QEMU has not switched yet (it does at the end of
    # its current pass): the job goes on by the steps in pre-copy, and a Fail leaves the
    # guest running on the source (seen in the lab when the destination's libvirtd died
    # right after migrateStartPostCopy)
    on_postcopy: Literal["complete", "steps", "pending"] = "complete"
    # what the finished job reports as downtime (None: libvirt 9.0 reports none for post-copy)
    postcopy_downtime_ms: float | None = 40.0


def sample(
    *,
    elapsed_s: float,
    remaining_mib: float,
    total_mib: float = 256.0,
    processed_mib: float | None = None,
    iteration: int = 1,
    dirty_mib_s: float = 0.0,
    bandwidth_mib_s: float = 100.0,
    throttle_pct: int = 0,
) -> JobStats:
    """One job sample, sizes in MiB."""
    processed = total_mib - remaining_mib if processed_mib is None else processed_mib
    return JobStats(
        active=True,
        elapsed_s=elapsed_s,
        data_total_bytes=int(total_mib * MIB),
        data_processed_bytes=int(max(0.0, processed) * MIB),
        data_remaining_bytes=int(remaining_mib * MIB),
        mem_bandwidth_bytes_s=bandwidth_mib_s * MIB,
        dirty_rate_pages_s=dirty_mib_s * MIB / PAGE_BYTES,
        page_size_bytes=PAGE_BYTES,
        iteration=iteration,
        expected_downtime_ms=remaining_mib / max(bandwidth_mib_s, 1e-9) * 1000.0,
        auto_converge_throttle_pct=throttle_pct,
    )


def converging(passes: int = 4, total_mib: float = 256.0, throttle_pct: int = 0) -> list[Step]:
    """Remaining data halves with each sample, then the job completes."""
    steps: list[Step] = []
    remaining = total_mib
    for i in range(passes):
        remaining /= 2.0
        steps.append(
            sample(
                elapsed_s=float(i + 1),
                remaining_mib=remaining,
                total_mib=total_mib,
                iteration=i + 1,
                dirty_mib_s=5.0,
                throttle_pct=throttle_pct,
            )
        )
    steps.append(Complete())
    return steps


def stalling(remaining_mib: float = 80.0, dirty_mib_s: float = 150.0) -> list[Step]:
    """A first pass, then remaining data stuck with a dirty rate above the link (the
    ``Stall`` that follows decides how it ends)."""
    return [
        sample(elapsed_s=1.0, remaining_mib=128.0, iteration=1, dirty_mib_s=dirty_mib_s),
        sample(elapsed_s=2.0, remaining_mib=remaining_mib, iteration=2, dirty_mib_s=dirty_mib_s),
    ]


# --- the call log and faults ----------------------------------------------------------


@dataclass(frozen=True)
class Call:
    at_s: float  # time.monotonic()
    host: str
    op: str  # the protocol method: "migrate", "job_stats", "suspend", ...
    vm: str
    args: tuple[object, ...]


@dataclass(frozen=True)
class JobRecord:
    """One migration job: when it ran and how it ended (for concurrency checks)."""

    vm: str
    src: str
    dst: str
    live: bool
    started_at_s: float
    ended_at_s: float | None  # None while it runs
    result: str  # "running" | "completed" | "failed"


@dataclass
class _Fault:
    host: str
    ops: frozenset[str] | None
    remaining: int
    kind: Literal["fail", "hang"]
    error: BaseException | None = None
    timeout_s: float = 5.0
    skip: int = 0  # matching calls let through before the fault applies

    def matches(self, host: str, op: str) -> bool:
        return self.remaining > 0 and host == self.host and (self.ops is None or op in self.ops)

    def applies(self) -> bool:
        """Count one matching call; whether the fault hits it."""
        if self.skip > 0:
            self.skip -= 1
            return False
        self.remaining -= 1
        return True


@dataclass
class _Job:
    req: MigrationRequest
    script: Script
    state_before: str
    started_at_s: float
    max_downtime_ms: int
    pos: int = 0
    last: JobStats | None = None
    hanging: bool = False
    suspended: bool = False  # the client suspended the source
    ended: bool = False
    error: str | None = None  # why the job failed
    client_error: str | None = None  # set when our connection dropped mid-job
    has_client: bool = True
    downtimes_ms: list[int] = field(default_factory=list)
    record: int = 0  # index in ScriptedHypervisor.jobs
    postcopy: bool = False  # switched to post-copy


class ScriptedHypervisor(SimHypervisor):
    """A SimHypervisor whose calls can fail or hang and whose migrations follow scripts."""

    def __init__(self, hosts: Sequence[SimHost], *, job_timeout_s: float = 30.0) -> None:
        super().__init__(hosts)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._faults: list[_Fault] = []
        self._hang_release = threading.Event()
        self._scripts: dict[str, list[Script]] = {}
        self._jobs: dict[str, _Job] = {}  # running jobs by guest
        self._last_job: dict[str, _Job] = {}  # the last ended job by guest
        self._completed: dict[tuple[str, str], JobStats] = {}
        self._unreachable: set[str] = set()
        self._postcopy: dict[tuple[str, str], str] = {}  # (host, vm) -> "active" | "failed"
        self.job_timeout_s = job_timeout_s  # safety net: a job nobody polls fails after this
        self.calls: list[Call] = []
        self.jobs: list[JobRecord] = []
        self.max_active_jobs = 0

    # --- what tests set up ----------------------------------------------------------

    def script(self, vm: str, *scripts: Script | Iterable[Step]) -> None:
        """The next migrations of ``vm`` follow ``scripts``, one each, in order (steps alone:
        default reactions); later ones complete at once."""
        with self._lock:
            self._scripts[vm] = [s if isinstance(s, Script) else Script(tuple(s)) for s in scripts]

    def fail(
        self,
        host: str,
        times: int = 1,
        ops: Iterable[str] | None = None,
        error: BaseException | None = None,
        skip: int = 0,
    ) -> None:
        """``host``'s next ``times`` calls (of ``ops``), after letting ``skip`` through, raise
        ``error`` (a HypervisorError naming host and operation by default)."""
        with self._lock:
            self._faults.append(
                _Fault(
                    host, None if ops is None else frozenset(ops), times, "fail", error, skip=skip
                )
            )

    def hang(
        self, host: str, times: int = 1, ops: Iterable[str] | None = None, timeout_s: float = 5.0
    ) -> None:
        """``host``'s next ``times`` calls (of ``ops``) block until ``release_hangs`` (then
        proceed) or ``timeout_s`` (then raise, as the adapter's timeout does)."""
        with self._lock:
            self._hang_release.clear()
            self._faults.append(
                _Fault(
                    host, None if ops is None else frozenset(ops), times, "hang", None, timeout_s
                )
            )

    def release_hangs(self) -> None:
        self._hang_release.set()

    def kill_host(self, host: str) -> None:
        """``host`` dies: it stops answering, its guests die, jobs through it fail."""
        with self._lock:
            self._kill(host)
            self._changed.notify_all()

    def partition(self, host: str) -> None:
        """``host`` stops answering us; its guests and jobs go on."""
        with self._lock:
            self._unreachable.add(host)

    def heal(self, host: str) -> None:
        with self._lock:
            self._unreachable.discard(host)

    def start_job(self, req: MigrationRequest, script: Script | Iterable[Step]) -> None:
        """A job left behind by a client that crashed: it runs (advanced by ``job_stats``
        polls) with nobody waiting in migrate()."""
        s = script if isinstance(script, Script) else Script(tuple(script))
        if not s.steps:
            raise ValueError("an orphaned job needs steps (it would complete at once)")
        with self._lock:
            self._start(req, s, "start_job").has_client = False

    def release(self, vm: str, complete: bool = True) -> None:
        """End ``vm``'s job (a Hang, or any running job): complete it or fail it."""
        with self._lock:
            job = self._jobs.get(vm)
            if job is None:
                return
            if complete:
                self._complete(job, 30.0)
            else:
                self._fail(job, "released by the test")
            self._changed.notify_all()

    def release_all(self) -> None:
        """Fail every running job and release every hang (test teardown)."""
        self.release_hangs()
        with self._lock:
            for job in list(self._jobs.values()):
                self._fail(job, "released at teardown")
            self._changed.notify_all()

    # --- what tests read --------------------------------------------------------------

    def calls_to(
        self, op: str | None = None, host: str | None = None, vm: str | None = None
    ) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self.calls
                if (op is None or c.op == op)
                and (host is None or c.host == host)
                and (vm is None or c.vm == vm)
            ]

    def active_jobs(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs)

    def job_downtimes(self, vm: str) -> list[int]:
        """The max downtimes set on ``vm``'s running (or last) job, in order."""
        with self._lock:
            job = self._jobs.get(vm) or self._last_job.get(vm)
            return list(job.downtimes_ms) if job else []

    def placement(self, vm: str) -> dict[str, str]:
        """Ground truth, whatever the hosts answer: host -> state of each domain named
        ``vm`` (``INCOMING`` for the paused target end of a running job)."""
        with self._lock:
            out = {}
            for h in self.hosts.values():
                v = h.vms.get(vm)
                if v is not None:
                    out[h.name] = INCOMING if v.incoming else v.state
            return out

    def guest_problems(
        self, vm: str, *, paused_before: bool = False, job_left: bool = False
    ) -> list[str]:
        """The invariant for one guest: alive on exactly one host, in the state it had
        before (not left paused by us), defined on at most one host, no job running, no
        incoming copy; ``job_left``: a job we gave up on may still run (and hold its
        incoming copy on the destination)."""
        where = self.placement(vm)
        want = "paused" if paused_before else "running"
        alive = {h: s for h, s in where.items() if s in ALIVE_STATES}
        problems = []
        if len(alive) != 1:
            problems.append(f"{vm} is alive on {len(alive)} hosts: {where}")
        problems += [f"{vm} is {s} on {h}, expected {want}" for h, s in alive.items() if s != want]
        incoming = [h for h, s in where.items() if s == INCOMING]
        if incoming and not job_left:
            problems.append(f"{vm} has an incoming copy on {', '.join(incoming)}")
        defined = [h for h, s in where.items() if s != INCOMING]
        if len(defined) > 1:
            problems.append(f"{vm} is defined on {', '.join(defined)}")
        with self._lock:
            if vm in self._jobs and not job_left:
                problems.append(f"a migration job of {vm} still runs")
        return problems

    # --- call plumbing ----------------------------------------------------------------

    def _enter(self, host: str, op: str, vm: str = "", *args: object) -> None:
        """Log the call, apply a matching fault, refuse if the host does not answer."""
        with self._lock:
            self.calls.append(Call(time.monotonic(), host, op, vm, args))
            fault = next((f for f in self._faults if f.matches(host, op)), None)
            if fault is not None and not fault.applies():
                fault = None
        if fault is not None and fault.kind == "hang":
            if not self._hang_release.wait(fault.timeout_s):
                raise HypervisorError(host, op, f"no answer within {fault.timeout_s:.1f} s")
        elif fault is not None:
            raise fault.error or HypervisorError(host, op, "injected failure")
        with self._lock:
            self._check_reachable(host, op)

    def _check_reachable(self, host: str, op: str) -> None:
        h = self.hosts.get(host)
        if h is not None and (not h.up or host in self._unreachable):
            raise HypervisorError(host, op, "host does not answer")

    # --- the Hypervisor protocol ------------------------------------------------------

    def sample_all(self) -> tuple[HostSample, ...]:
        down: dict[str, str] = {}
        with self._lock:
            for name, h in self.hosts.items():
                self.calls.append(Call(time.monotonic(), name, "sample_all", "", ()))
                fault = next((f for f in self._faults if f.matches(name, "sample_all")), None)
                if fault is not None and fault.applies():  # a hang: a sample that timed out
                    down[name] = "injected failure" if fault.kind == "fail" else "timed out"
                elif not h.up or name in self._unreachable:
                    down[name] = "host does not answer"
            samples = super().sample_all()
            # both ends of a running migration are in a job
            in_job = {(h, j.req.vm) for j in self._jobs.values() for h in (j.req.src, j.req.dst)}
        return tuple(
            HostSample(s.name, s.uri, False, s.sampled_at_s, error=down[s.name])
            if s.name in down
            else replace(
                s,
                vms=tuple(
                    replace(v, in_job=True) if (s.name, v.name) in in_job else v for v in s.vms
                ),
            )
            for s in samples
        )

    def domain_facts(self, host: str, vm: str) -> DomainFacts:
        self._enter(host, "domain_facts", vm)
        with self._lock:
            facts = super().domain_facts(host, vm)
            return replace(facts, in_job=facts.in_job or vm in self._jobs)

    def host_facts(self, host: str) -> HostFacts:
        self._enter(host, "host_facts")
        with self._lock:
            return super().host_facts(host)

    def cpu_compatible(self, host: str, cpu_xml: str, virt_type: str = "kvm") -> bool:
        self._enter(host, "cpu_compatible", "", cpu_xml, virt_type)
        with self._lock:
            return super().cpu_compatible(host, cpu_xml, virt_type)

    def path_visible(self, host: str, path: str) -> bool:
        self._enter(host, "path_visible", "", path)
        with self._lock:
            return super().path_visible(host, path)

    def destination_facts(
        self, host: str, vm: str, cpu_xml: str, virt_type: str, paths: Sequence[str]
    ) -> DestinationFacts:
        self._enter(host, "destination_facts", vm, cpu_xml, virt_type, tuple(paths))
        with self._lock:
            return super().destination_facts(host, vm, cpu_xml, virt_type, paths)

    def migrate(self, req: MigrationRequest) -> None:
        self._enter(req.src, "migrate", req.vm, req)
        with self._changed:
            queued = self._scripts.get(req.vm)
            script = queued.pop(0) if queued else Script()
            if req.postcopy_resume:
                self._resume_postcopy(req, script)
                return
            job = self._start(req, script, _what(req))
            if not script.steps:
                self._complete(job, 0.0)
            deadline = time.monotonic() + self.job_timeout_s
            while not job.ended and job.client_error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._fail(job, f"simulated job had no end within {self.job_timeout_s} s")
                    break
                self._changed.wait(left)
            if job.client_error is not None:
                job.has_client = False
                raise HypervisorError(req.src, _what(req), job.client_error)
            if job.error is not None:
                raise HypervisorError(req.src, _what(req), job.error)

    def job_stats(self, host: str, vm: str, completed: bool = False) -> JobStats | None:
        self._enter(host, "job_stats", vm, completed)
        with self._changed:
            self._vm(host, vm, "job_stats")
            if completed:
                return self._completed.get((host, vm))
            job = self._jobs.get(vm)
            if job is None:
                return None
            if host == job.req.dst:  # the incoming end: the job as last seen, not advanced
                return job.last or sample(elapsed_s=0.0, remaining_mib=0.0, total_mib=0.0)
            if host != job.req.src:
                return None
            try:
                return self._advance(job)
            finally:
                self._changed.notify_all()

    def set_max_downtime(self, host: str, vm: str, downtime_ms: int) -> None:
        self._enter(host, "set_max_downtime", vm, downtime_ms)
        with self._lock:
            self._vm(host, vm, "set_max_downtime")
            job = self._jobs.get(vm)
            if job is not None and host == job.req.src:
                job.max_downtime_ms = downtime_ms
                job.downtimes_ms.append(downtime_ms)

    def start_postcopy(self, host: str, vm: str) -> None:
        self._enter(host, "start_postcopy", vm)
        with self._changed:
            self._vm(host, vm, "start_postcopy")
            job = self._jobs.get(vm)
            if job is None or host != job.req.src:
                raise HypervisorError(host, "start_postcopy", "no migration job is active")
            if not job.req.postcopy:
                raise HypervisorError(
                    host, "start_postcopy", "post-copy can only be started after enabling it"
                )
            if job.hanging or job.script.on_postcopy == "pending":
                return
            job.postcopy = True
            self.hosts[host].vms[vm].state = "paused"
            incoming = self.hosts[job.req.dst].vms[vm]
            incoming.incoming = False
            incoming.state = "running"
            self._postcopy[(host, vm)] = self._postcopy[(job.req.dst, vm)] = "active"
            if job.script.on_postcopy == "complete":
                self._complete(job, job.script.postcopy_downtime_ms)
            self._changed.notify_all()

    def postcopy_state(self, host: str, vm: str) -> str:
        self._enter(host, "postcopy_state", vm)
        with self._lock:
            return self._postcopy.get((host, vm), "")

    def start_dirty_rate(self, host: str, vm: str, seconds: int) -> None:
        self._enter(host, "start_dirty_rate", vm, seconds)
        with self._lock:
            super().start_dirty_rate(host, vm, seconds)

    def suspend(self, host: str, vm: str) -> None:
        self._enter(host, "suspend", vm)
        with self._changed:
            v = self._vm(host, vm, "suspend")
            if v.incoming:
                raise HypervisorError(host, "suspend", f"{vm} is an incoming migration")
            v.state = "paused"
            job = self._jobs.get(vm)
            if job is not None and host == job.req.src and not job.hanging:
                job.suspended = True
                if job.script.on_suspend == "complete":
                    self._complete(job, job.script.suspend_downtime_ms)
                    self._changed.notify_all()

    def resume(self, host: str, vm: str) -> None:
        self._enter(host, "resume", vm)
        with self._lock:
            v = self._vm(host, vm, "resume")
            if v.incoming:
                raise HypervisorError(host, "resume", f"{vm} is an incoming migration")
            v.state = "running"
            job = self._jobs.get(vm)
            if job is not None and host == job.req.src:
                job.suspended = False

    def abort_job(self, host: str, vm: str) -> None:
        self._enter(host, "abort_job", vm)
        with self._changed:
            self._vm(host, vm, "abort_job")
            job = self._jobs.get(vm)
            if job is None:
                raise HypervisorError(host, "abort_job", "no job is active on the domain")
            if job.hanging or job.script.on_abort == "ignore":
                return
            if job.script.on_abort in ("refuse", "complete"):
                if job.script.on_abort == "complete":
                    self._complete(job, job.script.suspend_downtime_ms)
                    self._changed.notify_all()
                raise HypervisorError(host, "abort_job", "migration is completing")
            self._fail(job, "operation aborted: migration out job: canceled by client")
            self._changed.notify_all()

    def domain_state(self, host: str, vm: str) -> str | None:
        self._enter(host, "domain_state", vm)
        with self._lock:
            return super().domain_state(host, vm)

    def destroy(self, host: str, vm: str) -> None:
        self._enter(host, "destroy", vm)
        with self._changed:
            job = self._jobs.get(vm)
            if job is not None and host in (job.req.src, job.req.dst):
                self._fail(job, f"domain destroyed on {host}")
                self._changed.notify_all()
            super().destroy(host, vm)

    def close(self) -> None:
        self.release_all()

    # --- jobs (called with the lock held) ---------------------------------------------

    def _start(self, req: MigrationRequest, script: Script, what: str) -> _Job:
        src = self._host(req.src, what)
        dst = self._host(req.dst, what)
        v = src.vms.get(req.vm)
        if v is None or v.incoming:
            raise HypervisorError(req.src, what, f"no guest {req.vm}")
        if req.vm in self._jobs or v.in_job:
            raise HypervisorError(req.src, what, "another job is active on the domain")
        if not dst.up or req.dst in self._unreachable:
            raise HypervisorError(req.src, what, f"unable to connect to {req.dst}")
        if req.vm in dst.vms:
            raise HypervisorError(req.src, what, f"domain {req.vm} already exists on {req.dst}")
        now = time.monotonic()
        job = _Job(req, script, v.state, now, req.max_downtime_ms, record=len(self.jobs))
        self.jobs.append(JobRecord(req.vm, req.src, req.dst, req.live, now, None, "running"))
        self._jobs[req.vm] = job
        self.max_active_jobs = max(self.max_active_jobs, len(self._jobs))
        dst.vms[req.vm] = replace(v, state="paused", incoming=True, cpu_time_ns=0)
        if not req.live:
            v.state = "paused"  # offline: libvirt pauses the guest while memory goes across
        return job

    def _resume_postcopy(self, req: MigrationRequest, script: Script) -> None:
        what = f"post-copy recovery of {req.vm} {req.src}->{req.dst}"
        self._check_reachable(req.dst, what)
        if self._postcopy.get((req.src, req.vm)) != "failed":
            raise HypervisorError(req.src, what, "domain is not in a failed post-copy")
        if any(isinstance(step, Fail) for step in script.steps):
            raise HypervisorError(req.src, what, "recovery failed")
        src, dst = self.hosts[req.src], self.hosts[req.dst]
        src.vms.pop(req.vm, None)
        v = dst.vms[req.vm]
        v.state = "running"
        self._postcopy.pop((req.src, req.vm), None)
        self._postcopy.pop((req.dst, req.vm), None)
        self._completed[(req.dst, req.vm)] = sample(
            elapsed_s=1.0, remaining_mib=0.0, total_mib=v.mem_bytes / MIB
        )

    def _end(self, job: _Job, result: str, error: str | None) -> None:
        job.ended = True
        job.error = error
        self._jobs.pop(job.req.vm, None)
        self._last_job[job.req.vm] = job
        r = self.jobs[job.record]
        self.jobs[job.record] = replace(r, ended_at_s=time.monotonic(), result=result)

    def _complete(self, job: _Job, downtime_ms: float | None) -> None:
        src = self.hosts[job.req.src]
        dst = self.hosts[job.req.dst]
        moved = src.vms.pop(job.req.vm, None)  # peer-to-peer: undefined on the source
        incoming = dst.vms.get(job.req.vm)
        if incoming is not None:
            incoming.incoming = False
            if moved is not None:
                incoming.cpu_time_ns = moved.cpu_time_ns
            if job.state_before == "paused":
                incoming.state = "paused"
            elif job.suspended:
                incoming.state = job.script.state_after_suspend
            else:
                incoming.state = "running"
        self._postcopy.pop((job.req.src, job.req.vm), None)
        self._postcopy.pop((job.req.dst, job.req.vm), None)
        # without samples (a migration that completed at once): all memory went in one pass
        mem_mib = (moved or incoming or SimVm("", 0, 0)).mem_bytes / MIB
        last = job.last or sample(elapsed_s=0.0, remaining_mib=0.0, total_mib=mem_mib)
        self._completed[(job.req.dst, job.req.vm)] = replace(
            last, active=False, data_remaining_bytes=0, downtime_ms=downtime_ms
        )
        self._end(job, "completed", None)

    def _fail(self, job: _Job, detail: str) -> None:
        if job.postcopy:
            # No way back: both ends stay, paused, in libvirt's post-copy-failed state.
            for host in (job.req.src, job.req.dst):
                v = self.hosts[host].vms.get(job.req.vm)
                if v is not None and self.hosts[host].up:
                    v.state = "paused"
                    self._postcopy[(host, job.req.vm)] = "failed"
            self._end(job, "failed", detail)
            return
        dst = self.hosts[job.req.dst]
        incoming = dst.vms.get(job.req.vm)
        if incoming is not None and incoming.incoming:
            del dst.vms[job.req.vm]
        v = self.hosts[job.req.src].vms.get(job.req.vm)
        if v is not None and not job.req.live and not job.suspended:
            v.state = job.state_before  # libvirt resumes what it paused itself
        self._end(job, "failed", detail)

    def _kill(self, host: str) -> None:
        h = self.hosts[host]
        for job in list(self._jobs.values()):
            if host == job.req.dst:
                self._fail(job, f"{host} closed the migration connection")
            elif host == job.req.src:
                self._fail(job, "End of file while reading data: Input/output error")
        h.up = False
        h.vms.clear()

    def _advance(self, job: _Job) -> JobStats | None:
        """The sample one poll of the source sees; runs the steps it reaches."""
        steps = job.script.steps
        while True:
            if job.hanging:
                return job.last
            step = steps[job.pos] if job.pos < len(steps) else Complete()
            if isinstance(step, JobStats):
                job.pos += 1
                job.last = replace(step, active=True)
                return job.last
            if isinstance(step, Stall):
                if step.over(job.max_downtime_ms, job.suspended, job.postcopy):
                    job.pos += 1
                    continue
                base = job.last or sample(elapsed_s=0.0, remaining_mib=0.0, total_mib=0.0)
                job.last = replace(base, elapsed_s=base.elapsed_s + step.tick_s)
                return job.last
            job.pos += 1
            if isinstance(step, Complete):
                self._complete(job, step.downtime_ms)
                return None
            if isinstance(step, Fail | PostcopyFails):
                self._fail(job, step.detail)
                return None
            if isinstance(step, Hang):
                job.hanging = True
                return job.last
            if isinstance(step, ClientLost):
                job.client_error = step.detail
                continue
            if isinstance(step, HostDies):
                return self._host_dies(job, step)
            if step.role == "dst":
                self._unreachable.add(job.req.dst)
                continue
            self._unreachable.add(job.req.src)
            job.client_error = "End of file while reading data: Input/output error"
            raise HypervisorError(job.req.src, "job_stats", "host does not answer")

    def _host_dies(self, job: _Job, step: HostDies) -> JobStats | None:
        if step.role == "dst":
            self._kill(job.req.dst)
            return None
        if step.after_handover:
            incoming = self.hosts[job.req.dst].vms.get(job.req.vm)
            if incoming is not None:
                incoming.incoming = False
                incoming.state = "paused" if job.state_before == "paused" else "running"
            self._end(job, "failed", "End of file while reading data: Input/output error")
        self._kill(job.req.src)
        raise HypervisorError(job.req.src, "job_stats", "host does not answer")


def _what(req: MigrationRequest) -> str:
    return f"{'live' if req.live else 'cold'} migration of {req.vm} {req.src}->{req.dst}"


__all__ = [
    "INCOMING",
    "Call",
    "ClientLost",
    "Complete",
    "Fail",
    "Hang",
    "HostDies",
    "JobRecord",
    "PostcopyFails",
    "Script",
    "ScriptedHypervisor",
    "SimHost",
    "SimVm",
    "Stall",
    "Step",
    "Unreachable",
    "converging",
    "sample",
    "stalling",
]
