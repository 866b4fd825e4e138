"""Coordination against a real etcd (Debian's etcd-server, started by the test): leadership
through the tooz lock, the fencing token, fenced writes, the etcd journal, and a leader
cut off from etcd that stops acting within one lease TTL and whose late writes etcd
refuses. The single-node coordinator keeps the state-directory lock's behaviour."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancerd.config import CoordinationConfig, load_config_text
from balancerd.coord import NotLeader, SingleNode, make_coordinator
from balancerd.coord.base import CoordinationError, Leadership
from balancerd.coord.etcd import EtcdCoordinator
from balancerd.coord.etcdlab import Blackhole, EtcdCluster, etcd_missing
from balancerd.errors import ConfigError
from balancerd.outcomes import MoveOutcome, SkipKind
from balancerd.statelock import StateLocked

TTL_S = 2


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    why = etcd_missing()
    if why:
        pytest.skip(why)
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1).start()
    yield cluster
    cluster.stop()


_clusters = iter(range(10_000))


def coordinator(
    tmp_path: Path, node: str, endpoints: list[str], cluster: str, ttl_s: int = TTL_S
) -> EtcdCoordinator:
    cfg = CoordinationConfig(
        backend="etcd", endpoints=tuple(endpoints), lock_ttl_s=ttl_s, cluster=cluster, node=node
    )
    c = make_coordinator(cfg, tmp_path / node)
    assert isinstance(c, EtcdCoordinator)
    return c


class Changes:
    def __init__(self) -> None:
        self.seen: list[Leadership] = []

    def __call__(self, state: Leadership) -> None:
        self.seen.append(state)


def wait_for(pred: object, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not pred():  # type: ignore[operator]
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def cluster_name() -> str:
    return f"t{next(_clusters)}-{time.monotonic_ns()}"


def test_one_leads_the_other_stands_by_and_takes_over_on_release(
    etcd: EtcdCluster, tmp_path: Path, cluster_name: str
) -> None:
    a = coordinator(tmp_path, "node-a", etcd.endpoints, cluster_name)
    b = coordinator(tmp_path, "node-b", etcd.endpoints, cluster_name)
    changes_a, changes_b = Changes(), Changes()
    a.start(wait_s=0, on_change=changes_a)
    b.start(wait_s=0, on_change=changes_b)
    try:
        assert a.not_leading() == ""
        la = a.leadership()
        assert la.leading and la.leader == "node-a" and la.token > 0 and la.epoch == 1
        wait_for(lambda: "node-a leads" in b.not_leading(), 5, "b to name the leader")
        assert not b.leadership().leading and b.leadership().leader == "node-a"
        assert f"lock revision {la.token}" in b.not_leading()
        # Fenced writes work for the leader, are refused for the standby.
        a.fence("power-on", "host1", {"why": "test"})
        with pytest.raises(NotLeader, match="node-a leads"):
            b.fence("power-on", "host1", {})
        assert a.leadership().fenced >= 1 and b.leadership().refused == 1
        # A clean stop releases the lock: b leads within its poll interval, new token.
        a.stop()
        wait_for(lambda: b.not_leading() == "", 3, "b to lead")
        lb = b.leadership()
        assert lb.token > la.token and lb.leader == "node-b"
        wait_for(lambda: changes_b.seen and changes_b.seen[-1].leading, 2, "b's notification")
        assert changes_a.seen[0].leading
    finally:
        a.stop()
        b.stop()


def test_a_cut_off_leader_stops_within_one_ttl_and_etcd_refuses_its_late_writes(
    etcd: EtcdCluster, tmp_path: Path, cluster_name: str
) -> None:
    """Node a reaches etcd through a link we cut. It writes a fenced record every 20 ms
    while it believes it leads. After the cut it must stop within one TTL of its last
    confirmed refresh; node b takes over; no record of a's lands after b's token (checked
    in etcd, not in a's memory), and a forced write with a's old token is refused."""
    link = Blackhole(etcd.members[0].client_port)
    a = coordinator(tmp_path, "node-a", [link.url], cluster_name)
    b = coordinator(tmp_path, "node-b", etcd.endpoints, cluster_name)
    a.start(wait_s=0, on_change=Changes())
    b.start(wait_s=0, on_change=Changes())
    writes: list[tuple[float, int]] = []  # (monotonic, revision) of a's successful writes
    stop = threading.Event()

    def steps() -> None:
        n = 0
        while not stop.is_set():
            if a.not_leading() == "":
                n += 1
                try:
                    rev = a.fenced_write([("put", f"{a.prefix}steps/a-{n:06d}", "x")])
                    writes.append((time.monotonic(), rev))
                except (NotLeader, CoordinationError):
                    pass
            time.sleep(0.02)

    worker = threading.Thread(target=steps, daemon=True)
    try:
        assert a.not_leading() == ""
        token_a = a.leadership().token
        worker.start()
        time.sleep(0.5)
        assert writes, "a wrote nothing while leading"
        cut_at = time.monotonic()
        link.cut()
        stopped_after = wait_for(lambda: a.not_leading() != "", TTL_S + 0.5, "a to stop")
        assert stopped_after <= TTL_S, stopped_after
        assert "not confirmed" in a.not_leading()
        took_over = wait_for(lambda: b.not_leading() == "", 2 * TTL_S + 1, "b to lead")
        assert cut_at + took_over - cut_at <= 2 * TTL_S
        token_b = b.leadership().token
        assert token_b > token_a
        time.sleep(0.5)
        stop.set()
        worker.join()
        # In etcd: every record of a's was written before b's lock existed.
        kvs = b._client().get_prefix(f"{b.prefix}steps/")
        late = [m["key"] for _v, m in kvs if int(m["mod_revision"]) > token_b]
        assert kvs and late == [], late
        # The link heals; a's forced write with its old token is refused by etcd itself.
        link.heal()
        a._rotate()
        a._deadline = time.monotonic() + 60  # pretend a's clock says it still leads
        a._lock = a._lock or object()
        a._token = token_a
        with pytest.raises(NotLeader, match="no longer ours"):
            a.fenced_write([("put", f"{a.prefix}steps/late", "x")])
        assert b._client().get(f"{b.prefix}steps/late") == []
        assert a.not_leading() != ""
        after_b = [t for t, rev in writes if rev > token_b]
        assert after_b == []
    finally:
        stop.set()
        a._lock = None
        a.stop()
        b.stop()
        link.close()


def test_lease_kept_through_many_ttls_and_a_killed_holder_is_replaced_in_time(
    etcd: EtcdCluster, tmp_path: Path, cluster_name: str
) -> None:
    a = coordinator(tmp_path, "node-a", etcd.endpoints, cluster_name)
    b = coordinator(tmp_path, "node-b", etcd.endpoints, cluster_name)
    a.start(wait_s=0, on_change=Changes())
    b.start(wait_s=0, on_change=Changes())
    try:
        token = a.leadership().token
        time.sleep(3 * TTL_S)  # refreshed, never lapsed
        assert a.not_leading() == "" and a.leadership().token == token
        assert "node-a leads" in b.not_leading()
        # "kill -9": a's keeper stops refreshing (the thread is stopped, nothing released).
        a._stop.set()
        assert a._thread is not None
        a._thread.join()
        died = time.monotonic()
        wait_for(lambda: b.not_leading() == "", 2 * TTL_S + 1, "b to lead")
        failover = time.monotonic() - died
        assert failover <= 2 * TTL_S, failover
        assert b.leadership().token > token
    finally:
        a._lock = None
        a.stop()
        b.stop()


def test_the_etcd_journal_is_fenced_and_a_new_leader_sees_open_intents(
    etcd: EtcdCluster, tmp_path: Path, cluster_name: str
) -> None:
    a = coordinator(tmp_path, "node-a", etcd.endpoints, cluster_name)
    b = coordinator(tmp_path, "node-b", etcd.endpoints, cluster_name)
    a.start(wait_s=0, on_change=Changes())
    b.start(wait_s=0, on_change=Changes())
    try:
        ja, jb = a.journal(), b.journal()
        e1 = ja.begin("vm1", "u1", "h1", "h2", "running", migration_id="aaaaaaaaaaaa")
        e2 = ja.begin("vm2", "u2", "h1", "h3", "running", migration_id="bbbbbbbbbbbb")
        ja.phase(e1, "live")
        ja.finish(e2, "migrated", "live", "ok")
        with pytest.raises(NotLeader):
            jb.begin("vm3", "u3", "h1", "h2", "running")
        open_b = jb.open_entries()  # anyone may read
        assert [(e.vm, e.phase, e.migration_id) for e in open_b] == [
            ("vm1", "live", "aaaaaaaaaaaa")
        ]
        assert open_b[0].id == e1 and open_b[0].pid_start == "node-a"
        assert [e.vm for e in jb.entries()] == ["vm2", "vm1"]
        assert jb.entries()[0].outcome == "migrated"
        assert not jb.owner_alive(open_b[0])
        a.stop()
        wait_for(lambda: b.not_leading() == "", 3, "b to lead")
        jb.finish(e1, "settled", detail="reconciled by node-b")
        jb.record_reconciliation(e1, "vm1", "none", "vm1 is running on h1")
        assert jb.open_entries() == [] and jb.reconciliation_count() == 1
        with pytest.raises(NotLeader):
            ja.phase(e1, "paused")
    finally:
        a.stop()
        b.stop()


def test_standby_says_why_when_etcd_does_not_answer(tmp_path: Path, cluster_name: str) -> None:
    from balancerd.coord.etcdlab import free_port

    a = coordinator(tmp_path, "node-a", [f"http://127.0.0.1:{free_port()}"], cluster_name)
    a.start(wait_s=0, on_change=Changes())
    try:
        assert "cannot reach etcd" in a.not_leading()
        with pytest.raises(NotLeader):
            a.journal().begin("vm1", "u", "h1", "h2", "running")
    finally:
        a.stop()


def test_the_state_directory_lock_still_guards_each_node(
    etcd: EtcdCluster, tmp_path: Path, cluster_name: str
) -> None:
    a = coordinator(tmp_path, "node-a", etcd.endpoints, cluster_name)
    twin = coordinator(tmp_path, "node-a", etcd.endpoints, cluster_name)
    a.start(wait_s=0, on_change=Changes())
    try:
        with pytest.raises(StateLocked):
            twin.start(wait_s=0, on_change=Changes())
    finally:
        a.stop()


def test_single_node_is_the_state_directory_lock(tmp_path: Path) -> None:
    one = SingleNode(tmp_path, "n1")
    two = SingleNode(tmp_path, "n2")
    with pytest.raises(NotLeader):
        one.fence("power-on", "host1", {})
    one.start(wait_s=0, on_change=Changes())
    try:
        assert one.not_leading() == "" and one.leadership().leader == "n1"
        one.fence("power-on", "host1", {})
        with pytest.raises(StateLocked):
            two.start(wait_s=0, on_change=Changes())
        j = one.journal()
        entry = j.begin("vm1", "u", "h1", "h2", "running")
        assert [e.id for e in j.open_entries()] == [entry]
    finally:
        one.stop()
    assert one.not_leading() != ""


CONFIG = """\
hosts: [{name: h1, uri: 'qemu+tcp://10.0.0.1/system'}]
policy: p.yaml
"""


def _load(tmp_path: Path, extra: str) -> object:
    (tmp_path / "p.yaml").write_text("x: 1\n")
    return load_config_text(CONFIG + extra, str(tmp_path / "c.yaml"))


def test_config_coordination_section(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "")
    assert cfg.coordination.backend == "none"  # type: ignore[attr-defined]
    cfg = _load(
        tmp_path,
        "coordination: {backend: etcd, endpoints: ['http://10.0.0.5:2379'], lock_ttl_s: 4,"
        " node: mgmt1, cluster: prod}\n",
    )
    c = cfg.coordination  # type: ignore[attr-defined]
    assert (c.backend, c.endpoints, c.lock_ttl_s, c.node, c.cluster) == (
        "etcd",
        ("http://10.0.0.5:2379",),
        4,
        "mgmt1",
        "prod",
    )
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "coordination: {backend: etcd, lock_ttl_s: 1}\n")
    text = "\n".join(err.value.problems)
    assert "coordination.lock_ttl_s" in text and "etcd needs coordination.endpoints" in text
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "coordination: {backend: etcd, endpoints: ['10.0.0.5:2379']}\n")
    assert "coordination.endpoints[0]" in json.dumps(err.value.problems).replace("\\", "")


# --- the daemon with coordination (in-process, simulated hypervisor, real etcd) ----------


class Recording:
    """One daemon's view of the shared simulated cluster; records the actions it issues
    on the hosts (what a host would see), with the time."""

    ACTIONS = ("migrate", "destroy", "resume", "suspend", "abort_job")

    def __init__(self, hv: object, migrate_s: float = 0.0) -> None:
        self._hv = hv
        self.migrate_s = migrate_s
        self.calls: list[tuple[float, str, str]] = []  # (monotonic, action, vm)
        self.on_migrate: list[object] = []

    def __getattr__(self, name: str) -> object:
        target = getattr(self._hv, name)
        if name not in self.ACTIONS:
            return target

        def recorded(*args: object, **kw: object) -> object:
            vm = getattr(args[0], "vm", "") if name == "migrate" else str(args[1])
            self.calls.append((time.monotonic(), name, str(vm)))
            if name == "migrate":
                for hook in self.on_migrate:
                    hook()  # type: ignore[operator]
                time.sleep(self.migrate_s)
            return target(*args, **kw)

        return recorded

    def close(self) -> None:
        pass


def coordinated_daemon(
    folder: Path, hv: object, node: str, endpoints: list[str], cluster: str
) -> tuple[object, CollectorRegistry]:
    from test_daemon_inprocess import POLICY

    from balancerd.daemon import Daemon
    from balancerd.notify import Notifier

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(POLICY.replace("MODE", "automatic"))
    hosts = "".join(f"  - {{name: h{i}, uri: 'qemu+tcp://10.0.0.{i}/system'}}\n" for i in (1, 2, 3))
    urls = ", ".join(f"'{e}'" for e in endpoints)
    (folder / "balancerd.yaml").write_text(
        "hosts:\n"
        + hosts
        + f"policy: policy.yaml\nstate_dir: {folder / 'state'}\n"
        + "collect_interval_s: 10\ncycle_interval_s: 60\nsmoothing_window: 2\n"
        + f"coordination: {{backend: etcd, endpoints: [{urls}], lock_ttl_s: {TTL_S},"
        + f" node: {node}, cluster: {cluster}}}\n"
    )
    registry = CollectorRegistry()
    d = Daemon(
        str(folder / "balancerd.yaml"),
        hypervisor_factory=lambda _c: hv,  # type: ignore[arg-type,return-value]
        notifier=Notifier(),
        registry=registry,
        serve_metrics=False,
        control_socket="",
    )
    return d, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def placements(hv: object) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for host in hv.hosts.values():  # type: ignore[attr-defined]
        for vm in host.vms:
            where.setdefault(vm, []).append(host.name)
    return where


def collect_both(hv: object, *daemons: object, times: int = 3) -> None:
    from test_daemon_inprocess import BUSY

    for _ in range(times):
        hv.advance(10.0, BUSY)  # type: ignore[attr-defined]
        for d in daemons:
            d.collect_once()  # type: ignore[attr-defined]


def test_daemons_one_acts_the_standby_collects_and_says_who_leads(
    etcd: EtcdCluster, tmp_path: Path, cluster_name: str
) -> None:
    from test_daemon_inprocess import cluster as sim_cluster

    from balancerd.daemon_state import STATUS_FILE

    hv = sim_cluster()
    view_a, view_b = Recording(hv), Recording(hv)
    a, reg_a = coordinated_daemon(tmp_path / "a", view_a, "node-a", etcd.endpoints, cluster_name)
    b, reg_b = coordinated_daemon(tmp_path / "b", view_b, "node-b", etcd.endpoints, cluster_name)
    a.start(schedule_jobs=False)  # type: ignore[attr-defined]
    b.start(schedule_jobs=False)  # type: ignore[attr-defined]
    try:
        wait_for(lambda: "node-a leads" in b.coord.not_leading(), 5, "b to see a lead")  # type: ignore[attr-defined]
        collect_both(hv, a, b)
        assert b.cycle_once() is None  # type: ignore[attr-defined]
        assert view_b.calls == []
        report = a.cycle_once()  # type: ignore[attr-defined]
        assert report is not None and report.results
        assert any(r.outcome is MoveOutcome.MIGRATED for r in report.results)
        assert all(len(hosts) == 1 for hosts in placements(hv).values())
        # Metrics and status name the leader on both.
        assert sample(reg_a, "balancerd_leader", node="node-a") == 1.0
        assert sample(reg_b, "balancerd_leader", node="node-b") == 0.0
        assert sample(reg_b, "balancerd_leader_info", leader="node-a") == 1.0
        assert (sample(reg_a, "balancerd_leader_token") or 0) > 0
        status_b = json.loads((tmp_path / "b" / "state" / STATUS_FILE).read_text())
        assert status_b["state"] == "standby"
        assert status_b["coordination"]["leader"] == "node-a"
        assert "node-a leads" in status_b["coordination"]["reason"]
        # The journal is in etcd: the standby reads the leader's entries.
        assert {e.migration_id for e in b.journal.entries()} >= {  # type: ignore[attr-defined]
            r.migration_id for r in report.results if r.migration_id
        }
    finally:
        a.shutdown()  # type: ignore[attr-defined]
        b.shutdown()  # type: ignore[attr-defined]


def test_a_deposed_leader_issues_no_action_and_the_new_one_reconciles(
    etcd: EtcdCluster, tmp_path: Path, cluster_name: str
) -> None:
    """a reaches etcd through a link that is cut when its first migration starts. It must
    start no further migration or power switch (counted on the hosts' side); b takes over
    within 2 TTL, settles a's open intent, then acts; every guest runs on one host."""
    from test_daemon_inprocess import cluster as sim_cluster

    hv = sim_cluster()
    link = Blackhole(etcd.members[0].client_port)
    view_a, view_b = Recording(hv, migrate_s=0.6), Recording(hv)
    a, _ = coordinated_daemon(tmp_path / "a", view_a, "node-a", [link.url], cluster_name)
    b, _ = coordinated_daemon(tmp_path / "b", view_b, "node-b", etcd.endpoints, cluster_name)
    cut_at: list[float] = []

    def cut() -> None:
        if not cut_at:
            cut_at.append(time.monotonic())
            link.cut()

    view_a.on_migrate.append(cut)
    a.start(schedule_jobs=False)  # type: ignore[attr-defined]
    b.start(schedule_jobs=False)  # type: ignore[attr-defined]
    try:
        assert a.coord.not_leading() == ""  # type: ignore[attr-defined]
        collect_both(hv, a, b)
        report = a.cycle_once()  # type: ignore[attr-defined]
        assert report is not None and cut_at
        kinds = {r.skip_kind for r in report.results if r.outcome is MoveOutcome.SKIPPED}
        assert SkipKind.NOT_LEADER in kinds, [r.line() for r in report.results]
        took_over = wait_for(lambda: b.coord.not_leading() == "", 2 * TTL_S + 1, "b to lead")  # type: ignore[attr-defined]
        assert time.monotonic() - cut_at[0] <= 2 * TTL_S + 0.2, took_over
        led_at = time.monotonic()
        # a's later cycles and power switches do nothing (its lease lapsed).
        collect_both(hv, a, times=1)
        assert a.cycle_once() is None  # type: ignore[attr-defined]
        assert a._fence_power("h3", "off") != ""  # type: ignore[attr-defined]
        # On the hosts: a's only migration is the one that was running when it was cut off.
        migrations_a = [c for c in view_a.calls if c[1] == "migrate"]
        assert len(migrations_a) == 1 and migrations_a[0][0] <= cut_at[0]
        assert [c for c in view_a.calls if c[0] > cut_at[0] + 0.7] == []
        assert [c for c in view_a.calls if c[0] >= led_at] == []
        # b settles a's open intent before it acts, then balances.
        open_before = b.journal.open_entries()  # type: ignore[attr-defined]
        collect_both(hv, b, times=2)
        report_b = b.cycle_once()  # type: ignore[attr-defined]
        assert report_b is not None
        assert b.journal.open_entries() == []  # type: ignore[attr-defined]
        if open_before:
            assert b.journal.reconciliation_count() >= len(open_before)  # type: ignore[attr-defined]
        assert all(len(hosts) == 1 for hosts in placements(hv).values()), placements(hv)
        assert sorted(placements(hv)) == [f"vm{i}" for i in range(4)]
    finally:
        link.heal()
        a.shutdown()  # type: ignore[attr-defined]
        b.shutdown()  # type: ignore[attr-defined]
        link.close()


def test_apply_power_asks_the_fence_before_every_switch() -> None:
    from balancerd.power import PowerTracker, apply_power
    from balancerd.power.manager import PowerDecision

    switched: list[str] = []

    class Driver:
        def power_on(self, host: str) -> None:
            switched.append(f"on {host}")

        def power_off(self, host: str) -> None:
            switched.append(f"off {host}")

    decision = PowerDecision(power_off=("h2",), power_on=("h3",), held={})
    drivers = {"h2": Driver(), "h3": Driver()}
    asked: list[tuple[str, str]] = []

    def fence(host: str, action: str) -> str:
        asked.append((host, action))
        return "" if host == "h3" else "not the leader"

    results = apply_power(decision, drivers, PowerTracker(), 0.0, fence=fence)  # type: ignore[arg-type]
    assert asked == [("h3", "on"), ("h2", "off")]
    assert switched == ["on h3"]
    assert [(r.host, r.ok) for r in results] == [("h3", True), ("h2", False)]
    assert "not the leader" in results[1].error


def test_one_member_down_changes_nothing_quorum_lost_stops_everyone_and_comes_back(
    tmp_path: Path, cluster_name: str
) -> None:
    why = etcd_missing()
    if why:
        pytest.skip(why)
    # An etcd leader election (the killed member may be the raft leader) takes about its
    # election timeout (1 s) plus detection: the lease must outlast it (docs/ha.md).
    ttl_s = 5
    trio = EtcdCluster(tmp_path / "etcd3", size=3).start()
    a = coordinator(tmp_path, "node-a", trio.endpoints, cluster_name, ttl_s)
    b = coordinator(tmp_path, "node-b", trio.endpoints[::-1], cluster_name, ttl_s)
    a.start(wait_s=0, on_change=Changes())
    b.start(wait_s=0, on_change=Changes())
    try:
        assert a.not_leading() == ""
        token = a.leadership().token
        wait_for(lambda: "node-a leads" in b.not_leading(), 5, "b to see a lead")
        # The member a talks to dies: a moves to the next one; nothing changes.
        trio.kill(trio.members[0])
        lapsed = []
        for _ in range(int(3 * ttl_s / 0.05)):
            lapsed.append(a.not_leading())
            time.sleep(0.05)
        assert set(lapsed) == {""}, {x for x in lapsed if x}
        assert a.leadership().token == token and "node-a leads" in b.not_leading()
        # Quorum lost (two of three down): both stop acting within one TTL and say why.
        trio.kill(trio.members[1])
        lost = time.monotonic()
        wait_for(lambda: a.not_leading() != "", ttl_s + 0.2, "a to stop acting")
        assert time.monotonic() - lost <= ttl_s + 0.2
        assert "not confirmed" in a.not_leading() and "did not answer" in a.not_leading()
        wait_for(lambda: "cannot reach etcd" in b.not_leading(), 3 * ttl_s, "b to say why")
        with pytest.raises(CoordinationError):
            a.journal().begin("vm1", "u", "h1", "h2", "running")
        # Quorum returns: exactly one leads again.
        trio.start_member(trio.members[0])
        trio.start_member(trio.members[1])
        wait_for(lambda: (a.not_leading() == "") != (b.not_leading() == ""), 30, "one leader again")
        leader = a if a.not_leading() == "" else b
        leader.fence("check", "quorum", {})
    finally:
        a.stop()
        b.stop()
        trio.stop()
