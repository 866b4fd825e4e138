"""Hostile inputs to the policy and config loaders: each only ever raises ``ConfigError``
(``FILE:LINE: ...`` lines), within ~1 s and ~200 MiB.

The regression cases are the bugs found by reading the loaders and by
``scripts/fuzz_loaders.py``; the YAML ones run on both parsers (libyaml and PyYAML's own).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancerd import yamlpos
from balancerd.config import load_config, load_config_text
from balancerd.errors import ConfigError, PolicyError
from balancerd.policy.load import load_policy, load_policy_text

HEAD = "apiVersion: balancerd/v1\nkind: Policy\nmetadata: {name: t}\n"
SRC = "/srv/t.yaml"
LOADERS: list[Callable[[str, str], object]] = [load_policy_text, load_config_text]
LINE = re.compile(r"^/srv/t\.yaml:\d+: \S")  # every problem: FILE:LINE: ...

# The "billion laughs": 9 levels of 9 aliases, 387 million leaves from 300 bytes.
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
# Merge keys double at each level: PyYAML's flatten_mapping copies 2**40 pairs.
MERGES = "m0: &m0 {x: 1, y: 2}\n" + "".join(
    f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}\n" for i in range(1, 41)
)


# PyYAML's own scanner (used only without libyaml) reads ~40 KB/s: the same bounds hold,
# the time is longer.
SLOWER = {"libyaml": 1.0, "pyyaml": 4.0}
_slower = 1.0


@pytest.fixture(params=["libyaml", "pyyaml"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "pyyaml":
        monkeypatch.setattr(yamlpos, "_LOADER", yamlpos._PyLoader)
    elif not yamlpos.yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    global _slower
    _slower = SLOWER[request.param]
    yield request.param
    _slower = 1.0


def refused(text: str, *, max_s: float = 1.0, max_mib: float = 200.0) -> list[str]:
    """The problems both loaders report for ``text``: only ConfigError, one line each
    starting FILE:LINE, within ``max_s`` CPU seconds and ``max_mib`` MiB (memory traced
    in a second run: tracing triples the time)."""
    found: list[str] = []
    for load in LOADERS:
        started = time.thread_time()
        with pytest.raises(ConfigError) as info:
            load(text, SRC)
        used_s = time.thread_time() - started
        assert used_s < max_s * _slower, f"{load.__name__} took {used_s:.2f} s"
        tracemalloc.start()
        try:
            with pytest.raises(ConfigError):
                load(text, SRC)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < max_mib * 2**20, f"{load.__name__} used {peak / 2**20:.0f} MiB"
        for problem in info.value.problems:
            assert "\n" not in problem and LINE.match(problem), problem
        found += info.value.problems
    return found


# ------------------------------------------------------------------------- the reader


def test_billion_laughs_is_refused_quickly(parser: str) -> None:
    """Was: gigabytes and minutes (every alias expanded while recording lines)."""
    assert len(LAUGHS) < 500
    found = refused(LAUGHS, max_mib=50)
    assert any(f"more than {yamlpos.MAX_NODES} values" in p for p in found), found


def test_doubling_merge_keys_are_refused(parser: str) -> None:
    """Was: PyYAML's merge flattening doubled the pairs at each level (2**40)."""
    found = refused(MERGES, max_mib=50)
    assert any("values (an alias counts every time it is used)" in p for p in found), found


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a]\n",
        "&a {x: *a}\n",
        "a: &a {<<: *a}\n",
        "a: &a {b: [1, {c: *a}]}\n",
    ],
    ids=["list", "document", "merge", "nested"],
)
def test_recursive_aliases_are_refused(parser: str, text: str) -> None:
    """Was: accepted as a cyclic value that comparisons and messages recursed on."""
    found = refused(text)
    assert any("recursive structure" in p for p in found), found


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000,
        "{a: " * 10_000,
        "- " * 5000 + "x\n",
        "".join("  " * i + "a:\n" for i in range(300)),
    ],
    ids=["flow_lists", "flow_maps", "block_lists", "block_maps"],
)
def test_deep_nesting_is_refused(parser: str, text: str) -> None:
    """Was: RecursionError after 17 s (PyYAML's scanner is quadratic in flow depth)."""
    found = refused(text)
    assert any("nest" in p for p in found), found


@pytest.mark.parametrize(
    "text",
    [
        "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 1100)),
        "a0: &a0 {x: 1}\n" + "".join(f"a{i}: &a{i} {{<<: *a{i - 1}}}\n" for i in range(1, 1100)),
    ],
    ids=["alias_chain", "merge_chain"],
)
def test_deep_nesting_through_aliases_is_refused(text: str) -> None:
    """Each line nests one level deeper through an alias: was RecursionError (walking the
    lines, or PyYAML flattening merge keys) once past 1000 levels."""
    found = refused(text)
    assert any("nested deeper than 64 levels (aliases included)" in p for p in found), found


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [("\x01", 1, 1), (HEAD + "spec: {objective: balance\x07}\n", 4, 26), ("a: b\x00", 1, 5)],
    ids=["alone", "in_a_policy", "nul"],
)
def test_control_bytes_are_refused_with_their_position(
    parser: str, text: str, line: int, column: int
) -> None:
    """Was: an uncaught yaml.ReaderError (the parser was built outside the try)."""
    for problem in refused(text):
        assert problem.startswith(f"{SRC}:{line}: YAML syntax error: unacceptable character #x")
        assert f"(column {column})" in problem


def test_a_lone_surrogate_is_refused(parser: str) -> None:
    """Text handed in by a caller (not decoded from a file) may hold a lone surrogate."""
    refused("a: \ud800\n")


@pytest.mark.parametrize(
    "number",
    ["9" * 5000, "0x" + "f" * 5000, ":".join(["59"] * 3000), "-" + "9" * 4301],
    ids=["decimal", "hex", "sexagesimal", "negative"],
)
def test_huge_integers_are_refused(parser: str, number: str) -> None:
    """Was: ValueError (int max str digits) or OverflowError converting to float."""
    found = refused(HEAD + f"spec: {{objective: balance, budget: {{max_moves: {number}}}}}\n")
    assert any("integer of" in p and "too large" in p for p in found), found


@pytest.mark.parametrize(
    "date", ["2001-02-30", "2001-13-01", "9999-12-31 23:59:59 +99:00"], ids=str
)
def test_impossible_timestamps_are_refused(parser: str, date: str) -> None:
    """Was: ValueError from datetime while constructing the value."""
    found = refused(f"a: {date}\n")
    assert any("invalid timestamp value" in p for p in found), found


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", "? {a: 1}\n: 1\n", "{[" * 30 + "1: 2}"])
def test_collection_keys_are_refused(parser: str, text: str) -> None:
    refused(text)


def test_a_huge_document_is_refused_without_reading_it_all(parser: str) -> None:
    found = refused("a: " + "x" * (yamlpos.MAX_FILE_BYTES + 1))
    assert any("larger than 1024 KiB" in p for p in found)


def test_problems_are_capped(parser: str) -> None:
    """Every problem of a file with 10,000 mistakes would be a 1 MB message."""
    text = HEAD + "spec:\n  objective: balance\n" + "".join(f"  k{i}: 1\n" for i in range(400))
    found = refused(text)
    assert len(found) <= 2 * (yamlpos.MAX_PROBLEMS + 1)
    assert found[yamlpos.MAX_PROBLEMS] == (
        f"{SRC}:{5 + yamlpos.MAX_PROBLEMS}: (document): 300 more problem(s) not shown "
        "(only the first 100 are)"
    )


# ------------------------------------------------------------------------- the files


def _load_both(path: Path) -> list[str]:
    found: list[str] = []
    for load in (load_policy, load_config):
        with pytest.raises(ConfigError) as info:
            load(path)
        found += info.value.problems
    return found


def test_non_utf8_bytes_are_refused_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(HEAD.encode() + b"spec: {objective: \xff}\n")
    for problem in _load_both(path):
        assert problem == f"{path}:4: not UTF-8 text: invalid start byte (byte 77 of the file)"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    for problem in _load_both(tmp_path):
        assert problem == f"{tmp_path}: cannot read: not a regular file (a directory)"


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Was: open() of a FIFO without a writer blocks forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for problem in _load_both(fifo):
        assert problem == f"{fifo}: cannot read: not a regular file (a device, FIFO or socket)"


def test_a_device_is_refused_without_reading_it() -> None:
    """Was: /dev/zero read until memory ran out."""
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy("/dev/zero")


def test_an_unreadable_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD)

    def denied(*_args: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(yamlpos.os, "open", denied)
    for problem in _load_both(path):
        assert problem == f"{path}: cannot read: Permission denied"


def test_a_file_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# " + b"x" * yamlpos.MAX_FILE_BYTES)
    for problem in _load_both(path):
        assert problem == f"{path}: cannot read: larger than 1024 KiB"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    for problem in _load_both(path):
        assert problem.startswith(f"{path}:1: the file is empty (expected ")


# ------------------------------------------------------------- found by the fuzzer


def test_a_policy_name_too_long_for_the_file_system(tmp_path: Path) -> None:
    """Was: OSError (ENAMETOOLONG) out of Path.is_file() while checking ``policy:``."""
    name = "x" * 300 + ".yaml"
    path = tmp_path / "balancerd.yaml"
    path.write_text(f"hosts:\n  - {{name: h1, uri: 'qemu:///system'}}\npolicy: {name}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:3: policy: policy file cannot be read: File name too long"
    ]


# ------------------------------------------------------------- a few thousand inputs


def _fuzzer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "fuzz_loaders", Path(__file__).resolve().parent.parent / "scripts" / "fuzz_loaders.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_loaders"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_fuzzed_inputs_only_raise_config_error_quickly_and_small(tmp_path: Path) -> None:
    """scripts/fuzz_loaders.py in small: structured documents with hostile values, alias
    bombs, byte mutations of the shipped files, and the reload path (load_all, then what
    the daemon does with what it accepted). Failing inputs are saved in tmp_path."""
    fuzzer = _fuzzer()
    result = fuzzer.fuzz(FUZZ_COUNT, out=tmp_path / "failures", trace_every=5)
    assert result.count == FUZZ_COUNT
    assert result.failures == []
    assert result.accepted > FUZZ_COUNT // 20  # valid-looking documents do load
    assert set(result.by_target) == {
        "policy-text",
        "config-text",
        "policy-file",
        "config-file",
        "reload",
    }


FUZZ_COUNT = 1500  # ~25 s; scripts/fuzz_loaders.py runs 100,000


def test_a_broken_tls_uri_with_a_pki_dir(tmp_path: Path) -> None:
    """Was: ValueError (urlsplit: Invalid IPv6 URL) out of is_tls_uri when the host also
    names a valid pki_dir."""
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("cacert.pem", "clientcert.pem", "clientkey.pem"):
        (pki / name).write_text("-----BEGIN X-----\n")
        (pki / name).chmod(0o600)
    (tmp_path / "p.yaml").write_text(HEAD + "spec: {objective: balance}\n")
    path = tmp_path / "balancerd.yaml"
    path.write_text(
        f"hosts:\n  - {{name: h1, uri: 'qemu+tls://[::1/system', pki_dir: {pki}}}\npolicy: p.yaml\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:2: hosts[0].uri: not a libvirt URI (Invalid IPv6 URL), e.g. qemu+tls://host1/system"
    ]
