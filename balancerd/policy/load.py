"""Policy documents: YAML -> validated ``Policy``, or ``PolicyError`` with every problem.

Each problem is reported as ``FILE:LINE: field.path: message``. The document is described
in ``policy/spec.py`` (checked field by field with the vocabulary of
``balancerd/validate.py``); rules spanning several fields are in ``policy/rules.py`` and
run even when some fields did not validate, so one pass reports everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from balancerd.errors import PolicyError
from balancerd.policy.model import Objective, Policy
from balancerd.policy.rules import cross_check
from balancerd.policy.spec import DOCUMENT, SPEC
from balancerd.validate import INVALID, Problems, lenient
from balancerd.yamlpos import Document, YamlError, load_file, load_text


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
        policy = Policy(name=built["metadata"]["name"], source=doc.source, lines=doc.lines, **spec)
    else:
        # Cross-field rules still run on what did validate, so one pass reports everything.
        policy = _partial_policy(doc)
    if policy is not None:
        cross_check(policy, out)
    if out.lines or policy is None:
        raise PolicyError(out.lines)
    return policy


def _partial_policy(doc: Document) -> Policy | None:
    """The spec built from its valid parts only (problems go to a scratch list)."""
    if not isinstance(doc.data, dict) or not isinstance(doc.data.get("spec"), dict):
        return None
    scratch = Problems(doc)
    spec = dict(doc.data["spec"])
    spec.setdefault("objective", Objective.BALANCE.value)
    attrs = lenient(SPEC, spec, ("spec",), scratch)
    return Policy(name="-", source=doc.source, **attrs)
