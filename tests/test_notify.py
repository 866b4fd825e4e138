"""sd_notify against a real AF_UNIX datagram socket bound by the test (as systemd does)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancerd.notify import Notifier, watchdog_interval_s


def parse(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n") if line)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        yield str(path), sock
    finally:
        sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"balancerd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(10)
    try:
        yield "@" + name, sock
    finally:
        sock.close()


def test_messages_reach_a_path_socket(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("collected 3 hosts,\n12 guests")
    assert parse(sock.recv(4096)) == {"READY": "1", "STATUS": "collected 3 hosts, 12 guests"}
    assert n.status("cycle 4: 2 moves")
    assert parse(sock.recv(4096)) == {"STATUS": "cycle 4: 2 moves"}
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.reloading()
    reloading = parse(sock.recv(4096))
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert n.stopping()
    assert parse(sock.recv(4096))["STOPPING"] == "1"


def test_messages_reach_an_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    name, sock = abstract_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": name})
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"


def test_a_child_process_started_like_systemd_does_notifies(
    notify_socket: tuple[str, socket.socket],
) -> None:
    """The environment systemd gives a Type=notify service: NOTIFY_SOCKET + WATCHDOG_*."""
    path, sock = notify_socket
    code = (
        "from balancerd.notify import Notifier\n"
        "n = Notifier.from_env()\n"
        "n.ready('up')\n"
        "n.send(STATUS=f'ping every {n.watchdog_ping_s:g} s')\n"
        "n.watchdog()\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    env.pop("WATCHDOG_PID", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert parse(sock.recv(4096)) == {"READY": "1", "STATUS": "up"}
    assert parse(sock.recv(4096)) == {"STATUS": "ping every 15 s"}
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_no_op_without_systemd() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_ping_s == 0.0


def test_a_vanished_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.ready() is False
    assert n.watchdog() is False
    assert sum("sd_notify" in r.getMessage() for r in caplog.records) == 1  # warned once


@pytest.mark.parametrize(
    ("env", "pid", "expected_s"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 10, 60.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "10"}, 10, 0.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "11"}, 10, 0.0),  # another process's
        ({"WATCHDOG_USEC": "0"}, 10, 0.0),
        ({"WATCHDOG_USEC": "soon"}, 10, 0.0),
        ({}, 10, 0.0),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected_s: float) -> None:
    assert watchdog_interval_s(env, pid) == expected_s
