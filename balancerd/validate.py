"""The value vocabulary shared by policy documents (``balancerd/policy``) and the daemon
config (``balancerd/config.py``): kinds of values, the fields of a mapping, and the one way
problems are reported.

A document is described by a table of ``Obj`` / ``Field`` values built with ``obj`` and
``fld``; ``Kind.check`` validates and converts a written value, recording every problem in
``Problems`` as ``FILE:LINE: field.path: message`` (nothing is raised here), and
``Kind.schema`` describes the same table as JSON Schema.

Kinds: ``Number`` (integer or real, with bounds), ``Text`` (non-empty string, const,
enum or pattern), ``Choice`` (a ``StrEnum``'s values, built as its members), ``Flag``,
``ListOf``, ``MapOf`` and ``Obj``. A ``Field`` may convert units (``scale``: MiB -> bytes,
hours -> seconds) and take its default from a dataclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from balancerd.yamlpos import MAX_PROBLEMS, Document, FieldPath, format_path, key_part, show

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Invalid:
    """Marks a value that failed validation (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()


class Problems:
    """Collects ``FILE:LINE: field.path: message`` lines against one document (at most
    ``MAX_PROBLEMS``; the rest are counted in a last line)."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self._found: list[tuple[int, int, str]] = []  # (line, order found, text)
        self._dropped = 0
        self._index: dict[FieldPath, dict[object, int]] = {}  # item_path's lookups

    @property
    def full(self) -> bool:
        """No more problems are kept: callers may skip working out a message."""
        return len(self._found) >= MAX_PROBLEMS

    def add(self, path: FieldPath, message: str) -> None:
        if self.full:
            self._dropped += 1
            return
        self._found.append((self.doc.line(path), len(self._found), self.doc.problem(path, message)))

    @property
    def lines(self) -> list[str]:
        """The problems in file order (ties in the order found)."""
        out = [text for _, _, text in sorted(self._found)]
        if self._dropped:
            last = max(line for line, _, _ in self._found)
            out.append(
                f"{self.doc.source}:{last}: (document): {self._dropped} more problem(s) "
                f"not shown (only the first {MAX_PROBLEMS} are)"
            )
        return out

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
        index = self._index.get(path)
        if index is None:  # built once per list: rules ask for many items of one list
            index = {}
            written = self.raw(path)
            for i, candidate in enumerate(written if isinstance(written, list) else []):
                if isinstance(candidate, str):
                    index.setdefault(candidate, i)
            self._index[path] = index
        found = index.get(item) if isinstance(item, str) else None
        return path if found is None else (*path, found)


def _get_key(mapping: dict[Any, Any], key: str) -> object:
    if key in mapping:
        return mapping[key]
    for k, v in mapping.items():  # keys that were not strings are addressed as in paths
        if key_part(k) == key:
            return v
    return None


def describe(value: object) -> str:
    """How a written value is shown in a message: the token, shortened and escaped."""
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return f"'{show(value)}'" if value else "'' (an empty string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {_KIND_NAMES.get(type(value), type(value).__name__)} value"


_KIND_NAMES = {bytes: "binary", set: "set", float: "number", int: "integer", str: "string"}


def describe_kind(value: object) -> str:
    """What kind of value it is, without showing it: for a whole file that is not the
    expected document (a password file named by mistake must not be printed)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number (not shown)"
    if isinstance(value, str):
        return "a string (not shown)"
    return describe(value) if isinstance(value, list | dict) or value is None else "a value"


def format_number(x: float) -> str:
    """``3`` for 3.0, ``0.5`` for 0.5: a number as an operator wrote it."""
    return str(int(x)) if float(x).is_integer() else repr(x)


class Kind:
    """One kind of value: checks and converts it, and describes it as JSON Schema."""

    def expect(self) -> str:
        raise NotImplementedError

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def fail(self, value: object, path: FieldPath, out: Problems, why: str = "") -> Any:
        hint = ""
        if isinstance(value, bool) and isinstance(self, Text | Choice):
            hint = " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
        got = describe(value) if path else describe_kind(value)  # a whole file: not shown
        out.add(path, f"must be {self.expect()}, got {got}{hint}{why}")
        return INVALID


@dataclass(frozen=True)
class Number(Kind):
    integer: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    high_doc: str = ""  # what the upper bound is, for messages: "1 day", "libvirt's maximum"

    def expect(self) -> str:
        noun = "an integer" if self.integer else "a number"
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            why = f" ({self.high_doc})" if self.high_doc else ""
            return f"{noun} in {left}{format_number(low)}, {format_number(high)}{right}{why}"
        if low is not None:
            return f"{noun} {'>=' if self.ge is not None else '>'} {format_number(low)}"
        if high is not None:
            return f"{noun} {'<=' if self.le is not None else '<'} {format_number(high)}"
        return noun

    def __post_init__(self) -> None:
        if self.le is None and self.lt is None:
            raise TypeError("a Number needs an upper bound (le or lt): every value must run")

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.fail(value, path, out)
        if self.integer and not isinstance(value, int):
            return self.fail(value, path, out)
        if isinstance(value, float) and not math.isfinite(value):
            return self.fail(value, path, out)
        if (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        ):
            return self.fail(value, path, out)
        return int(value) if self.integer else float(value) + 0.0  # -0.0 -> 0.0

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


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL, C1
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # ... except \t \n


@dataclass(frozen=True)
class Text(Kind):
    enum: tuple[str, ...] = ()
    const: str | None = None
    pattern: str | None = None  # full match
    pattern_doc: str = ""  # says what the pattern means, for messages
    max_len: int = 4096  # PATH_MAX
    multiline: bool = False  # free text: tabs and line breaks allowed

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
        if len(value) > self.max_len:
            return self.fail(value, path, out, f" (at most {self.max_len} characters)")
        control = (_CONTROL_BUT_LINES if self.multiline else _CONTROL).search(value)
        if control is not None:
            code = f"#x{ord(control.group()):02x}"
            return self.fail(value, path, out, f" (control character {code} not allowed)")
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
            s["maxLength"] = self.max_len
        if self.pattern is not None:
            s["pattern"] = f"^(?:{self.pattern})$"
        return s


@dataclass(frozen=True)
class Choice(Kind):
    """One of the values of a ``StrEnum``; builds the enum member (which compares equal to
    its string, so ``policy.objective == "power-save"`` holds for the member)."""

    enum: type[StrEnum]

    def expect(self) -> str:
        return "one of " + " | ".join(m.value for m in self.enum)

    def check(self, value: object, path: FieldPath, out: Problems) -> Any:
        if not isinstance(value, str) or not value:
            return self.fail(value, path, out)
        try:
            return self.enum(value)
        except ValueError:
            return self.fail(value, path, out)

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": [m.value for m in self.enum]}


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
    key: Text | None = None  # what a key must be (besides a non-empty string)

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
            if self.key is not None and self.key.check(key, key_path, _KeyProblems(out)) is INVALID:
                out.add(key_path, f"{self.key_doc} must be {self.key.expect()}")
                continue
            item = self.value.check(raw, key_path, out)
            if item is not INVALID:
                built[key] = item
        return built

    def schema(self) -> dict[str, Any]:
        names: dict[str, Any] = {"minLength": 1}
        if self.key is not None:
            names = {k: v for k, v in self.key.schema().items() if k != "type"}
        return {
            "type": "object",
            "propertyNames": names,
            "additionalProperties": self.value.schema(),
        }


class _KeyProblems(Problems):
    """Swallows the problem of a key's own check (the caller words it as a key's)."""

    def __init__(self, out: Problems) -> None:
        super().__init__(out.doc)

    def add(self, path: FieldPath, message: str) -> None:
        pass


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
        if not path and value and not any(self._near(k) for k in list(value)[:20]):
            # Not the document at all (a password file named by mistake?): no key is shown.
            out.add(
                (),
                "not the expected document: none of its keys is one of "
                + ", ".join(self.fields)
                + " (keys not shown)",
            )
            return INVALID
        attrs: dict[str, Any] = {}
        ok = True
        for key, raw in value.items():
            name = key_part(key)
            spec = self.fields.get(name) if isinstance(key, str) else None
            if spec is None:
                # (when no more problems are kept, only counted, skip finding a suggestion)
                out.add((*path, name), "unknown key" if out.full else self._unknown(name, path))
                continue
            built = spec.kind.check(raw, (*path, name), out)
            if built is INVALID:
                ok = ok and not spec.required
                continue
            if spec.inline:
                attrs.update(built)
                continue
            attrs[spec.attr or name] = scaled(spec, built)
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

    def _near(self, key: object) -> bool:
        """``key`` is one of the fields, or a misspelling of one."""
        if not isinstance(key, str):
            return False
        if key in self.fields or key.lower() in (n.lower() for n in self.fields):
            return True
        return bool(difflib.get_close_matches(key[:64], list(self.fields), n=1, cutoff=0.8))

    def _unknown(self, key: str, path: FieldPath) -> str:
        names = list(self.fields)
        close = difflib.get_close_matches(key[:64], names, n=1, cutoff=0.6)
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


def scaled(spec: Field, value: Any) -> Any:
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
    if isinstance(value, Enum):
        return value.value
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


def lenient(kind: Obj, value: dict[Any, Any], path: FieldPath, out: Problems) -> dict[str, Any]:
    """The attrs of ``kind`` built from ``value``, leaving out whatever does not validate
    (so rules spanning fields can still run on the parts that did)."""
    attrs: dict[str, Any] = {}
    for key, raw in value.items():
        spec = kind.fields.get(key) if isinstance(key, str) else None
        if spec is None:
            continue
        if isinstance(spec.kind, Obj) and isinstance(raw, dict) and spec.kind.cls is not None:
            inner = lenient(spec.kind, raw, (*path, key), out)
            with contextlib.suppress(TypeError):  # a required field did not validate
                attrs[spec.attr or key] = spec.kind.cls(**inner)
            continue
        built = spec.kind.check(raw, (*path, key), out)
        if built is INVALID:
            continue
        if spec.inline:
            attrs.update(built)
        else:
            attrs[spec.attr or key] = scaled(spec, built)
    return attrs


# --------------------------------------------------------------------------------------
# JSON Schema


def json_schema(kind: Kind, *, title: str, description: str) -> dict[str, Any]:
    """A whole document described by ``kind`` as JSON Schema (draft 2020-12)."""
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": title,
        "description": description,
        **kind.schema(),
    }


def json_text(schema: Mapping[str, Any]) -> str:
    """How a schema is written to a file (stable, so a stale file is a diff)."""
    return json.dumps(schema, indent=2) + "\n"


# --------------------------------------------------------------------------------------
# Kinds used by more than one document

MINUTE_S = 60
HOUR_S = 3600
DAY_S = 86400
YEAR_S = 365 * DAY_S  # no duration, interval or timeout of balancerd is longer

NAME = Text(
    pattern=r"[A-Za-z0-9][A-Za-z0-9_.:-]*",
    pattern_doc="a name (letters, digits, _.:-)",
    max_len=253,  # a DNS name; libvirt domain names are shorter in practice
)
NAMES = ListOf(NAME, unique=True)
FRACTION = Number(gt=0, le=1)


def duration_text(s: float) -> str:
    """``86400`` -> ``1 day``: an upper bound in words."""
    for size, unit in ((YEAR_S, "year"), (DAY_S, "day"), (HOUR_S, "hour"), (MINUTE_S, "minute")):
        if s >= size and s % size == 0:
            n = int(s // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{format_number(s)} s"


def seconds(high: float, *, zero: bool = False) -> Number:
    """A duration in seconds: > 0 (>= 0 with ``zero``) and at most ``high``."""
    doc = f"at most {duration_text(high)}" if high >= MINUTE_S else ""
    if zero:
        return Number(ge=0, le=high, high_doc=doc)
    return Number(gt=0, le=high, high_doc=doc)


def count(high: int, *, low: int = 0, doc: str = "") -> Number:
    """An integer in [low, high]."""
    return Number(integer=True, ge=low, le=high, high_doc=doc)


def amount(high: float, *, positive: bool = False, doc: str = "") -> Number:
    """A real >= 0 (> 0 with ``positive``) and at most ``high``."""
    if positive:
        return Number(gt=0, le=high, high_doc=doc)
    return Number(ge=0, le=high, high_doc=doc)
