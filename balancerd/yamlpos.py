"""YAML with line numbers: ``yaml.safe_load`` values plus the line of every field path.

``load_text(text, source)`` returns a ``Document``: ``data`` is exactly what
``yaml.safe_load`` would return, and ``doc.line(("spec", "limits", "max_cpu_util"))``
gives the 1-based line where that key (or list item) is written. A path that is not in
the file answers with the line of its nearest written ancestor, so "missing key" errors
point at the mapping that should hold it.

Unlike ``yaml.safe_load`` a key written twice in one mapping is an error (PyYAML keeps
the last one silently). Syntax errors and duplicates raise ``YamlError`` whose
``problems`` are already formatted as ``FILE:LINE: ...``.

Files come from operators and may be anything (a password file named by mistake, a
truncated copy, a hostile "billion laughs"), so reading is bounded: at most
``MAX_FILE_BYTES``, nesting at most ``MAX_DEPTH`` levels, at most ``MAX_NODES`` values
counted the way validation will see them (an alias counts every time it is used, so
nested aliases cannot expand into gigabytes), no recursive aliases, only YAML's printable
characters, integers of at most ``MAX_INT_CHARS`` characters, mapping keys that are plain
values. Every other problem (a bad date, an undecodable byte, a directory) is a
``YamlError`` too: nothing else leaves this module. Messages name the line and column and
never quote more of the file than the offending token.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner, ScannerError

# A field path: mapping keys (as written, str()-ed if not strings) and list indices.
FieldPath = tuple[str | int, ...]

MAX_FILE_BYTES = 1024 * 1024  # a policy or config is a few KiB
MAX_DEPTH = 64  # nesting levels (a policy has 6)
MAX_NODES = 20_000  # values, each alias counted every time it is used (~0.4 s at most)
MAX_INT_CHARS = 64  # an integer written with more characters is refused (2**63 has 19 digits)
MAX_PROBLEMS = 100  # problems reported for one file; the rest are counted
MAX_TOKEN_CHARS = 40  # a quoted token longer than this is shortened in messages

_MERGE_TAG = "tag:yaml.org,2002:merge"
# What YAML 1.1 allows in a stream (the same set as PyYAML's Reader.NON_PRINTABLE).
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


class YamlError(Exception):
    """The text is not valid YAML, or repeats a key; ``problems`` are ``FILE:LINE: ...``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def show(text: str, limit: int = MAX_TOKEN_CHARS) -> str:
    """A token of the file as it may appear in a message: one line, control characters
    escaped, at most ``limit`` characters (the length said when cut)."""
    shown = text if len(text) <= limit else text[:limit]
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
    if len(text) > limit:
        shown += f"... ({len(text)} characters)"
    return shown


def format_path(path: FieldPath) -> str:
    """``("spec", "constraints", "anti_affinity", 1)`` -> ``spec.constraints.anti_affinity[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{show(part)}" if out else show(part)
    return out or "(document)"


@dataclass(frozen=True)
class Document:
    source: str  # file name used in messages
    data: object  # what yaml.safe_load returns
    lines: Mapping[FieldPath, int]  # path -> 1-based line where it is written

    def line(self, path: FieldPath) -> int:
        """Line of ``path``, or of its nearest ancestor present in the file."""
        return line_of(self.lines, path)

    def where(self, path: FieldPath) -> str:
        return f"{self.source}:{self.line(path)}"

    def problem(self, path: FieldPath, message: str) -> str:
        """``FILE:LINE: field.path: message`` (always one line)."""
        return f"{self.where(path)}: {format_path(path)}: {_one_line(message)}"


def line_of(lines: Mapping[FieldPath, int], path: FieldPath) -> int:
    """Line of ``path`` in ``lines``, or of its nearest ancestor written (1 if none)."""
    for end in range(len(path), -1, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return 1


def load_file(path: str | Path) -> Document:
    """Read and parse ``path``; a file that cannot be read as text is a ``YamlError`` too
    (missing, a directory or a device, unreadable, too large, not UTF-8)."""
    source = str(path)
    data = read_bounded(path, source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlError(
            [f"{source}:{line}: not UTF-8 text: {exc.reason} (byte {exc.start + 1} of the file)"]
        ) from exc
    return load_text(text, source)


def read_bounded(path: str | Path, source: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or ``YamlError``. Never
    blocks on a FIFO nor reads a device without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise YamlError([f"{source}: cannot read: {exc.strerror or exc}"]) from exc
    except ValueError as exc:  # a NUL in the name
        raise YamlError([f"{source}: cannot read: {exc}"]) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
            raise YamlError([f"{source}: cannot read: not a regular file ({kind})"])
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise YamlError([f"{source}: cannot read: {exc.strerror or exc}"]) from exc
    finally:
        os.close(fd)
    if size > limit:
        raise YamlError([f"{source}: cannot read: larger than {limit // 1024} KiB"])
    return b"".join(chunks)


def load_text(text: str, source: str) -> Document:
    if len(text) > MAX_FILE_BYTES:
        raise YamlError([f"{source}:1: larger than {MAX_FILE_BYTES // 1024} KiB"])
    bad = _NON_PRINTABLE.search(text)
    if bad is not None:
        pos = bad.start()
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        raise YamlError(
            [
                f"{source}:{line}: YAML syntax error: unacceptable character "
                f"#x{ord(bad.group()):04x} (control characters are not allowed) (column {column})"
            ]
        )
    loader = _LOADER(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise YamlError([_syntax_problem(source, exc)]) from exc
        except yaml.YAMLError as exc:
            raise YamlError([f"{source}:1: YAML error: {_scrub(str(exc))}"]) from exc
        if node is None:  # empty file or only comments
            return Document(source=source, data=None, lines={(): 1})
        walk = _Walk(loader, source)
        try:
            walk.node(node, (), 0)
            if walk.problems:
                raise YamlError(walk.problems)
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            raise YamlError([_syntax_problem(source, exc)]) from exc
        return Document(source=source, data=data, lines=walk.lines)
    finally:
        loader.dispose()


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


def _scrub(message: str) -> str:
    """A parser's message on one line, without the tokens it quotes (an alias or tag name
    could be a password read by mistake); a quoted single character stays."""
    message = message.split("\n  in ")[0]
    message = re.sub(r"\s*'(?!(?:[^'\\]|\\.)')(?:[^'\\]|\\.)*'", "", message)
    return _one_line(message)


def _syntax_problem(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    what = _scrub(exc.problem or exc.context or "invalid YAML")
    column = f" (column {mark.column + 1})" if mark is not None else ""
    return f"{source}:{line}: YAML syntax error: {what}{column}"


# --------------------------------------------------------------------------------------
# The bounded loader: libyaml's scanner and parser where available (fast, and it stops at
# 1000 nesting levels itself), PyYAML's otherwise; our composer and constructor on top.


class _BoundedComposer(Composer):
    """PyYAML's composer counting values and nesting as it goes."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            mark = self.peek_event().start_mark  # type: ignore[attr-defined]
            raise ComposerError(None, None, f"more than {MAX_NODES} values", mark)
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[attr-defined]
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _BoundedScanner(Scanner):
    """PyYAML's own scanner scans every nested opening ahead (quadratic time): stop at
    ``MAX_DEPTH`` before that."""

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise ScannerError(
                None,
                None,
                f"nested deeper than {MAX_DEPTH} levels",
                self.get_mark(),  # type: ignore[attr-defined]
            )
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= MAX_DEPTH:
            raise ScannerError(
                None,
                None,
                f"nested deeper than {MAX_DEPTH} levels",
                self.get_mark(),  # type: ignore[attr-defined]
            )
        added: bool = super().add_indent(column)
        return added


class _SafeConstructor(SafeConstructor):
    """``SafeConstructor`` whose value errors (a 30th of February, a 5000-digit integer)
    are ``ConstructorError``s with the value's position."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, OverflowError, TypeError, IndexError, KeyError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise ConstructorError(
                None, None, f"invalid {kind} value ({exc})", node.start_mark
            ) from exc

    def construct_yaml_int(self, node: ScalarNode) -> int:
        value = str(node.value)
        if len(value) > MAX_INT_CHARS:
            raise ConstructorError(
                None,
                None,
                f"integer of {len(value)} characters is too large (at most {MAX_INT_CHARS})",
                node.start_mark,
            )
        result: int = super().construct_yaml_int(node)
        return result


_SafeConstructor.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:int", _SafeConstructor.construct_yaml_int
)


class _PyLoader(Reader, _BoundedScanner, Parser, _BoundedComposer, _SafeConstructor, Resolver):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        _BoundedScanner.__init__(self)
        Parser.__init__(self)
        _BoundedComposer.__init__(self)
        _SafeConstructor.__init__(self)
        Resolver.__init__(self)


_LOADER: Any = _PyLoader
if yaml.__with_libyaml__:  # pragma: no branch - the PyYAML wheels include libyaml
    from yaml._yaml import CParser

    class _CLoader(_BoundedComposer, CParser, _SafeConstructor, Resolver):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            _SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _LOADER = _CLoader


class _Walk:
    """Lines of every field path, duplicate keys, and the bounds of the expanded tree:
    an alias is walked every time it is used (as validation will), so its values count
    every time; a collection inside itself is refused."""

    def __init__(self, loader: Any, source: str) -> None:
        self.loader = loader
        self.source = source
        self.lines: dict[FieldPath, int] = {}
        self.problems: list[str] = []
        self.count = 0
        self.active: set[int] = set()

    def fail(self, node: Node, message: str) -> None:
        raise ConstructorError(None, None, message, node.start_mark)

    def enter(self, node: Node, depth: int) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            self.fail(node, f"more than {MAX_NODES} values (an alias counts every time it is used)")
        if depth > MAX_DEPTH:
            self.fail(node, f"nested deeper than {MAX_DEPTH} levels (aliases included)")
        if id(node) in self.active:
            self.fail(node, "an alias used inside the collection it names (a recursive structure)")

    def node(self, node: Node, path: FieldPath, depth: int) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self.enter(node, depth)
        if isinstance(node, MappingNode):
            self.active.add(id(node))
            self.mapping(node, path, depth, merged=False)
            self.active.discard(id(node))
        elif isinstance(node, SequenceNode):
            self.active.add(id(node))
            for index, item in enumerate(node.value):
                self.node(item, (*path, index), depth + 1)
            self.active.discard(id(node))

    def mapping(self, node: MappingNode, path: FieldPath, depth: int, *, merged: bool) -> None:
        first_line: dict[object, int] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # "<<: *anchor" merges; no path of its own
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                self.fail(key_node, "a key must be a plain value, not a list or a mapping")
            key = self.loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            part = key_part(key)
            if not merged and _hashable(key) and key in first_line:
                if len(self.problems) < MAX_PROBLEMS:
                    self.problems.append(
                        f"{self.source}:{key_line}: {format_path((*path, part))}: "
                        f"duplicate key (first written at line {first_line[key]})"
                    )
                continue
            if _hashable(key):
                first_line[key] = key_line
            if merged and (*path, part) in self.lines:
                continue  # written here (or merged earlier): this value is not used
            self.lines[(*path, part)] = key_line
            self.node(value_node, (*path, part), depth + 1)
        # Keys written here win over merged ones: merged lines only fill the gaps.
        for value_node in merges:
            targets = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for target in targets:
                self.enter(target, depth + 1)
                if isinstance(target, MappingNode):
                    self.active.add(id(target))
                    self.mapping(target, path, depth + 1, merged=True)
                    self.active.discard(id(target))


def key_part(key: object) -> str:
    """How a mapping key appears in a field path (YAML spelling for non-string keys)."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return str(key)


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
