"""The daemon's local control channel: a Unix socket (mode 0660, the daemon's user and
group) speaking the versioned JSON protocol of ``balancerd.control_client``.

Who may use it: the file mode lets in root, the daemon's user and the socket's group; each
peer is checked again by its kernel credentials (SO_PEERCRED), so a socket made
world-writable by mistake still refuses everyone else. One thread per connection (at
most ``MAX_CLIENTS``); a command that runs long (``cycle``, an approved plan) streams
progress lines and keepalives.

Commands: ``status``, ``drain``, ``undrain``, ``drain-status``, ``pause``, ``resume``,
``cycle``, ``approve``, ``history``, ``explain``. Drains and the pause live in
``balancerd.operator.OperatorState``; the cycle merges them in (see ``core``).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import logging
import os
import pwd
import queue
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from balancerd.control_client import MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from balancerd.daemon.cycle import CycleInputs, CycleReport
from balancerd.duplicates import set_aside_duplicates
from balancerd.errors import BalancerdError, ConfigError
from balancerd.execute.move import MoveResult
from balancerd.history import History, build_record, explain_lines, held_text
from balancerd.model import Plan
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.rationale import explain_moves, holds, human_duration, standing_rules
from balancerd.saved_plan import (
    SavedPlan,
    check_steps,
    merge_results,
    parse_plan,
    plan_document,
    valid_moves,
)
from balancerd.selectors import resolve_policy
from balancerd.snapshot_codec import snapshot_to_json

if TYPE_CHECKING:
    from balancerd.daemon.core import Daemon
    from balancerd.policy.model import Policy

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
READ_TIMEOUT_S = 30.0  # a client has this long to send its request
KEEPALIVE_S = 5.0  # a long command's silence is broken this often
SOCKET_MODE = 0o660

# Label values of balancerd_control_requests_total.
COMMANDS = (
    "status",
    "snapshot",
    "drain",
    "undrain",
    "drain-status",
    "pause",
    "resume",
    "cycle",
    "approve",
    "history",
    "explain",
)
RESULTS = ("ok", "error", "refused")
# Commands that change what the daemon does: only the acting instance takes them (with
# coordination, a standby's drains would not reach the leader).
ACTING = frozenset({"drain", "undrain", "pause", "resume", "cycle", "approve"})


class ControlFault(BalancerdError):
    """A request that is answered with an error of ``kind``."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class ControlUnavailable(BalancerdError):
    """The control socket cannot be served (the daemon runs on without it)."""


# --- peers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def name(self) -> str:
        return f"{user_name(self.uid)} (uid {self.uid})"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def peer_groups(peer: Peer) -> set[int]:
    """The peer's groups: its primary group, the groups its process holds (when /proc
    shows them) and the groups the user database gives its user."""
    groups = {peer.gid}
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{peer.pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups.update(int(g) for g in line.split()[1:])
    with contextlib.suppress(KeyError, OSError):
        groups.update(os.getgrouplist(pwd.getpwuid(peer.uid).pw_name, peer.gid))
    return groups


def refusal(peer: Peer, socket_gid: int, daemon_uid: int) -> str:
    """Why ``peer`` may not use the socket ("" if it may)."""
    if peer.uid in (0, daemon_uid) or socket_gid in peer_groups(peer):
        return ""
    return (
        f"{peer.name} may not control balancerd: only root, {user_name(daemon_uid)} and "
        f"members of group {group_name(socket_gid)} may"
    )


# --- events (progress of long commands) ----------------------------------------------------


class EventHub:
    """Lines the daemon publishes while it acts (a move started, ended), delivered to
    every control connection subscribed at that moment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[queue.Queue[str]] = []

    def publish(self, text: str) -> None:
        with self._lock:
            subs = list(self._subs)
        for q in subs:
            q.put_nowait(text)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[queue.Queue[str]]:
        q: queue.Queue[str] = queue.Queue()
        with self._lock:
            self._subs.append(q)
        try:
            yield q
        finally:
            with self._lock:
                self._subs.remove(q)


Emit = Callable[[str | None], None]  # a progress line, or None: a keepalive
Handler = Callable[[str, dict[str, Any], Peer, Emit], dict[str, Any]]


# --- the server -------------------------------------------------------------------------


class ControlServer:
    """Accepts connections on ``path``; ``handler(cmd, args, peer, emit)`` answers."""

    def __init__(self, path: Path, handler: Handler, *, daemon_uid: int | None = None) -> None:
        self.path = Path(path)
        self.handler = handler
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._closed = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._thread: threading.Thread | None = None
        self._ino = 0
        self._count_lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {
            (c, r): 0 for c in (*COMMANDS, "other") for r in RESULTS
        }

    def start(self) -> None:
        """Bind and listen; raises ControlUnavailable saying why it cannot."""
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ControlUnavailable(f"cannot create {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ControlUnavailable(
                f"another balancerd serves {self.path} (its lock {self.path}.lock is held)"
            ) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if not stat.S_ISSOCK(st.st_mode):
                    raise ControlUnavailable(f"{self.path} exists and is not a socket")
                os.unlink(self.path)  # a leftover of an earlier run (we hold the lock)
            sock.bind(str(self.path))
            os.chmod(self.path, SOCKET_MODE)
            self._ino = os.stat(self.path).st_ino
            sock.listen(MAX_CLIENTS)
            sock.settimeout(0.5)
        except ControlUnavailable:
            sock.close()
            os.close(lock_fd)
            raise
        except OSError as exc:
            sock.close()
            os.close(lock_fd)
            raise ControlUnavailable(
                f"cannot listen on {self.path}: {exc.strerror or exc}"
            ) from None
        self._sock, self._lock_fd = sock, lock_fd
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s (mode %04o)", self.path, SOCKET_MODE)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            self._sock = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def count(self, cmd: str, result: str) -> None:
        key = (cmd if cmd in COMMANDS else "other", result)
        with self._count_lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def _accept_loop(self) -> None:
        if self._sock is None:
            raise RuntimeError("internal error: self._sock is None")
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                _send_quietly(conn, _error("busy", "too many control connections; try again"))
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        cmd = "other"
        try:
            conn.settimeout(READ_TIMEOUT_S)
            peer = peer_of(conn)
            why = refusal(peer, self._socket_gid(), self.daemon_uid)
            if why:
                log.warning("control: refused pid=%d uid=%d: %s", peer.pid, peer.uid, why)
                self.count(cmd, "refused")
                with contextlib.suppress(ControlFault, OSError):
                    conn.settimeout(2.0)
                    _read_request(conn)  # let the client finish writing: it reads the answer
                _send_quietly(conn, _error("refused", why))
                return
            request = _read_request(conn)
            cmd = str(request.get("cmd", ""))
            conn.settimeout(None)
            gone = threading.Event()

            def emit(text: str | None) -> None:
                if gone.is_set():
                    return
                msg: dict[str, Any] = {"v": PROTOCOL_VERSION}
                msg.update({"keepalive": True} if text is None else {"progress": text})
                try:
                    _send(conn, msg)
                except OSError:
                    gone.set()  # the client left; the command itself goes on

            args = {k: v for k, v in request.items() if k not in ("v", "cmd")}
            log.info("control: %s from %s", cmd, peer.name)
            result = self.handler(cmd, args, peer, emit)
            self.count(cmd, "ok")
            _send_quietly(conn, {"v": PROTOCOL_VERSION, "ok": True, **result})
        except ControlFault as exc:
            self.count(cmd, "error")
            _send_quietly(conn, _error(exc.kind, str(exc)))
        except ConfigError as exc:
            self.count(cmd, "error")
            _send_quietly(conn, _error("bad-request", "\n".join(exc.problems)))
        except BalancerdError as exc:
            self.count(cmd, "error")
            _send_quietly(conn, _error("failed", str(exc)))
        except Exception as exc:  # a bug: logged once, the daemon goes on
            log.exception("control: %s failed", cmd)
            self.count(cmd, "error")
            _send_quietly(conn, _error("internal", f"internal error: {exc!r}"))
        finally:
            conn.close()
            self._slots.release()

    def _socket_gid(self) -> int:
        try:
            return os.stat(self.path).st_gid
        except OSError:
            return os.getegid()


def _read_request(conn: socket.socket) -> dict[str, Any]:
    buf = bytearray()
    while b"\n" not in buf:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise ControlFault("bad-request", "no request within the time allowed") from None
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_MESSAGE_BYTES:
            raise ControlFault("bad-request", "request too large")
    try:
        request = json.loads(bytes(buf).split(b"\n", 1)[0])
    except ValueError as exc:
        raise ControlFault("bad-request", f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ControlFault("bad-request", 'expected {"v": 1, "cmd": "..."}')
    if request.get("v") != PROTOCOL_VERSION:
        raise ControlFault(
            "version",
            f"protocol version {request.get('v')!r} is not spoken here "
            f"(this daemon speaks {PROTOCOL_VERSION}); use a balancerd of the same release",
        )
    return request


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "kind": kind, "error": message}


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall(json.dumps(msg, default=str).encode() + b"\n")


def _send_quietly(conn: socket.socket, msg: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        _send(conn, msg)


def stream(fn: Callable[[], Any], events: EventHub, emit: Emit) -> Any:
    """Run ``fn`` on a worker thread; meanwhile pass the daemon's events to ``emit`` and
    keep the connection alive. Returns ``fn``'s value or raises its exception."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    with events.subscribe() as q:
        t = threading.Thread(target=work, name="control-work", daemon=True)
        t.start()
        while t.is_alive() or not q.empty():
            try:
                emit(q.get(timeout=KEEPALIVE_S if t.is_alive() else 0.01))
            except queue.Empty:
                if t.is_alive():
                    emit(None)
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --- the daemon's commands ---------------------------------------------------------------


class ControlHandlers:
    """The commands, as the daemon serves them."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def __call__(self, cmd: str, args: dict[str, Any], peer: Peer, emit: Emit) -> dict[str, Any]:
        handler = {
            "status": self.status,
            "snapshot": self.snapshot,
            "drain": self.drain,
            "undrain": self.undrain,
            "drain-status": self.drain_status,
            "pause": self.pause,
            "resume": self.resume,
            "cycle": self.cycle,
            "approve": self.approve,
            "history": self.history,
            "explain": self.explain,
        }.get(cmd)
        if handler is None:
            raise ControlFault(
                "bad-request", f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})"
            )
        if cmd in ACTING:
            self._must_lead()
        return handler(args, peer, emit)

    def _must_lead(self) -> None:
        why = self.d.coord.not_leading()
        if why:
            lead = self.d.coord.leadership()
            raise ControlFault(
                "failed",
                f"this balancerd ({lead.node}) does not act: {why}; run the command on the "
                f"node that leads ({lead.leader or 'unknown'})",
            )

    # --- state ---------------------------------------------------------------------------

    def status(self, _args: dict[str, Any], _peer: Peer, _emit: Emit) -> dict[str, Any]:
        d = self.d
        policy = resolved_policy(d)
        report = d.rt.last_report
        return {
            "pid": os.getpid(),
            "policy": policy.name,
            "mode": str(policy.mode),
            "maintenance": list(d.operator.apply_to(policy).constraints.maintenance),
            **d.operator.to_json(),
            "last_cycle": None if report is None else report.summary(),
            "in_flight": d.stats.summary().get("in_flight", []),
        }

    def snapshot(self, _args: dict[str, Any], _peer: Peer, _emit: Emit) -> dict[str, Any]:
        """The latest smoothed snapshot, for ``plan`` and ``status`` (no host is asked)."""
        latest = self.d.latest()
        if latest.snapshot is None or latest.taken_at_mono is None:
            raise ControlFault("failed", "no snapshot yet: the daemon is starting")
        return {
            "snapshot": snapshot_to_json(latest.snapshot),
            "age_s": round(time.monotonic() - latest.taken_at_mono, 1),
            "window": self.d.config.smoothing_window,
            "interval_s": self.d.config.collect_interval_s,
        }

    def _host(self, args: dict[str, Any]) -> str:
        host = args.get("host")
        if not isinstance(host, str) or not host:
            raise ControlFault("bad-request", "missing host")
        names = [h.name for h in self.d.config.hosts]
        if host not in names:
            raise ControlFault(
                "bad-request", f"unknown host {host!r} (configured: {', '.join(names)})"
            )
        return host

    def drain(self, args: dict[str, Any], peer: Peer, _emit: Emit) -> dict[str, Any]:
        d = self.d
        host = self._host(args)
        reason = str(args.get("reason") or "")
        new = d.operator.drain(host, peer.name, reason)
        d.operator_changed()
        policy = resolved_policy(d)
        merged = d.operator.apply_to(policy)
        usable = [
            h.name
            for h in d.config.hosts
            if h.name not in merged.constraints.maintenance
            and h.name not in policy.constraints.exclude_hosts
        ]
        snapshot = d.rt.snapshot
        guests = (
            sorted(v.name for v in (*snapshot.vms_on(host), *snapshot.stopped_on(host)))
            if snapshot is not None
            else []
        )
        if new:
            log.info("drain host=%s by=%s reason=%s", host, peer.name, reason or "-")
            d.request_cycle()  # decide now, not a whole cycle interval later
        mark = d.operator.drains()[host]
        return {
            "host": host,
            "already": not new,
            "drain": mark.to_json(),
            "guests": guests,
            "paused": d.operator.paused() is not None,
            "warning": "" if usable else "no host is left to take guests: they stay where they are",
        }

    def undrain(self, args: dict[str, Any], peer: Peer, _emit: Emit) -> dict[str, Any]:
        d = self.d
        host = self._host(args)
        mark = d.operator.undrain(host)
        d.operator_changed()
        policy = resolved_policy(d)
        if mark is not None:
            log.info("undrain host=%s by=%s", host, peer.name)
        return {
            "host": host,
            "was_drained": mark is not None,
            "drain": None if mark is None else mark.to_json(),
            "policy_maintenance": host in policy.constraints.maintenance,
            "policy": policy.name,
        }

    def pause(self, args: dict[str, Any], peer: Peer, _emit: Emit) -> dict[str, Any]:
        d = self.d
        earlier = d.operator.pause(peer.name, str(args.get("reason") or ""))
        d.operator_changed()
        if earlier is None:
            log.warning("paused by=%s reason=%s", peer.name, args.get("reason") or "-")
        mark = d.operator.paused()
        if mark is None:
            raise RuntimeError("internal error: mark is None")
        return {
            "already": earlier is not None,
            "paused": mark.to_json(),
            "in_flight": d.stats.summary().get("in_flight", []),
        }

    def resume(self, _args: dict[str, Any], peer: Peer, _emit: Emit) -> dict[str, Any]:
        d = self.d
        mark = d.operator.resume()
        d.operator_changed()
        if mark is not None:
            log.warning(
                "resumed by=%s (paused %s)", peer.name, human_duration(time.time() - mark.since_s)
            )
        return {"was_paused": mark is not None, "paused": None if mark is None else mark.to_json()}

    def drain_status(self, args: dict[str, Any], _peer: Peer, _emit: Emit) -> dict[str, Any]:
        """What is left on a drained host and why each guest is still there."""
        d = self.d
        host = self._host(args)
        mark = d.operator.drains().get(host)
        policy = resolved_policy(d)
        in_maintenance = mark is not None or host in policy.constraints.maintenance
        latest = d.latest()
        snapshot, taken_at, report, inputs = (
            latest.snapshot,
            latest.taken_at_mono,
            latest.report,
            latest.inputs,
        )
        if snapshot is None or taken_at is None:
            raise ControlFault("failed", "no snapshot yet: the daemon is starting")
        in_flight = [
            m for m in d.stats.summary().get("in_flight", []) if host in (m["src"], m["dst"])
        ]
        since_s = mark.since_s if mark is not None else 0.0
        fresh = report is not None and latest.decided_at_s >= since_s
        paused = d.operator.paused()
        guests = []
        running = latest.plan if latest.plan_at_s > latest.decided_at_s else None
        if running is not None and latest.plan_at_s < since_s:
            running = None  # (a cycle that started before the drain)
        # stopped guests too: a drain moves them cold, the host is not empty before
        for v in (*snapshot.vms_on(host), *snapshot.stopped_on(host)):
            why, stuck = self._why_still_there(
                v.name, host, report, inputs, fresh, in_flight, running
            )
            if paused is not None and not any(m["vm"] == v.name for m in in_flight):
                why, stuck = f"balancerd is paused (by {paused.by}): `balancerd resume`", False
            guests.append({"vm": v.name, "state": v.state, "why": why, "stuck": stuck})
        return {
            "host": host,
            "drained": mark is not None,
            "maintenance": in_maintenance,
            "empty": not guests and not in_flight,
            "guests": guests,
            "in_flight": in_flight,
            "snapshot_age_s": round(time.monotonic() - taken_at, 1),
            "last_cycle_at": None if report is None else report.at,
            "cycle_since_drain": fresh,
            "paused": paused is not None,
        }

    def _why_still_there(  # noqa: C901 (one branch per reason a guest stays; a flat table)
        self,
        vm: str,
        host: str,
        report: CycleReport | None,
        inputs: CycleInputs | None,
        fresh: bool,
        in_flight: list[dict[str, Any]],
        running: Plan | None = None,
    ) -> tuple[str, bool]:
        for m in in_flight:
            if m["vm"] == vm:
                return f"migrating to {m['dst']} (id {m['migration_id']})", False
        for move in running.moves if running is not None else ():
            if move.vm == vm:
                return f"planned to {move.dst} in the running cycle, waiting for its turn", False
        if report is None or not fresh:
            return "waiting for the next cycle", False
        for r in report.results:
            if r.vm == vm and r.src == host:
                if r.outcome is MoveOutcome.MIGRATED:
                    return f"moved to {r.dst}; waiting for the next collection", False
                return f"{r.outcome} at {report.at}: {r.reason}", False
        for move in report.plan.moves:
            if move.vm == vm:
                if report.held_back is not None:
                    held = held_text(report.held_back)
                    return f"planned to {move.dst}, not executed: {held}", False
                return f"planned to {move.dst}", False
        for note in report.plan.notes:
            if note.startswith((f"guest {vm} ", f"stopped guest {vm} ")):
                return note, True
        if inputs is not None:
            rules = standing_rules(vm, inputs.policy)
            if rules:
                return "; ".join(rules), True
        reason = report.plan.reason or "the cycle's budget left it for a later cycle"
        return f"not in the plan of {report.at}: {reason}", False

    # --- acting ----------------------------------------------------------------------------

    def cycle(self, _args: dict[str, Any], _peer: Peer, emit: Emit) -> dict[str, Any]:
        d = self.d
        report = stream(d.cycle_once, d.events, emit)
        if report is None:
            error = d.stats.summary().get("last_cycle_error") or "not enough samples yet"
            raise ControlFault("failed", f"no cycle ran: {error}")
        return {
            "cycle": report.summary(),
            "held_back_text": held_text(report.held_back) if report.held_back else "",
            "moves": [
                {"vm": m.vm, "from": m.src, "to": m.dst, "wave": m.wave} for m in report.plan.moves
            ],
            "results": [r.to_json() for r in report.results],
            "notes": list(report.plan.notes),
        }

    def approve(self, args: dict[str, Any], peer: Peer, emit: Emit) -> dict[str, Any]:
        d = self.d
        paused = d.operator.paused()
        if paused is not None:
            raise ControlFault(
                "failed",
                f"balancerd is paused (by {paused.by} since {paused.since}"
                f"{': ' + paused.reason if paused.reason else ''}): an approved plan runs only "
                "while balancerd may act; `balancerd resume` first",
            )
        active, _ = d.active()
        if active.frozen:
            raise ControlFault("failed", "a freeze window is open: no migrations until it closes")
        age_s: float | None
        if args.get("latest"):
            saved, age_s = self._latest()
        else:
            saved = parse_plan(args.get("plan"), str(args.get("source") or "the plan sent"))
            age_s = time.time() - saved.created_at_s if saved.created_at_s else None
        if not saved.moves:
            return {"checks": [], "results": [], "policy": saved.policy, "age_s": age_s}
        log.info(
            "approved plan policy=%s moves=%d by=%s", saved.policy, len(saved.moves), peer.name
        )

        def work() -> tuple[list[Any], list[MoveResult]]:
            return self._run_approved(saved)

        checks, results = stream(work, d.events, emit)
        return {
            "policy": saved.policy,
            "age_s": None if age_s is None else round(age_s, 1),
            "checks": [c.to_json() for c in checks],
            "results": [r.to_json() for r in results],
        }

    def _run_approved(self, saved: SavedPlan) -> tuple[list[Any], list[MoveResult]]:
        d = self.d
        with d.acting():
            _, active_policy = d.active()
            snapshot = d.fresh_snapshot()
            policy = resolve_policy(d.operator.apply_to(active_policy), snapshot)
            checks = check_steps(saved, snapshot, policy)
            for c in checks:
                if not c.ok:
                    d.events.publish(
                        f"{c.move.vm} {c.move.src}->{c.move.dst}: stale, skipped: {c.reason}"
                    )
            moves = valid_moves(checks, snapshot)
            executed: list[MoveResult] = []
            if moves:
                plan = replace(saved.as_plan(), moves=tuple(moves))
                executed = d.execute_plan(plan, policy, approved=True)
            results = merge_results(checks, executed)
            for c, r in zip(checks, results, strict=True):
                if not c.ok:
                    d.stats.record_skip(r.skip_kind or SkipKind.STALE)
            if d.history is not None:
                rec = build_record(
                    at_s=time.time(),
                    kind="approved",
                    plan=saved.as_plan(),
                    policy_mode=str(policy.mode),
                    planning=snapshot,
                    whys=[m.why for m in saved.moves],
                    results=results,
                    drained=d.operator.drained(),
                )
                d.history.add(rec)
        return list(checks), results

    def _latest(self) -> tuple[SavedPlan, float]:
        d = self.d
        latest = d.latest()
        report, inputs = latest.report, latest.inputs
        if report is None or inputs is None:
            raise ControlFault(
                "failed", "no plan yet: the daemon has not run a cycle (`balancerd cycle`)"
            )
        if report.results:
            raise ControlFault(
                "failed",
                f"the latest plan ({report.at}) was executed by its cycle: nothing waits for "
                "approval",
            )
        planning, planning_policy, _ = set_aside_duplicates(inputs.planning, inputs.policy)
        drained = d.operator.drained()
        whys = explain_moves(
            planning,
            planning_policy,
            report.plan,
            drained=drained,
            last_moved_s=inputs.last_moved_s,
            now_s=inputs.now_s,
        )
        at_s = latest.decided_at_s or _report_at_s(report)
        doc = plan_document(
            report.plan,
            inputs.snapshot,
            inputs.policy,
            whys,
            created_at_s=at_s,
            drained=drained,
            source="daemon",
        )
        return parse_plan(doc, "the daemon's latest plan"), time.time() - at_s

    # --- reading ---------------------------------------------------------------------------

    def _history(self) -> History:
        if self.d.history is None:
            raise ControlFault(
                "failed", "the daemon keeps no history (see its log: it could not open it)"
            )
        return self.d.history

    def history(self, args: dict[str, Any], _peer: Peer, _emit: Emit) -> dict[str, Any]:
        since_s = args.get("since_s")
        vm = args.get("vm")
        limit = int(args.get("limit") or 50)
        if since_s is not None and not isinstance(since_s, int | float):
            raise ControlFault("bad-request", "since_s must be a number (unix time)")
        if vm is not None and not isinstance(vm, str):
            raise ControlFault("bad-request", "vm must be a string")
        return {"cycles": self._history().cycles(since_s=since_s, vm=vm, limit=max(1, limit))}

    def explain(self, args: dict[str, Any], _peer: Peer, _emit: Emit) -> dict[str, Any]:
        vm = args.get("vm")
        if not isinstance(vm, str) or not vm:
            raise ControlFault("bad-request", "missing vm")
        doc = self._history().explain(vm, limit=max(1, int(args.get("limit") or 10)))
        policy = resolved_policy(self.d)
        doc["standing_rules"] = standing_rules(vm, policy)
        snapshot = self.d.rt.snapshot
        where = snapshot.vm(vm) if snapshot is not None else None
        doc["now_on"] = None if where is None else where.host
        doc["lines"] = explain_lines(doc, time.time())
        return doc


def resolved_policy(d: Daemon) -> Policy:
    """The active policy with its selectors resolved on the latest snapshot (as the cycle
    resolves them), so status, drains and metrics name the same hosts."""
    _, policy = d.active()
    snapshot = d.rt.snapshot
    return policy if snapshot is None else resolve_policy(policy, snapshot)


def _report_at_s(report: CycleReport) -> float:
    try:
        return datetime.fromisoformat(report.at).timestamp()
    except ValueError:
        return 0.0


# --- history of the daemon's cycles ----------------------------------------------------------


def record_cycle(
    history: History | None,
    inputs: CycleInputs,
    report: CycleReport,
    drained: Iterable[str],
    *,
    at_s: float | None = None,
) -> None:
    """One cycle into the history: its moves with reasons, benefit and cost, what became
    of them, and the guests held back by a reason of the moment. Never raises."""
    if history is None:
        return
    try:
        planning, planning_policy, _ = set_aside_duplicates(inputs.planning, inputs.policy)
        drained = tuple(drained)
        whys = explain_moves(
            planning,
            planning_policy,
            report.plan,
            drained=drained,
            last_moved_s=inputs.last_moved_s,
            now_s=inputs.now_s,
        )
        held = holds(
            planning,
            planning_policy,
            notes=report.plan.notes,
            last_moved_s=inputs.last_moved_s,
            now_s=inputs.now_s,
        )
        rec = build_record(
            at_s=at_s or _report_at_s(report) or time.time(),
            kind="cycle",
            plan=report.plan,
            policy_mode=str(inputs.policy.mode),
            planning=planning,
            whys=whys,
            results=report.results,
            held_back=report.held_back,
            drained=drained,
            holds=held,
        )
        history.add(rec)
    except Exception:  # history is never a reason for a cycle to fail
        history.write_failures += 1
        log.exception("history: cannot record the cycle")


# --- metrics ------------------------------------------------------------------------------


class OperatorCollector(Collector):
    """``balancerd_host_maintenance``, ``balancerd_paused``, control requests, and what the
    alert rules compare against (cycle interval, start time, watchdog stall)."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        d = self.d
        policy = resolved_policy(d)
        drained = set(d.operator.drained())
        maint = GaugeMetricFamily(
            "balancerd_host_maintenance",
            "1 for a host in maintenance, by source (operator: balancerd drain; policy).",
            labels=["host", "source"],
        )
        for host in sorted(drained):
            maint.add_metric([host, "operator"], 1.0)
        for host in sorted(set(policy.constraints.maintenance)):
            maint.add_metric([host, "policy"], 1.0)
        yield maint
        yield GaugeMetricFamily(
            "balancerd_paused",
            "1 while an operator has paused balancerd (it observes and plans, moves nothing).",
            value=1.0 if d.operator.paused() is not None else 0.0,
        )
        requests = CounterMetricFamily(
            "balancerd_control_requests",
            "Control socket requests by command and result.",
            labels=["command", "result"],
        )
        control = d.control
        counts = dict(control.requests) if control is not None else {}
        for (cmd, result), n in sorted(counts.items()):
            requests.add_metric([cmd, result], float(n))
        yield requests
        yield GaugeMetricFamily(
            "balancerd_cycle_interval_seconds",
            "Configured seconds between cycles (cycle_interval_s).",
            value=float(d.config.cycle_interval_s),
        )
        yield GaugeMetricFamily(
            "balancerd_start_time_seconds",
            "Unix time the daemon started.",
            value=float(d.stats.started_at_s),
        )
        yield GaugeMetricFamily(
            "balancerd_watchdog_stalled_seconds",
            "Seconds the most stuck running job has gone without progress (0: none).",
            value=d.watchdog.stalled_s(),
        )
        yield GaugeMetricFamily(
            "balancerd_watchdog_timeout_seconds",
            "Seconds without progress after which the systemd watchdog is starved "
            "(stall_timeout_s).",
            value=float(d.config.stall_timeout_s),
        )
        failures = 0 if d.history is None else d.history.write_failures
        yield CounterMetricFamily(
            "balancerd_history_write_failures",
            "Cycles that could not be recorded in the history.",
            value=float(failures),
        )
