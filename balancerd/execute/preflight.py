"""Preflight checks before one move: the live-migration requirements, checked, not assumed.

``check()`` is pure: facts in, the first problem out. ``preflight()`` gathers the facts
through the Hypervisor protocol (destination facts are read *now*, not from a snapshot),
cheapest first, and stops at the first refusal: the guest on its source and the checks
that need nothing else (``source_refusal``: state, job, cache modes), then everything on
the destination in one call (one connection, one timeout), then the source host. A
refused guest with a writeback disk never touches the destination. Each step's time is
in ``PreflightResult.timings``. A failed check skips the step; nothing is attempted.

Decisions documented here:
  * cache mode: ``none`` and ``directsync`` pass (both bypass the host page cache, the
    modes libvirt itself treats as migration-safe). Read-only disks (cdroms, read-only
    images) are exempt from the cache check: nothing is written through them. They are NOT
    exempt from the path check: the destination QEMU must open them too. Empty cdrom
    drives (no path) and network disks (no local path) are not path-checked.
  * interfaces: ``network`` must be an active libvirt network on the destination,
    ``bridge`` a bridge device there; ``direct``/``user``/other are not checked (the
    protocol has no facts for them).
  * memory: destination free memory now >= guest memory + the policy's per-host headroom.
  * a guest no longer on the source (moved by an operator) is skipped, never failed.
  * a device that blocks migration (host device, mdev, shmem, virtiofs, a non-migratable
    CPU: hypervisor/libvirt.py migration_blockers) refuses the move as ``unmovable``;
    local disks and CD-ROMs are left to the path check (the destination may have them).
  * TLS (``spec.migration.tls``): the stream is encrypted when the source can send
    (QEMU's ca-cert.pem) and the destination receive (ca-cert.pem, server-cert.pem,
    server-key.pem in /etc/pki/qemu) a TLS stream. ``required`` refuses a move between
    hosts that cannot; ``auto`` sends it in clear text then, with a warning; ``disabled``
    never encrypts.
  * post-copy (``on_stall: postcopy``): both hosts must be able to take part (libvirt >=
    8.5 for recovery, QEMU >= 2.6, and QEMU must get a userfaultfd: see
    hypervisor/libvirt.py); where one cannot, the move is not refused: its last rung is
    pause-and-complete instead, and the result says why.
  * compression: the method must be one both hosts' libvirt accepts; zstd/zlib compress
    per connection (multifd) and need ``parallel_connections >= 2``. Otherwise the stream
    goes uncompressed, with the reason in the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from balancerd.errors import HypervisorError
from balancerd.hypervisor.base import DomainFacts, HostFacts, Hypervisor
from balancerd.model import Move, blockers_text
from balancerd.outcomes import BlockerKind, SkipKind
from balancerd.policy.model import Migration, MigrationCompression, MigrationTls, OnStall
from balancerd.units import MIB

log = logging.getLogger(__name__)

SAFE_CACHE_MODES = ("none", "directsync")
# Judged by the disk path check below (the destination may have the file after all)
STORAGE_BLOCKERS = (BlockerKind.LOCAL_DISK, BlockerKind.HOST_CDROM)
MIGRATABLE_STATES = ("running", "paused")


@dataclass(frozen=True)
class Refusal:
    """Why preflight refuses a step: a bounded kind and the message for the operator."""

    kind: SkipKind
    reason: str  # e.g. "disk /x.qcow2 not found on host2"


# The steps of one preflight, in the order they run (see preflight()).
STEP_SOURCE_GUEST = "source guest"  # guest state + definition on the source
STEP_SOURCE_CHECKS = "source checks"  # state, job, cache modes (pure)
STEP_DESTINATION = "destination"  # host, CPU, disk paths, name taken: one call
STEP_SOURCE_HOST = "source host"  # versions, certificates, host identity
STEP_HOST_CHECKS = "host checks"  # same host, versions, TLS, CPU, disks, NICs, memory (pure)


@dataclass(frozen=True)
class CheckTiming:
    check: str  # one of the STEP_* names
    elapsed_s: float


@dataclass(frozen=True)
class PreflightResult:
    ok: bool
    reason: str = ""  # why the step is skipped, e.g. "disk /x.qcow2 not found on host2"
    facts: DomainFacts | None = None  # the guest as found on the source
    kind: SkipKind | None = None  # set when not ok
    tls: bool = False  # encrypt the migration stream (VIR_MIGRATE_TLS)
    postcopy: bool = False  # both hosts can take part in a post-copy
    compression: str = ""  # the VIR_MIGRATE_PARAM_COMPRESSION method ("": uncompressed)
    notes: tuple[str, ...] = ()  # what was asked for and not used, and why
    timings: tuple[CheckTiming, ...] = ()  # per step, in the order run

    @classmethod
    def refused(cls, refusal: Refusal, facts: DomainFacts | None = None) -> PreflightResult:
        return cls(False, refusal.reason, facts, refusal.kind)


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def use_tls(mig: Migration, src: HostFacts, dst: HostFacts) -> bool:
    """Whether the move's stream is encrypted (see the module doc)."""
    if mig.tls is MigrationTls.DISABLED:
        return False
    if mig.tls is MigrationTls.REQUIRED:
        return True
    return src.migration_tls_client and dst.migration_tls_server


def tls_refusal(mig: Migration, src: HostFacts, dst: HostFacts) -> Refusal | None:
    """Why an encrypted stream cannot be sent from src to dst when the policy requires one."""
    if mig.tls is not MigrationTls.REQUIRED:
        return None
    if not dst.migration_tls_server:
        return Refusal(
            SkipKind.TLS,
            f"{dst.name} has no server certificate for TLS migration (ca-cert.pem, "
            "server-cert.pem, server-key.pem in /etc/pki/qemu) and spec.migration.tls "
            "is required",
        )
    if not src.migration_tls_client:
        return Refusal(
            SkipKind.TLS,
            f"{src.name} has no CA certificate for TLS migration (ca-cert.pem in "
            "/etc/pki/qemu) and spec.migration.tls is required",
        )
    return None


def postcopy_problem(mig: Migration, src: HostFacts, dst: HostFacts) -> str:
    """Why this move cannot switch to post-copy ("" if it can, or the policy does not ask)."""
    if mig.on_stall != OnStall.POSTCOPY:
        return ""
    for h in (src, dst):
        if h.postcopy_problem:
            return f"post-copy unavailable on {h.name}: {h.postcopy_problem}"
    return ""


def compression_choice(mig: Migration, src: HostFacts, dst: HostFacts) -> tuple[str, str]:
    """(method, why not) for the stream: ("", "") when the policy asks for none."""
    method = str(mig.compression)
    if mig.compression == MigrationCompression.NONE:
        return "", ""
    if method in ("zstd", "zlib") and mig.parallel_connections < 2:
        return "", f"compression {method} needs parallel_connections >= 2: uncompressed"
    for h in (src, dst):
        if method not in h.compression_methods:
            offered = ", ".join(h.compression_methods) or "none"
            return "", f"{h.name} does not offer compression {method} ({offered}): uncompressed"
    return method, ""


def source_refusal(move: Move, facts: DomainFacts, mig: Migration) -> Refusal | None:
    """The checks that need only the guest as read on its source, cheapest first: they
    run before anything is asked of the destination (a refusal here never touches it)."""
    if facts.state not in MIGRATABLE_STATES:
        return Refusal(SkipKind.NOT_RUNNING, f"guest is {facts.state}, not running")
    if facts.in_job:
        return Refusal(SkipKind.IN_JOB, "guest is already in a job (another migration or save?)")
    devices = [b for b in facts.blockers if b.kind not in STORAGE_BLOCKERS]
    if devices:
        return Refusal(SkipKind.UNMOVABLE, f"cannot live-migrate: {blockers_text(tuple(devices))}")
    for disk in facts.disks:
        if (
            disk.cache not in SAFE_CACHE_MODES
            and not disk.readonly
            and move.vm not in mig.unsafe_cache_vms
        ):
            return Refusal(
                SkipKind.CACHE_MODE,
                (
                    f"disk {disk.path or disk.target} has cache='{disk.cache}' (must be 'none'; "
                    f"list the guest in unsafe_cache_vms to accept the risk)"
                ),
            )
    return None


def check(
    move: Move,
    facts: DomainFacts,
    src: HostFacts,
    dst: HostFacts,
    *,
    mig: Migration,
    headroom_bytes: int,
    cpu_ok: bool,
    path_visible: Mapping[str, bool],
) -> Refusal | None:
    """The first failed requirement for ``move``, or None when every check passes."""
    vm, d = move.vm, move.dst
    first = source_refusal(move, facts, mig)
    if first is not None:
        return first
    if src.name == dst.name or (src.host_uuid and src.host_uuid == dst.host_uuid):
        return Refusal(
            SkipKind.SAME_HOST,
            f"source and destination are the same host ({src.name} uuid {src.host_uuid})",
        )
    if src.hostname and src.hostname == dst.hostname:
        return Refusal(
            SkipKind.SAME_HOST, f"{src.name} and {d} report the same host name {src.hostname!r}"
        )
    if not mig.allow_backward:
        if dst.libvirt_version < src.libvirt_version:
            return Refusal(
                SkipKind.VERSION,
                (
                    f"libvirt on {d} ({_version(dst.libvirt_version)}) is older than on "
                    f"{src.name} ({_version(src.libvirt_version)}); allow_backward is off"
                ),
            )
        if dst.hypervisor_version < src.hypervisor_version:
            return Refusal(
                SkipKind.VERSION,
                (
                    f"QEMU on {d} ({_version(dst.hypervisor_version)}) is older than on "
                    f"{src.name} ({_version(src.hypervisor_version)}); allow_backward is off"
                ),
            )
    tls = tls_refusal(mig, src, dst)
    if tls is not None:
        return tls
    if not cpu_ok:
        return Refusal(SkipKind.CPU_INCOMPATIBLE, f"guest CPU model is not compatible with {d}")
    copy_storage = vm in mig.copy_storage_vms
    for disk in facts.disks:
        if disk.path and not copy_storage and not path_visible.get(disk.path, False):
            return Refusal(SkipKind.DISK_MISSING, f"disk {disk.path} not found on {d}")
    for iface in facts.interfaces:
        if iface.kind == "network" and iface.source not in dst.networks:
            return Refusal(SkipKind.NETWORK, f"network {iface.source!r} not active on {d}")
        if iface.kind == "bridge" and iface.source not in dst.bridges:
            return Refusal(SkipKind.NETWORK, f"bridge {iface.source!r} not found on {d}")
    need = facts.mem_bytes + headroom_bytes
    if dst.mem_free_bytes < need:
        return Refusal(
            SkipKind.NO_MEMORY,
            (
                f"{d} has {dst.mem_free_bytes / MIB:.0f} MiB free, needs "
                f"{facts.mem_bytes / MIB:.0f} MiB + {headroom_bytes / MIB:.0f} MiB headroom"
            ),
        )
    return None


class _Timer:
    """Per-step wall time of one preflight (I/O side: the clock lives here, not in check)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last = clock()
        self.steps: list[CheckTiming] = []

    def lap(self, step: str) -> None:
        now = self._clock()
        self.steps.append(CheckTiming(step, now - self._last))
        self._last = now


def preflight(
    hv: Hypervisor,
    move: Move,
    mig: Migration,
    headroom_bytes: int,
    clock: Callable[[], float] = time.monotonic,
) -> PreflightResult:
    """Gather the facts for ``move`` from the hosts and check them, cheapest first: the
    guest on its source (one call), then the destination (one call: one connection, one
    timeout), then the source host; it stops at the first refusal. Each step's time is in
    the result's ``timings`` (and logged at debug level)."""
    t = _Timer(clock)
    result = _preflight(hv, move, mig, headroom_bytes, t)
    result = replace(result, timings=tuple(t.steps))
    log.debug(
        "preflight vm=%s src=%s dst=%s ok=%s %s",
        move.vm,
        move.src,
        move.dst,
        result.ok,
        " ".join(f"{c.check.replace(' ', '_')}={c.elapsed_s:.3f}s" for c in result.timings),
    )
    return result


def _preflight(
    hv: Hypervisor, move: Move, mig: Migration, headroom_bytes: int, t: _Timer
) -> PreflightResult:
    vm, s, d = move.vm, move.src, move.dst
    if s == d:
        return PreflightResult.refused(
            Refusal(SkipKind.SAME_HOST, f"source and destination are the same host ({s})")
        )
    try:
        src_state = hv.domain_state(s, vm)
        facts = hv.domain_facts(s, vm) if src_state is not None else None
    except HypervisorError as exc:
        return PreflightResult.refused(
            Refusal(SkipKind.HOST_DOWN, f"source {s} does not answer: {exc.detail}")
        )
    finally:
        t.lap(STEP_SOURCE_GUEST)
    if facts is None:
        where = ""
        try:
            if hv.domain_state(d, vm) is not None:
                where = f" (already on {d})"
        except HypervisorError:
            pass
        return PreflightResult.refused(Refusal(SkipKind.GONE, f"guest is no longer on {s}{where}"))
    first = source_refusal(move, facts, mig)
    t.lap(STEP_SOURCE_CHECKS)
    if first is not None:
        return PreflightResult.refused(first, facts)
    paths = () if vm in mig.copy_storage_vms else tuple(k.path for k in facts.disks if k.path)
    try:
        dst_facts = hv.destination_facts(d, vm, facts.cpu_xml, facts.virt_type, paths)
    except HypervisorError as exc:
        return PreflightResult.refused(
            Refusal(SkipKind.HOST_DOWN, f"destination {d} does not answer: {exc.detail}"), facts
        )
    finally:
        t.lap(STEP_DESTINATION)
    if dst_facts.existing_state is not None:
        return PreflightResult.refused(
            Refusal(
                SkipKind.NAME_TAKEN,
                f"a domain named {vm} already exists on {d} ({dst_facts.existing_state})",
            ),
            facts,
        )
    try:
        src = hv.host_facts(s)
    except HypervisorError as exc:
        return PreflightResult.refused(
            Refusal(SkipKind.HOST_DOWN, f"source {s} does not answer: {exc.detail}"), facts
        )
    finally:
        t.lap(STEP_SOURCE_HOST)
    dst = dst_facts.host
    problem = check(
        move,
        facts,
        src,
        dst,
        mig=mig,
        headroom_bytes=headroom_bytes,
        cpu_ok=dst_facts.cpu_ok,
        path_visible=dict(dst_facts.path_visible),
    )
    t.lap(STEP_HOST_CHECKS)
    if problem is not None:
        return PreflightResult.refused(problem, facts)
    tls = use_tls(mig, src, dst)
    if not tls and mig.tls is MigrationTls.AUTO:
        log.warning(
            "migration stream in clear text vm=%s src=%s dst=%s tls_send=%s tls_receive=%s",
            vm,
            s,
            d,
            src.migration_tls_client,
            dst.migration_tls_server,
        )
    notes = []
    pc_problem = postcopy_problem(mig, src, dst)
    if pc_problem:
        notes.append(pc_problem + ": pause-and-complete instead")
        log.warning("no post-copy vm=%s src=%s dst=%s: %s", vm, s, d, pc_problem)
    method, why_not = compression_choice(mig, src, dst)
    if why_not:
        notes.append(why_not)
        log.warning("compression not used vm=%s src=%s dst=%s: %s", vm, s, d, why_not)
    return PreflightResult(
        True,
        "",
        facts,
        tls=tls,
        postcopy=mig.on_stall == OnStall.POSTCOPY and not pc_problem,
        compression=method,
        notes=tuple(notes),
    )


def preflight_stopped(hv: Hypervisor, move: Move) -> PreflightResult:
    """A stopped guest's move (its definition only): it must still be defined and shut off
    on the source, its name free on the destination, and every disk path visible there
    (it will start there from the same files)."""
    vm, s, d = move.vm, move.src, move.dst
    try:
        src_state = hv.domain_state(s, vm)
        on_dst = hv.domain_state(d, vm)
    except HypervisorError as exc:
        return PreflightResult.refused(
            Refusal(SkipKind.HOST_DOWN, f"{exc.host} does not answer: {exc.detail}")
        )
    if src_state is None:
        where = f" (already on {d})" if on_dst is not None else ""
        return PreflightResult.refused(Refusal(SkipKind.GONE, f"guest is no longer on {s}{where}"))
    if src_state != "shutoff":
        return PreflightResult.refused(
            Refusal(SkipKind.STALE, f"guest is {src_state} now, not stopped: moved live if at all")
        )
    if on_dst is not None:
        return PreflightResult.refused(
            Refusal(SkipKind.NAME_TAKEN, f"a domain named {vm} already exists on {d} ({on_dst})")
        )
    try:
        facts = hv.domain_facts(s, vm)
        missing = [k.path for k in facts.disks if k.path and not hv.path_visible(d, k.path)]
    except HypervisorError as exc:
        return PreflightResult.refused(Refusal(SkipKind.HOST_DOWN, f"could not read facts: {exc}"))
    if missing:
        return PreflightResult.refused(
            Refusal(SkipKind.DISK_MISSING, f"disk {missing[0]} not found on {d}"), facts
        )
    return PreflightResult(True, "", facts)
