#!/usr/bin/env python3
"""Fuzz the policy and config loaders and the daemon's reload validation with hypothesis.

    .venv/bin/python scripts/fuzz_loaders.py                 # 100,000 inputs
    .venv/bin/python scripts/fuzz_loaders.py --count 5000 --seed 1 --out /tmp/fuzz

Inputs, drawn by hypothesis:

- structured documents built from the loaders' own tables (``policy/spec.py``,
  ``config.CONFIG``): valid-looking, with some values replaced by hostile tokens (huge and
  special numbers, control bytes, huge strings, wrong types, tags, timestamps), nested
  aliases and merge keys ("billion laughs"), deep nesting; written as flow or block YAML;
- raw byte mutations (flips, insertions, deletions, duplications, splices, hostile
  tokens) of the shipped ``policies/*.yaml`` and of a sample config;
- the reload path: a config and its policies written to a folder and loaded with
  ``balancerd.daemon.reload.load_all``; what it accepts must also pass what the daemon
  does next (``config.cross_check_policies``, ``power.drivers_for``, the schedule).

A failure is any exception other than ``ConfigError``, a problem that is not one
``FILE:LINE: ...`` line, an input over ``--max-s`` CPU seconds (1) or over ``--max-mib``
MiB traced (200), or an accepted input that breaks the daemon's next steps. Each one is
saved under ``--out`` (the input, and what happened). Prints the count, the wall time, the
largest per-input time and memory, and the failures; exit status 1 if there were any.

Memory is traced with tracemalloc, which makes allocation ~3x slower: an input over the
time limit while traced is timed again untraced, and only that time counts.
"""

from __future__ import annotations

import argparse
import math
import re
import resource
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from balancerd.config import (  # noqa: E402
    CONFIG,
    DRIVER_NEEDS,
    cross_check_policies,
    load_config,
    load_config_text,
)
from balancerd.daemon.reload import load_all  # noqa: E402
from balancerd.errors import ConfigError  # noqa: E402
from balancerd.policy.load import load_policy, load_policy_text  # noqa: E402
from balancerd.policy.spec import DOCUMENT  # noqa: E402
from balancerd.power import drivers_for  # noqa: E402
from balancerd.schedule import active_schedule  # noqa: E402
from balancerd.validate import Choice, Flag, Kind, ListOf, MapOf, Number, Obj, Text  # noqa: E402

SEED_POLICIES = sorted((REPO / "policies").glob("*.yaml"))
SAMPLE_CONFIG = """\
# A sample daemon config: every section, every power driver.
hosts:
  - name: host1
    uri: qemu+tls://host1.example.net/system
    migration_uri: tcp://10.0.0.11
    cpus: 16
    mem_mib: 65536
    power: {driver: ipmi, address: 10.0.1.11, user: admin, password_file: FIXTURE/ipmi.pw}
    pki_dir: FIXTURE/pki
  - name: host2
    uri: qemu+tcp://10.0.0.12/system
    power: {driver: wol, mac: "52:54:00:12:34:56", off_command: [ssh, "{host}", poweroff]}
  - name: host3
    uri: qemu+ssh://root@host3/system?keyfile=/etc/balancerd/id
    power:
      driver: command
      on_command: [/usr/local/bin/power, "--on", "{host}"]
      off_command: [/usr/local/bin/power, "--off", "{host}"]
policy: policy.yaml
schedule:
  - {cron: "0 7 * * 1-5", duration_h: 12, policy: night.yaml}
  - {cron: "0 1 * * *", duration_h: 2, freeze: true}
metrics:
  listen: "127.0.0.1:9177"
  tls: {cert_file: FIXTURE/pki/clientcert.pem, key_file: FIXTURE/pki/clientkey.pem}
pki_dir: FIXTURE/pki
state_dir: /var/lib/balancerd
collect_interval_s: 15
cycle_interval_s: 300
smoothing_window: 4
host_timeout_s: 5
stall_timeout_s: 60
"""
CONFIG_NAME = "balancerd.yaml"
POLICY_NAMES = ("policy.yaml", "night.yaml")

# --------------------------------------------------------------------------------------
# Hostile pieces


@dataclass(frozen=True)
class Raw:
    """A YAML token written as is (``1.0e+400``, ``*a``, ``!!binary AAAA``)."""

    text: str


def _huge_int(digits: int) -> str:
    return "9" * digits


HOSTILE_TOKENS = st.one_of(
    st.sampled_from(
        [
            ".nan",
            ".NaN",
            ".inf",
            "-.inf",
            "+.inf",
            "-0",
            "-0.0",
            "0.0",
            "1.0e+400",
            "-1.0e+400",
            "1e400",
            "1.0e-400",
            "4.9e-324",
            "18446744073709551616",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "0x7fffffffffffffffffff",
            "0o777777777777777777777",
            "0b" + "1" * 80,
            "190:20:30",
            "1_000_000",
            "~",
            "null",
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "''",
            '""',
            "!!binary AAAA",
            "!!binary '=='",
            "!!timestamp 2001-02-30",
            "2001-12-14t21:59:43.10-05:00",
            "2001-13-01",
            "9999-12-31 23:59:59 +99:00",
            "!!set {a, b}",
            "!!omap [{a: 1}]",
            "!!omap [1]",
            "!!python/object:os.system x",
            "!!python/name:os.system",
            "!!str",
            "!!int '12'",
            "!!float 'x'",
            "!!int x",
            "!foo bar",
            "&anchor_only",
            "*undefined_alias",
            "'\\ud800'",
            '"\\ud800"',
            '"\\x00"',
            '"\\e[2J"',
            '"\\u202e"',
            '"a\\nb"',
            '"\\0"',
            "'{host.__class__}'",
            "'{host:>999999999}'",
            "'{0}'",
            "'qemu+ext:///system?command=/bin/sh'",
            "'qemu+ssh://h/system?netcat=/x'",
            "'xen:///'",
            "'0 0 30 2 *'",
            "'0 0 * * 9'",
            "'127.0.0.1:\u00b2'",
            "'[::1]:9177'",
            "'/dev/zero'",
            "'/'",
            "'.'",
            "[]",
            "{}",
            "[[]]",
            "{a: {b: {c: {}}}}",
            "|\n  multi\n  line",
        ]
    ).map(Raw),
    st.integers(min_value=20, max_value=6000).map(lambda n: Raw(_huge_int(n))),
    st.integers(min_value=20, max_value=6000).map(lambda n: Raw("-" + _huge_int(n))),
    st.integers(min_value=20, max_value=3000).map(lambda n: Raw("0x" + "f" * n)),
    st.integers(min_value=2, max_value=2000).map(lambda n: Raw(":".join(["59"] * n))),
    st.integers(min_value=1, max_value=300_000).map(lambda n: Raw("'" + "x" * n + "'")),
    st.integers(min_value=1, max_value=3000).map(lambda n: Raw("[" * n + "]" * n)),
    st.integers(min_value=1, max_value=3000).map(lambda n: Raw("{a: " * n + "1" + "}" * n)),
    st.integers(min_value=0, max_value=0x10FFFF).map(lambda c: Raw(f'"\\U{c:08x}"')),
    st.integers(min_value=0, max_value=0x9F).map(lambda c: Raw(chr(c))),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: Raw(repr(f))),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: Raw(str(i))),
    st.text(max_size=30).map(lambda t: Raw(_quote(t))),
)


def _quote(text: str) -> str:
    """A YAML double-quoted scalar holding ``text`` (controls escaped)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


# --------------------------------------------------------------------------------------
# Documents from the tables


NAMES = ["host1", "host2", "host3", "vm-1", "vm-2", "web-3", "db.1", "a:b", "h1"]
# Values that fit a field (by key); other text fields take one of TEXT_SAMPLES.
FIELD_SAMPLES: dict[str, list[str]] = {
    "uri": [
        "qemu+tcp://10.0.0.1/system",
        "qemu:///system",
        "test:///default",
        "qemu+tls://host1/system",
        "qemu+ssh://root@h/system?keyfile=/k",
        "qemu+unix:///system",
    ],
    "migration_uri": ["tcp://10.0.0.1", "tcp://[fd00::1]:49152"],
    "policy": ["policy.yaml", "night.yaml", "policy.yaml", "/nonexistent.yaml"],
    "cron": ["0 7 * * 1-5", "*/5 * * * *", "0 0 29 2 *", "30 23 * * 0,6", "0 0 1 1 *"],
    "listen": ["127.0.0.1:9177", "[::1]:9177", "0.0.0.0:1", "localhost:65535"],
    "state_dir": ["/var/lib/balancerd", "state"],
    "address": ["10.0.1.11", "bmc1.example.net"],
    "user": ["admin"],
    "password_file": ["FIXTURE/ipmi.pw", "/nonexistent/pw", "FIXTURE/open.pw"],
    "pki_dir": ["FIXTURE/pki", "FIXTURE", "/nonexistent"],
    "cert_file": ["FIXTURE/pki/clientcert.pem", "FIXTURE/pki/nothere.pem"],
    "key_file": ["FIXTURE/pki/clientkey.pem", "FIXTURE/open.pw"],
    "client_ca_file": ["FIXTURE/pki/cacert.pem"],
    "ca_file": ["FIXTURE/pki/cacert.pem", "relative.pem"],
    "endpoints": ["http://10.0.0.5:2379", "https://[::1]:2379", "http://etcd1:2379"],
    "lab_dir": ["/run/lab"],
    "broadcast": ["255.255.255.255", "10.0.0.255"],
    "mac": ["52:54:00:12:34:56", "52-54-00-12-34-57"],
    "description": ["a policy", "two\nlines"],
    "on_command": ["/usr/local/bin/power", "--on", "{host}", "x{{y}}"],
    "off_command": ["/usr/local/bin/power", "--off", "{host}"],
}
TEXT_SAMPLES = ["policy.yaml", "qemu+tcp://10.0.0.1/system", "{host}", "admin", "x"]
POWER_KEYS = {  # the keys each power driver uses
    "ipmi": ("address", "user", "password_file"),
    "wol": ("mac", "broadcast", "off_command"),
    "command": ("on_command", "off_command"),
    "lab": ("lab_dir",),
    "none": (),
}


_CACHE: dict[tuple[int, int, str, int], st.SearchStrategy[object]] = {}
UNKNOWN_KEYS = ["unknown", "Mode", "cpu", "x" * 100, "7", "null"]


def value_of(kind: Kind, hostile: int, name: str = "", depth: int = 0) -> st.SearchStrategy[object]:
    """Values for ``kind`` (the key ``name``): of the right kind (boundaries included),
    or, about one time in ``hostile``, a hostile token or an out-of-range number. Built
    once per kind: hypothesis strategies are cheap to draw from, not to build."""
    key = (id(kind), hostile, name, min(depth, 3))
    if key not in _CACHE:
        valid = _valid(kind, hostile, name, depth)
        _CACHE[key] = st.one_of([valid] * (hostile - 1) + [HOSTILE_TOKENS]) if hostile else valid
    return _CACHE[key]


def _valid(kind: Kind, hostile: int, name: str, depth: int) -> st.SearchStrategy[object]:
    if isinstance(kind, Obj):
        return _obj(kind, hostile, depth)
    if isinstance(kind, ListOf):
        low = 0 if hostile else kind.min_items
        items = st.lists(
            value_of(kind.item, hostile, name, depth + 1),
            min_size=low,
            max_size=max(low, 3 if depth < 3 else 1),
        )
        if not hostile and isinstance(kind.item, Obj) and "uri" in kind.item.fields:
            return items.map(_distinct_hosts)
        if hostile or not kind.unique:
            return items
        return items.map(lambda xs: list({repr(x): x for x in xs}.values()))
    if isinstance(kind, MapOf):
        return st.dictionaries(
            st.sampled_from(NAMES), value_of(kind.value, hostile, "", depth + 1), max_size=3
        )
    if isinstance(kind, Choice):
        return st.sampled_from([m.value for m in kind.enum])
    if isinstance(kind, Flag):
        return st.booleans()
    if isinstance(kind, Text):
        if kind.const is not None:
            return st.just(kind.const)
        if kind.enum:
            return st.sampled_from(kind.enum)
        if name in FIELD_SAMPLES:
            return st.sampled_from(FIELD_SAMPLES[name])
        if kind.pattern is not None:
            return st.sampled_from(NAMES if name != "allow_uri_transports" else ["xen"])
        return st.sampled_from(TEXT_SAMPLES)
    if isinstance(kind, Number):
        return _number(kind, strict=not hostile)
    return st.none()


def _obj(kind: Obj, hostile: int, depth: int) -> st.SearchStrategy[object]:
    def fields(keys: list[str], forced: set[str]) -> st.SearchStrategy[dict[str, object]]:
        sub = {k: value_of(kind.fields[k].kind, hostile, k, depth + 1) for k in keys}
        needed = {k: v for k, v in sub.items() if kind.fields[k].required or k in forced}
        return st.fixed_dictionaries(
            needed, optional={k: v for k, v in sub.items() if k not in needed}
        )

    def with_driver(driver: str) -> Callable[[dict[str, object]], dict[str, object]]:
        return lambda d: {**d, "driver": driver}

    out: st.SearchStrategy[dict[str, object]]
    if "driver" in kind.fields and not hostile:  # a power section: one driver and its keys
        out = st.one_of(
            [
                fields(list(keys), set(DRIVER_NEEDS.get(driver, ()))).map(with_driver(driver))
                for driver, keys in sorted(POWER_KEYS.items())
            ]
        )
    elif "cron" in kind.fields and not hostile:  # a schedule window
        out = st.one_of(
            [
                fields(["cron", duration, what], {"cron", duration, what}).map(
                    lambda d: {**d, "freeze": True} if "freeze" in d else d
                )
                for duration in ("duration_h", "duration_s")
                for what in ("policy", "freeze")
            ]
        )
    else:
        out = fields(list(kind.fields), set())
    if hostile:  # now and then a key the table does not have
        out = st.tuples(out, st.sampled_from([None] * 15 + UNKNOWN_KEYS)).map(
            lambda t: t[0] if t[1] is None else {**t[0], t[1]: 1}
        )
    return out


def _distinct_hosts(hosts: list[object]) -> list[object]:
    for i, host in enumerate(hosts):  # each its own name and URI
        if isinstance(host, dict):
            host["name"] = f"host{i}"
            host["uri"] = f"qemu+tcp://10.0.0.{i}/system"
    return hosts


def _number(kind: Number, *, strict: bool) -> st.SearchStrategy[object]:
    low = kind.ge if kind.ge is not None else (kind.gt if kind.gt is not None else 0)
    high = kind.le if kind.le is not None else kind.lt
    assert high is not None
    if kind.integer:
        lo, hi = math.ceil(low), math.floor(high)
        ints = [lo, hi] + ([] if strict else [hi + 1, lo - 1])
        return st.one_of(st.integers(lo, min(hi, lo + 1000)), st.sampled_from(ints))
    top = high if kind.le is not None else high * 0.999
    edges: list[float] = [top, low if kind.ge is not None else top / 2]
    edges += [] if strict else [high, high * 1.0000001, low - 1, -0.0]
    open_low = kind.gt is not None
    return st.one_of(
        st.floats(low, top, exclude_min=open_low, allow_nan=False),
        st.sampled_from(edges),
        st.floats(low, min(top, 100.0), exclude_min=open_low, allow_nan=False),
    )


def emit(value: object, *, block: bool, indent: int = 0) -> str:  # noqa: C901 (one branch per fuzzed YAML node kind)
    """YAML for ``value``; ``Raw`` tokens are written as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):  # YAML 1.1 reads 5e-324 as a string: 5.0e-324
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return _quote(value)
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        if not block:
            return (
                "{"
                + ", ".join(f"{_key(k)}: {emit(v, block=False)}" for k, v in value.items())
                + "}"
            )
        lines = []
        for k, v in value.items():
            inner = emit(v, block=True, indent=indent + 1)
            if isinstance(v, dict | list) and v and not isinstance(v, Raw):
                lines.append(f"{pad}{_key(k)}:\n{inner}")
            else:
                lines.append(f"{pad}{_key(k)}: {inner}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]"
        if not block:
            return "[" + ", ".join(emit(v, block=False) for v in value) + "]"
        return "\n".join(f"{pad}- {emit(v, block=False)}" for v in value)
    return _quote(str(value))


def _key(key: object) -> str:
    if isinstance(key, Raw):
        return key.text
    return (
        key if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][\w.-]*", key) else _quote(str(key))
    )


@st.composite
def alias_bomb(draw: st.DrawFn) -> str:
    """Anchors of growing width: "billion laughs" (lists) or doubling merge keys."""
    width = draw(st.integers(2, 12))
    depth = draw(st.integers(1, 12))
    if draw(st.booleans()):
        out = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
        out += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    else:
        out = ["l0: &l0 {x: 1, y: 2}"]
        out += [
            f"l{i}: &l{i} {{<<: [" + ", ".join([f"*l{i - 1}"] * width) + "]}"
            for i in range(1, depth)
        ]
    return "\n".join(out) + "\n"


@st.composite
def structured(draw: st.DrawFn, table: Obj) -> str:
    """A document from ``table`` with hostile values, maybe aliases, in flow or block."""
    # 0: only values of the right kind (boundaries included); else one in N is hostile.
    doc = draw(st.sampled_from([0, 0, 50, 10, 3]).flatmap(lambda n: value_of(table, n)))
    block = draw(st.booleans())
    body = emit(doc, block=block) if isinstance(doc, dict) else emit(doc, block=False)
    prefix = ""
    if draw(st.integers(0, 9)) == 0:  # an alias bomb, used somewhere or not
        prefix = draw(alias_bomb())
        body = body.replace("[]", "*l0", 1) if draw(st.booleans()) else body
        if isinstance(doc, dict):
            body = prefix + body
            prefix = ""
    if draw(st.integers(0, 19)) == 0:  # a raw control byte somewhere
        pos = draw(st.integers(0, len(body)))
        body = body[:pos] + chr(draw(st.integers(0, 0x1F))) + body[pos:]
    return prefix + body + "\n"


# --------------------------------------------------------------------------------------
# Byte mutation of real files

MUTATION_TOKENS = [
    b"&a ",
    b"*a",
    b"<<: ",
    b"<<: *a",
    b"[",
    b"]",
    b"{",
    b"}",
    b"!!binary ",
    b"\t",
    b"'",
    b'"',
    b"---\n",
    b"...\n",
    b"1.0e+400",
    b"-0",
    b".nan",
    b"? ",
    b"- ",
    b"#",
    b"|",
    b">",
    b"%YAML 1.1\n",
    b"\x00",
    b"\xff",
    b"\xef\xbb\xbf",
    b"\x85",
    b"\r",
    b"\\",
    b"&b [*a,*a,*a]",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.integers(0, 7))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:  # flip a bit
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:  # random bytes
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:  # delete a range
            data[pos : pos + draw(st.integers(1, 64))] = b""
        elif op == 3:  # duplicate a range elsewhere
            end = min(len(data), pos + draw(st.integers(1, 200)))
            chunk = bytes(data[pos:end])
            at = draw(st.integers(0, len(data)))
            data[at:at] = chunk * draw(st.integers(1, 50))
        elif op == 4:  # a hostile token
            data[pos:pos] = draw(st.sampled_from(MUTATION_TOKENS))
        elif op == 5:  # a hostile value after a colon
            colon = data.find(b": ", pos)
            if colon >= 0:
                end = data.find(b"\n", colon)
                end = len(data) if end < 0 else end
                data[colon + 2 : end] = draw(HOSTILE_TOKENS).text.encode("utf-8", "replace")
        elif op == 6:  # truncate
            del data[pos:]
        else:  # splice with another seed
            other = draw(st.sampled_from(seeds))
            data[pos:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


# --------------------------------------------------------------------------------------
# Cases and checks


@dataclass
class Case:
    target: str  # policy-text | config-text | policy-file | config-file | reload
    config: bytes = b""
    policy: bytes = b""
    night: bytes = b""


@dataclass
class Result:
    count: int = 0
    accepted: int = 0
    max_s: float = 0.0  # largest per-input CPU time (untraced when re-timed)
    max_traced_s: float = 0.0
    max_mib: float = 0.0
    failures: list[str] = field(default_factory=list)
    by_target: dict[str, int] = field(default_factory=dict)


def cases(fixture: Path) -> st.SearchStrategy[Case]:
    policy_seeds = [p.read_bytes() for p in SEED_POLICIES]
    config_seed = SAMPLE_CONFIG.replace("FIXTURE", str(fixture)).encode()
    policy_doc = structured(DOCUMENT).map(str.encode)
    config_doc = structured(CONFIG).map(lambda t: t.replace("FIXTURE", str(fixture)).encode())
    policy_any = st.one_of(policy_doc, mutated(policy_seeds), st.sampled_from(policy_seeds))
    config_any = st.one_of(config_doc, mutated([config_seed]), st.just(config_seed))
    return st.one_of(
        policy_doc.map(lambda p: Case("policy-text", policy=p)),
        config_doc.map(lambda c: Case("config-text", config=c)),
        mutated(policy_seeds).map(lambda p: Case("policy-file", policy=p)),
        mutated([config_seed]).map(lambda c: Case("config-file", config=c)),
        st.builds(
            lambda c, p, n: Case("reload", config=c, policy=p, night=n),
            config_any,
            policy_any,
            policy_any,
        ),
    )


class Breaks(Exception):
    """An accepted input that the daemon's next steps cannot use."""


def run_case(case: Case, folder: Path) -> bool:
    """Load ``case``; True if accepted. Raises ConfigError, Breaks, or whatever leaks."""
    config_path = folder / CONFIG_NAME
    if case.target == "policy-text":
        load_policy_text(case.policy.decode(), str(folder / "policy.yaml"))
        return True
    if case.target == "config-text":
        config = load_config_text(case.config.decode(), str(config_path))
        _after_config(config, {})
        return True
    if case.target == "policy-file":
        (folder / "p.yaml").write_bytes(case.policy)
        load_policy(folder / "p.yaml")
        return True
    if case.target == "config-file":
        config_path.write_bytes(case.config)
        _after_config(load_config(config_path), {})
        return True
    folder = folder / "reload"
    folder.mkdir(exist_ok=True)
    config_path = folder / CONFIG_NAME
    config_path.write_bytes(case.config)
    (folder / POLICY_NAMES[0]).write_bytes(case.policy)
    (folder / POLICY_NAMES[1]).write_bytes(case.night)
    loaded = load_all(str(config_path))
    _after_config(loaded.config, loaded.policies)
    _ = loaded.forecast_window_s
    return True


def _after_config(config: Any, policies: dict[str, Any]) -> None:
    """What the daemon does with an accepted config (reload: before the swap)."""
    problems = cross_check_policies(config, policies)
    if any("\n" in p or not re.match(r"^\S.*:\d+: ", p) for p in problems):
        raise Breaks(f"cross_check_policies gave a malformed problem: {problems!r}")
    try:
        drivers_for(config.hosts)
    except ConfigError as exc:
        raise Breaks(f"accepted, then drivers_for refused: {exc.problems}") from exc
    now = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    for moment in (now, now + timedelta(days=200), now - timedelta(days=3000)):
        active = active_schedule(config.schedule, config.policy, moment)
        if policies and active.policy not in policies:
            raise Breaks(f"the schedule chose {active.policy!r}, which was not loaded")


def measure(case: Case, folder: Path, *, trace: bool) -> tuple[bool | None, float, float, str]:
    """(accepted, CPU s, traced peak MiB, failure or "")."""
    if trace:
        tracemalloc.start()
    started = time.thread_time()
    failure = ""
    accepted: bool | None = None
    try:
        accepted = run_case(case, folder)
    except ConfigError as exc:
        accepted = False
        bad = [p for p in exc.problems if "\n" in p or not re.match(r"^\S+:\d+: ", p)]
        if not exc.problems or bad:
            failure = f"ConfigError with malformed problems: {bad or exc.problems!r}"
    except Breaks as exc:
        failure = f"accepted but breaks the daemon: {exc}"
    except BaseException as exc:  # everything else is what we look for
        if isinstance(exc, KeyboardInterrupt):
            raise
        failure = "".join(traceback.format_exception(exc))
    used_s = time.thread_time() - started
    peak_mib = 0.0
    if trace:
        peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return accepted, used_s, peak_mib, failure


def save(out: Path, index: int, case: Case, why: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{index:07d}-{case.target}"
    for name, data in (("config", case.config), ("policy", case.policy), ("night", case.night)):
        if data:
            Path(f"{stem}.{name}.yaml").write_bytes(data)
    Path(f"{stem}.txt").write_text(why)
    return str(stem)


def fuzz(
    count: int,
    *,
    seed: int | None = None,
    out: Path | None = None,
    max_s: float = 1.0,
    max_mib: float = 200.0,
    trace_every: int = 1,
    progress: Callable[[Result], None] | None = None,
) -> Result:
    """Run ``count`` inputs; every failure is saved under ``out`` (a temp folder if None)."""
    result = Result()
    with tempfile.TemporaryDirectory(prefix="balancerd-fuzz-") as tmp:
        fixture = Path(tmp) / "fixture"
        folder = fixture  # relative policy paths and the password file live here
        fixture.mkdir()
        secret = fixture / "ipmi.pw"
        secret.write_text("S3cret\n")
        secret.chmod(0o600)
        (fixture / "open.pw").write_text("S3cret\n")
        (fixture / "open.pw").chmod(0o644)
        pki = fixture / "pki"  # a client PKI folder (the files only have to be there)
        pki.mkdir()
        for name in ("cacert.pem", "clientcert.pem", "clientkey.pem"):
            (pki / name).write_text("-----BEGIN CERTIFICATE-----\n")
            (pki / name).chmod(0o600)
        for name in POLICY_NAMES:  # what relative policy paths of the config-* cases name
            (fixture / name).write_bytes(SEED_POLICIES[0].read_bytes())
        save_to = out or Path(tmp) / "failures"
        strategy = cases(fixture)

        @settings(
            max_examples=count,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def one(case: Case) -> None:
            index = result.count
            result.count += 1
            result.by_target[case.target] = result.by_target.get(case.target, 0) + 1
            trace = trace_every > 0 and index % trace_every == 0
            accepted, used_s, peak_mib, failure = measure(case, folder, trace=trace)
            result.max_traced_s = max(result.max_traced_s, used_s) if trace else result.max_traced_s
            if used_s > max_s and trace:  # tracing is slow: time it again untraced
                _, used_s, _, _ = measure(case, folder, trace=False)
            result.max_s = max(result.max_s, used_s)
            result.max_mib = max(result.max_mib, peak_mib)
            result.accepted += bool(accepted)
            why = failure
            if not why and used_s > max_s:
                why = f"took {used_s:.2f} s CPU (limit {max_s:g})"
            if not why and peak_mib > max_mib:
                why = f"used {peak_mib:.0f} MiB (limit {max_mib:g})"
            if why:
                where = save(save_to, index, case, why)
                result.failures.append(f"{where}: {why.strip().splitlines()[-1][:300]}")
            if progress is not None and result.count % 1000 == 0:
                progress(result)

        if seed is not None:
            one = hypothesis_seed(seed)(one)
        one()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs to run (100000)")
    parser.add_argument("--seed", type=int, default=None, help="derandomize hypothesis")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"), help="failures")
    parser.add_argument("--max-s", type=float, default=1.0, help="CPU seconds per input")
    parser.add_argument("--max-mib", type=float, default=200.0, help="traced MiB per input")
    parser.add_argument(
        "--trace-every", type=int, default=1, help="trace memory of every Nth input (1)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()

    def progress(r: Result) -> None:
        print(
            f"  {r.count} inputs, {time.monotonic() - started:.0f} s, max {r.max_s:.3f} s, "
            f"{r.max_mib:.1f} MiB, {len(r.failures)} failure(s)",
            file=sys.stderr,
            flush=True,
        )

    result = fuzz(
        args.count,
        seed=args.seed,
        out=args.out,
        max_s=args.max_s,
        max_mib=args.max_mib,
        trace_every=args.trace_every,
        progress=progress,
    )
    wall_s = time.monotonic() - started
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"inputs:            {result.count}")
    print(
        "by target:         " + ", ".join(f"{k} {v}" for k, v in sorted(result.by_target.items()))
    )
    print(f"accepted:          {result.accepted}")
    print(f"wall time:         {wall_s:.0f} s")
    print(f"max per input:     {result.max_s:.3f} s CPU (traced: {result.max_traced_s:.3f} s)")
    print(f"max memory:        {result.max_mib:.1f} MiB traced per input, {rss_mib:.0f} MiB RSS")
    print(f"failures:          {len(result.failures)}")
    for line in result.failures[:50]:
        print(f"  {line}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
