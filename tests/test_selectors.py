"""Selectors: matching, loading (with file:line errors), resolution against a snapshot, and
what the decision core does with them; labels and tags through collection."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_solve import after, host, snap

from balancerd.collect import build_snapshot
from balancerd.commands import check_policy
from balancerd.config import load_config_text
from balancerd.decide import decide
from balancerd.errors import ConfigError, PolicyError
from balancerd.hypervisor.libvirt import tags_from_xml
from balancerd.hypervisor.sim import SimHost, SimHypervisor, SimVm
from balancerd.model import Host, Vm
from balancerd.policy.load import load_policy_text
from balancerd.policy.model import Policy
from balancerd.selectors import Over, Selector, resolve_policy
from balancerd.solve.problem import build_problem

GIB = 1024**3


def tagged(name: str, on: str, *tags: str) -> Vm:
    return Vm(name, name, on, "running", 2, 2 * GIB, 0.3, tags=tags)


def labelled(name: str, **labels: str) -> Host:
    return host(name, labels=labels)


def load(constraints: str, extra: str = "") -> Policy:
    text = (
        "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: t}\nspec:\n"
        "  objective: balance\n  hysteresis: {min_improvement: 0}\n"
        f"{extra}  constraints:\n{constraints}"
    )
    return load_policy_text(text, "t.yaml")


def problems(constraints: str) -> list[str]:
    with pytest.raises(PolicyError) as err:
        load(constraints)
    return err.value.problems


# --- matching ----------------------------------------------------------------------------


def test_labels_must_all_match_names_any_pattern() -> None:
    g4r1 = labelled("hp-g4-1", gen="g4", rack="r1")
    g4r2 = labelled("hp-g4-2", gen="g4", rack="r2")
    g5 = labelled("hp-g5-1", gen="g5", rack="r1")
    both = Selector(Over.HOSTS, labels=(("gen", "g4"), ("rack", "r1")))
    assert [both.matches_host(h) for h in (g4r1, g4r2, g5)] == [True, False, False]
    names = Selector(Over.HOSTS, names=("*-g5-*", "hp-g4-2"))
    assert [names.matches_host(h) for h in (g4r1, g4r2, g5)] == [False, True, True]
    # criteria of one selector combine with AND
    mixed = Selector(Over.HOSTS, names=("hp-g4-*",), labels=(("rack", "r2"),))
    assert [mixed.matches_host(h) for h in (g4r1, g4r2, g5)] == [False, True, False]


def test_tags_must_all_be_present_and_a_host_selector_matches_no_guest() -> None:
    db = tagged("db-1", "h0", "db", "prod")
    dbtest = tagged("db-2", "h0", "db")
    assert Selector(Over.VMS, tags=("db", "prod")).matches_vm(db)
    assert not Selector(Over.VMS, tags=("db", "prod")).matches_vm(dbtest)
    assert Selector(Over.VMS, names=("db-?",)).matches_vm(dbtest)
    assert not Selector(Over.HOSTS, names=("*",)).matches_vm(db)
    assert not Selector(Over.VMS, names=("*",)).matches_host(host("h0"))


# --- loading -----------------------------------------------------------------------------


def test_selectors_load_apart_from_names_in_every_constraint_list() -> None:
    p = load(
        "    maintenance: [h9, {hosts: {labels: {gen: g4}}}]\n"
        "    exclude_hosts: [{hosts: {names: [spare-*]}}]\n"
        "    exclude_vms: [{vms: {names: ['tmp-*']}}]\n"
        "    pin: {db-1: [{hosts: {labels: {rack: r1}}}]}\n"
        "    affinity: [[{vms: {tags: [pair]}}]]\n"
        "    anti_affinity: [[web-1, {vms: {names: ['web-*']}}]]\n"
        "    host_rules:\n"
        "      - {vms: [{vms: {tags: [db]}}], hosts: [{hosts: {labels: {gen: g4}}}],"
        " kind: must_not}\n"
    )
    c = p.constraints
    assert c.maintenance == ("h9",)
    assert c.pin == {"db-1": ()}
    assert c.anti_affinity == (("web-1",),)
    assert c.host_rules[0].vms == () and c.host_rules[0].kind == "must_not"
    ats = [s.at for s in c.selectors]
    assert ats == [
        ("exclude_vms",),
        ("exclude_hosts",),
        ("maintenance",),
        ("pin", "db-1"),
        ("affinity", 0),
        ("anti_affinity", 0),
        ("host_rules", 0, "vms"),
        ("host_rules", 0, "hosts"),
    ]
    sel = c.selectors[2].selector
    assert sel == Selector(Over.HOSTS, labels=(("gen", "g4"),))
    assert p.lines[sel.path] == 8  # the maintenance line, for check-policy's reports


@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        (
            "    maintenance: [{vms: {tags: [db]}}]\n",
            "t.yaml:8: spec.constraints.maintenance[0]: must be a host name or a selector "
            "{hosts: {...}}, got a mapping, keys vms (vms selectors do not fit in this list)",
        ),
        (
            "    exclude_vms: [{vms: {}}]\n",
            "t.yaml:8: spec.constraints.exclude_vms[0].vms: an empty selector: give names, tags",
        ),
        (
            "    maintenance: [{hosts: {tags: [db]}}]\n",
            "t.yaml:8: spec.constraints.maintenance[0].hosts.tags: unknown key",
        ),
        (
            "    host_rules:\n      - vms: [{vms: {tags: []}}]\n        hosts: [h1]\n"
            "        kind: must\n",
            "t.yaml:9: spec.constraints.host_rules[0].vms[0].vms.tags: must have at least 1 "
            "item(s), got 0",
        ),
        (
            "    pin:\n      db-1:\n        - hosts:\n            labels: {gen: [g4]}\n",
            "t.yaml:11: spec.constraints.pin.db-1[0].hosts.labels.gen: must be a name",
        ),
        (
            "    maintenance: [{hosts: {names: ['h 1']}}]\n",
            "t.yaml:8: spec.constraints.maintenance[0].hosts.names[0]: must be a name or "
            "fnmatch pattern",
        ),
        (
            "    anti_affinity: [[a]]\n",
            "t.yaml:8: spec.constraints.anti_affinity[0]: must have at least 2 item(s), got 1",
        ),
        (
            "    maintenance: [{hosts: {labels: {gen: g4}}}, {hosts: {labels: {gen: g4}}}]\n",
            "t.yaml:8: spec.constraints.maintenance[1]: a mapping is listed twice",
        ),
    ],
)
def test_malformed_selectors_are_reported_at_their_line(constraints: str, expected: str) -> None:
    found = problems(constraints)
    assert any(p.startswith(expected) for p in found), found


def test_a_group_of_one_selector_is_a_group() -> None:
    p = load("    anti_affinity: [[{vms: {tags: [web]}}]]\n")
    assert p.constraints.anti_affinity == ((),)


# --- resolution --------------------------------------------------------------------------


def test_resolve_adds_matches_after_written_names_once() -> None:
    p = load(
        "    maintenance: [h2, {hosts: {labels: {gen: g4}}}]\n"
        "    anti_affinity: [[web-1, {vms: {names: ['web-*']}}]]\n"
    )
    s = snap(
        [labelled("h1", gen="g4"), labelled("h2", gen="g4"), labelled("h3", gen="g5")],
        [tagged("web-1", "h1"), tagged("web-2", "h3"), tagged("db-1", "h3")],
    )
    r = resolve_policy(p, s)
    assert r.constraints.maintenance == ("h2", "h1")
    assert r.constraints.anti_affinity == (("web-1", "web-2"),)
    assert r.constraints.selectors == ()
    assert resolve_policy(r, s) is r  # nothing left to resolve: the same object


def test_a_db_guest_is_kept_off_g4_hosts_and_others_are_not() -> None:
    s = snap(
        [labelled("g4-a", gen="g4"), labelled("g4-b", gen="g4"), labelled("g5-a", gen="g5")],
        [tagged("db-1", "g4-a", "db"), tagged("db-2", "g4-b", "db"), tagged("web-1", "g4-a")],
    )
    p = load(
        "    host_rules:\n      - vms: [{vms: {tags: [db]}}]\n"
        "        hosts: [{hosts: {labels: {gen: g4}}}]\n        kind: must_not\n"
    )
    plan = decide(s, p)
    assert after(plan) == {"db-1": "g5-a", "db-2": "g5-a", "web-1": "g4-a"}
    # The same guests untagged: balancing alone leaves db-2 where it is.
    untagged = replace(s, vms=tuple(replace(v, tags=()) for v in s.vms))
    assert after(decide(untagged, p))["db-2"] == "g4-b"


def test_one_label_selector_drains_a_generation() -> None:
    hosts = [labelled(f"g4-{i}", gen="g4") for i in range(3)]
    hosts += [labelled(f"g5-{i}", gen="g5") for i in range(3)]
    vms = [tagged(f"v{i}", f"g4-{i % 3}") for i in range(6)]
    p = load("    maintenance: [{hosts: {labels: {gen: g4}}}]\n")
    plan = decide(snap(hosts, vms), p)
    assert {h for h in after(plan).values()} <= {"g5-0", "g5-1", "g5-2"}
    assert len(plan.moves) == 6


def test_tag_selector_in_a_must_not_keeps_one_shared_host_set() -> None:
    """The must_not over 200 tagged guests x 40 labelled hosts resolves to one rule and
    one allowed-host set shared by the 200 guests (the optimisation of named rules)."""
    hosts = [labelled(f"h{i:02d}", gen="g4" if i % 2 == 0 else "g5") for i in range(80)]
    vms = [
        tagged(f"v{j:03d}", f"h{(2 * j + 1) % 80:02d}", *(("fast",) if j % 2 == 0 else ()))
        for j in range(400)
    ]
    p = load(
        "    host_rules:\n      - vms: [{vms: {tags: [fast]}}]\n"
        "        hosts: [{hosts: {labels: {gen: g4}}}]\n        kind: must_not\n"
    )
    s = snap(hosts, vms)
    prob = build_problem(s, resolve_policy(p, s))
    assert len({id(a) for a in prob.allowed if a is not None}) == 1
    assert sum(a is not None for a in prob.allowed) == 200


# --- labels and tags through collection --------------------------------------------------


def test_sim_labels_and_tags_reach_the_snapshot() -> None:
    h1 = SimHost("h1", cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB, labels={"gen": "g4"})
    h2 = SimHost("h2", cpus=4, cpu_mhz=2000, mem_bytes=8 * GIB, up=False, labels={"gen": "g5"})
    sim = SimHypervisor([h1, h2])
    sim.add_vm("h1", SimVm("db-1", 1, GIB, tags=("db",)))
    first = sim.sample_all()
    sim.advance(10, {})
    s = build_snapshot([first, sim.sample_all()], window=1)
    assert dict(s.hosts[0].labels) == {"gen": "g4"}
    assert dict(s.hosts[1].labels) == {"gen": "g5"}  # a down host keeps its labels
    assert s.vms[0].tags == ("db",)


CONFIG = """\
hosts:
  - name: h1
    uri: qemu+tcp://10.0.0.1/system
    labels: {{gen: g4, rack: r1}}
  - name: h2
    uri: qemu+tcp://10.0.0.2/system
    labels: {labels2}
policy: p.yaml
"""


def test_config_labels_load_and_bad_ones_name_their_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("")
    src = str(tmp_path / "c.yaml")
    config = load_config_text(CONFIG.format(labels2="{gen: g5}"), src)
    assert dict(config.hosts[0].labels) == {"gen": "g4", "rack": "r1"}
    with pytest.raises(ConfigError) as err:
        load_config_text(CONFIG.format(labels2="{gen: [g5], 'bad key': x}"), src)
    assert any(":7: hosts[1].labels.gen: must be a name" in p for p in err.value.problems)
    assert any(":7: hosts[1].labels.bad key: label must be" in p for p in err.value.problems)


@pytest.mark.parametrize(
    ("xml", "tags"),
    [
        ("<tags><tag>db</tag><tag> prod </tag><tag>db</tag></tags>", ("db", "prod")),
        ("<b:tags xmlns:b='https://balancerd.dev/xmlns/1'><b:tag>db</b:tag></b:tags>", ("db",)),
        ("<tags><tag/><other>x</other></tags>", ()),
    ],
)
def test_tags_from_metadata_xml(xml: str, tags: tuple[str, ...]) -> None:
    assert tags_from_xml(xml) == tags


# --- check-policy --config ---------------------------------------------------------------

CHECKED = """\
apiVersion: balancerd/v1
kind: Policy
metadata: {name: t}
spec:
  objective: balance
  constraints:
    maintenance: [{hosts: {labels: {gen: g4}}}]
    exclude_hosts: [{hosts: {labels: {gen: g3}}}]
    exclude_vms: [{vms: {tags: [db]}}]
"""


def _check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    check_policy.add_arguments(parser)
    return check_policy.run(parser.parse_args(argv))


def test_check_policy_reports_host_selectors_matching_no_configured_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(CHECKED)
    (tmp_path / "c.yaml").write_text(CONFIG.format(labels2="{gen: g5}"))
    pol, cfg = str(tmp_path / "p.yaml"), str(tmp_path / "c.yaml")
    assert _check([pol]) == 0  # without a config nothing is matched
    capsys.readouterr()
    assert _check([pol, "--config", cfg]) == 1
    err = capsys.readouterr().err
    assert f"{pol}:8: spec.constraints.exclude_hosts[0]: {{hosts: {{labels: {{gen: g3}}}}}} " in err
    assert f"matches no host in {cfg}" in err
    assert f"{pol}:9: spec.constraints.exclude_vms[0]: {{vms: {{tags: [db]}}}} not checked" in err
    assert "maintenance" not in err  # gen: g4 matches h1
    assert _check([pol, "--config", cfg, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    [result] = out["files"]
    assert not result["ok"] and len(result["problems"]) == 1
    assert [(s["path"], s["matches"]) for s in result["selectors"]] == [
        ("spec.constraints.exclude_vms[0]", None),
        ("spec.constraints.exclude_hosts[0]", []),
        ("spec.constraints.maintenance[0]", ["h1"]),
    ]
