"""The metrics endpoint over HTTPS with client certificates (prometheus-client's own TLS),
with real certificates made by certtool, and the start-up warning for a non-loopback
address without TLS."""

from __future__ import annotations

import logging
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from balancerd.config import MetricsTls
from balancerd.lab.tls import issue_cert, make_ca
from balancerd.metrics import is_loopback, serve


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("certtool") is None:
        pytest.skip("certtool (Debian's gnutls-bin) is missing: scripts/setup.sh installs it")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d / "ca", "metrics CA")
    other = make_ca(d / "other", "another CA")
    issue_cert(
        ca,
        d / "server-key.pem",
        d / "server-cert.pem",
        cn="localhost",
        server=True,
        client=False,
        dns=("localhost",),
        ips=("127.0.0.1",),
    )
    issue_cert(
        ca, d / "client-key.pem", d / "client-cert.pem", cn="prometheus", server=False, client=True
    )
    issue_cert(
        other, d / "stranger-key.pem", d / "stranger-cert.pem", cn="x", server=False, client=True
    )
    return Pki(
        ca[0],
        d / "server-cert.pem",
        d / "server-key.pem",
        d / "client-cert.pem",
        d / "client-key.pem",
        d / "stranger-cert.pem",
        d / "stranger-key.pem",
    )


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("balancerd_test_scrapes", "a metric to find", registry=registry).inc()
    return registry


def _context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def https(pki: Pki) -> Iterator[str]:
    tls = MetricsTls(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    server = serve("127.0.0.1:0", _registry(), tls)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        yield server.url
    finally:
        server.close()


def test_scrape_with_a_client_certificate(https: str, pki: Pki) -> None:
    with urllib.request.urlopen(
        https, context=_context(pki, pki.client_cert, pki.client_key), timeout=10
    ) as resp:
        assert resp.status == 200
        assert b"balancerd_test_scrapes_total 1.0" in resp.read()


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_scrape_without_a_trusted_client_certificate_is_refused(
    https: str, pki: Pki, who: str
) -> None:
    if who == "no certificate":
        ctx = _context(pki)
    else:
        ctx = _context(pki, pki.stranger_cert, pki.stranger_key)
    with (
        pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)),
        urllib.request.urlopen(https, context=ctx, timeout=10) as resp,
    ):
        resp.read()


def test_plain_http_gets_no_metrics(https: str) -> None:
    plain = https.replace("https://", "http://")
    with (
        pytest.raises((urllib.error.URLError, ConnectionError, OSError)),
        urllib.request.urlopen(plain, timeout=10) as resp,
    ):
        resp.read()


def test_tls_without_client_ca_accepts_any_client(pki: Pki) -> None:
    server = serve(
        "127.0.0.1:0", _registry(), MetricsTls(str(pki.server_cert), str(pki.server_key))
    )
    try:
        with urllib.request.urlopen(server.url, context=_context(pki), timeout=10) as resp:
            assert resp.status == 200
    finally:
        server.close()


@pytest.mark.parametrize(
    ("listen", "tls", "warns"),
    [
        ("0.0.0.0:0", False, True),
        ("127.0.0.1:0", False, False),
        ("[::1]:0", False, False),
        ("0.0.0.0:0", True, False),
    ],
)
def test_non_loopback_without_tls_warns(
    pki: Pki, caplog: pytest.LogCaptureFixture, listen: str, tls: bool, warns: bool
) -> None:
    settings = MetricsTls(str(pki.server_cert), str(pki.server_key)) if tls else None
    with caplog.at_level(logging.WARNING, logger="balancerd.metrics"):
        try:
            server = serve(listen, _registry(), settings)
        except Exception as exc:  # no IPv6 loopback on this machine
            pytest.skip(f"cannot listen on {listen}: {exc}")
        server.close()
    warned = [r for r in caplog.records if "metrics served without TLS" in r.getMessage()]
    assert bool(warned) is warns


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert not is_loopback("metrics.example.net")
