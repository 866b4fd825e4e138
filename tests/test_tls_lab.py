"""TLS on every libvirt link of the lab (``balancerd lab up --tls``), with real certificates.

Lab "bt1" on 10.77.11.0/24, three hosts whose libvirtd listens only on TLS (port 16514)
with x509 client verification. host3's certificate for receiving TLS migration streams is
taken away. What is shown:

- balancerd connects over qemu+tls with the configured PKI folder (``pki_dir``);
- a client certificate from another CA, and no client certificate, are refused;
- a migration with ``spec.migration.tls: required`` completes and its stream on the wire
  is TLS records, never QEMU's clear-text stream (which starts with the magic "QEVM");
- a move to host3 with ``required`` is skipped by preflight (skip kind "tls");
- the control: with ``auto`` the same move goes in clear text (the sniffer sees "QEVM"),
  so the sniffer can tell the two apart.

Run: sudo flock /tmp/balancerd-lab.lock .venv/bin/pytest -m lab tests/test_tls_lab.py
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml

from balancerd.config import load_config
from balancerd.hypervisor.libvirt import LibvirtHypervisor, connect_uri
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.lab.host import LIBVIRT_TCP_PORT, LIBVIRT_TLS_PORT
from balancerd.lab.system import tcp_open
from balancerd.lab.tls import remove_migration_server_cert, untrusted_pki

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB_NAME, LAB_SUBNET = "bt1", "10.77.11"
REPO = Path(__file__).resolve().parents[1]
QEMU_MIGRATION_PORTS = range(49152, 49216)  # libvirt's migration_port_min..max
ETH_P_ALL = 0x0003


@dataclass
class Sniffer:
    """Every TCP payload from src to dst on a QEMU migration port, seen on a veth."""

    iface: str
    src: str
    dst: str
    payloads: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sniffer:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((self.iface, 0))
        sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)

    def _run(self, sock: socket.socket) -> None:
        src, dst = socket.inet_aton(self.src), socket.inet_aton(self.dst)
        with sock:
            while not self._stop.is_set():
                try:
                    frame = sock.recv(65536)
                except TimeoutError:
                    continue
                if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                    continue  # not IPv4 + TCP
                ip = frame[14:]
                if ip[12:16] != src or ip[16:20] != dst:
                    continue
                tcp = ip[(ip[0] & 0x0F) * 4 : struct.unpack("!H", ip[2:4])[0]]
                dport = struct.unpack("!H", tcp[2:4])[0]
                payload = tcp[(tcp[12] >> 4) * 4 :]
                if dport in QEMU_MIGRATION_PORTS and payload:
                    self.payloads.append(bytes(payload))

    @property
    def stream(self) -> bytes:
        return b"".join(self.payloads)


@dataclass
class Ctx:
    lab: Lab
    config_path: Path
    tmp: Path


@pytest.fixture(scope="module")
def ctx(lab_factory_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    if shutil.which("certtool") is None:
        pytest.fail("certtool (Debian's gnutls-bin) is missing: scripts/setup.sh installs it")
    lab: Lab = lab_factory_module(LAB_NAME, LAB_SUBNET)(
        LabSpec(
            hosts=3,
            guests=(GuestSpec("g1", "host1"), GuestSpec("g2", "host1")),
            metrics_listen="127.0.0.1:9311",
            tls=True,
        )
    )
    remove_migration_server_cert(lab.root, "host3")
    lab.wait_booted("g1")
    lab.wait_booted("g2")
    yield Ctx(lab, lab.config_path, tmp_path_factory.mktemp("tls"))


def _config_with(ctx: Ctx, tls: str) -> Path:
    """The lab's config with a policy whose spec.migration.tls is ``tls``."""
    policy = yaml.safe_load((REPO / "policies" / "lab-demo.yaml").read_text())
    policy["metadata"]["name"] = f"tls-{tls}"
    policy["spec"].setdefault("migration", {})["tls"] = tls
    policy_path = ctx.tmp / f"tls-{tls}.yaml"
    policy_path.write_text(yaml.safe_dump(policy))
    config = yaml.safe_load(ctx.config_path.read_text())
    config["policy"] = str(policy_path)
    config_path = ctx.tmp / f"balancerd-{tls}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return config_path


def _migrate(config: Path, vm: str, dst: str) -> tuple[int, dict[str, object], str]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "balancerd.cli",
            "migrate",
            "--config",
            str(config),
            vm,
            dst,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    results = json.loads(out.stdout) if out.stdout.strip() else [{}]
    return out.returncode, results[0], out.stderr


def test_libvirtd_listens_only_on_tls(ctx: Ctx) -> None:
    lab = ctx.lab
    for host in lab.host_names():
        address = lab.host_address(host)
        assert lab.host_uri(host) == f"qemu+tls://{address}/system"
        assert tcp_open(address, LIBVIRT_TLS_PORT, timeout_s=2.0)
        assert not tcp_open(address, LIBVIRT_TCP_PORT, timeout_s=2.0)
        conf = (lab.root / "hosts" / host / "etc" / "libvirtd.conf").read_text()
        assert "listen_tcp = 0" in conf and "tls_no_verify_certificate = 0" in conf


def test_balancerd_connects_with_its_pki_dir(ctx: Ctx) -> None:
    config = load_config(ctx.config_path)
    assert config.pki_dir == str(ctx.lab.pki_dir)
    assert {h.pki_dir for h in config.hosts} == {str(ctx.lab.pki_dir)}
    assert connect_uri(config.hosts[0]).endswith(f"?pkipath={ctx.lab.pki_dir}")
    hv = LibvirtHypervisor(config.hosts, timeout_s=10)
    try:
        samples = hv.sample_all()
        assert [(s.name, s.up, s.error) for s in samples] == [
            ("host1", True, ""),
            ("host2", True, ""),
            ("host3", True, ""),
        ]
        assert {v.name for v in samples[0].vms} == {"g1", "g2"}
        facts = {h: hv.host_facts(h) for h in ("host1", "host2", "host3")}
    finally:
        hv.close()
    # the preflight facts: host3's server certificate for migration streams was taken away
    assert facts["host2"].migration_tls_server and facts["host1"].migration_tls_client
    assert not facts["host3"].migration_tls_server and facts["host3"].migration_tls_client


def test_untrusted_client_certificate_is_refused(ctx: Ctx) -> None:
    address = ctx.lab.host_address("host1")
    with pytest.raises(libvirt.libvirtError):
        libvirt.open(f"qemu+tls://{address}/system?pkipath={untrusted_pki(ctx.lab.root)}")
    # no client certificate at all: a folder with the CA only
    only_ca = ctx.tmp / "only-ca"
    only_ca.mkdir(exist_ok=True)
    shutil.copyfile(ctx.lab.pki_dir / "cacert.pem", only_ca / "cacert.pem")
    with pytest.raises(libvirt.libvirtError):
        libvirt.open(f"qemu+tls://{address}/system?pkipath={only_ca}")
    # the trusted one works (the refusals above are about the certificate, not the host)
    conn = libvirt.open(ctx.lab.client_uri("host1"))
    try:
        assert conn.getHostname() == ctx.lab.hostname("host1")
    finally:
        conn.close()


def test_migration_with_tls_is_encrypted_on_the_wire(ctx: Ctx) -> None:
    lab = ctx.lab
    config = _config_with(ctx, "required")
    with Sniffer(f"{lab.name}-h1", lab.host_address("host1"), lab.host_address("host2")) as sn:
        code, result, stderr = _migrate(config, "g1", "host2")
    assert code == 0, stderr[-3000:]
    assert result["result"] == "migrated", result
    assert lab.guest_host("g1") == "host2"
    stream = sn.stream
    assert len(stream) > 16 * 2**20, f"only {len(stream)} bytes seen"  # guest memory went by
    assert stream[:2] == b"\x16\x03", stream[:16]  # a TLS handshake record opens the stream
    assert b"QEVM" not in stream  # QEMU's clear-text migration stream magic


def test_destination_without_server_certificate_is_refused_by_preflight(ctx: Ctx) -> None:
    config = _config_with(ctx, "required")
    code, result, _ = _migrate(config, "g2", "host3")
    assert code != 0
    assert result["result"] == "skipped", result
    assert result["skip_kind"] == "tls", result
    reason = str(result["reason"])
    assert "host3 has no server certificate for TLS migration" in reason, reason
    assert ctx.lab.guest_host("g2") == "host1"  # nothing was attempted


def test_auto_sends_clear_text_where_the_destination_cannot_receive_tls(ctx: Ctx) -> None:
    """The control for the sniffer: the same move with ``auto`` goes, unencrypted."""
    lab = ctx.lab
    config = _config_with(ctx, "auto")
    with Sniffer(f"{lab.name}-h1", lab.host_address("host1"), lab.host_address("host3")) as sn:
        code, result, stderr = _migrate(config, "g2", "host3")
    assert code == 0, stderr[-3000:]
    assert result["result"] == "migrated", result
    assert "migration stream in clear text" in stderr
    assert b"QEVM" in sn.stream
