"""Local etcd members as child processes (Debian's ``etcd-server``), for tests, the HA lab
and ``scripts/failover_table.py``. Not used by the daemon.

Every member listens for clients on 127.0.0.1 and on each extra loopback address given
(``client_hosts``): a manager that talks to etcd only through its own address (e.g.
127.77.0.11) can be cut off from every member by one iptables rule on that address, while
the other manager and the tests keep talking through theirs.

Also ``Blackhole``: a TCP forwarder to one member that can be made to swallow traffic
(connections accepted, nothing answered), the way a cut link looks to a client. Tests use
it where iptables (root) is not wanted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ETCD = "etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_missing() -> str:
    """Why etcd cannot run here ("" if it can)."""
    if shutil.which(ETCD) is None:
        return "etcd is not installed (Debian package etcd-server; scripts/setup.sh)"
    return ""


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def url_on(self, host: str) -> str:
        return f"http://{host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    root: Path
    size: int = 1
    client_hosts: tuple[str, ...] = ()
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.members:
            for i in range(1, self.size + 1):
                self.members.append(
                    Member(
                        f"e{i}",
                        free_port(),
                        free_port(),
                        self.root / f"e{i}",
                        self.root / f"e{i}.log",
                    )
                )

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def endpoints_on(self, host: str) -> list[str]:
        return [m.url_on(host) for m in self.members]

    def _argv(self, m: Member) -> list[str]:
        clients = ",".join([m.url, *(m.url_on(h) for h in self.client_hosts if h != "127.0.0.1")])
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            ETCD,
            "--name",
            m.name,
            "--data-dir",
            str(m.data_dir),
            "--listen-client-urls",
            clients,
            "--advertise-client-urls",
            m.url,
            "--listen-peer-urls",
            m.peer_url,
            "--initial-advertise-peer-urls",
            m.peer_url,
            "--initial-cluster",
            cluster,
            "--initial-cluster-token",
            f"balancerd-{self.root.name}",
            "--initial-cluster-state",
            "new",
        ]

    def start_member(self, m: Member) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(self._argv(m), stdout=log, stderr=subprocess.STDOUT, env=env)

    def start(self, timeout_s: float = 30.0) -> EtcdCluster:
        for m in self.members:
            self.start_member(m)
        self.wait_healthy(timeout_s)
        return self

    def healthy(self, m: Member) -> bool:
        try:
            with urllib.request.urlopen(f"{m.url}/health", timeout=1.0) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float = 30.0, members: list[Member] | None = None) -> None:
        want = [m for m in (members or self.members) if m.running]
        deadline = time.monotonic() + timeout_s
        while not all(self.healthy(m) for m in want):
            if time.monotonic() > deadline:
                logs = "; ".join(m.log.read_text(errors="replace")[-600:] for m in want)
                raise RuntimeError(f"etcd not healthy after {timeout_s:.0f} s: {logs}")
            for m in want:
                if not m.running:
                    raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-1500:]}")
            time.sleep(0.2)

    def kill(self, m: Member) -> None:
        if m.proc is not None and m.running:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait()

    def restart(self, m: Member) -> None:
        self.kill(m)
        self.start_member(m)

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.running:
                m.proc.terminate()
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()


class Blackhole:
    """A TCP forwarder 127.0.0.1:``port`` -> ``target_port``; ``cut()`` makes it swallow
    traffic (existing and new connections stay open and get no answer), ``heal()`` forwards
    again (new connections)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._mu = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="blackhole").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._mu:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._mu:
                self._socks.append(client)
            if self._cut.is_set():
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            with self._mu:
                self._socks.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                while self._cut.is_set() and not self._closed.is_set():
                    time.sleep(0.05)  # swallowed: held until healed or closed
                if self._closed.is_set():
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)
