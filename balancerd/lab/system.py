"""Small process helpers for the lab: run a command, check requirements, signal pids.

Everything here runs as root on the machine that hosts the lab; nothing imports libvirt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from balancerd.errors import LabError

# Commands the lab runs, and the Debian package that ships each.
REQUIRED_COMMANDS: dict[str, str] = {
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "virsh": "libvirt-clients",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "ip": "iproute2",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "cpio": "cpio",
    "gzip": "gzip",
    "gcc": "gcc",
    "dpkg-query": "dpkg",
    "bindfs": "bindfs",
    "fusermount": "fuse",
}
# Packages whose files the lab uses directly (not only through a command on PATH).
REQUIRED_PACKAGES = ("busybox-static", "libc6-dev")
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def which(command: str) -> str | None:
    """Like shutil.which, but also looks in the sbin folders (root's PATH may lack them)."""
    found = shutil.which(command)
    if found:
        return found
    for folder in SBIN_DIRS:
        candidate = Path(folder) / command
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def package_installed(package: str) -> bool:
    if which("dpkg-query") is None:
        return False
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def missing_requirements() -> list[str]:
    """What the lab lacks on this machine, as readable lines; empty when it can run."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (the lab creates network namespaces and runs libvirtd)")
    absent_cmds = {cmd: pkg for cmd, pkg in REQUIRED_COMMANDS.items() if which(cmd) is None}
    for cmd, pkg in absent_cmds.items():
        missing.append(f"command {cmd} (Debian package {pkg})")
    if "dpkg-query" not in absent_cmds:
        for pkg in REQUIRED_PACKAGES:
            if not package_installed(pkg):
                missing.append(f"Debian package {pkg}")
    return missing


def require_lab_support() -> None:
    missing = missing_requirements()
    if missing:
        raise LabError(
            "the lab cannot run here; missing: "
            + "; ".join(missing)
            + " (scripts/setup.sh installs the packages)"
        )


def run(
    argv: Sequence[str],
    *,
    timeout_s: float = 60.0,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command without a shell; raise LabError with its stderr when it fails."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout_s:.0f} s") from exc
    except OSError as exc:
        raise LabError(f"cannot run {argv[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}")
    return proc


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int | None) -> bool:
    """True if the process exists and is not a zombie."""
    if pid is None or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state letter follows the command name in parentheses
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_and_wait(pids: Sequence[int], *, grace_s: float = 5.0) -> None:
    """SIGTERM the pids, then SIGKILL the ones still there after grace_s; wait for them."""
    alive = [p for p in pids if pid_alive(p)]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if pid_alive(p)]
        if not alive:
            return
    raise LabError(f"processes {alive} survived SIGKILL")


def pids_with_cmdline(fragment: str) -> list[int]:
    """Processes whose command line contains fragment (the lab dir, to find leftovers)."""
    found: list[int] = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append(int(entry.name))
    return found


def tcp_open(address: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(timeout_s: float, check: Callable[[], bool], what: str) -> None:
    """Poll check() every 0.1 s for up to timeout_s seconds; LabError naming what if never."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise LabError(f"timed out after {timeout_s:.0f} s waiting for {what}")
