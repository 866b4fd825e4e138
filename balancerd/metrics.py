"""Prometheus metrics rendered at scrape time from the daemon's latest state.

The daemon updates one thread-safe :class:`DaemonStats`; :class:`StatsCollector` turns
whatever it holds into metric families on every scrape, so a guest that left a host
leaves no stale ``balancerd_vm_host_info`` series. The registry is always passed in.

    stats = DaemonStats()
    registry = CollectorRegistry()
    register(registry, stats)
    server = serve("127.0.0.1:9177", registry)
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from balancerd.config import MetricsTls
from balancerd.errors import ConfigError
from balancerd.model import Plan, Snapshot
from balancerd.outcomes import (
    BlockerKind,
    CycleResult,
    FallbackKind,
    MigrationMode,
    MoveOutcome,
    PowerAction,
    ReconcileOutcome,
    SkipKind,
)

log = logging.getLogger(__name__)

PREFIX = "balancerd"

# Label values come from the enums the engine and daemon emit, and are created at zero
# from the start, so rate()/increase() panels have series before the first event.
MIGRATION_MODES = tuple(m.value for m in MigrationMode)
MIGRATION_RESULTS = tuple(o.value for o in MoveOutcome)
SKIP_REASONS = tuple(k.value for k in SkipKind)
FALLBACK_KINDS = tuple(k.value for k in FallbackKind)
RECONCILE_OUTCOMES = tuple(o.value for o in ReconcileOutcome)
CYCLE_RESULTS = tuple(r.value for r in CycleResult)
POWER_ACTIONS = tuple(a.value for a in PowerAction)
SOLVER_STATUSES = ("optimal", "feasible", "time-limit", "infeasible", "not-run", "error")

_LABEL_VALUE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")

# Bucket upper bounds, seconds.
MIGRATION_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DOWNTIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
CYCLE_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SOLVER_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# measured / predicted migration time (predict.py): 1.0 is a perfect prediction
PREDICTION_RATIO_BUCKETS = (0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.43, 2.0, 3.0)


def label_class(value: str) -> str:
    """A counter label value: short, lower case, no free text. Bad input becomes ``other``."""
    v = value.strip().lower().replace(" ", "-")
    return v if _LABEL_VALUE.match(v) else "other"


class _Histogram:
    """Cumulative bucket counts and a sum, for one label set. Not locked: the owner locks."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # last: above the largest bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            out.append((_fmt_bound(bound), float(total)))
        out.append(("+Inf", float(total + self.counts[-1])))
        return out


def _fmt_bound(bound: float) -> str:
    return repr(float(bound))


@dataclass(frozen=True)
class InFlight:
    """A migration the executor is running now."""

    vm: str
    src: str
    dst: str
    mode: str
    started_at_s: float  # wall clock (time.time())
    migration_id: str = ""


@dataclass
class _State:
    snapshot: Snapshot | None = None
    snapshot_at_s: float | None = None
    plan: Plan | None = None
    plan_at_s: float | None = None
    policy_name: str = ""
    policy_objective: str = ""
    policy_mode: str = ""
    freeze: bool = False
    power_on: dict[str, bool] = field(default_factory=dict)  # host -> on, from the power manager
    in_flight: dict[str, InFlight] = field(default_factory=dict)  # vm -> migration
    migrations: dict[tuple[str, str], int] = field(default_factory=dict)  # (mode, result)
    fallbacks: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    reconciliations: dict[str, int] = field(default_factory=dict)
    cycles: dict[str, int] = field(default_factory=dict)
    power_actions: dict[tuple[str, str], int] = field(default_factory=dict)  # (action, result)
    reload_failures: int = 0
    journal_corrupt: int = 0
    clock_steps: int = 0
    reloads: int = 0
    last_success_at_s: float | None = None
    last_cycle_at_s: float | None = None
    last_cycle_error: str = ""
    migration_s: dict[str, _Histogram] = field(default_factory=dict)  # by mode
    downtime_s: dict[str, _Histogram] = field(default_factory=dict)
    cycle_s: _Histogram = field(default_factory=lambda: _Histogram(CYCLE_BUCKETS_S))
    solver_s: _Histogram = field(default_factory=lambda: _Histogram(SOLVER_BUCKETS_S))
    prediction_ratio: _Histogram = field(
        default_factory=lambda: _Histogram(PREDICTION_RATIO_BUCKETS)
    )
    # the last migrated guest: (vm, predicted seconds, measured seconds)
    last_prediction: tuple[str, float, float] | None = None


class DaemonStats:
    """The daemon's latest state and counters; every method is thread-safe.

    ``clock`` gives wall-clock seconds (``time.time``) for timestamps and in-flight ages.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._s = _State()
        self.started_at_s = clock()
        for mode in MIGRATION_MODES:
            for result in MIGRATION_RESULTS:
                self._s.migrations[(mode, result)] = 0
            self._s.migration_s[mode] = _Histogram(MIGRATION_BUCKETS_S)
            self._s.downtime_s[mode] = _Histogram(DOWNTIME_BUCKETS_S)
        self._s.fallbacks = dict.fromkeys(FALLBACK_KINDS, 0)
        self._s.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self._s.reconciliations = dict.fromkeys(RECONCILE_OUTCOMES, 0)
        self._s.cycles = dict.fromkeys(CYCLE_RESULTS, 0)
        for action in POWER_ACTIONS:
            for result in ("success", "failed"):
                self._s.power_actions[(action, result)] = 0

    # --- latest values ---------------------------------------------------------------

    def set_snapshot(self, snapshot: Snapshot) -> None:
        """After every collection: hosts, guests and their utilization."""
        with self._lock:
            self._s.snapshot = snapshot
            self._s.snapshot_at_s = self._clock()

    def set_plan(self, plan: Plan) -> None:
        """After every decide step (also in recommend mode); records the solver time."""
        with self._lock:
            self._s.plan = plan
            self._s.plan_at_s = self._clock()
            if plan.solver.status != "not-run":
                self._s.solver_s.observe(max(0.0, plan.solver.seconds))

    def set_policy(self, name: str, objective: str, mode: str) -> None:
        """After start, reload and every schedule switch."""
        with self._lock:
            self._s.policy_name = name
            self._s.policy_objective = objective
            self._s.policy_mode = mode

    def set_freeze(self, active: bool) -> None:
        with self._lock:
            self._s.freeze = active

    def set_host_power(self, host: str, on: bool) -> None:
        """The power manager's view of a host (after switching it, or at start)."""
        with self._lock:
            self._s.power_on[host] = on

    # --- events ----------------------------------------------------------------------

    def migration_started(self, vm: str, src: str, dst: str, migration_id: str = "") -> None:
        with self._lock:
            self._s.in_flight[vm] = InFlight(vm, src, dst, "live", self._clock(), migration_id)

    def migration_finished(
        self,
        vm: str,
        mode: MigrationMode,
        outcome: MoveOutcome,
        duration_s: float | None = None,
        downtime_s: float | None = None,
        predicted_s: float | None = None,
    ) -> None:
        """One planned move ended. ``mode``: how it finally ran; duration and downtime are
        observed for migrated guests, and duration / the plan's ``predicted_s``."""
        with self._lock:
            self._s.in_flight.pop(vm, None)
            key = (mode.value, outcome.value)
            self._s.migrations[key] = self._s.migrations.get(key, 0) + 1
            if outcome is MoveOutcome.MIGRATED:
                if duration_s is not None:
                    hist = self._s.migration_s.setdefault(
                        mode.value, _Histogram(MIGRATION_BUCKETS_S)
                    )
                    hist.observe(max(0.0, duration_s))
                if downtime_s is not None:
                    hist = self._s.downtime_s.setdefault(mode.value, _Histogram(DOWNTIME_BUCKETS_S))
                    hist.observe(max(0.0, downtime_s))
                if duration_s is not None and predicted_s is not None and predicted_s > 0:
                    self._s.prediction_ratio.observe(duration_s / predicted_s)
                    self._s.last_prediction = (vm, predicted_s, duration_s)

    def record_fallback(self, kind: FallbackKind) -> None:
        """A live migration gave way to another way of moving the guest."""
        _inc(self._lock, self._s.fallbacks, kind.value)

    def record_skip(self, kind: SkipKind) -> None:
        """A plan step was skipped."""
        _inc(self._lock, self._s.skipped, kind.value)

    def record_reconciliation(self, outcome: ReconcileOutcome) -> None:
        """One journal entry settled at start (or after a move that ended unexpectedly)."""
        _inc(self._lock, self._s.reconciliations, outcome.value)

    def record_clock_step(self) -> None:
        with self._lock:
            self._s.clock_steps += 1

    def record_journal_corrupt(self) -> None:
        with self._lock:
            self._s.journal_corrupt += 1

    def record_reload(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._s.reloads += 1
            else:
                self._s.reload_failures += 1

    def record_power_action(self, action: PowerAction, ok: bool) -> None:
        key = (action.value, "success" if ok else "failed")
        with self._lock:
            self._s.power_actions[key] = self._s.power_actions.get(key, 0) + 1

    def record_cycle(self, duration_s: float, ok: bool, error: str = "") -> None:
        """One decide-and-act cycle ended; a good one moves the last-success timestamp."""
        with self._lock:
            now = self._clock()
            self._s.cycle_s.observe(max(0.0, duration_s))
            result = (CycleResult.OK if ok else CycleResult.ERROR).value
            self._s.cycles[result] = self._s.cycles.get(result, 0) + 1
            self._s.last_cycle_at_s = now
            if ok:
                self._s.last_success_at_s = now
                self._s.last_cycle_error = ""
            else:
                self._s.last_cycle_error = error

    # --- reading -----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """A JSON-ready view for ``balancerd status`` (state file or local endpoint)."""
        with self._lock:
            s = self._s
            plan = s.plan
            return {
                "policy": {
                    "name": s.policy_name,
                    "objective": s.policy_objective,
                    "mode": s.policy_mode,
                },
                "freeze": s.freeze,
                "started_at_s": self.started_at_s,
                "last_collect_at_s": s.snapshot_at_s,
                "last_cycle_at_s": s.last_cycle_at_s,
                "last_success_at_s": s.last_success_at_s,
                "last_cycle_error": s.last_cycle_error,
                "plan": None
                if plan is None
                else {
                    "policy": plan.policy,
                    "moves": [
                        {"vm": m.vm, "src": m.src, "dst": m.dst, "wave": m.wave} for m in plan.moves
                    ],
                    "score_before": plan.score_before,
                    "score_after": plan.score_after,
                    "solver_status": plan.solver.status,
                    "reason": plan.reason,
                    "power_off": list(plan.power_off),
                    "power_on": list(plan.power_on),
                },
                "in_flight": [
                    {
                        "vm": m.vm,
                        "src": m.src,
                        "dst": m.dst,
                        "mode": m.mode,
                        "migration_id": m.migration_id,
                        "started_at_s": m.started_at_s,
                    }
                    for m in s.in_flight.values()
                ],
                "migrations": {f"{k[0]}/{k[1]}": v for k, v in sorted(s.migrations.items())},
                "skipped": dict(sorted(s.skipped.items())),
                "reload_failures": s.reload_failures,
            }

    def _copy(self) -> _State:
        """A consistent copy for one scrape (histograms copied too)."""
        with self._lock:
            s = self._s
            return _State(
                snapshot=s.snapshot,
                snapshot_at_s=s.snapshot_at_s,
                plan=s.plan,
                plan_at_s=s.plan_at_s,
                policy_name=s.policy_name,
                policy_objective=s.policy_objective,
                policy_mode=s.policy_mode,
                freeze=s.freeze,
                power_on=dict(s.power_on),
                in_flight=dict(s.in_flight),
                migrations=dict(s.migrations),
                fallbacks=dict(s.fallbacks),
                skipped=dict(s.skipped),
                reconciliations=dict(s.reconciliations),
                cycles=dict(s.cycles),
                power_actions=dict(s.power_actions),
                reload_failures=s.reload_failures,
                journal_corrupt=s.journal_corrupt,
                clock_steps=s.clock_steps,
                reloads=s.reloads,
                last_success_at_s=s.last_success_at_s,
                last_cycle_at_s=s.last_cycle_at_s,
                last_cycle_error=s.last_cycle_error,
                migration_s={k: _copy_hist(h) for k, h in s.migration_s.items()},
                downtime_s={k: _copy_hist(h) for k, h in s.downtime_s.items()},
                cycle_s=_copy_hist(s.cycle_s),
                solver_s=_copy_hist(s.solver_s),
                prediction_ratio=_copy_hist(s.prediction_ratio),
                last_prediction=s.last_prediction,
            )


def _inc(lock: threading.Lock, counts: dict[str, int], key: str) -> None:
    with lock:
        counts[key] = counts.get(key, 0) + 1


def _copy_hist(h: _Histogram) -> _Histogram:
    c = _Histogram(h.bounds)
    c.counts = list(h.counts)
    c.sum = h.sum
    return c


def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


class StatsCollector(Collector):
    """Builds every ``balancerd_*`` family from one consistent copy of ``DaemonStats``."""

    def __init__(self, stats: DaemonStats) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        # Empty: the registry then calls collect() to learn the names (all are dynamic).
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._stats._copy()
        yield from _host_families(s)
        yield from _vm_families(s)
        yield from _plan_families(s)
        yield from _event_families(s)


def _host_families(s: _State) -> Iterator[Metric]:
    util = GaugeMetricFamily(
        _name("host_utilization"),
        "Host utilization 0..1 by resource (cpu: smoothed busy share; memory: used share).",
        labels=["host", "resource"],
    )
    up = GaugeMetricFamily(
        _name("host_up"), "1 if the host answered the last collection.", labels=["host"]
    )
    powered = GaugeMetricFamily(
        _name("host_powered_on"),
        "1 if the host is powered on, 0 if balancerd switched it off.",
        labels=["host"],
    )
    cpus = GaugeMetricFamily(_name("host_cpus"), "Host CPUs planned with.", labels=["host"])
    mem = GaugeMetricFamily(
        _name("host_memory_bytes"), "Host memory planned with.", labels=["host"]
    )
    guests = GaugeMetricFamily(_name("host_vms"), "Guests on the host.", labels=["host"])
    n_off = 0
    n_active = 0
    snap = s.snapshot
    names: list[str] = []
    if snap is not None:
        for h in snap.hosts:
            names.append(h.name)
            on = s.power_on.get(h.name, not h.powered_off)
            up.add_metric([h.name], 1.0 if h.up else 0.0)
            powered.add_metric([h.name], 1.0 if on else 0.0)
            n_off += 0 if on else 1
            n_active += 1 if (on and h.up) else 0
            guests.add_metric([h.name], float(len(snap.vms_on(h.name))))
            if h.up:
                util.add_metric([h.name, "cpu"], h.cpu_util)
                util.add_metric([h.name, "memory"], h.mem_util)
                cpus.add_metric([h.name], float(h.cpus))
                mem.add_metric([h.name], float(h.mem_bytes))
    # Hosts the power manager knows about that the snapshot does not list.
    for host, on in sorted(s.power_on.items()):
        if host not in names:
            powered.add_metric([host], 1.0 if on else 0.0)
            n_off += 0 if on else 1
    yield from (util, up, powered, cpus, mem, guests)
    yield GaugeMetricFamily(
        _name("hosts_powered_off"), "Hosts balancerd has switched off.", value=float(n_off)
    )
    yield GaugeMetricFamily(
        _name("hosts_active"), "Hosts powered on and answering.", value=float(n_active)
    )
    if s.snapshot_at_s is not None:
        yield GaugeMetricFamily(
            _name("last_collect_timestamp_seconds"),
            "Unix time of the last collection.",
            value=s.snapshot_at_s,
        )


def _unmovable_families(snap: Snapshot | None) -> Iterator[Metric]:
    """Guests fixed in place by a blocker (one kind per guest: its first blocker, so the
    series sum to the guests), and defined-but-stopped guests per host."""
    unmovable = GaugeMetricFamily(
        _name("guests_unmovable"),
        "Running guests that cannot be live-migrated, by the kind of their first blocker.",
        labels=["kind"],
    )
    stopped = GaugeMetricFamily(
        _name("host_vms_stopped"), "Defined-but-stopped guests on the host.", labels=["host"]
    )
    counts = dict.fromkeys(BlockerKind, 0)
    if snap is not None:
        for v in snap.unmovable():
            counts[v.blockers[0].kind] += 1
        for h in snap.hosts:
            if h.up:
                stopped.add_metric([h.name], float(len(snap.stopped_on(h.name))))
    for kind, n in counts.items():
        unmovable.add_metric([str(kind)], float(n))
    yield from (unmovable, stopped)


def _vm_families(s: _State) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        _name("vm_host_info"), "1 for the host each guest runs on now.", labels=["vm", "host"]
    )
    cpu = GaugeMetricFamily(
        _name("vm_cpu_utilization"), "Guest CPU use 0..1 of its vCPUs (smoothed).", labels=["vm"]
    )
    mem = GaugeMetricFamily(_name("vm_memory_bytes"), "Guest memory.", labels=["vm"])
    if s.snapshot is not None:
        for v in s.snapshot.vms:
            info.add_metric([v.name, v.host], 1.0)
            cpu.add_metric([v.name], v.cpu_util)
            mem.add_metric([v.name], float(v.mem_bytes))
    yield from (info, cpu, mem)
    yield from _unmovable_families(s.snapshot)
    in_flight = GaugeMetricFamily(
        _name("migrations_in_flight"), "Migrations running now.", value=float(len(s.in_flight))
    )
    yield in_flight


def _plan_families(s: _State) -> Iterator[Metric]:
    policy = InfoMetricFamily(_name("policy"), "The active policy.")
    if s.policy_name:
        policy.add_metric(
            [],
            {"policy": s.policy_name, "objective": s.policy_objective, "mode": s.policy_mode},
        )
    yield policy
    yield GaugeMetricFamily(
        _name("freeze_active"),
        "1 while a freeze window forbids migrations.",
        value=1.0 if s.freeze else 0.0,
    )
    plan = s.plan
    yield GaugeMetricFamily(
        _name("plan_moves"),
        "Moves in the latest plan (executed or only recommended).",
        value=float(len(plan.moves)) if plan else 0.0,
    )
    score = GaugeMetricFamily(
        _name("plan_objective"),
        "The policy's objective on the current (before) and target (after) placement "
        "(NaN: not computed).",
        labels=["when"],
    )
    power = GaugeMetricFamily(
        _name("plan_power_hosts"),
        "Hosts the latest plan would switch, by action.",
        labels=["action"],
    )
    status = GaugeMetricFamily(
        _name("solver_status"),
        "1 for the status of the latest solve (by backend).",
        labels=["backend", "status"],
    )
    if plan is not None:
        score.add_metric(["before"], _nan(plan.score_before))
        score.add_metric(["after"], _nan(plan.score_after))
        power.add_metric(["off"], float(len(plan.power_off)))
        power.add_metric(["on"], float(len(plan.power_on)))
        rep = plan.solver
        known = (*SOLVER_STATUSES, *([] if rep.status in SOLVER_STATUSES else [rep.status]))
        for st in known:
            status.add_metric([rep.backend, st], 1.0 if st == rep.status else 0.0)
        yield GaugeMetricFamily(
            _name("solver_last_seconds"), "Wall time of the latest solve.", value=rep.seconds
        )
        yield GaugeMetricFamily(
            _name("solver_gap_ratio"),
            "Relative gap between objective and bound of the latest solve (NaN: no bound).",
            value=_nan(rep.gap),
        )
        yield GaugeMetricFamily(
            _name("solver_objective"),
            "Objective value the solver reported (NaN: none).",
            value=_nan(rep.objective),
        )
    if s.plan_at_s is not None:
        yield GaugeMetricFamily(
            _name("last_plan_timestamp_seconds"), "Unix time of the latest plan.", value=s.plan_at_s
        )
    yield from (score, power, status)
    yield _histogram("solver_duration_seconds", "Solver wall time per solve.", {"": s.solver_s})


def _event_families(s: _State) -> Iterator[Metric]:
    migrations = CounterMetricFamily(
        _name("migrations"),
        "Migrations finished, by how they ran (live|cold) and result.",
        labels=["mode", "result"],
    )
    for (mode, result), n in sorted(s.migrations.items()):
        migrations.add_metric([mode, result], float(n))
    yield migrations
    yield _labelled_counter("fallbacks", "Live migrations that fell back.", "kind", s.fallbacks)
    yield _labelled_counter("skipped", "Plan steps skipped, by reason.", "reason", s.skipped)
    yield _labelled_counter(
        "reconciliations", "Journal entries settled at start.", "outcome", s.reconciliations
    )
    yield _labelled_counter("cycles", "Decide-and-act cycles by result.", "result", s.cycles)
    power = CounterMetricFamily(
        _name("power_actions"),
        "Host power switches by action and result.",
        labels=["action", "result"],
    )
    for (action, result), n in sorted(s.power_actions.items()):
        power.add_metric([action, result], float(n))
    yield power
    yield CounterMetricFamily(
        _name("reload_failures"),
        "SIGHUP reloads rejected (the old config stayed).",
        value=float(s.reload_failures),
    )
    yield CounterMetricFamily(_name("reloads"), "SIGHUP reloads applied.", value=float(s.reloads))
    yield CounterMetricFamily(
        _name("journal_corrupt"),
        "Migration journals found corrupt at start and moved aside.",
        value=float(s.journal_corrupt),
    )
    yield CounterMetricFamily(
        _name("clock_steps"),
        "Wall-clock steps seen (the jobs were rescheduled from the new time).",
        value=float(s.clock_steps),
    )
    yield _histogram(
        "migration_duration_seconds", "Duration of successful migrations.", s.migration_s, "mode"
    )
    yield _histogram(
        "migration_downtime_seconds",
        "Guest downtime of successful migrations.",
        s.downtime_s,
        "mode",
    )
    yield _histogram(
        "cycle_duration_seconds", "Duration of decide-and-act cycles.", {"": s.cycle_s}
    )
    yield _histogram(
        "migration_prediction_ratio",
        "Measured / predicted duration of successful migrations (1 = exact).",
        {"": s.prediction_ratio},
    )
    if s.last_prediction is not None:
        vm, predicted, measured = s.last_prediction
        for what, value in (("predicted", predicted), ("measured", measured)):
            fam = GaugeMetricFamily(
                _name(f"migration_last_{what}_seconds"),
                f"The {what} duration of the last successful migration.",
                labels=["vm"],
            )
            fam.add_metric([vm], value)
            yield fam
    dirty = GaugeMetricFamily(
        _name("vm_dirty_rate_bytes_per_second"),
        "Guest memory dirty rate, last measured (dirty-rate calculation or migration).",
        labels=["vm"],
    )
    dirty_age = GaugeMetricFamily(
        _name("vm_dirty_rate_age_seconds"), "Age of that measurement.", labels=["vm"]
    )
    for v in s.snapshot.vms if s.snapshot is not None else ():
        if v.dirty_rate_bytes_s is not None:
            dirty.add_metric([v.name], v.dirty_rate_bytes_s)
            dirty_age.add_metric([v.name], _nan(v.dirty_rate_age_s))
    yield from (dirty, dirty_age)
    if s.last_success_at_s is not None:
        yield GaugeMetricFamily(
            _name("last_success_timestamp_seconds"),
            "Unix time the last cycle ended without error.",
            value=s.last_success_at_s,
        )


def _nan(value: float | None) -> float:
    """Unknown values stay visible as NaN, so the series exists once there is a plan."""
    return math.nan if value is None else value


def _labelled_counter(name: str, doc: str, label: str, counts: dict[str, int]) -> Metric:
    fam = CounterMetricFamily(_name(name), doc, labels=[label])
    for key, n in sorted(counts.items()):
        fam.add_metric([key], float(n))
    return fam


def _histogram(name: str, doc: str, hists: dict[str, _Histogram], label: str = "") -> Metric:
    fam = HistogramMetricFamily(_name(name), doc, labels=[label] if label else [])
    for key, h in sorted(hists.items()):
        fam.add_metric([key] if label else [], h.buckets(), h.sum)
    return fam


def register(registry: CollectorRegistry, stats: DaemonStats) -> StatsCollector:
    collector = StatsCollector(stats)
    registry.register(collector)
    return collector


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition, as a scrape would see it."""
    return generate_latest(registry)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9177"`` or ``"[::1]:9177"`` -> (address, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError([f"metrics_listen: {listen!r}: expected ADDRESS:PORT"])
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port_n = int(port)
    if port_n > 65535:
        raise ConfigError([f"metrics_listen: {listen!r}: port out of range"])
    return host, port_n


def is_loopback(address: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not known to be local


class MetricsServer:
    """The running HTTP(S) endpoint; ``port`` is the bound one (useful with port 0).

    With ``tls`` (prometheus-client's own TLS support) it serves HTTPS with
    ``tls.cert_file``/``tls.key_file``; with ``tls.client_ca_file`` a scraper must present
    a client certificate signed by that CA (the handshake fails otherwise)."""

    def __init__(
        self,
        address: str,
        port: int,
        registry: CollectorRegistry,
        tls: MetricsTls | None = None,
    ) -> None:
        self.tls = tls if tls is not None and tls.enabled else None
        if self.tls is None:
            self._server, self._thread = start_http_server(port, addr=address, registry=registry)
        else:
            self._server, self._thread = start_http_server(
                port,
                addr=address,
                registry=registry,
                certfile=self.tls.cert_file,
                keyfile=self.tls.key_file,
                client_cafile=self.tls.client_ca_file or None,
                client_auth_required=bool(self.tls.client_ca_file),
            )
        self.address = address
        self.port = int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(listen: str, registry: CollectorRegistry, tls: MetricsTls | None = None) -> MetricsServer:
    """Start the ``/metrics`` endpoint in a daemon thread (``listen``: ADDRESS:PORT), over
    HTTPS when ``tls`` is enabled. A listen address other than loopback without TLS is a
    warning: anyone who reaches it reads the cluster's guests, hosts and placements."""
    address, port = parse_listen(listen)
    encrypted = tls is not None and tls.enabled
    if not encrypted and not is_loopback(address):
        log.warning(
            "metrics served without TLS on a non-loopback address listen=%s: anyone who "
            "reaches it reads guest and host names and placements; set metrics.tls "
            "(cert_file, key_file, client_ca_file) or listen on 127.0.0.1",
            listen,
        )
    try:
        return MetricsServer(address, port, registry, tls)
    except OSError as exc:  # ssl.SSLError is an OSError: a bad certificate or key too
        raise ConfigError([f"metrics_listen: cannot listen on {listen}: {exc}"]) from exc
