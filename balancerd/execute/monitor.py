"""The thin polling loop around one migration job.

``hv.migrate`` blocks, so it runs on a worker thread; this loop samples ``job_stats`` about
once a second into a history, feeds the heartbeat, asks ``converge.decide`` what to do and
does it. No decisions are made here; no recursion; every pass feeds the heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from balancerd.errors import HypervisorError
from balancerd.execute.converge import Action, Ladder, StallRules, decide
from balancerd.hypervisor.base import Hypervisor, JobStats, MigrationRequest

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0
# While waiting for the end of a pass to pause at (converge.Action.PREPARE_PAUSE).
FAST_INTERVAL_S = 0.1
# Max downtime for pause-and-complete (QEMU allows up to 2000 s): QEMU then stops the
# guest itself at its next check and finishes.
PAUSED_MAX_DOWNTIME_MS = 60_000
# ... and if the job still runs this long after that, the guest is suspended.
SUSPEND_AFTER_S = 5.0
# After an abort, how long to wait for libvirt to end the job before giving up on it.
ABORT_GRACE_S = 60.0

Heartbeat = Callable[[], None]
# Called for every sample and every ladder action: (stats or None, message).
Progress = Callable[[JobStats | None, str], None]


def _noop_heartbeat() -> None:
    pass


def _noop_progress(_stats: JobStats | None, _msg: str) -> None:
    pass


@dataclass(frozen=True)
class MonitorResult:
    history: tuple[JobStats, ...]
    ladder: Ladder
    error: BaseException | None  # what migrate() raised; None if it returned
    abort_reason: str  # why we aborted the job ("" if we did not)
    elapsed_s: float  # start of migrate() to its return
    paused_for_s: float | None  # we suspended the source: suspend -> migrate() returned
    returned: bool  # migrate() returned (False: it hung past the abort grace period)
    # switched to post-copy: migrateStartPostCopy -> migrate() returned (None: never switched)
    postcopy_for_s: float | None = None
    # our bound on the post-copy switch-over pause (libvirt 9.0 reports no downtime for a
    # post-copy job): source last seen running -> destination seen running
    postcopy_switch_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.returned and self.error is None and not self.abort_reason


SWITCH_POLL_S = 0.002
SWITCH_WAIT_S = 5.0


def _switch_pause_s(hv: Hypervisor, src: str, dst: str, vm: str) -> float | None:
    """An upper bound on the post-copy switch-over pause: from the start of the last query
    that still saw ``vm`` running on ``src`` to the return of the first that saw it running
    on ``dst`` (polled every 2 ms, at most 5 s). None if not seen or a host fails to answer.
    QEMU switches at its next iteration, not at once, so the time since the request would
    count seconds in which the guest still ran."""
    start_s = time.monotonic()
    last_src_running_s = start_s
    while time.monotonic() - start_s < SWITCH_WAIT_S:
        try:
            asked_s = time.monotonic()
            if hv.domain_state(src, vm) == "running":
                last_src_running_s = asked_s
            elif hv.domain_state(dst, vm) == "running":
                return time.monotonic() - last_src_running_s
        except HypervisorError:
            return None
        time.sleep(SWITCH_POLL_S)
    return None


def _without_frames(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


class _Job:
    """migrate() on a worker thread, with its outcome and the moment it ended."""

    def __init__(self, hv: Hypervisor, req: MigrationRequest) -> None:
        self.error: BaseException | None = None
        self.ended_at_s = 0.0
        self._hv = hv
        self._req = req
        self.thread = threading.Thread(target=self._run, name=f"migrate-{req.vm}", daemon=True)

    def _run(self) -> None:
        try:
            self._hv.migrate(self._req)
        except BaseException as exc:
            # Keep the message and cause, not the frames: they hold libvirt objects (and
            # with them the connection) alive long after the migration.
            self.error = _without_frames(exc)
        finally:
            self.ended_at_s = time.monotonic()


def run_migration(  # noqa: C901 (the polling loop applies one ladder rung per branch)
    hv: Hypervisor,
    req: MigrationRequest,
    rules: StallRules,
    *,
    heartbeat: Heartbeat = _noop_heartbeat,
    progress: Progress = _noop_progress,
    on_pause: Callable[[], None] = lambda: None,
    on_postcopy: Callable[[], None] = lambda: None,
    interval_s: float = SAMPLE_INTERVAL_S,
    cancelled: Callable[[], str] = lambda: "",
) -> MonitorResult:
    """Run ``req`` to its end, watching convergence; never raises for the job itself.
    ``cancelled()`` returns why the job must end now (e.g. balancerd is stopping), or ""."""
    what = f"{'live' if req.live else 'cold'} migration of {req.vm} {req.src}->{req.dst}"
    history: list[JobStats] = []
    ladder = Ladder(downtime_ms=req.max_downtime_ms)
    downtime_set = not req.live
    abort_reason = ""
    aborted_at_s: float | None = None
    paused_at_s: float | None = None
    postcopy_at_s: float | None = None
    postcopy_switch_s: float | None = None
    suspend_at_s: float | None = None  # fallback: suspend if QEMU has not stopped it by then
    job = _Job(hv, req)
    start_s = time.monotonic()
    shown_at_s = start_s - interval_s
    job.thread.start()
    while True:
        waiting_to_pause = ladder.pause_from_s is not None and not ladder.paused
        job.thread.join(
            timeout=min(interval_s, FAST_INTERVAL_S) if waiting_to_pause else interval_s
        )
        heartbeat()
        if not job.thread.is_alive():
            break
        now_s = time.monotonic()
        if aborted_at_s is not None:
            if now_s - aborted_at_s > ABORT_GRACE_S:
                log.error("%s: job did not end %.0f s after abort", what, ABORT_GRACE_S)
                break
            continue
        why_cancel = cancelled()
        if why_cancel:
            abort_reason = f"{what} aborted after {now_s - start_s:.0f} s: {why_cancel}"
            aborted_at_s = now_s
            log.warning("%s: aborting: %s", what, why_cancel, extra={"VM": req.vm})
            progress(None, f"aborting: {why_cancel}")
            try:
                hv.abort_job(req.src, req.vm)
            except HypervisorError as exc:  # completing: it ends by itself
                log.info("%s: abort failed (completing?): %s", what, exc)
            continue
        if suspend_at_s is not None and now_s >= suspend_at_s:
            suspend_at_s = None
            try:
                log.info(
                    "%s: still running %.0f s after lifting max downtime; suspending the guest",
                    what,
                    SUSPEND_AFTER_S,
                )
                hv.suspend(req.src, req.vm)
            except HypervisorError as exc:
                log.info("%s: suspend failed (job ending?): %s", what, exc)
        try:
            stats = hv.job_stats(req.src, req.vm)
        except HypervisorError as exc:
            log.debug("%s: no job stats: %s", what, exc)
            stats = None
        if stats is not None and stats.active:
            if not downtime_set:
                try:
                    hv.set_max_downtime(req.src, req.vm, req.max_downtime_ms)
                    downtime_set = True
                except HypervisorError as exc:
                    # Often the job just ended; a real failure shows in the result.
                    log.info("%s: could not set max downtime: %s", what, exc)
            history.append(stats)
            if now_s - shown_at_s >= interval_s * 0.9:  # fast sampling: not every line
                shown_at_s = now_s
                progress(stats, "")
        decision = decide(history, ladder, rules, now_s - start_s)
        if decision.action is Action.WAIT:
            continue
        log.info(
            "%s: %s (%s)",
            what,
            decision.action.value,
            decision.reason,
            extra={"VM": req.vm, "HOST": req.src},
        )
        try:
            if decision.action is Action.RAISE_DOWNTIME:
                hv.set_max_downtime(req.src, req.vm, decision.downtime_ms)
                progress(
                    None, f"stalled ({decision.reason}): max downtime -> {decision.downtime_ms} ms"
                )
            elif decision.action is Action.PREPARE_PAUSE:
                progress(None, f"stalled ({decision.reason}): pausing at the end of a pass")
            elif decision.action is Action.AUTO_CONVERGE:
                progress(None, f"stalled ({decision.reason}): waiting for auto-converge")
            elif decision.action is Action.PAUSE:
                on_pause()  # journal first: a crash now must know we paused it
                paused_at_s = time.monotonic()
                # Pause-and-complete through QEMU's own stop-and-copy: with the downtime
                # limit lifted, QEMU stops the guest at its next check and sends the rest
                # in its final stage, which is not rate-limited. (Suspending the guest
                # mid-job instead left dirtying TCG guests with corrupted kernels on the
                # destination in 3 of ~12 lab runs; it stays only as the fallback.)
                try:
                    hv.set_max_downtime(req.src, req.vm, PAUSED_MAX_DOWNTIME_MS)
                    suspend_at_s = paused_at_s + SUSPEND_AFTER_S
                except HypervisorError as exc:
                    log.info("%s: could not lift max downtime: %s; suspending", what, exc)
                    hv.suspend(req.src, req.vm)
                progress(None, f"pausing the guest to complete: {decision.reason}")
            elif decision.action is Action.POSTCOPY:
                on_postcopy()  # journal first: from now on the destination holds the guest
                postcopy_at_s = time.monotonic()
                try:
                    hv.start_postcopy(req.src, req.vm)
                    progress(None, f"switching to post-copy: {decision.reason}")
                    postcopy_switch_s = _switch_pause_s(hv, req.src, req.dst, req.vm)
                    if postcopy_switch_s is not None:
                        pause_ms = postcopy_switch_s * 1000
                        progress(None, f"running on {req.dst}; switch-over <= {pause_ms:.0f} ms")
                except HypervisorError as exc:
                    # Not switched (e.g. the job just ended, or QEMU refuses): the guest is
                    # still on the source, so pause-and-complete is still safe.
                    postcopy_at_s = None
                    log.warning("%s: post-copy switch failed: %s; pausing instead", what, exc)
                    on_pause()
                    paused_at_s = time.monotonic()
                    try:
                        hv.set_max_downtime(req.src, req.vm, PAUSED_MAX_DOWNTIME_MS)
                        suspend_at_s = paused_at_s + SUSPEND_AFTER_S
                    except HypervisorError:
                        hv.suspend(req.src, req.vm)
                    progress(None, f"post-copy refused ({exc.detail}): pausing to complete")
                    ladder = replace(decision.ladder, postcopy=False, paused=True)
                    continue
            elif decision.action is Action.ABORT:
                abort_reason = f"{what} {decision.reason} after {now_s - start_s:.0f} s"
                aborted_at_s = now_s
                progress(None, f"aborting: {decision.reason}")
                hv.abort_job(req.src, req.vm)
        except HypervisorError as exc:
            # The job may have just ended; the thread tells. A failed pause is retried on
            # the next sample; other rungs are not repeated.
            log.warning("%s: %s failed: %s", what, decision.action.value, exc)
            if decision.action is Action.PAUSE:
                paused_at_s = None
                continue
        ladder = decision.ladder
    returned = not job.thread.is_alive()
    end_s = job.ended_at_s if returned else time.monotonic()
    return MonitorResult(
        history=tuple(history),
        ladder=ladder,
        error=job.error if returned else None,
        abort_reason=abort_reason
        or ("" if returned else f"{what} did not return (aborted, still hanging)"),
        elapsed_s=end_s - start_s,
        paused_for_s=(end_s - paused_at_s) if paused_at_s is not None else None,
        returned=returned,
        postcopy_for_s=(end_s - postcopy_at_s) if postcopy_at_s is not None else None,
        postcopy_switch_s=postcopy_switch_s,
    )
