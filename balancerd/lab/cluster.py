"""A real multi-host libvirt cluster on one machine (``balancerd lab``).

Each lab host is a network namespace with its own libvirtd (see host.py); guests are small
TCG domains that boot a Debian cloud kernel and a busybox initramfs whose ``guestload``
burns a share of a vCPU and/or keeps rewriting memory (see images.py). ``Lab.up`` also
writes a daemon config (``ROOT/balancerd.yaml``) pointing balancerd at the lab hosts.

Layout of ROOT (everything the lab owns; ``down`` removes it all)::

    lab.json            name, subnet, host count, capacities (read back by Lab(ROOT))
    balancerd.yaml      daemon config for this lab
    state/              the daemon's state_dir
    shared/             "shared storage": same path on every host (disk="shared"); a FUSE
                        mount (bindfs of shared-store/) typed fuse.glusterfs, so libvirt
                        treats it as a shared filesystem and allows live migration of guests
                        whose disks are there with cache=none (a plain local folder would be
                        refused: "Migration without shared storage is unsafe")
    shared-store/       what shared/ shows
    consoles/NAME.log   guests' serial consoles (append='on': survives migrations)
    domains/NAME.xml    the XML each guest was defined from
    hosts/hostN/        per-host libvirt folders, pidfiles, holder script and log;
                        hosts/hostN/pki is the host's /etc/pki
    pki/                (TLS lab) the lab CA, balancerd's client PKI folder (pki_dir of the
                        daemon config) and an untrusted client certificate (lab/tls.py)

Guests are defined persistent on their start host, so a peer-to-peer live migration with
persist-dest + undefine-source moves the definition along with the guest.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balancerd.errors import ConfigError, LabError
from balancerd.lab.domain import GuestDevices, domain_xml
from balancerd.lab.host import LabHost
from balancerd.lab.images import INIT_MARKER, ensure_images
from balancerd.lab.system import pids_with_cmdline, require_lab_support, run
from balancerd.lab.tls import TlsHost, client_pki, make_lab_pki

DEFAULT_NAME = "bd"
DEFAULT_SUBNET = "10.77.0"
DEFAULT_LAB_BASE = Path("/var/lib/balancerd-lab")
REPO_POLICY = Path(__file__).resolve().parents[2] / "policies" / "balance.yaml"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # veth "NAME-hNN" must fit in 15 characters
GUEST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SUBNET_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")
DISK_KINDS = ("", "shared", "local")
DISK_SIZE = "64M"
MIN_GUEST_MEM_MIB = 80  # 64 MiB hangs before the console; 80 boots
VIRSH_TIMEOUT_S = 30.0
GUEST_START_WORKERS = 3


@dataclass(frozen=True)
class GuestSpec:
    name: str
    host: str  # "host1", "host2", ... where it starts
    mem_mib: int = 128
    vcpus: int = 1
    burn_pct: int = 0  # % of ONE vCPU the guest keeps busy (duty cycle in guestload.c)
    dirty_mib: int = 0  # MiB rewritten in a loop (one byte per 4 KiB page): non-converging
    dirty_mib_s: float = 0.0  # at most this many MiB/s of it (0: as fast as the vCPU can)
    fill_mib: int = 0  # MiB written once and kept (touched memory a migration must send)
    # "" none | "shared": qcow2 under ROOT/shared (same path on every host)
    # | "local": under the host's private /var/lib/libvirt/images (absent on the others)
    disk: str = ""
    disk_cache: str = "none"
    bridge: bool = False  # a NIC on the bridge "guestbr" that every lab host has
    shmem: bool = False  # an ivshmem device, which blocks live migration


@dataclass(frozen=True)
class LabSpec:
    hosts: int = 3
    guests: tuple[GuestSpec, ...] = ()
    host_cpus: int = 2  # capacity written into the daemon config: lab hosts share one machine
    host_mem_mib: int = 2048
    policy: str = ""  # policy path for the config; "" = the repo's policies/balance.yaml
    metrics_listen: str = "127.0.0.1:9177"
    # libvirtd listens only on TLS with x509 client verification; balancerd connects with
    # qemu+tls and the lab's client PKI folder; migration streams can be encrypted.
    tls: bool = False


# The imbalanced demo set of `balancerd lab up`: six guests, all on host1.
DEFAULT_GUESTS: tuple[GuestSpec, ...] = (
    GuestSpec("vm1", "host1", burn_pct=60),
    GuestSpec("vm2", "host1", burn_pct=40),
    GuestSpec("vm3", "host1", burn_pct=30),
    GuestSpec("vm4", "host1", burn_pct=20),
    GuestSpec("vm5", "host1", burn_pct=10),
    GuestSpec("vm6", "host1", burn_pct=0),
)


@dataclass(frozen=True)
class GuestStatus:
    name: str
    host: str
    state: str  # virsh words: "running", "paused", "shut off", ...


@dataclass(frozen=True)
class HostStatus:
    name: str
    address: str
    uri: str
    netns: bool
    holder_pid: int | None
    virtlogd_pid: int | None
    libvirtd_pid: int | None
    answers: bool  # libvirtd accepts connections on the host address (TCP or TLS port)
    powered: bool
    guests: tuple[GuestStatus, ...] = ()


@dataclass(frozen=True)
class LabStatus:
    root: str
    name: str
    subnet: str
    up: bool  # the lab's state file exists
    hosts: tuple[HostStatus, ...] = field(default_factory=tuple)

    @property
    def healthy(self) -> bool:
        return self.up and all(h.answers and h.powered for h in self.hosts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["healthy"] = self.healthy
        return data


class Lab:
    """A lab rooted at ``root``. A lab already there (``root/lab.json``) keeps its own name
    and subnet: ``Lab(Path(lab_dir))`` is enough to drive it (the lab power driver does)."""

    def __init__(
        self,
        root: Path,
        name: str | None = None,
        subnet: str | None = None,
        *,
        cache_dir: Path | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        if any(c.isspace() for c in str(self.root)):
            raise LabError(f"lab dir {str(self.root)!r}: no whitespace allowed")
        self.state_file = self.root / "lab.json"
        self.config_path = self.root / "balancerd.yaml"
        self.cache_dir = cache_dir
        state = self._read_state()
        stored_name = str(state["name"]) if state else None
        stored_subnet = str(state["subnet"]) if state else None
        for what, given, stored in (("name", name, stored_name), ("subnet", subnet, stored_subnet)):
            if given is not None and stored is not None and given != stored:
                raise LabError(f"the lab in {self.root} has {what} {stored!r}, not {given!r}")
        self.name = name or stored_name or DEFAULT_NAME
        self.subnet = subnet or stored_subnet or DEFAULT_SUBNET
        if not NAME_RE.match(self.name):
            raise LabError(f"lab name {self.name!r}: use 1-8 lowercase letters/digits")
        match = SUBNET_RE.match(self.subnet)
        if not match or any(int(octet) > 255 for octet in match.groups()):
            raise LabError(f"lab subnet {self.subnet!r}: expected three octets like 10.77.0")

    # ---- state -------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {self.state_file}: {exc}") from exc
        if not isinstance(data, dict):
            raise LabError(f"{self.state_file}: not a JSON object")
        return data

    def _host_count(self) -> int:
        state = self._read_state()
        return int(state["hosts"]) if state else 0

    def _tls(self) -> bool:
        state = self._read_state()
        return bool(state.get("tls", False)) if state else False

    @property
    def tls(self) -> bool:
        """Whether the lab's libvirtds listen only on TLS (``lab up --tls``)."""
        return self._tls()

    def _hosts(self) -> list[LabHost]:
        tls = self._tls()
        return [
            LabHost(self.name, self.root, i, self.subnet, tls=tls)
            for i in range(1, self._host_count() + 1)
        ]

    @contextmanager
    def squeezed_link(self, host: str, rate: str, *, burst: str, latency: str) -> Iterator[None]:
        """``host``'s outgoing traffic (a migration stream from it) through a token bucket
        (``tc tbf``; netem is missing from this kind of kernel) while the block runs."""
        tc = ["ip", "netns", "exec", self._host(host).netns, "tc", "qdisc"]
        bucket = ["tbf", "rate", rate, "burst", burst, "latency", latency]
        run([*tc, "replace", "dev", "eth0", "root", *bucket])
        try:
            yield
        finally:
            run([*tc, "del", "dev", "eth0", "root"], check=False)

    def _host(self, host: str) -> LabHost:
        for candidate in self._hosts():
            if candidate.name == host:
                return candidate
        raise LabError(f"lab {self.name} has no host {host!r} (hosts: {self.host_names()})")

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    def host_names(self) -> list[str]:
        return [h.name for h in self._hosts()]

    def host_address(self, host: str) -> str:
        return self._host(host).address

    def host_uri(self, host: str) -> str:
        """The URI in the daemon config (``qemu+tls://...`` in a TLS lab, whose config
        names the client PKI folder in ``pki_dir``)."""
        return self._host(host).uri

    def client_uri(self, host: str) -> str:
        """A URI this machine can connect with as it is: in a TLS lab, with
        ``?pkipath=`` naming balancerd's client PKI folder."""
        return _client_uri(self._host(host), self.root)

    @property
    def pki_dir(self) -> Path:
        """balancerd's client PKI folder in a TLS lab (cacert.pem, clientcert.pem,
        clientkey.pem)."""
        return client_pki(self.root)

    def migration_uri(self, host: str) -> str:
        return f"tcp://{self._host(host).address}"

    def hostname(self, host: str) -> str:
        """The UTS host name libvirt reports for that lab host."""
        return self._host(host).hostname

    def console_log(self, guest: str) -> Path:
        return self.root / "consoles" / f"{guest}.log"

    # ---- up ----------------------------------------------------------------------------

    def up(self, spec: LabSpec) -> Path:
        """Bring the hosts and guests of spec up (what is already up is left alone) and
        write the daemon config; returns its path."""
        _validate_spec(spec)
        require_lab_support()
        state = self._read_state()
        if state and int(state["hosts"]) != spec.hosts:
            raise LabError(
                f"the lab in {self.root} already has {state['hosts']} hosts; "
                f"run `balancerd lab down --dir {self.root}` first"
            )
        if state and bool(state.get("tls", False)) != spec.tls:
            raise LabError(
                f"the lab in {self.root} is {'' if state.get('tls') else 'not '}a TLS lab; "
                f"run `balancerd lab down --dir {self.root}` first"
            )
        images = ensure_images(self.cache_dir)
        for folder in ("state", "shared", "shared-store", "consoles", "domains", "hosts"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._write_state(spec, images.kernel, images.initrd)
        self._create_bridge()
        hosts = self._hosts()
        if spec.tls:
            make_lab_pki(self.root, [TlsHost(h.name, h.hostname, h.address) for h in hosts])
        self._mount_shared(any(h.holder_pid() is not None for h in hosts))
        for host in hosts:
            host.write_files(hosts)
            host.create_network(self.bridge)
            host.start_holder()
        for host in hosts:
            host.start_daemons()
        existing = {g.name: g for g in self.guests()}
        to_create = [g for g in spec.guests if g.name not in existing]
        to_start = [
            g
            for g in existing.values()
            if g.name in {s.name for s in spec.guests}
            and g.state == "shut off"
            and self._host(g.host).is_powered()
        ]
        # a few at a time: starting a QEMU costs ~1-2 s, mostly waiting
        with ThreadPoolExecutor(max_workers=GUEST_START_WORKERS) as pool:
            futures = [pool.submit(self._start_new_guest, g) for g in to_create]
            futures += [pool.submit(self._start_defined_guest, g) for g in to_start]
            for future in futures:
                future.result()
        self._write_config(spec)
        return self.config_path

    def _write_state(self, spec: LabSpec, kernel: Path, initrd: Path) -> None:
        state = {
            "name": self.name,
            "subnet": self.subnet,
            "hosts": spec.hosts,
            "host_cpus": spec.host_cpus,
            "host_mem_mib": spec.host_mem_mib,
            "kernel": str(kernel),
            "initrd": str(initrd),
            "tls": spec.tls,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _create_bridge(self) -> None:
        if run(["ip", "link", "show", self.bridge], check=False).returncode != 0:
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
        addrs = run(["ip", "-o", "addr", "show", "dev", self.bridge]).stdout
        if f"inet {self.subnet}.1/" not in addrs:
            run(["ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    @property
    def shared_dir(self) -> Path:
        return self.root / "shared"

    def _shared_mounted(self) -> bool:
        target = str(self.shared_dir)
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == target for line in mounts if len(line.split()) > 2)

    def _mount_shared(self, holders_running: bool) -> None:
        """Mount shared/ before the hosts' mount namespaces are made: they copy it."""
        if self._shared_mounted():
            return
        if holders_running:
            raise LabError(
                f"{self.shared_dir} is not mounted but the lab hosts are running; "
                f"run `balancerd lab down --dir {self.root}` and up again"
            )
        store = self.root / "shared-store"
        run(["bindfs", "-o", "subtype=glusterfs,direct_io", str(store), str(self.shared_dir)])

    def _unmount_shared(self) -> None:
        if self._shared_mounted():
            proc = run(["fusermount", "-u", str(self.shared_dir)], check=False)
            if proc.returncode != 0:
                run(["umount", "-l", str(self.shared_dir)])

    def _write_config(self, spec: LabSpec) -> None:
        policy = spec.policy or str(REPO_POLICY)
        config = {
            "hosts": [
                {
                    "name": h.name,
                    "uri": h.uri,
                    "migration_uri": f"tcp://{h.address}",
                    "cpus": spec.host_cpus,
                    "mem_mib": spec.host_mem_mib,
                    "power": {"driver": "lab", "lab_dir": str(self.root)},
                }
                for h in self._hosts()
            ],
            "policy": policy,
            **({"pki_dir": str(client_pki(self.root))} if spec.tls else {}),
            "state_dir": str(self.root / "state"),
            # what every lab host sees at one path: disks elsewhere are local to a host
            "shared_storage": [str(self.shared_dir)],
            "metrics": {"listen": spec.metrics_listen},
            # Lab pace: a demo shows decisions within a minute (production: 15 s / 300 s).
            "collect_interval_s": 2,
            "cycle_interval_s": 15,
            "smoothing_window": 3,
        }
        header = (
            f"# balancerd daemon config for lab {self.name!r} (written by `balancerd lab up`)\n"
        )
        self.config_path.write_text(header + yaml.safe_dump(config, sort_keys=False))

    # ---- guests ------------------------------------------------------------------------

    def _virsh(self, host: LabHost, *args: str, check: bool = True) -> str:
        argv = ["virsh", "-q", "-c", _client_uri(host, self.root), *args]
        return run(argv, timeout_s=VIRSH_TIMEOUT_S, check=check).stdout

    def start_guest(self, g: GuestSpec) -> None:
        """Define g persistent on its host and start it (returns once QEMU runs; use
        wait_booted to wait for its /init)."""
        problems = _guest_problems(g, self.host_names())
        if problems:
            raise ConfigError(problems)
        if not self._host(g.host).is_powered():
            raise LabError(f"cannot start {g.name}: {g.host} is powered off")
        where = self.guest_host(g.name)
        if where is not None:
            raise LabError(f"guest {g.name} already exists on {where}")
        self._start_new_guest(g)

    def _start_defined_guest(self, g: GuestStatus) -> None:
        self._virsh(self._host(g.host), "start", g.name)

    def _start_new_guest(self, g: GuestSpec) -> None:
        host = self._host(g.host)
        state = self._read_state() or {}
        disk_path = ""
        if g.disk == "shared":
            disk = self.root / "shared" / f"{g.name}.qcow2"
            if not disk.exists():
                run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), DISK_SIZE])
            disk_path = str(disk)
        elif g.disk == "local":
            disk = host.images_dir / f"{g.name}.qcow2"
            if not disk.exists():
                run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), DISK_SIZE])
            disk_path = f"/var/lib/libvirt/images/{g.name}.qcow2"  # as the host sees it
        devices = GuestDevices(
            kernel=Path(state["kernel"]),
            initrd=Path(state["initrd"]),
            console_log=self.console_log(g.name),
            disk_path=disk_path,
            disk_cache=g.disk_cache,
            bridge=g.bridge,
            shmem=g.shmem,
        )
        xml = domain_xml(
            lab_name=self.name,
            lab_dir=self.root,
            name=g.name,
            mem_mib=g.mem_mib,
            vcpus=g.vcpus,
            burn_pct=g.burn_pct,
            dirty_mib=g.dirty_mib,
            dirty_mib_s=g.dirty_mib_s,
            fill_mib=g.fill_mib,
            devices=devices,
        )
        xml_path = self.root / "domains" / f"{g.name}.xml"
        xml_path.write_text(xml)
        self._virsh(host, "define", str(xml_path))
        self._virsh(host, "start", g.name)

    def wait_booted(self, guest: str, timeout_s: float = 60.0) -> None:
        """Wait until the guest's serial console shows that its /init ran."""
        log = self.console_log(guest)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log.exists() and INIT_MARKER in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no console log)"
        raise LabError(f"guest {guest} did not boot within {timeout_s:.0f} s; console: {tail}")

    def guests(self) -> list[GuestStatus]:
        """Every guest defined or running on a host that answers."""
        found: list[GuestStatus] = []
        for host in self._hosts():
            if host.answers():
                found.extend(self._host_guests(host))
        return found

    def _host_guests(self, host: LabHost) -> list[GuestStatus]:
        out = self._virsh(host, "list", "--all", check=False)
        guests = []
        for line in out.splitlines():
            parts = line.split(None, 2)
            if len(parts) == 3:
                guests.append(GuestStatus(name=parts[1], host=host.name, state=parts[2].strip()))
        return guests

    def guest_host(self, name: str) -> str | None:
        """The host that has guest `name`: where it runs, else where it is paused (e.g. the
        destination of a migration in flight), else where it is defined; None if nowhere."""
        found = [g for g in self.guests() if g.name == name]
        for wanted in ("running", None):
            for g in found:
                if g.state == wanted or (wanted is None and g.state != "shut off"):
                    return g.host
        return found[0].host if found else None

    def destroy_guest(self, name: str) -> None:
        """Stop the guest (wherever it is) and undefine it everywhere."""
        found = False
        for host in self._hosts():
            if not host.answers():
                continue
            for g in self._host_guests(host):
                if g.name != name:
                    continue
                found = True
                if g.state != "shut off":
                    self._virsh(host, "destroy", name, check=False)
                self._virsh(host, "undefine", name, check=False)
        if not found:
            raise LabError(f"no guest {name} on any answering host of lab {self.name}")

    # ---- host faults and power ---------------------------------------------------------

    def libvirtd_pid(self, host: str) -> int | None:
        """The pid of the host's libvirtd (tests freeze it with SIGSTOP to hang calls)."""
        return self._host(host).libvirtd_pid()

    def kill_libvirtd(self, host: str) -> None:
        """SIGKILL the host's libvirtd (guests keep running); its URI stops answering."""
        self._host(host).kill_libvirtd()

    def start_libvirtd(self, host: str) -> None:
        h = self._host(host)
        h.start_holder()
        h.start_daemons()

    def power_off(self, host: str) -> None:
        """Guests, libvirtd and virtlogd of the host stop; persistent definitions stay."""
        self._host(host).power_off()

    def power_on(self, host: str) -> None:
        """libvirtd comes back; the host's guests are shut off, as after a real reboot."""
        self.start_libvirtd(host)

    def is_powered(self, host: str) -> bool:
        h = self._host(host)
        return h.is_powered() and h.holder_pid() is not None

    # ---- status and down ---------------------------------------------------------------

    def status(self) -> LabStatus:
        hosts = []
        for h in self._hosts():
            answers = h.answers()
            hosts.append(
                HostStatus(
                    name=h.name,
                    address=h.address,
                    uri=h.uri,
                    netns=h.netns_exists(),
                    holder_pid=h.holder_pid(),
                    virtlogd_pid=h.virtlogd_pid(),
                    libvirtd_pid=h.libvirtd_pid(),
                    answers=answers,
                    powered=h.is_powered(),
                    guests=tuple(self._host_guests(h)) if answers else (),
                )
            )
        return LabStatus(
            root=str(self.root),
            name=self.name,
            subnet=self.subnet,
            up=self.state_file.exists(),
            hosts=tuple(hosts),
        )

    def _known_hosts(self) -> list[LabHost]:
        """Hosts from the state file, plus any netns NAME-hostN left behind by this lab: one
        whose processes run from this lab dir, or an empty one. A netns of the same name
        whose processes belong to another lab dir is never touched."""
        hosts = {h.name: h for h in self._hosts()}
        netns_dir = Path("/run/netns")
        pattern = re.compile(rf"^{re.escape(self.name)}-host(\d+)$")
        if netns_dir.is_dir():
            for entry in netns_dir.iterdir():
                match = pattern.match(entry.name)
                if not match or f"host{match.group(1)}" in hosts:
                    continue
                host = LabHost(self.name, self.root, int(match.group(1)), self.subnet)
                pids = host.netns_pids()
                ours = set(self.processes())
                if not pids or ours.intersection(pids):
                    hosts[host.name] = host
        return list(hosts.values())

    def processes(self) -> list[int]:
        """Pids of this lab's processes found by command line (holders, daemons, QEMUs),
        even if their network namespace is gone."""
        pids = pids_with_cmdline(f"{self.root}/hosts/")
        pids += pids_with_cmdline(f"{self.root}/shared-store ")  # bindfs
        pids += pids_with_cmdline(f"bd.lab={self.root} ")  # QEMU: in the kernel command line
        return sorted(set(pids))

    def down(self) -> None:
        """Stop everything and remove the lab: processes, netns, veths, bridge, ROOT.
        Raises LabError naming whatever is still there afterwards."""
        from balancerd.lab.system import kill_and_wait

        hosts = self._known_hosts()
        for host in hosts:
            host.destroy()
        self._unmount_shared()
        kill_and_wait(self.processes(), grace_s=0.0)
        if run(["ip", "link", "show", self.bridge], check=False).returncode == 0:
            ports = run(["ip", "-o", "link", "show", "master", self.bridge]).stdout.strip()
            if not ports:  # ports left belong to a lab of the same name in another dir
                run(["ip", "link", "del", self.bridge])
        if self.root.exists():
            shutil.rmtree(self.root)
        parent = self.root.parent
        if parent == DEFAULT_LAB_BASE and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        leftovers = self.leftovers(hosts)
        if leftovers:
            raise LabError(f"lab {self.name} down left: " + "; ".join(leftovers))

    def leftovers(self, hosts: list[LabHost] | None = None) -> list[str]:
        """What of this lab still exists on the machine (empty after a clean down)."""
        hosts = hosts if hosts is not None else self._known_hosts()
        found: list[str] = []
        for host in hosts:
            if host.netns_exists():
                found.append(f"netns {host.netns}")
            if run(["ip", "link", "show", host.veth], check=False).returncode == 0:
                found.append(f"link {host.veth}")
        if run(["ip", "link", "show", self.bridge], check=False).returncode == 0:
            found.append(f"bridge {self.bridge}")
        pids = self.processes()
        if pids:
            found.append(f"processes {pids}")
        if self._shared_mounted():
            found.append(f"mount {self.shared_dir}")
        if self.root.exists():
            found.append(f"directory {self.root}")
        return found


def _client_uri(host: LabHost, root: Path) -> str:
    if not host.tls:
        return host.uri
    return f"{host.uri}?pkipath={client_pki(root)}"


# ---- spec validation and parsing -----------------------------------------------------


def _guest_problems(g: GuestSpec, host_names: list[str]) -> list[str]:
    problems = []
    if not GUEST_NAME_RE.match(g.name):
        problems.append(f"guest name {g.name!r}: letters, digits, '.', '_', '-' only")
    if g.host not in host_names:
        problems.append(f"guest {g.name}: host {g.host!r} is not one of {host_names}")
    if g.mem_mib < MIN_GUEST_MEM_MIB:
        problems.append(
            f"guest {g.name}: mem_mib {g.mem_mib} < {MIN_GUEST_MEM_MIB} (its kernel needs that)"
        )
    if g.vcpus < 1:
        problems.append(f"guest {g.name}: vcpus {g.vcpus} < 1")
    if not 0 <= g.burn_pct <= 100:
        problems.append(f"guest {g.name}: burn_pct {g.burn_pct} not in 0..100")
    if g.dirty_mib < 0 or g.dirty_mib >= g.mem_mib:
        problems.append(f"guest {g.name}: dirty_mib {g.dirty_mib} not in 0..mem_mib-1")
    if g.fill_mib < 0 or (g.fill_mib and g.fill_mib + g.dirty_mib >= g.mem_mib):
        problems.append(f"guest {g.name}: fill_mib {g.fill_mib} + dirty_mib not below mem_mib")
    if g.dirty_mib_s < 0:
        problems.append(f"guest {g.name}: dirty_mib_s {g.dirty_mib_s} < 0")
    if g.disk not in DISK_KINDS:
        problems.append(f"guest {g.name}: disk {g.disk!r} not one of {DISK_KINDS}")
    return problems


def _validate_spec(spec: LabSpec) -> None:
    """Raise ConfigError listing every problem of spec."""
    problems = []
    if not 1 <= spec.hosts <= 99:
        problems.append(f"hosts {spec.hosts}: expected 1..99")
    names = [f"host{i}" for i in range(1, spec.hosts + 1)]
    seen: set[str] = set()
    for g in spec.guests:
        if g.name in seen:
            problems.append(f"guest {g.name} appears twice")
        seen.add(g.name)
        problems += _guest_problems(g, names)
    if problems:
        raise ConfigError(problems)


GUEST_FIELDS = ("name", "host", "mem_mib", "vcpus", "burn_pct", "dirty_mib")
GUEST_SYNTAX = (
    "NAME:HOST[:MEM_MIB[:VCPUS[:BURN_PCT[:DIRTY_MIB]]]][:disk=shared|local]"
    "[:disk_cache=none|...][:bridge=1], comma separated; or @FILE.yaml (a list of mappings "
    "with the GuestSpec fields)"
)


def parse_guest_specs(text: str) -> tuple[GuestSpec, ...]:
    """Parse the --guests syntax (see GUEST_SYNTAX); raises ConfigError."""
    if text.startswith("@"):
        return _guests_from_yaml(Path(text[1:]))
    guests = []
    problems = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        positional = [f for f in fields if "=" not in f]
        options = [f for f in fields if "=" in f]
        if len(positional) < 2 or len(positional) > len(GUEST_FIELDS):
            problems.append(f"--guests {item!r}: expected {GUEST_SYNTAX}")
            continue
        values: dict[str, Any] = {"name": positional[0], "host": positional[1]}
        try:
            for key, raw in zip(GUEST_FIELDS[2:], positional[2:], strict=False):
                if not raw.strip().isdigit():
                    raise ValueError(f"{key.upper()} {raw!r} is not a whole number")
                values[key] = int(raw)
            for option in options:
                key, _, raw = option.partition("=")
                if key == "bridge":
                    values[key] = raw.lower() in ("1", "yes", "true", "on")
                elif key in ("disk", "disk_cache"):
                    values[key] = raw
                else:
                    raise ValueError(f"unknown option {key!r}")
        except ValueError as exc:
            problems.append(f"--guests {item!r}: {exc}")
            continue
        guests.append(GuestSpec(**values))
    if problems:
        raise ConfigError(problems)
    return tuple(guests)


def _guests_from_yaml(path: Path) -> tuple[GuestSpec, ...]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from exc
    if not isinstance(data, list):
        raise ConfigError([f"{path}: expected a list of guests"])
    allowed = set(GuestSpec.__dataclass_fields__)
    guests = []
    problems = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            problems.append(f"{path}: [{i}]: expected a mapping")
            continue
        unknown = set(item) - allowed
        if unknown:
            problems.append(f"{path}: [{i}]: unknown fields {sorted(unknown)}")
            continue
        try:
            guests.append(GuestSpec(**item))
        except TypeError as exc:
            problems.append(f"{path}: [{i}]: {exc}")
    if problems:
        raise ConfigError(problems)
    return tuple(guests)
