"""Convergence rules: small pure functions over a history of migration job samples.

No libvirt, no clock, no sleep: the monitor (``monitor.py``) feeds samples in and acts on
the ``Decision`` that comes out. Shape taken from Nova's ``should_trigger_timeout_action``
and oVirt's stall counting.

Stalled means either
  * the remaining data has not reached a new low over the last ``stall_samples`` samples
    (a watermark: a live migration that converges makes a new low at least once per
    iteration; the first full pass always does), or
  * the guest dirties memory faster than the link carries it (median dirty rate over the
    last ``stall_samples`` samples, from the second iteration on, above the bandwidth).

The ladder, climbed one rung per stall; the stall window restarts after every rung:
  1. raise max downtime through ``downtime_steps_ms`` (steps not above the current
     maximum are passed over);
  2. auto-converge: libvirt accepts it only as a flag when the job starts, so QEMU has been
     throttling the guest since the first stall it saw. The rung is patience: one more
     stall window, unless QEMU already reports the throttle at its ceiling;
  3. ``on_stall``: pause-and-complete - the guest is stopped so the rest goes across, and
     it resumes running on the destination (the monitor lifts the downtime limit so QEMU
     stops it and finishes; it suspends the guest only if that does not happen) - or abort
     where the policy says abort or the guest is in ``no_pause_vms``.
     The pause is timed: QEMU re-sends everything dirtied since its last bitmap sync *plus*
     what is left of the current pass, so pausing mid-pass costs up to two working sets
     while the guest is stopped; pausing at the end of a pass costs one. On reaching this
     rung the monitor samples fast (PREPARE_PAUSE) and pauses once the remaining data is
     below ``PAUSE_AT_S`` of transfer, or after ``PAUSE_WAIT_MAX_S`` of job time anyway.
     With ``on_stall: postcopy`` (and both hosts able to), this rung switches the job to
     post-copy instead (POSTCOPY, at once: the guest stops only for the device state and the
     dirty bitmap, then runs on the destination and pulls the rest). From then on the job
     cannot be aborted (the destination holds the newest state): the time cap no longer
     applies and the monitor only waits.
Independently, ``max_time_s`` is a hard cap: the job is aborted (the guest stays on the
source, resumed if we paused it).
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from balancerd.hypervisor.base import JobStats
from balancerd.outcomes import MigrationMode
from balancerd.policy.model import Migration
from balancerd.units import MIB

# QEMU's auto-converge throttle never goes above this percentage.
THROTTLE_CEILING_PCT = 99
# Pause when what is left of the pass would take at most this long to send...
PAUSE_AT_S = 0.2
PAUSE_AT_MIN_BYTES = 2 * MIB
# ... or after waiting this long (job time) for such a moment.
PAUSE_WAIT_MAX_S = 6.0


class Action(enum.Enum):
    WAIT = "wait"
    RAISE_DOWNTIME = "raise-downtime"
    AUTO_CONVERGE = "auto-converge"  # patience rung: QEMU throttles the guest meanwhile
    PREPARE_PAUSE = "prepare-pause"  # sample fast; pause at the end of a pass
    PAUSE = "pause"
    POSTCOPY = "postcopy"  # switch the job to post-copy (migrateStartPostCopy)
    ABORT = "abort"


# How a move was finally carried out: one enum shared with metrics and the journal.
Mode = MigrationMode


@dataclass(frozen=True)
class StallRules:
    """The policy's convergence knobs as they apply to one guest."""

    bandwidth_bytes_s: float
    max_downtime_ms: int
    stall_samples: int  # 0: never stalled (cold migration: only the time cap applies)
    downtime_steps_ms: tuple[int, ...]
    auto_converge: bool
    may_pause: bool  # on_stall == pause and the guest is not in no_pause_vms
    abort_why: str  # why the last rung is abort, when may_pause is false
    max_time_s: float
    postcopy: bool = False  # the last rung switches to post-copy instead of pausing

    @staticmethod
    def for_vm(mig: Migration, vm: str) -> StallRules:
        if vm in mig.no_pause_vms:
            may_pause, why = False, f"{vm} is in no_pause_vms"
        elif mig.on_stall not in ("pause", "postcopy"):
            may_pause, why = False, f"on_stall={mig.on_stall}"
        else:
            may_pause, why = True, ""
        return StallRules(
            bandwidth_bytes_s=mig.bandwidth_mib_s * MIB,
            max_downtime_ms=mig.max_downtime_ms,
            stall_samples=mig.stall_samples,
            downtime_steps_ms=tuple(mig.downtime_steps_ms),
            auto_converge=mig.auto_converge,
            may_pause=may_pause,
            abort_why=why,
            max_time_s=mig.max_time_s,
            postcopy=may_pause and mig.on_stall == "postcopy",
        )

    def cold(self) -> StallRules:
        """Rules for a cold migration: no ladder, only the time cap."""
        return replace(
            self, stall_samples=0, downtime_steps_ms=(), auto_converge=False, postcopy=False
        )


@dataclass(frozen=True)
class Ladder:
    """Where one migration stands on the stall ladder."""

    downtime_ms: int  # the max downtime currently in force
    downtime_raises: int = 0
    auto_converge_waited: bool = False
    paused: bool = False
    pause_from_s: float | None = None  # job time when the pause rung was reached
    pause_why: str = ""  # the stall that led to the pause rung
    postcopy: bool = False  # switched to post-copy (no way back: only waiting from now on)
    window_start: int = 0  # history index where stall counting (re)starts


@dataclass(frozen=True)
class Decision:
    action: Action
    ladder: Ladder  # the ladder after the action
    downtime_ms: int = 0  # for RAISE_DOWNTIME
    reason: str = ""  # why: the stall or the cap, for logs and error messages


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB"


def stall_reason(
    history: Sequence[JobStats], start: int, stall_samples: int, bandwidth_bytes_s: float
) -> str | None:
    """Why the job counts as stalled over ``history[start:]``, or None while it converges."""
    if stall_samples <= 0:
        return None
    window = [s for s in history[start:] if s.active]
    if len(window) < stall_samples:
        return None
    last = window[-1]
    # Watermark: the lowest remaining seen, and how many samples ago it was first reached.
    low_i = min(range(len(window)), key=lambda i: (window[i].data_remaining_bytes, i))
    since_low = len(window) - 1 - low_i
    if since_low >= stall_samples:
        low = window[low_i].data_remaining_bytes
        return (
            f"remaining {_mib(last.data_remaining_bytes)} has not gone below {_mib(low)} "
            f"for {since_low} samples"
            + _dirty_note(window[-stall_samples:], bandwidth_bytes_s, always=False)
        )
    recent = [s for s in window[-stall_samples:] if s.iteration >= 2]
    if len(recent) == stall_samples and bandwidth_bytes_s > 0:
        dirty = statistics.median(s.dirty_rate_bytes_s for s in recent)
        if dirty > bandwidth_bytes_s:
            return f"remaining {_mib(last.data_remaining_bytes)}" + _dirty_note(
                recent, bandwidth_bytes_s, always=True
            )
    return None


def _dirty_note(samples: Sequence[JobStats], bandwidth_bytes_s: float, always: bool) -> str:
    if not samples:
        return ""
    dirty = statistics.median(s.dirty_rate_bytes_s for s in samples)
    if not always and dirty <= 0:
        return ""
    cmp = ">" if dirty > bandwidth_bytes_s else "<="
    return f", dirty {dirty / MIB:.0f} MiB/s {cmp} {bandwidth_bytes_s / MIB:.0f} MiB/s"


def decide(
    history: Sequence[JobStats], ladder: Ladder, rules: StallRules, elapsed_s: float
) -> Decision:
    """The next step for a running migration, from its sample history."""
    last = next((s for s in reversed(history) if s.active), None)
    remaining = f" (remaining {_mib(last.data_remaining_bytes)})" if last else ""
    if ladder.postcopy:
        # In post-copy the destination runs the guest: aborting would lose it.
        return Decision(Action.WAIT, ladder)
    if elapsed_s >= rules.max_time_s:
        return Decision(
            Action.ABORT,
            ladder,
            reason=f"hit the time cap of {rules.max_time_s:.0f} s{remaining}",
        )
    if ladder.paused:
        return Decision(Action.WAIT, ladder)  # paused: the rest is going across
    if ladder.pause_from_s is not None:
        return _pause_moment(last, ladder, rules)
    why = stall_reason(history, ladder.window_start, rules.stall_samples, rules.bandwidth_bytes_s)
    if why is None:
        return Decision(Action.WAIT, ladder)
    restart = len(history)
    steps = [ms for ms in rules.downtime_steps_ms[ladder.downtime_raises :]]
    for i, step_ms in enumerate(steps):
        if step_ms > ladder.downtime_ms:
            new = replace(
                ladder,
                downtime_ms=step_ms,
                downtime_raises=ladder.downtime_raises + i + 1,
                window_start=restart,
            )
            return Decision(Action.RAISE_DOWNTIME, new, downtime_ms=step_ms, reason=why)
    throttle = last.auto_converge_throttle_pct if last else 0
    if rules.auto_converge and not ladder.auto_converge_waited and throttle < THROTTLE_CEILING_PCT:
        new = replace(
            ladder,
            downtime_raises=len(rules.downtime_steps_ms),
            auto_converge_waited=True,
            window_start=restart,
        )
        return Decision(Action.AUTO_CONVERGE, new, reason=why)
    if rules.may_pause and rules.postcopy:
        return Decision(
            Action.POSTCOPY,
            replace(ladder, postcopy=True, window_start=restart),
            reason=f"{why}; switching to post-copy",
        )
    if rules.may_pause:
        armed = replace(
            ladder,
            pause_from_s=last.elapsed_s if last else 0.0,
            pause_why=why,
            window_start=restart,
        )
        decision = _pause_moment(last, armed, rules)
        if decision.action is Action.PAUSE:
            return decision
        return Decision(Action.PREPARE_PAUSE, armed, reason=why)
    return Decision(Action.ABORT, ladder, reason=f"{why}; not pausing: {rules.abort_why}")


def pause_threshold_bytes(rules: StallRules) -> float:
    return max(PAUSE_AT_MIN_BYTES, rules.bandwidth_bytes_s * PAUSE_AT_S)


def _pause_moment(last: JobStats | None, ladder: Ladder, rules: StallRules) -> Decision:
    """PAUSE at the end of a pass (little left of it), or once waiting took too long."""
    if last is None or ladder.pause_from_s is None:
        return Decision(Action.WAIT, ladder)
    waited_s = last.elapsed_s - ladder.pause_from_s
    low = last.data_remaining_bytes <= pause_threshold_bytes(rules)
    if not low and waited_s < PAUSE_WAIT_MAX_S:
        return Decision(Action.WAIT, ladder)
    when = "at the end of a pass" if low else f"after waiting {waited_s:.0f} s for a pass to end"
    return Decision(
        Action.PAUSE,
        replace(ladder, paused=True),
        reason=f"{ladder.pause_why}; pausing {when} (remaining {_mib(last.data_remaining_bytes)})",
    )


def mode_of(ladder: Ladder, history: Sequence[JobStats], live: bool) -> Mode:
    """The mode a completed migration ran in."""
    if not live:
        return Mode.OFFLINE
    if ladder.postcopy:
        return Mode.POSTCOPY
    if ladder.paused:
        return Mode.PAUSED_FALLBACK
    if ladder.auto_converge_waited or any(s.auto_converge_throttle_pct > 0 for s in history):
        return Mode.AUTO_CONVERGE
    if ladder.downtime_raises > 0:
        return Mode.LIVE_DOWNTIME_RAISE
    return Mode.LIVE


def describe_progress(stats: JobStats) -> str:
    """One progress line for the operator."""
    done_pct = 0.0
    if stats.data_total_bytes > 0:
        done_pct = 100.0 * (1.0 - stats.data_remaining_bytes / stats.data_total_bytes)
    return (
        f"{stats.elapsed_s:5.1f} s  iteration {stats.iteration}  {done_pct:3.0f}%"
        f"  sent {_mib(stats.data_processed_bytes)}  remaining {_mib(stats.data_remaining_bytes)}"
        f"  dirty {stats.dirty_rate_bytes_s / MIB:.1f} MiB/s"
        f"  speed {stats.mem_bandwidth_bytes_s / MIB:.1f} MiB/s"
    )
