"""Start-up settlement: every journal entry without an outcome is settled so the guest runs
on exactly one host.

A process that died mid-migration leaves one of these behind (peer-to-peer jobs go on
inside the source libvirtd without their client; the destination meanwhile lists the
incoming domain as paused). First any job still running on the source is aborted and
waited for; then the guest's state on source and destination decides:

  source    destination   action
  running   running       destroy the destination copy (a running source wins)
  running   paused        destroy the destination copy (leftover incoming domain)
  paused    running       destroy the source copy (the destination finished)
  paused    paused        destroy the destination copy, resume the source
  paused    absent        resume the source (we left it paused)
  absent    paused        resume the destination; if it is still an incoming job, leave
                          it alone and the entry open (settled at the next look)
  one running, the other absent: nothing to do.
  defined on both, one shut off (a stopped guest's move half done): the shut-off copy is
                          undefined; both shut off: the source's (the destination keeps it).

A guest in post-copy is never destroyed on either host nor resumed on the source: its
newest state is on the destination, the rest of its memory on the source. An active
post-copy job is waited for (libvirt refuses to abort it); a failed one (both ends paused
in libvirt's post-copy-failed state) is left alone and the entry stays open: only a
recovery (VIR_MIGRATE_POSTCOPY_RESUME, which the move engine attempts) can finish it.

"Resume" only where the guest was running before we started. Every settlement is
logged, written to the journal and returned (the daemon counts them in a metric).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from balancerd.errors import HypervisorError
from balancerd.execute.journal import JournalStore
from balancerd.hypervisor.base import Hypervisor
from balancerd.outcomes import ReconcileOutcome

log = logging.getLogger(__name__)

ALIVE_STATES = ("running", "paused", "blocked")
JOB_END_WAIT_S = 120.0
# An open entry older than this never resumes a paused guest (it may be paused on purpose).
MAX_RESUME_AGE_S = 3600.0


@dataclass(frozen=True)
class Reconciliation:
    vm: str
    src: str
    dst: str
    actions: tuple[str, ...]  # what was done; () when the guest was already on one host
    detail: str  # where the guest runs now, or why it could not be settled
    settled: bool  # False: a host did not answer; the entry stays open for next time
    entry_id: int | None = None  # the journal entry
    migration_id: str = ""

    @property
    def outcome(self) -> ReconcileOutcome:
        if not self.settled:
            return ReconcileOutcome.UNKNOWN
        return ReconcileOutcome.SETTLED if self.actions else ReconcileOutcome.CLEANED


def _alive(state: str | None) -> str | None:
    """The state if the domain is there and running or paused; None if absent or off."""
    return state if state in ALIVE_STATES else None


def _end_job(
    hv: Hypervisor, host: str, vm: str, heartbeat: Callable[[], None], wait_s: float
) -> list[str]:
    """Abort a migration job still running on ``host`` and wait for it to end."""
    stats = hv.job_stats(host, vm)
    if stats is None or not stats.active:
        return []
    actions = []
    try:
        hv.abort_job(host, vm)
        actions.append(f"aborted the orphaned migration job of {vm} on {host}")
    except HypervisorError as exc:
        # A job in its completion phase cannot be aborted; it ends by itself.
        log.info("abort of orphaned job failed (completing?) vm=%s host=%s: %s", vm, host, exc)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        heartbeat()
        if hv.domain_state(host, vm) is None:
            return actions  # the job completed: the guest left ``host`` (no job to read)
        stats = hv.job_stats(host, vm)
        if stats is None or not stats.active:
            return actions
        time.sleep(1.0)
    raise HypervisorError(
        host, f"wait for the job of {vm} to end", f"still running after {wait_s:.0f} s"
    )


def settle(
    hv: Hypervisor,
    vm: str,
    src: str,
    dst: str,
    *,
    was_running: bool,
    heartbeat: Callable[[], None] = lambda: None,
    wait_s: float = JOB_END_WAIT_S,
    vm_uuid: str = "",
) -> tuple[list[str], str]:
    """Make ``vm`` run on exactly one of ``src``/``dst``; returns (actions, where it runs).
    With ``vm_uuid``, a domain of that name but another UUID is someone else's guest (e.g.
    recreated under the same name): it is never destroyed or resumed."""
    actions: list[str] = []

    def state(host: str) -> str | None:
        st = hv.domain_state(host, vm)
        if st is not None and vm_uuid:
            uuid = hv.domain_facts(host, vm).uuid
            if uuid and uuid != vm_uuid:
                actions.append(f"left {vm} on {host} alone: uuid {uuid}, not {vm_uuid}")
                return None
        return st

    if state(src) not in (None, "shutoff"):
        actions += _end_job(hv, src, vm, heartbeat, wait_s)
    actions += _one_definition(hv, vm, src, dst, state(src), state(dst))
    for host in (src, dst):
        if hv.domain_state(host, vm) is not None and hv.postcopy_state(host, vm) == "failed":
            raise HypervisorError(
                host,
                f"settle {vm}",
                f"a failed post-copy {src}->{dst}: the guest's memory is split between both "
                "hosts; neither copy is destroyed or resumed: recover it with `virsh migrate "
                "--postcopy --postcopy-resume` (left open)",
            )
    s = _alive(state(src))
    d = _alive(state(dst))
    if d == "paused" and s is None:
        # A paused destination without a source: an incoming job must end first.
        stats = hv.job_stats(dst, vm)
        if stats is not None and stats.active:
            # Not settled: the entry stays open for the next look. Closed now, nobody would
            # resume the guest should the job end with it paused.
            raise HypervisorError(
                dst, f"settle {vm}", "an incoming migration with no source; left alone"
            )
    if s and d:
        if s == "paused" and d != "paused":
            hv.destroy(src, vm)
            actions.append(f"destroyed the paused copy on {src} ({dst} runs it)")
            s = None
        else:
            hv.destroy(dst, vm)
            actions.append(f"destroyed the {d} copy on {dst} ({src} keeps it)")
            d = None
    if s == "paused" and was_running:
        hv.resume(src, vm)
        actions.append(f"resumed on {src}")
        s = "running"
    elif d == "paused" and was_running:
        hv.resume(dst, vm)
        actions.append(f"resumed on {dst}")
        d = "running"
    if s:
        where = f"{vm} is {s} on {src}"
    elif d:
        where = f"{vm} is {d} on {dst}"
    else:
        where = _where_stopped(hv, vm, src, dst)
    return list(dict.fromkeys(actions)), where  # state() may say "left alone" twice


def _one_definition(
    hv: Hypervisor, vm: str, src: str, dst: str, on_src: str | None, on_dst: str | None
) -> list[str]:
    """Defined on both hosts with one copy shut off (a stopped guest's move half done, or
    a definition left behind): the shut-off copy goes; both shut off, the source's (the
    destination's is the move's aim)."""
    if on_src is None or on_dst is None or "shutoff" not in (on_src, on_dst):
        return []
    drop = src if on_src == "shutoff" else dst
    hv.destroy(drop, vm)
    return [f"undefined the shut-off copy on {drop}"]


def _where_stopped(hv: Hypervisor, vm: str, src: str, dst: str) -> str:
    defined = [h for h in (src, dst) if hv.domain_state(h, vm) is not None]
    if len(defined) == 1:
        return f"{vm} is defined on {defined[0]}, not running"
    return f"{vm} found on neither {src} nor {dst}"


def reconcile(
    hv: Hypervisor,
    journal: JournalStore,
    *,
    heartbeat: Callable[[], None] = lambda: None,
    wait_s: float = JOB_END_WAIT_S,
    in_flight: Collection[str] = (),
    now_s: float | None = None,
) -> list[Reconciliation]:
    """Settle every open journal entry whose process is gone (or that this process holds
    but no longer runs: not in ``in_flight``, a set of migration IDs). Call at start-up
    and between cycles. An entry older than MAX_RESUME_AGE_S never resumes a guest: an
    operator may have paused it on purpose since."""
    done: list[Reconciliation] = []
    now_s = time.time() if now_s is None else now_s
    for entry in journal.open_entries():
        if entry.migration_id and entry.migration_id in in_flight:
            continue
        if journal.owner_alive(entry):
            log.info("migration in progress in pid %d, not touched vm=%s", entry.pid, entry.vm)
            continue
        too_old = now_s - entry.started_at > MAX_RESUME_AGE_S
        was_running = entry.vm_state != "paused" and not too_old
        if too_old:
            log.warning(
                "reconcile: entry of %s is %.0f h old: nothing will be resumed",
                entry.vm,
                (now_s - entry.started_at) / 3600,
                extra={"VM": entry.vm, "MIGRATION_ID": entry.migration_id},
            )
        try:
            actions, where = settle(
                hv,
                entry.vm,
                entry.src,
                entry.dst,
                was_running=was_running,
                heartbeat=heartbeat,
                wait_s=wait_s,
                vm_uuid=entry.vm_uuid,
            )
        except HypervisorError as exc:
            r = Reconciliation(
                entry.vm,
                entry.src,
                entry.dst,
                (),
                f"not settled: {exc}",
                False,
                entry.id,
                entry.migration_id,
            )
            log.warning(
                "reconcile: migration %s %s->%s from pid %d not settled: %s",
                entry.vm,
                entry.src,
                entry.dst,
                entry.pid,
                exc,
                extra={"VM": entry.vm, "MIGRATION_ID": entry.migration_id},
            )
            done.append(r)
            continue
        detail = "; ".join([*actions, where])
        journal.finish(entry.id, "settled", detail=detail)
        journal.record_reconciliation(entry.id, entry.vm, ", ".join(actions) or "none", where)
        log.warning(
            "reconcile: unfinished migration %s %s->%s (phase %s, pid %d): %s",
            entry.vm,
            entry.src,
            entry.dst,
            entry.phase,
            entry.pid,
            detail,
            extra={"VM": entry.vm, "MIGRATION_ID": entry.migration_id},
        )
        done.append(
            Reconciliation(
                entry.vm,
                entry.src,
                entry.dst,
                tuple(actions),
                where,
                True,
                entry.id,
                entry.migration_id,
            )
        )
    return done
