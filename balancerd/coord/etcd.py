"""Leadership, fencing and the migration journal in etcd, through tooz's etcd3gw driver.

The only module that imports tooz and etcd3gw.

Leadership is the tooz lock ``/balancerd/CLUSTER/leader`` (key ``/tooz/locks/balancerd/
CLUSTER/leader``), held with an etcd lease of ``lock_ttl_s``. A keeper thread

* while standing by: reads the lock key; when it is absent, tries the lock once
  (non-blocking). Having it, it reads the key back: the key's etcd **create revision** is
  the fencing token (it grows with every new holder);
* while leading: refreshes the lease every ``ttl/4`` s and reads the key back. The lease
  is known to last until ``t_sent + ttl`` (``t_sent``: when the refresh was sent; etcd
  counts from when it received it, later). This process acts only until
  ``t_sent + LEASE_SHARE * ttl``: a leader cut off from etcd stops starting steps (and
  cancels the migrations it runs) before etcd can expire its lease and hand the lock on.

tooz's own ``heartbeat`` refreshes the lease but does not notice that the lock is gone
(an expired lease, another holder): the read-back does.

Fenced writes are etcd transactions whose compare is "the lock key's create revision is
still our token": the journal's intents and phases, the power switches. A deposed leader's
write is refused by etcd itself, whatever its clock says.

Several endpoints (one scheme, one set of TLS files): the driver talks to one at a time;
when one does not answer, the next request goes to the next endpoint (the lease and the
lock belong to the cluster, not to a member, so nothing is lost by switching).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import etcd3gw
from tooz import coordination
from tooz.drivers.etcd3gw import Etcd3Lock

from balancerd.config import CoordinationConfig
from balancerd.coord.base import CoordinationError, Leadership, NotLeader
from balancerd.execute.journal import Entry, JournalStore
from balancerd.outcomes import new_migration_id
from balancerd.statelock import StateLock

log = logging.getLogger(__name__)

# The share of the lease this process acts within (clock-rate drift, time between the
# last check and an action).
LEASE_SHARE = 0.9
MIN_REQUEST_TIMEOUT_S = 0.5


def _why(exc: BaseException) -> str:
    """An exception as one short line (etcd3gw's timeouts have no text of their own)."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class _LockKey:
    revision: int  # create revision: the holder's fencing token
    value: bytes


class EtcdCoordinator:
    backend = "etcd"

    def __init__(
        self, cfg: CoordinationConfig, state_dir: str | Path, holder: str = "daemon"
    ) -> None:
        if not cfg.endpoints:
            raise CoordinationError("coordination.endpoints is empty")
        self.cfg = cfg
        self.node = cfg.node or socket.gethostname()
        self.state_lock = StateLock(state_dir, holder)
        self.ttl_s = cfg.lock_ttl_s
        self.request_timeout_s = max(MIN_REQUEST_TIMEOUT_S, self.ttl_s / 4)
        self.poll_s = min(1.0, self.ttl_s / 4)
        self.prefix = f"/balancerd/{cfg.cluster}/"
        self._lock_name = f"/balancerd/{cfg.cluster}/leader".encode()
        self._lock_key = Etcd3Lock.LOCK_PREFIX + self._lock_name
        self._mu = threading.RLock()
        self._driver: Any = None
        self._started = False
        self._endpoint = 0
        self._lock: Any = None  # the tooz lock while we hold it
        self._token = 0
        self._deadline = 0.0  # monotonic: we act until then
        self._reason = "not started"  # why we do not lead (while _lock is None)
        self._error = ""  # the last failure to reach etcd ("" after a success)
        self._leader = ""
        self._epoch = 0
        self._was_leading = False
        self._fenced = 0
        self._refused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_change: Callable[[Leadership], None] = lambda _l: None
        self._journal = EtcdJournal(self)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, *, wait_s: float, on_change: Callable[[Leadership], None]) -> None:
        self.state_lock.acquire(wait_s=wait_s)
        self._on_change = on_change
        self._stop.clear()
        self._tick()  # a sole instance leads from the start
        self._thread = threading.Thread(target=self._keeper, name="coord-keeper", daemon=True)
        self._thread.start()
        log.info(
            "coordination backend=etcd node=%s cluster=%s endpoints=%s lock_ttl_s=%d",
            self.node,
            self.cfg.cluster,
            ",".join(self.cfg.endpoints),
            self.ttl_s,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.request_timeout_s * 4 + 1)
        with self._mu:
            lock, self._lock = self._lock, None
            self._reason = "stopped"
        if lock is not None:
            try:  # a compare-and-delete on our own value: never someone else's lock
                lock.release()
                log.info("coordination: released the leader lock node=%s", self.node)
            except Exception as exc:
                log.warning("coordination: could not release the leader lock: %s", exc)
        if self._driver is not None and self._started:
            with contextlib.suppress(Exception):
                self._driver.stop()
        self._started = False
        self.state_lock.release()

    def _keeper(self) -> None:
        wait_s = self.poll_s
        while not self._stop.wait(wait_s):
            self._tick()
            # After a failure the next endpoint is asked at once (a member that died, an
            # etcd leader election): the lease share is only a few request timeouts long.
            wait_s = min(self.poll_s, 0.1) if self._error else self.poll_s

    # --- the keeper's work --------------------------------------------------------------

    def _client(self) -> Any:
        if self._driver is None:
            self._driver = self._make_driver()
        return self._driver.client

    def _make_client(self, endpoint: str) -> Any:
        u = urlsplit(endpoint)
        tls = self.cfg.tls
        return etcd3gw.client(
            host=u.hostname or "localhost",
            port=u.port or 2379,
            protocol=u.scheme or "http",
            ca_cert=tls.ca_file or None,
            cert_key=tls.key_file or None,
            cert_cert=tls.cert_file or None,
            timeout=self.request_timeout_s,
        )

    def _make_driver(self) -> Any:
        endpoint = self.cfg.endpoints[self._endpoint]
        u = urlsplit(endpoint)
        options = {"timeout": max(1, round(self.request_timeout_s)), "lock_timeout": self.ttl_s}
        url = f"etcd3+{u.scheme or 'http'}://{u.netloc}?{urlencode(options)}"
        driver: Any = coordination.get_coordinator(url, self.node.encode())
        # Our own client: a float request timeout and TLS files; replaced per endpoint.
        driver.client = self._make_client(endpoint)
        return driver

    def _rotate(self) -> None:
        """The next request goes to the next endpoint. The one client object is re-aimed
        (not replaced): tooz's lock keeps its lease object, and that holds the client it
        was created with."""
        if len(self.cfg.endpoints) < 2 or self._driver is None:
            return
        self._endpoint = (self._endpoint + 1) % len(self.cfg.endpoints)
        u = urlsplit(self.cfg.endpoints[self._endpoint])
        client = self._driver.client
        client.host, client.port = u.hostname or "localhost", u.port or 2379

    def _tick(self) -> None:
        try:
            self._client()
            if not self._started:
                self._driver.start()
                self._started = True
            if self._lock is not None:
                self._keep()
            else:
                self._try_lead()
            with self._mu:
                self._error = ""
        except Exception as exc:  # unreachable, no quorum, a bad answer: retried next tick
            self._unreachable(exc)
        self._notify_if_changed()

    def _read_lock(self) -> _LockKey | None:
        kvs = self._client().get(self._lock_key, metadata=True)
        if not kvs:
            return None
        value, meta = kvs[0]
        return _LockKey(int(meta["create_revision"]), bytes(value))

    def _keep(self) -> None:
        t_sent = time.monotonic()
        self._lock.heartbeat()  # refreshes the lease (tooz ignores an expired one)
        key = self._read_lock()
        with self._mu:
            if key is None or key.revision != self._token:
                why = (
                    "the lock's lease expired"
                    if key is None
                    else f"another instance holds the lock (revision {key.revision})"
                )
                self._lose(f"lost the leader lock: {why}")
                return
            self._deadline = t_sent + LEASE_SHARE * self.ttl_s

    def _try_lead(self) -> None:
        key = self._read_lock()
        if key is not None:
            leader = self._leader_of(key.revision)
            with self._mu:
                self._leader = leader
                who = leader or "another instance"
                self._reason = f"standby: {who} leads (lock revision {key.revision})"
            return
        t_sent = time.monotonic()
        lock = self._driver.get_lock(self._lock_name)
        if not lock.acquire(blocking=False):
            return
        key = self._read_lock()
        ours = getattr(lock, "_uuid", None)
        mine = key is not None and (ours is None or _b64(key.value) == ours)
        if key is None or not mine or time.monotonic() - t_sent > self.ttl_s / 2:
            with contextlib.suppress(Exception):
                lock.release()
            return
        with self._mu:
            self._lock = lock
            self._token = key.revision
            self._deadline = t_sent + LEASE_SHARE * self.ttl_s
            self._leader = self.node
            self._reason = ""
        log.warning(
            "coordination: this instance leads now node=%s token=%d", self.node, key.revision
        )
        with contextlib.suppress(CoordinationError):
            self.fenced_write(
                [
                    (
                        "put",
                        self.prefix + "leader-info",
                        json.dumps({"node": self.node, "token": key.revision, "at": time.time()}),
                    )
                ]
            )

    def _leader_of(self, revision: int) -> str:
        try:
            kvs = self._client().get(self.prefix + "leader-info")
            info = json.loads(kvs[0]) if kvs else {}
        except Exception:
            return ""
        return str(info.get("node", "")) if info.get("token") == revision else ""

    def _unreachable(self, exc: BaseException) -> None:
        text = _why(exc)
        endpoint = self.cfg.endpoints[self._endpoint]
        with self._mu:
            self._error = f"etcd at {endpoint} did not answer: {text}"
            if self._lock is None:
                self._reason = f"standby: cannot reach etcd ({self._error})"
        log.debug("coordination: %s", self._error)
        self._rotate()

    def _lose(self, why: str) -> None:
        with self._mu:
            if self._lock is None:
                return
            self._lock = None
            self._token = 0
            self._leader = ""
            self._reason = why
        log.error("coordination: %s; this instance no longer acts node=%s", why, self.node)

    def _notify_if_changed(self) -> None:
        with self._mu:
            leading = self.not_leading() == ""
            changed = leading != self._was_leading
            self._was_leading = leading
            if changed and leading:
                self._epoch += 1
        if changed:
            state = self.leadership()
            if not leading:
                log.error("coordination: not acting: %s", state.reason)
            self._on_change(state)

    # --- what the daemon asks -----------------------------------------------------------

    def not_leading(self) -> str:
        with self._mu:
            if self._lock is None:
                return self._reason or "not leading"
            left = self._deadline - time.monotonic()
            if left > 0:
                return ""
            return (
                f"the leader lease was not confirmed for {LEASE_SHARE * self.ttl_s:.1f} s "
                f"({self._error or 'etcd did not answer'}): not acting until etcd "
                "confirms the lock again"
            )

    def leadership(self) -> Leadership:
        with self._mu:
            reason = self.not_leading()
            left = self._deadline - time.monotonic() if self._lock is not None else None
            return Leadership(
                backend=self.backend,
                node=self.node,
                leading=not reason,
                leader=self._leader,
                token=self._token,
                reason=reason,
                epoch=self._epoch,
                lease_left_s=None if left is None else max(0.0, left),
                fenced=self._fenced,
                refused=self._refused,
            )

    def fence(self, action: str, subject: str, detail: dict[str, Any]) -> None:
        record = {"action": action, "subject": subject, "node": self.node, "at": time.time()}
        value = json.dumps({**record, **detail})
        self.fenced_write([("put", f"{self.prefix}actions/{subject}", value)])

    def journal(self) -> JournalStore:
        return self._journal

    # --- fenced writes ------------------------------------------------------------------

    def require_leading(self) -> None:
        """Raise ``NotLeader`` (counted as a refused write) unless we lead now."""
        why = self.not_leading()
        if why:
            with self._mu:
                self._refused += 1
            raise NotLeader(why)

    def fenced_write(self, ops: list[tuple[str, str, str]]) -> int:
        """One etcd transaction of ``ops`` (("put", key, value) / ("delete", key, "")),
        applied only while the lock key still has our create revision. Returns the store
        revision after it."""
        self.require_leading()
        token = self._token
        success: list[dict[str, Any]] = []
        for op, key, value in ops:
            if op == "put":
                success.append({"request_put": {"key": _b64(key), "value": _b64(value)}})
            else:
                success.append({"request_delete_range": {"key": _b64(key)}})
        txn = {
            "compare": [
                {
                    "key": _b64(self._lock_key),
                    "result": "EQUAL",
                    "target": "CREATE",
                    "create_revision": token,
                }
            ],
            "success": success,
            "failure": [],
        }
        try:
            result = self._client().transaction(txn)
        except Exception as exc:
            with self._mu:
                self._refused += 1
            raise CoordinationError(f"etcd did not confirm a fenced write: {_why(exc)}") from None
        if not result.get("succeeded"):
            with self._mu:
                self._refused += 1
            self._lose(f"etcd refused a fenced write: the lock is no longer ours (token {token})")
            self._notify_if_changed()
            raise NotLeader(f"the leader lock is no longer ours (token {token})")
        why = self.not_leading()
        if why:  # the answer came after our lease share ran out
            with self._mu:
                self._refused += 1
            raise NotLeader(why)
        with self._mu:
            self._fenced += 1
        return int(result["header"]["revision"])

    def read_prefix(self, prefix: str, **kw: Any) -> list[tuple[bytes, dict[str, Any]]]:
        try:
            return list(self._client().get_prefix(prefix, **kw))
        except Exception as exc:
            raise CoordinationError(f"cannot read {prefix} from etcd: {_why(exc)}") from None

    def read_range(self, key: str, end: str, **kw: Any) -> list[tuple[bytes, dict[str, Any]]]:
        try:
            return list(self._client().get(key, metadata=True, range_end=end, **kw))
        except Exception as exc:
            raise CoordinationError(f"cannot read {key} from etcd: {_why(exc)}") from None


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class EtcdJournal:
    """The migration journal in etcd: ``PREFIX/journal/open/MIGRATION_ID`` while a
    migration is open (its entry id: that key's create revision), moved to
    ``PREFIX/journal/done/ID`` with its outcome, in one fenced transaction. Every write
    is fenced: only the leader writes the journal, and the leader owns every open entry
    (a new leader reconciles the old one's)."""

    moved_aside = ""

    def __init__(self, coord: EtcdCoordinator) -> None:
        self._c = coord
        self._open = coord.prefix + "journal/open/"
        self._done = coord.prefix + "journal/done/"
        self._recs = coord.prefix + "reconciliations/"
        self._pid = os.getpid()

    def close(self) -> None:
        pass

    def begin(
        self,
        vm: str,
        vm_uuid: str,
        src: str,
        dst: str,
        vm_state: str,
        *,
        migration_id: str = "",
    ) -> int:
        mid = migration_id or new_migration_id()
        record = {
            "vm": vm,
            "vm_uuid": vm_uuid,
            "src": src,
            "dst": dst,
            "vm_state": vm_state,
            "pid": self._pid,
            "node": self._c.node,
            "token": self._c.leadership().token,
            "phase": "intent",
            "started_at": time.time(),
            "outcome": None,
            "mode": "",
            "detail": "",
            "migration_id": mid,
        }
        return self._c.fenced_write([("put", self._open + mid, json.dumps(record))])

    def _find(self, entry_id: int) -> tuple[str, dict[str, Any]]:
        self._c.require_leading()  # a deposed leader gets NotLeader, not "not open"
        for value, meta in self._c.read_prefix(self._open):
            if int(meta["create_revision"]) == entry_id:
                return str(meta["key"].decode()), json.loads(value)
        raise CoordinationError(f"journal entry {entry_id} is not open in etcd")

    def phase(self, entry_id: int, phase: str) -> None:
        key, record = self._find(entry_id)
        record["phase"] = phase
        self._c.fenced_write([("put", key, json.dumps(record))])

    def finish(self, entry_id: int, outcome: str, mode: str = "", detail: str = "") -> None:
        key, record = self._find(entry_id)
        record.update(
            id=entry_id, outcome=outcome, mode=mode, detail=detail, finished_at=time.time()
        )
        done = f"{self._done}{entry_id:020d}"
        self._c.fenced_write([("delete", key, ""), ("put", done, json.dumps(record))])

    @staticmethod
    def _entry(entry_id: int, r: dict[str, Any]) -> Entry:
        return Entry(
            id=entry_id,
            vm=str(r["vm"]),
            vm_uuid=str(r.get("vm_uuid", "")),
            src=str(r["src"]),
            dst=str(r["dst"]),
            vm_state=str(r.get("vm_state", "")),
            pid=int(r.get("pid", 0)),
            pid_start=str(r.get("node", "")),
            phase=str(r.get("phase", "")),
            started_at=float(r.get("started_at", 0.0)),
            outcome=None if r.get("outcome") is None else str(r["outcome"]),
            mode=str(r.get("mode", "")),
            detail=str(r.get("detail", "")),
            migration_id=str(r.get("migration_id", "")),
        )

    def open_entries(self) -> list[Entry]:
        out = [
            self._entry(int(meta["create_revision"]), json.loads(value))
            for value, meta in self._c.read_prefix(self._open)
        ]
        return sorted(out, key=lambda e: e.id)

    def entries(self, limit: int = 100) -> list[Entry]:
        end = _prefix_end(self._done)
        done = self._c.read_range(
            self._done, end, sort_order="descend", sort_target="key", limit=limit
        )
        out = [self._entry(int(json.loads(v)["id"]), json.loads(v)) for v, _m in done]
        return sorted([*self.open_entries(), *out], key=lambda e: -e.id)[:limit]

    def owner_alive(self, entry: Entry) -> bool:
        """The lock holder owns every open entry: another writer no longer acts (its
        writes are refused), so its entries are for us to settle."""
        return False

    def record_reconciliation(
        self, migration_id: int | None, vm: str, action: str, detail: str
    ) -> None:
        record = {
            "entry": migration_id,
            "vm": vm,
            "action": action,
            "detail": detail,
            "node": self._c.node,
            "at": time.time(),
        }
        self._c.fenced_write([("put", self._recs + uuid.uuid4().hex, json.dumps(record))])

    def reconciliation_count(self) -> int:
        return len(self._c.read_prefix(self._recs))
