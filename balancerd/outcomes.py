"""Typed outcomes shared by execute/, the daemon, the CLI and metrics.

Every value here is also a Prometheus label value (lower case, no free text), so the
metrics declare their label sets from these enums and a new outcome cannot drift from
what the dashboard and alerts query.
"""

from __future__ import annotations

import enum
import uuid


class MoveOutcome(enum.StrEnum):
    """What became of one planned move."""

    MIGRATED = "migrated"
    SKIPPED = "skipped"  # nothing was attempted (preflight, dependency, freeze, ...)
    FAILED = "failed"  # attempted; the guest still runs on exactly one host


class MigrationMode(enum.StrEnum):
    """How a move was finally carried out (recorded per move)."""

    LIVE = "live"
    LIVE_DOWNTIME_RAISE = "live-downtime-raise"
    AUTO_CONVERGE = "auto-converge"
    PAUSED_FALLBACK = "paused-fallback"  # pause-and-complete after a stall
    OFFLINE = "offline"  # cold: paused while all memory is sent
    POSTCOPY = "postcopy"  # switched to post-copy after a stall: runs on the destination at once
    DEFINITION = "definition"  # a stopped guest's definition moved (VIR_MIGRATE_OFFLINE)
    NONE = "none"  # nothing was attempted (skipped) or nothing completed


class FallbackKind(enum.StrEnum):
    """A live migration that did not finish live."""

    PAUSE = "pause"  # pause-and-complete
    OFFLINE = "offline"  # a cold migration after the live one failed
    POSTCOPY = "postcopy"  # switched to post-copy after a stall


def fallback_of(mode: MigrationMode) -> FallbackKind | None:
    if mode is MigrationMode.PAUSED_FALLBACK:
        return FallbackKind.PAUSE
    if mode is MigrationMode.OFFLINE:
        return FallbackKind.OFFLINE
    if mode is MigrationMode.POSTCOPY:
        return FallbackKind.POSTCOPY
    return None


class SkipKind(enum.StrEnum):
    """Why a step was skipped (bounded; the message says the rest)."""

    SAME_HOST = "same-host"
    NOT_RUNNING = "not-running"
    IN_JOB = "in-job"
    VERSION = "version"
    CPU_INCOMPATIBLE = "cpu-incompatible"
    DISK_MISSING = "disk-missing"
    CACHE_MODE = "cache-mode"
    NETWORK = "network"
    NO_MEMORY = "no-memory"
    TLS = "tls"  # spec.migration.tls required, a host lacks the certificates for it
    GONE = "gone"  # the guest is no longer on the source
    NAME_TAKEN = "name-taken"  # a domain of that name is already on the destination
    HOST_DOWN = "host-down"  # a host does not answer
    DEPENDENCY = "dependency"  # an earlier move it depended on did not happen
    STOPPING = "stopping"  # the daemon is stopping
    FREEZE = "freeze"  # a freeze window is open
    RECOMMEND = "recommend"  # the policy only recommends
    POLICY_CHANGED = "policy-changed"  # another policy became active mid-plan
    JOURNAL = "journal"  # the intent could not be recorded (state directory full?)
    PAUSED = "paused"  # an operator paused balancerd (`balancerd pause`)
    STALE = "stale"  # a saved plan's step no longer fits (rules or capacity changed since)
    NOT_LEADER = "not-leader"  # another instance leads, or our leader lease lapsed (etcd)
    UNMOVABLE = "unmovable"  # the guest has a device or disk that blocks migration
    OTHER = "other"


class BlockerKind(enum.StrEnum):
    """Why a guest cannot be live-migrated (read from its domain XML by the adapter)."""

    HOSTDEV = "hostdev"  # PCI/USB/SCSI passthrough (<hostdev>)
    MDEV = "mdev"  # a mediated device (vGPU, <hostdev type='mdev'>)
    LOCAL_DISK = "local-disk"  # a disk outside the storage the config declares shared
    HOST_CDROM = "host-cdrom"  # a CD-ROM/floppy with a host file or device outside it
    SHMEM = "shmem"  # <shmem> (ivshmem): QEMU cannot migrate it
    VIRTIOFS = "virtiofs"  # <filesystem> with driver virtiofs (libvirt refuses before 10.x)
    NON_MIGRATABLE_CPU = "non-migratable-cpu"  # host-passthrough CPU with migratable='off'


class ReconcileOutcome(enum.StrEnum):
    """What start-up settlement did with one open journal entry."""

    SETTLED = "settled"  # actions were taken so the guest runs on exactly one host
    CLEANED = "cleaned"  # the guest already ran on one host; the entry was closed
    UNKNOWN = "unknown"  # a host did not answer; the entry stays open for next time


class CycleResult(enum.StrEnum):
    OK = "ok"
    ERROR = "error"


class PowerAction(enum.StrEnum):
    ON = "on"
    OFF = "off"


def new_migration_id() -> str:
    """A short, unique migration ID (journal, journald MIGRATION_ID, JSON, status)."""
    return uuid.uuid4().hex[:12]
