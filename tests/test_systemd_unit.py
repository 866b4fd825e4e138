"""The systemd unit: `systemd-analyze verify` clean, security exposure <= 2.5, and the
settings that let it reach libvirt and talk to systemd.

`verify` checks that ExecStart's binary exists. The unit names the installed path
(/usr/local/bin/balancerd, a symlink into the /opt/balancerd venv), which this machine
does not have, so the test builds a throw-away root laid out like an installed system
(the unit under /etc/systemd/system, a stub /usr/local/bin/balancerd, /bin/kill, and a copy
of the distribution's units) and runs `systemd-analyze verify --root=ROOT`. The unit
file itself is used byte for byte.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "balancerd.service"
SYSUSERS = REPO / "systemd" / "balancerd.sysusers"
MAX_EXPOSURE = 2.5

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze absent (package systemd)"
)


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def exposure(unit: Path) -> float:
    done = run("systemd-analyze", "security", "--offline=true", str(unit))
    text = done.stdout + done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text)
    assert match, text
    return float(match.group(1))


def system_root(tmp_path: Path, unit_text: str) -> Path:
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "balancerd.service").write_text(unit_text)
    for dist in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if dist.is_dir():
            shutil.copytree(dist, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
            break
    stub = root / "usr" / "local" / "bin" / "balancerd"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\nexec /opt/balancerd/bin/balancerd "$@"\n')
    stub.chmod(0o755)
    kill = shutil.which("kill") or "/bin/kill"
    (root / "bin").mkdir()
    shutil.copy2(kill, root / "bin" / "kill")
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return run("systemd-analyze", "verify", f"--root={root}", "balancerd.service", cwd=root)


def test_verify_is_clean(tmp_path: Path) -> None:
    done = verify(system_root(tmp_path, UNIT.read_text()))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == ""


def test_verify_catches_mistakes(tmp_path: Path) -> None:
    """The clean result above means something: a typo and a missing binary are reported."""
    broken = UNIT.read_text().replace("WatchdogSec=", "WatchDogSec=")
    broken = broken.replace("/usr/local/bin/balancerd", "/usr/local/bin/balancerdx")
    done = verify(system_root(tmp_path, broken))
    assert "Unknown key" in done.stderr and "WatchDogSec" in done.stderr
    assert "/usr/local/bin/balancerdx is not executable" in done.stderr


def test_security_exposure_is_at_most_2_5() -> None:
    level = exposure(UNIT)
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}"


def test_exposure_number_reacts_to_hardening(tmp_path: Path) -> None:
    """Parsing is real: stripping the hardening raises the exposure well above 2.5."""
    bare = "\n".join(
        line
        for line in UNIT.read_text().splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    )
    path = tmp_path / "balancerd.service"
    path.write_text(bare + "\n")
    assert exposure(path) > MAX_EXPOSURE


def test_notify_watchdog_reload_and_restart() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]  # ipmitool & co. cannot send READY/WATCHDOG
    assert float(s["WatchdogSec"][0]) > 0
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"][0].split()[1:] == ["run", "--config", "/etc/balancerd/balancerd.yaml"]
    assert s["StateDirectory"] == ["balancerd"]


def test_it_can_still_reach_libvirt() -> None:
    """Local libvirtd over its AF_UNIX socket (group libvirt), remote hosts over TCP/TLS."""
    s = unit_settings()
    families = " ".join(s["RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert not any(f.startswith("~") for f in families)
    assert s.get("PrivateNetwork", ["no"]) == ["no"]
    assert "IPAddressDeny" not in s  # remote host addresses are not known to the unit
    assert s["User"] == ["balancerd"] and "libvirt" in s["SupplementaryGroups"]
    assert "DynamicUser" not in s  # polkit looks the user's groups up by name
    # /run stays visible (ProtectSystem=strict makes it read-only; connect() still works).
    assert "InaccessiblePaths" not in s and "TemporaryFileSystem" not in s


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers absent")
def test_sysusers_creates_the_user_in_group_libvirt(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\nlibvirt:x:107:\n")
    done = run("systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS))
    assert done.returncode == 0, done.stderr
    passwd = {line.split(":")[0]: line for line in (etc / "passwd").read_text().splitlines()}
    assert passwd["balancerd"].split(":")[5] == "/var/lib/balancerd"
    groups = {
        line.split(":")[0]: line.split(":")[3] for line in (etc / "group").read_text().splitlines()
    }
    assert "balancerd" in groups["libvirt"].split(",")
