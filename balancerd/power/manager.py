"""Which hosts to switch now: a pure decision over the plan, the policy and host history.

``decide_power`` takes values and returns values (no clock, no I/O). ``PowerTracker`` is
the small memory it needs (when each host became empty, when it was switched off);
``apply_power`` is the thin part that calls the drivers. Times are wall-clock seconds
(``time.time()``) so the tracker survives a restart through ``to_json``/``from_json``.

Rules:
- a host with guests (in the snapshot, in the target placement, or busy with a migration)
  is never powered off, nor is a host that does not answer (its guests are unknown), nor
  (unless ``allow_off_with_stopped_guests``) one that holds defined-but-stopped guests;
- a host is powered off only if the plan lists it, it has been empty for
  ``grace_period_s``, and afterwards at least ``max(1, min_active_hosts)`` hosts stay
  active and ``reserve_hosts`` empty hosts stay on;
- hosts the plan needs are powered on at once; more are powered on to restore
  ``min_active_hosts`` (at once) and ``reserve_hosts`` (only hosts off for ``min_off_s``,
  against flapping). A host just powered on gets a full grace period again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from balancerd.errors import BalancerdError
from balancerd.model import Plan, Snapshot
from balancerd.policy.model import Power
from balancerd.power.base import PowerDriver

# After we switch a host off, samples that still see it up for this long are ignored.
OFF_SETTLE_S = 300.0


@dataclass(frozen=True)
class HostPower:
    """What the power manager remembers about one host."""

    on: bool = True
    empty_since_s: float | None = None  # None while it has guests (or is off)
    off_since_s: float | None = None  # set while switched off by us


@dataclass(frozen=True)
class PowerDecision:
    power_off: tuple[str, ...]
    power_on: tuple[str, ...]
    held: Mapping[str, str]  # host -> why it is not switched although it could be

    @property
    def empty(self) -> bool:
        return not self.power_off and not self.power_on


def decide_power(  # noqa: C901 (power rules in order: off candidates, floors, reserve)
    plan: Plan,
    snapshot: Snapshot,
    power: Power,
    history: Mapping[str, HostPower],
    now_s: float,
    switchable: Collection[str] | None = None,
    busy: Collection[str] = (),
) -> PowerDecision:
    """``switchable``: hosts with a power driver (None: all); ``busy``: hosts in a running
    migration (source or destination)."""
    held: dict[str, str] = {}
    names = sorted({h.name for h in snapshot.hosts} | set(history))

    def can_switch(host: str) -> bool:
        return switchable is None or host in switchable

    def is_on(host: str) -> bool:
        if host in history:
            return history[host].on
        h = snapshot.host(host)
        return h is not None and not h.powered_off

    def up(host: str) -> bool:
        h = snapshot.host(host)
        return h is not None and h.up

    target_hosts = set(plan.target.host_of.values())
    guests = {v.host for v in snapshot.vms} | target_hosts | set(busy)
    # stopped guests hold their host (even those a drain moves now: the move may fail)
    stopped: dict[str, list[str]] = {}
    if not power.allow_off_with_stopped_guests:
        for v in snapshot.stopped:
            stopped.setdefault(v.host, []).append(v.name)

    def off_for_s(host: str) -> float:
        since = history[host].off_since_s if host in history else None
        return float("inf") if since is None else now_s - since

    active = [h for h in names if is_on(h) and up(h)]
    off = [h for h in names if not is_on(h)]
    floor = max(1, power.min_active_hosts)

    # 1. Hosts the target placement needs: at once.
    need_on: list[str] = []
    for host in plan.power_on:
        if host not in off:
            continue
        if can_switch(host):
            need_on.append(host)
        else:
            held[host] = "needed by the plan but has no power driver"

    # 2. Power-off candidates from the plan.
    empty_active = [h for h in active if h not in guests]
    eligible: list[tuple[float, str]] = []
    for host in plan.power_off:
        if host in need_on or host in eligible_names(eligible):
            continue
        reason = _why_not_off(host, is_on(host), up(host), host in guests, can_switch(host))
        if not reason and host in stopped:
            reason = (
                f"holds stopped guest(s) {', '.join(sorted(stopped[host]))} "
                "(spec.power.allow_off_with_stopped_guests is false)"
            )
        if reason:
            held[host] = reason
            continue
        since = history[host].empty_since_s if host in history else None
        if since is None or now_s - since < power.grace_period_s:
            waited = 0.0 if since is None else now_s - since
            held[host] = f"grace period: empty {waited:.0f} s of {power.grace_period_s:.0f} s"
            continue
        eligible.append((since, host))
    eligible.sort()
    k_reserve = len(empty_active) - power.reserve_hosts
    k_floor = len(active) + len(need_on) - floor
    k = max(0, min(len(eligible), k_reserve, k_floor))
    switch_off = [host for _, host in eligible[:k]]
    for _, host in eligible[k:]:
        held[host] = (
            f"keeps {power.reserve_hosts} reserve host(s) on"
            if k_reserve <= k_floor
            else f"keeps {floor} active host(s)"
        )

    # 3. Restore the floor (at once) and the reserve (only hosts off for min_off_s).
    spare = sorted(
        (h for h in off if h not in need_on and can_switch(h)),
        key=lambda h: (-off_for_s(h), h),
    )
    extra_on: list[str] = []
    short = floor - (len(active) + len(need_on))
    while short > 0 and spare:
        extra_on.append(spare.pop(0))
        short -= 1
    reserve_short = power.reserve_hosts - len(empty_active) - len(extra_on)
    for host in list(spare):
        if reserve_short <= 0:
            break
        if off_for_s(host) < power.min_off_s:
            held[host] = f"min off time: off {off_for_s(host):.0f} s of {power.min_off_s:.0f} s"
            continue
        extra_on.append(host)
        spare.remove(host)
        reserve_short -= 1
    return PowerDecision(tuple(switch_off), tuple(need_on + extra_on), held)


def eligible_names(eligible: Iterable[tuple[float, str]]) -> set[str]:
    return {host for _, host in eligible}


def _why_not_off(host: str, on: bool, up: bool, has_guests: bool, switchable: bool) -> str:
    if not on:
        return "already off"
    if has_guests:
        return "has guests"
    if not up:
        return "not answering (guests unknown)"
    if not switchable:
        return "no power driver"
    return ""


class PowerTracker:
    """Per-host power history, updated from snapshots and from our own switches."""

    def __init__(self, hosts: Mapping[str, HostPower] | None = None) -> None:
        self.hosts: dict[str, HostPower] = dict(hosts or {})

    def observe(self, snapshot: Snapshot, now_s: float) -> None:
        for h in snapshot.hosts:
            prev = self.hosts.get(h.name, HostPower(on=not h.powered_off))
            off_for_s = now_s - prev.off_since_s if prev.off_since_s is not None else None
            if h.up and not prev.on and (off_for_s is None or off_for_s > OFF_SETTLE_S):
                # Someone switched it on behind our back. (Just after our power-off a host
                # may still answer for a while: that is not it coming back.)
                prev = HostPower(on=True)
            if h.powered_off and prev.on:
                prev = HostPower(on=False, off_since_s=now_s)
            if not prev.on:
                self.hosts[h.name] = prev
                continue
            has_guests = bool(snapshot.vms_on(h.name))
            if has_guests or not h.up:
                self.hosts[h.name] = replace(prev, empty_since_s=None)
            elif prev.empty_since_s is None:
                self.hosts[h.name] = replace(prev, empty_since_s=now_s)
            else:
                self.hosts[h.name] = prev

    def mark_off(self, host: str, now_s: float) -> None:
        self.hosts[host] = HostPower(on=False, off_since_s=now_s)

    def mark_on(self, host: str, now_s: float) -> None:
        self.hosts[host] = HostPower(on=True)

    def powered_off(self) -> tuple[str, ...]:
        return tuple(sorted(h for h, p in self.hosts.items() if not p.on))

    def to_json(self, boot_id: str = "") -> str:
        """Times are the daemon's clock (monotonic: it survives wall-clock steps, and a
        restart within the same boot); ``boot_id`` tells a later reader whether they still
        mean anything."""
        hosts = {
            name: {"on": p.on, "empty_since_s": p.empty_since_s, "off_since_s": p.off_since_s}
            for name, p in sorted(self.hosts.items())
        }
        return json.dumps({"boot_id": boot_id, "hosts": hosts}, indent=1)

    @classmethod
    def from_json(cls, text: str, boot_id: str = "", now_s: float = 0.0) -> PowerTracker:
        """Times written during another boot (or by an older version) restart at ``now_s``:
        grace periods and minimum off times then run in full again, never shorter."""
        data = json.loads(text)
        same_boot = bool(boot_id) and data.get("boot_id") == boot_id
        hosts = data.get("hosts", data)

        def when(value: object) -> float | None:
            t = _opt_float(value)
            return t if t is None or same_boot else now_s

        return cls(
            {
                str(name): HostPower(
                    on=bool(p["on"]),
                    empty_since_s=when(p.get("empty_since_s")),
                    off_since_s=when(p.get("off_since_s")),
                )
                for name, p in hosts.items()
            }
        )


def _opt_float(value: object) -> float | None:
    return None if value is None else float(str(value))


@dataclass(frozen=True)
class PowerResult:
    host: str
    action: str  # on | off
    ok: bool
    error: str = ""


def _nothing_there(_host: str) -> str:
    return ""


def _no_fence(_host: str, _action: str) -> str:
    return ""


def apply_power(
    decision: PowerDecision,
    drivers: Mapping[str, PowerDriver],
    tracker: PowerTracker,
    now_s: float,
    still_empty: Callable[[str], str] = _nothing_there,
    fence: Callable[[str, str], str] = _no_fence,
) -> list[PowerResult]:
    """Switch the hosts; the tracker records every switch that succeeded. Power-ons first,
    so capacity arrives before any is taken away. Right before each power-off
    ``still_empty(host)`` looks again (the decision came from an older snapshot): a reason
    it returns cancels that power-off. ``fence(host, action)`` is asked right before each
    switch (a fenced record in etcd when instances are coordinated): a reason it returns
    (this instance no longer leads) cancels that switch."""
    results: list[PowerResult] = []
    for action, hosts in (("on", decision.power_on), ("off", decision.power_off)):
        for host in hosts:
            driver = drivers.get(host)
            if driver is None:
                results.append(PowerResult(host, action, False, f"{host}: no power driver"))
                continue
            busy = still_empty(host) if action == "off" else ""
            if busy:
                results.append(PowerResult(host, action, False, f"{host} not switched off: {busy}"))
                continue
            fenced = fence(host, action)
            if fenced:
                results.append(PowerResult(host, action, False, f"{host} not switched: {fenced}"))
                continue
            try:
                if action == "on":
                    driver.power_on(host)
                    tracker.mark_on(host, now_s)
                else:
                    driver.power_off(host)
                    tracker.mark_off(host, now_s)
            except (BalancerdError, OSError) as exc:
                results.append(PowerResult(host, action, False, str(exc)))
            else:
                results.append(PowerResult(host, action, True))
    return results
