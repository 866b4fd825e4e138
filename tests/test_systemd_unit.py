"""The systemd unit: `systemd-analyze verify` clean, security exposure <= 1.5 (the number
the unit's comment and the README claim), and the settings that let it reach libvirt and
talk to systemd. The same exposure under a booted systemd: tests/test_boot_lab.py.

`verify` checks that ExecStart's binary exists. The unit names the path the Debian package
installs (/usr/bin/balancerd), which this machine need not have, so the test builds a
throw-away root laid out like an installed system (the unit under /etc/systemd/system, a
stub /usr/bin/balancerd, /bin/kill, and a copy of the distribution's units) and runs
`systemd-analyze verify --root=ROOT`. The unit file itself is used byte for byte.
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
TMPFILES = REPO / "systemd" / "balancerd.tmpfiles"
README = REPO / "README.md"
MAX_EXPOSURE = 1.5
# What the unit's comment and the README say `systemd-analyze security` reports.
CLAIMED_EXPOSURE = 1.4

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
    stub = root / "usr" / "bin" / "balancerd"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\nexec python3 -m balancerd.cli "$@"\n')
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
    broken = broken.replace("/usr/bin/balancerd", "/usr/bin/balancerdx")
    done = verify(system_root(tmp_path, broken))
    assert "Unknown key" in done.stderr and "WatchDogSec" in done.stderr
    assert "/usr/bin/balancerdx is not executable" in done.stderr


def test_security_exposure_is_at_most_1_5_and_what_the_docs_claim() -> None:
    level = exposure(UNIT)
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}"
    assert level == CLAIMED_EXPOSURE
    claim = f"exposure {CLAIMED_EXPOSURE}"
    assert claim in UNIT.read_text() and claim in README.read_text()


def test_resource_and_socket_bind_limits() -> None:
    """MemoryMax and TasksMax bound the daemon; it may bind the default metrics port only."""
    from balancerd.config import Config

    s = unit_settings()
    assert s["MemoryMax"] == ["2G"] and s["TasksMax"] == ["256"]
    port = Config(hosts=(), policy="").metrics_listen.rpartition(":")[2]
    assert s["SocketBindAllow"] == [f"tcp:{port}"] and s["SocketBindDeny"] == ["any"]
    assert s["RuntimeDirectory"] == ["balancerd"]  # the control socket's folder


def test_documentation_names_what_the_package_installs() -> None:
    s = unit_settings()
    assert s["Documentation"] == ["file:///usr/share/doc/balancerd/README.md"]
    script = (REPO / "packaging" / "build-deb.sh").read_text()
    assert '"$src/README.md" "$doc/README.md"' in script
    assert "doc=$root/usr/share/doc/balancerd" in script


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


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles absent")
def test_tmpfiles_makes_the_state_and_pki_folders(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nbalancerd:x:990:990::/:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nbalancerd:x:990:\n")
    done = run("systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES))
    assert done.returncode == 0, done.stderr
    state, pki = tmp_path / "var" / "lib" / "balancerd", tmp_path / "etc" / "balancerd" / "pki"
    assert (state.stat().st_mode & 0o777, state.stat().st_uid) == (0o750, 990)
    assert (pki.stat().st_mode & 0o777, pki.stat().st_uid, pki.stat().st_gid) == (0o750, 0, 990)
