"""One move end to end: preflight -> journal intent -> live migration under the monitor ->
(cold fallback) -> verify -> journal outcome. Never raises: the result says what happened.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from balancerd.coord.base import CoordinationError
from balancerd.errors import HypervisorError
from balancerd.execute.converge import Mode, StallRules, mode_of
from balancerd.execute.journal import JournalStore
from balancerd.execute.monitor import MonitorResult, run_migration
from balancerd.execute.preflight import CheckTiming, preflight, preflight_stopped
from balancerd.execute.reconcile import settle
from balancerd.hypervisor.base import Hypervisor, JobStats, MigrationRequest
from balancerd.model import Move
from balancerd.outcomes import MigrationMode, MoveOutcome, SkipKind, new_migration_id
from balancerd.policy.model import Migration
from balancerd.units import MIB

log = logging.getLogger(__name__)

MIGRATED, SKIPPED, FAILED = MoveOutcome.MIGRATED, MoveOutcome.SKIPPED, MoveOutcome.FAILED


@dataclass(frozen=True)
class MoveResult:
    vm: str
    src: str
    dst: str
    outcome: MoveOutcome
    mode: MigrationMode  # NONE when nothing completed
    reason: str  # why skipped/failed, or notes on a migration
    seconds: float
    downtime_ms: float | None = None
    bytes_sent: int = 0
    iterations: int = 0
    paused_ms: float | None = None  # our own bound on the pause (paused-fallback, offline)
    skip_kind: SkipKind | None = None  # set when outcome is SKIPPED
    migration_id: str = ""
    parallel_connections: int = 0  # streams used (0: one)
    compression: str = ""  # method used ("": uncompressed)
    predicted_s: float | None = None  # the prediction the plan had for this move
    preflight: tuple[CheckTiming, ...] = ()  # seconds per preflight step, in order
    dirty_rate_bytes_s: float | None = None  # the guest's dirty rate during a live job

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "from": self.src,
            "to": self.dst,
            "migration_id": self.migration_id,
            "result": str(self.outcome),
            "mode": str(self.mode),
            "skip_kind": None if self.skip_kind is None else str(self.skip_kind),
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 1),
            "bytes_sent": self.bytes_sent,
            "iterations": self.iterations,
            "paused_ms": None if self.paused_ms is None else round(self.paused_ms, 1),
            "parallel_connections": self.parallel_connections,
            "compression": self.compression or "none",
            "preflight_s": {c.check: round(c.elapsed_s, 3) for c in self.preflight},
            "predicted_s": None if self.predicted_s is None else round(self.predicted_s, 2),
            "dirty_rate_bytes_s": None
            if self.dirty_rate_bytes_s is None
            else round(self.dirty_rate_bytes_s),
        }

    def line(self) -> str:
        head = f"{self.vm} {self.src}->{self.dst} {self.outcome}"
        if self.outcome is not MoveOutcome.MIGRATED:
            return f"{head}: {self.reason}"
        downtime = "?" if self.downtime_ms is None else f"{self.downtime_ms:.0f} ms"
        if self.paused_ms is not None:
            downtime += f", paused <= {self.paused_ms:.0f} ms"
        text = (
            f"{head} ({self.mode}, {self.seconds:.1f} s, downtime {downtime}, "
            f"{self.bytes_sent / MIB:.0f} MiB sent, {self.iterations} iterations)"
        )
        return f"{text}: {self.reason}" if self.reason else text


# (move, job sample or None, message) -> None
MoveProgress = Callable[[Move, JobStats | None, str], None]


def _no_progress(_m: Move, _s: JobStats | None, _msg: str) -> None:
    pass


def _no_heartbeat() -> None:
    pass


def _no_start(_m: Move, _migration_id: str) -> None:
    pass


def _not_cancelled() -> str:
    return ""


@dataclass(frozen=True)
class Engine:
    """Everything one move needs, wired by the daemon/CLI."""

    hv: Hypervisor
    mig: Migration
    headroom_bytes: int = 0
    journal: JournalStore | None = None
    heartbeat: Callable[[], None] = field(default=_no_heartbeat)
    progress: MoveProgress = field(default=_no_progress)
    # (move, migration ID) once preflight passed and the intent is journalled
    on_start: Callable[[Move, str], None] = field(default=_no_start)
    # Why running jobs must end now ("": they may go on); checked while a job runs and
    # before a cold fallback. Set when balancerd stops.
    cancelled: Callable[[], str] = field(default=_not_cancelled)
    sample_interval_s: float = 1.0
    # How long a host that stops answering after the guest left its source (its libvirtd
    # died or restarts while QEMU goes on: a failed post-copy, or the verification) is
    # waited for before the move is left to reconcile or failed.
    host_back_wait_s: float = 60.0
    # False: no live attempt, migrate cold at once (benchmarks; guests known not to converge)
    live: bool = True


def _states(hv: Hypervisor, vm: str, *hosts: str) -> dict[str, str | None]:
    """Domain state per host; "unreachable" when the host does not answer."""
    out: dict[str, str | None] = {}
    for h in hosts:
        try:
            out[h] = hv.domain_state(h, vm)
        except HypervisorError:
            out[h] = "unreachable"
    return out


def _alive(state: str | None) -> bool:
    return state in ("running", "paused", "blocked")


def _left_for_reconcile(states: dict[str, str | None], m: Move, state_before: str) -> str:
    """After a failed job whose guest could not be settled: why only reconcile, once the
    silent host answers, can tell where it belongs (the journal entry stays open), or "".

    * The source does not answer and the guest does not run on the destination: a
      peer-to-peer job lives in the source's libvirtd and outlives its client, and a
      paused copy on the destination may be its incoming end (never resume that).
    * The destination does not answer and the guest, running before, is paused on the
      source (we suspended it to complete): it may already run on the destination, so
      resuming it here could run it twice."""
    if states[m.src] == "unreachable" and states[m.dst] not in ("running", "blocked"):
        return "the source does not answer, its job may go on: left for reconcile"
    if states[m.dst] == "unreachable" and states[m.src] == "paused" and state_before != "paused":
        return (
            f"left paused on {m.src}: {m.dst} does not answer and may run it: left for "
            f"reconcile (resume it on {m.src} by hand if {m.dst} is gone for good)"
        )
    return ""


class _Run:
    """State of one move while it runs (mutable, local to its thread)."""

    def __init__(self, engine: Engine, move: Move) -> None:
        self.e = engine
        self.m = move
        self.t0 = time.monotonic()
        self.entry: int | None = None
        self.state_before = "running"  # the guest's state when preflight saw it
        self.vm_uuid = ""  # ... and its UUID: settle never touches a same-named other guest
        self.migration_id = new_migration_id()
        self.what = f"{move.vm} {move.src}->{move.dst}"
        self.notes: list[str] = []  # what preflight did not use, and why
        self.stream: dict[str, Any] = {}  # preflight timings; streams, compression of the job
        self.log_fields = {
            "VM": move.vm,
            "HOST": move.src,
            "MIGRATION_ID": self.migration_id,
        }

    def journal(self, fn: Callable[[JournalStore], None]) -> None:
        if self.e.journal is not None:
            try:
                fn(self.e.journal)
            except Exception as exc:  # the journal must not take a migration down
                log.error("journal write failed for %s: %s", self.what, exc, extra=self.log_fields)

    def result(
        self,
        outcome: MoveOutcome,
        mode: MigrationMode,
        reason: str,
        keep_open: bool = False,
        skip_kind: SkipKind | None = None,
        **kw: Any,
    ) -> MoveResult:
        """The move's result; the journal entry gets it as its outcome unless ``keep_open``
        (the job may still run: reconcile settles it at the next start)."""
        if self.notes and outcome is not MoveOutcome.SKIPPED:
            reason = "; ".join([*self.notes, reason]) if reason else "; ".join(self.notes)
        kw = {**self.stream, **kw}
        if self.m.expected_s > 0:
            kw.setdefault("predicted_s", self.m.expected_s)
        r = MoveResult(
            self.m.vm,
            self.m.src,
            self.m.dst,
            outcome,
            mode,
            reason,
            time.monotonic() - self.t0,
            skip_kind=skip_kind,
            migration_id=self.migration_id,
            **kw,
        )
        if self.entry is not None and not keep_open:
            entry = self.entry
            self.journal(lambda j: j.finish(entry, outcome, mode, reason))
        level = logging.INFO if outcome is MoveOutcome.MIGRATED else logging.WARNING
        log.log(level, "%s [%s]", r.line(), self.migration_id, extra=self.log_fields)
        return r


def run_move(engine: Engine, move: Move) -> MoveResult:
    """Carry out one move. Never raises."""
    run = _Run(engine, move)
    try:
        return _run_move(run)
    except Exception as exc:  # a bug or an unexpected error: fail this step only
        log.exception("%s: unexpected error", run.what, extra=run.log_fields)
        return _after_unexpected(run, exc)


def _after_unexpected(run: _Run, exc: Exception) -> MoveResult:
    """The job may still run and the guest may be paused: settle it now. The journal
    entry stays open unless the guest was settled, so reconcile finishes the job later."""
    why = f"unexpected error: {exc!r}"
    if run.entry is None:
        return run.result(FAILED, Mode.NONE, why)
    m = run.m
    try:
        actions, where = settle(
            run.e.hv,
            m.vm,
            m.src,
            m.dst,
            was_running=run.state_before != "paused",
            heartbeat=run.e.heartbeat,
            vm_uuid=run.vm_uuid,
        )
    except Exception as settle_exc:  # the hosts may be the problem; reconcile retries
        note = f"{why}; not settled ({settle_exc}); left for reconcile"
        return run.result(FAILED, Mode.NONE, note, keep_open=True)
    return run.result(FAILED, Mode.NONE, "; ".join([why, *actions, where]))


def _record_intent(run: _Run, vm_uuid: str, vm_state: str) -> MoveResult | None:
    """Journal the intent before anything is attempted; the skip result if it cannot be."""
    e, m = run.e, run.m
    if e.journal is None:
        return None
    try:
        run.entry = e.journal.begin(
            m.vm, vm_uuid, m.src, m.dst, vm_state, migration_id=run.migration_id
        )
    except (sqlite3.Error, OSError) as exc:  # e.g. the state directory is full
        why = f"cannot record the intent in the journal ({exc}): not attempted"
        return run.result(SKIPPED, Mode.NONE, why, skip_kind=SkipKind.JOURNAL)
    except CoordinationError as exc:  # the fenced intent was refused: we do not lead
        why = f"intent not recorded, not attempted: {exc}"
        return run.result(SKIPPED, Mode.NONE, why, skip_kind=SkipKind.NOT_LEADER)
    return None


def _move_stopped(run: _Run) -> MoveResult:
    """A stopped guest: libvirt moves its definition (offline, persist on the destination,
    undefine on the source); it must end defined on exactly one host. A failure or a
    half-done move (defined on both) is settled at once, else left for reconcile."""
    e, m = run.e, run.m
    e.on_start(m, run.migration_id)
    e.progress(m, None, "offline migration of a stopped guest")
    req = MigrationRequest(
        vm=m.vm,
        src=m.src,
        dst=m.dst,
        live=False,
        bandwidth_mib_s=e.mig.bandwidth_mib_s,
        max_downtime_ms=0,
        auto_converge=False,
        offline=True,
    )
    error = ""
    try:
        e.hv.migrate(req)
    except HypervisorError as exc:
        error = str(exc)
    e.heartbeat()
    try:
        actions, where = settle(e.hv, m.vm, m.src, m.dst, was_running=False, vm_uuid=run.vm_uuid)
        states = _states(e.hv, m.vm, m.src, m.dst)
    except HypervisorError as exc:
        why = "; ".join(x for x in (error, f"state unknown ({exc}); left for reconcile") if x)
        return run.result(FAILED, Mode.NONE, why, keep_open=True)
    detail = "; ".join([*actions, where])
    if states[m.dst] is not None and states[m.src] is None and not error:
        return run.result(MIGRATED, MigrationMode.DEFINITION, "stopped guest moved; " + detail)
    return run.result(FAILED, Mode.NONE, "; ".join(x for x in (error, detail) if x))


def _run_move(run: _Run) -> MoveResult:  # noqa: C901 (the move ladder: live, settle, cold fallback, verify, in order)
    e, m = run.e, run.m
    hv, mig = e.hv, e.mig
    e.progress(m, None, "preflight")
    pf = preflight_stopped(hv, m) if m.offline else preflight(hv, m, mig, e.headroom_bytes)
    e.heartbeat()
    run.stream = {"preflight": pf.timings}
    if not pf.ok or pf.facts is None:
        return run.result(SKIPPED, Mode.NONE, pf.reason, skip_kind=pf.kind)
    facts = pf.facts
    run.state_before = facts.state
    run.vm_uuid = facts.uuid
    not_recorded = _record_intent(run, facts.uuid, facts.state)
    if not_recorded is not None:
        return not_recorded
    if m.offline:
        return _move_stopped(run)
    entry = run.entry
    e.on_start(m, run.migration_id)
    rules = StallRules.for_vm(mig, m.vm)
    if rules.postcopy and not pf.postcopy:
        rules = replace(rules, postcopy=False)  # the hosts cannot: pause-and-complete
    run.notes.extend(pf.notes)
    parallel = mig.parallel_connections if mig.parallel_connections >= 2 else 0
    run.stream = {**run.stream, "parallel_connections": parallel, "compression": pf.compression}
    req = MigrationRequest(
        vm=m.vm,
        src=m.src,
        dst=m.dst,
        live=True,
        bandwidth_mib_s=mig.bandwidth_mib_s,
        max_downtime_ms=mig.max_downtime_ms,
        auto_converge=mig.auto_converge,
        copy_storage=m.vm in mig.copy_storage_vms,
        tls=pf.tls,
        postcopy=rules.postcopy,
        parallel_connections=parallel,
        compression=pf.compression,
    )

    def on_pause() -> None:
        if entry is not None:
            run.journal(lambda j: j.phase(entry, "paused"))

    def on_postcopy() -> None:
        # From here on the destination holds the guest's newest state: reconcile must
        # never destroy the destination copy (nor resume the source one).
        if entry is not None:
            run.journal(lambda j: j.phase(entry, "postcopy"))

    def progress(stats: JobStats | None, msg: str) -> None:
        e.progress(m, stats, msg)

    if not e.live:
        return _cold(run, req, rules, facts.state, "cold requested", progress)
    if entry is not None:
        run.journal(lambda j: j.phase(entry, "live"))
    e.progress(m, None, "live migration started")
    live = run_migration(
        hv,
        req,
        rules,
        heartbeat=e.heartbeat,
        progress=progress,
        on_pause=on_pause,
        on_postcopy=on_postcopy,
        interval_s=e.sample_interval_s,
        cancelled=e.cancelled,
    )
    if live.ok:
        return _verified(run, live, mode_of(live.ladder, live.history, live=True), facts.state)

    # The live job did not complete: first make sure the guest runs on exactly one host.
    live_error = live.abort_reason or _failure(live.error, f"live migration of {run.what}")
    if live.postcopy_for_s is not None and not _postcopy_never_began(hv, m):
        return _after_postcopy_failure(run, req, live, live_error)
    if not live.returned:
        return run.result(
            FAILED, Mode.NONE, f"{live_error}; left for reconcile at next start", keep_open=True
        )
    try:
        actions, where = settle(
            hv,
            m.vm,
            m.src,
            m.dst,
            was_running=facts.state != "paused",
            heartbeat=e.heartbeat,
            vm_uuid=run.vm_uuid,
        )
    except HypervisorError as exc:
        actions, where = [], f"state unknown ({exc})"
    states = _states(hv, m.vm, m.src, m.dst)
    note = "; ".join([*actions, where])
    left = _left_for_reconcile(states, m, facts.state)
    if left:
        return run.result(FAILED, Mode.NONE, f"{live_error}; {note}; {left}", keep_open=True)
    if _alive(states[m.dst]) and not _alive(states[m.src]):
        # The job reported an error, yet the guest made it (e.g. a failure after handover).
        mode = mode_of(live.ladder, live.history, live=True)
        return _verified(run, live, mode, facts.state, note=f"{live_error}; {note}")
    if live.abort_reason:  # the ladder or the time cap chose to abort: no cold retry
        return run.result(FAILED, Mode.NONE, f"{live_error}; {note}")
    why_not = ""
    if e.cancelled():
        why_not = e.cancelled()
    elif not mig.allow_cold:
        why_not = "allow_cold is off"
    elif m.vm in mig.no_pause_vms:
        why_not = f"{m.vm} is in no_pause_vms"
    elif states[m.dst] == "unreachable":
        why_not = f"{m.dst} does not answer"
    elif states[m.dst] is not None:
        why_not = f"a {states[m.dst]} domain {m.vm} is on {m.dst}"
    elif not _alive(states[m.src]):
        why_not = f"guest is {states[m.src]} on {m.src}"
    if why_not:
        return run.result(FAILED, Mode.NONE, f"{live_error}; {note}; no cold fallback: {why_not}")

    e.progress(m, None, f"{live_error}; trying a cold migration")
    return _cold(run, req, rules, facts.state, live_error, progress)


def _postcopy_never_began(hv: Hypervisor, m: Move) -> bool:
    """Whether a job that failed after migrateStartPostCopy never got to post-copy: QEMU
    switches at the end of its current pass, and a job that fails before (seen in the lab
    when the destination's libvirtd was killed right after the switch) leaves the guest
    running on the source, resumed by libvirt, with no post-copy state: an ordinary failed
    live migration, settled as one."""
    try:
        return hv.postcopy_state(m.src, m.vm) == "" and hv.domain_state(m.src, m.vm) == "running"
    except HypervisorError:
        return False


# Recovery attempts of a post-copy that failed (VIR_MIGRATE_POSTCOPY_RESUME), and the wait
# for the failed state to show on both ends first.
POSTCOPY_RECOVERY_ATTEMPTS = 2
POSTCOPY_FAILED_WAIT_S = 10.0


def _after_postcopy_failure(
    run: _Run, req: MigrationRequest, live: MonitorResult, error: str
) -> MoveResult:
    """The job failed after the switch to post-copy. The guest's newest state is on the
    destination and the rest of its memory on the source: neither copy may be destroyed
    or resumed on its own. Where both hosts answer and libvirt reports the failed
    post-copy state, recovery (VIR_MIGRATE_POSTCOPY_RESUME) is attempted; otherwise the
    journal entry stays open (phase postcopy) and the operator is told exactly that."""
    e, m = run.e, run.m
    hv = e.hv
    entry = run.entry
    mode = mode_of(live.ladder, live.history, live=True)
    hint = (
        f"post-copy of {run.what} failed: {error}; the guest's memory is split between "
        f"{m.src} (paused) and {m.dst}; neither copy was touched"
    )
    # A host whose libvirtd died (QEMU goes on) is waited for: recovery needs both ends.
    back_by = time.monotonic() + e.host_back_wait_s
    failed_by: float | None = None  # set once both hosts answer
    waiting_for = ""
    pc_src = pc_dst = ""
    while True:
        states = _states(hv, m.vm, m.src, m.dst)
        if _alive(states[m.dst]) and states[m.src] is None:
            return _verified(run, live, mode, run.state_before, note=f"{error}; completed anyway")
        try:
            pc_src = hv.postcopy_state(m.src, m.vm)
            pc_dst = hv.postcopy_state(m.dst, m.vm)
        except HypervisorError as exc:
            if time.monotonic() < back_by:
                if waiting_for != exc.host:
                    waiting_for = exc.host
                    e.progress(m, None, f"post-copy failed; waiting for {exc.host} to answer")
                e.heartbeat()
                time.sleep(min(1.0, e.host_back_wait_s / 10))
                continue
            return run.result(
                FAILED,
                Mode.NONE,
                f"{hint}; {exc}: recovery needs both hosts; left for reconcile "
                f"(resume it with `virsh migrate --postcopy --postcopy-resume` once {exc.host} "
                "answers)",
                keep_open=True,
            )
        if _alive(states[m.dst]) and pc_dst == "" and states[m.src] == "shutoff":
            # Seen in the lab (destination libvirtd killed in post-copy, back 10 s later):
            # QEMU finished the transfer, the destination runs the guest ("migrated"), the
            # source QEMU exited but libvirt failed the job and kept its definition.
            note = f"{error}; completed anyway"
            try:
                hv.destroy(m.src, m.vm)
                note += f"; removed the stale definition on {m.src}"
            except HypervisorError as exc:
                note += f"; the stale definition on {m.src} stays: {exc}"
            return _verified(run, live, mode, run.state_before, note=note)
        if failed_by is None:
            failed_by = time.monotonic() + POSTCOPY_FAILED_WAIT_S
        if (pc_src, pc_dst) == ("failed", "failed") or time.monotonic() >= failed_by:
            break
        e.heartbeat()
        time.sleep(0.5)
    if (pc_src, pc_dst) != ("failed", "failed"):
        return run.result(
            FAILED,
            Mode.NONE,
            f"{hint}; post-copy state {pc_src or 'none'} on {m.src}, {pc_dst or 'none'} on "
            f"{m.dst}: not recoverable by libvirt; left for reconcile",
            keep_open=True,
        )
    last_error = ""
    for attempt in range(1, POSTCOPY_RECOVERY_ATTEMPTS + 1):
        if entry is not None:
            run.journal(lambda j: j.phase(entry, "postcopy-recover"))
        e.progress(m, None, f"post-copy failed: recovery attempt {attempt}")
        rec = run_migration(
            hv,
            replace(req, postcopy_resume=True),
            StallRules.for_vm(e.mig, m.vm).cold(),  # no ladder: only the time cap
            heartbeat=e.heartbeat,
            interval_s=e.sample_interval_s,
        )
        if rec.ok:
            note = f"{error}; recovered the post-copy (attempt {attempt})"
            return _verified(run, replace(rec, ladder=live.ladder), mode, run.state_before, note)
        last_error = rec.abort_reason or _failure(rec.error, f"post-copy recovery of {run.what}")
    return run.result(
        FAILED,
        Mode.NONE,
        f"{hint}; recovery failed {POSTCOPY_RECOVERY_ATTEMPTS} times ({last_error}); "
        "left for reconcile",
        keep_open=True,
    )


def _cold(
    run: _Run,
    req: MigrationRequest,
    rules: StallRules,
    state_before: str,
    why: str,
    progress: Callable[[JobStats | None, str], None],
) -> MoveResult:
    """A cold (non-live) migration: the guest is paused while all memory is sent."""
    e, m = run.e, run.m
    entry = run.entry
    if entry is not None:
        run.journal(lambda j: j.phase(entry, "cold"))
    cold = run_migration(
        e.hv,
        replace(req, live=False),
        rules.cold(),
        heartbeat=e.heartbeat,
        progress=progress,
        interval_s=e.sample_interval_s,
        cancelled=e.cancelled,
    )
    if cold.ok:
        return _verified(run, cold, Mode.OFFLINE, state_before, note=why)
    cold_error = cold.abort_reason or _failure(cold.error, f"cold migration of {run.what}")
    if not cold.returned:
        return run.result(
            FAILED, Mode.NONE, f"{why}; {cold_error}; left for reconcile", keep_open=True
        )
    try:
        actions, where = settle(
            e.hv,
            m.vm,
            m.src,
            m.dst,
            was_running=state_before != "paused",
            heartbeat=e.heartbeat,
            vm_uuid=run.vm_uuid,
        )
    except HypervisorError as exc:
        actions, where = [], f"state unknown ({exc})"
    left = _left_for_reconcile(_states(e.hv, m.vm, m.src, m.dst), m, state_before)
    if left:
        note = "; ".join([why, cold_error, *actions, where, left])
        return run.result(FAILED, Mode.NONE, note, keep_open=True)
    return run.result(FAILED, Mode.NONE, "; ".join([why, cold_error, *actions, where]))


def _verified(
    run: _Run, mon: MonitorResult, mode: Mode, state_before: str, note: str = ""
) -> MoveResult:
    """Check the guest runs on the destination exactly once, then build the result."""
    e, m = run.e, run.m
    hv = e.hv
    hosts = list(dict.fromkeys([m.dst, m.src, *hv.host_names()]))
    states = _states(hv, m.vm, *hosts)
    if states[m.dst] == "unreachable":
        # Seen in the lab: the destination's libvirtd killed during post-copy; QEMU finished
        # the job and the source dropped its copy. The restarted libvirtd shows it running.
        e.progress(m, None, f"waiting for {m.dst} to answer to verify the guest")
        back_by = time.monotonic() + e.host_back_wait_s
        while states[m.dst] == "unreachable" and time.monotonic() < back_by:
            e.heartbeat()
            time.sleep(min(1.0, e.host_back_wait_s / 10))
            states = _states(hv, m.vm, *hosts)
    problems = []
    if states[m.dst] == "paused" and state_before != "paused":
        # libvirt resumes the guest after a pause-and-complete; make sure it did.
        try:
            hv.resume(m.dst, m.vm)
            states[m.dst] = "running"
        except HypervisorError as exc:
            problems.append(f"left paused on {m.dst}: {exc}")
    if not _alive(states[m.dst]):
        problems.append(f"not found on {m.dst} after the migration (state {states[m.dst]})")
    elsewhere = [h for h in hosts if h != m.dst and _alive(states[h])]
    if elsewhere:
        problems.append(f"also {', '.join(f'{states[h]} on {h}' for h in elsewhere)}")
    if problems and m.src in elsewhere and _alive(states[m.dst]):
        with contextlib.suppress(HypervisorError):
            actions, where = settle(
                hv,
                m.vm,
                m.src,
                m.dst,
                was_running=state_before != "paused",
                vm_uuid=run.vm_uuid,
            )
            problems.append("; ".join([*actions, where]))
    completed = _completed_stats(hv, m.dst, m.vm)
    last = mon.history[-1] if mon.history else None
    # Our own upper bound on the pause: from suspend (cold: from the start) until
    # migrate() returned, which includes the source's confirm step after the guest
    # already runs on the destination. libvirt's figure (source stop -> destination
    # resume) is the real downtime; the bound stands in where libvirt has none.
    if mode is Mode.OFFLINE:
        own_ms: float | None = mon.elapsed_s * 1000.0
    elif mon.paused_for_s is not None:
        own_ms = mon.paused_for_s * 1000.0
    elif mode is Mode.POSTCOPY and mon.postcopy_switch_s is not None:
        own_ms = mon.postcopy_switch_s * 1000.0  # the source stopped; destination running
    else:
        own_ms = None
    downtime_ms = completed.downtime_ms if completed and completed.downtime_ms else own_ms
    src_stats = completed or last
    kw: dict[str, Any] = {
        "downtime_ms": downtime_ms,
        "paused_ms": own_ms,
        "bytes_sent": src_stats.data_processed_bytes if src_stats else 0,
        "iterations": src_stats.iteration if src_stats else 0,
        "dirty_rate_bytes_s": measured_dirty_rate(mon.history),
    }
    if problems:
        return run.result(FAILED, mode, "verification: " + "; ".join(problems), **kw)
    return run.result(MIGRATED, mode, note, **kw)


def measured_dirty_rate(history: Sequence[JobStats]) -> float | None:
    """The guest's dirty rate as the job saw it: the median over the samples taken after
    QEMU's first dirty-bitmap sync (iteration >= 2); None before that (too short a job)."""
    rates = [s.dirty_rate_bytes_s for s in history if s.iteration >= 2]
    return statistics.median(rates) if rates else None


def _completed_stats(hv: Hypervisor, host: str, vm: str) -> JobStats | None:
    try:
        return hv.job_stats(host, vm, completed=True)
    except HypervisorError as exc:
        log.debug("no completed job stats for %s on %s: %s", vm, host, exc)
        return None


def _failure(error: BaseException | None, what: str) -> str:
    """A migration error as the operator reads it: HypervisorError already names host and
    operation ("host1: live migration of web-3 host1->host2 failed: ...")."""
    if isinstance(error, HypervisorError):
        return str(error)
    return f"{what} failed: {error!r}"
