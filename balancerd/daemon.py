"""The daemon: the composition root that wires real objects together and runs them.

Threads: APScheduler runs the collect job (every ``collect_interval_s``) and the cycle
job (decide and act, every ``cycle_interval_s``; never overlapping, missed runs
coalesced). The main thread only waits: it feeds the systemd watchdog while the jobs
make progress, and performs reload/stop when a signal handler has set a flag.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from balancerd.collect import Capacity, SampleHistory, build_snapshot, capacity_from_config
from balancerd.config import Config, load_config, resolve_relative
from balancerd.daemon_state import write_daemon_status
from balancerd.decide import decide
from balancerd.errors import BalancerdError, ConfigError
from balancerd.execute.executor import execute
from balancerd.execute.journal import Journal
from balancerd.execute.move import FAILED, MIGRATED, SKIPPED, Engine, MoveResult
from balancerd.execute.reconcile import reconcile
from balancerd.forecast import DemandHistory
from balancerd.hypervisor.base import Hypervisor, JobStats
from balancerd.metrics import DaemonStats, register, serve
from balancerd.model import Move, Plan, Snapshot
from balancerd.notify import Notifier
from balancerd.policy.load import load_policy
from balancerd.policy.model import Policy
from balancerd.power import PowerTracker, apply_power, decide_power, drivers_for
from balancerd.power.base import PowerDriver
from balancerd.schedule import ActiveSchedule, active_schedule

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.sqlite"
POWER_FILE = "power.json"


@dataclass(frozen=True)
class Loaded:
    """Config and every policy it names, validated together (swapped as one)."""

    config: Config
    policies: dict[str, Policy]  # path as written in the config -> policy


def load_all(config_path: str) -> Loaded:
    """Load the config and all its policies; raise ConfigError listing every problem."""
    config = load_config(config_path)
    paths = [config.policy] + [e.policy for e in config.schedule if e.policy]
    policies: dict[str, Policy] = {}
    problems: list[str] = []
    for p in dict.fromkeys(paths):
        try:
            policies[p] = load_policy(resolve_relative(config.source, p))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return Loaded(config=config, policies=policies)


def skip_reason_class(reason: str) -> str:
    """A short, bounded label for a skipped step's reason (for the skipped_total metric)."""
    table = (
        ("not found on", "disk-missing"),
        ("cache=", "cache-mode"),
        ("MiB free", "no-memory"),
        ("CPU model", "cpu-incompatible"),
        ("is older than", "version"),
        ("network", "network"),
        ("bridge", "network"),
        ("in a job", "in-job"),
        ("same host", "same-host"),
        ("not running", "not-running"),
        ("no longer on", "gone"),
        ("not on ", "gone"),
        ("does not answer", "host-down"),
        ("room on", "dependency"),
        ("earlier move", "dependency"),
    )
    return next((label for text, label in table if text in reason), "other")


@dataclass
class _Runtime:
    """What the jobs share; replaced pieces are swapped under the daemon's lock."""

    loaded: Loaded
    hypervisor: Hypervisor
    history: SampleHistory
    snapshot: Snapshot | None = None
    last_plan: Plan | None = None
    last_cycle: dict[str, Any] = field(default_factory=dict)
    last_moved_s: dict[str, float] = field(default_factory=dict)  # wall clock


class Daemon:
    def __init__(
        self,
        config_path: str,
        *,
        hypervisor_factory: Callable[[Config], Hypervisor] | None = None,
        notifier: Notifier | None = None,
        registry: CollectorRegistry | None = None,
        serve_metrics: bool = True,
        max_cycles: int = 0,
    ) -> None:
        self.config_path = config_path
        self._hypervisor_factory = hypervisor_factory or _libvirt_hypervisor
        self.notifier = notifier or Notifier.from_env()
        self.registry = registry or CollectorRegistry()
        self.stats = DaemonStats()
        self._serve_metrics = serve_metrics
        self._max_cycles = max_cycles  # stop after this many cycles (0 = run until signalled)
        self.cycles_done = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._ready_sent = False
        self._starving = False  # the watchdog is being withheld
        # Running jobs: thread id -> last time that job showed progress (monotonic).
        self._busy: dict[int, float] = {}
        loaded = load_all(config_path)
        self.rt = _Runtime(
            loaded=loaded,
            hypervisor=self._hypervisor_factory(loaded.config),
            history=SampleHistory(loaded.config.smoothing_window),
        )
        state_dir = Path(loaded.config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(state_dir / JOURNAL_FILE)
        self.power = _load_tracker(state_dir / POWER_FILE)
        self.known_capacity: dict[str, Capacity] = {}  # last seen while up
        self.demand = DemandHistory(keep_s=_forecast_window_s(loaded))
        self.drivers: dict[str, PowerDriver] = drivers_for(loaded.config.hosts)
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )

    # --- lifecycle --------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.rt.loaded.config

    def heartbeat(self) -> None:
        """Called from a job's thread whenever the job makes progress."""
        ident = threading.get_ident()
        if ident in self._busy:
            self._busy[ident] = time.monotonic()

    @contextlib.contextmanager
    def _job(self) -> Iterator[None]:
        """Marks the current thread as running a job whose progress the watchdog follows."""
        ident = threading.get_ident()
        self._busy[ident] = time.monotonic()
        try:
            yield
        finally:
            self._busy.pop(ident, None)

    def stalled_s(self) -> float:
        """How long the most stuck running job has gone without progress (0: none)."""
        now = time.monotonic()
        return max((now - t for t in list(self._busy.values())), default=0.0)

    def install_signal_handlers(self) -> None:
        def on_hup(_sig: int, _frame: FrameType | None) -> None:
            self._reload = True
            self._wake.set()

        def on_term(_sig: int, _frame: FrameType | None) -> None:
            self._stop = True
            self._wake.set()

        signal.signal(signal.SIGHUP, on_hup)
        # `kill -USR1 PID` writes every thread's stack to the log: where is it stuck?
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)

    def request_stop(self) -> None:
        self._stop = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload = True
        self._wake.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the exit status."""
        self.notifier.status("starting: reconciling the migration journal")
        self._reconcile()
        register(self.registry, self.stats)
        server = serve(self.config.metrics_listen, self.registry) if self._serve_metrics else None
        self._apply_policy_metrics()
        self._schedule_jobs()
        self.scheduler.start()
        log.info(
            "started config=%s hosts=%d metrics=%s",
            self.config_path,
            len(self.config.hosts),
            self.config.metrics_listen,
        )
        try:
            self._main_loop()
        finally:
            self.notifier.stopping()
            self.scheduler.shutdown(wait=False)
            if server is not None:
                server.close()
            self.rt.hypervisor.close()
            self.journal.close()
            log.info("stopped")
        return 0

    def _main_loop(self) -> None:
        tick_s = 1.0
        if self.notifier.watchdog_ping_s:
            tick_s = min(tick_s, self.notifier.watchdog_ping_s)
        while not self._stop:
            self._wake.wait(timeout=tick_s)
            self._wake.clear()
            if self._reload:
                self._reload = False
                self.reload()
            # Start-up is governed by systemd's start timeout; after READY, a job without
            # progress for stall_timeout_s (a call hung past every timeout) starves the
            # watchdog, so systemd restarts us.
            if not self._ready_sent or self.stalled_s() < self.config.stall_timeout_s:
                self.notifier.watchdog()
            else:
                if not self._starving:
                    log.error(
                        "a job made no progress for %.0f s; withholding the systemd watchdog",
                        self.stalled_s(),
                    )
                self._starving = True
                continue
            if self._starving:
                log.warning("progress again; feeding the systemd watchdog")
                self._starving = False

    def _schedule_jobs(self) -> None:
        c = self.config
        self.scheduler.add_job(
            self.collect_job,
            "interval",
            seconds=c.collect_interval_s,
            id="collect",
            next_run_time=datetime.now().astimezone(),
        )
        self.scheduler.add_job(
            self.cycle_job,
            "interval",
            seconds=c.cycle_interval_s,
            id="cycle",
        )

    def _reschedule(self) -> None:
        c = self.config
        self.scheduler.reschedule_job("collect", trigger="interval", seconds=c.collect_interval_s)
        self.scheduler.reschedule_job("cycle", trigger="interval", seconds=c.cycle_interval_s)

    # --- reload -----------------------------------------------------------------------

    def reload(self) -> bool:
        """Load -> validate -> swap. An invalid file keeps everything as it was."""
        self.notifier.reloading()
        try:
            loaded = load_all(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, keeping the running policy: %s", problem)
            self.stats.record_reload(ok=False)
            self.notifier.ready(status="reload rejected; running on the previous configuration")
            return False
        with self._lock:
            old = self.rt.loaded.config
            self.rt.loaded = loaded
            self.demand.keep_s = _forecast_window_s(loaded)
            if (
                old.hosts != loaded.config.hosts
                or old.host_timeout_s != loaded.config.host_timeout_s
            ):
                self.rt.hypervisor.close()
                self.rt.hypervisor = self._hypervisor_factory(loaded.config)
                self.rt.history = SampleHistory(loaded.config.smoothing_window)
                self.drivers = drivers_for(loaded.config.hosts)
            elif old.smoothing_window != loaded.config.smoothing_window:
                self.rt.history = SampleHistory(loaded.config.smoothing_window)
        if self.scheduler.running:
            self._reschedule()
        self.stats.record_reload(ok=True)
        self._apply_policy_metrics()
        log.info("reloaded config=%s policies=%s", self.config_path, ",".join(loaded.policies))
        self.notifier.ready(status="reloaded")
        return True

    def active(self) -> tuple[ActiveSchedule, Policy]:
        loaded = self.rt.loaded
        active = active_schedule(
            loaded.config.schedule, loaded.config.policy, datetime.now().astimezone()
        )
        return active, loaded.policies[active.policy]

    def _apply_policy_metrics(self) -> None:
        active, policy = self.active()
        self.stats.set_policy(policy.name, policy.objective, policy.mode)
        self.stats.set_freeze(active.frozen)

    # --- jobs -------------------------------------------------------------------------

    def _reconcile(self) -> None:
        try:
            done = reconcile(self.rt.hypervisor, self.journal, heartbeat=self.heartbeat)
        except BalancerdError as exc:
            log.error("reconcile at start failed: %s", exc)
            return
        for r in done:
            outcome = ("settled" if r.actions else "cleaned") if r.settled else "unknown"
            self.stats.record_reconciliation(outcome)

    def collect_job(self) -> None:
        with self._job():
            self._collect()

    def _collect(self) -> None:
        try:
            with self._lock:
                hv, history, config = self.rt.hypervisor, self.rt.history, self.config
            sample = hv.sample_all()
            history.add(sample)
            snapshot = build_snapshot(
                history.samples(),
                window=history.window,
                # A host that is off reports nothing: plan with what it had when it was up.
                capacity={**self.known_capacity, **capacity_from_config(config.hosts)},
                powered_off=self.power.powered_off(),
            )
            for h in snapshot.hosts:
                if h.up:
                    self.known_capacity[h.name] = Capacity(cpus=h.cpus, mem_bytes=h.mem_bytes)
            self.power.observe(snapshot, time.time())
            self.demand.record(snapshot, time.time())
            with self._lock:
                self.rt.snapshot = snapshot
            self.stats.set_snapshot(snapshot)
            for h in snapshot.hosts:
                self.stats.set_host_power(h.name, h.name not in self.power.powered_off())
            self.heartbeat()
            up = sum(h.up for h in snapshot.hosts)
            if not self._ready_sent and up and len(history) >= 2:
                self._ready_sent = True
                self.notifier.ready(status=f"collecting: {up}/{len(snapshot.hosts)} hosts up")
                log.info("ready hosts_up=%d hosts=%d", up, len(snapshot.hosts))
            self._write_status("idle")
        except Exception:  # one failed job is logged once; the daemon goes on
            log.exception("collect failed")

    def cycle_job(self) -> None:
        with self._job():
            self._timed_cycle()

    def _timed_cycle(self) -> None:
        started_s = time.monotonic()
        try:
            self._cycle()
        except Exception as exc:  # logged once, counted, and the next cycle runs
            log.exception("cycle failed")
            self.stats.record_cycle(time.monotonic() - started_s, ok=False, error=str(exc))
        else:
            self.stats.record_cycle(time.monotonic() - started_s, ok=True)
        finally:
            self.cycles_done += 1
            if self._max_cycles and self.cycles_done >= self._max_cycles:
                self.request_stop()

    def _cycle(self) -> None:
        with self._lock:
            snapshot = self.rt.snapshot
        if snapshot is None or len(self.rt.history) < 2:
            log.info("cycle skipped: not enough samples yet")
            return
        active, policy = self.active()
        self.stats.set_policy(policy.name, policy.objective, policy.mode)
        self.stats.set_freeze(active.frozen)
        now_s = time.time()
        self.notifier.status(f"planning with policy {policy.name}")
        # Plan with each guest's forecast demand (spec.forecast), act on the real snapshot.
        planning = self.demand.planning_snapshot(snapshot, policy.forecast, now_s)
        plan = decide(planning, policy, last_moved_s=self.rt.last_moved_s, now_s=now_s)
        self.stats.set_plan(plan)
        self.rt.last_plan = plan
        _log_plan(plan, policy)
        act = policy.mode == "automatic" and not active.frozen
        results: list[MoveResult] = []
        if not act:
            why = "freeze window" if active.frozen else "recommend mode"
            log.info("plan not executed (%s) policy=%s moves=%d", why, policy.name, len(plan.moves))
            for _move in plan.moves:
                self.stats.record_skip("freeze" if active.frozen else "recommend")
        elif plan.power_on:
            # Capacity first: switch hosts on; their guests move in a later cycle, once up.
            self._switch_power(plan, snapshot, policy, now_s, only_on=True)
        else:
            if plan.moves:
                self.notifier.status(f"migrating {len(plan.moves)} guests ({policy.name})")
                results = self._execute(plan, policy)
            if policy.objective == "power-save":
                self._switch_power(plan, snapshot, policy, now_s, only_on=False)
        self.rt.last_cycle = {
            "at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "policy": policy.name,
            "planned_moves": len(plan.moves),
            "executed": act,
            "migrated": sum(r.result == MIGRATED for r in results),
            "skipped": sum(r.result == SKIPPED for r in results),
            "failed": sum(r.result == FAILED for r in results),
            "reason": plan.reason,
        }
        self._write_status("idle")
        self.notifier.status(
            f"idle; last cycle {policy.name}: {self.rt.last_cycle['migrated']} migrated, "
            f"{self.rt.last_cycle['skipped']} skipped, {self.rt.last_cycle['failed']} failed"
        )

    def _execute(self, plan: Plan, policy: Policy) -> list[MoveResult]:
        def progress(move: Move, stats: JobStats | None, message: str) -> None:
            self.heartbeat()
            if message == "started":
                self.stats.migration_started(move.vm, move.src, move.dst)
                self._write_status("migrating")

        engine = Engine(
            hv=self.rt.hypervisor,
            mig=policy.migration,
            headroom_bytes=policy.limits.mem_headroom_bytes,
            journal=self.journal,
            heartbeat=self.heartbeat,
            progress=progress,
        )
        results = execute(plan.moves, engine, should_stop=lambda: self._stop)
        now_s = time.time()
        for r in results:
            if r.result == MIGRATED:
                self.rt.last_moved_s[r.vm] = now_s
                fallback = r.mode in ("paused-fallback", "offline", "cold")
                if fallback:
                    self.stats.record_fallback("pause" if r.mode == "paused-fallback" else "cold")
                self.stats.migration_finished(
                    r.vm,
                    "live" if r.mode.startswith("live") or r.mode == "auto-converge" else r.mode,
                    "success",
                    duration_s=r.seconds,
                    downtime_s=(r.downtime_ms or 0.0) / 1000.0,
                )
            elif r.result == SKIPPED:
                self.stats.record_skip(skip_reason_class(r.reason))
                self.stats.migration_finished(r.vm, "none", "skipped")
            else:
                self.stats.migration_finished(r.vm, r.mode or "live", "failed")
            log.info(
                "move vm=%s %s->%s result=%s mode=%s seconds=%.1f reason=%s",
                r.vm,
                r.src,
                r.dst,
                r.result,
                r.mode,
                r.seconds,
                r.reason,
                extra={"VM": r.vm, "HOST": r.dst, "POLICY": policy.name},
            )
        return results

    def _switch_power(
        self, plan: Plan, snapshot: Snapshot, policy: Policy, now_s: float, only_on: bool
    ) -> None:
        decision = decide_power(
            plan,
            snapshot,
            policy.power,
            self.power.hosts,
            now_s,
            switchable=set(self.drivers),
        )
        if only_on:
            decision = type(decision)(power_off=(), power_on=decision.power_on, held=decision.held)
        if decision.empty:
            return
        for r in apply_power(decision, self.drivers, self.power, now_s):
            self.stats.record_power_action(r.action, r.ok)
            if r.ok:
                log.info("power %s host=%s", r.action, r.host, extra={"HOST": r.host})
            else:
                log.error("power %s host=%s failed: %s", r.action, r.host, r.error)
        (Path(self.config.state_dir) / POWER_FILE).write_text(self.power.to_json())

    def _write_status(self, state: str) -> None:
        active, policy = self.active()
        try:
            write_daemon_status(
                self.config.state_dir,
                {
                    "state": state,
                    "policy": policy.name,
                    "objective": policy.objective,
                    "mode": policy.mode,
                    "frozen": active.frozen,
                    "last_cycle": self.rt.last_cycle,
                    "in_flight": self.stats.summary().get("in_flight", []),
                    "powered_off": list(self.power.powered_off()),
                },
            )
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc)


def _log_plan(plan: Plan, policy: Policy) -> None:
    log.info(
        "plan policy=%s objective=%s moves=%d score_before=%s score_after=%s solver=%s/%s "
        "reason=%s",
        policy.name,
        plan.objective,
        len(plan.moves),
        plan.score_before,
        plan.score_after,
        plan.solver.backend,
        plan.solver.status,
        plan.reason or "-",
        extra={"POLICY": policy.name},
    )
    for m in plan.moves:
        log.info(
            "planned move vm=%s %s->%s wave=%d",
            m.vm,
            m.src,
            m.dst,
            m.wave,
            extra={"VM": m.vm, "POLICY": policy.name},
        )


def _forecast_window_s(loaded: Loaded) -> float:
    """How much demand history the loaded policies need."""
    return max(p.forecast.window_s for p in loaded.policies.values())


def _load_tracker(path: Path) -> PowerTracker:
    try:
        return PowerTracker.from_json(path.read_text())
    except (OSError, ValueError):
        return PowerTracker()


def _libvirt_hypervisor(config: Config) -> Hypervisor:
    from balancerd.wiring import open_hypervisor

    return open_hypervisor(config)
