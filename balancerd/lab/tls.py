"""Certificates for a TLS lab (``balancerd lab up --tls``), made with GnuTLS's ``certtool``.

Layout under ``ROOT/pki`` (``ROOT`` is the lab directory)::

    ca/ca-cert.pem ca/ca-key.pem        the lab CA (trusted by every host)
    balancerd/                          balancerd's client PKI folder (``pki_dir``):
        cacert.pem clientcert.pem clientkey.pem
    untrusted/                          the same file names, but the client certificate is
                                        signed by another CA: every lab libvirtd refuses it
    untrusted-ca/                       that other CA

and for each host, ``ROOT/hosts/hostN/pki`` (bind-mounted over ``/etc/pki`` inside the host,
so libvirtd and QEMU find their default paths)::

    CA/cacert.pem                                    libvirtd: CA for clients and servers
    libvirt/servercert.pem libvirt/private/serverkey.pem   libvirtd listen_tls
    libvirt/clientcert.pem libvirt/private/clientkey.pem   libvirtd as the client of a
                                                           peer-to-peer migration
    qemu/ca-cert.pem qemu/server-cert.pem qemu/server-key.pem
    qemu/client-cert.pem qemu/client-key.pem               QEMU's migration stream (TLS)

Each host has one key and one certificate for both TLS roles (server and client key
purposes), with the host's address (IP SAN) and names (DNS SAN): a client checks the
server's certificate against the host part of the URI it connected to, and QEMU against
the migration URI's host.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from balancerd.errors import LabError
from balancerd.lab.system import run, which

CERT_DAYS = 365
# The files a host's QEMU needs in /etc/pki/qemu to receive a TLS migration stream.
QEMU_SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


@dataclass(frozen=True)
class TlsHost:
    name: str  # host1
    hostname: str  # bd-host1
    address: str  # 10.77.0.11


def pki_root(lab_root: Path) -> Path:
    return lab_root / "pki"


def client_pki(lab_root: Path) -> Path:
    """balancerd's PKI folder (``pki_dir`` in the lab's daemon config)."""
    return pki_root(lab_root) / "balancerd"


def untrusted_pki(lab_root: Path) -> Path:
    """A client PKI folder whose certificate no lab host trusts."""
    return pki_root(lab_root) / "untrusted"


def _certtool() -> str:
    tool = which("certtool")
    if tool is None:
        raise LabError("certtool not found: install Debian's gnutls-bin (scripts/setup.sh)")
    return tool


def _key(path: Path) -> None:
    if not path.exists():
        run(
            [
                _certtool(),
                "--generate-privkey",
                "--key-type=rsa",
                "--bits=2048",
                "--outfile",
                str(path),
            ]
        )
    path.chmod(0o600)


def _template(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join([*lines, f"expiration_days = {CERT_DAYS}"]) + "\n")
    return path


def make_ca(folder: Path, cn: str) -> tuple[Path, Path]:
    """A self-signed CA in folder (ca-cert.pem, ca-key.pem); kept if already there."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "ca-key.pem", folder / "ca-cert.pem"
    _key(key)
    if not cert.exists():
        info = _template(
            folder / "ca.info",
            [f'cn = "{cn}"', 'organization = "balancerd lab"', "ca", "cert_signing_key"],
        )
        argv = [_certtool(), "--generate-self-signed", "--load-privkey", str(key)]
        run([*argv, "--template", str(info), "--outfile", str(cert)])
    return cert, key


def issue_cert(
    ca: tuple[Path, Path],
    key: Path,
    cert: Path,
    *,
    cn: str,
    server: bool,
    client: bool,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> None:
    """A key (kept if there) and a certificate signed by ``ca`` (ca-cert, ca-key)."""
    _key(key)
    if cert.exists():
        return
    lines = [f'cn = "{cn}"', 'organization = "balancerd lab"']
    lines += [f'dns_name = "{d}"' for d in dns]
    lines += [f'ip_address = "{ip}"' for ip in ips]
    lines += ["tls_www_server"] if server else []
    lines += ["tls_www_client"] if client else []
    lines += ["encryption_key", "signing_key"]
    info = _template(cert.with_suffix(".info"), lines)
    argv = [_certtool(), "--generate-certificate", "--load-privkey", str(key)]
    argv += ["--load-ca-certificate", str(ca[0]), "--load-ca-privkey", str(ca[1])]
    run([*argv, "--template", str(info), "--outfile", str(cert)])


def _client_folder(
    folder: Path, ca: tuple[Path, Path], trusted_cas: tuple[Path, ...], cn: str
) -> None:
    """A libvirt client PKI folder (the layout ``?pkipath=`` reads) with a client
    certificate from ``ca`` and ``trusted_cas`` as its CA bundle."""
    folder.mkdir(parents=True, exist_ok=True)
    issue_cert(
        ca,
        folder / "clientkey.pem",
        folder / "clientcert.pem",
        cn=cn,
        server=False,
        client=True,
    )
    (folder / "cacert.pem").write_text("".join(p.read_text() for p in trusted_cas))
    for leftover in folder.glob("*.info"):
        leftover.unlink()


def make_lab_pki(lab_root: Path, hosts: list[TlsHost]) -> None:
    """Every certificate of a TLS lab (idempotent: existing files are kept)."""
    root = pki_root(lab_root)
    ca = make_ca(root / "ca", "balancerd lab CA")
    _client_folder(client_pki(lab_root), ca, (ca[0],), "balancerd")
    other = make_ca(root / "untrusted-ca", "not the lab CA")
    # Trusts the lab CA (so the client accepts the server) and its own (libvirt's client
    # checks its own certificate first), presents a certificate the servers cannot verify.
    _client_folder(untrusted_pki(lab_root), other, (ca[0], other[0]), "balancerd")
    for host in hosts:
        host_pki(lab_root, host, ca)


def host_pki(lab_root: Path, host: TlsHost, ca: tuple[Path, Path] | None = None) -> Path:
    """The host's /etc/pki (see the module doc); returns its folder."""
    if ca is None:
        ca = make_ca(pki_root(lab_root) / "ca", "balancerd lab CA")
    pki = lab_root / "hosts" / host.name / "pki"
    work = pki_root(lab_root) / "hosts" / host.name
    work.mkdir(parents=True, exist_ok=True)
    key, cert = work / "key.pem", work / "cert.pem"
    issue_cert(
        ca,
        key,
        cert,
        cn=host.hostname,
        server=True,
        client=True,
        dns=(host.hostname, host.name),
        ips=(host.address,),
    )
    for folder in ("CA", "libvirt/private", "qemu"):
        (pki / folder).mkdir(parents=True, exist_ok=True)
    copies = {
        ca[0]: ["CA/cacert.pem", "qemu/ca-cert.pem"],
        cert: [
            "libvirt/servercert.pem",
            "libvirt/clientcert.pem",
            "qemu/server-cert.pem",
            "qemu/client-cert.pem",
        ],
        key: [
            "libvirt/private/serverkey.pem",
            "libvirt/private/clientkey.pem",
            "qemu/server-key.pem",
            "qemu/client-key.pem",
        ],
    }
    for source, targets in copies.items():
        for target in targets:
            if not (pki / target).exists():
                shutil.copyfile(source, pki / target)
            (pki / target).chmod(0o600 if source == key else 0o644)
    return pki


def remove_migration_server_cert(lab_root: Path, host: str) -> None:
    """Take away a host's certificate for receiving TLS migration streams (the preflight
    refusal test); libvirtd keeps serving TLS connections."""
    qemu = lab_root / "hosts" / host / "pki" / "qemu"
    for name in ("server-cert.pem", "server-key.pem"):
        (qemu / name).unlink(missing_ok=True)
