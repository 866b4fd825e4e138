"""The client side of the daemon's control socket (``balancerd drain``, ``cycle``, ...).

Protocol (version 1): one request per connection, each message one line of JSON.

    -> {"v": 1, "cmd": "drain", "host": "host3"}
    <- {"v": 1, "progress": "vm1 host3->host1: started"}      (zero or more, long commands)
    <- {"v": 1, "keepalive": true}                              (while nothing else happens)
    <- {"v": 1, "ok": true, ...result}  or  {"v": 1, "ok": false, "kind": "...", "error": "..."}

Error kinds: ``bad-request`` (the request cannot be served as given: an unknown host, a
malformed plan; exit status 2), ``refused`` (the peer may not control balancerd),
``failed`` (it was tried and did not work), ``busy``, ``version``, ``internal``.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balancerd.errors import BalancerdError, ConfigError

PROTOCOL_VERSION = 1
ENV_SOCKET = "BALANCERD_CONTROL_SOCKET"
DEFAULT_SOCKET = Path("/run/balancerd/control.sock")
SOCKET_NAME = "control.sock"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a saved plan of a large cluster fits
BAD_INPUT_KINDS = ("bad-request", "version")


class NoDaemon(BalancerdError):
    """No daemon answers on the control socket."""


class ControlError(BalancerdError):
    """The daemon answered with an error."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class ControlBadRequest(ConfigError):
    """The daemon refused the request as given (exit status 2)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__([message])


def default_socket_path() -> Path:
    """Where the daemon listens: $BALANCERD_CONTROL_SOCKET, else control.sock in systemd's
    $RUNTIME_DIRECTORY (RuntimeDirectory=balancerd), else /run/balancerd/control.sock."""
    env = os.environ.get(ENV_SOCKET)
    if env:
        return Path(env)
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    return DEFAULT_SOCKET


def find_socket(explicit: str | None = None, state_dir: str | None = None) -> Path:
    """The socket to use: ``--socket``, $BALANCERD_CONTROL_SOCKET, the path the daemon of
    ``state_dir`` wrote into its status file, or the default."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_SOCKET):
        return default_socket_path()
    if state_dir:
        from balancerd.daemon_state import STATUS_FILE

        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            status = json.loads((Path(state_dir) / STATUS_FILE).read_text())
            if status.get("control_socket"):
                return Path(status["control_socket"])
    return default_socket_path()


def request(
    path: Path,
    cmd: str,
    *,
    timeout_s: float = 30.0,
    on_progress: Callable[[str], None] | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Send one request and return the daemon's result. ``timeout_s`` bounds the silence
    between two messages (long commands send progress or keepalives). Raises NoDaemon,
    ControlError, or ControlBadRequest (the request as given cannot be served)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(
                f"no balancerd daemon answers on {path} (is it running? "
                "`systemctl status balancerd`)"
            ) from None
        except PermissionError:
            raise ControlError("refused", _permission_text(path)) from None
        except OSError as exc:
            raise NoDaemon(f"cannot reach the balancerd daemon on {path}: {exc}") from None
        data = json.dumps({"v": PROTOCOL_VERSION, "cmd": cmd, **args}).encode() + b"\n"
        try:
            # The daemon may answer before it read everything (a refusal): read that answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            reader = sock.makefile("rb")
            while True:
                line = reader.readline(MAX_MESSAGE_BYTES + 1)
                if not line:
                    raise ControlError("failed", f"the daemon closed {path} without an answer")
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ControlError("failed", "the daemon sent a message that is not an object")
                if "progress" in msg:
                    if on_progress is not None:
                        on_progress(str(msg["progress"]))
                    continue
                if msg.get("keepalive"):
                    continue
                if msg.get("ok"):
                    return msg
                kind = str(msg.get("kind", "failed"))
                error = str(msg.get("error", "unknown error"))
                if kind in BAD_INPUT_KINDS:
                    raise ControlBadRequest(kind, error)
                raise ControlError(kind, error)
        except TimeoutError:
            raise ControlError(
                "failed", f"the daemon did not answer within {timeout_s:.0f} s on {path}"
            ) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ControlError("failed", f"the daemon closed the connection: {exc}") from None
        except ValueError as exc:
            raise ControlError("failed", f"the daemon sent invalid JSON: {exc}") from None
    finally:
        sock.close()


def _permission_text(path: Path) -> str:
    try:
        st = path.stat()
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        mode = f"mode {st.st_mode & 0o777:04o}, group {group}"
    except OSError:
        mode, group = "", "balancerd"
    return (
        f"permission denied on {path}{f' ({mode})' if mode else ''}: run as root or as a "
        f"member of group {group}"
    )


# --- what the commands share ---------------------------------------------------------------


def add_control_arguments(parser: Any, *, json_help: str = "machine-readable output") -> None:
    """``--config``, ``--socket`` and ``--json`` of the commands that talk to the daemon."""
    parser.add_argument(
        "--config", help="daemon config file (finds the daemon's socket and state directory)"
    )
    parser.add_argument(
        "--socket",
        help=f"the daemon's control socket (default: ${ENV_SOCKET}, else {DEFAULT_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help=json_help)


def socket_for(args: Any) -> Path:
    """The socket a command's arguments point at."""
    state_dir = None
    if getattr(args, "config", None):
        from balancerd.config import load_config

        state_dir = load_config(args.config).state_dir
    return find_socket(getattr(args, "socket", None), state_dir)


def print_progress(line: str) -> None:
    """Progress lines go to stderr, so stdout stays the result."""
    import sys

    print(line, file=sys.stderr, flush=True)
