"""The Debian package: packaging/build-deb.sh builds it from the checkout; this reads it
back (dpkg-deb -I / -c) and installs it with apt into a throw-away copy of the Debian 12
tree the boot test uses (packaging/boot-image.sh, cached), where its user, folders,
program, solvers and purge are checked. Booting it under systemd: tests/test_boot_lab.py.

Run: sudo .venv/bin/pytest tests/test_package.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "packaging" / "build-deb.sh"
BOOT_IMAGE = REPO / "packaging" / "boot-image.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb absent (dpkg)"),
]


def _version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"$', text, re.MULTILINE)
    assert match
    return match.group(1)


def run(*argv: str, timeout_s: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, check=False, **kw
    )  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    # the venv running the tests has the versions to vendor
    done = run(str(BUILD), str(out), env=os.environ | {"BALANCERD_VENV": sys.prefix})
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert path == out / f"balancerd_{_version()}_{arch}.deb"
    return path


def _listing(deb: Path) -> dict[str, str]:
    """path -> 'mode owner/group' of every entry in the package."""
    out = {}
    for line in run("dpkg-deb", "-c", str(deb)).stdout.splitlines():
        parts = line.split(None, 5)
        out[parts[5].split(" -> ")[0].removeprefix(".")] = f"{parts[0]} {parts[1]}"
    return out


def test_control_fields(deb: Path) -> None:
    info = run("dpkg-deb", "-I", str(deb)).stdout
    fields = dict(
        (m.group(1), m.group(2)) for m in re.finditer(r"^ (\S+): (.*)$", info, re.MULTILINE)
    )
    assert fields["Package"] == "balancerd"
    assert fields["Version"] == _version()
    depends = fields["Depends"]
    for dep in ("python3-libvirt", "python3-systemd", "python3-yaml", "python3-numpy", "systemd"):
        assert dep in depends
    assert "python3 (>= 3.11), python3 (<< 3.12)" in depends  # the vendored cp311 wheels
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*?\s+{script}\b", info, re.MULTILINE)


def test_contents(deb: Path) -> None:
    files = _listing(deb)
    for path in (
        "/usr/bin/balancerd",
        "/lib/systemd/system/balancerd.service",
        "/usr/lib/sysusers.d/balancerd.conf",
        "/usr/lib/tmpfiles.d/balancerd.conf",
        "/etc/balancerd/balancerd.yaml",
        "/etc/balancerd/policies/balance.yaml",
        "/etc/balancerd/policies/power-save.yaml",
        "/usr/share/doc/balancerd/README.md",  # the unit's Documentation=
        "/usr/share/doc/balancerd/copyright",
        "/usr/share/doc/balancerd/examples/policies/lab-demo.yaml",
        "/usr/share/doc/balancerd/examples/grafana-dashboard.json",
        "/usr/lib/balancerd/balancerd/cli.py",
        "/usr/lib/balancerd/balancerd/policy/schema.json",
        "/usr/lib/balancerd/prometheus_client/exposition.py",
        "/usr/lib/balancerd/pulp/__init__.py",
        "/usr/lib/balancerd/apscheduler/__init__.py",
    ):
        assert path in files, path
    assert files["/usr/bin/balancerd"].startswith("-rwxr-xr-x root/root")
    assert any(p.startswith("/usr/lib/balancerd/highspy/") for p in files)
    assert not any("/__pycache__/" in p and not p.endswith(".pyc") for p in files if "." in p)
    assert not any(p.startswith("/usr/lib/balancerd/bin/") for p in files)
    assert all(v.split()[1] == "root/root" for v in files.values())


def test_shipped_files_are_the_repository_files(deb: Path, tmp_path: Path) -> None:
    assert run("dpkg-deb", "-x", str(deb), str(tmp_path)).returncode == 0
    pairs = {
        "lib/systemd/system/balancerd.service": "systemd/balancerd.service",
        "usr/lib/sysusers.d/balancerd.conf": "systemd/balancerd.sysusers",
        "usr/lib/tmpfiles.d/balancerd.conf": "systemd/balancerd.tmpfiles",
        "etc/balancerd/balancerd.yaml": "systemd/balancerd.yaml",
        "usr/share/doc/balancerd/README.md": "README.md",
    }
    committed = run("git", "-C", str(REPO), "rev-parse", "--git-dir").returncode == 0
    for shipped, source in pairs.items():
        want = (
            run("git", "-C", str(REPO), "show", f"HEAD:{source}").stdout
            if committed
            else (REPO / source).read_text()
        )
        assert (tmp_path / shipped).read_text() == want, shipped
    unit = (tmp_path / "lib/systemd/system/balancerd.service").read_text()
    doc = re.search(r"^Documentation=file://(\S+)$", unit, re.MULTILINE)
    assert doc and (tmp_path / doc.group(1).lstrip("/")).is_file()
    exec_start = re.search(r"^ExecStart=(\S+)", unit, re.MULTILINE)
    assert exec_start and (tmp_path / exec_start.group(1).lstrip("/")).is_file()
    conffiles = run("dpkg-deb", "-f", str(deb), "Package").stdout  # readable control
    assert conffiles.strip() == "balancerd"


# ---- installed with apt into a throw-away Debian 12 root ------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("installing into a root needs root")
    for tool in ("mmdebstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} absent (scripts/setup.sh installs it)")
    image = run(str(BOOT_IMAGE), timeout_s=1800)
    assert image.returncode == 0, image.stderr[-3000:]
    tree = Path(image.stdout.strip().splitlines()[-1])
    copy = tmp_path_factory.mktemp("root") / "tree"
    assert run("cp", "-a", "--reflink=auto", str(tree), str(copy)).returncode == 0
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv in the tree as in a container (with /proc, /dev, /run), not booted."""
    nspawn = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(root)]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return run(*nspawn, "--setenv=DEBIAN_FRONTEND=noninteractive", *argv, env=env)


def test_apt_installs_it_and_purge_removes_it(deb: Path, root: Path) -> None:
    shutil.copy(deb, root / "var" / "tmp" / deb.name)  # the container has its own /tmp
    # every dependency is in the tree already: nothing to download
    done = chroot(root, "apt-get", "install", "-y", f"/var/tmp/{deb.name}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ident = chroot(root, "id", "balancerd").stdout
    assert "groups=" in ident and "(libvirt)" in ident and "(balancerd)" in ident
    state, pki = root / "var/lib/balancerd", root / "etc/balancerd/pki"
    assert state.stat().st_mode & 0o777 == 0o750 and pki.stat().st_mode & 0o777 == 0o750
    config = root / "etc/balancerd/balancerd.yaml"
    assert config.stat().st_mode & 0o777 == 0o640
    # the program runs on Debian's python3 with the vendored packages
    done = chroot(root, "balancerd", "check-policy", "/etc/balancerd/policies/balance.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    done = chroot(root, "balancerd", "status", "--config", "/etc/balancerd/balancerd.yaml")
    said = done.stdout + done.stderr  # the container's stderr reaches nspawn's stdout
    assert done.returncode == 2, said[-3000:]  # the example names certificates to add
    assert "/etc/balancerd/pki/cacert.pem: No such file or directory" in said, said
    # both solvers and the libvirt/systemd bindings, through the launcher's path
    probe = (
        "import sys; sys.path.insert(0, '/usr/lib/balancerd');"
        "import libvirt, systemd.journal, highspy, pulp;"
        "p = pulp.LpProblem('p', pulp.LpMaximize); x = pulp.LpVariable('x', 0, 3, cat='Integer');"
        "p += x; p += 2 * x <= 5;"
        "s = [pulp.HiGHS(msg=False), pulp.PULP_CBC_CMD(msg=False)];"
        "print([(p.solve(v), x.value()) for v in s])"
    )
    done = chroot(root, "python3", "-I", "-c", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[(1, 2.0), (1, 2.0)]"  # after a banner
    done = chroot(root, "apt-get", "purge", "-y", "balancerd")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (root / "usr/bin/balancerd").exists()
    assert not (root / "usr/lib/balancerd").exists()
    assert not state.exists() and not config.exists()
