"""YAML with line numbers: ``yaml.safe_load`` values plus the line of every field path.

``load_text(text, source)`` returns a ``Document``: ``data`` is exactly what
``yaml.safe_load`` would return, and ``doc.line(("spec", "limits", "max_cpu_util"))``
gives the 1-based line where that key (or list item) is written. A path that is not in
the file answers with the line of its nearest written ancestor, so "missing key" errors
point at the mapping that should hold it.

Unlike ``yaml.safe_load`` a key written twice in one mapping is an error (PyYAML keeps
the last one silently). Syntax errors and duplicates raise ``YamlError`` whose
``problems`` are already formatted as ``FILE:LINE: ...``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

# A field path: mapping keys (as written, str()-ed if not strings) and list indices.
FieldPath = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(Exception):
    """The text is not valid YAML, or repeats a key; ``problems`` are ``FILE:LINE: ...``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def format_path(path: FieldPath) -> str:
    """``("spec", "constraints", "anti_affinity", 1)`` -> ``spec.constraints.anti_affinity[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(document)"


@dataclass(frozen=True)
class Document:
    source: str  # file name used in messages
    data: object  # what yaml.safe_load returns
    lines: Mapping[FieldPath, int]  # path -> 1-based line where it is written

    def line(self, path: FieldPath) -> int:
        """Line of ``path``, or of its nearest ancestor present in the file."""
        for end in range(len(path), -1, -1):
            found = self.lines.get(path[:end])
            if found is not None:
                return found
        return 1

    def where(self, path: FieldPath) -> str:
        return f"{self.source}:{self.line(path)}"

    def problem(self, path: FieldPath, message: str) -> str:
        """``FILE:LINE: field.path: message``."""
        return f"{self.where(path)}: {format_path(path)}: {message}"


def load_file(path: str | Path) -> Document:
    """Read and parse ``path``; an unreadable file is a ``YamlError`` too."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlError([f"{source}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise YamlError([f"{source}: not UTF-8 text: {exc.reason}"]) from exc
    return load_text(text, source)


def load_text(text: str, source: str) -> Document:
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise YamlError([_syntax_problem(source, exc)]) from exc
        except yaml.YAMLError as exc:
            raise YamlError([f"{source}:1: YAML error: {exc}"]) from exc
        if node is None:  # empty file or only comments
            return Document(source=source, data=None, lines={(): 1})
        lines: dict[FieldPath, int] = {}
        problems: list[str] = []
        try:
            _walk(loader, node, (), lines, problems, source, set())
            if problems:
                raise YamlError(problems)
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            raise YamlError([_syntax_problem(source, exc)]) from exc
        return Document(source=source, data=data, lines=lines)
    finally:
        loader.dispose()


def _syntax_problem(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    what = exc.problem or exc.context or "invalid YAML"
    column = f" (column {mark.column + 1})" if mark is not None else ""
    return f"{source}:{line}: YAML syntax error: {what}{column}"


def _walk(
    loader: yaml.SafeLoader,
    node: Node,
    path: FieldPath,
    lines: dict[FieldPath, int],
    problems: list[str],
    source: str,
    active: set[int],
) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in active:  # a recursive alias: its lines are recorded already
        return
    if isinstance(node, MappingNode):
        active.add(id(node))
        first_line: dict[object, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # "<<: *anchor" merges; no path of its own
                continue
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            part = key_part(key)
            if _hashable(key) and key in first_line:
                problems.append(
                    f"{source}:{key_line}: {format_path((*path, part))}: "
                    f"duplicate key (first written at line {first_line[key]})"
                )
                continue
            if _hashable(key):
                first_line[key] = key_line
            lines[(*path, part)] = key_line
            _walk(loader, value_node, (*path, part), lines, problems, source, active)
        active.discard(id(node))
    elif isinstance(node, SequenceNode):
        active.add(id(node))
        for index, item in enumerate(node.value):
            _walk(loader, item, (*path, index), lines, problems, source, active)
        active.discard(id(node))


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
