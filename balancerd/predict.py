"""Migration time, bytes and downtime of one guest from its memory size, dirty rate and the
link's bandwidth (pure: values in, values out; no libvirt, no clock).

The pre-copy model, pass by pass as QEMU runs it:
  * pass 0 sends all memory: ``mem / bw`` seconds;
  * pass i resends what the guest dirtied during pass i-1, at most its dirty working set
    (a guest that rewrites a 96 MiB buffer never dirties more than 96 MiB between passes):
    ``sent_i = min(working_set, dirty_rate * t_{i-1})``;
  * QEMU switches over once what is left fits the downtime limit
    (``sent_i / bw <= max_downtime``); then the guest is stopped for that long.
With ``r = dirty_rate / bw < 1`` the passes shrink geometrically; with ``r >= 1`` and a
working set that does not fit the downtime they never do: the guest does not converge and
ends by the policy's on_stall rung (pause-and-complete: down for one working set; post-copy:
a short switch; abort). Each prediction carries a range from the dirty rate's uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancerd.model import Vm
from balancerd.policy.model import Migration, OnStall
from balancerd.units import MIB

MAX_PASSES = 30
# Fixed cost of one migration (connect, prepare the destination, confirm): calibrated
# from finished migrations by ``calibrate_setup``; this is the lab's quiet-guest figure.
DEFAULT_SETUP_S = 1.0
# Relative uncertainty of a dirty rate we have no sample of (unknown counts as quiet).
UNKNOWN_DIRTY_UNCERTAINTY = 1.0


@dataclass(frozen=True)
class Estimate:
    """What one migration of a guest is predicted to cost."""

    seconds: float  # start to finish
    bytes_sent: int
    downtime_ms: float  # the guest stopped at the end
    converges: bool  # pre-copy alone finishes (False: the on_stall rung ends it)
    passes: int
    seconds_low: float  # the range from the dirty rate's uncertainty
    seconds_high: float

    @property
    def cost_s(self) -> float:
        """What moving this guest costs for planning: its time, and a guest that does not
        converge also its (long) downtime."""
        return self.seconds + (0.0 if self.converges else self.downtime_ms / 1000.0)


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_s: float
    max_downtime_ms: float
    max_time_s: float = 600.0
    setup_s: float = DEFAULT_SETUP_S
    on_stall: str = "pause"  # pause | postcopy | abort: how a guest that does not converge ends
    stall_s: float = 5.0  # how long a stall is watched before the last rung (ladder time)


def _precopy(
    mem_bytes: float, dirty_bytes_s: float, working_set_bytes: float, link: Link
) -> tuple[float, float, float, bool, int]:
    """(seconds, bytes, downtime_s, converges, passes) of the pre-copy series."""
    bw = max(link.bandwidth_bytes_s, 1.0)
    limit_s = link.max_downtime_ms / 1000.0
    t = mem_bytes / bw
    total_s, sent = t, mem_bytes
    passes = 1
    prev: float | None = None
    while passes < MAX_PASSES:
        left = min(working_set_bytes, dirty_bytes_s * t)
        if left / bw <= limit_s:
            return total_s + left / bw, sent + left, left / bw, True, passes
        if prev is not None and left >= prev:  # not shrinking: it never will
            break
        prev = left
        t = left / bw
        total_s += t
        sent += left
        passes += 1
    left = min(working_set_bytes, dirty_bytes_s * t)
    stall = link.stall_s
    if link.on_stall == "postcopy":
        # Switch, then the rest is pulled once (no more re-sending): down for the switch only.
        return total_s + stall + left / bw, sent + left, min(limit_s, 0.05), False, passes
    if link.on_stall == "abort":
        return total_s + stall, sent, 0.0, False, passes
    # pause-and-complete: stopped while one working set goes across
    return total_s + stall + left / bw, sent + left, left / bw, False, passes


def predict(
    mem_bytes: int,
    dirty_rate_bytes_s: float | None,
    link: Link,
    *,
    working_set_bytes: int | None = None,
    dirty_uncertainty: float = 0.3,
) -> Estimate:
    """The migration of one guest. ``dirty_rate_bytes_s`` None: never measured (counted as
    quiet, with a wide range). ``working_set_bytes`` None: the whole memory."""
    ws = float(mem_bytes if working_set_bytes is None else min(working_set_bytes, mem_bytes))
    dirty = max(0.0, dirty_rate_bytes_s or 0.0)
    unc = UNKNOWN_DIRTY_UNCERTAINTY if dirty_rate_bytes_s is None else dirty_uncertainty
    secs, sent, down_s, conv, passes = _precopy(mem_bytes, dirty, ws, link)
    guess = dirty if dirty > 0 else 0.2 * link.bandwidth_bytes_s
    lo = _precopy(mem_bytes, max(0.0, dirty * (1 - unc)), ws, link)[0]
    hi = _precopy(mem_bytes, dirty + guess * unc, ws, link)[0]
    cap = link.max_time_s
    # a lower rate may take longer (it converges slowly where the higher one stalls and ends)
    lo, hi = min(lo, secs, hi), max(lo, secs, hi)
    return Estimate(
        seconds=min(link.setup_s + secs, cap),
        bytes_sent=int(sent),
        downtime_ms=down_s * 1000.0,
        converges=conv,
        passes=passes,
        seconds_low=min(link.setup_s + lo, cap),
        seconds_high=min(link.setup_s + hi, cap),
    )


def link_of(m: Migration, vm: str = "") -> Link:
    """The policy's migration settings as a Link; ``vm`` in no_pause_vms ends by abort."""
    on_stall = m.on_stall
    if on_stall == OnStall.PAUSE and vm in m.no_pause_vms:
        on_stall = OnStall.ABORT
    return Link(
        bandwidth_bytes_s=max(m.bandwidth_mib_s, 1e-3) * MIB,
        max_downtime_ms=m.max_downtime_ms,
        max_time_s=m.max_time_s,
        on_stall=str(on_stall),
        stall_s=float(m.stall_samples * (1 + len(m.downtime_steps_ms))),
    )


def predict_vm(v: Vm, m: Migration) -> Estimate:
    """One guest's migration under the policy (its sampled dirty rate, else unknown)."""
    ws = v.dirty_working_set_bytes
    return predict(
        v.mem_bytes,
        v.dirty_rate_bytes_s,
        link_of(m, v.name),
        working_set_bytes=None if ws is None else int(ws),
    )


FALLBACK_NAMES = {"pause": "pause-and-complete", "postcopy": "post-copy", "abort": "abort"}


def fallback(m: Migration, vm: str = "") -> str:
    """How a migration of ``vm`` that does not converge ends, in words."""
    return FALLBACK_NAMES.get(link_of(m, vm).on_stall, "abort")


def calibrate_setup(
    measured: list[tuple[float, float]], default_s: float = DEFAULT_SETUP_S
) -> float:
    """The fixed cost per migration from finished ones: median of (measured seconds -
    transfer seconds the model predicts without setup), never below 0."""
    gaps = sorted(max(0.0, m - t) for m, t in measured)
    if not gaps:
        return default_s
    mid = len(gaps) // 2
    return gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2


@dataclass(frozen=True)
class DirtySample:
    rate_bytes_s: float
    at_s: float  # monotonic time of the measurement
    calc_id: int = 0  # the hypervisor's id of its last dirty-rate calculation seen
    working_set_bytes: float | None = None  # what a long calculation saw it rewrite
    spanned: bool = False  # a long calculation followed the rate's (short) one


def pick_for_sampling(
    mem_by_vm: dict[str, int],
    cache: dict[str, DirtySample],
    now_s: float,
    *,
    per_cycle: int = 2,
    max_age_s: float = 600.0,
    min_mem_bytes: int = 256 * 2**20,
) -> list[str]:
    """Which guests get a (costly) dirty-rate measurement this cycle: at most ``per_cycle``,
    never one too small to matter, the never-measured first, then the oldest sample, and
    none whose sample is younger than ``max_age_s`` (rotation through the cluster)."""
    due = [
        vm
        for vm, mem in mem_by_vm.items()
        if mem >= min_mem_bytes and (vm not in cache or now_s - cache[vm].at_s >= max_age_s)
    ]
    due.sort(key=lambda vm: (vm in cache, cache[vm].at_s if vm in cache else 0.0, vm))
    return due[:per_cycle]
