"""Policy schedule windows (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from balancerd.config import ScheduleEntry
from balancerd.schedule import active_schedule

WEEKDAY_DAYTIME = ScheduleEntry(cron="0 7 * * 1-5", duration_s=12 * 3600, policy="balance.yaml")
NIGHT_FREEZE = ScheduleEntry(cron="0 1 * * *", duration_s=2 * 3600, freeze=True)
ENTRIES = [WEEKDAY_DAYTIME, NIGHT_FREEZE]


@pytest.mark.parametrize(
    ("when", "policy", "frozen"),
    [
        # 2026-11-26 is a Thursday.
        (datetime(2026, 11, 26, 6, 59, tzinfo=UTC), "power-save.yaml", False),
        (datetime(2026, 11, 26, 7, 0, tzinfo=UTC), "balance.yaml", False),
        (datetime(2026, 11, 26, 18, 59, tzinfo=UTC), "balance.yaml", False),
        (datetime(2026, 11, 26, 19, 0, 1, tzinfo=UTC), "power-save.yaml", False),
        (datetime(2026, 11, 28, 12, 0, tzinfo=UTC), "power-save.yaml", False),  # Saturday
        (datetime(2026, 11, 28, 1, 30, tzinfo=UTC), "power-save.yaml", True),
        (datetime(2026, 11, 28, 3, 0, 1, tzinfo=UTC), "power-save.yaml", False),
    ],
)
def test_windows_choose_policy_and_freeze(when: datetime, policy: str, frozen: bool) -> None:
    active = active_schedule(ENTRIES, "power-save.yaml", when)
    assert (active.policy, active.frozen) == (policy, frozen)


def test_first_listed_open_window_wins() -> None:
    always = ScheduleEntry(cron="* * * * *", duration_s=120, policy="drain.yaml")
    now = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    assert active_schedule([always, WEEKDAY_DAYTIME], "d.yaml", now).policy == "drain.yaml"
    assert active_schedule([WEEKDAY_DAYTIME, always], "d.yaml", now).policy == "balance.yaml"
