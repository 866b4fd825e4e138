"""Management nodes for the lab: a three-member etcd cluster and ``balancerd run``
instances coordinated through it, on one machine. Used by ``tests/test_ha_lab.py`` and
``scripts/failover_table.py``.

Network layout (chosen because it needs no routing between namespaces): the etcd members
listen on 127.0.0.1 and on one loopback address per manager (127.77.0.11, 127.77.0.12,
...); each manager's config lists the members at its own address only. Cutting a manager
off from etcd is two iptables rules in the root namespace (packets to and from its
address are dropped, no reset: requests time out, as across a real partition), while its
libvirt connections to the lab hosts (their own namespaces, 10.x addresses) and its
metrics endpoint stay up. The rules live in one chain, BALANCERD-HA, removed at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from balancerd.coord.etcdlab import EtcdCluster, free_port
from balancerd.lab.cluster import Lab
from balancerd.lab.faults import DaemonProcess, Env, scrape_metric

CHAIN = "BALANCERD-HA"
MANAGER_ADDRS = ("127.77.0.11", "127.77.0.12", "127.77.0.13")


def _ipt(*args: str, check: bool = True) -> bool:
    r = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {r.stderr.strip()}")
    return r.returncode == 0


@dataclass
class Manager:
    name: str
    addr: str
    port: int  # metrics
    config: Path
    state_dir: Path
    proc: DaemonProcess | None = None

    def metric(self, name: str, labels: str = "") -> float | None:
        return scrape_metric(self.port, name, labels, timeout_s=2.0)

    def leading(self) -> bool:
        return self.proc is not None and self.proc.alive() and self.metric("balancerd_leader") == 1

    def token(self) -> int:
        return int(self.metric("balancerd_leader_token") or 0)

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "daemon-status.json").read_text())
        except (OSError, ValueError):
            return {}
        return data


class HaEnv:
    """The lab's hosts, a 3-member etcd and named managers (``a``, ``b``, ...)."""

    def __init__(self, lab: Lab, work: Path, *, ttl_s: int = 3, members: int = 3) -> None:
        self.env = Env(lab, work)
        self.work = work
        self.ttl_s = ttl_s
        self.cluster = "ha"
        self.etcd = EtcdCluster(work / "etcd", size=members, client_hosts=MANAGER_ADDRS)
        self.managers: dict[str, Manager] = {}
        self._chain = False

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> HaEnv:
        self.etcd.start()
        _ipt("-N", CHAIN, check=False)
        if not _ipt("-C", "INPUT", "-j", CHAIN, check=False):
            _ipt("-I", "INPUT", "-j", CHAIN)
        _ipt("-F", CHAIN)
        self._chain = True
        return self

    def close(self) -> None:
        for m in self.managers.values():
            if m.proc is not None and m.proc.alive():
                m.proc.stop(30)
        if self._chain:
            _ipt("-F", CHAIN, check=False)
            _ipt("-D", "INPUT", "-j", CHAIN, check=False)
            _ipt("-X", CHAIN, check=False)
            self._chain = False
        self.etcd.stop()

    def manager(self, name: str, policy: Path) -> Manager:
        """Write the config of manager ``name`` (its own state dir, metrics port and etcd
        address)."""
        addr = MANAGER_ADDRS[len(self.managers)] if name not in self.managers else ""
        old = self.managers.get(name)
        addr = old.addr if old else addr
        port = old.port if old else free_port()
        state_dir = self.work / name / "state"
        config = self.env.write_config(
            policy,
            name=f"{name}.yaml",
            state_dir=str(state_dir),
            metrics={"listen": f"127.0.0.1:{port}"},
            coordination={
                "backend": "etcd",
                "endpoints": self.etcd.endpoints_on(addr),
                "lock_ttl_s": self.ttl_s,
                "cluster": self.cluster,
                "node": f"node-{name}",
            },
        )
        m = Manager(name, addr, port, config, state_dir, old.proc if old else None)
        self.managers[name] = m
        return m

    def run(self, name: str) -> DaemonProcess:
        m = self.managers[name]
        socket = str(self.work / name / "control.sock")  # one per manager on this machine
        log = f"{name}-{len(self.env.daemons)}.log"
        m.proc = self.env.start(m.config, env={"BALANCERD_CONTROL_SOCKET": socket}, log=log)
        return m.proc

    # --- observations -------------------------------------------------------------------

    def leader(self) -> Manager | None:
        leading = [m for m in self.managers.values() if m.leading()]
        return leading[0] if len(leading) == 1 else None

    def wait_leader(self, timeout_s: float, not_: str = "") -> tuple[Manager, float]:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            m = self.leader()
            if m is not None and m.name != not_:
                return m, time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"no leader (other than {not_ or '-'}) within {timeout_s:.0f} s")

    def cut(self, name: str) -> None:
        addr = self.managers[name].addr
        _ipt("-A", CHAIN, "-d", addr, "-j", "DROP")
        _ipt("-A", CHAIN, "-s", addr, "-j", "DROP")

    def heal(self) -> None:
        _ipt("-F", CHAIN)

    def etcd_keys(self) -> list[tuple[str, dict[str, Any], int]]:
        """(key, JSON value or {}, mod revision) of every balancerd key in etcd."""
        prefix = f"/balancerd/{self.cluster}/"
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = json.dumps(
            {"key": base64.b64encode(prefix.encode()).decode(), "range_end": _b64(end)}
        ).encode()
        for url in self.etcd.endpoints:
            try:
                with urllib.request.urlopen(f"{url}/v3/kv/range", body, timeout=3) as r:
                    data = json.loads(r.read())
                break
            except OSError:
                continue
        else:
            raise RuntimeError("no etcd member answers")
        out = []
        for kv in data.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            raw = base64.b64decode(kv.get("value", "")).decode(errors="replace")
            try:
                value = json.loads(raw)
            except ValueError:
                value = {}
            out.append((key, value if isinstance(value, dict) else {}, int(kv["mod_revision"])))
        return out

    def open_intents(self) -> list[str]:
        return [k for k, _v, _r in self.etcd_keys() if "/journal/open/" in k]

    def writes_by_after(self, node: str, revision: int) -> list[str]:
        """Records node ``node`` wrote into etcd after ``revision`` (a successor's token):
        what a deposed leader got through. Must be empty."""
        return [k for k, v, rev in self.etcd_keys() if v.get("node") == node and rev > revision]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def moves_started(log_text: str) -> list[str]:
    """Migration IDs of moves a daemon log shows as started or finished (what it did)."""
    return sorted(set(re.findall(r"\[([0-9a-f]{12})\]", log_text)))


def lab_config_hosts(lab: Lab) -> list[str]:
    cfg = yaml.safe_load(lab.config_path.read_text())
    return [h["name"] for h in cfg["hosts"]]


@contextlib.contextmanager
def ha_env(lab: Lab, work: Path, ttl_s: int = 3) -> Any:
    h = HaEnv(lab, work, ttl_s=ttl_s).start()
    try:
        yield h
    finally:
        h.close()
