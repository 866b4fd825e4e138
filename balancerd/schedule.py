"""Policy schedules and freeze windows: which policy is active at a moment. Pure.

A window opens at each time its 5-field crontab expression fires and stays open for
``duration_s``. Among open policy windows the first listed wins; outside all of them the
default policy applies. Any open freeze window forbids migrations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from balancerd.config import ScheduleEntry, cron_trigger


@dataclass(frozen=True)
class ActiveSchedule:
    policy: str  # path of the policy in force
    frozen: bool  # a freeze window is open: plan, but do not migrate
    window: str  # the cron expression that chose the policy, "" for the default


def window_open(entry: ScheduleEntry, now: datetime) -> bool:
    """Whether a firing of ``entry.cron`` in (now - duration, now] keeps its window open."""
    trigger = cron_trigger(entry.cron, timezone=now.tzinfo)
    start = now - timedelta(seconds=entry.duration_s)
    # The first firing at or after ``start`` (APScheduler rounds up to whole seconds).
    fire = trigger.get_next_fire_time(None, start + timedelta(microseconds=1))
    return fire is not None and fire <= now


def active_schedule(
    entries: Sequence[ScheduleEntry], default_policy: str, now: datetime
) -> ActiveSchedule:
    """``now`` must be timezone-aware; cron expressions are read in its timezone."""
    frozen = any(e.freeze and window_open(e, now) for e in entries)
    for e in entries:
        if not e.freeze and window_open(e, now):
            return ActiveSchedule(policy=e.policy, frozen=frozen, window=e.cron)
    return ActiveSchedule(policy=default_policy, frozen=frozen, window="")
