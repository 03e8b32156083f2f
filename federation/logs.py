"""Structured JSON logs, one object per line, with the labels DESIGN.md names.

Every component logs through the standard :mod:`logging` module; this formatter
turns each record into one JSON object. Static fields (component, cluster,
workload) are set once at start; per-event fields go in ``extra={"fields": {...}}``
or directly as ``extra={"reason": ...}`` (e.g. ``destination_service``,
``trace_id``, ``reason``), so logs and metrics share one vocabulary and can be
joined on it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

#: The labels DESIGN.md's observability section asks every log line to use.
STANDARD_FIELDS = (
    "source_cluster",
    "destination_cluster",
    "destination_service",
    "locality_tier",
    "code",
    "trace_id",
    "span_id",
    "reason",
)


#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object; never raises on odd values (``repr`` fallback)."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "t": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            **self.static,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key != "fields" and key not in obj:
                obj[key] = value
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                obj[str(key)] = value
        if record.exc_info and record.exc_info[0] is not None:
            obj["error"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=repr, separators=(",", ":"))


def configure(
    level: str = "INFO", stream: TextIO | None = None, **static: Any
) -> logging.Handler:
    """Send every log record of this process to ``stream`` (stderr) as JSON lines.

    ``static`` fields (``component="agent"``, ``cluster="aws-use1"``) appear on
    every line. Returns the handler (tests capture it). An unknown level name is
    an error, not a silent default.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning or error)")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(static))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler
