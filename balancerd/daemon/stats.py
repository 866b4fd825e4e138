"""Cycle reports, move results and reconciliations -> metrics and one log line each."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from balancerd.daemon.cycle import CycleReport
from balancerd.execute.move import MoveResult
from balancerd.execute.reconcile import Reconciliation
from balancerd.metrics import DaemonStats
from balancerd.model import Plan
from balancerd.outcomes import MoveOutcome, PowerAction, SkipKind, fallback_of
from balancerd.policy.model import Policy

log = logging.getLogger(__name__)


class StatsRecorder:
    def __init__(self, stats: DaemonStats) -> None:
        self.stats = stats

    def plan(self, plan: Plan, policy: Policy) -> None:
        self.stats.set_plan(plan)
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

    def move_started(self, vm: str, src: str, dst: str, migration_id: str) -> None:
        self.stats.migration_started(vm, src, dst, migration_id)

    def move_finished(self, r: MoveResult, policy: str) -> None:
        """One move's end: its counter, histograms, fallback or skip kind, and a log line."""
        if r.outcome is MoveOutcome.MIGRATED:
            fallback = fallback_of(r.mode)
            if fallback is not None:
                self.stats.record_fallback(fallback)
            self.stats.migration_finished(
                r.vm,
                r.mode,
                r.outcome,
                duration_s=r.seconds,
                downtime_s=(r.downtime_ms or 0.0) / 1000.0,
                predicted_s=r.predicted_s,
            )
        else:
            if r.outcome is MoveOutcome.SKIPPED:
                self.stats.record_skip(r.skip_kind or SkipKind.OTHER)
            self.stats.migration_finished(r.vm, r.mode, r.outcome)
        log.info(
            "move vm=%s %s->%s result=%s mode=%s seconds=%.1f id=%s reason=%s",
            r.vm,
            r.src,
            r.dst,
            r.outcome,
            r.mode,
            r.seconds,
            r.migration_id or "-",
            r.reason,
            extra={
                "VM": r.vm,
                "HOST": r.dst,
                "POLICY": policy,
                "MIGRATION_ID": r.migration_id,
            },
        )

    def cycle(self, report: CycleReport) -> None:
        """What a finished cycle adds beyond its moves (recorded as they ended)."""
        if report.held_back is not None:
            why = {
                SkipKind.FREEZE: "freeze window",
                SkipKind.PAUSED: "paused by an operator",
            }.get(report.held_back, "recommend mode")
            log.info(
                "plan not executed (%s) policy=%s moves=%d",
                why,
                report.policy,
                len(report.plan.moves),
                extra={"POLICY": report.policy},
            )
            for _move in report.plan.moves:
                self.stats.record_skip(report.held_back)
        for p in report.power:
            self.stats.record_power_action(PowerAction(p.action), p.ok)
            if p.ok:
                log.info("power %s host=%s", p.action, p.host, extra={"HOST": p.host})
            else:
                log.error("power %s host=%s failed: %s", p.action, p.host, p.error)

    def reconciliations(self, done: Iterable[Reconciliation]) -> None:
        for r in done:
            self.stats.record_reconciliation(r.outcome)
