"""Two balancerd instances on a real lab, coordinated through a three-member etcd cluster
(balancerd.coord.halab): the leader killed mid-migration, the leader cut off from etcd.
Needs root (iptables, libvirtd + QEMU hosts) and etcd; run with the lab lock held."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancerd.coord.etcdlab import etcd_missing
from balancerd.coord.halab import HaEnv
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.lab.faults import DIRTY, check_invariants, drain_policy, wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

TTL_S = 3
QUIET = GuestSpec("quiet", "host1", mem_mib=128)


@pytest.fixture(scope="module")
def lab(lab_factory_module: object) -> Lab:
    why = etcd_missing()
    if why:
        pytest.skip(why)
    make = lab_factory_module("bxha", "10.77.31")  # type: ignore[operator]
    return make(LabSpec(hosts=2, guests=()))  # type: ignore[no-any-return]


@pytest.fixture
def ha(lab: Lab, tmp_path: Path) -> Iterator[HaEnv]:
    h = HaEnv(lab, tmp_path, ttl_s=TTL_S).start()
    yield h
    h.close()
    h.env.cleanup_guests()


def where(ha: HaEnv, vm: str) -> list[tuple[str, str]]:
    return [(g.host, g.state) for g in ha.env.lab.guests() if g.name == vm]


def test_leader_killed_mid_migration_standby_takes_over_and_reconciles(ha: HaEnv) -> None:
    env = ha.env
    env.boot(DIRTY)
    before = env.domains()
    policy = env.write_policy(drain_policy(stall_samples=8, max_time_s=120))
    ha.manager("a", policy)
    ha.manager("b", policy)
    a = ha.run("a")
    a.wait_ready()
    assert ha.wait_leader(10)[0].name == "a"
    b = ha.run("b")
    b.wait_ready()
    wait_until(lambda: env.job_active("host1", DIRTY.name, 2), 90, "a pre-copy job")
    assert ha.open_intents(), "the intent is not in etcd"
    token_a = ha.managers["a"].token()
    a.kill9()
    killed = time.monotonic()
    leader, _ = ha.wait_leader(2 * TTL_S + 2)
    took_over_s = time.monotonic() - killed
    assert leader.name == "b"
    assert took_over_s <= 2 * TTL_S, f"takeover after {took_over_s:.1f} s"
    assert leader.token() > token_a
    wait_until(lambda: "reconcile: unfinished migration" in b.output(), 60, "b to reconcile")
    # b then drains host1 itself; the guest ends on host2, once; no intent left open.
    wait_until(
        lambda: where(ha, DIRTY.name) == [("host2", "running")] and not ha.open_intents(),
        150,
        "b's own migration",
    )
    b.signal(signal.SIGTERM)
    assert b.wait_exit(120) == 0
    problems = check_invariants(env, before)
    assert problems == [], problems
    assert "Traceback" not in a.output() + b.output()


def test_leader_cut_off_from_etcd_acts_no_more_and_the_new_leader_acts(ha: HaEnv) -> None:
    env = ha.env
    env.boot(QUIET)
    before = env.domains()
    policy = env.write_policy(drain_policy(mode="recommend"), "drain.yaml")
    ha.manager("a", policy)
    ha.manager("b", policy)
    a = ha.run("a")
    a.wait_ready()
    assert ha.wait_leader(10)[0].name == "a"
    ha.cut("a")
    cut_at = time.monotonic()
    wait_until(lambda: ha.managers["a"].metric("balancerd_leader") == 0, TTL_S + 2, "a to stop")
    assert time.monotonic() - cut_at <= TTL_S + 0.5
    # a now wants to act (automatic drain of host1) but holds no lease.
    policy.write_text(drain_policy())
    a.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in a.output(), 20, "a's reload")
    watch_until = time.monotonic() + 4 * 4  # four cycle intervals
    while time.monotonic() < watch_until:
        # On the hosts: the guest stays where it is and no migration job starts.
        assert where(ha, QUIET.name) == [("host1", "running")]
        assert not env.job_active("host1", QUIET.name, 0)
        time.sleep(0.5)
    assert "cycle skipped: the leader lease was not confirmed" in a.output()
    # The other instance leads and acts; a stays cut off and quiet.
    b = ha.run("b")
    b.wait_ready()
    leader, _ = ha.wait_leader(2 * TTL_S + 5)
    assert leader.name == "b"
    wait_until(lambda: where(ha, QUIET.name) == [("host2", "running")], 90, "b's migration")
    token_b = leader.token()
    # a's link heals: it stands by, naming b; nothing it wrote landed after b's token.
    ha.heal()
    wait_until(
        lambda: "node-b leads" in str(ha.managers["a"].status().get("coordination")),
        4 * TTL_S,
        "a to stand by for b",
    )
    assert ha.writes_by_after("node-a", token_b) == []
    assert ha.open_intents() == []
    for m in (a, b):
        m.signal(signal.SIGTERM)
        assert m.wait_exit(120) == 0
    problems = check_invariants(env, before)
    assert problems == [], problems
    assert "Traceback" not in a.output() + b.output()
