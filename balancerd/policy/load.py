"""Policy documents: YAML -> validated ``Policy``, and JSON Schema generated from one table.

The table ``DOCUMENT`` below is the one description of a policy file: its keys, types,
ranges, defaults (read from the dataclasses in ``policy/model.py``), unit conversions
and the help text. Validation walks it; ``schema.json`` is generated from it with

    python -m balancerd.policy.load --write-schema

Every problem is collected before anything is raised, each as
``FILE:LINE: field.path: message``; rules that span fields (a VM both pinned and
excluded, ...) are checked after the per-field pass, in ``_cross_check``.

The small type vocabulary (``Number``, ``Text``, ``Flag``, ``ListOf``, ``MapOf``,
``Obj``, ``Field``) is shared with the daemon config loader in ``balancerd/config.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancerd.errors import PolicyError
from balancerd.policy.model import (
    Budget,
    Constraints,
    DemandForecast,
    HostRule,
    Hysteresis,
    Limits,
    Migration,
    Policy,
    Power,
    PowerModel,
    Resources,
    Solver,
)
from balancerd.yamlpos import (
    Document,
    FieldPath,
    YamlError,
    format_path,
    key_part,
    load_file,
    load_text,
)

API_VERSION = "balancerd/v1"
KIND = "Policy"
MIB = 1024**2
GIB = 1024**3
SCHEMA_PATH = Path(__file__).with_name("schema.json")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# --------------------------------------------------------------------------------------
# The type vocabulary


class _Invalid:
    """Marks a value that failed validation (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()


class Problems:
    """Collects ``FILE:LINE: field.path: message`` lines against one document."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self._found: list[tuple[int, int, str]] = []  # (line, order found, text)

    def add(self, path: FieldPath, message: str) -> None:
        self._found.append((self.doc.line(path), len(self._found), self.doc.problem(path, message)))

    @property
    def lines(self) -> list[str]:
        """The problems in file order (ties in the order found)."""
        return [text for _, _, text in sorted(self._found)]

    def raw(self, path: FieldPath) -> object:
        """The value written at ``path`` (``None`` if absent)."""
        value: object = self.doc.data
        for part in path:
            if isinstance(part, int) and isinstance(value, list) and part < len(value):
                value = value[part]
            elif isinstance(part, str) and isinstance(value, dict):
                value = _get_key(value, part)
            else:
                return None
        return value

    def has(self, path: FieldPath) -> bool:
        """True if ``path`` is written in the file."""
        return path in self.doc.lines

    def item_path(self, path: FieldPath, item: object) -> FieldPath:
        """Path of ``item`` in the list at ``path`` (of the list if not found)."""
        written = self.raw(path)
        if isinstance(written, list):
            for index, candidate in enumerate(written):
                if candidate == item:
                    return (*path, index)
        return path


def _get_key(mapping: dict[Any, Any], key: str) -> object:
    if key in mapping:
        return mapping[key]
    for k, v in mapping.items():  # keys that were not strings are addressed by str()
        if str(k) == key:
            return v
    return None


def describe(value: object) -> str:
    """How a written value is shown in a message."""
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return f"'{value}'" if value else "'' (an empty string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!s}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


class Kind:
    """One kind of value: checks and converts it, and describes it as JSON Schema."""

    def expect(self) -> str:
        raise NotImplementedError

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def fail(self, value: object, path: FieldPath, out: Problems) -> Any:
        hint = ""
        if isinstance(value, bool) and isinstance(self, Text):
            hint = " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
        out.add(path, f"must be {self.expect()}, got {describe(value)}{hint}")
        return INVALID


@dataclass(frozen=True)
class Number(Kind):
    integer: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def expect(self) -> str:
        noun = "an integer" if self.integer else "a number"
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            return f"{noun} in {left}{_num(low)}, {_num(high)}{right}"
        if low is not None:
            return f"{noun} {'>=' if self.ge is not None else '>'} {_num(low)}"
        if high is not None:
            return f"{noun} {'<=' if self.le is not None else '<'} {_num(high)}"
        return noun

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.fail(value, path, out)
        if self.integer and not isinstance(value, int):
            return self.fail(value, path, out)
        if not math.isfinite(value):
            return self.fail(value, path, out)
        if (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        ):
            return self.fail(value, path, out)
        return int(value) if self.integer else float(value)

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        for key, bound in (
            ("exclusiveMinimum", self.gt),
            ("minimum", self.ge),
            ("exclusiveMaximum", self.lt),
            ("maximum", self.le),
        ):
            if bound is not None:
                s[key] = int(bound) if float(bound).is_integer() else bound
        return s


@dataclass(frozen=True)
class Text(Kind):
    enum: tuple[str, ...] = ()
    const: str | None = None
    pattern: str | None = None  # full match
    pattern_doc: str = ""  # says what the pattern means, for messages

    def expect(self) -> str:
        if self.const is not None:
            return f"'{self.const}'"
        if self.enum:
            return "one of " + " | ".join(self.enum)
        if self.pattern is not None:
            return self.pattern_doc or f"a string matching {self.pattern}"
        return "a non-empty string"

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if not isinstance(value, str) or not value:
            return self.fail(value, path, out)
        if self.const is not None and value != self.const:
            return self.fail(value, path, out)
        if self.enum and value not in self.enum:
            return self.fail(value, path, out)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return self.fail(value, path, out)
        return value

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string"}
        if self.const is not None:
            s["const"] = self.const
        elif self.enum:
            s["enum"] = list(self.enum)
        else:
            s["minLength"] = 1
        if self.pattern is not None:
            s["pattern"] = f"^(?:{self.pattern})$"
        return s


@dataclass(frozen=True)
class Flag(Kind):
    def expect(self) -> str:
        return "true or false"

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if not isinstance(value, bool):
            return self.fail(value, path, out)
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class ListOf(Kind):
    item: Kind
    min_items: int = 0
    unique: bool = False

    def expect(self) -> str:
        return "a list" if self.min_items == 0 else f"a list of at least {self.min_items} item(s)"

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if not isinstance(value, list):
            return self.fail(value, path, out)
        if len(value) < self.min_items:
            out.add(path, f"must have at least {self.min_items} item(s), got {len(value)}")
        items: list[Any] = []
        first_index: dict[Any, int] = {}
        for index, raw in enumerate(value):
            built = self.item.check(raw, (*path, index), out)
            if built is INVALID:
                continue
            if self.unique:
                key = _freeze(built)
                if key in first_index:
                    out.add(
                        (*path, index),
                        f"{describe(raw)} is listed twice (also at index {first_index[key]})",
                    )
                    continue
                first_index[key] = index
            items.append(built)
        return tuple(items)

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            s["minItems"] = self.min_items
        if self.unique:
            s["uniqueItems"] = True
        return s


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


@dataclass(frozen=True)
class MapOf(Kind):
    """A mapping from names (VMs, hosts) the operator chooses to values of one kind."""

    value: Kind
    key_doc: str = "name"

    def expect(self) -> str:
        return f"a mapping of {self.key_doc} to values"

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if not isinstance(value, dict):
            return self.fail(value, path, out)
        built: dict[str, Any] = {}
        for key, raw in value.items():
            key_path = (*path, key_part(key))
            if not isinstance(key, str) or not key:
                hint = " (quote it)" if not isinstance(key, str) else ""
                out.add(key_path, f"{self.key_doc} must be a string, got {describe(key)}{hint}")
                continue
            item = self.value.check(raw, key_path, out)
            if item is not INVALID:
                built[key] = item
        return built

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "propertyNames": {"minLength": 1},
            "additionalProperties": self.value.schema(),
        }


@dataclass(frozen=True)
class Field:
    """One key of an ``Obj``: its kind, help text and where it lands in the dataclass."""

    kind: Kind
    doc: str
    attr: str | None = None  # dataclass attribute; default: the key
    required: bool = False
    scale: float | None = None  # multiply the written value (unit conversion)
    as_int: bool = False  # after scaling, round to an int (bytes)
    inline: bool = False  # an Obj whose attributes land in the enclosing dataclass


@dataclass(frozen=True)
class Obj(Kind):
    """A mapping with fixed keys; builds ``cls(**attrs)`` (or a dict of attrs if no cls)."""

    fields: Mapping[str, Field]
    cls: Callable[..., Any] | None = None
    defaults: type | None = None  # dataclass holding the defaults; default: cls

    def expect(self) -> str:
        return "a mapping"

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if not isinstance(value, dict):
            return self.fail(value, path, out)
        attrs: dict[str, Any] = {}
        ok = True
        for key, raw in value.items():
            name = key_part(key)
            spec = self.fields.get(name) if isinstance(key, str) else None
            if spec is None:
                out.add((*path, name), self._unknown(name, path))
                continue
            built = spec.kind.check(raw, (*path, name), out)
            if built is INVALID:
                ok = ok and not spec.required
                continue
            if spec.inline:
                attrs.update(built)
                continue
            attrs[spec.attr or name] = _scaled(spec, built)
        for name, spec in self.fields.items():
            if spec.required and name not in value:
                out.add((*path, name), f"missing required key ({spec.doc}: {spec.kind.expect()})")
                ok = False
        if not ok:
            return INVALID
        if self.cls is None:
            return attrs
        try:
            return self.cls(**attrs)
        except TypeError:  # an attribute without default that only a cross-check demands
            return INVALID

    def _unknown(self, key: str, path: FieldPath) -> str:
        names = list(self.fields)
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        if not close:
            close = [n for n in names if n.lower() == key.lower()]
        if close:
            return f"unknown key (did you mean '{close[0]}'?)"
        home = self._find_nested(key, path)
        if home:
            return f"unknown key (it belongs under {home})"
        return "unknown key; allowed: " + ", ".join(names)

    def _find_nested(self, key: str, path: FieldPath) -> str:
        for name, spec in self.fields.items():
            if isinstance(spec.kind, Obj) and key in spec.kind.fields:
                return format_path((*path, name))
        return ""

    def schema(self) -> dict[str, Any]:
        defaults = self.defaults or (self.cls if isinstance(self.cls, type) else None)
        props: dict[str, Any] = {}
        for name, spec in self.fields.items():
            s: dict[str, Any] = {"description": spec.doc, **spec.kind.schema()}
            default = _default_of(defaults, spec)
            if default is not _NO_DEFAULT and not spec.required:
                s["default"] = default
            props[name] = s
        out: dict[str, Any] = {"type": "object", "properties": props}
        required = [name for name, spec in self.fields.items() if spec.required]
        if required:
            out["required"] = required
        out["additionalProperties"] = False
        return out


def _scaled(spec: Field, value: Any) -> Any:
    """Unit conversion (MiB -> bytes, hours -> seconds) of a validated value."""
    if spec.scale is None:
        return value
    scaled = value * spec.scale
    return round(scaled) if spec.as_int else float(scaled)


_NO_DEFAULT = object()


def _default_of(cls: type | None, spec: Field) -> Any:
    """The dataclass default of ``spec``'s attribute, in the units the file uses."""
    if cls is None or spec.inline or isinstance(spec.kind, Obj):
        return _NO_DEFAULT
    attr = spec.attr
    for f in dataclasses.fields(cls):
        if f.name != attr:
            continue
        if f.default is not dataclasses.MISSING:
            value: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return _NO_DEFAULT
        if spec.scale is not None:
            value = value / spec.scale
            if float(value).is_integer():
                value = int(value)
        return _jsonable(value)
    return _NO_DEFAULT


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return _NO_DEFAULT
    return value


def fld(kind: Kind, doc: str, attr: str = "", **kw: Any) -> Field:
    """A field whose attribute is named like its key unless ``attr`` says otherwise."""
    return Field(kind=kind, doc=doc, attr=attr or None, **kw)


def _named(fields: Mapping[str, Field]) -> dict[str, Field]:
    """Fill in ``attr`` = key for fields that did not name one."""
    return {k: (v if v.attr else dataclasses.replace(v, attr=k)) for k, v in fields.items()}


def obj(
    fields: Mapping[str, Field], cls: Callable[..., Any] | None = None, defaults: type | None = None
) -> Obj:
    return Obj(fields=_named(fields), cls=cls, defaults=defaults)


# --------------------------------------------------------------------------------------
# The policy document


NAME = Text(pattern=r"[A-Za-z0-9][A-Za-z0-9_.:-]*", pattern_doc="a name (letters, digits, _.:-)")
NAMES = ListOf(NAME, unique=True)
FRACTION = Number(gt=0, le=1)
NON_NEGATIVE = Number(ge=0)
POSITIVE = Number(gt=0)
COUNT = Number(integer=True, ge=0)
POSITIVE_COUNT = Number(integer=True, ge=1)


def _power_model() -> Obj:
    return obj(
        {
            "idle_watts": fld(NON_NEGATIVE, "power drawn by a powered-on host with no load"),
            "max_watts": fld(NON_NEGATIVE, "power drawn at full CPU load"),
        },
        cls=PowerModel,
    )


def _weight(attr: str, what: str) -> Field:
    return fld(
        obj(
            {"weight": fld(NON_NEGATIVE, f"weight of {what} in the objective", attr)},
            defaults=Resources,
        ),
        f"{what} settings",
        inline=True,
    )


SPEC = obj(
    {
        "objective": fld(
            Text(enum=("balance", "power-save")),
            "balance: even out host utilization; power-save: pack guests on few hosts "
            "and power off the empty ones",
            required=True,
        ),
        "mode": fld(
            Text(enum=("automatic", "recommend")),
            "automatic: migrate; recommend: only compute and report the plan",
        ),
        "resources": fld(
            obj(
                {
                    "cpu": _weight("cpu_weight", "CPU"),
                    "memory": _weight("memory_weight", "memory"),
                },
                cls=Resources,
            ),
            "how much each resource counts when balancing",
        ),
        "limits": fld(
            obj(
                {
                    "max_cpu_util": fld(FRACTION, "a host's CPU demand / capacity stays <= this"),
                    "max_mem_util": fld(FRACTION, "a host's guest memory / memory stays <= this"),
                    "mem_headroom_mib": fld(
                        NON_NEGATIVE,
                        "MiB kept free on each host for the host itself",
                        "mem_headroom_bytes",
                        scale=MIB,
                        as_int=True,
                    ),
                    "cpu_overcommit": fld(POSITIVE, "allowed guest vCPUs per host CPU"),
                },
                cls=Limits,
            ),
            "capacity limits no placement may break",
        ),
        "hysteresis": fld(
            obj(
                {
                    "min_improvement": fld(
                        NON_NEGATIVE, "act only if the objective improves by at least this"
                    ),
                    "cooldown_s": fld(NON_NEGATIVE, "seconds a moved guest is left alone"),
                },
                cls=Hysteresis,
            ),
            "against moving guests back and forth",
        ),
        "forecast": fld(
            obj(
                {
                    "quantile": fld(
                        FRACTION, "plan each guest's CPU at this quantile of its readings"
                    ),
                    "window_s": fld(POSITIVE, "seconds of readings the quantile looks back on"),
                },
                cls=DemandForecast,
            ),
            "planning demand from each guest's recent CPU readings",
        ),
        "budget": fld(
            obj(
                {
                    "max_moves": fld(COUNT, "migrations per cycle at most"),
                    "max_gib": fld(
                        NON_NEGATIVE,
                        "GiB of guest memory moved per cycle at most",
                        "max_bytes",
                        scale=GIB,
                        as_int=True,
                    ),
                },
                cls=Budget,
            ),
            "how much one cycle may move",
        ),
        "constraints": fld(
            obj(
                {
                    "pin": fld(
                        MapOf(ListOf(NAME, min_items=1, unique=True), key_doc="VM name"),
                        "VM -> the only hosts it may run on",
                    ),
                    "exclude_vms": fld(NAMES, "VMs never moved (still counted on their host)"),
                    "exclude_hosts": fld(NAMES, "hosts neither source nor target of moves"),
                    "affinity": fld(
                        ListOf(ListOf(NAME, min_items=2, unique=True)),
                        "groups of VMs that must share one host",
                    ),
                    "anti_affinity": fld(
                        ListOf(ListOf(NAME, min_items=2, unique=True)),
                        "groups of VMs that must run on distinct hosts",
                    ),
                    "host_rules": fld(
                        ListOf(
                            obj(
                                {
                                    "vms": fld(
                                        ListOf(NAME, min_items=1, unique=True),
                                        "VMs the rule applies to",
                                        required=True,
                                    ),
                                    "hosts": fld(
                                        ListOf(NAME, min_items=1, unique=True),
                                        "hosts the rule names",
                                        required=True,
                                    ),
                                    "kind": fld(
                                        Text(enum=("must", "must_not", "should", "should_not")),
                                        "must / must_not are hard; should / should_not cost "
                                        "weight per guest that breaks them",
                                        required=True,
                                    ),
                                    "weight": fld(
                                        NON_NEGATIVE,
                                        "cost per guest breaking a should / should_not rule",
                                    ),
                                },
                                cls=HostRule,
                            )
                        ),
                        "VMs that must / should (not) run on some hosts",
                    ),
                    "maintenance": fld(NAMES, "hosts to drain completely"),
                },
                cls=Constraints,
            ),
            "placement rules",
        ),
        "power": fld(
            obj(
                {
                    "min_active_hosts": fld(COUNT, "never power off below this many hosts"),
                    "reserve_hosts": fld(COUNT, "hosts kept on and empty beyond what is needed"),
                    "grace_period_s": fld(NON_NEGATIVE, "seconds empty before power-off"),
                    "min_off_s": fld(NON_NEGATIVE, "seconds a host stays off at least"),
                    "default_model": fld(_power_model(), "watts of hosts not in host_models"),
                    "host_models": fld(
                        MapOf(_power_model(), key_doc="host name"), "host -> its watts"
                    ),
                },
                cls=Power,
            ),
            "host power management (objective power-save)",
        ),
        "migration": fld(
            obj(
                {
                    "bandwidth_mib_s": fld(POSITIVE, "migration bandwidth cap, MiB/s"),
                    "max_downtime_ms": fld(
                        Number(integer=True, ge=1), "allowed guest pause at switch-over, ms"
                    ),
                    "max_concurrent": fld(POSITIVE_COUNT, "migrations at once, cluster-wide"),
                    "max_concurrent_per_host": fld(
                        POSITIVE_COUNT, "migrations at once into or out of one host"
                    ),
                    "on_stall": fld(
                        Text(enum=("pause", "abort")),
                        "last step when a migration stops converging: pause the guest to "
                        "finish, or abort and leave it where it was",
                    ),
                    "downtime_steps_ms": fld(
                        ListOf(Number(integer=True, ge=1), unique=True),
                        "downtimes allowed in turn while a migration stalls, ms, increasing",
                    ),
                    "auto_converge": fld(Flag(), "throttle the guest's CPUs when stalling"),
                    "stall_samples": fld(
                        Number(integer=True, ge=2),
                        "1 s samples without progress that make a stall",
                    ),
                    "max_time_s": fld(POSITIVE, "hard cap on one migration, seconds"),
                    "allow_cold": fld(Flag(), "cold-migrate when a live migration fails"),
                    "allow_backward": fld(
                        Flag(), "allow destinations with older libvirt/QEMU than the source"
                    ),
                    "copy_storage_vms": fld(NAMES, "VMs whose disks may be copied"),
                    "unsafe_cache_vms": fld(NAMES, "VMs accepting disks with cache != none"),
                    "no_pause_vms": fld(NAMES, "VMs never paused: a stall aborts them"),
                },
                cls=Migration,
            ),
            "how moves are performed",
        ),
        "solver": fld(
            obj(
                {
                    "backend": fld(Text(enum=("cbc", "highs")), "MILP solver"),
                    "time_limit_s": fld(POSITIVE, "seconds the solver may run"),
                    "gap": fld(Number(ge=0, lt=1), "relative gap at which the solver may stop"),
                    "migration_cost": fld(NON_NEGATIVE, "objective units per GiB moved"),
                },
                cls=Solver,
            ),
            "the placement optimizer",
        ),
    },
    defaults=Policy,
)

DOCUMENT = obj(
    {
        "apiVersion": fld(Text(const=API_VERSION), "document format version", required=True),
        "kind": fld(Text(const=KIND), "document kind", required=True),
        "metadata": fld(
            obj(
                {
                    "name": fld(NAME, "policy name (shown in logs and metrics)", required=True),
                    "description": fld(Text(), "free text for operators"),
                }
            ),
            "policy identity",
            required=True,
        ),
        "spec": fld(SPEC, "the policy", required=True),
    }
)


# --------------------------------------------------------------------------------------
# Loading


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate a policy file; raises ``PolicyError`` with every problem."""
    try:
        doc = load_file(path)
    except YamlError as exc:
        raise PolicyError(exc.problems) from exc
    return _validate(doc)


def load_policy_text(text: str, source: str) -> Policy:
    """Like ``load_policy`` for text already read; ``source`` names it in messages."""
    try:
        doc = load_text(text, source)
    except YamlError as exc:
        raise PolicyError(exc.problems) from exc
    return _validate(doc)


def _validate(doc: Document) -> Policy:
    out = Problems(doc)
    if doc.data is None:
        raise PolicyError([f"{doc.source}:1: the file is empty (expected a Policy document)"])
    built = DOCUMENT.check(doc.data, (), out)
    policy: Policy | None
    if built is not INVALID:
        spec: dict[str, Any] = built["spec"]
        policy = Policy(name=built["metadata"]["name"], source=doc.source, **spec)
    else:
        # Cross-field rules still run on what did validate, so one pass reports everything.
        policy = _partial_policy(doc)
    if policy is not None:
        _cross_check(policy, out)
    if out.lines or policy is None:
        raise PolicyError(out.lines)
    return policy


def _partial_policy(doc: Document) -> Policy | None:
    """The spec built from its valid parts only (problems go to a scratch list)."""
    if not isinstance(doc.data, dict) or not isinstance(doc.data.get("spec"), dict):
        return None
    scratch = Problems(doc)
    spec = dict(doc.data["spec"])
    spec.setdefault("objective", "balance")
    attrs = _lenient(SPEC, spec, ("spec",), scratch)
    return Policy(name="-", source=doc.source, **attrs)


def _lenient(kind: Obj, value: dict[Any, Any], path: FieldPath, out: Problems) -> dict[str, Any]:
    """Build the attrs of ``kind`` from ``value``, leaving out whatever does not validate."""
    attrs: dict[str, Any] = {}
    for key, raw in value.items():
        spec = kind.fields.get(key) if isinstance(key, str) else None
        if spec is None:
            continue
        if isinstance(spec.kind, Obj) and isinstance(raw, dict) and spec.kind.cls is not None:
            inner = _lenient(spec.kind, raw, (*path, key), out)
            with contextlib.suppress(TypeError):  # a required field did not validate
                attrs[spec.attr or key] = spec.kind.cls(**inner)
            continue
        built = spec.kind.check(raw, (*path, key), out)
        if built is INVALID:
            continue
        if spec.inline:
            attrs.update(built)
        else:
            attrs[spec.attr or key] = _scaled(spec, built)
    return attrs


C = ("spec", "constraints")


def _cross_check(policy: Policy, out: Problems) -> None:
    """Rules that involve more than one field."""
    res = policy.resources
    if res.cpu_weight == 0 and res.memory_weight == 0:
        out.add(("spec", "resources"), "at least one of cpu.weight, memory.weight must be > 0")
    _check_constraints(policy.constraints, out)
    _check_power(policy, out)
    _check_migration(policy, out)


def _check_constraints(c: Constraints, out: Problems) -> None:
    maintenance = set(c.maintenance)
    for vm in c.exclude_vms:
        if vm in c.pin:
            out.add(
                out.item_path((*C, "exclude_vms"), vm),
                f"'{vm}' is also pinned (line {out.doc.line((*C, 'pin', vm))}); an excluded "
                "VM is never moved, so remove it from exclude_vms or from pin",
            )
    for vm, hosts in c.pin.items():
        if hosts and all(h in maintenance for h in hosts):
            out.add(
                (*C, "pin", vm),
                f"pinned only to host(s) in maintenance ({', '.join(hosts)}): "
                "it would have nowhere to run",
            )
    for host in c.maintenance:
        if host in c.exclude_hosts:
            out.add(
                out.item_path((*C, "maintenance"), host),
                f"'{host}' is also in exclude_hosts: a host in maintenance is drained, an "
                "excluded host is never touched",
            )
    # Affinity groups sharing a VM form one group (union-find over VM names).
    parent: dict[str, str] = {}

    def root(vm: str) -> str:
        while parent.get(vm, vm) != vm:
            vm = parent[vm]
        return vm

    for group in c.affinity:
        for vm in group[1:]:
            a, b = root(group[0]), root(vm)
            if a != b:
                parent[b] = a
    for index, group in enumerate(c.anti_affinity):
        clash = _first_pair(group, lambda a, b: root(a) == root(b))
        if clash is not None:
            a, b = clash
            out.add(
                (*C, "anti_affinity", index),
                f"'{a}' and '{b}' must share a host (affinity) and must not (anti_affinity)",
            )
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for index, rule in enumerate(c.host_rules):
        path = (*C, "host_rules", index)
        if rule.kind in ("must", "must_not") and out.has((*path, "weight")):
            out.add((*path, "weight"), "weight only applies to kind should / should_not")
        if rule.kind == "must" and all(h in maintenance for h in rule.hosts):
            out.add(
                (*path, "hosts"),
                "all these hosts are in maintenance: the VMs would have nowhere to run",
            )
        if rule.kind not in ("must", "must_not"):
            continue
        for vm in rule.vms:
            for host in rule.hosts:
                other = seen.get((vm, host))
                if other is not None and other[0] != rule.kind:
                    out.add(
                        path,
                        f"'{vm}' on '{host}' is both {other[0]} (host_rules[{other[1]}]) "
                        f"and {rule.kind}",
                    )
                seen.setdefault((vm, host), (rule.kind, index))


def _first_pair(items: Sequence[str], match: Callable[[str, str], bool]) -> tuple[str, str] | None:
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            if match(a, b):
                return a, b
    return None


def _check_power(policy: Policy, out: Problems) -> None:
    models: list[tuple[FieldPath, PowerModel]] = [
        (("spec", "power", "default_model"), policy.power.default_model)
    ]
    models += [
        (("spec", "power", "host_models", host), model)
        for host, model in policy.power.host_models.items()
    ]
    for path, model in models:
        if model.idle_watts > model.max_watts:
            out.add(
                (*path, "idle_watts"),
                f"idle_watts {_num(model.idle_watts)} is above max_watts {_num(model.max_watts)}",
            )


def _check_migration(policy: Policy, out: Problems) -> None:
    m = policy.migration
    path = ("spec", "migration")
    if m.max_concurrent_per_host > m.max_concurrent:
        out.add(
            (*path, "max_concurrent_per_host"),
            f"{m.max_concurrent_per_host} is above max_concurrent {m.max_concurrent}",
        )
    steps = m.downtime_steps_ms
    if any(b <= a for a, b in itertools.pairwise(steps)):
        out.add((*path, "downtime_steps_ms"), f"must increase, got {list(steps)}")
    if steps and steps[0] <= m.max_downtime_ms:
        where = "downtime_steps_ms" if out.has((*path, "downtime_steps_ms")) else "max_downtime_ms"
        out.add(
            (*path, where),
            f"the first downtime step ({steps[0]} ms) must be above max_downtime_ms "
            f"({m.max_downtime_ms} ms): the steps raise the allowed downtime",
        )


# --------------------------------------------------------------------------------------
# JSON Schema


def json_schema() -> dict[str, Any]:
    """The policy document as JSON Schema (draft 2020-12), from the same table."""
    body = DOCUMENT.schema()
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": f"balancerd {KIND} ({API_VERSION})",
        "description": (
            "Generated by `python -m balancerd.policy.load --write-schema`; do not edit. "
            "Rules spanning several fields are checked by `balancerd check-policy`."
        ),
        **body,
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m balancerd.policy.load", description="policy JSON Schema"
    )
    parser.add_argument("--write-schema", action="store_true", help=f"write {SCHEMA_PATH}")
    parser.add_argument("--check-schema", action="store_true", help="exit 1 if it is stale")
    args = parser.parse_args(argv)
    text = schema_text()
    if args.write_schema:
        SCHEMA_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
        return 0
    if args.check_schema:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run python -m balancerd.policy.load --write-schema")
            return 1
        print(f"{SCHEMA_PATH}: up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
