"""Planning demand: each guest's CPU at a quantile of its recent readings (pure).

The daemon records every collected snapshot here and hands ``decide()`` a snapshot whose
guests carry their forecast instead of their latest smoothed reading, so a placement
holds through a guest's busy minutes, not only its average. The rule is the policy's
``spec.forecast`` (quantile over ``window_s``); the simulator applies the same rule.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from balancerd.model import Snapshot
from balancerd.policy.model import DemandForecast


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default method)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class DemandHistory:
    """Recent CPU readings per guest (by UUID, so a renamed guest keeps its history)."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._readings: dict[str, deque[tuple[float, float]]] = {}

    def record(self, snapshot: Snapshot, now_s: float) -> None:
        seen = set()
        for vm in snapshot.vms:
            key = vm.uuid or vm.name
            seen.add(key)
            self._readings.setdefault(key, deque()).append((now_s, vm.cpu_util))
        horizon_s = now_s - self.keep_s
        for key in list(self._readings):
            readings = self._readings[key]
            while readings and readings[0][0] < horizon_s:
                readings.popleft()
            if not readings and key not in seen:
                del self._readings[key]

    def readings(self, key: str, since_s: float) -> list[float]:
        return [u for t, u in self._readings.get(key, ()) if t >= since_s]

    def planning_snapshot(
        self, snapshot: Snapshot, forecast: DemandForecast, now_s: float
    ) -> Snapshot:
        """``snapshot`` with each guest's ``cpu_util`` replaced by its forecast; a guest
        with no recorded readings keeps what the snapshot says."""
        since_s = now_s - forecast.window_s
        vms = []
        for vm in snapshot.vms:
            readings = self.readings(vm.uuid or vm.name, since_s)
            if readings:
                vm = replace(vm, cpu_util=min(1.0, quantile(readings, forecast.quantile)))
            vms.append(vm)
        return replace(snapshot, vms=tuple(vms))
