"""balancerd under a real systemd as PID 1, installed from its Debian package, against a
TLS lab.

A Debian 12 tree (packaging/boot-image.sh, cached in /var/cache/balancerd-boot) is copied
and booted with ``systemd-nspawn --boot`` (sharing this machine's network, so the lab hosts
on 10.77.12.0/24 are reachable). Inside it, as an operator would: ``apt install`` the
package, put balancerd's client certificate in /etc/balancerd/pki, write the config, and
``systemctl enable --now balancerd``. Then, in one sequence (one boot is expensive):

1. READY over qemu+tls with the shipped hardening; ``systemd-analyze security`` exposure is
   the number the docs claim (and <= 1.5);
2. a balancing move with ``spec.migration.tls: required`` (TLS stream) and the journald
   fields VM, HOST, MIGRATION_ID, POLICY in ``journalctl -o json``; a CBC solve (Debian's
   cbc, a child process) and a HiGHS solve (in-process) under the unit's own sandbox
   settings (a transient service with them: whether the daemon's plan reaches the ILP
   depends on the load, its greedy stage may already be optimal);
3. ``systemctl reload`` with a good policy (backend HiGHS) and with a bad one (rejected,
   the daemon keeps running on the previous policy, same main pid);
4. a frozen libvirtd (SIGSTOP) hangs the collection; the daemon withholds WATCHDOG=1 and
   systemd kills and restarts it (NRestarts=1), which reaches READY again once libvirtd runs;
5. ``systemctl stop`` is clean (Result=success, exit status 0).

Two test-only settings, as a drop-in: WatchdogSec=10 (the shipped 60 s is longer than
libvirt's keepalive, 5 s x 3, which would drop the frozen connection and let the daemon
recover on its own: no restart to show) and the metrics port (SocketBindAllow=tcp:9397,
the documented way to move it). The hardening is the shipped unit's.

Run: sudo flock /tmp/balancerd-lab.lock .venv/bin/pytest -m lab tests/test_boot_lab.py -s
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancerd.lab.cluster import GuestSpec, Lab, LabSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB_NAME, LAB_SUBNET = "bb1", "10.77.12"
REPO = Path(__file__).resolve().parents[1]
METRICS_PORT = 9397
# What README.md and the unit's comment say `systemd-analyze security balancerd` reports.
CLAIMED_EXPOSURE = 1.4
MAX_EXPOSURE = 1.5
DROP_IN = f"""[Service]
WatchdogSec=10
SocketBindAllow=tcp:{METRICS_PORT}
"""


def run(*argv: str, timeout_s: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, check=False, **kw
    )
    return done


def wait_for(what: str, timeout_s: float, probe: Callable[[], Any], step_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Container:
    """A booted systemd-nspawn container of ``tree`` (not registered with machined: this
    machine has no systemd as PID 1); commands run in it through nsenter."""

    def __init__(self, tree: Path, log: Path) -> None:
        self.tree = tree
        self.log = log
        argv = ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--quiet"]
        argv += ["--console=passive", "-D", str(tree)]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self.pid1 = 0
        try:
            self._boot()
        except BaseException:
            self.close()  # never leave a container running behind a failed start
            raise

    def _boot(self) -> None:
        self.pid1 = wait_for("the container's systemd", 60, self._find_pid1, 0.2)

        # (nsenter may find the namespaces half made just after systemd appears: retry)
        def booted() -> str:
            state = self.sh("systemctl is-system-running --wait", timeout_s=120).stdout.strip()
            return state if state in ("running", "degraded") else ""

        wait_for("the container to boot", 120, booted)

    def _find_pid1(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"nspawn exited: {self.log.read_text()[-3000:]}")
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            children = Path(f"/proc/{pid}/task/{pid}/children")
            try:
                kids = [int(k) for k in children.read_text().split()]
            except OSError:
                continue
            for kid in kids:
                try:
                    status = Path(f"/proc/{kid}/status").read_text()
                except OSError:
                    continue
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.MULTILINE)
                name = re.search(r"^Name:\s+(\S+)", status, re.MULTILINE)
                # PID 1 of its own pid namespace, and already systemd (exec'd)
                if (
                    nspid
                    and name
                    and (nspid.group(1).split()[-1], name.group(1)) == ("1", "systemd")
                ):
                    return kid
            todo.extend(kids)
        return None

    def sh(self, script: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": ""}
        return run(
            "nsenter", "-t", str(self.pid1), "-a", "/bin/sh", "-c", script, timeout_s=timeout_s,
            env=env,
        )  # fmt: skip

    def ok(self, script: str, timeout_s: float = 300) -> str:
        done = self.sh(script, timeout_s)
        assert done.returncode == 0, f"{script}: rc={done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.ok("systemctl show balancerd " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> list[dict[str, Any]]:
        out = self.ok("journalctl -u balancerd -o json --no-pager")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def messages(self) -> str:
        return self.ok("journalctl -u balancerd -o cat --no-pager")

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        if self.pid1:
            self.sh("systemctl poweroff --no-block", timeout_s=30)
        else:
            self.proc.terminate()  # nspawn asks the container's init to halt
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            if self.pid1:
                os.kill(self.pid1, signal.SIGKILL)  # the container ends with its init
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def lab(lab_factory_module: Any) -> Lab:
    spec = LabSpec(
        hosts=2,
        guests=(
            GuestSpec("web1", "host1", burn_pct=60),
            GuestSpec("web2", "host1", burn_pct=60),
        ),
        host_cpus=1,
        metrics_listen=f"127.0.0.1:{METRICS_PORT}",
        tls=True,
    )
    made: Lab = lab_factory_module(LAB_NAME, LAB_SUBNET)(spec)
    for guest in ("web1", "web2"):
        made.wait_booted(guest)
    return made


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    for tool in ("mmdebstrap", "systemd-nspawn", "nsenter", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/setup.sh installs it")
    work = tmp_path_factory.mktemp("boot")
    build = REPO / "packaging" / "build-deb.sh"
    deb = run(str(build), str(work / "dist"), env=os.environ | {"BALANCERD_VENV": sys.prefix})
    assert deb.returncode == 0, deb.stderr[-3000:]
    image = run(str(REPO / "packaging" / "boot-image.sh"), timeout_s=1800)
    assert image.returncode == 0, image.stderr[-3000:]
    tree = work / "tree"
    copied = run("cp", "-a", "--reflink=auto", image.stdout.strip().splitlines()[-1], str(tree))
    assert copied.returncode == 0, copied.stderr
    package = Path(deb.stdout.strip().splitlines()[-1])
    shutil.copy(package, tree / "var" / "tmp" / package.name)
    c = Container(tree, work / "nspawn.log")
    try:
        c.ok(f"apt-get install -y /var/tmp/{package.name}", timeout_s=600)
        yield c
    finally:
        c.close()
        shutil.rmtree(tree, ignore_errors=True)


# Both MILP backends through balancerd's own choice of CBC (Debian's cbc binary as a child
# process when installed, else PuLP's) and HiGHS in-process, with the vendored packages.
SOLVE_PROBE = """\
import sys

sys.path.insert(0, "/usr/lib/balancerd")
import pulp

cbc = pulp.COIN_CMD if pulp.COIN_CMD().available() else pulp.PULP_CBC_CMD
out = []
for name, solver in (("highs", pulp.HiGHS(msg=False)), ("cbc", cbc(msg=False))):
    p = pulp.LpProblem("p", pulp.LpMaximize)
    x = pulp.LpVariable("x", 0, 3, cat="Integer")
    p += x
    p += 2 * x <= 5
    out.append((name, p.solve(solver), x.value()))
print(out)
"""
# The unit's settings that make its sandbox (identity, hardening, limits).
SANDBOX_KEYS = re.compile(
    r"^(User|Group|SupplementaryGroups|UMask|NoNewPrivileges|CapabilityBoundingSet|"
    r"AmbientCapabilities|Protect\w+|Private\w+|ProcSubset|Restrict\w+|LockPersonality|"
    r"MemoryDenyWriteExecute|RemoveIPC|SystemCall\w+|DevicePolicy|KeyringMode|MemoryMax|"
    r"TasksMax|SocketBind\w+)=(.*)$"
)


def sandboxed(script: str) -> str:
    """A shell command running the Python file ``script`` (a path in the container) as a
    transient service with the unit's sandbox settings."""
    unit = (REPO / "systemd" / "balancerd.service").read_text()
    props = [
        f"-p {shlex.quote(m.group(1) + '=' + m.group(2))}"
        for line in unit.splitlines()
        if (m := SANDBOX_KEYS.match(line.strip()))
    ]
    return (
        "systemd-run --quiet --wait --pipe --collect " + " ".join(props)
        + f" /usr/bin/python3 -I {shlex.quote(script)}"
    )  # fmt: skip


def policy(name: str, backend: str) -> str:
    doc = yaml.safe_load((REPO / "policies" / "lab-demo.yaml").read_text())
    doc["metadata"] = {"name": name}
    doc["spec"].setdefault("migration", {})["tls"] = "required"
    doc["spec"]["solver"] = {"backend": backend, "time_limit_s": 2}
    return yaml.safe_dump(doc, sort_keys=False)


def configure(c: Container, lab: Lab) -> None:
    """What an operator does after `apt install`: certificates, config, policies."""
    etc = c.tree / "etc" / "balancerd"
    for name in ("cacert.pem", "clientcert.pem", "clientkey.pem"):
        shutil.copyfile(lab.pki_dir / name, etc / "pki" / name)
    c.ok(
        "cd /etc/balancerd/pki && chown root:balancerd *.pem && chmod 0644 cacert.pem "
        "clientcert.pem && chmod 0640 clientkey.pem"
    )
    lab_config = yaml.safe_load(lab.config_path.read_text())
    hosts = [
        {k: v for k, v in h.items() if k != "power"} | {"power": {"driver": "none"}}
        for h in lab_config["hosts"]
    ]
    config = {
        "hosts": hosts,
        "pki_dir": "/etc/balancerd/pki",
        "policy": "/etc/balancerd/policies/boot.yaml",
        "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"},
        "state_dir": "/var/lib/balancerd",
        "collect_interval_s": 2,
        "cycle_interval_s": 10,
        "smoothing_window": 2,
        # calls to a frozen libvirtd hang (until libvirt's keepalive drops the connection)
        "host_timeout_s": 120,
        "stall_timeout_s": 4,
    }
    (etc / "balancerd.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (etc / "policies" / "boot.yaml").write_text(policy("boot-cbc", "cbc"))
    drop_in = c.tree / "etc" / "systemd" / "system" / "balancerd.service.d"
    drop_in.mkdir(parents=True, exist_ok=True)
    (drop_in / "boot-test.conf").write_text(DROP_IN)
    c.ok("systemctl daemon-reload")


def test_the_service_under_systemd(lab: Lab, container: Container) -> None:
    try:
        _the_service_under_systemd(lab, container)
    except AssertionError:
        print("journal of balancerd.service (end):\n" + container.messages()[-6000:])
        raise


def _the_service_under_systemd(lab: Lab, container: Container) -> None:
    c = container
    configure(c, lab)
    checked = c.sh(
        "runuser -u balancerd -- balancerd status --config /etc/balancerd/balancerd.yaml"
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # 1. READY over TLS with the shipped hardening
    started = time.monotonic()
    c.ok("systemctl enable --now balancerd", timeout_s=240)  # Type=notify: returns at READY
    print(f"\nREADY {time.monotonic() - started:.1f} s after systemctl enable --now")
    props = c.show("ActiveState", "SubState", "MainPID", "StatusText", "User", "NRestarts")
    assert (props["ActiveState"], props["SubState"], props["User"]) == (
        "active",
        "running",
        "balancerd",
    )
    main_pid = props["MainPID"]
    text = c.messages()
    assert "connected host=host1 uri=qemu+tls://10.77.12.11/system" in text, text[-3000:]
    assert "ready hosts_up=2 hosts=2" in text, text[-3000:]
    security = c.ok("systemd-analyze security balancerd --no-pager")
    match = re.search(r"Overall exposure level for balancerd\.service: (\d+\.\d+)", security)
    assert match, security
    exposure = float(match.group(1))
    print(f"systemd-analyze security balancerd: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE and exposure == CLAIMED_EXPOSURE, security

    # 2. a balancing move over TLS, with the journald fields; the plan was solved by CBC
    def migrated() -> dict[str, Any] | None:
        for entry in c.journal():
            if entry.get("MIGRATION_ID") and "migrated (" in entry.get("MESSAGE", ""):
                return entry
        return None

    entry = wait_for("a migration", 180, migrated, 2.0)
    print("journal entry of the move:", {k: entry.get(k) for k in ("VM", "HOST", "MIGRATION_ID")})
    assert entry["VM"] in ("web1", "web2") and entry["HOST"] == "host1"
    assert re.fullmatch(r"[0-9a-f]{12}", entry["MIGRATION_ID"])
    journal = c.journal()
    assert any(e.get("POLICY") == "boot-cbc" for e in journal)
    plans = [e["MESSAGE"] for e in journal if e.get("MESSAGE", "").startswith("plan policy=")]
    assert plans and not any("/error" in p for p in plans), plans
    # (the ILP runs only when the greedy placement is not already within the gap of the
    # bound, so which backend a plan reports depends on the load: shown, not asserted;
    # both solvers are checked under the unit's sandbox below)
    print(
        "solvers of the daemon's plans:", sorted({p.split(" solver=")[1].split()[0] for p in plans})
    )
    assert not any("migration stream in clear text" in e.get("MESSAGE", "") for e in journal)
    probe = c.tree / "usr" / "local" / "lib" / "solve-probe.py"
    probe.write_text(SOLVE_PROBE)
    solved = c.ok(sandboxed("/usr/local/lib/solve-probe.py"), timeout_s=120)
    assert solved.strip().splitlines()[-1] == "[('highs', 1, 2.0), ('cbc', 1, 2.0)]", solved
    assert {lab.guest_host("web1"), lab.guest_host("web2")} == {"host1", "host2"}

    # 3. reload: a good policy (HiGHS), then a bad one
    boot = c.tree / "etc" / "balancerd" / "policies" / "boot.yaml"
    boot.write_text(policy("boot-highs", "highs"))
    c.ok("systemctl reload balancerd")
    wait_for(
        "a plan of the reloaded policy",
        120,
        lambda: any(
            e.get("MESSAGE", "").startswith("plan policy=boot-highs")
            and e.get("POLICY") == "boot-highs"
            and "/error" not in e["MESSAGE"]
            for e in c.journal()
        ),
    )
    boot.write_text(policy("boot-bad", "cbc").replace("objective: balance", "objective: nonsense"))
    c.ok("systemctl reload balancerd")
    rejected = wait_for(
        "the bad reload to be rejected",
        30,
        lambda: [m for m in c.messages().splitlines() if "reload rejected" in m],
    )
    print("bad reload:", rejected[-1])
    assert "/etc/balancerd/policies/boot.yaml:" in rejected[-1]
    assert "objective" in rejected[-1]
    props = c.show("ActiveState", "MainPID")
    assert (props["ActiveState"], props["MainPID"]) == ("active", main_pid)
    mark = len(c.journal())
    wait_for(
        "a cycle on the kept policy",
        120,
        lambda: any(
            e.get("MESSAGE", "").startswith("plan policy=boot-highs") for e in c.journal()[mark:]
        ),
    )
    boot.write_text(policy("boot-highs", "highs"))  # back to good for the restart below

    # 4. a frozen libvirtd: the watchdog is withheld, systemd restarts the daemon
    pid = lab.libvirtd_pid("host2")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            "systemd's watchdog timeout",
            90,
            lambda: "Watchdog timeout" in c.ok("journalctl -u balancerd --no-pager -o cat"),
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "withholding the systemd watchdog" in c.messages()

    def restarted() -> bool:
        p = c.show("ActiveState", "SubState", "NRestarts", "MainPID")
        return p["NRestarts"] == "1" and p["SubState"] == "running" and p["MainPID"] != main_pid

    wait_for("the restarted daemon to be READY", 240, restarted, 2.0)
    print("watchdog:", [m for m in c.messages().splitlines() if "atchdog" in m][-3:])

    # 5. stop
    started = time.monotonic()
    c.ok("systemctl stop balancerd", timeout_s=180)
    print(f"stopped in {time.monotonic() - started:.1f} s")
    props = c.show("ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert c.messages().rstrip().endswith("stopped") or "stopped" in c.messages()[-2000:]
