"""Logging: key=value messages through stdlib logging; journald fields under systemd.

Call sites pass structured fields with ``extra={"VM": ..., "HOST": ...}``; under
systemd they become journal fields, on stderr they are appended as key=value.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

JOURNAL_FIELDS = ("VM", "HOST", "MIGRATION_ID", "POLICY")


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [f"{k.lower()}={getattr(record, k)}" for k in JOURNAL_FIELDS if hasattr(record, k)]
        return text + (" " + " ".join(extras) if extras else "")


def _journal_handler() -> logging.Handler | None:
    if not os.environ.get("JOURNAL_STREAM") and not os.environ.get("INVOCATION_ID"):
        return None
    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER="balancerd")
    return handler


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = _journal_handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # APScheduler logs every job run at INFO; keep its warnings (missed runs) only.
    logging.getLogger("apscheduler").setLevel(max(level, logging.WARNING))
