#!/usr/bin/env python3
"""Failover table: two balancerd instances on a real lab, a three-member etcd.

    flock /tmp/balancerd-lab.lock .venv/bin/python scripts/failover_table.py --runs 10

* kill -9 runs: the leader is killed; time until the other instance leads (its
  ``balancerd_leader`` metric, polled every 50 ms); the killed one restarts as standby.
* partition runs: the leader is cut off from etcd (iptables, see balancerd/coord/halab.py)
  and, at once, both instances are told (policy rewritten + SIGHUP) to drain the host the
  guest is on: the cut-off leader wants to act. Measured: when it stops acting, when the
  other leads; counted: the deposed leader's records in etcd written after its
  successor's token (its fenced writes that got through: must be 0) and migrations it
  logged after it stopped acting (must be 0). The successor moves the guest; the link
  heals and the old leader stands by.

Needs root, the lab packages and etcd (scripts/setup.sh). Prints the table and the command.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from balancerd.coord.halab import HaEnv, Manager
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.lab.faults import drain_policy, wait_until

GUEST = GuestSpec("quiet", "host1", mem_mib=128)


def drain(host: str) -> str:
    return drain_policy().replace("maintenance: [host1]", f"maintenance: [{host}]")


def guest_host(ha: HaEnv) -> str:
    hosts = [g.host for g in ha.env.lab.guests() if g.name == GUEST.name and g.state == "running"]
    return hosts[0] if len(hosts) == 1 else ""


def other(ha: HaEnv, m: Manager) -> Manager:
    return next(x for x in ha.managers.values() if x.name != m.name)


def partition_run(ha: HaEnv, policy: Path, ttl: int) -> tuple[float, float, int, int, str]:
    """Cut the leader off from etcd while both instances are told to move the guest."""
    leader, _ = ha.wait_leader(3 * ttl)
    follower = other(ha, leader)
    assert leader.proc is not None and follower.proc is not None
    here = guest_host(ha)
    ha.cut(leader.name)
    t0 = time.monotonic()
    policy.write_text(drain(here))  # the guest must leave `here`: both want to act
    for m in (leader, follower):
        assert m.proc is not None
        m.proc.signal(signal.SIGHUP)
    wait_until(lambda: leader.metric("balancerd_leader") == 0, 4 * ttl, "the cut-off to stop")
    stopped = time.monotonic() - t0
    log_at_stop = len(leader.proc.output())
    new, _ = ha.wait_leader(4 * ttl, not_=leader.name)
    led = time.monotonic() - t0
    token = new.token()
    wait_until(lambda: guest_host(ha) not in ("", here), 120, "the new leader's move")
    late = ha.writes_by_after(f"node-{leader.name}", token)
    after_stop = leader.proc.output()[log_at_stop:]
    # A move's result line: "VM SRC->DST migrated|failed|skipped ...". Skips with
    # not-leader are refusals, not actions.
    moves = [
        line
        for line in re.findall(r".*->\S+ (?:migrated|failed).*", after_stop)
        if "not-leader" not in line
    ]
    ha.heal()
    wait_until(
        lambda: "leads" in str(leader.status().get("coordination", {}).get("reason")),
        6 * ttl,
        "the old leader to stand by",
    )
    text = (
        f"{leader.name} stopped after {stopped:.2f} s, {new.name} led after {led:.2f} s, "
        f"moved {GUEST.name} {here}->{guest_host(ha)}; deposed leader: {len(late)} late "
        f"writes, {len(moves)} migrations"
    )
    return stopped, led, len(late), len(moves), text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--ttl", type=int, default=3, help="coordination.lock_ttl_s")
    p.add_argument("--work", default="", help="work folder (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="balancerd-failover-"))
    lab = Lab(work / "lab", "bxfo", "10.77.32")
    if lab.leftovers():
        lab.down()
    lab.up(LabSpec(hosts=2, guests=(GUEST,)))
    ha = HaEnv(lab, work / "ha", ttl_s=args.ttl).start()
    kill_s: list[float] = []
    stop_s: list[float] = []
    part_s: list[float] = []
    late_writes = 0
    late_moves = 0
    try:
        lab.wait_booted(GUEST.name)
        policy = ha.env.write_policy(drain("host0"), "policy.yaml")  # nothing to drain yet
        for name in ("a", "b"):
            ha.manager(name, policy)
            ha.run(name).wait_ready()
        ha.wait_leader(3 * args.ttl)
        for i in range(args.runs):
            leader, _ = ha.wait_leader(3 * args.ttl)
            assert leader.proc is not None
            leader.proc.kill9()
            t0 = time.monotonic()
            new, _ = ha.wait_leader(4 * args.ttl, not_=leader.name)
            kill_s.append(time.monotonic() - t0)
            ha.run(leader.name).wait_ready()
            print(f"kill-9 run {i + 1}: {leader.name} -> {new.name} in {kill_s[-1]:.2f} s")
        for i in range(args.runs):
            stopped, led, writes, moves, text = partition_run(ha, policy, args.ttl)
            stop_s.append(stopped)
            part_s.append(led)
            late_writes += writes
            late_moves += moves
            print(f"partition run {i + 1}: {text}")
    finally:
        ha.close()
        lab.down()

    def row(name: str, xs: list[float]) -> str:
        return f"| {name} | {len(xs)} | {statistics.median(xs):.2f} s | {max(xs):.2f} s |"

    print()
    print(f"lock_ttl_s = {args.ttl}, etcd members = 3, guest {GUEST.name} ({GUEST.mem_mib} MiB)")
    print("| measured | runs | median | worst |")
    print("|---|---|---|---|")
    print(row("kill -9 of the leader -> other instance leads", kill_s))
    print(row("leader cut from etcd -> it stops acting", stop_s))
    print(row("leader cut from etcd -> other instance leads", part_s))
    print()
    print(f"deposed leader: fenced writes landed after the successor's token: {late_writes}")
    print(f"deposed leader: migrations logged after it stopped acting: {late_moves}")
    print(f"command: flock /tmp/balancerd-lab.lock {sys.executable} {' '.join(sys.argv)}")
    return 0 if late_writes == 0 and late_moves == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
