"""TLS settings without a lab: pki_dir and metrics.tls in the config, the URIs balancerd
opens and hands to a source libvirtd, and the preflight TLS decision (pure)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from balancerd.config import HostConfig, load_config_text
from balancerd.errors import ConfigError
from balancerd.execute.preflight import check, tls_refusal, use_tls
from balancerd.hypervisor.base import DomainFacts, HostFacts
from balancerd.hypervisor.libvirt import connect_uri, peer_uri
from balancerd.model import Move
from balancerd.outcomes import SkipKind
from balancerd.policy.model import Migration, MigrationTls

POLICY = "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: p}\nspec: {objective: balance}\n"


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    folder.mkdir()
    for name in ("cacert.pem", "clientcert.pem", "clientkey.pem"):
        (folder / name).write_text("-----BEGIN X-----\n")
    (folder / "clientkey.pem").chmod(0o640)
    (tmp_path / "p.yaml").write_text(POLICY)
    return folder


def _load(tmp_path: Path, body: str) -> object:
    return load_config_text(body, str(tmp_path / "balancerd.yaml"))


def _problems(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, body)
    return list(info.value.problems)


HOSTS = (
    "hosts:\n"
    "  - {name: h1, uri: 'qemu+tls://h1/system'}\n"
    "  - {name: h2, uri: 'qemu+tls://h2/system', pki_dir: %s}\n"
    "policy: p.yaml\n"
)


def test_global_pki_dir_fills_hosts_without_their_own(tmp_path: Path, pki: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for name in ("cacert.pem", "clientcert.pem", "clientkey.pem"):
        (other / name).write_text("x")
    (other / "clientkey.pem").chmod(0o600)
    config = _load(tmp_path, HOSTS % other + f"pki_dir: {pki}\n")
    assert [h.pki_dir for h in config.hosts] == [str(pki), str(other)]  # type: ignore[attr-defined]


def test_pki_dir_problems(tmp_path: Path, pki: Path) -> None:
    (pki / "clientkey.pem").chmod(0o644)
    lines = _problems(tmp_path, HOSTS % pki + "pki_dir: relative/pki\n")
    assert any("pki_dir: must be an absolute path, got 'relative/pki'" in x for x in lines), lines
    assert any(
        "hosts[1].pki_dir:" in x and "clientkey.pem is open to others (mode 0644)" in x
        for x in lines
    ), lines
    (pki / "clientkey.pem").chmod(0o600)
    (pki / "cacert.pem").unlink()
    lines = _problems(tmp_path, HOSTS % pki)
    assert any("cacert.pem: No such file or directory" in x for x in lines), lines


def test_host_pki_dir_needs_a_tls_uri(tmp_path: Path, pki: Path) -> None:
    body = (
        f"hosts:\n  - {{name: h1, uri: 'qemu+tcp://h1/system', pki_dir: {pki}}}\npolicy: p.yaml\n"
    )
    lines = _problems(tmp_path, body)
    assert any("only qemu+tls URIs use a PKI folder" in x for x in lines), lines


def test_metrics_tls_files(tmp_path: Path, pki: Path) -> None:
    cert, key = pki / "clientcert.pem", pki / "clientkey.pem"
    base = "hosts:\n  - {name: h1, uri: 'qemu:///system'}\npolicy: p.yaml\n"
    config = _load(
        tmp_path,
        base + f"metrics: {{listen: '0.0.0.0:9177', tls: {{cert_file: {cert}, "
        f"key_file: {key}, client_ca_file: {pki / 'cacert.pem'}}}}}\n",
    )
    tls = config.metrics_tls  # type: ignore[attr-defined]
    assert (tls.cert_file, tls.key_file, tls.enabled) == (str(cert), str(key), True)
    key.chmod(0o604)
    lines = _problems(
        tmp_path, base + f"metrics: {{tls: {{cert_file: {cert}, key_file: {key}}}}}\n"
    )
    assert any("metrics.tls.key_file:" in x and "open to others" in x for x in lines), lines
    lines = _problems(tmp_path, base + f"metrics: {{tls: {{key_file: {key}}}}}\n")
    assert any("metrics.tls.cert_file: missing required key" in x for x in lines), lines


def test_connect_uri_adds_pkipath_to_tls_uris_only() -> None:
    tls = HostConfig("h1", "qemu+tls://10.0.0.1/system", pki_dir="/etc/balancerd/pki")
    assert connect_uri(tls) == "qemu+tls://10.0.0.1/system?pkipath=/etc/balancerd/pki"
    assert connect_uri(replace(tls, pki_dir="")) == "qemu+tls://10.0.0.1/system"
    tcp = replace(tls, uri="qemu+tcp://10.0.0.1/system")
    assert connect_uri(tcp) == "qemu+tcp://10.0.0.1/system"
    named = replace(tls, uri="qemu+tls://10.0.0.1/system?pkipath=/x&no_verify=0")
    assert connect_uri(named) == named.uri  # the operator's own pkipath wins


def test_peer_uri_drops_our_pkipath() -> None:
    assert peer_uri("qemu+tls://h2/system?pkipath=/etc/balancerd/pki") == "qemu+tls://h2/system"
    assert peer_uri("qemu+tls://h2/system?pkipath=/p&no_verify=0") == (
        "qemu+tls://h2/system?no_verify=0"
    )
    assert peer_uri("qemu+tcp://h2/system") == "qemu+tcp://h2/system"


SRC = HostFacts("h1", "h1", "u1", 9_000_000, 7_002_000, 2**33, (), (), True, True)
DST = replace(SRC, name="h2", hostname="h2", host_uuid="u2")
FACTS = DomainFacts("vm", "uuid", "running", 2**28, 1, "", (), (), True, False)
MOVE = Move(vm="vm", src="h1", dst="h2", mem_bytes=2**28, expected_s=1.0)


@pytest.mark.parametrize(
    ("mode", "src_client", "dst_server", "tls", "refused"),
    [
        (MigrationTls.AUTO, True, True, True, ""),
        (MigrationTls.AUTO, True, False, False, ""),
        (MigrationTls.AUTO, False, True, False, ""),
        (MigrationTls.REQUIRED, True, True, True, ""),
        (MigrationTls.REQUIRED, True, False, True, "h2 has no server certificate"),
        (MigrationTls.REQUIRED, False, True, True, "h1 has no CA certificate"),
        (MigrationTls.DISABLED, True, True, False, ""),
    ],
)
def test_tls_decision(
    mode: MigrationTls, src_client: bool, dst_server: bool, tls: bool, refused: str
) -> None:
    mig = Migration(tls=mode)
    src = replace(SRC, migration_tls_client=src_client)
    dst = replace(DST, migration_tls_server=dst_server)
    assert use_tls(mig, src, dst) is tls
    refusal = tls_refusal(mig, src, dst)
    full = check(MOVE, FACTS, src, dst, mig=mig, headroom_bytes=0, cpu_ok=True, path_visible={})
    if refused:
        assert refusal is not None and refusal.kind is SkipKind.TLS
        assert refused in refusal.reason
        assert full == refusal
    else:
        assert refusal is None and full is None
