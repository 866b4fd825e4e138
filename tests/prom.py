"""Test helper: Debian's real ``prometheus`` server scraping given targets, and the
dashboard's PromQL queries.

    with Prometheus(["127.0.0.1:9177"], tmp_path) as prom:
        rows = prom.wait_for("balancerd_host_up", timeout_s=60)

    for q in panel_queries(DASHBOARD):
        prom.query(q.expr)

Prometheus listens on a free 127.0.0.1 port with a throw-away TSDB under ``work_dir``.
Waiting loops have generous timeouts and are never asserted on for speed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "dashboards" / "balancerd.json"

# Dashboard variables and their test values (every host; Grafana's interval macros).
VARIABLES = {
    "$host": ".*",
    "${host}": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
}


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """A real Prometheus server; use as a context manager (always stopped on exit)."""

    def __init__(
        self,
        targets: list[str],
        work_dir: Path,
        scrape_interval_s: float = 1.0,
        job: str = "balancerd",
    ) -> None:
        self.targets = targets
        self.work_dir = Path(work_dir)
        self.scrape_interval_s = scrape_interval_s
        self.job = job
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.work_dir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        interval = f"{max(1, round(self.scrape_interval_s * 1000))}ms"
        return json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": interval, "evaluation_interval": interval},
                "scrape_configs": [
                    {
                        "job_name": self.job,
                        "scrape_interval": interval,
                        "scrape_timeout": interval,
                        "static_configs": [{"targets": self.targets}],
                    }
                ],
            },
            indent=1,
        )

    def start(self, timeout_s: float = 60.0) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError("prometheus is not installed (Debian package prometheus)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "prometheus.yml"
        config.write_text(self.config_text())
        self.port = free_port()
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout_s:g} s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP API ------------------------------------------------------------------------

    def api(self, path: str, params: Mapping[str, str]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PrometheusError(f"{path} {dict(params)}: {body.get('error', exc)}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params)}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a list of ``{"metric": {...}, "value": [t, "v"]}`` (a scalar
        result becomes one row with an empty metric)."""
        data = self.api("query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def targets_health(self) -> list[str]:
        data = self.api("targets", {"state": "active"})
        return [t["health"] for t in data["activeTargets"]]

    def wait_for(
        self,
        expr: str,
        timeout_s: float = 60.0,
        predicate: Any = None,
    ) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns rows (and ``predicate(rows)`` holds)."""
        deadline = time.monotonic() + timeout_s
        rows: list[dict[str, Any]] = []
        while True:
            rows = self.query(expr)
            if rows and (predicate is None or predicate(rows)):
                return rows
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"{expr!r}: no matching data after {timeout_s:g} s (last: {rows}); "
                    f"targets {self.targets_health()}"
                )
            time.sleep(self.scrape_interval_s / 2)

    def wait_for_scrapes(self, n: int, timeout_s: float = 60.0) -> None:
        """Until ``up`` has at least ``n`` samples for every target."""
        want = len(self.targets)
        self.wait_for(
            f'count_over_time(up{{job="{self.job}"}}[5m]) >= {n}',
            timeout_s,
            predicate=lambda rows: len(rows) >= want,
        )


# --- promtool ----------------------------------------------------------------------------


def promtool_check(text: bytes | str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on an exposition; clean means rc 0 and no output."""
    return subprocess.run(
        ["promtool", "check", "metrics"],
        input=text if isinstance(text, str) else text.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def promtool_problems(url: str) -> str:
    """Scrape ``url`` once and return promtool's complaints ("" when clean)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        done = promtool_check(r.read())
    text = (done.stdout + done.stderr).strip()
    return text or ("" if done.returncode == 0 else f"promtool exited {done.returncode}")


# --- the dashboard ----------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # panel title
    ref_id: str
    expr: str  # with dashboard variables substituted (VARIABLES)
    raw_expr: str


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # collapsed rows nest their panels


def substitute(expr: str, variables: Mapping[str, str] = VARIABLES) -> str:
    # Longest names first so "$__rate_interval" wins over "$__range"-like prefixes.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr


def panel_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    """Every PromQL expression of every panel (rows included), variables substituted."""
    dashboard = json.loads(Path(path).read_text())
    out: list[PanelQuery] = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if expr:
                out.append(
                    PanelQuery(panel["title"], target.get("refId", ""), substitute(expr), expr)
                )
    return out


def panels_without_data(prom: Prometheus, path: Path = DASHBOARD) -> list[str]:
    """``panel/refId: expr`` for every query that returns nothing now."""
    return [
        f"{q.panel}/{q.ref_id}: {q.expr}" for q in panel_queries(path) if not prom.query(q.expr)
    ]
