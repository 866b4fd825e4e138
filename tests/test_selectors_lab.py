"""Guest tags from libvirt metadata and host labels from the config, on a real lab: a tag
set with ``virsh metadata`` reaches the snapshot, and a selector policy acts on it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from balancerd.collect import SampleHistory, build_snapshot, capacity_from_config
from balancerd.config import load_config
from balancerd.decide import decide
from balancerd.hypervisor.libvirt import TAGS_NS_KEY, TAGS_NS_URI, LibvirtHypervisor
from balancerd.lab.cluster import GuestSpec, Lab, LabSpec
from balancerd.policy.load import load_policy_text

pytestmark = pytest.mark.lab

LAB_NAME, LAB_SUBNET = "bsel", "10.77.15"

POLICY = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: db-off-g4}
spec:
  objective: balance
  hysteresis: {min_improvement: 0}
  constraints:
    host_rules:
      - vms: [{vms: {tags: [db]}}]
        hosts: [{hosts: {labels: {gen: g4}}}]
        kind: must_not
"""


def test_virsh_metadata_tag_and_config_label_reach_the_snapshot_and_the_plan(
    lab_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    make = lab_factory(LAB_NAME, LAB_SUBNET)
    lab: Lab = make(
        LabSpec(hosts=2, guests=(GuestSpec("db1", "host1"), GuestSpec("web1", "host1")))
    )
    subprocess.run(
        [
            "virsh", "-q", "-c", lab.client_uri("host1"), "metadata", "db1",
            "--uri", TAGS_NS_URI, "--key", TAGS_NS_KEY,
            "--set", "<tags><tag>db</tag><tag>prod</tag></tags>", "--live",
        ],
        check=True, timeout=30,
    )  # fmt: skip
    # The lab's config with a label on host1 (labels come from the daemon config).
    raw = yaml.safe_load(lab.config_path.read_text())
    raw["hosts"][0]["labels"] = {"gen": "g4", "rack": "r1"}
    raw["policy"] = str(lab.config_path.parent / raw["policy"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)

    hv = LibvirtHypervisor(config.hosts, timeout_s=config.host_timeout_s)
    try:
        history = SampleHistory(window=1)
        for _ in range(2):
            history.add(hv.sample_all())
            time.sleep(1.0)
        snap = build_snapshot(
            history.samples(), window=1, capacity=capacity_from_config(config.hosts)
        )
    finally:
        hv.close()

    db1, web1, host1 = snap.vm("db1"), snap.vm("web1"), snap.host("host1")
    assert db1 is not None and web1 is not None and host1 is not None
    assert db1.tags == ("db", "prod")
    assert web1.tags == ()  # no metadata: no tags
    assert dict(host1.labels) == {"gen": "g4", "rack": "r1"}

    plan = decide(snap, load_policy_text(POLICY, "db-off-g4.yaml"))
    assert [(m.vm, m.src, m.dst) for m in plan.moves] == [("db1", "host1", "host2")]
