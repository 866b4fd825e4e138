"""The libvirt adapter: the ONLY module that imports libvirt.

One connection per host, opened lazily and reopened with exponential backoff. Every
call to a host runs on a worker thread with a timeout, so a dead or hung libvirtd costs
one timeout, never a stalled cycle. ``libvirtError`` becomes ``HypervisorError`` naming
the host and the operation.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import libvirt

from balancerd.config import HostConfig
from balancerd.errors import HypervisorError
from balancerd.hypervisor.base import (
    DestinationFacts,
    DiskFacts,
    DomainFacts,
    HostFacts,
    InterfaceFacts,
    JobStats,
    MigrationRequest,
)
from balancerd.model import Blocker, HostSample, VmSample
from balancerd.outcomes import BlockerKind
from balancerd.units import MIB

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt's default folder of QEMU's TLS certificates (default_tls_x509_cert_dir in
# qemu.conf), used for migration streams unless migrate_tls_x509_cert_dir says otherwise.
QEMU_TLS_DIR = "/etc/pki/qemu"
# Post-copy needs QEMU to get a userfaultfd on the destination; the versions below are
# libvirt's and QEMU's first with post-copy (1.3.3, 2.6) and with post-copy recovery
# (VIR_MIGRATE_POSTCOPY_RESUME, libvirt 8.5). The userfaultfd itself cannot be read through
# libvirt: QEMU refuses a post-copy job at its start ("Postcopy is not supported") when it
# cannot get one, and that refusal is remembered per host (see postcopy_refused).
POSTCOPY_MIN_LIBVIRT = 1_003_003
POSTCOPY_MIN_QEMU = 2_006_000
POSTCOPY_RESUME_MIN_LIBVIRT = 8_005_000
# libvirt 9.4 added zlib/zstd (multifd) to VIR_MIGRATE_PARAM_COMPRESSION; before: mt, xbzrle.
MULTIFD_COMPRESSION_MIN_LIBVIRT = 9_004_000
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
BACKOFF_MAX_S = 60.0
# Guest tags for policy selectors live in each domain's metadata under this namespace:
#   virsh metadata DOMAIN --uri https://balancerd.dev/xmlns/1 --key balancerd \
#     --set '<tags><tag>db</tag><tag>prod</tag></tags>' --live --config
TAGS_NS_URI = "https://balancerd.dev/xmlns/1"
TAGS_NS_KEY = "balancerd"
MAX_TAGS = 64  # per guest; more are ignored (a selector needs a handful)
# Hosts sampled at once (a pool; see _SampleRound): at most this many, and how long a read
# may run before it stops counting against that number (a hung host must not hold up the
# others). Between rounds the number follows what the reads wait on (SampleConcurrency).
SAMPLE_WORKERS = 32
SAMPLE_SLOW_S = 0.25

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "other",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
# A paused domain with one of these reasons is the target end of an incoming migration.
_INCOMING_PAUSE_REASONS = {
    libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
    libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
}

_event_loop_started = False
_event_loop_lock = threading.Lock()
# Silence libvirt's default handler, which prints every error to stderr; we raise instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _start_event_loop() -> None:
    """libvirt keepalives need an event loop; run the default one on a daemon thread."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass
class _HostConn:
    """Connection state of one host (mutable, guarded by LibvirtHypervisor._lock)."""

    cfg: HostConfig
    conn: Any = None
    failures: int = 0
    retry_at_s: float = 0.0  # monotonic; no reconnect attempt before this
    last_error: str = ""
    host_uuid: str = ""  # cached from capabilities, per connection
    core_speed_mhz: int = 0  # nominal (TSC) frequency from capabilities; 0 = not reported
    caps_read: bool = False  # host_uuid and core_speed_mhz read on this connection


class LibvirtHypervisor:
    def __init__(
        self,
        hosts: Sequence[HostConfig],
        timeout_s: float = 5.0,
        shared_storage: Sequence[str] = (),
    ) -> None:
        _start_event_loop()
        self._hosts = {h.name: _HostConn(cfg=h) for h in hosts}
        # folders every host sees at the same path (config shared_storage): a disk outside
        # them is local to its host; none declared: disks are not judged here (preflight is)
        self._shared_storage = tuple(shared_storage)
        self._xml_cache = {h.name: GuestXmlCache(self._shared_storage) for h in hosts}
        self._timeout_s = timeout_s
        self._sample_concurrency = SampleConcurrency()
        self._lock = threading.Lock()
        # Workers for timed calls. A call that hangs past its timeout keeps its thread, so
        # the pool is generous; the hung connection is dropped and reopened next time.
        self._pool = ThreadPoolExecutor(max_workers=4 * len(hosts) + 8, thread_name_prefix="lv")
        # host -> why QEMU there refused a post-copy job (read by host_facts)
        self._postcopy_refused: dict[str, str] = {}

    # --- connections ------------------------------------------------------------------

    def host_names(self) -> Sequence[str]:
        return list(self._hosts)

    def _state(self, host: str) -> _HostConn:
        try:
            return self._hosts[host]
        except KeyError:
            raise HypervisorError(host, "lookup", "no such host in the config") from None

    def _connect(self, st: _HostConn) -> Any:
        """The open connection of a host, opening it if the backoff allows."""
        with self._lock:
            if st.conn is not None:
                return st.conn
            if time.monotonic() < st.retry_at_s:
                raise HypervisorError(
                    st.cfg.name, "connect", f"{st.last_error} (retrying in backoff)"
                )
        try:
            conn = libvirt.open(connect_uri(st.cfg))
            _set_keepalive(conn)
            # changes missed while not connected: read every guest's XML afresh
            cache = self._xml_cache[st.cfg.name]
            cache.keep_only(set())
            watch_changes(conn, cache)
        except libvirt.libvirtError as exc:
            self._mark_failed(st, f"connect to {st.cfg.uri}: {exc}")
            raise HypervisorError(st.cfg.name, "connect", f"{st.cfg.uri}: {exc}") from _bare(exc)
        with self._lock:
            st.conn = conn
            st.failures = 0
            st.caps_read = False
        log.info("connected host=%s uri=%s", st.cfg.name, st.cfg.uri)
        return conn

    def _read_caps(self, st: _HostConn, conn: Any) -> None:
        """Host UUID and nominal core speed from the capabilities, once per connection.
        Read only by the calls that need them: a freshly started libvirtd answers its first
        getCapabilities only after probing the host (4-8 s seen in the lab), while a guest
        lookup answers at once, so a preflight that refuses on the source never waits."""
        if st.caps_read:
            return
        caps = ET.fromstring(conn.getCapabilities())  # noqa: S314 (XML from our own authenticated libvirtd; expat refuses entity expansion bombs)
        with self._lock:
            st.host_uuid = caps.findtext("host/uuid", default="")
            st.core_speed_mhz = _nominal_mhz(caps)
            st.caps_read = True

    def _mark_failed(self, st: _HostConn, error: str) -> None:
        with self._lock:
            old, st.conn = st.conn, None
            st.failures += 1
            st.retry_at_s = time.monotonic() + min(BACKOFF_MAX_S, 2.0 ** (st.failures - 1))
            st.last_error = error
        if old is not None:
            # Closing may block on a hung peer: do it off the caller's thread.
            self._pool.submit(_close_quietly, old)

    def _run(self, st: _HostConn, operation: str, fn: Callable[[Any], T]) -> T:
        """``fn(conn)`` on this thread, connecting first; every libvirt failure mapped."""
        conn = self._connect(st)
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            # A restarted libvirtd leaves the old connection dead with an *internal* error
            # ("client socket is closed"): ask the connection itself, not only the code.
            # Only if it is still the host's connection: a late error of a call that timed
            # out (its connection already dropped) must not drop the one opened since.
            if st.conn is conn and (_connection_lost(exc) or not _alive(conn)):
                self._mark_failed(st, f"{operation}: {exc}")
            raise HypervisorError(st.cfg.name, operation, str(exc)) from _bare(exc)

    def _limit_s(self, st: _HostConn, timeout_s: float | None = None) -> float:
        """A call's time limit. Until the capabilities were read on a connection a call gets
        three: a freshly started libvirtd probes the host on its first getCapabilities
        (4-8 s seen in the lab)."""
        limit_s = timeout_s if timeout_s is not None else self._timeout_s
        return limit_s * 3 if st.conn is None or not st.caps_read else limit_s

    def _call(
        self, host: str, operation: str, fn: Callable[[Any], T], timeout_s: float | None = None
    ) -> T:
        """Run ``fn(conn)`` for ``host`` on a worker with a timeout; map every failure."""
        st = self._state(host)
        # Connecting happens on the worker too, so a host that never answers costs one timeout.
        limit_s = self._limit_s(st, timeout_s)
        try:
            future = self._pool.submit(self._run, st, operation, fn)
        except RuntimeError:  # closed (a reload swapped this adapter out while a job held it)
            raise HypervisorError(host, operation, "the adapter is closed") from None
        try:
            return future.result(timeout=limit_s)
        except FutureTimeout:
            self._mark_failed(st, f"{operation} timed out")
            raise HypervisorError(host, operation, f"no answer within {limit_s:.1f} s") from None

    def close(self) -> None:
        # Domain objects still referenced somewhere keep their connection open; free them
        # now, while the peers are reachable (freed at interpreter exit after a host
        # vanished, the last unref waits forever for the peer's answer).
        gc.collect()
        with self._lock:
            conns = [st.conn for st in self._hosts.values() if st.conn is not None]
            for st in self._hosts.values():
                st.conn = None
        for conn in conns:
            _close_quietly(conn)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- sampling ---------------------------------------------------------------------

    def sample_all(self) -> tuple[HostSample, ...]:
        """Every host, a bounded number at once (_SampleRound, SampleConcurrency); each gets
        the timeout from when its read starts; failures come back as hosts that are down."""
        return _SampleRound(self, list(self._hosts), self._sample_concurrency).run()

    def sample_host(self, host: str) -> HostSample:
        st = self._state(host)
        return self._host_sample(st, self._call(host, "sample", self._sample_reader(st)))

    def _sample_reader(self, st: _HostConn) -> Callable[[Any], dict[str, Any]]:
        """A host's sample read: capabilities once per connection, blockers from the cache."""
        cache = self._xml_cache[st.cfg.name]

        def read(conn: Any) -> dict[str, Any]:
            self._read_caps(st, conn)
            return _read_host(conn, cache)

        return read

    def _sample_now(self, host: str) -> HostSample:
        """One host's sample read on this thread; a failure is a sample of a host down."""
        st = self._hosts[host]
        try:
            return self._host_sample(st, self._run(st, "sample", self._sample_reader(st)))
        except HypervisorError as exc:
            return _down_sample(st.cfg, str(exc))
        except Exception as exc:  # a driver answering nonsense: that host is down, not the round
            log.exception("sample failed host=%s", host)
            return _down_sample(st.cfg, f"{host}: sample failed: {exc!r}")

    def _sample_timed_out(self, host: str, limit_s: float) -> HostSample:
        st = self._hosts[host]
        self._mark_failed(st, "sample timed out")
        return _down_sample(
            st.cfg, str(HypervisorError(host, "sample", f"no answer within {limit_s:.1f} s"))
        )

    def _host_sample(self, st: _HostConn, raw: dict[str, Any]) -> HostSample:
        return HostSample(
            name=st.cfg.name,
            uri=st.cfg.uri,
            up=True,
            sampled_at_s=raw["at_s"],
            hostname=raw["hostname"],
            host_uuid=st.host_uuid,
            cpus=raw["cpus"],
            cpu_mhz=raw["mhz"],
            core_speed_mhz=st.core_speed_mhz,
            mem_total_bytes=raw["mem_total_bytes"],
            mem_free_bytes=raw["mem_free_bytes"],
            cpu_busy_ns=raw["cpu_busy_ns"],
            cpu_total_ns=raw["cpu_total_ns"],
            libvirt_version=raw["libvirt_version"],
            hypervisor_version=raw["hypervisor_version"],
            vms=tuple(raw["vms"]),
            labels=st.cfg.labels,
        )

    # --- facts for preflight ----------------------------------------------------------

    def domain_facts(self, host: str, vm: str) -> DomainFacts:
        def read(conn: Any) -> DomainFacts:
            dom = conn.lookupByName(vm)
            state, _reason = dom.state()
            active = dom.isActive()
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_UPDATE_CPU if active else 0)
            # a stopped guest has no jobs (libvirt refuses to read them: "not running")
            job_type = dom.jobInfo()[0] if active else libvirt.VIR_DOMAIN_JOB_NONE
            return _domain_facts_from_xml(
                xml,
                state=_STATE_NAMES.get(state, "other"),
                persistent=bool(dom.isPersistent()),
                in_job=job_type not in (libvirt.VIR_DOMAIN_JOB_NONE,),
                shared_storage=self._shared_storage,
            )

        return self._call(host, f"read domain {vm}", read)

    def host_facts(self, host: str) -> HostFacts:
        st = self._state(host)
        return self._call(host, "read host facts", lambda conn: self._host_facts(st, conn))

    def _host_facts(self, st: _HostConn, conn: Any) -> HostFacts:
        self._read_caps(st, conn)
        host = st.cfg.name
        mem = _node_memory_kib(conn)
        if mem is None:  # the test driver: derived from the guests, as in sampling
            free_kib = _read_host(conn, self._xml_cache[host])["mem_free_bytes"] // 1024
        else:
            free_kib = mem.get("free", 0) + mem.get("buffers", 0) + mem.get("cached", 0)
        lib_version, qemu_version = conn.getLibVersion(), conn.getVersion()
        return HostFacts(
            name=host,
            hostname=conn.getHostname(),
            host_uuid=st.host_uuid,
            libvirt_version=lib_version,
            hypervisor_version=qemu_version,
            mem_free_bytes=free_kib * 1024,
            networks=tuple(sorted(conn.listNetworks())),
            bridges=_bridges(conn),
            migration_tls_server=all(
                _file_visible(conn, f"{QEMU_TLS_DIR}/{name}")
                for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem")
            ),
            migration_tls_client=_file_visible(conn, f"{QEMU_TLS_DIR}/ca-cert.pem"),
            postcopy_problem=self._postcopy_refused.get(host)
            or postcopy_version_problem(lib_version, qemu_version),
            compression_methods=compression_methods(lib_version),
        )

    def destination_facts(
        self, host: str, vm: str, cpu_xml: str, virt_type: str, paths: Sequence[str]
    ) -> DestinationFacts:
        st = self._state(host)

        def read(conn: Any) -> DestinationFacts:
            return DestinationFacts(
                host=self._host_facts(st, conn),
                cpu_ok=_cpu_compatible(conn, cpu_xml, virt_type),
                path_visible=tuple((p, _file_visible(conn, p)) for p in paths),
                existing_state=_domain_state(conn, vm),
            )

        return self._call(host, f"read destination facts for {vm}", read)

    def cpu_compatible(self, host: str, cpu_xml: str, virt_type: str = "kvm") -> bool:
        if not cpu_xml:
            return True  # the hypervisor's default CPU model runs everywhere it runs
        return self._call(
            host, "compare CPU", lambda conn: _cpu_compatible(conn, cpu_xml, virt_type)
        )

    def path_visible(self, host: str, path: str) -> bool:
        """Storage volume lookup by path; where no pool holds the folder, a transient
        directory pool over it answers the question and is removed again."""

        return self._call(host, f"look up storage {path}", lambda conn: _file_visible(conn, path))

    # --- migration --------------------------------------------------------------------

    def migrate(self, req: MigrationRequest) -> None:  # noqa: C901 (flags and parameters, one branch per policy option)
        src = self._state(req.src)
        dst = self._state(req.dst)
        conn = self._connect(src)
        flags = (
            libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        )
        if req.offline:
            # a stopped guest: only its definition moves (disks must be on shared storage)
            flags |= libvirt.VIR_MIGRATE_OFFLINE
            try:
                dom = conn.lookupByName(req.vm)
                dom.migrateToURI3(peer_uri(dst.cfg.uri), {}, flags)
            except libvirt.libvirtError as exc:
                if _connection_lost(exc):
                    self._mark_failed(src, f"migrate: {exc}")
                what = f"offline migration of stopped {req.vm} {req.src}->{req.dst}"
                raise HypervisorError(req.src, what, str(exc)) from _bare(exc)
            return
        if req.live:
            flags |= libvirt.VIR_MIGRATE_LIVE
        if req.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if req.copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        if req.tls:
            flags |= libvirt.VIR_MIGRATE_TLS
        if req.postcopy or req.postcopy_resume:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if req.postcopy_resume:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY_RESUME
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: max(1, round(req.bandwidth_mib_s)),
        }
        if req.parallel_connections >= 2:
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = req.parallel_connections
        if req.compression:
            flags |= libvirt.VIR_MIGRATE_COMPRESSED
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = req.compression
        if dst.cfg.migration_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = dst.cfg.migration_uri
        what = f"{'live' if req.live else 'cold'} migration of {req.vm} {req.src}->{req.dst}"
        if req.postcopy_resume:
            what = f"post-copy recovery of {req.vm} {req.src}->{req.dst}"
        if req.tls:
            what += " (TLS)"
        try:
            dom = conn.lookupByName(req.vm)
            if req.live and req.max_downtime_ms > 0:
                # libvirt 9 sets QEMU's downtime limit before the job too; the first
                # iterations then already aim at it (the monitor may raise it later).
                dom.migrateSetMaxDowntime(req.max_downtime_ms, 0)
            # The source libvirtd opens this URI with its own client certificates: our
            # pki_dir is a path on this machine, not on the source host.
            dom.migrateToURI3(peer_uri(dst.cfg.uri), params, flags)
        except libvirt.libvirtError as exc:
            if _connection_lost(exc):
                self._mark_failed(src, f"migrate: {exc}")
            if req.postcopy and "postcopy is not supported" in str(exc).lower():
                self._postcopy_refused[req.dst] = f"QEMU refused post-copy: {exc}"
            raise HypervisorError(req.src, what, str(exc)) from _bare(exc)

    def job_stats(self, host: str, vm: str, completed: bool = False) -> JobStats | None:
        flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0

        def read(conn: Any) -> JobStats | None:
            stats = conn.lookupByName(vm).jobStats(flags)
            job_type = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
            if job_type == libvirt.VIR_DOMAIN_JOB_NONE:
                return None
            return _job_stats(stats, active=not completed)

        return self._call(host, f"read job of {vm}", read)

    def set_max_downtime(self, host: str, vm: str, downtime_ms: int) -> None:
        self._call(
            host,
            f"set max downtime of {vm} to {downtime_ms} ms",
            lambda conn: conn.lookupByName(vm).migrateSetMaxDowntime(downtime_ms, 0),
        )

    def start_postcopy(self, host: str, vm: str) -> None:
        self._call(
            host,
            f"switch {vm} to post-copy",
            lambda conn: conn.lookupByName(vm).migrateStartPostCopy(0),
        )

    def postcopy_state(self, host: str, vm: str) -> str:
        def read(conn: Any) -> str:
            try:
                state, reason = conn.lookupByName(vm).state()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return ""
                raise
            return _postcopy_state(state, reason)

        return self._call(host, f"read post-copy state of {vm}", read)

    def start_dirty_rate(self, host: str, vm: str, seconds: int) -> None:
        # QEMU samples for ``seconds`` in the background; sample_all reads the result.
        # Page sampling (512 pages per GiB: coarse on small guests over 1 s, hence the
        # long calculation after it). Not dirty-bitmap mode: QEMU 7.2 under TCG crashed on
        # it in the lab ("shutting down, reason=crashed").
        def start(conn: Any) -> None:
            dom = conn.lookupByName(vm)
            # Not during a job (a migration started by anyone since the last sample): the
            # calculation would wait on the domain's job lock past the timeout.
            if dom.jobStats(0).get("type", libvirt.VIR_DOMAIN_JOB_NONE) != (
                libvirt.VIR_DOMAIN_JOB_NONE
            ):
                raise HypervisorError(host, "start dirty-rate calculation", f"{vm} is in a job")
            dom.startDirtyRateCalc(max(1, seconds), 0)

        self._call(host, f"start dirty-rate calculation of {vm}", start)

    def suspend(self, host: str, vm: str) -> None:
        self._call(host, f"suspend {vm}", lambda conn: conn.lookupByName(vm).suspend())

    def resume(self, host: str, vm: str) -> None:
        self._call(host, f"resume {vm}", lambda conn: conn.lookupByName(vm).resume())

    def abort_job(self, host: str, vm: str) -> None:
        self._call(host, f"abort job of {vm}", lambda conn: conn.lookupByName(vm).abortJob())

    def domains(self, host: str) -> dict[str, str]:
        def read(conn: Any) -> dict[str, str]:
            return {
                dom.name(): _STATE_NAMES.get(dom.state()[0], "other")
                for dom in conn.listAllDomains(0)  # active and persistent inactive
            }

        return self._call(host, "list domains", read)

    def domain_state(self, host: str, vm: str) -> str | None:
        return self._call(host, f"read state of {vm}", lambda conn: _domain_state(conn, vm))

    def destroy(self, host: str, vm: str) -> None:
        def kill(conn: Any) -> None:
            dom = conn.lookupByName(vm)
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()

        self._call(host, f"destroy {vm}", kill)


class SampleConcurrency:
    """How many hosts a round reads at once, set from the last round: the interpreter's
    share of it (the reads' CPU time over its wall time). Reads that mostly wait on the
    network (remote libvirtd) leave the interpreter idle: more at once. Reads that keep it
    busy (a fast local driver, many guests per host) only contend for the GIL when more run
    at once: 1,000 test-driver hosts took 0.6 s with one worker and 2.4 s with 32. Halved
    above HIGH, doubled below LOW, held between (so it settles instead of swinging). Within
    a round it only grows: reads that turn slow (a network hiccup) get more at once right
    away, not one round later."""

    HIGH = 0.75
    LOW = 0.35

    def __init__(self, most: int = SAMPLE_WORKERS) -> None:
        self.most = most
        self.workers = most  # the first round connects: that waits on the network

    def after_round(self, workers: int, cpu_s: float, wall_s: float) -> None:
        """The round ran with ``workers`` at the end; its reads used ``cpu_s`` in ``wall_s``."""
        busy = cpu_s / wall_s if wall_s > 0 else 0.0
        if busy > self.HIGH:
            self.workers = max(1, workers // 2)
        elif busy < self.LOW:
            self.workers = min(self.most, workers * 2)
        else:
            self.workers = workers

    def grown(self, workers: int, cpu_s: float, elapsed_s: float) -> int:
        """Mid-round: twice ``workers`` when the reads so far left the interpreter idle."""
        if elapsed_s >= SAMPLE_SLOW_S and cpu_s / elapsed_s < self.LOW:
            return min(self.most, workers * 2)
        return workers


class _SampleRound:
    """One ``sample_all``: a bounded number of workers take hosts from a queue (two threads
    per host cost 1,150+ OS threads at 1,000 hosts, contending for the GIL). A read still
    running after ``SAMPLE_SLOW_S`` stops counting against that number and another worker
    starts, so a host that hangs costs one thread while it hangs (as before) and never
    holds up the others; a host whose read passes its time limit is reported down and its
    connection dropped, its late answer ignored. The number is ``concurrency.workers``; the
    round reports its reads' CPU time back to it."""

    def __init__(
        self, hv: LibvirtHypervisor, hosts: list[str], concurrency: SampleConcurrency
    ) -> None:
        self._hv = hv
        self._hosts = hosts
        self._concurrency = concurrency
        self._workers = concurrency.workers
        self._queue = deque(hosts)
        self._cond = threading.Condition()
        self._running: dict[str, tuple[float, float]] = {}  # host -> (started, limit_s)
        self._done: dict[str, HostSample] = {}
        self._threads = 0  # workers alive, slow ones included
        self._cpu_s = 0.0  # the reads' thread CPU time, summed

    def run(self) -> tuple[HostSample, ...]:
        start_s = time.monotonic()
        samples = self._run(start_s)
        with self._cond:
            wall_s = time.monotonic() - start_s
            self._concurrency.after_round(self._workers, self._cpu_s, wall_s)
        return samples

    def _run(self, start_s: float) -> tuple[HostSample, ...]:
        grown_at_s = start_s
        with self._cond:
            while len(self._done) < len(self._hosts):
                now = time.monotonic()
                if now - grown_at_s >= SAMPLE_SLOW_S:
                    self._workers = self._concurrency.grown(
                        self._workers, self._cpu_s, now - start_s
                    )
                    grown_at_s = now
                slow = 0
                wake_s = SAMPLE_SLOW_S
                for host, (start, limit_s) in list(self._running.items()):
                    age_s = now - start
                    if host not in self._done and age_s >= limit_s:
                        self._done[host] = self._hv._sample_timed_out(host, limit_s)
                    elif host not in self._done:
                        wake_s = min(wake_s, limit_s - age_s)
                    if age_s >= SAMPLE_SLOW_S:
                        slow += 1
                    else:
                        wake_s = min(wake_s, SAMPLE_SLOW_S - age_s)
                while self._queue and self._threads - slow < self._workers:
                    self._threads += 1
                    threading.Thread(target=self._work, name="lv-sample", daemon=True).start()
                if len(self._done) < len(self._hosts):
                    self._cond.wait(timeout=max(0.001, wake_s))
        return tuple(self._done[h] for h in self._hosts)

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._threads -= 1
                    return
                host = self._queue.popleft()
                st = self._hv._hosts[host]
                self._running[host] = (time.monotonic(), self._hv._limit_s(st))
            cpu_start_s = time.thread_time()
            sample = self._hv._sample_now(host)
            with self._cond:
                self._cpu_s += time.thread_time() - cpu_start_s
                del self._running[host]
                self._done.setdefault(host, sample)  # not after a timeout: that one stays
                self._cond.notify()


def _down_sample(cfg: HostConfig, error: str) -> HostSample:
    return HostSample(
        name=cfg.name, uri=cfg.uri, up=False, sampled_at_s=time.monotonic(), error=error
    )


# --- helpers (run on worker threads) --------------------------------------------------


def postcopy_version_problem(libvirt_version: int, qemu_version: int) -> str:
    """Why a host's versions cannot take part in a post-copy with recovery ("" if they can)."""
    if libvirt_version < POSTCOPY_RESUME_MIN_LIBVIRT:
        return f"libvirt {_ver(libvirt_version)} < 8.5.0 (post-copy recovery)"
    if qemu_version < POSTCOPY_MIN_QEMU:
        return f"QEMU {_ver(qemu_version)} < 2.6.0 (post-copy)"
    return ""


def compression_methods(libvirt_version: int) -> tuple[str, ...]:
    """The VIR_MIGRATE_PARAM_COMPRESSION methods a libvirt accepts."""
    if libvirt_version >= MULTIFD_COMPRESSION_MIN_LIBVIRT:
        return ("mt", "xbzrle", "zlib", "zstd")
    return ("mt", "xbzrle")


def _ver(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def _postcopy_state(state: int, reason: int) -> str:
    if (state, reason) in (
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED),
    ):
        return "failed"
    if (state, reason) in (
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY),
    ):
        return "active"
    return ""


def connect_uri(cfg: HostConfig) -> str:
    """The URI balancerd opens for a host: a qemu+tls URI gets ``pkipath=`` naming the
    host's ``pki_dir`` (unless the URI names one itself)."""
    parts = urlsplit(cfg.uri)
    if not cfg.pki_dir or not parts.scheme.lower().endswith("+tls"):
        return cfg.uri
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "pkipath" for k, _ in query):
        return cfg.uri
    query.append(("pkipath", cfg.pki_dir))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe="/")))


def peer_uri(uri: str) -> str:
    """The destination URI handed to the source libvirtd for a peer-to-peer migration:
    without ``pkipath=`` (a folder on this machine, not on the source host)."""
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "pkipath"]
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe="/")))


def _file_visible(conn: Any, path: str) -> bool:
    """Whether the host sees a file at exactly ``path``: storage volume lookup by path;
    where no pool holds the folder, a transient directory pool over it answers the
    question and is removed again (libvirt has no other remote file lookup)."""
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path", default="")  # noqa: S314 (XML from our own authenticated libvirtd; expat refuses entity expansion bombs)
        if target == str(PurePosixPath(path).parent):
            pool.refresh(0)
    try:
        conn.storageVolLookupByPath(path)
        return True
    except libvirt.libvirtError:
        pass
    folder = str(PurePosixPath(path).parent)
    # one name per call: two lookups on one host at once must not collide
    name = f"balancerd-probe-{uuid.uuid4().hex[:12]}"
    pool_xml = (
        f"<pool type='dir'><name>{name}</name>"
        f"<target><path>{_xml_escape(folder)}</path></target></pool>"
    )
    try:
        pool = conn.storagePoolCreateXML(pool_xml, 0)
    except libvirt.libvirtError:
        return False  # the folder itself is not there
    try:
        pool.storageVolLookupByName(PurePosixPath(path).name)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        pool.destroy()


def _cpu_compatible(conn: Any, cpu_xml: str, virt_type: str) -> bool:
    if not cpu_xml:
        return True  # the hypervisor's default CPU model runs everywhere it runs
    # Compare against what the destination's hypervisor can provide for this virt type
    # (for TCG that is not the physical CPU), not against the host CPU itself.
    result = conn.compareHypervisorCPU(None, None, None, virt_type, cpu_xml, 0)
    return bool(result != libvirt.VIR_CPU_COMPARE_INCOMPATIBLE)


def _domain_state(conn: Any, vm: str) -> str | None:
    try:
        dom = conn.lookupByName(vm)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    return _STATE_NAMES.get(dom.state()[0], "other")


def _bare(exc: BaseException) -> BaseException:
    """The error without its traceback: the frames of a libvirt call hold virDomain
    objects, and a chained error that keeps them alive keeps their connection alive."""
    return exc.with_traceback(None)


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _alive(conn: Any) -> bool:
    """Whether a connection is still usable (None: not connected, so nothing to drop)."""
    if conn is None:
        return True
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _connection_lost(exc: Any) -> bool:
    return exc.get_error_code() in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
    )


class GuestXmlCache:
    """What each guest's XML says on one host (its blockers and its tags), read only when the
    guest is new, its state changed, libvirt reported a metadata or device change (events,
    see watch_changes), or every REFRESH_SAMPLES samples as a backstop. Fetching and parsing
    every domain's XML each sample cost ~18x the stats call itself (libvirt test driver, 21
    domains: 5.0 ms against 0.28 ms); a separate metadata call per guest for its tags cost
    as much again (collection at 1,000 x 20: 1.2 s per cycle went to 3.3 s)."""

    REFRESH_SAMPLES = 20

    def __init__(self, shared_storage: Sequence[str] = ()) -> None:
        self.shared_storage = tuple(shared_storage)
        self._lock = threading.Lock()
        # uuid -> (state, samples left before a re-read, blockers, tags)
        self._seen: dict[str, tuple[int, int, tuple[Blocker, ...], tuple[str, ...]]] = {}
        self.reads = 0  # XML reads so far (tests, benchmarks)

    def read(self, dom: Any, state: int) -> tuple[tuple[Blocker, ...], tuple[str, ...]]:
        """(blockers, tags) of a guest in ``state``."""
        uuid_ = dom.UUIDString()
        with self._lock:
            hit = self._seen.get(uuid_)
            if hit is not None and hit[0] == state and hit[1] > 0:
                self._seen[uuid_] = (state, hit[1] - 1, hit[2], hit[3])
                return hit[2], hit[3]
        # the inactive XML of a stopped guest, the live one of a running guest
        root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 (XML from our own authenticated libvirtd; expat refuses entity expansion bombs)
        blockers = migration_blockers(root, self.shared_storage)
        tags = _tags_in_domain(root)
        # a guest's first backstop re-read is spread over REFRESH_SAMPLES samples (by its
        # UUID's first digits), so a host's guests are not all re-read in the same sample
        left = (
            int(uuid_[:8], 16) % self.REFRESH_SAMPLES if hit is None else self.REFRESH_SAMPLES - 1
        )
        with self._lock:
            self._seen[uuid_] = (state, left, blockers, tags)
            self.reads += 1
        return blockers, tags

    def blockers(self, dom: Any, state: int) -> tuple[Blocker, ...]:
        return self.read(dom, state)[0]

    def forget(self, uuid_: str) -> None:
        """Read this guest's XML again at its next sample (it changed)."""
        with self._lock:
            self._seen.pop(uuid_, None)

    def keep_only(self, uuids: set[str]) -> None:
        """Forget guests no longer on the host."""
        with self._lock:
            for gone in set(self._seen) - uuids:
                del self._seen[gone]


def watch_changes(conn: Any, cache: GuestXmlCache) -> None:
    """Have libvirt's events (metadata set, device hot-plugged or removed) make ``cache``
    re-read that guest at its next sample; a driver without them leaves the backstop."""

    def changed(_conn: Any, dom: Any, *_rest: Any) -> None:
        cache.forget(dom.UUIDString())

    for event in (
        libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
        libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
    ):
        try:
            conn.domainEventRegisterAny(None, event, changed, None)
        except libvirt.libvirtError as exc:
            log.debug("no change events uri=%s event=%d: %s", conn.getURI(), event, exc)


def _unsupported(exc: Any) -> bool:
    """The driver has no such call (libvirt's test driver: keepalive, node memory stats)."""
    return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT)


def _set_keepalive(conn: Any) -> None:
    """Keepalive where the driver has it; a local driver without one (test:///) has no
    peer that can vanish, so it goes without."""
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
    except libvirt.libvirtError as exc:
        if not _unsupported(exc):
            raise
        log.debug("no keepalive uri=%s: %s", conn.getURI(), exc)


def _node_memory_kib(conn: Any) -> dict[str, int] | None:
    """Node memory counters (KiB), or None where the driver has none (test driver)."""
    try:
        return dict(conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS))
    except libvirt.libvirtError as exc:
        if not _unsupported(exc):
            raise
        return None


def _read_host(conn: Any, cache: GuestXmlCache) -> dict[str, Any]:
    """One consistent read of a host: node counters, memory, and every domain's stats."""
    info = conn.getInfo()  # [model, memory MiB, cpus, MHz, nodes, sockets, cores, threads]
    cpu = conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
    mem = _node_memory_kib(conn)
    at_s = time.monotonic()
    busy_ns = cpu.get("kernel", 0) + cpu.get("user", 0)
    total_ns = busy_ns + cpu.get("idle", 0) + cpu.get("iowait", 0)
    stats = conn.getAllDomainStats(
        libvirt.VIR_DOMAIN_STATS_STATE
        | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
        | libvirt.VIR_DOMAIN_STATS_BALLOON
        | libvirt.VIR_DOMAIN_STATS_VCPU
        | _STATS_DIRTYRATE,
        0,
    )
    vms = []
    for dom, s in stats:
        state = s.get("state.state", libvirt.VIR_DOMAIN_NOSTATE)
        reason = s.get("state.reason", 0)
        mem_kib = s.get("balloon.current") or s.get("balloon.maximum") or dom.maxMemory()
        blockers, tags = cache.read(dom, state)
        dirty_mib_s, dirty_id, dirty_s = _dirty_rate(s)
        vcpus = s.get("vcpu.current")
        cpu_ns = s.get("cpu.time")
        if not vcpus:
            # No vCPU stats (inactive guests; the test driver has state only): info() is
            # [state, max KiB, current KiB, vCPUs, CPU time ns]. Not called otherwise: on a
            # guest in a migration job it waits for the job (the lab saw samples time out).
            dinfo = dom.info()
            vcpus = dinfo[3]
            cpu_ns = dinfo[4] if cpu_ns is None else cpu_ns
        vms.append(
            VmSample(
                # interned: the same name and UUID in every sample the history keeps
                name=sys.intern(dom.name()),
                uuid=sys.intern(dom.UUIDString()),
                state=_STATE_NAMES.get(state, "other"),
                vcpus=int(vcpus),
                mem_bytes=int(mem_kib) * 1024,
                cpu_time_ns=int(cpu_ns or 0),
                incoming=state == libvirt.VIR_DOMAIN_PAUSED and reason in _INCOMING_PAUSE_REASONS,
                tags=tags,
                blockers=blockers,
                dirty_rate_bytes_s=None if dirty_mib_s is None else dirty_mib_s * MIB,
                dirty_calc_id=dirty_id,
                dirty_calc_s=dirty_s,
            )
        )
    cache.keep_only({v.uuid for v in vms})
    mem_total_kib = int(info[1]) * 1024
    if mem is None:
        # No node memory counters: free is what the running guests leave of the total.
        mem_free_kib = max(
            0, mem_total_kib - sum(v.mem_bytes for v in vms if v.state != "shutoff") // 1024
        )
    else:
        mem_total_kib = int(mem.get("total", mem_total_kib))
        mem_free_kib = int(mem.get("free", 0) + mem.get("buffers", 0) + mem.get("cached", 0))
    return {
        "at_s": at_s,
        "hostname": conn.getHostname(),
        "cpus": int(info[2]),
        "mhz": int(info[3]),
        "mem_total_bytes": mem_total_kib * 1024,
        "mem_free_bytes": mem_free_kib * 1024,
        "cpu_busy_ns": int(busy_ns),
        "cpu_total_ns": int(total_ns),
        "libvirt_version": int(conn.getLibVersion()),
        "hypervisor_version": int(conn.getVersion()),
        "vms": vms,
    }


def _tags_in_domain(root: ET.Element) -> tuple[str, ...]:
    """The tags in a domain XML's ``<metadata>``: its element in the balancerd namespace
    (what ``virsh metadata --uri TAGS_NS_URI`` set); none when there is no such element."""
    for element in root.iterfind(f"metadata/{{{TAGS_NS_URI}}}*"):
        return _tags_in(element)
    return ()


def tags_from_xml(xml: str) -> tuple[str, ...]:
    """``<tags><tag>db</tag><tag>prod</tag></tags>`` -> ``("db", "prod")``."""
    return _tags_in(ET.fromstring(xml))  # noqa: S314 (XML from our own authenticated libvirtd; expat refuses entity expansion bombs)


def _tags_in(root: ET.Element) -> tuple[str, ...]:
    """The ``tag`` children's texts (namespace, blanks and repeats dropped; the root may be
    any element holding ``tag`` children)."""
    found = (
        (child.text or "").strip()
        for child in root
        if isinstance(child.tag, str) and child.tag.rpartition("}")[2] == "tag"
    )
    return tuple(dict.fromkeys(t for t in found if t))[:MAX_TAGS]


# VIR_DOMAIN_STATS_DIRTYRATE (libvirt >= 7.2); 0 where the binding lacks it
_STATS_DIRTYRATE = int(getattr(libvirt, "VIR_DOMAIN_STATS_DIRTYRATE", 0))
_DIRTYRATE_MEASURED = 2  # dirtyrate.calc_status: 0 unstarted, 1 measuring, 2 measured


def _dirty_rate(s: dict[str, Any]) -> tuple[float | None, int, int]:
    """(MiB/s, id, period s) of the guest's last finished dirty-rate calculation; the id
    is its start time (a new one is a new measurement); (None, 0, 0) when there is none."""
    rate = s.get("dirtyrate.megabytes_per_second")
    if s.get("dirtyrate.calc_status") != _DIRTYRATE_MEASURED or rate is None:
        return None, 0, 0
    start = int(s.get("dirtyrate.calc_start_time", 0)) or 1
    return float(rate), start, int(s.get("dirtyrate.calc_period", 0))


def _nominal_mhz(caps: ET.Element) -> int:
    """The host's nominal core frequency: libvirt's ``<counter name='tsc' frequency=Hz>``
    in the capabilities (KVM hosts with an invariant TSC); 0 when it is not there."""
    for counter in caps.iterfind("host/cpu/counter"):
        if counter.get("name") == "tsc":
            try:
                return int(counter.get("frequency", "0")) // 1_000_000
            except ValueError:
                return 0
    return 0


def _bridges(conn: Any) -> tuple[str, ...]:
    """Bridge devices on the host, from libvirt's interface driver."""
    names = set()
    try:
        for iface in conn.listAllInterfaces(0):
            if ET.fromstring(iface.XMLDesc(0)).get("type") == "bridge":  # noqa: S314 (XML from our own authenticated libvirtd; expat refuses entity expansion bombs)
                names.add(iface.name())
    except libvirt.libvirtError:
        pass
    # Bridges of active libvirt networks count too (guests on type='bridge' may name them).
    for net in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):
            names.add(net.bridgeName())
    return tuple(sorted(names))


def _job_stats(s: dict[str, Any], active: bool) -> JobStats:
    downtime = s.get("downtime")
    return JobStats(
        active=active,
        elapsed_s=float(s.get("time_elapsed", 0)) / 1000.0,
        data_total_bytes=int(s.get("data_total", 0)),
        data_processed_bytes=int(s.get("data_processed", 0)),
        data_remaining_bytes=int(s.get("data_remaining", 0)),
        mem_bandwidth_bytes_s=float(s.get("memory_bps", 0)),
        dirty_rate_pages_s=float(s.get("memory_dirty_rate", 0)),
        page_size_bytes=int(s.get("memory_page_size", 4096) or 4096),
        iteration=int(s.get("memory_iteration", 0)),
        expected_downtime_ms=float(s.get("downtime", 0) if active else 0),
        downtime_ms=float(downtime) if (downtime is not None and not active) else None,
        auto_converge_throttle_pct=int(s.get("auto_converge_throttle", 0)),
    )


def _under(path: str, folders: Sequence[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(f) or PurePosixPath(f) in p.parents for f in folders)


def _hostdev_detail(dev: ET.Element) -> str:
    """``pci 0000:03:00.0``, ``usb 046d:c52b``, ``mdev <uuid>``, ... from a <hostdev>."""
    kind = dev.get("type", dev.get("mode", "device"))
    src = dev.find("source")
    if src is None:
        return kind
    addr = src.find("address")
    if kind == "mdev" and addr is not None:
        return f"mdev {addr.get('uuid', '')}".strip()
    if kind == "pci" and addr is not None:
        parts = [addr.get(k, "0x0").removeprefix("0x") for k in ("domain", "bus", "slot")]
        fn = addr.get("function", "0x0").removeprefix("0x")
        return f"pci {parts[0].zfill(4)}:{parts[1].zfill(2)}:{parts[2].zfill(2)}.{fn}"
    vendor, product = src.find("vendor"), src.find("product")
    if kind == "usb" and vendor is not None and product is not None:
        vid, pid = vendor.get("id", ""), product.get("id", "")
        return f"usb {vid.removeprefix('0x')}:{pid.removeprefix('0x')}"
    if addr is not None:
        return f"{kind} " + ":".join(f"{k}={v}" for k, v in sorted(addr.attrib.items()))
    return kind


def migration_blockers(root: ET.Element, shared_storage: Sequence[str]) -> tuple[Blocker, ...]:
    """What in a domain's XML stops a live migration, as libvirt's qemuMigrationSrcIsAllowed
    and QEMU's migration blockers see it: host devices (PCI/USB/SCSI passthrough, SR-IOV
    interfaces), mdevs (vGPU), <shmem>, virtiofs, a host-passthrough CPU that is not
    migratable or requires invtsc; with ``shared_storage`` declared, also disks and
    CD-ROMs whose file or device lies outside it (empty drives and network disks pass)."""
    out: list[Blocker] = []
    for dev in root.findall("devices/hostdev"):
        kind = BlockerKind.MDEV if dev.get("type") == "mdev" else BlockerKind.HOSTDEV
        out.append(Blocker(kind, _hostdev_detail(dev)))
    for iface in root.findall("devices/interface"):
        if iface.get("type") == "hostdev":
            out.append(Blocker(BlockerKind.HOSTDEV, "SR-IOV interface (type='hostdev')"))
    for shm in root.findall("devices/shmem"):
        out.append(Blocker(BlockerKind.SHMEM, f"shmem {shm.get('name', '')}".strip()))
    for fs in root.findall("devices/filesystem"):
        driver = fs.find("driver")
        if driver is not None and driver.get("type") == "virtiofs":
            target = fs.find("target")
            tag = target.get("dir", "") if target is not None else ""
            out.append(Blocker(BlockerKind.VIRTIOFS, f"virtiofs {tag}".strip()))
    cpu = root.find("cpu")
    if cpu is not None and cpu.get("mode") == "host-passthrough":
        if cpu.get("migratable") == "off":
            out.append(Blocker(BlockerKind.NON_MIGRATABLE_CPU, "host-passthrough migratable='off'"))
        elif any(
            f.get("name") == "invtsc" and f.get("policy") in ("require", "force")
            for f in cpu.findall("feature")
        ):
            out.append(Blocker(BlockerKind.NON_MIGRATABLE_CPU, "invtsc required"))
    if shared_storage:
        for disk in root.findall("devices/disk"):
            src = disk.find("source")
            path = (src.get("file") or src.get("dev") or "") if src is not None else ""
            if not path or disk.get("type") == "network" or _under(path, shared_storage):
                continue
            target = disk.find("target")
            dev_name = target.get("dev", "") if target is not None else ""
            device = disk.get("device", "disk")
            kind = BlockerKind.LOCAL_DISK if device in ("disk", "lun") else BlockerKind.HOST_CDROM
            out.append(Blocker(kind, f"{device} {dev_name} {path} (not on shared storage)"))
    return tuple(out)


def _domain_facts_from_xml(
    xml: str, state: str, persistent: bool, in_job: bool, shared_storage: Sequence[str] = ()
) -> DomainFacts:
    root = ET.fromstring(xml)  # noqa: S314 (XML from our own authenticated libvirtd; expat refuses entity expansion bombs)
    disks = []
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        path = ""
        if source is not None:
            path = source.get("file") or source.get("dev") or ""
        driver = disk.find("driver")
        target = disk.find("target")
        disks.append(
            DiskFacts(
                target=target.get("dev", "") if target is not None else "",
                path=path,
                cache=(driver.get("cache") if driver is not None else None) or "default",
                device=disk.get("device", "disk"),
                readonly=disk.find("readonly") is not None,
            )
        )
    interfaces = []
    for iface in root.findall("devices/interface"):
        kind = iface.get("type", "other")
        source = iface.find("source")
        name = ""
        if source is not None:
            name = source.get("network") or source.get("bridge") or source.get("dev") or ""
        interfaces.append(InterfaceFacts(kind=kind, source=name))
    cpu = root.find("cpu")
    cpu_xml = ""
    if cpu is not None and (cpu.get("mode") in (None, "custom") and cpu.find("model") is not None):
        cpu_xml = ET.tostring(cpu, encoding="unicode")
    mem_kib = int(root.findtext("currentMemory", default=root.findtext("memory", default="0")))
    return DomainFacts(
        virt_type=root.get("type", "kvm"),
        name=root.findtext("name", default=""),
        uuid=root.findtext("uuid", default=""),
        state=state,
        mem_bytes=mem_kib * 1024,
        vcpus=int(root.findtext("vcpu", default="1")),
        cpu_xml=cpu_xml,
        disks=tuple(disks),
        interfaces=tuple(interfaces),
        persistent=persistent,
        in_job=in_job,
        blockers=migration_blockers(root, shared_storage),
    )


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")
