"""Policy documents: YAML positions, validation messages (file:line), schema, check-policy."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from balancerd import cli
from balancerd.commands import check_policy
from balancerd.errors import PolicyError
from balancerd.policy import schema as policy_schema
from balancerd.policy.load import load_policy, load_policy_text
from balancerd.policy.model import (
    Budget,
    Constraints,
    HostRule,
    Hysteresis,
    Limits,
    Migration,
    Mode,
    Objective,
    OnStall,
    Policy,
    Power,
    PowerModel,
    Resources,
    Solver,
    SolverBackend,
)
from balancerd.policy.schema import SCHEMA_PATH, schema_text
from balancerd.policy.spec import DOCUMENT, SPEC
from balancerd.validate import Number, Obj
from balancerd.yamlpos import YamlError, load_text

REPO = Path(__file__).resolve().parent.parent
POLICY_FILES = sorted((REPO / "policies").glob("*.yaml"))
SRC = "t.yaml"

HEAD = """\
apiVersion: balancerd/v1
kind: Policy
metadata:
  name: t
"""


def doc(spec: str) -> str:
    """A document with the standard head and ``spec`` (indented under ``spec:``)."""
    return HEAD + "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, SRC)
    assert info.value.problems, "PolicyError without problems"
    return info.value.problems


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing ``needle``."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(found) >= nth, f"{needle!r} not in text"
    return found[nth - 1]


# ---------------------------------------------------------------------------- yamlpos


def test_yamlpos_matches_safe_load_and_records_lines() -> None:
    text = "a: 1\nb:\n  - x\n  - {y: 2}\nbase: &b {p: 1}\nc:\n  <<: *b\n  q: on\n"
    parsed = load_text(text, "f.yaml")
    assert parsed.data == yaml.safe_load(text)
    assert parsed.line(("b", 1, "y")) == 4
    assert parsed.line(("c", "q")) == 8
    # Absent paths answer with the nearest written ancestor.
    assert parsed.line(("c", "missing", 3)) == 6
    assert parsed.problem(("b", 0), "m") == "f.yaml:3: b[0]: m"


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_yamlpos_data_equals_safe_load_on_shipped_policies(path: Path) -> None:
    text = path.read_text()
    assert load_text(text, str(path)).data == yaml.safe_load(text)


def test_yamlpos_reports_every_duplicate_key() -> None:
    with pytest.raises(YamlError) as info:
        load_text("a: 1\nb:\n  c: 1\n  c: 2\na: 3\n", "d.yaml")
    assert info.value.problems == [
        "d.yaml:4: b.c: duplicate key (first written at line 3)",
        "d.yaml:5: a: duplicate key (first written at line 1)",
    ]


# ------------------------------------------------------------------------ bad documents

# (name, spec text, field path, line needle, message fragment)
BAD_SPEC = [
    (
        "range_cpu_util",
        "objective: balance\nlimits:\n  max_cpu_util: 1.5\n",
        "spec.limits.max_cpu_util",
        "max_cpu_util",
        "must be a number in (0, 1], got 1.5",
    ),
    (
        "string_for_number",
        "objective: balance\nlimits:\n  max_mem_util: high\n",
        "spec.limits.max_mem_util",
        "max_mem_util",
        "must be a number in (0, 1], got 'high'",
    ),
    (
        "bool_for_number",
        "objective: balance\nhysteresis:\n  cooldown_s: true\n",
        "spec.hysteresis.cooldown_s",
        "cooldown_s",
        "must be a number in [0, 31536000] (at most 1 year), got true",
    ),
    (
        "float_for_integer",
        "objective: balance\nbudget:\n  max_moves: 2.5\n",
        "spec.budget.max_moves",
        "max_moves",
        "must be an integer in [0, 100000], got 2.5",
    ),
    (
        "negative_bandwidth",
        "objective: balance\nmigration:\n  bandwidth_mib_s: -10\n",
        "spec.migration.bandwidth_mib_s",
        "bandwidth_mib_s",
        "must be a number in (0, 8796093022207] (libvirt's maximum), got -10",
    ),
    (
        "negative_min_active_hosts",
        "objective: power-save\npower:\n  min_active_hosts: -1\n",
        "spec.power.min_active_hosts",
        "min_active_hosts",
        "must be an integer in [0, 10000], got -1",
    ),
    (
        "gap_one",
        "objective: balance\nsolver:\n  gap: 1\n",
        "spec.solver.gap",
        "gap",
        "must be a number in [0, 1), got 1",
    ),
    (
        "zero_concurrency",
        "objective: balance\nmigration:\n  max_concurrent: 0\n  max_concurrent_per_host: 0\n",
        "spec.migration.max_concurrent",
        "max_concurrent:",
        "must be an integer in [1, 1000], got 0",
    ),
    (
        "bad_enum",
        "objective: balance\nmigration:\n  on_stall: retry\n",
        "spec.migration.on_stall",
        "on_stall",
        "must be one of pause | abort | postcopy, got 'retry'",
    ),
    (
        "bad_objective",
        "objective: balanced\n",
        "spec.objective",
        "objective",
        "must be one of balance | power-save, got 'balanced'",
    ),
    (
        "unknown_key_suggests",
        "objective: balance\nlimits:\n  max_cpu_utl: 0.5\n",
        "spec.limits.max_cpu_utl",
        "max_cpu_utl",
        "unknown key (did you mean 'max_cpu_util'?)",
    ),
    (
        "unknown_key_misplaced",
        "objective: balance\nmax_moves: 3\n",
        "spec.max_moves",
        "max_moves",
        "unknown key (it belongs under spec.budget)",
    ),
    (
        "unknown_key_lists_allowed",
        "objective: balance\nsolver:\n  zzz: 1\n",
        "spec.solver.zzz",
        "zzz",
        "unknown key; allowed: backend, time_limit_s, gap, migration_cost",
    ),
    (
        "yaml_boolean_host_name",
        "objective: balance\nconstraints:\n  maintenance: [host1, no]\n",
        "spec.constraints.maintenance[1]",
        "maintenance",
        "got false (YAML reads yes/no/on/off/true/false as booleans: quote it)",
    ),
    (
        "list_expected",
        "objective: balance\nconstraints:\n  exclude_vms: web-1\n",
        "spec.constraints.exclude_vms",
        "exclude_vms",
        "must be a list, got 'web-1'",
    ),
    (
        "listed_twice",
        "objective: balance\nconstraints:\n  exclude_vms:\n    - a\n    - b\n    - a  # again\n",
        "spec.constraints.exclude_vms[2]",
        "again",
        "'a' is listed twice (also at index 0)",
    ),
    (
        "anti_affinity_group_of_one",
        "objective: balance\nconstraints:\n  anti_affinity: [[a]]\n",
        "spec.constraints.anti_affinity[0]",
        "anti_affinity",
        "must have at least 2 item(s), got 1",
    ),
    (
        "empty_pin",
        "objective: balance\nconstraints:\n  pin:\n    db-1: []\n",
        "spec.constraints.pin.db-1",
        "db-1",
        "must have at least 1 item(s), got 0",
    ),
    (
        "null_section",
        "objective: balance\nlimits:\n",
        "spec.limits",
        "limits",
        "must be a mapping, got null",
    ),
    (
        "host_rule_missing_and_bad",
        "objective: balance\nconstraints:\n  host_rules:\n    - vms: [a]\n      kind: often\n",
        "spec.constraints.host_rules[0].hosts",
        "- vms",
        "missing required key",
    ),
    (
        "missing_objective",
        "mode: recommend\n",
        "spec.objective",
        "spec:",
        "missing required key",
    ),
    # Cross-field rules.
    (
        "pinned_and_excluded",
        "objective: balance\nconstraints:\n  pin:\n    db-1: [host1]\n  exclude_vms: [db-1]\n",
        "spec.constraints.exclude_vms[0]",
        "exclude_vms",
        "'db-1' is also pinned (line 9)",
    ),
    (
        "affinity_and_anti_affinity",
        "objective: balance\nconstraints:\n  affinity: [[a, b]]\n  anti_affinity: [[a, b, c]]\n",
        "spec.constraints.anti_affinity[0]",
        "anti_affinity",
        "'a' and 'b' must share a host (affinity) and must not",
    ),
    (
        "affinity_transitive_and_anti_affinity",
        "objective: balance\nconstraints:\n"
        "  affinity: [[a, b], [b, c]]\n  anti_affinity: [[x, y], [c, a]]\n",
        "spec.constraints.anti_affinity[1]",
        "anti_affinity",
        "'c' and 'a' must share a host",
    ),
    (
        "pin_to_maintenance",
        "objective: balance\nconstraints:\n  pin:\n    db-1: [host2]\n  maintenance: [host2]\n",
        "spec.constraints.pin.db-1",
        "db-1",
        "pinned only to host(s) in maintenance (host2)",
    ),
    (
        "maintenance_and_excluded_host",
        "objective: balance\nconstraints:\n  exclude_hosts: [h1]\n  maintenance: [h0, h1]\n",
        "spec.constraints.maintenance[1]",
        "maintenance",
        "'h1' is also in exclude_hosts",
    ),
    (
        "must_and_must_not",
        "objective: balance\nconstraints:\n  host_rules:\n"
        "    - {vms: [a], hosts: [h1], kind: must}\n"
        "    - {vms: [a, b], hosts: [h1, h2], kind: must_not}\n",
        "spec.constraints.host_rules[1]",
        "must_not",
        "'a' on 'h1' is both must (host_rules[0]) and must_not",
    ),
    (
        "weight_on_hard_rule",
        "objective: balance\nconstraints:\n  host_rules:\n"
        "    - vms: [a]\n      hosts: [h1]\n      kind: must_not\n      weight: 3\n",
        "spec.constraints.host_rules[0].weight",
        "weight",
        "weight only applies to kind should / should_not",
    ),
    (
        "idle_above_max_watts",
        "objective: power-save\npower:\n  host_models:\n"
        "    h1: {idle_watts: 400, max_watts: 300}\n",
        "spec.power.host_models.h1.idle_watts",
        "h1:",
        "idle_watts 400 is above max_watts 300",
    ),
    (
        "per_host_above_cluster",
        "objective: balance\nmigration:\n  max_concurrent: 1\n  max_concurrent_per_host: 2\n",
        "spec.migration.max_concurrent_per_host",
        "max_concurrent_per_host",
        "2 is above max_concurrent 1",
    ),
    (
        "downtime_steps_decrease",
        "objective: balance\nmigration:\n  downtime_steps_ms: [800, 500]\n",
        "spec.migration.downtime_steps_ms",
        "downtime_steps_ms",
        "must increase, got [800, 500]",
    ),
    (
        "downtime_steps_below_max_downtime",
        "objective: balance\nmigration:\n  max_downtime_ms: 1000\n",
        "spec.migration.max_downtime_ms",
        "max_downtime_ms",
        "the first downtime step (500 ms) must be above max_downtime_ms (1000 ms)",
    ),
    (
        "both_weights_zero",
        "objective: balance\nresources:\n  cpu: {weight: 0}\n  memory: {weight: 0}\n",
        "spec.resources",
        "resources",
        "at least one of cpu.weight, memory.weight must be > 0",
    ),
]


@pytest.mark.parametrize(
    ("spec", "path", "needle", "message"),
    [case[1:] for case in BAD_SPEC],
    ids=[case[0] for case in BAD_SPEC],
)
def test_bad_spec_reports_file_line_path_message(
    spec: str, path: str, needle: str, message: str
) -> None:
    text = doc(spec)
    found = problems(text)
    expected_prefix = f"{SRC}:{line_of(text, needle)}: {path}: "
    matching = [p for p in found if p.startswith(expected_prefix) and message in p]
    assert matching, f"want {expected_prefix}...{message}\ngot:\n" + "\n".join(found)


# (name, whole document, line, message fragment)
BAD_DOCUMENTS = [
    ("empty_file", "# only a comment\n", 1, "the file is empty"),
    ("not_a_mapping", "- a\n- b\n", 1, "(document): must be a mapping, got a list"),
    (
        "yaml_syntax_error",
        HEAD + "spec:\n  objective: balance\n  limits: {max_cpu_util: 0.5\n",
        8,
        "YAML syntax error",
    ),
    (
        "yaml_bad_indent",
        HEAD + "spec:\n  objective: balance\n   mode: recommend\n",
        7,
        "YAML syntax error: mapping values are not allowed",
    ),
    (
        "duplicate_key",
        HEAD + "spec:\n  objective: balance\n  mode: automatic\n  mode: recommend\n",
        8,
        "spec.mode: duplicate key (first written at line 7)",
    ),
    (
        "wrong_api_version",
        "apiVersion: balancerd/v2\nkind: Policy\nmetadata: {name: t}\nspec: {objective: balance}\n",
        1,
        "apiVersion: must be 'balancerd/v1', got 'balancerd/v2'",
    ),
    (
        "wrong_kind",
        "apiVersion: balancerd/v1\nkind: policy\nmetadata: {name: t}\nspec: {objective: balance}\n",
        2,
        "kind: must be 'Policy', got 'policy'",
    ),
    (
        "missing_api_version",
        "kind: Policy\nmetadata: {name: t}\nspec: {objective: balance}\n",
        1,
        "apiVersion: missing required key",
    ),
    (
        "missing_name",
        "apiVersion: balancerd/v1\nkind: Policy\nmetadata:\n  description: x\n"
        "spec: {objective: balance}\n",
        3,
        "metadata.name: missing required key",
    ),
    (
        "missing_spec",
        HEAD,
        1,
        "spec: missing required key",
    ),
    (
        "bad_name",
        "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: my policy}\n"
        "spec: {objective: balance}\n",
        3,
        "metadata.name: must be a name (letters, digits, _.:-), got 'my policy'",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [case[1:] for case in BAD_DOCUMENTS],
    ids=[case[0] for case in BAD_DOCUMENTS],
)
def test_bad_document(text: str, line: int, message: str) -> None:
    found = problems(text)
    assert any(p.startswith(f"{SRC}:{line}: ") and message in p for p in found), "\n".join(found)


def test_every_problem_reported_at_once_in_file_order() -> None:
    text = doc(
        """
        objective: balance
        limits:
          max_cpu_util: 2
          max_mem_util: 0.8
        budget:
          max_movs: 3
        constraints:
          pin:
            db-1: [host1]
          exclude_vms: [db-1]
        migration:
          bandwidth_mib_s: 0
          on_stall: stop
        """
    )
    assert problems(text) == [
        f"{SRC}:{line_of(text, 'max_cpu_util')}: spec.limits.max_cpu_util: "
        "must be a number in (0, 1], got 2",
        f"{SRC}:{line_of(text, 'max_movs')}: spec.budget.max_movs: "
        "unknown key (did you mean 'max_moves'?)",
        f"{SRC}:{line_of(text, 'exclude_vms')}: spec.constraints.exclude_vms[0]: "
        f"'db-1' is also pinned (line {line_of(text, 'db-1')}); an excluded VM is never "
        "moved, so remove it from exclude_vms or from pin",
        f"{SRC}:{line_of(text, 'bandwidth')}: spec.migration.bandwidth_mib_s: "
        "must be a number in (0, 8796093022207] (libvirt's maximum), got 0",
        f"{SRC}:{line_of(text, 'on_stall')}: spec.migration.on_stall: "
        "must be one of pause | abort | postcopy, got 'stop'",
    ]


def test_cross_checks_still_run_when_a_required_key_is_missing() -> None:
    text = doc(
        """
        mode: recommend
        constraints:
          affinity: [[a, b]]
          anti_affinity: [[b, a]]
        """
    )
    found = problems(text)
    assert len(found) == 2
    assert found[0].startswith(f"{SRC}:5: spec.objective: missing required key")
    assert "must share a host" in found[1]


# ----------------------------------------------------------------------- good documents


FULL = doc(
    """
    objective: power-save
    mode: recommend
    resources:
      cpu: {weight: 2}
      memory: {weight: 0.5}
    limits:
      max_cpu_util: 0.7
      max_mem_util: 1
      mem_headroom_mib: 1536
      cpu_overcommit: 2
    hysteresis: {min_improvement: 0.1, cooldown_s: 60}
    budget: {max_moves: 7, max_gib: 0.5}
    constraints:
      pin: {db-1: [host1, host2]}
      exclude_vms: [legacy]
      exclude_hosts: [host9]
      affinity: [[app-1, cache-1]]
      anti_affinity: [[db-1, db-2], [db-2, db-3]]
      host_rules:
        - {vms: [build-1], hosts: [host3], kind: should, weight: 2.5}
        - {vms: [build-2], hosts: [host1], kind: must_not}
      maintenance: [host4]
    power:
      min_active_hosts: 0
      reserve_hosts: 2
      grace_period_s: 30
      min_off_s: 60
      default_model: {idle_watts: 90}
      host_models: {host1: {idle_watts: 50, max_watts: 200}}
    migration:
      bandwidth_mib_s: 250
      max_downtime_ms: 50
      max_concurrent: 4
      max_concurrent_per_host: 2
      on_stall: abort
      downtime_steps_ms: [100, 200]
      auto_converge: false
      stall_samples: 3
      max_time_s: 90
      allow_cold: false
      allow_backward: true
      copy_storage_vms: [legacy]
      unsafe_cache_vms: [build-1]
      no_pause_vms: [db-1]
    solver: {backend: highs, time_limit_s: 2, gap: 0, migration_cost: 0.5}
    """
)


def test_full_document_round_trips_with_unit_conversion() -> None:
    expected = Policy(
        name="t",
        objective="power-save",
        mode="recommend",
        resources=Resources(cpu_weight=2.0, memory_weight=0.5),
        limits=Limits(
            max_cpu_util=0.7,
            max_mem_util=1.0,
            mem_headroom_bytes=1536 * 1024 * 1024,
            cpu_overcommit=2.0,
        ),
        hysteresis=Hysteresis(min_improvement=0.1, cooldown_s=60.0),
        budget=Budget(max_moves=7, max_bytes=512 * 1024 * 1024),
        constraints=Constraints(
            pin={"db-1": ("host1", "host2")},
            exclude_vms=("legacy",),
            exclude_hosts=("host9",),
            affinity=(("app-1", "cache-1"),),
            anti_affinity=(("db-1", "db-2"), ("db-2", "db-3")),
            host_rules=(
                HostRule(vms=("build-1",), hosts=("host3",), kind="should", weight=2.5),
                HostRule(vms=("build-2",), hosts=("host1",), kind="must_not"),
            ),
            maintenance=("host4",),
        ),
        power=Power(
            min_active_hosts=0,
            reserve_hosts=2,
            grace_period_s=30.0,
            min_off_s=60.0,
            host_models={"host1": PowerModel(idle_watts=50.0, max_watts=200.0)},
            default_model=PowerModel(idle_watts=90.0),
        ),
        migration=Migration(
            bandwidth_mib_s=250.0,
            max_downtime_ms=50,
            max_concurrent=4,
            max_concurrent_per_host=2,
            on_stall="abort",
            downtime_steps_ms=(100, 200),
            auto_converge=False,
            stall_samples=3,
            max_time_s=90.0,
            allow_cold=False,
            allow_backward=True,
            copy_storage_vms=("legacy",),
            unsafe_cache_vms=("build-1",),
            no_pause_vms=("db-1",),
        ),
        solver=Solver(backend="highs", time_limit_s=2.0, gap=0.0, migration_cost=0.5),
        source=SRC,
    )
    got = load_policy_text(FULL, SRC)
    assert got == expected
    assert isinstance(got.limits.mem_headroom_bytes, int)
    assert isinstance(got.budget.max_bytes, int)
    assert isinstance(got.migration.max_downtime_ms, int)
    assert isinstance(got.hysteresis.cooldown_s, float)


def test_minimal_document_takes_dataclass_defaults() -> None:
    got = load_policy_text(doc("objective: balance"), SRC)
    assert got == Policy(name="t", objective="balance", source=SRC)


def test_words_with_fixed_values_load_as_enum_members() -> None:
    got = load_policy_text(
        doc(
            "objective: power-save\nmode: recommend\n"
            "migration: {on_stall: abort}\nsolver: {backend: highs}"
        ),
        SRC,
    )
    assert got.objective is Objective.POWER_SAVE
    assert got.mode is Mode.RECOMMEND
    assert got.migration.on_stall is OnStall.ABORT
    assert got.solver.backend is SolverBackend.HIGHS
    # A member is its string: comparisons, formatting and JSON see the written word.
    assert got.objective == "power-save" and f"{got.mode}" == "recommend"
    assert json.dumps([got.objective, got.solver.backend]) == '["power-save", "highs"]'
    defaults = load_policy_text(doc("objective: balance"), SRC)
    assert defaults.objective is Objective.BALANCE
    assert defaults.mode is Mode.AUTOMATIC
    assert defaults.migration.on_stall is OnStall.PAUSE
    assert defaults.solver.backend is SolverBackend.CBC


# Combinations that look suspicious but are allowed.
VALID_SPECS = [
    ("vm_in_two_anti_affinity_groups", "constraints:\n  anti_affinity: [[a, b], [b, c]]"),
    ("abort_with_no_pause_vms", "migration: {on_stall: abort, no_pause_vms: [db-1]}"),
    (
        "pin_with_one_host_in_maintenance",
        "constraints:\n  pin: {db-1: [h1, h2]}\n  maintenance: [h1]",
    ),
    (
        "affinity_and_anti_affinity_disjoint",
        "constraints: {affinity: [[a, b]], anti_affinity: [[a, c], [b, c]]}",
    ),
    (
        "must_and_should_not_same_pair",
        "constraints:\n  host_rules:\n"
        "    - {vms: [a], hosts: [h1], kind: must}\n"
        "    - {vms: [a], hosts: [h1], kind: should_not, weight: 1}",
    ),
    ("zero_moves_budget", "budget: {max_moves: 0, max_gib: 0}"),
    ("one_weight_zero", "resources: {cpu: {weight: 0}}"),
    ("idle_equals_max_watts", "power: {default_model: {idle_watts: 250}}"),
    ("quoted_yaml_boolean_name", "constraints: {maintenance: ['no', 'on']}"),
]


@pytest.mark.parametrize("spec", [c[1] for c in VALID_SPECS], ids=[c[0] for c in VALID_SPECS])
def test_valid_combinations_load(spec: str) -> None:
    policy = load_policy_text(doc("objective: balance\n" + spec), SRC)
    assert policy.name == "t"


def test_load_policy_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(doc("objective: power-save"))
    assert load_policy(path).source == str(path)
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "absent.yaml")
    assert info.value.problems == [
        f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory"
    ]


# --------------------------------------------------------------------------- the schema


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "balancerd/policy/schema.json is stale: python -m balancerd.policy.schema --write"
    )


def _table_attrs(kind: Obj) -> set[str]:
    attrs: set[str] = set()
    for name, field in kind.fields.items():
        if field.inline:
            assert isinstance(field.kind, Obj)
            attrs |= _table_attrs(field.kind)
        else:
            attrs.add(field.attr or name)
    return attrs


def test_table_covers_every_dataclass_field() -> None:
    """A field added to policy/model.py without a key in the table fails here."""
    spec_attrs = _table_attrs(SPEC)
    assert spec_attrs == {f.name for f in dataclasses.fields(Policy)} - {"name", "source", "lines"}
    for field in SPEC.fields.values():
        kind = field.kind
        if isinstance(kind, Obj) and kind.cls is not None:
            # constraints are built by a function (selectors set apart), described by
            # their dataclass; ``selectors`` is filled from the lists, not a key
            cls = kind.cls if isinstance(kind.cls, type) else kind.defaults
            assert isinstance(cls, type)
            derived = {"selectors"} if cls is Constraints else set()
            assert _table_attrs(kind) == {f.name for f in dataclasses.fields(cls)} - derived


def _schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schema_accepts_shipped_and_full_policies() -> None:
    validator = _schema_validator()
    for text in [FULL, *(p.read_text() for p in POLICY_FILES)]:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(text))]
        assert errors == []


STRUCTURAL_BAD = [
    "objective: balance\nlimits: {max_cpu_util: 1.5}",
    "objective: balance\nlimits: {max_cpu_utl: 0.5}",
    "objective: balance\nbudget: {max_moves: 2.5}",
    "objective: balance\nmigration: {bandwidth_mib_s: -1}",
    "objective: balance\nconstraints: {exclude_vms: [a, a]}",
    "objective: balance\nconstraints: {anti_affinity: [[a]]}",
    "objective: balance\nconstraints: {host_rules: [{vms: [a], kind: must}]}",
    "objective: balance\npower: {host_models: {h1: {idle: 3}}}",
    "objective: eco",
    "mode: recommend",
]


@pytest.mark.parametrize("spec", STRUCTURAL_BAD)
def test_schema_and_loader_agree_on_structural_errors(spec: str) -> None:
    text = doc(spec)
    assert list(_schema_validator().iter_errors(yaml.safe_load(text)))
    assert problems(text)


def test_write_schema_writes_the_generated_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "schema.json"
    assert policy_schema.main(["--check", "--file", str(target)]) == 1  # absent: stale
    assert policy_schema.main(["--write", "--file", str(target)]) == 0
    assert target.read_text() == schema_text()
    assert policy_schema.main(["--check", "--file", str(target)]) == 0
    target.write_text("{}\n")
    assert policy_schema.main(["--check", "--file", str(target)]) == 1
    assert f"{target} is stale: run python -m balancerd.policy.schema --write" in (
        capsys.readouterr().out
    )
    assert policy_schema.main([]) == 0  # no option: prints the schema
    assert capsys.readouterr().out == schema_text()


# ------------------------------------------------------------------------ check-policy


def _run_check(files: list[str]) -> int:
    parser = argparse.ArgumentParser()
    check_policy.add_arguments(parser)
    return check_policy.run(parser.parse_args(files))


def test_shipped_policies_pass_check_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(POLICY_FILES) >= 3
    assert _run_check([str(p) for p in POLICY_FILES]) == 0
    out = capsys.readouterr().out.splitlines()
    for path, line in zip(POLICY_FILES, out, strict=True):
        policy = load_policy(path)
        assert line == f"{path}: ok ({policy.name}, {policy.objective})"
    names = {load_policy(p).name for p in POLICY_FILES}
    assert {"balance", "power-save", "maintenance-drain"} <= names


def test_shipped_policies_objectives_and_drain_host() -> None:
    by_name = {load_policy(p).name: load_policy(p) for p in POLICY_FILES}
    assert by_name["balance"].objective == "balance"
    assert by_name["power-save"].objective == "power-save"
    assert by_name["maintenance-drain"].constraints.maintenance


def test_balance_yaml_mentions_every_key() -> None:
    """balance.yaml is the operator's reference: every key of the table is written in it."""
    written = yaml.safe_load((REPO / "policies" / "balance.yaml").read_text())

    def missing(kind: Obj, value: object, path: str) -> list[str]:
        assert isinstance(value, dict), path
        out: list[str] = []
        for name, field in kind.fields.items():
            if name not in value:
                out.append(f"{path}.{name}")
            elif isinstance(field.kind, Obj):
                out += missing(field.kind, value[name], f"{path}.{name}")
        return out

    assert missing(DOCUMENT, written, "") == []


def _cli_exit(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    # Only this command is registered, so the test does not depend on the others.
    monkeypatch.setattr(cli, "COMMANDS", {"check-policy": cli.COMMANDS["check-policy"]})
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert isinstance(info.value.code, int)
    return info.value.code


def test_cli_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(doc("objective: balance"))
    bad = tmp_path / "bad.yaml"
    bad_text = doc("objective: balance\nlimits:\n  max_cpu_util: 1.5\nsolver: {backend: glpk}")
    bad.write_text(bad_text)

    assert _cli_exit(["check-policy", str(good)], monkeypatch) == 0
    assert capsys.readouterr().out == f"{good}: ok (t, balance)\n"

    assert _cli_exit(["check-policy", str(good), str(bad)], monkeypatch) == 1
    captured = capsys.readouterr()
    assert captured.out == f"{good}: ok (t, balance)\n"
    assert f"{bad}:{line_of(bad_text, 'max_cpu_util')}: spec.limits.max_cpu_util:" in (captured.err)
    assert f"{bad}:{line_of(bad_text, 'glpk')}: spec.solver.backend:" in captured.err

    assert _cli_exit(["check-policy", str(tmp_path / "none.yaml")], monkeypatch) == 1


# ------------------------------------------------------ every accepted value runs


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        (
            "migration: {downtime_steps_ms: [1000, 100000000000000000000000000]}",
            "spec.migration.downtime_steps_ms[1]",
            "must be an integer in [1, 2000000] (QEMU's maximum), got an integer of 27 digits",
        ),
        (
            "migration: {max_downtime_ms: 18446744073709551616}",
            "spec.migration.max_downtime_ms",
            "must be an integer in [1, 2000000] (QEMU's maximum), got 18446744073709551616",
        ),
        (
            "migration: {bandwidth_mib_s: 9.0e+12}",
            "spec.migration.bandwidth_mib_s",
            "must be a number in (0, 8796093022207] (libvirt's maximum), got 9000000000000.0",
        ),
        (
            "migration: {max_time_s: 1.0e+12}",
            "spec.migration.max_time_s",
            "must be a number in (0, 86400] (at most 1 day)",
        ),
        (
            "hysteresis: {cooldown_s: 1.0e+12}",
            "spec.hysteresis.cooldown_s",
            "must be a number in [0, 31536000] (at most 1 year)",
        ),
        (
            "power: {grace_period_s: 1.0e+300, min_off_s: .inf}",
            "spec.power.grace_period_s",
            "(at most 1 year)",
        ),
        (
            "solver: {time_limit_s: 1.0e+400}",
            "spec.solver.time_limit_s",
            "must be a number in (0, 3600] (at most 1 hour), got inf",
        ),
        (
            "limits: {mem_headroom_mib: 1.0e+300}",
            "spec.limits.mem_headroom_mib",
            "must be a number in [0, 4294967296], got 1e+300",
        ),
        (
            "budget: {max_gib: 0x7fffffffffffffffffff}",
            "spec.budget.max_gib",
            "must be a number in [0, 4294967296], got an integer of 24 digits",
        ),
        (
            "forecast: {window_s: 31536000}",
            "spec.forecast.window_s",
            "must be a number in (0, 86400] (at most 1 day)",
        ),
    ],
    ids=lambda v: v.split("{")[0].strip(": ") if "{" in v else None,
)
def test_values_that_cannot_run_are_refused(spec: str, path: str, message: str) -> None:
    """Was: accepted, then an overflow in libvirt / QEMU / timedelta / float at run time
    (downtime steps past 2**64, a 1e12 s migration cap, an OverflowError for 0x... * GiB)."""
    text = doc(f"objective: balance\n{spec}")
    found = problems(text)
    prefix = f"{SRC}:{line_of(text, spec.split(':')[0])}: {path}: "
    assert any(p.startswith(prefix) and message in p for p in found), "\n".join(found)


def test_every_number_has_an_upper_bound() -> None:
    """A Number without one cannot even be declared: the tables cannot grow one."""
    with pytest.raises(TypeError, match="upper bound"):
        Number(ge=0)


def test_negative_zero_is_zero() -> None:
    policy = load_policy_text(doc("objective: balance\nhysteresis: {cooldown_s: -0.0}"), SRC)
    assert math.copysign(1.0, policy.hysteresis.cooldown_s) == 1.0


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ("mode: '" + "x" * 10_000 + "'", "got '" + "x" * 40 + "... (10000 characters)'"),
        ('mode: "\\e[2J\\e[31mok"', "got '\\x1b[2J\\x1b[31mok'"),
        ('constraints: {exclude_vms: ["vm\\x01"]}', "got 'vm\\x01'"),
    ],
    ids=["long", "terminal_escapes", "control"],
)
def test_messages_show_a_token_short_and_escaped(spec: str, shown: str) -> None:
    """Was: the whole value, control characters included, in the message."""
    found = problems(doc(f"objective: balance\n{spec}"))
    assert len(found) == 1 and shown in found[0], found
    assert len(found[0]) < 250 and found[0].isprintable()


def test_free_text_may_span_lines_but_names_may_not_hold_controls() -> None:
    text = HEAD.replace("  name: t\n", "  name: t\n  description: |\n    two\n    lines\n")
    assert load_policy_text(text + "spec: {objective: balance}\n", SRC).name == "t"
    found = problems(doc('objective: balance\nconstraints: {pin: {"vm\\n1": [h1]}}'))
    assert any("spec.constraints.pin.vm\\n1:" in p for p in found), found


def test_constraint_rules_stay_linear() -> None:
    """Was: quadratic (3 s here; a 10,000-VM anti-affinity group: half a minute)."""
    n = 3600  # within MAX_NODES
    names = [f"vm-{i}" for i in range(n)]
    chain = ", ".join(f"[{a}, {b}]" for a, b in itertools.pairwise(names[: n // 2]))
    spec = (
        "objective: balance\nconstraints:\n"
        f"  anti_affinity: [[{', '.join(reversed(names))}]]\n"
        f"  affinity: [{chain}]\n"
        f"  exclude_vms: [{', '.join(names[: n // 2])}]\n"
        f"  pin: {{{', '.join(f'{v}: [h1]' for v in names[n // 2 - 3 : n // 2])}}}\n"
    )
    started = time.thread_time()
    found = problems(doc(spec))
    assert time.thread_time() - started < 1.0
    assert found[0] == (
        f"{SRC}:8: spec.constraints.anti_affinity[0]: 'vm-1799' and 'vm-1798' must share a "
        "host (affinity) and must not (anti_affinity)"
    )
    assert [p.split(": ")[1] for p in found[1:]] == [
        f"spec.constraints.exclude_vms[{i}]" for i in (1797, 1798, 1799)
    ]


def test_must_and_must_not_pairs_are_bounded() -> None:
    vms = ", ".join(f"v{i}" for i in range(700))
    hosts = ", ".join(f"h{i}" for i in range(700))
    rule = f"{{kind: must, vms: [{vms}], hosts: [{hosts}]}}"
    spec = f"objective: balance\nconstraints:\n  host_rules:\n    - {rule}\n"
    started = time.thread_time()
    found = problems(doc(spec))
    assert time.thread_time() - started < 1.0
    assert found == [
        f"{SRC}:8: spec.constraints.host_rules: must / must_not rules name 490000 VM-host "
        "pairs, more than 200000: use exclude_hosts, pin or fewer, larger host groups"
    ]


# ------------------------------------------------------ check-policy on hostile files


@pytest.mark.parametrize(
    "content",
    [
        b"\x01",
        b"[" * 10_000,
        b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        + b"".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n".encode()
            for p, c in zip("bcdefgh", "cdefghi", strict=True)
        ),
        b"spec: {objective: \xff}",
        b"apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: x}\n"
        b"spec: {objective: balance, budget: {max_moves: " + b"9" * 5000 + b"}}",
        b"",
        b"S3cret-Hunter2\n",
    ],
    ids=["control", "deep", "laughs", "not_utf8", "huge_int", "empty", "password"],
)
def test_check_policy_reports_hostile_files_in_one_line_each(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
) -> None:
    """Exit 1 (as documented for check-policy), one FILE:LINE line per problem, no
    traceback, nothing of a password file."""
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    assert _cli_exit(["check-policy", str(path)], monkeypatch) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines and all(line.startswith(f"{path}:") for line in lines), lines
    assert "Traceback" not in captured.err and "S3cret" not in captured.err


def test_a_document_with_every_key_misspelled_still_gets_suggestions() -> None:
    found = problems("apiversion: balancerd/v1\nKind: Policy\nmetdata: {name: t}\nspek: {}\n")
    assert f"{SRC}:1: apiversion: unknown key (did you mean 'apiVersion'?)" in found


def test_a_foreign_document_is_not_shown() -> None:
    found = problems("S3cret: hunter2\n")
    assert found == [
        f"{SRC}:1: (document): not the expected document: none of its keys is one of "
        "apiVersion, kind, metadata, spec (keys not shown)"
    ]
