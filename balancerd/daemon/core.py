"""The daemon's composition root: wires collection, cycles, the watchdog, stats, reload and
signals together and owns the threads.

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
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from balancerd.backoff import BackoffTable
from balancerd.collect import (
    STOPPED_STATES,
    Capacity,
    SampleHistory,
    build_snapshot,
    capacity_from_config,
    merge_capacity,
)
from balancerd.config import Config
from balancerd.control_client import default_socket_path
from balancerd.coord import CoordinationError, Leadership, make_coordinator
from balancerd.coord.metrics import LeadershipCollector
from balancerd.daemon.control import (
    ControlHandlers,
    ControlServer,
    ControlUnavailable,
    EventHub,
    OperatorCollector,
    record_cycle,
)
from balancerd.daemon.cycle import CycleActions, CycleInputs, CycleReport, run_cycle
from balancerd.daemon.reload import Loaded, load_all
from balancerd.daemon.stats import StatsRecorder
from balancerd.daemon.watchdog import Watchdog
from balancerd.daemon_state import write_daemon_status
from balancerd.errors import BalancerdError, ConfigError, HypervisorError
from balancerd.execute.executor import Hold, execute
from balancerd.execute.move import Engine, MoveResult, run_move
from balancerd.execute.reconcile import reconcile
from balancerd.forecast import DemandHistory
from balancerd.history import HISTORY_FILE, History
from balancerd.hypervisor.base import Hypervisor
from balancerd.metrics import DaemonStats, register, serve
from balancerd.model import Move, Plan, Snapshot
from balancerd.notify import Notifier
from balancerd.operator import OperatorState
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.policy.model import Policy
from balancerd.power import PowerResult, PowerTracker, apply_power, decide_power, drivers_for
from balancerd.power.base import PowerDriver
from balancerd.schedule import ActiveSchedule, active_schedule
from balancerd.selectors import resolve_policy
from balancerd.statefiles import atomic_write

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.sqlite"
POWER_FILE = "power.json"
# How long start-up waits for another balancerd (an `apply`, `migrate`) to release the lock.
LOCK_WAIT_S = 30.0
# On stop, how long running moves get to abort and settle (the unit's TimeoutStopSec is 120).
STOP_BUDGET_S = 100.0
# A jump of the wall clock against the monotonic one larger than this is a clock step.
CLOCK_STEP_S = 30.0
# A snapshot older than this many collect intervals is too old to plan from.
STALE_SNAPSHOT_INTERVALS = 3

HypervisorFactory = Callable[[Config], Hypervisor]


@dataclass
class _Runtime:
    """What the jobs share; replaced pieces are swapped under the daemon's lock."""

    loaded: Loaded
    hypervisor: Hypervisor
    history: SampleHistory
    drivers: dict[str, PowerDriver]
    snapshot: Snapshot | None = None
    last_plan: Plan | None = None
    last_report: CycleReport | None = None
    last_inputs: CycleInputs | None = None  # what the last report was decided on
    last_decided_at_s: float = 0.0  # wall clock: when its policy (and drains) were read
    last_plan_at_s: float = 0.0  # the same for last_plan (newer while a cycle executes it)
    last_moved_s: dict[str, float] = field(default_factory=dict)  # wall clock


class Daemon:
    def __init__(
        self,
        config_path: str,
        *,
        hypervisor_factory: HypervisorFactory | None = None,
        notifier: Notifier | None = None,
        registry: CollectorRegistry | None = None,
        serve_metrics: bool = True,
        max_cycles: int = 0,
        clock: Callable[[], float] = time.monotonic,
        control_socket: str | Path | None = None,
    ) -> None:
        """``clock``: seconds for cooldowns, grace periods and demand history. Monotonic, so
        a wall-clock step neither freezes nor storms them (cron windows use wall time).
        ``control_socket``: where ``balancerd drain`` & co. reach the daemon (None: the
        default, see ``control_client.default_socket_path``; "": no control socket)."""
        self.config_path = config_path
        self._hypervisor_factory = hypervisor_factory or _libvirt_hypervisor
        self.notifier = notifier or Notifier.from_env()
        self.registry = registry or CollectorRegistry()
        self.stats = DaemonStats()
        self.recorder = StatsRecorder(self.stats)
        self.watchdog = Watchdog(self.notifier)
        self._clock = clock
        self._serve_metrics = serve_metrics
        self._max_cycles = max_cycles  # stop after this many cycles (0 = run until signalled)
        self.cycles_done = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._ready_sent = False
        self._first_cycle_due = False  # the first cycle was brought forward
        self._server: Any = None  # the metrics HTTP server while running
        self._cycle_idle = threading.Event()  # no cycle runs (stop waits for this)
        self._cycle_idle.set()
        self._power_lock = threading.Lock()  # the power tracker: collect and cycle threads
        self._snapshot_at_mono: float | None = None
        self._collect_idle = threading.Event()  # no collection runs
        self._collect_idle.set()
        self._retired: list[Hypervisor] = []  # replaced by a reload, closed when unused
        self._wall_offset_s = time.time() - time.monotonic()
        loaded = load_all(config_path)
        drivers = drivers_for(loaded.config.hosts)
        self.rt = _Runtime(
            loaded=loaded,
            hypervisor=self._hypervisor_factory(loaded.config),
            history=SampleHistory(loaded.config.smoothing_window),
            drivers=drivers,
        )
        state_dir = Path(loaded.config.state_dir)
        # Who may act: the state-directory lock alone (one node), or also the etcd leader
        # lock (coordination: etcd). The journal goes with it (SQLite here, or etcd).
        self.coord = make_coordinator(loaded.config.coordination, state_dir)
        self.state_lock = self.coord.state_lock
        self._reconcile_due = True  # settle open entries before acting as a (new) leader
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self.journal = self.coord.journal()
        except (OSError, sqlite3.Error) as exc:
            raise BalancerdError(
                f"cannot open the migration journal in {state_dir}: {exc} "
                "(balancerd does not migrate without a journal)"
            ) from None
        if self.journal.moved_aside:
            self.stats.record_journal_corrupt()
        self.power = _load_tracker(state_dir / POWER_FILE, clock())
        self.operator = OperatorState.load(state_dir)  # drains and pause outlive restarts
        self.history = _open_history(state_dir)
        self.events = EventHub()  # progress lines for control clients
        self.control_socket: Path | None = None
        if control_socket is None:
            self.control_socket = default_socket_path()
        elif control_socket:
            self.control_socket = Path(control_socket)
        self.control: ControlServer | None = None
        self._act_lock = threading.Lock()  # one cycle or approved plan acts at a time
        self._cycle_pending = False
        self._status_state = "idle"
        self.known_capacity: dict[str, Capacity] = {}  # last seen while up
        self.backoff = BackoffTable()  # guests (and guest -> host pairs) that keep failing
        self.demand = DemandHistory(keep_s=loaded.forecast_window_s)
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )

    # --- lifecycle --------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.rt.loaded.config

    @property
    def ready(self) -> bool:
        return self._ready_sent

    @property
    def last_report(self) -> CycleReport | None:
        return self.rt.last_report

    def heartbeat(self) -> None:
        self.watchdog.heartbeat()

    def install_signal_handlers(self) -> None:
        def on_hup(_sig: int, _frame: FrameType | None) -> None:
            self.request_reload()

        def on_term(_sig: int, _frame: FrameType | None) -> None:
            self.request_stop()

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

    def start(self, *, schedule_jobs: bool = True) -> None:
        """Reconcile the journal, serve metrics and start the scheduled jobs (tests drive
        ``collect_once``/``cycle_once`` themselves with ``schedule_jobs=False``)."""
        self.notifier.status("starting: waiting for the state directory lock")
        self.coord.start(wait_s=LOCK_WAIT_S, on_change=self._leadership_changed)
        self.notifier.status("starting: reconciling the migration journal")
        self._reconcile()
        register(self.registry, self.stats)
        self.registry.register(LeadershipCollector(self.coord.leadership))
        self.registry.register(OperatorCollector(self))
        self._start_control()
        self._server = (
            serve(self.config.metrics_listen, self.registry, self.config.metrics_tls)
            if self._serve_metrics
            else None
        )
        self._apply_policy_metrics()
        if schedule_jobs:
            self._schedule_jobs()
            self.scheduler.start()
        log.info(
            "started config=%s hosts=%d metrics=%s",
            self.config_path,
            len(self.config.hosts),
            self.config.metrics_listen,
        )

    def _start_control(self) -> None:
        if self.control_socket is None:
            return
        server = ControlServer(self.control_socket, ControlHandlers(self))
        try:
            server.start()
        except ControlUnavailable as exc:
            log.error("no control socket (drain, pause, cycle, apply --latest need it): %s", exc)
            return
        self.control = server

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or ``max_cycles``). Returns the exit status."""
        self.start()
        try:
            self._main_loop()
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop: running moves are aborted and settled (within STOP_BUDGET_S), then every
        connection and file is closed."""
        self._stop = True
        self.notifier.stopping()
        if self.control is not None:
            self.control.close()  # no new requests; running ones see the stop
        if self.scheduler.running:
            self.scheduler.pause()
        if not self._cycle_idle.is_set():
            self.notifier.status("stopping: aborting and settling migrations in flight")
            log.warning("stopping: waiting for migrations in flight to abort and settle")
            if not self._cycle_idle.wait(STOP_BUDGET_S):
                log.error(
                    "stopping with migrations unsettled after %.0f s; the next start "
                    "reconciles their journal entries",
                    STOP_BUDGET_S,
                )
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self._server is not None:
            self._server.close()
        self.rt.hypervisor.close()
        for hv in self._retired:
            hv.close()
        self.journal.close()
        if self.history is not None:
            self.history.close()
        self.coord.stop()  # after moves settled: a standby may take over at once
        log.info("stopped")

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
            self._close_retired()
            self._follow_clock_steps()
            self.watchdog.tick(ready=self._ready_sent, stall_timeout_s=self.config.stall_timeout_s)

    def _close_retired(self) -> None:
        """Close hypervisor connections replaced by a reload once no job uses them."""
        if self._retired and self._cycle_idle.is_set() and self._collect_idle.is_set():
            with self._lock:
                retired, self._retired = self._retired, []
            for hv in retired:
                hv.close()

    def _follow_clock_steps(self) -> None:
        """APScheduler's interval triggers count in wall time: after a step back of an hour
        nothing would run for an hour. A step (wall clock moving apart from the monotonic
        one) reschedules both jobs from now."""
        offset_s = time.time() - time.monotonic()
        step_s = offset_s - self._wall_offset_s
        self._wall_offset_s = offset_s
        if abs(step_s) < CLOCK_STEP_S or not self.scheduler.running:
            return
        log.warning("the wall clock stepped by %+.0f s; rescheduling the jobs from now", step_s)
        self.stats.record_clock_step()
        now = datetime.now().astimezone()
        for job_id in ("collect", "cycle"):
            self.scheduler.modify_job(job_id, next_run_time=now)

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
        """Load -> validate everything the new files need -> swap. An invalid file keeps
        everything as it was; nothing found after the swap can take the daemon down."""
        self.notifier.reloading()
        try:
            loaded = load_all(self.config_path)
            hosts_changed = (
                self.config.hosts != loaded.config.hosts
                or self.config.host_timeout_s != loaded.config.host_timeout_s
            )
            drivers = drivers_for(loaded.config.hosts) if hosts_changed else self.rt.drivers
            new_hv = self._hypervisor_factory(loaded.config) if hosts_changed else None
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, keeping the running policy: %s", problem)
            self.stats.record_reload(ok=False)
            self.notifier.ready(status="reload rejected; running on the previous configuration")
            return False
        except Exception as exc:  # a reload must never take the daemon down
            log.error("reload rejected, keeping the running policy: %s: %s", self.config_path, exc)
            log.debug("reload failure", exc_info=True)
            self.stats.record_reload(ok=False)
            self.notifier.ready(status="reload rejected; running on the previous configuration")
            return False
        with self._lock:
            old = self.rt.loaded.config
            self.rt.loaded = loaded
            self.demand.keep_s = loaded.forecast_window_s
            if new_hv is not None:
                # Moves and collections under way keep the connections they started with;
                # the old ones are closed once nothing uses them (see _close_retired).
                self._retired.append(self.rt.hypervisor)
                self.rt.hypervisor = new_hv
                self.rt.history = SampleHistory(loaded.config.smoothing_window)
                self.rt.drivers = drivers
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
        """Settle open journal entries (at start, and before each cycle: entries a move
        left open because its job hung or a host did not answer). Only the leader does:
        it owns every open entry, a previous leader's too."""
        if self.coord.not_leading():
            return
        try:
            done = reconcile(self.rt.hypervisor, self.journal, heartbeat=self.heartbeat)
        except (BalancerdError, sqlite3.Error) as exc:
            log.error("reconcile failed (retried before the next cycle): %s", exc)
            return
        self._reconcile_due = False
        self.recorder.reconciliations(done)

    def _leadership_changed(self, state: Leadership) -> None:
        """From the coordinator's thread: a new leader reconciles and decides at once."""
        if state.leading:
            log.warning("leading node=%s token=%d", state.node, state.token)
            self._reconcile_due = True
            if self.scheduler.running:
                self.scheduler.modify_job("cycle", next_run_time=datetime.now().astimezone())
        else:
            log.warning("standing by node=%s: %s", state.node, state.reason)
        self._write_status("idle" if state.leading else "standby")

    def collect_job(self) -> None:
        with self.watchdog.job():
            self._collect_idle.clear()
            try:
                self.collect_once()
            except Exception:  # one failed job is logged once; the daemon goes on
                log.exception("collect failed")
            finally:
                self._collect_idle.set()

    def collect_once(self) -> Snapshot:
        with self._lock:
            hv, history, config = self.rt.hypervisor, self.rt.history, self.config
        sample = hv.sample_all()
        history.add(sample)
        snapshot = build_snapshot(
            history.samples(),
            window=history.window,
            # A host that is off reports nothing: plan with what it had when it was up.
            capacity=merge_capacity(self.known_capacity, capacity_from_config(config.hosts)),
            powered_off=self.power.powered_off(),
            dirty=history.dirty,
        )
        self._sample_dirty_rates(hv, history)
        for h in snapshot.hosts:
            if h.up:
                self.known_capacity[h.name] = Capacity(
                    cpus=h.cpus, mem_bytes=h.mem_bytes, core_speed_mhz=h.core_speed_mhz
                )
        now_s = self._clock()
        with self._power_lock:
            self.power.observe(snapshot, now_s)
            powered_off = set(self.power.powered_off())
        with self._lock:
            self.demand.record(snapshot, now_s)
            self.rt.snapshot = snapshot
            self._snapshot_at_mono = time.monotonic()
        self.stats.set_snapshot(snapshot)
        for h in snapshot.hosts:
            self.stats.set_host_power(h.name, h.name not in powered_off)
        self.heartbeat()
        up = sum(h.up for h in snapshot.hosts)
        if not self._ready_sent and up and len(history) >= 2:
            self._ready_sent = True
            self.notifier.ready(status=f"collecting: {up}/{len(snapshot.hosts)} hosts up")
            log.info("ready hosts_up=%d hosts=%d", up, len(snapshot.hosts))
        if not self._first_cycle_due and len(history) >= history.window:
            # The smoothing window is full: decide now, not a whole cycle interval later.
            self._first_cycle_due = True
            if self.scheduler.running:
                self.scheduler.modify_job("cycle", next_run_time=datetime.now().astimezone())
        self._write_status("idle")
        return snapshot

    def _sample_dirty_rates(self, hv: Hypervisor, history: SampleHistory) -> None:
        """Start the dirty-rate calculations due (a few guests per collect); the next
        samples carry their results. A failure only leaves that guest unmeasured."""
        if self.coord.not_leading():
            return  # a standby does not measure: the leader may be moving these guests
        # never a guest being moved: its domain job lock makes the call wait past the timeout
        moving = {m["vm"] for m in self.stats.summary()["in_flight"]}
        for vm, (host, seconds) in history.due_for_dirty_rate().items():
            if vm in moving:
                continue
            try:
                hv.start_dirty_rate(host, vm, seconds)
            except HypervisorError as exc:
                log.info("dirty rate not measured vm=%s host=%s error=%s", vm, host, exc)

    def cycle_job(self) -> None:
        self.cycle_once()

    def hold(self, plan_policy: str, *, approved: bool = False) -> Hold | None:
        """Re-checked before every move: why the rest of the plan must not start now.
        ``approved``: an operator approved the plan (recommend mode does not hold it)."""
        if self._stop:
            return Hold(SkipKind.STOPPING, "balancerd is stopping")
        not_leading = self.coord.not_leading()
        if not_leading:
            return Hold(SkipKind.NOT_LEADER, not_leading)
        paused = self.operator.paused()
        if paused is not None:
            return Hold(SkipKind.PAUSED, f"balancerd was paused by {paused.by}")
        active, policy = self.active()
        if active.frozen:
            return Hold(SkipKind.FREEZE, "a freeze window opened")
        if approved:
            return None
        if policy.name != plan_policy:
            return Hold(SkipKind.POLICY_CHANGED, f"the active policy is now {policy.name}")
        if policy.mode != "automatic":
            return Hold(SkipKind.RECOMMEND, f"policy {policy.name} is now in recommend mode")
        return None

    def cycle_once(self) -> CycleReport | None:
        """One decide-and-act cycle (never beside another, nor beside an approved plan);
        logged and counted, never raises."""
        with self._act_lock, self.watchdog.job():
            return self._cycle_once()

    def request_cycle(self) -> None:
        """Decide now, on a thread of its own (after the cycle that runs, if one does)."""
        with self._lock:
            if self._cycle_pending:
                return
            self._cycle_pending = True

        def run() -> None:
            with self._act_lock:  # wait for the running one to end
                pass
            with self._lock:
                self._cycle_pending = False
            self.cycle_once()

        threading.Thread(target=run, name="cycle-now", daemon=True).start()

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """The right to act (no cycle runs meanwhile), as a job the watchdog follows."""
        with self._act_lock, self.watchdog.job():
            self._cycle_idle.clear()
            try:
                yield
            finally:
                self._cycle_idle.set()

    def latest(self) -> Latest:
        """The latest snapshot and the last cycle's report, as one consistent view."""
        with self._lock:
            return Latest(
                self.rt.snapshot,
                self._snapshot_at_mono,
                self.rt.last_report,
                self.rt.last_inputs,
                self.rt.last_decided_at_s,
                self.rt.last_plan,
                self.rt.last_plan_at_s,
            )

    def fresh_snapshot(self) -> Snapshot:
        """A snapshot collected after this call began (an approved plan is checked on it)."""
        started = time.monotonic()
        if not self.scheduler.running:
            return self.collect_once()
        limit_s = STALE_SNAPSHOT_INTERVALS * self.config.collect_interval_s
        limit_s += self.config.host_timeout_s
        while time.monotonic() - started < limit_s and not self._stop:
            with self._lock:
                snapshot, at = self.rt.snapshot, self._snapshot_at_mono
            if snapshot is not None and at is not None and at > started:
                return snapshot
            self.heartbeat()
            time.sleep(0.2)
        raise StaleSnapshot(f"no collection of the hosts completed within {limit_s:.0f} s")

    def operator_changed(self) -> None:
        """After a drain, undrain, pause or resume: the status file shows it at once."""
        self._write_status(self._status_state)

    def _cycle_once(self) -> CycleReport | None:
        started_s = time.monotonic()
        report: CycleReport | None = None
        self._cycle_idle.clear()
        try:
            if self._stop:
                return None
            report = self._cycle()
        except BalancerdError as exc:  # an expected failure: one clear line
            log.error("cycle failed: %s", exc)
            self.stats.record_cycle(time.monotonic() - started_s, ok=False, error=str(exc))
        except Exception as exc:  # a bug: logged once with its traceback, counted, go on
            log.exception("cycle failed")
            self.stats.record_cycle(time.monotonic() - started_s, ok=False, error=str(exc))
        else:
            self.stats.record_cycle(time.monotonic() - started_s, ok=True)
        finally:
            self._cycle_idle.set()
            self.cycles_done += 1
            if self._max_cycles and self.cycles_done >= self._max_cycles:
                self.request_stop()
        return report

    def _cycle(self) -> CycleReport | None:
        not_leading = self.coord.not_leading()
        if not_leading:  # a standby collects and exports metrics, never acts
            log.info("cycle skipped: %s", not_leading)
            self._write_status("standby")
            self.notifier.status(f"standby: {not_leading}")
            return None
        with self._lock:
            snapshot = self.rt.snapshot
            taken_at = self._snapshot_at_mono
        if snapshot is None or taken_at is None or len(self.rt.history) < 2:
            log.info("cycle skipped: not enough samples yet")
            return None
        age_s = time.monotonic() - taken_at
        stale_s = STALE_SNAPSHOT_INTERVALS * self.config.collect_interval_s
        stale_s += self.config.host_timeout_s
        if age_s > stale_s:
            # Collection keeps failing: never plan (or power hosts off) from an old view.
            raise StaleSnapshot(f"the latest snapshot is {age_s:.0f} s old (limit {stale_s:.0f} s)")
        if self._reconcile_due or self.journal.open_entries():
            self._reconcile()
        active, policy = self.active()
        decided_at_s = time.time()
        policy = self.operator.apply_to(policy)  # hosts drained with `balancerd drain`
        # Selectors -> names on this snapshot: the plan, its explanations and the history
        # all read the same resolved policy.
        policy = resolve_policy(policy, snapshot)
        self.stats.set_policy(policy.name, policy.objective, policy.mode)
        self.stats.set_freeze(active.frozen)
        now_s = self._clock()
        self.notifier.status(f"planning with policy {policy.name}")
        with self._lock:
            # Plan with each guest's forecast demand (spec.forecast), act on the real snapshot.
            planning = self.demand.planning_snapshot(snapshot, policy.forecast, now_s)
        with self._lock:
            cycle_policy, backoff_notes = self.backoff.apply(policy, now_s)
        inputs = CycleInputs(
            snapshot=snapshot,
            planning=planning,
            policy=cycle_policy,
            notes=tuple(backoff_notes),
            active=active,
            last_moved_s=dict(self.rt.last_moved_s),
            now_s=now_s,
            at=datetime.now().astimezone().isoformat(timespec="seconds"),
            paused=self.operator.paused() is not None,
        )

        def on_plan(plan: Plan) -> None:
            with self._lock:
                self.rt.last_plan = plan
                self.rt.last_plan_at_s = decided_at_s
            self.recorder.plan(plan, policy)
            self.events.publish(
                f"plan {policy.name}: {len(plan.moves)} move(s)"
                + ("" if plan.moves else f" ({plan.reason or 'placement is already good'})")
            )

        report = run_cycle(inputs, _Actions(self), on_plan=on_plan)
        self.recorder.cycle(report)
        with self._lock:
            self.rt.last_report = report
            self.rt.last_inputs = inputs
            self.rt.last_decided_at_s = decided_at_s
        record_cycle(self.history, inputs, report, self.operator.drained(), at_s=decided_at_s)
        self._write_status("idle")
        self.notifier.status(report.status_line())
        return report

    def engine(self, policy: Policy) -> Engine:
        """The move engine for ``policy``, wired to the journal, watchdog and stats."""

        def on_start(move: Move, migration_id: str) -> None:
            self.recorder.move_started(move.vm, move.src, move.dst, migration_id)
            self._write_status("migrating")
            self.events.publish(f"{move.vm} {move.src}->{move.dst}: started (id {migration_id})")

        return Engine(
            hv=self.rt.hypervisor,
            mig=policy.migration,
            headroom_bytes=policy.limits.mem_headroom_bytes,
            journal=self.journal,
            heartbeat=self.heartbeat,
            progress=lambda _m, _s, _msg: self.heartbeat(),
            on_start=on_start,
            cancelled=lambda: "balancerd is stopping" if self._stop else self.coord.not_leading(),
        )

    def execute_plan(
        self, plan: Plan, policy: Policy, *, approved: bool = False
    ) -> list[MoveResult]:
        self.notifier.status(f"migrating {len(plan.moves)} guests ({policy.name})")
        engine = self.engine(policy)
        # Each move's end is recorded as it happens, so status and metrics follow the plan.
        finished: set[int] = set()

        def run(e: Engine, move: Move) -> MoveResult:
            r = run_move(e, move)
            if r.outcome is MoveOutcome.MIGRATED:
                self.rt.last_moved_s[r.vm] = self._clock()
            if r.dirty_rate_bytes_s is not None:  # what the migration measured
                self.rt.history.record_dirty_rate(r.vm, r.dirty_rate_bytes_s)
            with self._lock:
                self.backoff.record(r, self._clock())
            self.recorder.move_finished(r, policy.name)
            self.events.publish(r.line())
            finished.add(id(r))
            return r

        def hold() -> Hold | None:
            return self.hold(policy.name, approved=approved)

        results = execute(plan.moves, engine, run=run, hold=hold)
        for r in results:
            if id(r) not in finished:  # skipped by the executor itself (dependency, stopping)
                self.recorder.move_finished(r, policy.name)
                self.events.publish(r.line())
        return results

    def switch_power(
        self, plan: Plan, snapshot: Snapshot, policy: Policy, now_s: float, *, only_on: bool
    ) -> list[PowerResult]:
        with self._power_lock:
            decision = decide_power(
                plan,
                snapshot,
                policy.power,
                self.power.hosts,
                now_s,
                switchable=set(self.rt.drivers),
            )
            if only_on:
                decision = replace(decision, power_off=())
            if decision.empty:
                return []
            results = apply_power(
                decision,
                self.rt.drivers,
                self.power,
                now_s,
                still_empty=lambda host: self._still_empty(
                    host, policy.power.allow_off_with_stopped_guests
                ),
                fence=self._fence_power,
            )
            text = self.power.to_json(boot_id())
        atomic_write(Path(self.config.state_dir) / POWER_FILE, text)
        return results

    def _fence_power(self, host: str, action: str) -> str:
        """Right before a power switch: record it, fenced ("" if we may go on)."""
        try:
            self.coord.fence(f"power-{action}", host, {"policy": self.active()[1].name})
        except CoordinationError as exc:
            return str(exc)
        return ""

    def _still_empty(self, host: str, stopped_may_stay: bool = False) -> str:
        """Right before a power-off: what keeps ``host`` busy now ("" if nothing). Lists
        its domains again (running, and defined-but-stopped unless ``stopped_may_stay``:
        spec.power.allow_off_with_stopped_guests) and counts moves in flight."""
        if any(host in (m["src"], m["dst"]) for m in self.stats.summary()["in_flight"]):
            return "a migration in flight touches it"
        try:
            domains = self.rt.hypervisor.domains(host)
        except BalancerdError as exc:
            return f"cannot list its guests: {exc}"
        if stopped_may_stay:
            domains = {vm: st for vm, st in domains.items() if st not in STOPPED_STATES}
        if domains:
            listed = ", ".join(f"{vm} ({state})" for vm, state in sorted(domains.items()))
            return f"it holds {listed}"
        return ""

    def _backoff_status(self) -> list[dict[str, Any]]:
        now_s = self._clock()
        with self._lock:
            guests, pairs = self.backoff.active(now_s)
        out: list[dict[str, Any]] = [
            {"vm": vm, "to": None, "for_s": round(b.until_s - now_s), "reason": b.reason}
            for vm, b in sorted(guests.items())
        ]
        out += [
            {"vm": vm, "to": dst, "for_s": round(b.until_s - now_s), "reason": b.reason}
            for (vm, dst), b in sorted(pairs.items())
        ]
        return out

    def _write_status(self, state: str) -> None:
        self._status_state = state
        active, policy = self.active()
        report = self.rt.last_report
        try:
            write_daemon_status(
                self.config.state_dir,
                {
                    "state": "standby" if self.coord.not_leading() else state,
                    "policy": policy.name,
                    "objective": policy.objective,
                    "mode": policy.mode,
                    "frozen": active.frozen,
                    "last_cycle": {} if report is None else report.summary(),
                    "in_flight": self.stats.summary().get("in_flight", []),
                    "powered_off": list(self.power.powered_off()),
                    "backing_off": self._backoff_status(),
                    "coordination": self.coord.leadership().to_json(),
                    **self.operator.to_json(),  # drains and pause (balancerd drain / pause)
                    "control_socket": None if self.control is None else str(self.control.path),
                },
            )
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc)


@dataclass(frozen=True)
class Latest:
    snapshot: Snapshot | None
    taken_at_mono: float | None  # when the snapshot was taken (monotonic)
    report: CycleReport | None
    inputs: CycleInputs | None  # what the report was decided on
    decided_at_s: float  # wall clock: when the report's policy and drains were read
    plan: Plan | None = None  # the latest plan: the report's, or the running cycle's
    plan_at_s: float = 0.0


class StaleSnapshot(BalancerdError):
    """The latest good snapshot is too old to plan from."""


class _Actions(CycleActions):
    """The daemon's executor and power switch, as a cycle sees them."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def execute(self, plan: Plan, policy: Policy) -> list[MoveResult]:
        return self._d.execute_plan(plan, policy)

    def switch_power(
        self, plan: Plan, snapshot: Snapshot, policy: Policy, now_s: float, *, only_on: bool
    ) -> list[PowerResult]:
        return self._d.switch_power(plan, snapshot, policy, now_s, only_on=only_on)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _load_tracker(path: Path, now_s: float) -> PowerTracker:
    try:
        return PowerTracker.from_json(path.read_text(), boot_id(), now_s)
    except FileNotFoundError:
        return PowerTracker()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("power state %s unreadable (%s): starting without it", path, exc)
        return PowerTracker()


def _open_history(state_dir: Path) -> History | None:
    try:
        return History(state_dir / HISTORY_FILE)
    except (OSError, sqlite3.Error) as exc:
        log.error("no history in %s (decisions are not recorded): %s", state_dir, exc)
        return None


def _libvirt_hypervisor(config: Config) -> Hypervisor:
    from balancerd.wiring import open_hypervisor

    return open_hypervisor(config)
