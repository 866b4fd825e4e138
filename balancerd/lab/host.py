"""One lab host: a network namespace, a holder process, virtlogd and libvirtd.

How a host is made (all as root, everything under ``ROOT/hosts/hostN``):

- network: netns ``NAME-hostN`` with ``eth0`` (address ``SUBNET.(10+N)``) whose veth peer
  ``NAME-hN`` sits on the bridge ``NAME-br`` (``SUBNET.1``) in the root namespace; inside the
  netns a bridge ``guestbr`` for guest NICs (the same name on every host, so guests with a
  NIC can migrate).
- holder: ``ip netns exec NS unshare -m -u --propagation private -- bash holder.sh``. The
  script sets the UTS hostname, bind-mounts the host's own run/lib/cache/log/etc folders over
  /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /etc/libvirt plus
  a hosts file over /etc/hosts, unmounts the copies of /run/netns/* (so this mount namespace
  does not pin other labs' network namespaces), then execs ``sleep infinity`` renamed to
  ``balancerd-lab-holder ROOT/hosts/hostN``. This long-lived process owns the host's mount and
  UTS namespaces: libvirtd can be killed and restarted (``nsenter -t HOLDER -m -u -n``) and
  always finds the same mounts, and the namespaces outlive the ``lab up`` process.
  (Running libvirtd as the direct child of unshare does not work: ``libvirtd -d`` forks and
  the namespace would be gone with no way back in once libvirtd is killed.)
- daemons: ``virtlogd -d -p PIDFILE`` and ``libvirtd -d -l -f /etc/libvirt/libvirtd.conf -p
  PIDFILE`` (distinct pidfiles: a shared path kills the second daemon), listening at the
  host address with a distinct ``host_uuid``: on TCP with ``auth_tcp = "none"`` (lab only),
  or, in a TLS lab (``tls=True``), only on TLS (port 16514) with x509 client verification
  against the lab CA (certificates: lab/tls.py). The host's own ``pki/`` folder is mounted
  over /etc/pki, so libvirtd and QEMU use their default certificate paths, and QEMU
  encrypts migration streams with them (``migrate_tls_x509_verify = 1``).

Every process of a host lives in its netns, so ``ip netns pids NS`` finds them all.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from balancerd.errors import LabError
from balancerd.lab.system import (
    kill_and_wait,
    pid_alive,
    read_pid,
    run,
    tcp_open,
    wait_until,
    which,
)

LIBVIRT_TCP_PORT = 16509
LIBVIRT_TLS_PORT = 16514
GUEST_BRIDGE = "guestbr"
# host folder name -> where it is bind-mounted inside the host's mount namespace
BIND_MOUNTS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "etc": "/etc/libvirt",
    "pki": "/etc/pki",  # certificates (TLS lab); empty otherwise, hiding the machine's
}
DAEMON_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LabHost:
    lab_name: str
    root: Path
    index: int  # 1-based
    subnet: str  # "A.B.C"
    tls: bool = False  # libvirtd listens only on TLS, with client certificates

    @property
    def name(self) -> str:
        return f"host{self.index}"

    @property
    def address(self) -> str:
        return f"{self.subnet}.{10 + self.index}"

    @property
    def netns(self) -> str:
        return f"{self.lab_name}-{self.name}"

    @property
    def veth(self) -> str:
        """The root-namespace end of the host's veth pair."""
        return f"{self.lab_name}-h{self.index}"

    @property
    def hostname(self) -> str:
        return f"{self.lab_name}-{self.name}"

    @property
    def host_uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"balancerd-lab:{self.lab_name}:{self.name}"))

    @property
    def uri(self) -> str:
        if self.tls:
            return f"qemu+tls://{self.address}/system"
        return f"qemu+tcp://{self.address}/system"

    @property
    def port(self) -> int:
        return LIBVIRT_TLS_PORT if self.tls else LIBVIRT_TCP_PORT

    @property
    def dir(self) -> Path:
        return self.root / "hosts" / self.name

    @property
    def holder_pidfile(self) -> Path:
        return self.dir / "holder.pid"

    @property
    def virtlogd_pidfile(self) -> Path:
        return self.dir / "virtlogd.pid"

    @property
    def libvirtd_pidfile(self) -> Path:
        return self.dir / "libvirtd.pid"

    @property
    def powered_off_marker(self) -> Path:
        return self.dir / "powered-off"

    @property
    def images_dir(self) -> Path:
        """The host's private /var/lib/libvirt/images, seen from the root namespace."""
        return self.dir / "lib" / "images"

    # ---- state -------------------------------------------------------------------------

    def netns_exists(self) -> bool:
        return Path("/run/netns", self.netns).exists()

    def holder_pid(self) -> int | None:
        return _live_pid(self.holder_pidfile, f"balancerd-lab-holder {self.dir}")

    def libvirtd_pid(self) -> int | None:
        return _live_pid(self.libvirtd_pidfile, str(self.libvirtd_pidfile))

    def virtlogd_pid(self) -> int | None:
        return _live_pid(self.virtlogd_pidfile, str(self.virtlogd_pidfile))

    def answers(self) -> bool:
        return tcp_open(self.address, self.port, timeout_s=1.0)

    def netns_pids(self) -> list[int]:
        if not self.netns_exists():
            return []
        proc = run(["ip", "netns", "pids", self.netns], check=False)
        return [int(w) for w in proc.stdout.split() if w.isdigit()]

    # ---- building ----------------------------------------------------------------------

    def write_files(self, all_hosts: list[LabHost]) -> None:
        """Per-host libvirt config (a copy of /etc/libvirt), hosts file and holder script."""
        for folder in BIND_MOUNTS:
            (self.dir / folder).mkdir(parents=True, exist_ok=True)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        etc = self.dir / "etc"
        if not (etc / "libvirtd.conf").exists() and Path("/etc/libvirt").is_dir():
            shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True, symlinks=True)
        # no default network: it would try to start dnsmasq and firewall rules in the netns
        autostart = etc / "qemu" / "networks" / "autostart"
        if autostart.is_dir():
            for link in autostart.iterdir():
                link.unlink()
        if self.tls:
            listen = (
                "# balancerd lab host (generated): TLS only, x509 client certificates\n"
                "listen_tls = 1\n"
                "listen_tcp = 0\n"
                # the client's certificate must verify against /etc/pki/CA/cacert.pem
                "tls_no_verify_certificate = 0\n"
                'auth_tls = "none"\n'
            )
        else:
            listen = (
                "# balancerd lab host (generated): TCP without auth, lab only\n"
                "listen_tls = 0\n"
                "listen_tcp = 1\n"
                'auth_tcp = "none"\n'
            )
        (etc / "libvirtd.conf").write_text(
            listen + f'listen_addr = "{self.address}"\n'
            'auth_unix_rw = "none"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
            "keepalive_interval = 5\n"
            "keepalive_count = 5\n"
        )
        (etc / "qemu.conf").write_text(
            "# balancerd lab host (generated)\n"
            'security_driver = "none"\n'
            'user = "root"\n'
            'group = "root"\n'
            "dynamic_ownership = 0\n"
            "remember_owner = 0\n" + ("migrate_tls_x509_verify = 1\n" if self.tls else "")
            # TLS migration streams (VIR_MIGRATE_TLS): /etc/pki/qemu (the host's pki/qemu);
            # the destination QEMU verifies the source's client certificate
        )
        (etc / "virtlogd.conf").write_text("# balancerd lab host (generated)\nlog_level = 3\n")
        hosts_lines = ["127.0.0.1 localhost", "::1 localhost"]
        hosts_lines += [f"{h.address} {h.hostname} {h.name}" for h in all_hosts]
        (self.dir / "hosts").write_text("\n".join(hosts_lines) + "\n")
        mounts = "\n".join(
            f"mount --bind {shlex.quote(str(self.dir / folder))} {target}"
            for folder, target in BIND_MOUNTS.items()
        )
        (self.dir / "holder.sh").write_text(
            "# balancerd lab host holder (generated): owns this host's mount + UTS namespaces\n"
            "set -e\n"
            f"hostname {self.hostname}\n"
            "mkdir -p " + " ".join(BIND_MOUNTS.values()) + "\n"
            f"{mounts}\n"
            f"mount --bind {shlex.quote(str(self.dir / 'hosts'))} /etc/hosts\n"
            "# drop copies of other network namespaces' mounts: they would pin them\n"
            "for m in $(awk '$3 == \"nsfs\" {print $2}' /proc/self/mounts); do\n"
            '  umount -l "$m" 2>/dev/null || true\n'
            "done\n"
            f"echo $$ > {shlex.quote(str(self.holder_pidfile))}.tmp\n"
            f"mv {shlex.quote(str(self.holder_pidfile))}.tmp "
            f"{shlex.quote(str(self.holder_pidfile))}\n"
            f'exec -a "balancerd-lab-holder {self.dir}" sleep infinity\n'
        )

    def create_network(self, bridge: str, prefix_len: int = 24) -> None:
        if not self.netns_exists():
            run(["ip", "netns", "add", self.netns])
        have_veth = run(["ip", "link", "show", self.veth], check=False).returncode == 0
        if not have_veth:
            peer = ["peer", "name", "eth0", "netns", self.netns]
            run(["ip", "link", "add", self.veth, "type", "veth", *peer])
        run(["ip", "link", "set", self.veth, "master", bridge, "up"])
        inside = ["ip", "-n", self.netns]
        addrs = run([*inside, "-o", "addr", "show", "dev", "eth0"]).stdout
        if f"inet {self.address}/" not in addrs:
            run([*inside, "addr", "add", f"{self.address}/{prefix_len}", "dev", "eth0"])
        run([*inside, "link", "set", "eth0", "up"])
        run([*inside, "link", "set", "lo", "up"])
        if run([*inside, "link", "show", GUEST_BRIDGE], check=False).returncode != 0:
            run([*inside, "link", "add", GUEST_BRIDGE, "type", "bridge"])
        run([*inside, "link", "set", GUEST_BRIDGE, "up"])

    def start_holder(self) -> int:
        pid = self.holder_pid()
        if pid is not None:
            return pid
        self.holder_pidfile.unlink(missing_ok=True)
        bash = which("bash") or "/bin/bash"
        argv = ["ip", "netns", "exec", self.netns]
        argv += ["unshare", "-m", "-u", "--propagation", "private", "--"]
        argv += [bash, str(self.dir / "holder.sh")]
        with open(self.dir / "holder.log", "ab") as log:
            # its own session: it must outlive the process running `lab up`
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )

        def ready() -> bool:
            if proc.poll() is not None:
                log_text = (self.dir / "holder.log").read_text(errors="replace")
                raise LabError(f"{self.name}: holder exited ({proc.returncode}): {log_text}")
            return self.holder_pid() is not None

        wait_until(DAEMON_START_TIMEOUT_S, ready, f"{self.name}: holder process")
        holder = self.holder_pid()
        if holder is None:
            raise RuntimeError("internal error: holder is None")
        return holder

    def _nsenter(self, holder_pid: int) -> list[str]:
        return ["nsenter", "-t", str(holder_pid), "-m", "-u", "-n", "--"]

    def start_daemons(self) -> None:
        """virtlogd, then libvirtd; waits until libvirtd answers on TCP."""
        holder = self.holder_pid()
        if holder is None:
            raise LabError(f"{self.name}: its holder process is not running (lab down + up)")
        self.powered_off_marker.unlink(missing_ok=True)
        if self.virtlogd_pid() is None:
            run([*self._nsenter(holder), "virtlogd", "-d", "-p", str(self.virtlogd_pidfile)])
            wait_until(
                DAEMON_START_TIMEOUT_S,
                lambda: self.virtlogd_pid() is not None,
                f"{self.name}: virtlogd",
            )
        if self.libvirtd_pid() is None:
            argv = [*self._nsenter(holder), "libvirtd", "-d", "-l"]
            argv += ["-f", "/etc/libvirt/libvirtd.conf", "-p", str(self.libvirtd_pidfile)]
            run(argv)

        try:
            wait_until(DAEMON_START_TIMEOUT_S, self.answers, f"{self.name}: libvirtd on {self.uri}")
        except LabError as exc:
            log = self.dir / "log" / "libvirtd.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise LabError(f"{exc}; libvirtd.log ends: {tail}") from exc

    def kill_libvirtd(self) -> None:
        """SIGKILL libvirtd (a crash): guests keep running, the URI stops answering."""
        pid = self.libvirtd_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_until(10.0, lambda: not pid_alive(pid), f"{self.name}: libvirtd to die")

    def power_off(self) -> None:
        """Everything but the holder stops (guests, libvirtd, virtlogd); /run/libvirt empties
        like a tmpfs at reboot. The netns stays, so the address refuses connections."""
        holder = self.holder_pid()
        pids = [p for p in self.netns_pids() if p != holder]
        kill_and_wait(pids, grace_s=0.0)
        run_dir = self.dir / "run"
        if run_dir.is_dir():
            for entry in run_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        self.powered_off_marker.write_text("off\n")

    def is_powered(self) -> bool:
        return not self.powered_off_marker.exists()

    def destroy(self) -> None:
        """Kill every process of the host and delete its network; leaves its folder."""
        pids = set(self.netns_pids())
        holder = self.holder_pid()
        if holder is not None:
            pids.add(holder)
        kill_and_wait(sorted(pids), grace_s=0.0)
        if run(["ip", "link", "show", self.veth], check=False).returncode == 0:
            run(["ip", "link", "del", self.veth], check=False)
        if self.netns_exists():
            run(["ip", "netns", "del", self.netns])


def _live_pid(pidfile: Path, cmdline_fragment: str) -> int | None:
    """The pid in pidfile if that process is alive and really is the one we started
    (its command line contains cmdline_fragment), so a recycled pid is never signalled."""
    pid = read_pid(pidfile)
    if not pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    return pid if cmdline_fragment in cmdline else None
